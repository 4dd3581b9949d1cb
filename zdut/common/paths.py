"""Where zdut keeps state on this machine (the XDG base directory rule)."""

from __future__ import annotations

import os
from pathlib import Path


def state_dir() -> Path:
    """``$XDG_STATE_HOME/zdut``, else ``~/.local/state/zdut``: agent locks, the broker's registry, shell history."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "zdut"
