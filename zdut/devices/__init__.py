"""Registry of device modules by id.

Built-in modules are listed here by import path and loaded on first use, so
that the client and ``--check-config`` never import pyserial and friends for
nothing.  Third-party modules register through the entry-point group
``zdut.devices`` (name = module id, value = ``package.module:Class``).
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from zdut.devices.base import Module

ENTRY_POINT_GROUP = "zdut.devices"

_BUILTIN: dict[str, str] = {
    "dummy-status": "zdut.devices.dummy:DummyStatus",
    "dummy-repeat": "zdut.devices.dummy:DummyRepeat",
    "dummy-ft": "zdut.devices.dummy:DummyFT",
    "agent-status": "zdut.devices.agent:AgentStatus",
    "time-wait": "zdut.devices.agent:TimeWait",
    "shell": "zdut.devices.shell:Shell",
    "serial": "zdut.devices.serial:Serial",
    "ssh": "zdut.devices.ssh:SSH",
    "gpio-button": "zdut.devices.gpio:GpioButton",
    "gpio-switch": "zdut.devices.gpio:GpioSwitch",
    "file": "zdut.devices.file:File",
    "flash": "zdut.devices.flash:Flash",
    "flash-emulate": "zdut.devices.flash:FlashEmulate",
    "pdu": "zdut.devices.power:PDU",
    "wifisocket": "zdut.devices.power:WifiSocket",
    "ipmi": "zdut.devices.ipmi:IPMI",
}

_loaded: dict[str, type[Module]] = {}
_external: dict[str, str] | None = None


def _load(target: str) -> type[Module]:
    mod_name, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(mod_name), attr)
    if not (isinstance(cls, type) and issubclass(cls, Module)):
        raise TypeError(f"{target} is not a zdut Module")
    return cls


def _external_targets() -> dict[str, str]:
    global _external
    if _external is None:
        _external = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return _external


def register(module_id: str, cls: type[Module]) -> None:
    """Register a module class at run time (tests, embedding)."""
    if not module_id:
        raise ValueError("module id must not be empty")
    if module_id in _loaded or module_id in _BUILTIN:
        raise ValueError(f"module {module_id!r} is already registered")
    _loaded[module_id] = cls


def ids() -> list[str]:
    """Every known module id, sorted."""
    return sorted(set(_BUILTIN) | set(_loaded) | set(_external_targets()))


def get(module_id: str) -> type[Module] | None:
    """The module class for an id, or None if no such module exists."""
    cls = _loaded.get(module_id)
    if cls is not None:
        return cls
    target = _BUILTIN.get(module_id) or _external_targets().get(module_id)
    if target is None:
        return None
    cls = _load(target)
    _loaded[module_id] = cls
    return cls
