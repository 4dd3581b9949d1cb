"""Logging set-up shared by the agent and the broker: dutctl's text layout or JSON lines."""

from __future__ import annotations

import json
import logging
import sys
import time

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
