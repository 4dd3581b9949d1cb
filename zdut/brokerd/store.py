"""Embedded SQLite persistence for the broker's registry.

The broker's state is soft: agents re-register and rebuild it.  The file only
lets a restarted broker list known devices as offline until their agent comes
back.  So writes are batched (registration changes, a coarse last-seen flush),
and commits do not fsync (WAL, synchronous=NORMAL).  The database itself is
never locked for longer than a write, so ``sqlite3`` can read it while the
broker runs; one broker per state file is kept by an flock on the sibling
``STATE.lock`` (which names the holder's pid).

Before each write the file is checked: deleted or replaced under the broker,
it is created anew (``check`` says so, and the caller writes everything again);
read-only (no write permission bits, even for root, or a read-only file
system), it is refused.  Every problem with the file becomes a ``StoreError``
whose text is one line naming the path and the problem.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from zdut.common.paths import state_dir
from zdut.protocol import CommandInfo

APP = "zdut-broker"
SCHEMA_VERSION = 1

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS agents (name TEXT PRIMARY KEY, version TEXT NOT NULL, instance TEXT NOT NULL,"
    " address TEXT NOT NULL, last_seen REAL NOT NULL)",
    # commands: JSON [[command, help, desc], ...] (older rows [command, help] read with desc ""); one column
    # keeps a registration to one row per device.
    "CREATE TABLE IF NOT EXISTS devices (name TEXT PRIMARY KEY, agent TEXT NOT NULL, commands TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS devices_by_agent ON devices (agent)",
)

_commands_json = msgspec.json.Encoder()
_commands_decoder = msgspec.json.Decoder(list[CommandInfo])


class StoreError(Exception):
    """The state file cannot be used; the text names the path and the problem."""


@dataclass(slots=True)
class DeviceRecord:
    name: str
    commands: list[CommandInfo]  # sorted by name


@dataclass(slots=True)
class AgentRecord:
    name: str
    version: str
    instance: str
    address: str
    last_seen: float  # unix seconds
    devices: list[DeviceRecord] = field(default_factory=list)


def default_state_path() -> Path:
    """``$XDG_STATE_HOME/zdut/broker.sqlite3``, else ``~/.local/state/zdut/broker.sqlite3``."""
    return state_dir() / "broker.sqlite3"


def _problem(exc: sqlite3.Error) -> str:
    """A short, actionable description of an SQLite failure."""
    text = str(exc)
    hints = {
        "file is not a database": "not an SQLite database (corrupt state file?)",
        "database disk image is malformed": "corrupt state file (database disk image is malformed)",
        "unable to open database file": "cannot open the state file (missing directory or no permission)",
        "readonly database": "state file is not writable",
        "database is locked": "state file is locked by another process (an open sqlite3 write transaction?)",
    }
    for needle, hint in hints.items():
        if needle in text:
            return hint
    return text


class Store:
    """The broker registry on disk.  Not thread-safe: the broker's loop owns it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._db: sqlite3.Connection | None = None
        self._guard: int | None = None
        self._ino = (0, 0)
        if self.path.is_dir():
            raise StoreError(f"{self.path}: is a directory, not a state file")
        try:
            self._connect()
        except StoreError:
            self.close()
            raise

    # ------------------------------------------------------------- opening
    def _connect(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot create directory {self.path.parent}: {exc.strerror}") from None
        if not self._guard_in_place():
            self._take_guard()
        self._check_writable()
        try:
            self._db = sqlite3.connect(self.path, timeout=0.2, isolation_level=None)
            self._open()
            st = os.stat(self.path)
        except sqlite3.Error as exc:
            self._close_db()
            raise StoreError(f"{self.path}: {_problem(exc)}") from None
        except OSError as exc:
            self._close_db()
            raise StoreError(f"{self.path}: {exc.strerror}") from None
        except StoreError:
            self._close_db()
            raise
        self._ino = (st.st_dev, st.st_ino)

    def _take_guard(self) -> None:
        """The single-instance guard: an flock on STATE.lock, held until close; it holds the broker's pid."""
        lock = self.lock_path
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot create the lock file {lock}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            pid = f" (pid {holder})" if holder.isdigit() else ""
            raise StoreError(
                f"{self.path}: state file is in use by another zdut-broker{pid}; give each broker its own --state"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        if self._guard is not None:
            os.close(self._guard)
        self._guard = fd

    def _check_writable(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StoreError(f"{self.path}: {exc.strerror}") from None
        if not st.st_mode & 0o222 or not os.access(self.path, os.W_OK):
            raise StoreError(
                f"{self.path}: state file is read-only (mode {st.st_mode & 0o7777:04o}"
                f"{', on a read-only file system' if _read_only_fs(self.path) else ''}); "
                "make it writable or give another --state"
            )

    def check(self) -> bool:
        """Before a write: True if the state file (or its lock file) was deleted or replaced and has been
        created anew, so that the caller writes the whole registry again; StoreError if it is read-only."""
        try:
            st = os.stat(self.path)
            current = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            current = (0, 0)
        except OSError as exc:
            raise StoreError(f"{self.path}: {exc.strerror}") from None
        if current == self._ino and self._db is not None and self._guard_in_place():
            self._check_writable()
            return False
        self._close_db()  # checkpoints into the old inode and removes its -wal
        if current == (0, 0):
            for suffix in ("-wal", "-shm", "-journal"):  # leftovers of the deleted file, never of the new one
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{self.path}{suffix}")
        self._connect()
        return True

    def _guard_in_place(self) -> bool:
        if self._guard is None:
            return False
        try:
            return os.stat(self.lock_path).st_ino == os.fstat(self._guard).st_ino
        except OSError:
            return False

    def _open(self) -> None:
        db = self._db
        assert db is not None
        (check,) = db.execute("PRAGMA quick_check").fetchone()
        if check != "ok":
            raise StoreError(f"{self.path}: corrupt state file ({check})")
        self._check_owner()
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        # A real write at start-up: an unwritable file must fail now, not at the first registration.
        with self._transaction():
            for statement in _SCHEMA:
                db.execute(statement)
            db.execute("INSERT OR REPLACE INTO meta VALUES ('app', ?), ('schema', ?)", (APP, str(SCHEMA_VERSION)))

    def _check_owner(self) -> None:
        """Refuse SQLite files that belong to something else or to a newer broker."""
        db = self._db
        assert db is not None
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            return
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall()) if "meta" in tables else {}
        if meta.get("app") != APP:
            raise StoreError(f"{self.path}: not a {APP} state file (it holds tables {', '.join(sorted(tables))})")
        schema = meta.get("schema", "")
        if not schema.isdigit() or int(schema) > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: written by a newer {APP} (schema {schema}, this one reads {SCHEMA_VERSION})"
            )

    def _transaction(self) -> _Transaction:
        assert self._db is not None
        return _Transaction(self._db)

    # ------------------------------------------------------------- reading
    def load(self) -> list[AgentRecord]:
        """Every known agent with its devices, sorted by name."""
        db = self._conn()
        try:
            agents = {
                name: AgentRecord(name, version, instance, address, last_seen)
                for name, version, instance, address, last_seen in db.execute(
                    "SELECT name, version, instance, address, last_seen FROM agents ORDER BY name"
                )
            }
            for name, agent, commands in db.execute("SELECT name, agent, commands FROM devices ORDER BY name"):
                record = agents.get(agent)
                if record is not None:  # an orphan device row is ignored, never fatal
                    record.devices.append(DeviceRecord(name, _commands_decoder.decode(commands)))
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {_problem(exc)}") from None
        except msgspec.DecodeError as exc:
            raise StoreError(f"{self.path}: corrupt command list in state file ({exc})") from None
        return list(agents.values())

    # ------------------------------------------------------------- writing
    def save(
        self,
        agents: Iterable[AgentRecord] = (),
        deleted: Iterable[str] = (),
        last_seen: Iterable[tuple[str, float]] = (),
    ) -> None:
        """Replace the given agents' rows (and their device lists), delete others and update the last-seen
        times of more, in one transaction."""
        db = self._conn()
        try:
            with self._transaction():
                for name in deleted:
                    db.execute("DELETE FROM devices WHERE agent = ?", (name,))
                    db.execute("DELETE FROM agents WHERE name = ?", (name,))
                for a in agents:
                    db.execute(
                        "INSERT OR REPLACE INTO agents VALUES (?, ?, ?, ?, ?)",
                        (a.name, a.version, a.instance, a.address, a.last_seen),
                    )
                    db.execute("DELETE FROM devices WHERE agent = ?", (a.name,))
                    # OR REPLACE moves a device another (offline) agent used to serve.
                    db.executemany(
                        "INSERT OR REPLACE INTO devices VALUES (?, ?, ?)",
                        [(d.name, a.name, _commands_json.encode(d.commands).decode()) for d in a.devices],
                    )
                db.executemany("UPDATE agents SET last_seen = ? WHERE name = ?", [(t, n) for n, t in last_seen])
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot save the registry: {_problem(exc)}") from None

    def close(self) -> None:
        self._close_db()
        if self._guard is not None:
            os.close(self._guard)  # releases the flock; the lock file stays, as harmless as a pid file
            self._guard = None

    def _close_db(self) -> None:
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass  # a file deleted under us may not close cleanly: nothing left to save in it
            self._db = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError(f"{self.path}: state file is closed")
        return self._db


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any error (the connection runs in autocommit mode)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        if kind is None:
            self._db.execute("COMMIT")
        elif self._db.in_transaction:
            self._db.execute("ROLLBACK")
