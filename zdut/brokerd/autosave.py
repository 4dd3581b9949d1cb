"""Keeping the broker's SQLite store in step with its registry, off the hot path.

Registry changes are coalesced for SAVE_DELAY_S and written together; the agents' last-seen times, which
change with every message, are flushed every FLUSH_S only.  A failing store never stops the broker: the
registry stays in memory and the write is retried.
"""

from __future__ import annotations

import logging

from zdut.brokerd.registry import Registry
from zdut.brokerd.store import Store, StoreError
from zdut.brokerd.timers import Coalesced, Timers
from zdut.common.logs import Throttle

#: Coalescing of registry writes, and the coarse last-seen flush.
SAVE_DELAY_S = 0.2
FLUSH_S = 5.0


class AutoSave:
    def __init__(self, registry: Registry, store: Store, timers: Timers, throttle: Throttle) -> None:
        self._registry = registry
        self._store = store
        self._timers = timers
        self._throttle = throttle
        #: The registry changed: save it soon (changes meanwhile go into the same write).
        self.schedule = Coalesced(timers, SAVE_DELAY_S, self.save).request
        timers.every(FLUSH_S, self.flush_last_seen)

    def save(self) -> None:
        reg = self._registry
        records, deleted = reg.take_dirty()
        if not records and not deleted:
            return
        try:
            self._store.save(records, deleted)
        except StoreError as exc:
            self._throttle(logging.ERROR, "store", "%s (the registry stays in memory; retrying)", exc)
            reg.dirty.update(r.name for r in records)
            reg.deleted.update(deleted)
            self._timers.after(FLUSH_S, self.schedule)

    def flush_last_seen(self) -> None:
        reg = self._registry
        if not reg.by_rid:
            return
        try:
            self._store.touch([(a.name, reg.last_seen(a)) for a in reg.by_rid.values()])
        except StoreError as exc:
            self._throttle(logging.ERROR, "store", "%s", exc)

    def close(self) -> None:
        """Write what is pending and close the store."""
        self.save()
        self.flush_last_seen()
        self._store.close()
