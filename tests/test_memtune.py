"""zdut.common.memtune: streaming 1 MiB frames must not page-fault every byte it moves."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Moves 1.6 GB of 1 MiB messages through a real zmq pipe (8 in flight, like a credit window) and prints the
# page faults it took.  argv[1] == "tuned" applies zdut's settings first, as the zdut commands do at start.
STREAM = """
import resource, sys, zmq
if sys.argv[1] == "tuned":
    from zdut.common.memtune import tune_malloc
    assert tune_malloc()
ctx = zmq.Context(); a = ctx.socket(zmq.PAIR); b = ctx.socket(zmq.PAIR)
a.bind("inproc://m"); b.connect("inproc://m")
chunk = b"x" * (1 << 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(200):
    for _ in range(8): a.send(chunk)
    for _ in range(8): b.recv()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", STREAM, mode], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return int(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_tuned_malloc_reuses_pages_for_big_frames() -> None:
    default, tuned = faults("default"), faults("tuned")
    # Measured: ~146,000 faults by default (each freed chunk goes back to the kernel), ~2,300 tuned.
    if default < 50_000:  # another libc whose defaults already reuse pages: nothing for the tuning to fix
        pytest.skip(f"the default allocator took only {default} page faults")
    assert tuned < default / 10, f"tuned {tuned} vs default {default} page faults"


def test_tuning_is_idempotent() -> None:
    from zdut.common.memtune import tune_malloc

    first = tune_malloc()
    assert tune_malloc() == first


def test_gc_paused_pauses_the_collector_and_restores_it() -> None:
    import gc

    from zdut.common.memtune import gc_paused

    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()  # someone else's choice is kept
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
    with pytest.raises(ValueError), gc_paused():
        raise ValueError("even on an error")
    assert gc.isenabled()
