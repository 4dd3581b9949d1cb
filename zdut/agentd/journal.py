"""A device's journal: every session (who, what, when, its exit and its output) and lock event, on disk.

One JSON record a line, in at most ``segments`` files of ``cap_bytes // segments`` each: the active
``NAME.jsonl`` and the older ``NAME.1.jsonl`` ... ``NAME.{segments-1}.jsonl``.  When the active file would
pass its share it becomes ``.1`` (the oldest goes), so a device's journal never holds more than
``cap_bytes`` (defaults: 16 MiB in 4 files; a file's share is at least 128 KiB, so caps under 512 KiB
are that) and always keeps at least the newest ``(segments-1)/segments`` of it.  Files are appended to
across restarts; a torn last line (the agent killed mid-write) or any line that does not decode is skipped
by readers.

Output is coalesced: what one session prints on one stream within 0.2 s (up to 64 KiB) is one record, so
a flood of small writes is a few records a second.  Each record is written with one ``write`` call and
no fsync: a journal, not a database; a killed agent loses at most the last 0.2 s.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import logging
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec

log = logging.getLogger("zdut.journal")

DEFAULT_CAP_BYTES = 16 * 1024 * 1024
DEFAULT_SEGMENTS = 4
#: Output of one session and stream is merged into one record up to this size or age.
COALESCE_BYTES = 64 * 1024
COALESCE_S = 0.2
#: The newest output kept in memory for watchers' replay.
RECENT_BYTES = 256 * 1024

START, OUTPUT, END, GAP, NOTE = "start", "output", "end", "gap", "note"


class Entry(msgspec.Struct, omit_defaults=True):
    """One journal record.  ``data`` holds output as text when it is UTF-8, else ``b64`` holds it."""

    t: float
    kind: str  # start, output, end, lock, unlock, force, gap, note
    user: str = ""
    sid: int = 0
    command: str = ""
    args: list[str] = msgspec.field(default_factory=list)
    stream: str = ""  # stdout, stderr, print; stdin: typed input, kept only where the config asks
    data: str = ""
    b64: str = ""
    code: str = ""
    message: str = ""

    def payload(self) -> bytes:
        return base64.b64decode(self.b64) if self.b64 else self.data.encode()

    def lines(self) -> int:
        """How many lines it renders to."""
        if self.kind != OUTPUT:
            return 1
        data = self.payload()
        return data.count(b"\n") + (not data.endswith(b"\n"))


def _with_payload(entry: Entry, data: bytes) -> Entry:
    """Text when it is UTF-8 and JSON does not make it longer than base64 would (control bytes, as in
    escape sequences, grow to six each): a record never takes more than 4/3 of its bytes on disk."""
    try:
        text = data.decode()
    except UnicodeDecodeError:
        text = None
    if text is not None and len(_text_encoder.encode(text)) <= 4 * (len(data) + 2) // 3 + 2:
        entry.data = text
    else:
        entry.b64 = base64.b64encode(data).decode()
    return entry


_text_encoder = msgspec.json.Encoder()


_SAFE_NAME = re.compile(rb"[A-Za-z0-9_-]")


def file_stem(device: str) -> str:
    """A file name for any device name: injective, no separators, never hidden, ``.`` or ``..``."""
    return "".join(chr(b) if _SAFE_NAME.fullmatch(bytes([b])) else f"%{b:02X}" for b in device.encode()) or "%"


class Subscription:
    """A ``log --follow`` reader: what is written from now on, or a gap entry for what it fell behind by."""

    def __init__(self, journal: Journal, limit_bytes: int) -> None:
        self._journal, self._limit = journal, limit_bytes
        self._queue: collections.deque[Entry] = collections.deque()
        self._queued = self.missed = 0
        self._ready = asyncio.Event()

    def offer(self, entry: Entry, size: int) -> None:
        if self.missed or self._queued + size > self._limit:  # once behind, nothing until the reader catches up
            self.missed += size
        else:
            self._queue.append(entry)
            self._queued += size
        self._ready.set()

    async def next_batch(self) -> list[Entry]:
        await self._ready.wait()
        self._ready.clear()
        batch = list(self._queue)
        self._queue.clear()
        self._queued = 0
        if self.missed:  # where the loss began: after what was kept
            batch.append(Entry(self._journal.clock(), GAP, message=f"{self.missed} bytes of records missed: "
                                                                   "the reader fell behind"))
            self.missed = 0
        return batch

    def close(self) -> None:
        self._journal.subscriptions.discard(self)


class Journal:
    def __init__(self, directory: Path, device: str, cap_bytes: int = DEFAULT_CAP_BYTES,
                 segments: int = DEFAULT_SEGMENTS, clock: Callable[[], float] = time.time) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory, self.device, self.clock = directory, device, clock
        self.segments = max(2, segments)
        self.share = max(COALESCE_BYTES * 2, cap_bytes // self.segments)
        self.stem = file_stem(device)
        self.subscriptions: set[Subscription] = set()
        self.failing = False  # the last write failed (said once in the log)
        self._recent = bytearray()
        self._pending: Entry | None = None
        self._pending_data = bytearray()
        self._timer: asyncio.TimerHandle | None = None
        for entry in self.entries():  # the replay of a watcher survives a restart too
            if entry.kind == OUTPUT and entry.stream != "stdin":
                self._remember(entry.payload())
        self._file = open(self._path(0), "ab")
        self._size = self._file.tell()
        if self._size and not self._ends_with_newline():
            self._file.write(b"\n")  # a torn last record stays alone on its line
            self._size += 1
        self._encode = msgspec.json.Encoder().encode

    def _path(self, index: int) -> Path:
        return self.directory / (f"{self.stem}.jsonl" if index == 0 else f"{self.stem}.{index}.jsonl")

    def _ends_with_newline(self) -> bool:
        with open(self._path(0), "rb") as f:
            f.seek(-1, 2)
            return f.read(1) == b"\n"

    # ------------------------------------------------------------- writing
    def session_started(self, sid: int, user: str, command: str, args: list[str]) -> None:
        self._write(Entry(self.clock(), START, user, sid, command, list(args)))

    def output(self, sid: int, stream: str, data: bytes) -> None:
        if not data:
            return
        if stream != "stdin":  # a watcher's replay is what the device printed
            self._remember(data)
        pending = self._pending
        if pending is not None and (pending.sid, pending.stream) == (sid, stream) \
                and len(self._pending_data) + len(data) <= COALESCE_BYTES:
            self._pending_data += data
            return
        self.flush()
        for i in range(0, len(data), COALESCE_BYTES):
            self._pending, self._pending_data = Entry(self.clock(), OUTPUT, sid=sid, stream=stream), \
                bytearray(data[i:i + COALESCE_BYTES])
            if i + COALESCE_BYTES < len(data):
                self.flush()
        with contextlib.suppress(RuntimeError):  # no loop (a test, a tool): the next record or close flushes
            self._timer = asyncio.get_running_loop().call_later(COALESCE_S, self.flush)

    def session_ended(self, sid: int, code: str, message: str, user: str = "", command: str = "") -> None:
        self._write(Entry(self.clock(), END, user, sid, command, code=code, message=message))

    def event(self, kind: str, user: str, message: str = "") -> None:
        self._write(Entry(self.clock(), kind, user, message=message))

    def flush(self) -> None:
        """Write the output being coalesced."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, None
        if pending is not None:
            self._append(_with_payload(pending, bytes(self._pending_data)))
            self._pending_data = bytearray()

    def close(self) -> None:
        self.flush()
        with contextlib.suppress(OSError):  # what a full disk kept buffered is lost, as the log said
            self._file.close()

    def _write(self, entry: Entry) -> None:
        self.flush()  # records stay in time order
        self._append(entry)

    def _append(self, entry: Entry) -> None:
        line = self._encode(entry) + b"\n"
        try:
            if self._file.closed:  # a rotation that failed half-way: start again on a fresh active file
                self._file = open(self._path(0), "ab")
                self._size = self._file.tell()
            if self._size and self._size + len(line) > self.share:
                self._rotate()
            self._file.write(line)
            self._file.flush()
        except (OSError, ValueError) as exc:  # a full or lost disk costs the record, never the session
            if not self.failing:
                log.error("journal of %s: cannot write to %s (%s); records are dropped until it can",
                          self.device, self.directory, exc)
            self.failing = True
            return
        if self.failing:
            log.warning("journal of %s: writing again", self.device)
            self.failing = False
        self._size += len(line)
        for subscription in list(self.subscriptions):
            subscription.offer(entry, len(line))

    def _rotate(self) -> None:
        self._file.close()
        self._path(self.segments - 1).unlink(missing_ok=True)
        for index in range(self.segments - 2, -1, -1):
            with contextlib.suppress(FileNotFoundError):
                self._path(index).rename(self._path(index + 1))
        self._file = open(self._path(0), "ab")
        self._size = 0

    def _remember(self, data: bytes) -> None:
        self._recent += data
        if len(self._recent) > RECENT_BYTES:
            del self._recent[: len(self._recent) - RECENT_BYTES]

    # ------------------------------------------------------------- reading
    def entries(self, since: float | None = None) -> Iterator[Entry]:
        """Every record, oldest first, read file by file (never the whole journal in memory)."""
        decode = msgspec.json.Decoder(Entry).decode
        for index in range(self.segments - 1, -1, -1):
            try:
                f = open(self._path(index), "rb")
            except FileNotFoundError:
                continue
            with f:
                for line in f:
                    try:
                        entry = decode(line)
                        entry.payload()
                    except (msgspec.DecodeError, binascii.Error, UnicodeDecodeError):
                        continue  # torn by a crash, or not ours
                    if since is None or entry.t >= since:
                        yield entry

    def tail(self, lines: int, since: float | None = None) -> list[Entry]:
        """The newest records that render to at least ``lines`` lines, oldest first."""
        if lines <= 0:
            return []
        self.flush()
        kept: collections.deque[tuple[Entry, int]] = collections.deque()
        count = 0
        for entry in self.entries(since):
            n = entry.lines()
            kept.append((entry, n))
            count += n
            while count - kept[0][1] >= lines:
                count -= kept.popleft()[1]
        return [entry for entry, _ in kept]

    def recent_output(self, lines: int) -> bytes:
        """The device's last ``lines`` lines of output (a line being printed counts as one)."""
        data = bytes(self._recent)
        end = len(data) - 1 if data.endswith(b"\n") else len(data)
        start = end
        for _ in range(lines):
            start = data.rfind(b"\n", 0, start)
            if start < 0:
                return data
        return data[start + 1:] if lines else b""

    def subscribe(self, limit_bytes: int) -> Subscription:
        subscription = Subscription(self, limit_bytes)
        self.subscriptions.add(subscription)
        return subscription


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _shown(text: str) -> str:
    """A name or argument that came from a client, with control characters escaped."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def format_line(entry: Entry) -> str:
    """An entry as lines of text: ``2026-12-02T21:00:01.123Z alice started console``; output lines after
    ``|`` (stdout, print) or ``!`` (stderr), as the board printed them, and recorded input after ``>``."""
    ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(entry.t)) + f".{int(entry.t * 1000) % 1000:03d}Z"
    who = _shown(entry.user)
    if entry.kind == OUTPUT:
        mark = _STREAM_MARKS.get(entry.stream, "|")
        text = entry.payload().decode(errors="replace")
        return "".join(f"{ts} {mark} {line}\n" for line in text.splitlines())
    if entry.kind == START:
        return f"{ts} {who} started {_shown(' '.join([entry.command, *entry.args]))}\n"
    if entry.kind == END:
        how = f"{entry.code}: {_shown(entry.message)}" if entry.code else "ok"
        return f"{ts} {who}'s {_shown(entry.command)} ended: {how}\n"
    if entry.kind == GAP:
        return f"{ts} [gap: {_shown(entry.message)}]\n"
    if entry.kind == NOTE:
        return f"{ts} [{_shown(entry.message)}]\n"
    said = _EVENT_WORDS.get(entry.kind, entry.kind)
    return f"{ts} {who} {said} {_shown(entry.message)}".rstrip() + "\n"


_STREAM_MARKS = {"stderr": "!", "stdin": ">"}
_EVENT_WORDS = {"lock": "locked", "unlock": "unlocked", "force": "forced an unlock:"}
