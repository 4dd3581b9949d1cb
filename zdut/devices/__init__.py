"""Registry of device modules by id.

Built-in modules are listed here by import path and loaded on first use, so
that the client and ``--check-config`` never import pyserial and friends for
nothing.  Third-party modules register through the entry-point group
``zdut.devices`` (name = module id, value = ``package.module:Class``).
"""

from __future__ import annotations

from zdut.devices.base import Module
from zdut.devices.plugins import Registry

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


def _module_class(obj: object, target: str) -> type[Module]:
    if not (isinstance(obj, type) and issubclass(obj, Module)):
        raise TypeError(f"{target} is not a zdut Module")
    return obj


_MODULES: Registry[type[Module]] = Registry("module", ENTRY_POINT_GROUP, _BUILTIN, _module_class)
_loaded = _MODULES.loaded


def register(module_id: str, cls: type[Module]) -> None:
    """Register a module class at run time (tests, embedding)."""
    _MODULES.register(module_id, cls)


def get(module_id: str) -> type[Module] | None:
    """The module class for an id, or None if no such module exists."""
    return _MODULES.get(module_id)
