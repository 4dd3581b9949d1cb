"""Process-wide malloc settings for streaming 1 MiB frames (glibc only; a no-op elsewhere).

libzmq allocates every received message of more than a few KiB with malloc.  glibc serves a 1 MiB
request with a fresh mmap (or trims the heap right after it is freed), so a file transfer page-faults
and zeroes every byte it moves: ~170,000 faults per GiB in the broker, and 0.3-0.4 s of kernel time
per GiB in each process (docs/performance.md).  Serving such chunks from the heap and keeping a
bounded amount of freed heap lets the same pages carry the next chunks.  The cost is at most
``TRIM_BYTES`` of freed memory kept per malloc arena, well inside the 100 MB RSS budget.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import sys
from collections.abc import Iterator

log = logging.getLogger("zdut.common.memtune")

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Requests up to this size come from the heap: a 1 MiB chunk plus its frame and allocator headers.
MMAP_BYTES = 4 * 1024 * 1024
#: Freed memory kept per arena before it goes back to the kernel (a few chunks in flight).
TRIM_BYTES = 32 * 1024 * 1024

_done = False


def tune_malloc() -> bool:
    """Apply the settings once per process; True if glibc accepted them."""
    global _done
    if _done or not sys.platform.startswith("linux"):
        return _done
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library is already loaded: no library search
    except (OSError, AttributeError):  # musl and friends have no mallopt: keep their defaults
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_BYTES))
    if not _done:
        log.debug("mallopt refused the streaming settings; keeping the defaults")
    return _done


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside: for decoding a bulk message (a listing of 100,000 devices), whose
    thousands of new objects hold no cycles but would set off collections that rescan them all (a third of
    the decode's time).  Reference counting still frees everything; the collector runs as before after."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
