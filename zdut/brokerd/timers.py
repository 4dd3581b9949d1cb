"""The broker loop's timers: a deadline heap that the one poll loop waits on.

Nothing here runs by itself: ``zdut.broker`` polls for at most ``wait_s()`` and then calls ``run_due()``
with its clock's current reading, so tests drive time with a fake clock and no sleeps.  ``now`` is the
loop's latest reading of that clock (the loop stores it whenever it reads the clock): the one "now" that
the broker's rooms stamp and schedule with.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable


class Timers:
    """One-shot and repeating callbacks on the loop's monotonic clock."""

    def __init__(self, now: float) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()  # ties run in the order they were set
        self.now = now

    def at(self, when: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (when, next(self._seq), fn))

    def after(self, delay_s: float, fn: Callable[[], None]) -> None:
        self.at(self.now + delay_s, fn)

    def every(self, interval_s: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` each ``interval_s``, measured from when the previous run was due to be handled."""

        def tick() -> None:
            fn()
            self.after(interval_s, tick)

        self.after(interval_s, tick)

    def wait_s(self, now: float, cap: float) -> float:
        """How long the loop may poll before the earliest deadline (at most ``cap``)."""
        return min(cap, max(0.0, self._heap[0][0] - now)) if self._heap else cap

    def run_due(self, now: float) -> None:
        self.now = now
        heap = self._heap
        while heap and heap[0][0] <= now:
            heapq.heappop(heap)[2]()


class Coalesced:
    """``fn`` run once, ``delay_s`` after it was first asked for; asking again meanwhile changes nothing."""

    def __init__(self, timers: Timers, delay_s: float, fn: Callable[[], None]) -> None:
        self._timers = timers
        self._delay_s = delay_s
        self._fn = fn
        self._due = False

    def request(self) -> None:
        if not self._due:
            self._due = True
            self._timers.after(self._delay_s, self._run)

    def _run(self) -> None:
        self._due = False
        self._fn()
