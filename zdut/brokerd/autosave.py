"""Keeping the broker's SQLite store in step with its registry, off the hot path, and quiet when idle.

An idle broker does not write: the agents' last-seen times, which change with every heartbeat, are written
with every change of state (a registration, an agent going offline, a lock change, a forget; coalesced for
SAVE_DELAY_S), every FLUSH_S otherwise, and at shutdown.  Every WATCH_S the file itself is checked (a stat,
no write): deleted or replaced under the broker it is created anew with the whole registry; read-only it is
logged.  A failing store never stops the broker: the registry stays in memory and the write is retried.
A lasting failure is logged when it starts, when it changes and once every REPORT_S, not at every retry.
"""

from __future__ import annotations

import logging
import math

from zdut.brokerd.registry import Registry
from zdut.brokerd.store import Store, StoreError
from zdut.brokerd.timers import Coalesced, Timers
from zdut.common.logs import Throttle

#: Coalescing of registry writes; the last-seen flush of an otherwise idle broker; retry after a failure;
#: how often the state file is looked at.
SAVE_DELAY_S = 0.2
FLUSH_S = 300.0
RETRY_S = 5.0
WATCH_S = 10.0
REPORT_S = 60.0

log = logging.getLogger("zdut.broker")


class AutoSave:
    def __init__(self, registry: Registry, store: Store, timers: Timers, throttle: Throttle) -> None:
        self._registry = registry
        self._store = store
        self._timers = timers
        self._throttle = throttle
        self._error = ""  # the failure last logged, while it lasts
        self._error_at = -math.inf
        #: The registry changed: save it soon (changes meanwhile go into the same write).
        self.schedule = Coalesced(timers, SAVE_DELAY_S, self.save).request
        self._retry = Coalesced(timers, RETRY_S, self.save).request
        registry.persist = self.schedule
        timers.every(FLUSH_S, self.save)
        timers.every(WATCH_S, self._watch)
        if registry.dirty or registry.deleted:  # agents evicted while loading
            self.schedule()

    def save(self) -> None:
        """Write what changed, with the last-seen times of every online agent."""
        reg = self._registry
        if not (reg.dirty or reg.deleted or reg.by_rid):
            return
        try:
            self._check()
        except StoreError as exc:
            self._failed(exc)
            return
        records, deleted = reg.take_dirty()
        written = {r.name for r in records}
        last_seen = [(a.name, reg.last_seen(a)) for a in reg.by_rid.values() if a.name not in written]
        try:
            self._store.save(records, deleted, last_seen)
        except StoreError as exc:
            self._failed(exc)
            reg.dirty.update(written)
            reg.deleted.update(deleted)
            return
        if self._error:
            log.warning("%s: the state file is written again", self._store.path)
            self._error = ""

    def _watch(self) -> None:
        """The periodic look at the file: a stat, no write unless it has to be created anew."""
        try:
            if self._check():
                self.schedule()
        except StoreError as exc:
            self._report(exc, "the registry stays in memory")

    def _check(self) -> bool:
        """Whether the state file was created anew (the whole registry is then due); StoreError if it cannot
        be written."""
        if not self._store.check():
            return False
        reg = self._registry
        self._throttle(
            logging.ERROR,
            "store",
            "%s: the state file was deleted or replaced under the broker; created it anew with the %d known agents",
            self._store.path,
            len(reg.agents),
        )
        reg.dirty.update(reg.agents)
        return True

    def _failed(self, exc: StoreError) -> None:
        self._report(exc, "the registry stays in memory; retrying")
        self._retry()

    def _report(self, exc: StoreError, what_now: str) -> None:
        now, text = self._timers.now, str(exc)
        if text != self._error or now - self._error_at >= REPORT_S:
            log.error("%s (%s)", text, what_now)
            self._error, self._error_at = text, now

    def close(self) -> None:
        """Write what is pending, the last-seen times included, and close the store."""
        self.save()
        self._store.close()
