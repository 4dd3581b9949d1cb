"""PDU vendor backends: one small file per vendor with ``set_outlet`` and ``get_outlet``.

A backend is any object (normally a module) with

* ``set_outlet(host: PduHost, outlet: int, on: bool) -> None`` - switch one outlet;
* ``get_outlet(host: PduHost, outlet: int) -> bool`` - whether it is on;
* optionally ``toggle_outlet(host: PduHost, outlet: int) -> bool`` - toggle it and return the new state, for
  vendors with a toggle of their own; without it the pdu module reads the state and sets the opposite.

Outlets are 0-based as in the ``outlet`` key; the functions block (the pdu module runs them in a thread) and
raise ModuleError with a message for the user.  Built-in vendors are listed below by import path; third-party
ones register through the entry-point group ``zdut.pdu_backends`` (name = vendor, value = ``package.module``),
or at run time with ``register``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, cast

from zdut.devices.httpget import HTTP_TIMEOUT_S, basic_auth, get, join_url
from zdut.devices.plugins import Registry

ENTRY_POINT_GROUP = "zdut.pdu_backends"
DEFAULT_VENDOR = "intellinet"

_BUILTIN: dict[str, str] = {
    "intellinet": "zdut.devices.pdu_backends.intellinet",
    "gude": "zdut.devices.pdu_backends.gude",
}


@dataclass(frozen=True)
class PduHost:
    """The PDU a backend talks to: base URL (with scheme), optional Basic-auth credentials, a GET helper."""

    url: str
    user: str = ""
    password: str = field(default="", repr=False)
    timeout: float = HTTP_TIMEOUT_S

    @property
    def what(self) -> str:
        """How error messages name this PDU."""
        return f"PDU at {self.url}"

    def get(self, path: str, query: str = "") -> bytes:
        """GET ``url/path?query``: the body of a 200 answer, a ModuleError naming the PDU otherwise."""
        return get(join_url(self.url, path, query), basic_auth(self.user, self.password), self.what, self.timeout)


class Backend(Protocol):
    def set_outlet(self, host: PduHost, outlet: int, on: bool) -> None: ...

    def get_outlet(self, host: PduHost, outlet: int) -> bool: ...


def _backend(obj: object, target: str) -> Backend:
    missing = [name for name in ("set_outlet", "get_outlet") if not callable(getattr(obj, name, None))]
    if missing:
        raise TypeError(f"{target} is not a PDU backend: it lacks {' and '.join(missing)}")
    return cast(Backend, obj)


_BACKENDS: Registry[Backend] = Registry("PDU vendor", ENTRY_POINT_GROUP, _BUILTIN, _backend)


def register(vendor: str, backend: object) -> None:
    """Add a vendor at run time (tests, embedding); ``backend`` is checked like an entry point's."""
    _BACKENDS.register(vendor, _backend(backend, repr(backend)))


def vendors() -> list[str]:
    """Every known vendor name, sorted."""
    return _BACKENDS.names()


def lookup(vendor: str) -> Backend | None:
    """The backend of a vendor, None if no such vendor is known."""
    return _BACKENDS.get(vendor)
