"""A name -> object registry fed three ways: built-ins by import path, entry points, run-time registration.

Built-ins are import paths loaded on first use (so ``--check-config`` and the client never import pyserial and
friends for nothing); third-party packages add names through an entry-point group (value ``package.module`` or
``package.module:attr``) without editing zdut; tests and embedders call ``register``.  The device-module
registry and the PDU vendor registry are both one of these.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Objects of one kind by name; ``check`` turns a loaded object into a T or raises TypeError."""

    def __init__(self, kind: str, group: str, builtin: dict[str, str], check: Callable[[object, str], T]) -> None:
        self.kind, self.group, self.builtin, self._check = kind, group, builtin, check
        self.loaded: dict[str, T] = {}
        self._external: dict[str, str] | None = None

    def _external_targets(self) -> dict[str, str]:
        if self._external is None:
            from importlib.metadata import entry_points  # here: ~18 ms of start-up an agent of built-ins never needs

            self._external = {ep.name: ep.value for ep in entry_points(group=self.group)}
        return self._external

    def register(self, name: str, obj: T) -> None:
        """Add ``name`` at run time; refused if the name is taken."""
        if not name:
            raise ValueError(f"{self.kind} id must not be empty")
        if name in self.loaded or name in self.builtin:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self.loaded[name] = obj

    def names(self) -> list[str]:
        """Every known name, sorted."""
        return sorted(set(self.builtin) | set(self.loaded) | set(self._external_targets()))

    def get(self, name: str) -> T | None:
        """The object for ``name`` (imported on first use), None if no such name exists."""
        obj = self.loaded.get(name)
        if obj is not None:
            return obj
        target = self.builtin.get(name) or self._external_targets().get(name)
        if target is None:
            return None
        mod_name, _, attr = target.partition(":")
        found: object = importlib.import_module(mod_name)
        if attr:
            found = getattr(found, attr)
        obj = self._check(found, target)
        self.loaded[name] = obj
        return obj
