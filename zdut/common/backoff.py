"""Reconnect pacing: exponential backoff between a floor and a ceiling, reset after a good spell."""

from __future__ import annotations


class Backoff:
    """Delays of ``floor``, 2x, 4x ... up to ``ceiling`` seconds; ``reset`` starts over at the floor."""

    def __init__(self, floor: float, ceiling: float) -> None:
        self.floor, self.ceiling = floor, ceiling
        self._next = floor

    def next_delay(self) -> float:
        """The delay to wait now; the one after it doubles."""
        delay = self._next
        self._next = min(delay * 2, self.ceiling)
        return delay

    def reset(self) -> None:
        self._next = self.floor
