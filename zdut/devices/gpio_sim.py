"""Simulated GPIO lines for tests and demos: levels in memory, every write recorded, no hardware driven."""

from __future__ import annotations

import os
import threading
import time
from typing import NamedTuple

from zdut.devices.base import ModuleError
from zdut.devices.gpio_chardev import DEFAULT_CHIP


class SimEvent(NamedTuple):
    at: float  # time.monotonic()
    chip: str
    pin: int
    level: int


_sim_lock = threading.Lock()
_sim_levels: dict[tuple[str, int], int] = {}
_sim_owned: set[tuple[str, int]] = set()
#: Every level the sim backend drove, in order (tests read it through sim_history).
SIM_EVENTS: list[SimEvent] = []


def sim_level(pin: int, chip: str = DEFAULT_CHIP) -> int | None:
    """The level a sim line was last driven to, None if never."""
    with _sim_lock:
        return _sim_levels.get((chip, pin))


def sim_history(pin: int, chip: str = DEFAULT_CHIP) -> list[tuple[float, int]]:
    """(monotonic time, level) of every write to a sim line."""
    with _sim_lock:
        return [(e.at, e.level) for e in SIM_EVENTS if e.chip == chip and e.pin == pin]


class SimLine:
    """An in-memory line; if ``chip`` is a directory the level is also written to ``<chip>/gpio<pin>``."""

    def __init__(self, chip: str, pin: int, level: int) -> None:
        if pin < 0:
            raise ModuleError(f"GPIO line {pin} does not exist on {chip}")
        with _sim_lock:
            if (chip, pin) in _sim_owned:
                raise ModuleError(f"GPIO line {pin} of {chip} is busy (requested by another module or process)")
            _sim_owned.add((chip, pin))
        self.key = (chip, pin)
        self._file = os.path.join(chip, f"gpio{pin}") if os.path.isdir(chip) else None
        self.set(level)

    def set(self, level: int) -> None:
        with _sim_lock:
            _sim_levels[self.key] = level & 1
            SIM_EVENTS.append(SimEvent(time.monotonic(), *self.key, level & 1))
        if self._file:
            with open(self._file, "w") as fh:
                fh.write(f"{level & 1}\n")

    def get(self) -> int:
        with _sim_lock:
            return _sim_levels[self.key]

    def close(self) -> None:
        with _sim_lock:
            _sim_owned.discard(self.key)
