"""Rendering results as dutctl does: text, json, yaml and oneline (csv).

Every result is a ``Content``; error content goes to stderr, the rest to stdout.  Every string another process
sent (names, owners, descs, help and error texts, versions, reasons) reaches the terminal with its control
characters escaped: in text through ``safe_text.safe``, in the other formats by their own escapes
(docs/differences.md 29).  Module output alone is written as it came: it is a console's.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

from zdut.common.durations import format_left
from zdut.protocol import AgentInfo, DeviceInfo, LockState
from zdut.terminal.safe_text import FORMAT_CONTROLS, is_unsafe, safe, safe_lines

FORMATS = ("text", "json", "yaml", "oneline", "csv")

GENERAL, DEVICE_LIST, COMMAND_LIST, COMMAND_DETAIL = "general", "device-list", "command-list", "command-detail"
MODULE_OUTPUT, VERSION_T, LOCK_RESULT, FILE_TRANSFER, AGENT_LIST = (
    "module-output", "version", "lock-result", "file-transfer", "agent-list")

_C_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_RESET, _RED, _GREEN, _YELLOW, _CYAN, _GRAY = "\x1b[0m", "\x1b[31m", "\x1b[32m", "\x1b[33m", "\x1b[36m", "\x1b[90m"


@dataclass
class Content:
    type: str
    data: Any
    is_error: bool = False
    metadata: dict[str, str] = field(default_factory=dict)


def human_size(n: int) -> str:
    """Binary units as dutctl: ``512 B``, ``4.0 KiB``, ``1.2 MiB``."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def rfc3339(ts: float | None = None) -> str:
    """Local time as Go's ``time.RFC3339`` writes it: whole seconds, ``Z`` for UTC, else ``+hh:mm``."""
    when = dt.datetime.fromtimestamp(ts if ts is not None else time.time()).astimezone()
    text = when.isoformat(timespec="seconds")
    return text[:-6] + "Z" if when.utcoffset() == dt.timedelta(0) else text


def device_record(d: DeviceInfo, with_agent: bool) -> dict[str, Any]:
    lock = d.lock
    rec: dict[str, Any] = {"Name": d.name, "Locked": lock is not None, "Owner": lock.owner if lock else "",
                           "ExpiresAt": lock.expires_at if lock else 0}
    if with_agent:
        rec["Agent"] = d.agent
        rec["Online"] = d.online
    if d.failed:
        rec["Failed"] = d.failed
    if d.watchers:  # zdut's own: absent when nobody watches, so dutctl's records stay as they were
        rec["Watchers"] = d.watchers
    if d.waiting:  # likewise: its lock queue, first in line first
        rec["Waiting"] = list(d.waiting)
    return rec


@dataclass(frozen=True)
class Unlocked:
    """A lock-result after an unlock: the device is free; ``broke`` names whose lock ``force`` broke."""

    device: str
    broke: str = ""
    cancelled: int = 0


def lock_record(device: str, lock: LockState | None, unlocked: Unlocked | None = None,
                kept: bool = False) -> dict[str, Any]:
    """The device's lock after a lock or unlock, with the keys of a device-list record; ``Kept`` when a lock
    asked for less than what remained of the caller's own (the agent keeps the longer one)."""
    rec: dict[str, Any] = {"Name": device, "Locked": lock is not None, "Owner": lock.owner if lock else "",
                           "ExpiresAt": lock.expires_at if lock else 0}
    if kept:
        rec["Kept"] = True
    if unlocked is not None and unlocked.broke:
        rec["Broke"] = unlocked.broke
        rec["Cancelled"] = unlocked.cancelled
    return rec


def agent_record(a: AgentInfo) -> dict[str, Any]:
    rec = {"Name": a.name, "Devices": list(a.devices), "Online": a.online, "LastSeen": int(a.last_seen),
           "Version": a.version, "Address": a.address}
    if a.failed:
        rec["Failed"] = dict(a.failed)
    return rec


class Output:
    def __init__(self, fmt: str = "text", verbose: bool = False, color: bool | None = None,
                 stdout: TextIO | None = None, stderr: TextIO | None = None) -> None:
        self.fmt = "oneline" if fmt == "csv" else fmt
        self.verbose = verbose
        self.out = stdout or sys.stdout
        self.err = stderr or sys.stderr
        self.color = self.out.isatty() if color is None else color
        self._last_meta: tuple[Any, ...] | None = None

    # ------------------------------------------------------------- entry points
    def emit(self, content: Content) -> None:
        stream = self.err if content.is_error else self.out
        if self.fmt == "json":
            stream.write(to_json(self._record(content)) + "\n")
        elif self.fmt == "yaml":
            rec = self._record(content)
            if content.type in (DEVICE_LIST, LOCK_RESULT, AGENT_LIST):
                rec["data"] = _lower_keys(rec["data"])
            stream.write("---\n" + to_yaml(rec) + "\n")
        elif self.fmt == "oneline":
            stream.write(self._oneline(content) + "\n")
        else:
            self._meta_line(content, stream)
            if content.type == MODULE_OUTPUT and isinstance(content.data, bytes):
                self.raw(content.data, stream is self.err)  # as without -v: the bytes as they came
                return
            stream.write(self._text(content))
        stream.flush()

    def fileno(self, to_stderr: bool = False) -> int | None:
        try:
            return (self.err if to_stderr else self.out).fileno()
        except (AttributeError, OSError, ValueError):
            return None

    def raw(self, data: bytes, to_stderr: bool = False) -> None:
        """Module output in text mode: written as is."""
        stream = self.err if to_stderr else self.out
        stream.flush()
        buffer = getattr(stream, "buffer", None)
        if buffer is None:  # a text-only stream (a test's StringIO)
            stream.write(data.decode(errors="replace"))
            stream.flush()
            return
        buffer.write(data)
        buffer.flush()

    # ------------------------------------------------------------- text
    def _paint(self, code: str, text: str) -> str:
        return f"{code}{text}{_RESET}" if self.color else text

    def _meta_line(self, content: Content, stream: TextIO) -> None:
        if not self.verbose or not content.metadata:
            return
        key = (stream, tuple(sorted(content.metadata.items())))
        if key == self._last_meta:
            return
        self._last_meta = key
        md = {safe(k): safe(v) for k, v in content.metadata.items()}
        line = f"# connected to {md.pop('server', '?')} ({md.pop('msg', '')})"
        if "device" in md:
            line += f' device "{md.pop("device")}"'
        if "command" in md:
            line += f" executing '{' '.join([md.pop('command'), *md.pop('args', '').split()])}'"
        for k in sorted(md):
            line += f"\n# {k}: {md[k]}"
        stream.write(self._paint(_GRAY, line) + "\n")

    def _text(self, c: Content) -> str:
        if c.is_error:
            return self._paint(_RED, f"✗ {safe_lines(str(c.data))}") + "\n"
        if c.type == DEVICE_LIST:
            return "".join(self._device_line(d) for d in c.data)
        if c.type == COMMAND_LIST:
            return _command_lines(c.data)
        if c.type == AGENT_LIST:
            return "".join(self._agent_line(a) for a in c.data)
        if c.type == LOCK_RESULT and isinstance(c.data, Unlocked):
            return self._paint(_GREEN, _unlocked_text(c.data)) + "\n"
        if c.type == LOCK_RESULT:
            device, lock, kept = _locked(c.data)
            device, owner = safe(device), safe(lock.owner)
            if lock.expires_at:
                left = format_left(lock.expires_at - time.time())
                text = f'✓ Device "{device}" locked by "{owner}" for {left}'
                if kept:
                    text += " (kept: your lock already lasted longer; a lock is never shortened)"
                return self._paint(_GREEN, text) + "\n"
            return self._paint(_GREEN, f'✓ Device "{device}" in use by "{owner}"') + "\n"
        if c.type == FILE_TRANSFER:
            direction, path, size = c.data
            arrow = "↑" if direction == "sent" else "↓"
            return self._paint(_CYAN, f'{arrow} {direction} "{safe(path)}" ({human_size(size)})') + "\n"
        if c.type == COMMAND_DETAIL:
            return f"{safe_lines(c.data)}\n"
        if c.type == VERSION_T:
            return f"{c.data}\n"
        text = str(c.data)
        return text if text.endswith("\n") or c.type == MODULE_OUTPUT else text + "\n"

    def _device_line(self, entry: tuple[DeviceInfo, bool]) -> str:
        d, with_agent = entry
        line = f"- {safe(d.name)}"
        if d.failed:
            line += " " + self._paint(_RED, f"[FAILED: {safe(d.failed)}]")
        notes = []
        if d.lock is not None:
            if d.lock.expires_at:
                left = format_left(d.lock.expires_at - time.time())
                notes.append(f'[locked by "{safe(d.lock.owner)}" for {left}]')
            else:
                notes.append(f'[in use by "{safe(d.lock.owner)}"]')
        if d.watchers:
            notes.append(f"({d.watchers} watching)")
        if d.waiting:
            notes.append(f"(waiting: {', '.join(safe(user) for user in d.waiting)})")
        if with_agent:
            notes.append(f"(agent {safe(d.agent)}, {'online' if d.online else 'OFFLINE'})")
        if notes:
            line += " " + self._paint(_GRAY, " ".join(notes))
        return line + "\n"

    def _agent_line(self, a: AgentInfo) -> str:
        state = self._paint(_GREEN, "online") if a.online else self._paint(_RED, "offline")
        ago = max(0, int(time.time() - a.last_seen))
        devices = ", ".join(
            self._paint(_RED, f"{safe(d)} (FAILED: {safe(a.failed[d])})") if d in a.failed else safe(d)
            for d in a.devices
        ) or "no devices"
        return f"- {safe(a.name)} {state} (last seen {ago}s ago, version {safe(a.version) or '?'}): {devices}\n"

    # ------------------------------------------------------------- structured
    def _data(self, c: Content) -> Any:
        if c.type == COMMAND_LIST:  # dutctl's list of names; the descs are for people (docs/differences.md 28)
            return [entry if isinstance(entry, str) else entry[0] for entry in c.data]
        if c.type == DEVICE_LIST:
            return [device_record(d, with_agent) for d, with_agent in c.data]
        if c.type == LOCK_RESULT and isinstance(c.data, Unlocked):
            return lock_record(c.data.device, None, c.data)
        if c.type == LOCK_RESULT:
            device, lock, kept = _locked(c.data)
            return lock_record(device, lock, kept=kept)
        if c.type == FILE_TRANSFER:
            direction, path, size = c.data
            return {"direction": direction, "path": path, "bytes": size}
        if c.type == AGENT_LIST:
            return [agent_record(a) for a in c.data]
        if c.type == MODULE_OUTPUT and isinstance(c.data, bytes):
            return c.data.decode(errors="replace")
        return c.data

    def _record(self, c: Content) -> dict[str, Any]:
        rec: dict[str, Any] = {"contentType": c.type, "data": self._data(c)}
        if c.is_error:
            rec["error"] = True
        if self.verbose and c.metadata:
            rec["metadata"] = dict(sorted(c.metadata.items()))
        rec["timestamp"] = rfc3339()
        return rec

    def _oneline(self, c: Content) -> str:
        fields = [rfc3339(), c.type, "ERROR" if c.is_error else "INFO"]
        if self.verbose:
            fields += [f"{k}={v}" for k, v in sorted(c.metadata.items())]
        data = self._data(c)
        if c.type == DEVICE_LIST:
            data = "|".join(_device_token(d) for d, _ in c.data)
        elif c.type == LOCK_RESULT and isinstance(c.data, Unlocked):
            data = f"{c.data.device}=unlocked" + (f";broke:{c.data.broke}" if c.data.broke else "")
        elif c.type == LOCK_RESULT:
            device, lock, _ = _locked(c.data)
            data = f"{device}=locked:{lock.owner}" if lock.expires_at else f"{device}=in-use:{lock.owner}"
        elif c.type == FILE_TRANSFER:
            data = f"{data['direction']} {data['bytes']} {data['path']}"
        elif c.type == AGENT_LIST:
            data = "|".join(_agent_token(a) for a in c.data)
        elif isinstance(data, list):
            data = "|".join(str(x) for x in data)
        fields.append(str(data))
        return ",".join(_csv_field(_one_line(f)) for f in fields)


def _command_lines(commands: list[str] | list[tuple[str, str]]) -> str:
    """``- name`` a line, as dutctl prints them; each desc the config gives follows its name, aligned."""
    named = [(safe(entry), "") if isinstance(entry, str) else (safe(entry[0]), safe(entry[1])) for entry in commands]
    width = max((len(name) for name, desc in named if desc), default=0)
    return "".join(f"- {name.ljust(width)}  {desc}\n" if desc else f"- {name}\n" for name, desc in named)


def _locked(data: tuple[Any, ...]) -> tuple[str, LockState, bool]:
    """A lock-result's (device, lock, kept); ``kept`` is optional in the tuple."""
    return data[0], data[1], bool(data[2]) if len(data) > 2 else False


def _unlocked_text(u: Unlocked) -> str:
    text = f'✓ Device "{safe(u.device)}" unlocked'
    if u.broke:
        text += f': broke the lock of "{safe(u.broke)}"'
        if u.cancelled:
            text += f", cancelled {u.cancelled} running session{'s' if u.cancelled != 1 else ''}"
    return text


def _one_line(text: str) -> str:
    """A oneline field never breaks its line: backslash, line breaks, tabs and other controls (bidi ones too)
    escaped as in C (``\\n``, ``\\x1b``, ``\\u202e``), so one record stays one line whatever the data holds."""
    return "".join(_C_ESCAPES.get(c) or (_yaml_code(c) if is_unsafe(c) else c) for c in text)


def _device_token(d: DeviceInfo) -> str:
    states = [f"{'locked' if d.lock.expires_at else 'in-use'}:{d.lock.owner}"] if d.lock is not None else []
    if d.failed:
        states.append(f"failed:{_token_text(d.failed)}")
    if d.watchers:
        states.append(f"watched:{d.watchers}")
    if d.waiting:
        states.append(f"waiting:{','.join(_token_text(user) for user in d.waiting)}")
    return f"{d.name}={';'.join(states)}" if states else d.name


def _agent_token(a: AgentInfo) -> str:
    token = f"{a.name}={'online' if a.online else 'offline'}"
    return token + f";failed:{'+'.join(sorted(a.failed))}" if a.failed else token


def _token_text(text: str) -> str:
    """Free text inside a ``|``-joined oneline list: no separator, one line."""
    return " ".join(text.replace("|", "/").split())


def _csv_field(text: str) -> str:
    if "," in text or " " in text or '"' in text or "\n" in text:
        return '"' + text.replace('"', '""') + '"'
    return text


def _lower_keys(data: Any) -> Any:
    if isinstance(data, list):
        return [_lower_keys(x) for x in data]
    if isinstance(data, dict):
        return {k.lower(): v for k, v in data.items()}
    return data


# ------------------------------------------------------------------ JSON as Go's encoding/json writes it
# dutctl uses json.MarshalIndent: 2-space indent, UTF-8 as is, but <, > and & (HTML) and the JavaScript line
# separators escaped. These characters only ever occur inside strings, so replacing them is safe.  Beyond
# Go, DEL, the C1 controls and the bidi controls are escaped too, so that no JSON reaches a terminal with them
# raw (C0 controls are escaped by every JSON encoder).

_GO_JSON_ESCAPES = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026",
                                  **{c: f"\\u{ord(c):04x}" for c in [*map(chr, range(0x7F, 0xA0)), *FORMAT_CONTROLS]}})


def to_json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False).translate(_GO_JSON_ESCAPES)


# ------------------------------------------------------------------ YAML as Go's yaml.v3 writes it
# dutctl marshals with yaml.v3: 4-space indent, a sequence indented under its key, plain scalars where they
# read back as the same string, else double quotes; several lines as a literal block. PyYAML only decides
# whether a string may stay plain (it quotes what YAML 1.1 would read as a bool, number, date or null).

_YAML_INDENT = 4
_DQ_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r", "\0": "\\0", "\x1b": "\\e"}


def to_yaml(value: Any) -> str:
    """One YAML document body (ending in a newline) for JSON-like data."""
    if isinstance(value, (dict, list)) and value:
        return "".join(_yaml_block(value, 0))
    return "".join(_yaml_entry("", value, 0)).lstrip(" ")


def _yaml_block(value: dict[Any, Any] | list[Any], indent: int) -> Iterator[str]:
    pad = " " * indent
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _yaml_entry(f"{pad}{_yaml_scalar(str(key))}:", item, indent)
        return
    for item in value:
        if isinstance(item, (dict, list)) and item:
            first, *rest = _yaml_block(item, indent + 2)  # "- " then the item's first line, the rest aligned
            yield f"{pad}- {first[indent + 2:]}"
            yield from rest
        else:
            yield from _yaml_entry(f"{pad}-", item, indent)


def _yaml_entry(head: str, value: Any, indent: int) -> Iterator[str]:
    if isinstance(value, (dict, list)) and value:
        yield head + "\n"
        yield from _yaml_block(value, indent + _YAML_INDENT)
    elif isinstance(value, str) and _yaml_literal_ok(value):
        body = value[:-1] if value.endswith("\n") else value
        chomp = "" if value.endswith("\n") and not value.endswith("\n\n") else ("+" if value.endswith("\n") else "-")
        yield f"{head} |{chomp}\n"
        pad = " " * (indent + _YAML_INDENT)
        yield from (f"{pad}{line}\n" if line else "\n" for line in body.split("\n"))
    else:
        yield f"{head} {_yaml_scalar(value)}\n"


def _yaml_scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "{}"
    if isinstance(value, list):
        return "[]"
    import yaml  # here, not at the top: only -f yaml needs it, and it costs every CLI start-up ~12 ms

    text = str(value)
    if text and all(_yaml_printable(c) for c in text) and not yaml.safe_dump(
            text, allow_unicode=True, width=1 << 30).startswith(("'", '"', "|", ">")):
        return text
    return '"' + "".join(_DQ_ESCAPES.get(c) or (c if _yaml_printable(c) else _yaml_code(c)) for c in text) + '"'


def _yaml_literal_ok(text: str) -> bool:
    """A literal block keeps every byte without escapes: printable lines, none ending in a space, no
    leading space (that would need an indentation indicator)."""
    lines = text.split("\n")
    return len(lines) > 1 and not text.startswith((" ", "\n")) and all(
        not line.endswith(" ") and all(_yaml_printable(c) for c in line) for line in lines)


def _yaml_printable(c: str) -> bool:
    """libyaml's IS_PRINTABLE, less every line break (NEL, U+2028, U+2029 too) and the bidi controls (which
    yaml.v3 would write raw; docs/differences.md 29): what may appear unescaped."""
    o = ord(c)
    return c not in FORMAT_CONTROLS and (
        0x20 <= o <= 0x7E or 0xA0 <= o <= 0x2027 or 0x202A <= o <= 0xD7FF or (0xE000 <= o <= 0xFFFD and o != 0xFEFF)
        or 0x10000 <= o <= 0x10FFFF)


def _yaml_code(c: str) -> str:
    o = ord(c)
    return f"\\x{o:02x}" if o <= 0xFF else (f"\\u{o:04x}" if o <= 0xFFFF else f"\\U{o:08x}")
