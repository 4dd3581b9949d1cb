"""Logging shared by the agent and the broker: dutctl's text layout or JSON lines, and rate limiting."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "warning": logging.WARNING,
          "error": logging.ERROR}


class _TextFormatter(logging.Formatter):
    """``2006/01/02 15:04:05 LEVEL [scope] msg`` as dutagent prints it."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y/%m/%d %H:%M:%S", time.localtime(record.created))
        scope = record.name.removeprefix("zdut.")
        level = {"WARNING": "WARN"}.get(record.levelname, record.levelname)
        text = f"{stamp} {level:<5} [{scope}] {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": record.created, "level": record.levelname, "scope": record.name.removeprefix("zdut."),
               "msg": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup(level: str = "info", as_json: bool = False) -> None:
    """Configure the root zdut logger on stderr; an unknown level means info (as dutagent)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if as_json else _TextFormatter())
    root = logging.getLogger("zdut")
    root.handlers[:] = [handler]
    root.setLevel(LEVELS.get(level.lower(), logging.INFO))
    root.propagate = False


def hex_id(rid: bytes) -> str:
    """A ZeroMQ routing id as logs show it."""
    return rid.hex() or "-"


class Throttle:
    """Rate-limited logging per category: a flood of garbage must not become a flood of log lines."""

    def __init__(
        self, logger: logging.Logger, burst: int = 5, per_s: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._log = logger
        self._burst = burst
        self._per_s = per_s
        self._clock = clock
        self._state: dict[str, list[float]] = {}  # key -> [window start, logged, suppressed]

    def __call__(self, level: int, key: str, fmt: str, *args: Any, exc_info: bool = False) -> None:
        now = self._clock()
        st = self._state.get(key)
        if st is None or now - st[0] >= self._per_s:
            if st is not None and st[2]:
                self._log.log(level, "(%d similar messages suppressed: %s)", st[2], key)
            if len(self._state) > 1000:
                self._state.clear()  # keys from peer-chosen names must not grow without bound
            st = self._state[key] = [now, 0, 0]
        if st[1] < self._burst:
            st[1] += 1
            self._log.log(level, fmt, *args, exc_info=exc_info)
        else:
            st[2] += 1

    def flush(self) -> None:
        """Report suppressed counts of windows that have ended (nothing else may come to trigger them)."""
        now = self._clock()
        for key, st in list(self._state.items()):
            if now - st[0] >= self._per_s:
                if st[2]:
                    self._log.warning("(%d similar messages suppressed: %s)", st[2], key)
                del self._state[key]
