"""agentd.journal: a device's bounded on-disk journal, on real files."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from conftest import run_measured
from zdut.agentd.journal import COALESCE_BYTES, Entry, Journal, file_stem, format_line


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        self.now += 1
        return self.now


def journal(tmp_path: Path, **kw: object) -> Journal:
    return Journal(tmp_path, "board", clock=Clock(), **kw)  # type: ignore[arg-type]


def on_disk(tmp_path: Path) -> int:
    return sum(p.stat().st_size for p in tmp_path.glob("*.jsonl"))


def test_a_session_and_lock_events_read_back_in_order_and_render(tmp_path: Path) -> None:
    j = journal(tmp_path)
    j.session_started(7, "alice", "console", ["--baud", "115200"])
    j.output(7, "stdout", b"U-Boot 2024.01\nbooting\n")
    j.output(7, "stderr", b"warning\n")
    j.session_ended(7, "Canceled", "canceled by the client", "alice", "console")
    j.event("lock", "bob", "until later")
    j.close()
    kinds = [(e.kind, e.stream) for e in Journal(tmp_path, "board").entries()]
    assert kinds == [("start", ""), ("output", "stdout"), ("output", "stderr"), ("end", ""), ("lock", "")]
    text = "".join(format_line(e) for e in Journal(tmp_path, "board").entries())
    assert " alice started console --baud 115200\n" in text
    assert " | U-Boot 2024.01\n" in text and " | booting\n" in text and " ! warning\n" in text
    assert " alice's console ended: Canceled: canceled by the client\n" in text
    assert " bob locked until later\n" in text


def test_bytes_that_are_not_utf8_come_back_exactly(tmp_path: Path) -> None:
    j = journal(tmp_path)
    data = bytes(range(256)) * 3
    j.output(1, "stdout", data)
    j.close()
    (entry,) = Journal(tmp_path, "board").entries()
    assert entry.b64 and not entry.data and entry.payload() == data


def test_many_small_writes_are_a_few_records(tmp_path: Path) -> None:
    j = journal(tmp_path)
    for _ in range(10_000):
        j.output(1, "stdout", b"x")
    j.close()
    entries = list(Journal(tmp_path, "board").entries())
    assert len(entries) == 1 and entries[0].payload() == b"x" * 10_000


def test_rotation_keeps_the_journal_within_its_cap_and_drops_the_oldest(tmp_path: Path) -> None:
    cap = 1024 * 1024
    j = journal(tmp_path, cap_bytes=cap, segments=4)
    for i in range(400):
        j.session_started(i, "alice", "run", [str(i)])
        j.output(i, "stdout", b"%d " % i * 2000)
        assert on_disk(tmp_path) <= cap
    j.close()
    starts = [int(e.args[0]) for e in Journal(tmp_path, "board", cap_bytes=cap).entries() if e.kind == "start"]
    assert starts == sorted(starts) and starts[-1] == 399 and starts[0] > 0  # the oldest went first
    assert len(list(tmp_path.glob("*.jsonl"))) == 4


def test_a_reopened_journal_keeps_its_history_and_skips_torn_and_foreign_lines(tmp_path: Path) -> None:
    j = journal(tmp_path)
    j.output(1, "stdout", b"before the crash\n")
    j.close()
    active = tmp_path / f"{file_stem('board')}.jsonl"
    with open(active, "ab") as f:
        f.write(b'{"t": 5, "kind": "outp')  # killed mid-write
    j = journal(tmp_path)
    j.output(2, "stdout", b"after the restart\n")
    j.close()
    with open(active, "ab") as f:
        f.write(b"not json at all\n")
    assert [e.payload() for e in Journal(tmp_path, "board").entries()] == [b"before the crash\n",
                                                                          b"after the restart\n"]
    assert Journal(tmp_path, "board").recent_output(5) == b"before the crash\nafter the restart\n"


def test_tail_counts_lines_across_segments_and_since_filters(tmp_path: Path) -> None:
    j = journal(tmp_path, cap_bytes=4 * 2 * COALESCE_BYTES)
    for i in range(300):
        j.event("note", "alice", f"note {i}")
        j.output(i, "stdout", b"line a\nline b\n" + b"x" * 1000)
    tail = j.tail(5)
    assert sum(e.lines() for e in tail) >= 5 and tail[-1].payload().startswith(b"line a")
    assert [e.kind for e in tail] == ["output", "note", "output"]  # 3 + 1 + 3 lines: the fewest that make 5
    assert [e.message for e in tail if e.kind == "note"] == ["note 299"]
    assert len({p.name for p in tmp_path.glob("*.jsonl")}) > 1
    since = j.tail(1000, since=tail[0].t)
    assert since[0].t >= tail[0].t and since[-1] == tail[-1]


def test_recent_output_is_the_last_lines(tmp_path: Path) -> None:
    j = journal(tmp_path)
    j.output(1, "stdout", b"one\ntwo\nthree\nfour\npartial")
    assert j.recent_output(2) == b"four\npartial"
    assert j.recent_output(0) == b""
    assert j.recent_output(100) == b"one\ntwo\nthree\nfour\npartial"


def test_recorded_input_is_marked_and_never_replayed_to_watchers(tmp_path: Path) -> None:
    j = journal(tmp_path)
    j.output(1, "stdout", b"login: ")
    j.output(1, "stdin", b"root\n")
    j.output(1, "stdout", b"root\n# ")
    j.event("note", "", "the port is back")
    j.close()
    assert j.recent_output(5) == b"login: root\n# "
    reopened = Journal(tmp_path, "board")
    assert reopened.recent_output(5) == b"login: root\n# "  # rebuilt without the input after a restart too
    text = "".join(format_line(e) for e in reopened.entries())
    assert " > root\n" in text and " | login: \n" in text and text.endswith(" [the port is back]\n")


def test_a_follower_that_does_not_read_is_told_what_it_missed_and_never_blocks(tmp_path: Path) -> None:
    async def scenario() -> list[Entry]:
        j = journal(tmp_path)
        follower = j.subscribe(limit_bytes=256 * 1024)
        for i in range(160):
            j.output(i, "stdout", b"y" * COALESCE_BYTES)  # 10 MiB, one record each
        j.flush()
        batch = await follower.next_batch()
        follower.close()
        j.output(999, "stdout", b"after close")
        j.close()
        assert not j.subscriptions
        return batch

    batch = asyncio.run(scenario())
    assert batch[-1].kind == "gap" and "bytes of records missed" in batch[-1].message
    missed = int(batch[-1].message.split()[0])
    assert missed > 9 * 1024 * 1024
    assert 0 < len(batch) - 1 <= 4 and all(e.kind == "output" for e in batch[:-1])  # the gap where it began
    assert [e.sid for e in batch[:-1]] == list(range(len(batch) - 1))


@pytest.mark.parametrize("names", [["../x", "a/b", "", "é", ".", "..", "%2E", "board"]])
def test_device_names_map_to_distinct_plain_files(tmp_path: Path, names: list[str]) -> None:
    stems = [file_stem(n) for n in names]
    assert len(set(stems)) == len(names)
    for name in names:
        Journal(tmp_path / "j", name).close()
    made = sorted(p.name for p in (tmp_path / "j").iterdir())
    assert len(made) == len(names) and all("/" not in m and not m.startswith(".") for m in made)
    assert list(tmp_path.iterdir()) == [tmp_path / "j"]


WRITE_100_MB = """
import sys
from pathlib import Path
from zdut.agentd.journal import Journal
j = Journal(Path(sys.argv[1]), "board", cap_bytes=8 * 1024 * 1024)
chunk = b"console line of a board booting, with some numbers 0123456789\\n" * 64
for _ in range(100 * 1024 * 1024 // len(chunk)):
    j.output(1, "stdout", chunk)
j.close()
"""


def test_100_mb_of_output_stays_within_the_cap_and_in_bounded_memory(tmp_path: Path) -> None:
    """In a process of its own, so that the peak is the journal's (a pytest process's peak is anyone's)."""
    r, peak_mb = run_measured([sys.executable, "-c", WRITE_100_MB, str(tmp_path)])
    assert r.returncode == 0, r.stderr
    assert 0 < on_disk(tmp_path) <= 8 * 1024 * 1024
    _, imports_mb = run_measured([sys.executable, "-c", "import msgspec, zdut.agentd.journal"])
    assert peak_mb - imports_mb < 30, (peak_mb, imports_mb)


def test_a_journal_that_cannot_write_drops_records_and_never_raises(tmp_path: Path) -> None:
    j = journal(tmp_path)
    j._file.close()
    j._file = open("/dev/full", "ab")  # a full disk: every write fails with ENOSPC
    j.session_started(1, "alice", "console", [])
    j.output(1, "stdout", b"still served\n")
    j.flush()
    assert j.failing
    assert j.recent_output(1) == b"still served\n"  # watchers still get their replay
    j._file = open(tmp_path / "elsewhere.jsonl", "ab")  # the disk has room again
    j.event("note", "alice", "back")
    assert not j.failing
    j.close()


def test_escape_sequences_cannot_blow_the_cap(tmp_path: Path) -> None:
    """Control bytes are valid UTF-8 but six bytes each in JSON: such output is stored as base64 instead."""
    cap = 1024 * 1024
    j = journal(tmp_path, cap_bytes=cap)
    for _ in range(64):
        j.output(1, "stdout", b"\x1b[0m\x01" * 16384)
        j.flush()
        assert on_disk(tmp_path) <= cap
    j.close()
    assert all(e.b64 for e in Journal(tmp_path, "board", cap_bytes=cap).entries())
