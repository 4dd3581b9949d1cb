"""The device authority of ``zdut-agent``: handlers for every request, runs, locks, module lifecycle.

Transport-independent: the direct ROUTER and every broker uplink deliver messages
as ``(link, client-id, header, payload)``, so one set of handlers serves both.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zdut.agentd.config import AgentConfig, Command
from zdut.agentd.locker import Locker
from zdut.agentd.run import AgentRun
from zdut.common.answers import listing, no_such_command, no_such_device
from zdut.protocol import (
    SESSION,
    UNARY_REQUESTS,
    VERSION,
    AgentInfo,
    Code,
    CommandInfo,
    DeviceEntry,
    DeviceInfo,
    Error,
    Lock,
    LockChanged,
    LockResult,
    LockState,
    Message,
    RunOpen,
    Unlock,
    Unlocked,
    ZdutError,
    check_version,
    encode,
)
from zdut.transport.links import Link

if TYPE_CHECKING:
    from zdut.agentd.uplink import Uplink

log = logging.getLogger("zdut.agent")

INIT_TIMEOUT_S = 300.0
DEINIT_TIMEOUT_S = 15.0


def anonymous() -> str:
    return f"unknown-{secrets.token_hex(4)}"


class Agent:
    """The device authority; transport-independent."""

    def __init__(self, config: AgentConfig, name: str, address: str = "", state_path: Path | None = None) -> None:
        self.config = config
        self.name = name
        self.address = address
        self.started = time.time()
        self.uplinks: list[Uplink] = []  # each told about lock changes
        self.locker = Locker(set(config.devices), state_path, on_change=self._lock_changed)
        self.runs: dict[tuple[int, bytes, int], AgentRun] = {}

    # ------------------------------------------------------------- module lifecycle
    def _steps(self) -> list[tuple[str, str, Any]]:
        return [(d.name, c.name, step) for d in self.config.devices.values() for c in d.commands.values()
                for step in c.steps]

    async def init_modules(self) -> list[str]:
        """Init every module instance; return one line per failure (all are tried)."""

        async def one(device: str, command: str, step: Any) -> str | None:
            try:
                await step.module.init()
            except Exception as exc:  # collected, reported together
                return f'device "{device}": command "{command}": module "{step.module_id}": {exc}'
            return None

        try:
            results = await asyncio.wait_for(
                asyncio.gather(*(one(d, c, s) for d, c, s in self._steps())), INIT_TIMEOUT_S
            )
        except TimeoutError:
            return [f"module initialization did not finish within {INIT_TIMEOUT_S:g}s"]
        return [r for r in results if r]

    async def deinit_modules(self) -> list[str]:
        problems = []
        for device, command, step in self._steps():
            try:
                await asyncio.wait_for(step.module.deinit(), DEINIT_TIMEOUT_S)
            except Exception as exc:
                problems.append(f'device "{device}": command "{command}": module "{step.module_id}": {exc!r}')
        return problems

    # ------------------------------------------------------------- registration data
    def device_entries(self) -> list[DeviceEntry]:
        return [
            DeviceEntry(d.name, [CommandInfo(c.name, c.help_text()) for _, c in sorted(d.commands.items())])
            for _, d in sorted(self.config.devices.items())
        ]

    def _lock_changed(self, device: str, state: LockState | None) -> None:
        for uplink in self.uplinks:
            uplink.send_control(LockChanged(device, state))

    # ------------------------------------------------------------- message entry point
    def handle(self, link: Link, peer: bytes, msg: Message, payload: Any) -> None:
        if isinstance(msg, SESSION):
            run = self.runs.get((id(link), peer, msg.sid))
            if run is None:
                return  # late message of a finished session
            try:
                run.deliver(msg, payload)
            except ZdutError as exc:
                log.warning("session %s aborted: %s", msg.sid, exc)
                run.cancel(exc)
            return
        if isinstance(msg, RunOpen):
            self._open_run(link, peer, msg)
            return
        if isinstance(msg, UNARY_REQUESTS):
            try:
                check_version("agent", VERSION, msg.version)
                reply = self._unary(msg)
            except ZdutError as exc:
                if exc.code == Code.FAILED_PRECONDITION and "incompatible" in exc.message:
                    log.warning("refused %s from %s: %s", type(msg).__name__, msg.user, exc.message)
                reply = Error(msg.rid, exc.code, exc.message)
            try:
                link.send(peer, encode(reply))
            except ZdutError as exc:
                log.info("could not reply to %s: %s", msg.user, exc)
            return
        log.debug("ignored %s", type(msg).__name__)

    def _unary(self, msg: Message) -> Message:
        match msg:
            case Lock():
                return LockResult(msg.rid, msg.device, self.locker.lock(msg.device, msg.user, msg.duration_s))
            case Unlock():
                self.locker.unlock(msg.device, msg.user or ("" if not msg.force else anonymous()), msg.force)
                return Unlocked(msg.rid)
        devices = self.config.devices
        return listing(
            msg, "agent", self.name,
            devices=lambda: [DeviceInfo(n, self.locker.state(n), self.name, True) for n in sorted(devices)],
            commands=lambda device: sorted(self._device(device).commands),
            help_text=lambda device, command: self._command(device, command).help_text(),
            agents=lambda: [AgentInfo(self.name, sorted(devices), True, time.time(), VERSION, self.address)],
        )

    def _device(self, name: str) -> Any:
        device = self.config.devices.get(name)
        if device is None:
            raise no_such_device(name)
        return device

    def _command(self, device: str, command: str) -> Command:
        cmd = self._device(device).commands.get(command)
        if cmd is None:
            raise no_such_command(device, command)
        return cmd

    # ------------------------------------------------------------- Run
    def _open_run(self, link: Link, peer: bytes, msg: RunOpen) -> None:
        key = (id(link), peer, msg.sid)
        user = msg.user or anonymous()
        run = AgentRun(msg.sid, link.sender(peer), msg.device, msg.command, user, self.locker,
                       on_close=lambda r: self._close_run(key, r))
        try:
            if key in self.runs:
                raise ZdutError(Code.ALREADY_EXISTS, f"session {msg.sid} is already open")
            check_version("agent", VERSION, msg.version)
            command = self._command(msg.device, msg.command)
            step_args = command.resolve(list(msg.args))
        except ZdutError as exc:
            run.refuse(exc)
            return
        self.runs[key] = run
        log.info("run device=%s command=%s args=%s user=%s", msg.device, msg.command, list(msg.args), user)

        async def body(session: AgentRun) -> None:
            for step, args in zip(command.steps, step_args, strict=True):
                await step.module.run(session, args)

        interactive = any(step.module.wants_terminal(args) for step, args in zip(command.steps, step_args, strict=True))
        run.start(interactive, body)

    def _close_run(self, key: tuple[int, bytes, int], run: AgentRun) -> None:
        """A run closed (its own close step released the hold): forget it."""
        if self.runs.get(key) is run:
            del self.runs[key]

    def drop_link_sessions(self, link: Link, reason: str) -> None:
        """A link died (broker gone): cancel every session that came through it."""
        for (link_id, _, _), run in list(self.runs.items()):
            if link_id == id(link):
                run.cancel(ZdutError(Code.UNAVAILABLE, reason))

    def session_gone(self, link: Link, peer: bytes, sid: int) -> None:
        run = self.runs.get((id(link), peer, sid))
        if run is not None:
            run.cancel(ZdutError(Code.UNAVAILABLE, "client unreachable"))

    def watched(self) -> list[tuple[Any, Any]]:
        """Sessions for keep_alive: a silent client cancels its run and releases the busy hold."""
        return [(run.stream, lambda error, run=run: self._client_lost(run, error)) for run in self.runs.values()]

    def _client_lost(self, run: AgentRun, error: ZdutError) -> None:
        """Called every keepalive tick while the run exists: only the first call logs and cancels."""
        if not run.cancelled:
            log.warning("cancelling run device=%s user=%s: client lost (%s)", run.device, run.user, error)
            run.cancel(ZdutError(Code.UNAVAILABLE, f"client lost: {error.message}"))

    async def cancel_all(self, reason: str, wait_s: float) -> None:
        runs = list(self.runs.values())
        for run in runs:
            run.cancel(ZdutError(Code.UNAVAILABLE, reason))
        tasks = [r.task for r in runs if r.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=wait_s)
