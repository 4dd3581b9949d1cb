"""Temporary files of the agent's runs: where they live, who removes them, and how a crashed agent's are found.

A run that stages something on the agent (an uploaded image, a file on its way back) does it in a
directory of its own, ``run_dir()``, which the ``with`` removes on every way out (success, failure, cancel,
a client that vanished).  A temporary file that must live elsewhere, such as the file module's upload
written beside its destination so that it can be renamed into place, comes from ``beside()``: the same
``with`` removes it unless it was renamed, and while it exists a note in the agent's own directory names it.

Where: each agent process claims a directory of its own under its root (``claim``; the root is
``<state dir>/agent-NAME.tmp/``, beside the agent's lock file) and holds an flock on it for as long as it
runs, so the kernel releases it however the process ends.  At start an agent sweeps the directories whose
lock nobody holds any more (a SIGKILLed or crashed predecessor): first the files their notes name, then the
directories themselves.  Nothing else is ever deleted: only paths an agent noted itself, only if they are
still regular files with the temp-file pattern (``.NAME.*.part``), never what another live agent holds.

Before ``claim`` (module tests, ``--dry-run``), run directories come from the system temp directory and
nothing is noted: there is no agent whose crash would need cleaning up after.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("zdut.agent")

#: A temp file written beside its destination: ``.NAME.<random>.part``.
PART_SUFFIX = ".part"
_PROC_PREFIX = "proc-"
_NOTE_PREFIX = "note-"

_home: Path | None = None  # this process's own directory, once claimed
_home_fd = -1  # the open directory whose flock says "this process is alive"


def claim(root: Path) -> int:
    """Make ``root`` this process's temp area: sweep what dead agents left there, then claim a directory of
    our own.  Returns how many stale temp files were removed."""
    global _home, _home_fd
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    removed = sweep(root)
    while True:
        path = Path(tempfile.mkdtemp(prefix=_PROC_PREFIX, dir=root))
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:  # a concurrent sweep took it before we held it
            continue
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino  # a concurrent sweep may have taken it
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    release()
    _home, _home_fd = path, fd
    return removed


def release() -> None:
    """Give up this process's directory (at exit; whatever is still in it goes with it)."""
    global _home, _home_fd
    if _home is not None:
        shutil.rmtree(_home, ignore_errors=True)
        os.close(_home_fd)
        _home, _home_fd = None, -1


def sweep(root: Path) -> int:
    """Remove what agents that no longer run left in ``root``; return how many temp files went."""
    removed = 0
    for entry in sorted(root.glob(f"{_PROC_PREFIX}*")):
        try:
            fd = os.open(entry, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live agent's
            notes = list(entry.glob(f"{_NOTE_PREFIX}*"))
            removed += sum(_remove_noted(note) for note in notes)
            removed += sum(1 for p in entry.rglob("*") if not p.is_dir()) - len(notes)
            shutil.rmtree(entry, ignore_errors=True)
        finally:
            os.close(fd)
    if removed:
        log.info("removed %d stale temporary files left by an agent that stopped (in %s)", removed, root)
    return removed


def _remove_noted(note: Path) -> int:
    """Delete the temp file ``note`` names if it is still one of ours; 1 if it went."""
    try:
        target = note.read_text().strip()
        info = os.lstat(target)
    except (OSError, UnicodeDecodeError):
        return 0
    name = os.path.basename(target)
    if not (stat.S_ISREG(info.st_mode) and name.startswith(".") and name.endswith(PART_SUFFIX)):
        return 0
    with contextlib.suppress(OSError):
        os.unlink(target)
        log.info("removed stale temporary file %s", target)
        return 1
    return 0


def _where() -> Path | None:
    """This process's directory (None: the system temp directory, before ``claim`` or if it was deleted)."""
    return _home if _home is not None and _home.is_dir() else None


def mkdtemp(prefix: str) -> Path:
    """A directory that outlives a run (what ``init`` sets up, an image kept for the next run): its owner
    removes it; if the agent dies first, the next one does."""
    return Path(tempfile.mkdtemp(prefix=f"{prefix}-", dir=_where()))


@contextlib.contextmanager
def run_dir(prefix: str) -> Iterator[Path]:
    """A directory for one run's own files, removed with everything in it when the ``with`` ends."""
    path = mkdtemp(prefix)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class Beside:
    """A temp file in ``destination``'s directory (``fd``, ``path``), to be renamed onto it once complete.

    Creating it raises OSError if it cannot be made.  Leaving the ``with`` removes it unless it was
    renamed; while it exists a note names it, so that the next agent removes it if this one dies first."""

    def __init__(self, destination: str) -> None:
        folder = os.path.abspath(os.path.dirname(destination) or ".")
        self._note = ""
        self.fd = -1
        try:
            while self.fd < 0:
                # The note is written before the file exists, so a kill at any moment leaves no temp file
                # that no note names (a note naming a file never made is harmless).
                self.path = os.path.join(folder, f".{os.path.basename(destination)}.{secrets.token_hex(6)}"
                                                 f"{PART_SUFFIX}")
                self._write_note()
                with contextlib.suppress(FileExistsError):  # that name is taken: draw another
                    self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except BaseException:
            if self.fd < 0:
                self.path = ""  # never created: nothing of ours to remove but the note
            else:
                os.close(self.fd)
            self.close()
            raise

    def _write_note(self) -> None:
        home = _where()
        if home is None:
            return
        if not self._note:
            nfd, self._note = tempfile.mkstemp(dir=home, prefix=_NOTE_PREFIX)
            os.close(nfd)
        with open(self._note, "w") as fh:
            fh.write(self.path)

    def __enter__(self) -> Beside:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for path in (self.path, self._note):  # the temp file is gone already if it was renamed into place
            if path:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
