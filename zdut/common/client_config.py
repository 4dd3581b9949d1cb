"""The client's keys (issue 12) and default server (issue 15): which key pair and server key a client holds for a
server, where they came from, and where a client connects when it is not told.

The config file is ``$XDG_CONFIG_HOME/zdut/config.toml`` (default ``~/.config/zdut/config.toml``)::

    [default]
    server = "lab1:1024,lab2:1024"             # where to connect without -s or $ZDUT_SERVER: a broker, or a list
    key = "~/.config/zdut/alice.key_secret"    # your secret key file (zdut keys generate alice)
    server_key = "lab.key"                     # the server's public key file; relative to this file's directory

    [servers."lab2:1024"]                      # a server as -s names it (localhost and 127.0.0.1 are the same)
    server_key = "lab2.key"

Each field comes from the first of: the flag (``--key``, ``--server-key``; the API's ``key=``, ``server_key=``), the
variable (``$ZDUT_KEY``, ``$ZDUT_SERVER_KEY``), the server's section, ``[default]``. Neither field anywhere: no CURVE
(a server with security off). One without the other, a file that is not TOML, a field or table this file does not
know, a key file missing or unusable: :class:`KeyConfigError`, one line naming the file, which front ends make a
usage error. With a key, the user is the key's name: the secret file's name without ``.key_secret``.
"""

from __future__ import annotations

import getpass
import os
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zdut.common.addresses import server_endpoint, server_list
from zdut.common.keys import SECRET_SUFFIX, KeyFileError, load_pair, load_public, name_problem, read_small_file

KEY_ENV, SERVER_KEY_ENV, SERVER_ENV = "ZDUT_KEY", "ZDUT_SERVER_KEY", "ZDUT_SERVER"
FIELDS = ("key", "server_key")
DEFAULT_FIELDS = ("server", *FIELDS)  # [default] also names the server; a server's own table cannot
#: Where a client connects without -s, $ZDUT_SERVER or a config file's server.
DEFAULT_SERVER = "localhost:1024"
#: A config file is a few lines: anything much larger (``/dev/zero``, a disk image) is not one.
MAX_CONFIG_BYTES = 1 << 20
PathArg = str | os.PathLike[str]


class KeyConfigError(ValueError):
    """The client's keys cannot be settled: a bad config file, a missing or unusable key file, half a pair."""


@dataclass(frozen=True, slots=True)
class ClientKeys:
    """What a CURVE client holds: its pair (Z85), the server's public key, and the files they came from."""

    name: str  # the key's name, which is the user on a secure server
    pair: tuple[bytes, bytes]
    server_key: bytes
    key_file: str
    server_key_file: str


@dataclass(frozen=True, slots=True)
class _Setting:
    """One field's value and where it was set (for messages); relative paths are relative to ``base``."""

    value: str
    origin: str
    base: Path | None = None

    @property
    def path(self) -> str:
        path = os.path.expanduser(self.value)
        return str(self.base / path) if self.base is not None else path


def default_user(keys: ClientKeys | None = None) -> str:
    """The key's name with keys (a secure server takes no other), else ``$USER@hostname`` as dutctl, else
    ``unknown-<hex>``."""
    if keys is not None:
        return keys.name
    try:
        user = os.environ.get("USER") or getpass.getuser()
        return f"{user}@{socket.gethostname()}"
    except Exception:
        return f"unknown-{secrets.token_hex(4)}"


def config_path() -> Path:
    """``$XDG_CONFIG_HOME/zdut/config.toml``, else ``~/.config/zdut/config.toml``."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "zdut" / "config.toml"


def default_server(env: Mapping[str, str] | None = None) -> tuple[str, str]:
    """Where a client connects when not told (the first of: ``$ZDUT_SERVER``, the config file's ``[default]
    server``, ``localhost:1024``), and where that came from, to name in messages.  Raises KeyConfigError."""
    env = os.environ if env is None else env
    if env.get(SERVER_ENV):
        return env[SERVER_ENV], f"${SERVER_ENV}"
    path = config_path()
    server = _read_config(path).get("default", {}).get("server")
    if server:
        try:
            server_list(server)
        except ValueError as exc:  # the file's problem, said as one: no usage text
            raise KeyConfigError(f"{path}: [default] server {server!r}: {exc}") from None
        return server, f"{path} [default] server"
    return DEFAULT_SERVER, "the default server"


def client_keys(server: str, key: PathArg | None = None, server_key: PathArg | None = None, *,
                given_as: tuple[str, str] = ("--key", "--server-key"),
                env: Mapping[str, str] | None = None) -> ClientKeys | None:
    """The keys to use towards ``server`` (an address as -s takes it), or None for no CURVE.

    ``key`` and ``server_key`` are what the caller was given (a flag, an argument named ``given_as`` in messages);
    the environment (``env``, default ``os.environ``) and the config file fill in the rest. Raises KeyConfigError."""
    env = os.environ if env is None else env
    path = config_path()
    sections = _read_config(path)
    tables = [_section_for(sections, server), ("default", sections.get("default", {}))]
    found: dict[str, _Setting] = {}
    for field, given, flag, variable in zip(FIELDS, (key, server_key), given_as, (KEY_ENV, SERVER_KEY_ENV),
                                            strict=True):
        if given is not None and not os.fspath(given):
            raise KeyConfigError(f"{flag}: empty file name")
        settings = [
            *([_Setting(os.fspath(given), flag)] if given is not None else []),
            *([_Setting(env[variable], f"${variable}")] if env.get(variable) else []),
            *(_Setting(table[field], f"{path} [{label}] {field}", path.parent) for label, table in tables
              if field in table),
        ]
        if settings:
            found[field] = settings[0]
    if not found:
        return None
    if len(found) == 1:
        ((have, setting),) = found.items()
        lacking = 1 - FIELDS.index(have)
        variable = (KEY_ENV, SERVER_KEY_ENV)[lacking]
        raise KeyConfigError(f"{setting.origin} is set, but no {FIELDS[lacking]}: CURVE needs both; give "
                             f"{given_as[lacking]}, ${variable} or {FIELDS[lacking]} in {path}")
    return _load(found["key"], found["server_key"])


def _load(key: _Setting, server: _Setting) -> ClientKeys:
    key_file, server_file = key.path, server.path
    try:
        pair = load_pair(key_file)
    except KeyFileError as exc:
        raise KeyConfigError(f"{key.origin}: {exc}") from None
    name = Path(key_file).name
    name = name[: -len(SECRET_SUFFIX)] if name.endswith(SECRET_SUFFIX) else Path(name).stem
    if (problem := name_problem(name)) is not None:
        raise KeyConfigError(f"{key.origin}: {key_file}: the file's name gives the key's name {name!r}, which "
                             f"{problem} (name the file NAME{SECRET_SUFFIX}, as zdut keys generate does)")
    try:
        public = load_public(server_file)
    except KeyFileError as exc:
        raise KeyConfigError(f"{server.origin}: {exc}") from None
    return ClientKeys(name, pair, public, key_file, server_file)


def _read_config(path: Path) -> dict[str, Any]:
    """The config's tables, checked: ``{"default": {...}, "servers": {"HOST:PORT": {...}}}``; {} without a file."""
    try:
        data, _ = read_small_file(path, MAX_CONFIG_BYTES, KeyConfigError,
                                  f"over {MAX_CONFIG_BYTES >> 20} MiB: not a zdut config file")
    except FileNotFoundError:
        return {}
    import tomllib  # here: most clients have no config file, and every start-up counts (the shell's prompt)

    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise KeyConfigError(f"{path}: not valid TOML: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise KeyConfigError(f"{path}: not valid TOML: {exc} (a server's table is [servers.\"HOST:PORT\"], "
                             "quoted)") from None
    _only(path, "the top level", doc, ("default", "servers"), "tables")
    if "default" in doc:
        _table(path, "default", doc["default"], DEFAULT_FIELDS)
    servers = doc.get("servers", {})
    if not isinstance(servers, dict):
        raise KeyConfigError(f"{path}: servers must be tables [servers.\"HOST:PORT\"], not a value")
    seen: dict[str, str] = {}
    for name, table in servers.items():
        label = f'servers."{name}"'
        try:
            endpoint = server_endpoint(name)
        except ValueError as exc:
            raise KeyConfigError(f"{path}: [{label}]: not a server address: {exc}") from None
        if endpoint in seen:
            raise KeyConfigError(f'{path}: [{label}] and [servers."{seen[endpoint]}"] are the same server')
        seen[endpoint] = name
        _table(path, label, table, FIELDS)
    return doc


def _table(path: Path, label: str, table: object, fields: tuple[str, ...]) -> None:
    if not isinstance(table, dict):
        raise KeyConfigError(f"{path}: {label} must be a table [{label}], not a value")
    if "server" in table and "server" not in fields:
        raise KeyConfigError(f"{path}: [{label}]: server belongs in [default] (a server's table holds its keys: "
                             f"{' and '.join(fields)})")
    _only(path, f"[{label}]", table, fields, "fields")
    for field, value in table.items():
        if not isinstance(value, str) or not value:
            what = "host:port, or a comma-separated list of them," if field == "server" else "a file name"
            raise KeyConfigError(f'{path}: [{label}] {field} must be {what} in quotes, not {value!r}')


def _only(path: Path, where: str, table: dict[str, Any], known: tuple[str, ...], what: str) -> None:
    for name in table:
        if name not in known:
            import difflib

            near = difflib.get_close_matches(name, known, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise KeyConfigError(f"{path}: {where}: unknown {what[:-1]} {name!r} ({hint}the {what} are "
                                 f"{', '.join(known[:-1])} and {known[-1]})")


def _section_for(sections: dict[str, Any], server: str) -> tuple[str, dict[str, str]]:
    """(label, table) of the config's section for ``server``; an empty table if it has none."""
    try:
        endpoint = server_endpoint(server)
    except ValueError:
        return "", {}  # the address itself is refused where it is checked
    for name, table in sections.get("servers", {}).items():
        if server_endpoint(name) == endpoint:
            return f'servers."{name}"', table
    return "", {}
