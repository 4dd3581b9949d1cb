"""Device locks, owned by the agent (the single lock authority for its devices).

Two holds per device, as dutctl: a *reservation* (explicit ``lock``, with an
expiry) and a *busy* hold (taken for the length of each Run).  Unlike dutctl,
reservations survive an agent restart (a small JSON state file, rewritten
atomically on change) and the busy hold counts runs, so a user's second
concurrent run does not lose its hold when the first one ends.

A reservation changes only once the state file holds it: a write that fails
leaves memory, file and brokers as they were and answers the request with the
error.  A busy hold lasts exactly as long as its runs: ``unlock force`` ends the
reservation and says whose hold it broke, so that the agent cancels that owner's
runs, whose own close steps then release the busy hold.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from zdut.common.answers import no_such_device
from zdut.common.durations import format_left
from zdut.protocol import Code, LockState, ZdutError

log = logging.getLogger("zdut.agentd.locker")

DEFAULT_LOCK_S = 30 * 60


@dataclass
class _Hold:
    owner: str
    locked_at: int
    expires_at: int  # 0 for busy holds
    runs: int = 0  # busy holds: number of runs holding it


class Locker:
    def __init__(
        self,
        devices: set[str],
        state_path: Path | None = None,
        on_change: Callable[[str, LockState | None, LockState | None], None] | None = None,
        clock: Callable[[], float] = time.time,
        on_busy: Callable[[str, bool], None] | None = None,
    ) -> None:
        """``on_change`` hears of every change of a device's state; ``on_busy``, if given, hears instead of
        busy holds taken (True) and ended (False), which are shorter-lived than reservations."""
        self._devices = devices
        self._path = state_path
        self._on_change = on_change
        self._on_busy = on_busy
        self._clock = clock
        self._reserved: dict[str, _Hold] = {}
        self._busy: dict[str, _Hold] = {}
        if state_path is not None:
            self._load()

    # ------------------------------------------------------------- queries
    def state(self, device: str) -> LockState | None:
        """The effective hold as listed: a reservation shadows a busy hold."""
        hold = self._reservation(device) or self._busy.get(device)
        return LockState(hold.owner, hold.locked_at, hold.expires_at) if hold else None

    def shadowed(self, device: str) -> LockState | None:
        """A busy hold under a reservation: what brokers list once that reservation expires."""
        busy = self._busy.get(device)
        if busy is None or self._reservation(device) is None:
            return None
        return LockState(busy.owner, busy.locked_at, busy.expires_at)

    def states(self) -> dict[str, LockState]:
        return {d: s for d in sorted(self._devices) if (s := self.state(d)) is not None}

    def shadowed_states(self) -> dict[str, LockState]:
        return {d: s for d in sorted(self._devices) if (s := self.shadowed(d)) is not None}

    def check_access(self, device: str, user: str) -> None:
        """Raise FailedPrecondition if another owner holds the device."""
        reserved = self._reservation(device)
        if reserved and reserved.owner != user:
            left = format_left(reserved.expires_at - self._clock())
            raise ZdutError(Code.FAILED_PRECONDITION, f'device "{device}" is locked by "{reserved.owner}" for {left}')
        busy = self._busy.get(device)
        if busy and busy.owner != user:
            raise ZdutError(Code.FAILED_PRECONDITION, f'device "{device}" is locked by "{busy.owner}" (in use: '
                                                      f'`zdut {device} watch` follows its output)')

    # ------------------------------------------------------------- busy holds (Run)
    def acquire_busy(self, device: str, user: str) -> None:
        self.check_access(device, user)
        hold = self._busy.get(device)
        if hold is None:
            hold = self._busy[device] = _Hold(user, int(self._clock()), 0)
            self._busy_changed(device, True)
        hold.runs += 1

    def release_busy(self, device: str, user: str) -> None:
        hold = self._busy.get(device)
        if hold is None or hold.owner != user:
            return  # not this run's hold (defensive: runs release only what they acquired)
        hold.runs -= 1
        if hold.runs <= 0:
            del self._busy[device]
            self._busy_changed(device, False)

    # ------------------------------------------------------------- reservations
    def lock(self, device: str, user: str, duration_s: int) -> LockState:
        if not user:
            raise ZdutError(Code.UNAUTHENTICATED, "operation requires an identified caller; set the user with -u")
        if device not in self._devices:
            raise no_such_device(device)
        if duration_s < 0:
            raise ZdutError(Code.INVALID_ARGUMENT, "lock duration must be positive")
        self.check_access(device, user)
        now = int(self._clock())
        expires = now + (duration_s or DEFAULT_LOCK_S)
        current = self._reservation(device)
        if current is not None:  # same owner: extend, never shrink
            hold = _Hold(user, current.locked_at, max(current.expires_at, expires))
        else:
            hold = _Hold(user, now, expires)
        self._commit(device, hold)
        return LockState(hold.owner, hold.locked_at, hold.expires_at)

    def unlock(self, device: str, user: str, force: bool) -> str:
        """End ``user``'s reservation; with ``force``, anyone's.  Returns the other owner whose hold a forced
        unlock broke ("" if none): the caller cancels that owner's runs on the device, and their close steps
        release the busy hold."""
        if device not in self._devices:
            raise no_such_device(device)
        if force:
            reserved = self._reservation(device)
            previous = reserved or self._busy.get(device)
            if previous is None:
                return ""
            if reserved is not None:
                self._commit(device, None)
            log.warning("device %s force-unlocked by %s (was held by %s)", device, user, previous.owner)
            return previous.owner if previous.owner != user else ""
        if not user:
            raise ZdutError(Code.UNAUTHENTICATED, "operation requires an identified caller; set the user with -u")
        current = self._reservation(device)
        if current is None:
            raise ZdutError(Code.FAILED_PRECONDITION, f'device "{device}" is not locked')
        if current.owner != user:
            raise ZdutError(
                Code.PERMISSION_DENIED,
                f'device "{device}" is locked by "{current.owner}"; use "unlock force" to break it',
            )
        self._commit(device, None)
        return ""

    # ------------------------------------------------------------- internals
    def _commit(self, device: str, hold: _Hold | None) -> None:
        """Write the reservations with ``device`` set to ``hold`` (None: removed), then apply and announce
        them; a failed write raises and changes nothing."""
        reserved = dict(self._reserved)
        if hold is None:
            reserved.pop(device, None)
        else:
            reserved[device] = hold
        self._save(reserved)
        self._reserved = reserved
        self._changed(device)

    def _reservation(self, device: str) -> _Hold | None:
        hold = self._reserved.get(device)
        if hold is not None and hold.expires_at <= self._clock():
            log.info("reservation expired device=%s owner=%s", device, hold.owner)
            del self._reserved[device]
            try:  # an expired entry left in the file is harmless: loading skips it
                self._save(self._reserved)
            except ZdutError as exc:
                log.warning("%s", exc.message)
            self._changed(device)
            return self._reserved.get(device)  # the change may have handed it to the next in a lock queue
        return hold

    def _busy_changed(self, device: str, taken: bool) -> None:
        if self._on_busy is not None:
            self._on_busy(device, taken)
        else:
            self._changed(device)

    def _changed(self, device: str) -> None:
        if self._on_change is not None:
            self._on_change(device, self.state(device), self.shadowed(device))

    def _load(self) -> None:
        assert self._path is not None
        try:
            raw = json.loads(self._path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            raise ZdutError(Code.INTERNAL, f"lock state file {self._path}: {exc}") from None
        for device, h in raw.get("reserved", {}).items():
            if device in self._devices and h["expires_at"] > self._clock():
                self._reserved[device] = _Hold(h["owner"], h["locked_at"], h["expires_at"])

    def _save(self, reserved: dict[str, _Hold]) -> None:
        """Replace the state file atomically (written, synced, renamed); ZdutError if that fails."""
        if self._path is None:
            return
        data = {"reserved": {d: {"owner": h.owner, "locked_at": h.locked_at, "expires_at": h.expires_at}
                             for d, h in reserved.items()}}
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self._path.parent, prefix=".locks-")
            try:
                with os.fdopen(fd, "w") as fh:
                    json.dump(data, fh)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, self._path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            log.error("cannot write the lock state file %s: %s", self._path, exc)
            raise ZdutError(
                Code.INTERNAL,
                f"cannot write the lock state file {self._path}: {exc.strerror or exc}; the lock is unchanged",
            ) from None
