"""Embedded SQLite persistence for the broker's registry.

The broker's state is soft: agents re-register and rebuild it.  The file only
lets a restarted broker list known devices as offline until their agent comes
back.  So writes are batched (registration changes, a coarse last-seen flush),
commits do not fsync (WAL, synchronous=NORMAL), and the file is held with an
exclusive lock so that two brokers never share one state file by mistake.

Every problem with the file becomes a ``StoreError`` whose text is one line
naming the path and the problem.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from zdut.common.paths import state_dir

APP = "zdut-broker"
SCHEMA_VERSION = 1

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS agents (name TEXT PRIMARY KEY, version TEXT NOT NULL, instance TEXT NOT NULL,"
    " address TEXT NOT NULL, last_seen REAL NOT NULL)",
    # commands: JSON [[command, help], ...]; one column keeps a registration to one row per device.
    "CREATE TABLE IF NOT EXISTS devices (name TEXT PRIMARY KEY, agent TEXT NOT NULL, commands TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS devices_by_agent ON devices (agent)",
)

_commands_json = msgspec.json.Encoder()
_commands_decoder = msgspec.json.Decoder(list[tuple[str, str]])


class StoreError(Exception):
    """The state file cannot be used; the text names the path and the problem."""


@dataclass(slots=True)
class DeviceRecord:
    name: str
    commands: list[tuple[str, str]]  # (command, help), sorted by command


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
        "database is locked": "state file is in use by another process (another zdut-broker?)",
    }
    for needle, hint in hints.items():
        if needle in text:
            return hint
    return text


class Store:
    """The broker registry on disk.  Not thread-safe: the broker's loop owns it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None
        if self.path.is_dir():
            raise StoreError(f"{self.path}: is a directory, not a state file")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot create directory {self.path.parent}: {exc.strerror}") from None
        try:
            self._db = sqlite3.connect(self.path, timeout=0.2, isolation_level=None)
            self._open()
        except sqlite3.Error as exc:
            self.close()
            raise StoreError(f"{self.path}: {_problem(exc)}") from None
        except StoreError:
            self.close()
            raise

    # ------------------------------------------------------------- opening
    def _open(self) -> None:
        db = self._db
        assert db is not None
        db.execute("PRAGMA locking_mode=EXCLUSIVE")  # held until close: one broker per state file
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
    def save(self, agents: Iterable[AgentRecord] = (), deleted: Iterable[str] = ()) -> None:
        """Replace the given agents' rows (and their device lists) and delete others, in one transaction."""
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
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot save the registry: {_problem(exc)}") from None

    def touch(self, last_seen: Iterable[tuple[str, float]]) -> None:
        """The coarse last-seen flush: one statement for all online agents."""
        db = self._conn()
        try:
            with self._transaction():
                db.executemany("UPDATE agents SET last_seen = ? WHERE name = ?", [(t, n) for n, t in last_seen])
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot save last-seen times: {_problem(exc)}") from None

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError(f"{self.path}: state file is closed")
        return self._db


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
