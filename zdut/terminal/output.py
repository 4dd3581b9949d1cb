"""Rendering results as dutctl does: text, json, yaml and oneline (csv).

Every result is a ``Content``; error content goes to stderr, the rest to stdout.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

import yaml

from zdut.common.durations import format_minutes
from zdut.protocol import AgentInfo, DeviceInfo, LockState

FORMATS = ("text", "json", "yaml", "oneline", "csv")

GENERAL, DEVICE_LIST, COMMAND_LIST, COMMAND_DETAIL = "general", "device-list", "command-list", "command-detail"
MODULE_OUTPUT, VERSION_T, LOCK_RESULT, FILE_TRANSFER, AGENT_LIST = (
    "module-output", "version", "lock-result", "file-transfer", "agent-list")

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
    return dt.datetime.fromtimestamp(ts if ts is not None else time.time()).astimezone().isoformat(timespec="seconds")


def device_record(d: DeviceInfo, with_agent: bool) -> dict[str, Any]:
    lock = d.lock
    rec: dict[str, Any] = {"Name": d.name, "Locked": lock is not None, "Owner": lock.owner if lock else "",
                           "ExpiresAt": lock.expires_at if lock else 0}
    if with_agent:
        rec["Agent"] = d.agent
        rec["Online"] = d.online
    if d.failed:
        rec["Failed"] = d.failed
    return rec


def lock_record(device: str, lock: LockState) -> dict[str, Any]:
    return {"Name": device, "Locked": True, "Owner": lock.owner, "ExpiresAt": lock.expires_at}


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
            stream.write(json.dumps(self._record(content), indent=2, ensure_ascii=False) + "\n")
        elif self.fmt == "yaml":
            rec = self._record(content)
            if content.type in (DEVICE_LIST, LOCK_RESULT):
                rec["data"] = _lower_keys(rec["data"])
            stream.write("---\n" + yaml.safe_dump(rec, sort_keys=False, allow_unicode=True))
        elif self.fmt == "oneline":
            stream.write(self._oneline(content) + "\n")
        else:
            self._meta_line(content, stream)
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
        stream.buffer.write(data)
        stream.buffer.flush()

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
        md = dict(content.metadata)
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
            return self._paint(_RED, f"✗ {c.data}") + "\n"
        if c.type == DEVICE_LIST:
            return "".join(self._device_line(d) for d in c.data)
        if c.type == COMMAND_LIST:
            return "".join(f"- {name}\n" for name in c.data)
        if c.type == AGENT_LIST:
            return "".join(self._agent_line(a) for a in c.data)
        if c.type == LOCK_RESULT:
            device, lock = c.data
            if lock.expires_at:
                left = format_minutes(lock.expires_at - time.time())
                return self._paint(_GREEN, f'✓ Device "{device}" locked by "{lock.owner}" for {left}') + "\n"
            return self._paint(_GREEN, f'✓ Device "{device}" in use by "{lock.owner}"') + "\n"
        if c.type == FILE_TRANSFER:
            direction, path, size = c.data
            arrow = "↑" if direction == "sent" else "↓"
            return self._paint(_CYAN, f'{arrow} {direction} "{path}" ({human_size(size)})') + "\n"
        if c.type == COMMAND_DETAIL:
            return f"{c.data}\n"
        if c.type == VERSION_T:
            return f"{c.data}\n"
        text = str(c.data)
        return text if text.endswith("\n") or c.type == MODULE_OUTPUT else text + "\n"

    def _device_line(self, entry: tuple[DeviceInfo, bool]) -> str:
        d, with_agent = entry
        line = f"- {d.name}"
        if d.failed:
            line += " " + self._paint(_RED, f"[FAILED: {d.failed}]")
        notes = []
        if d.lock is not None:
            if d.lock.expires_at:
                left = format_minutes(d.lock.expires_at - time.time())
                notes.append(f'[locked by "{d.lock.owner}" for {left}]')
            else:
                notes.append(f'[in use by "{d.lock.owner}"]')
        if with_agent:
            notes.append(f"(agent {d.agent}, {'online' if d.online else 'OFFLINE'})")
        if notes:
            line += " " + self._paint(_GRAY, " ".join(notes))
        return line + "\n"

    def _agent_line(self, a: AgentInfo) -> str:
        state = self._paint(_GREEN, "online") if a.online else self._paint(_RED, "offline")
        ago = max(0, int(time.time() - a.last_seen))
        devices = ", ".join(
            self._paint(_RED, f"{d} (FAILED: {a.failed[d]})") if d in a.failed else d for d in a.devices
        ) or "no devices"
        return f"- {a.name} {state} (last seen {ago}s ago, version {a.version or '?'}): {devices}\n"

    # ------------------------------------------------------------- structured
    def _data(self, c: Content) -> Any:
        if c.type == DEVICE_LIST:
            return [device_record(d, with_agent) for d, with_agent in c.data]
        if c.type == LOCK_RESULT:
            return lock_record(*c.data)
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
        elif c.type == LOCK_RESULT:
            device, lock = c.data
            data = f"{device}=locked:{lock.owner}" if lock.expires_at else f"{device}=in-use:{lock.owner}"
        elif c.type == FILE_TRANSFER:
            data = f"{data['direction']} {data['bytes']} {data['path']}"
        elif c.type == AGENT_LIST:
            data = "|".join(_agent_token(a) for a in c.data)
        elif isinstance(data, list):
            data = "|".join(str(x) for x in data)
        fields.append(str(data))
        return ",".join(_csv_field(f) for f in fields)


def _device_token(d: DeviceInfo) -> str:
    states = [f"{'locked' if d.lock.expires_at else 'in-use'}:{d.lock.owner}"] if d.lock is not None else []
    if d.failed:
        states.append(f"failed:{_token_text(d.failed)}")
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
