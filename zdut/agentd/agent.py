"""The device authority of ``zdut-agent``: handlers for every request, runs, locks, module lifecycle.

Transport-independent: the direct ROUTER and every broker uplink deliver messages
as ``(link, client-id, header, payload)``, so one set of handlers serves both.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from zdut.agentd.config import AgentConfig, Command
from zdut.agentd.file_args import declared_files
from zdut.agentd.journal import GAP, NOTE
from zdut.agentd.locker import Locker
from zdut.agentd.lockqueue import LockQueue
from zdut.agentd.recording import Recorder
from zdut.agentd.run import AgentRun
from zdut.agentd.watch import Watchers
from zdut.common.answers import listing, no_such_command, no_such_device
from zdut.common.globs import matching
from zdut.common.watch_args import log_query, queue_args, replay_lines
from zdut.devices import scratch
from zdut.protocol import (
    JOURNAL,
    QUEUE,
    SESSION,
    STDIN,
    STDOUT,
    UNARY_REQUESTS,
    VERSION,
    WATCH,
    AgentInfo,
    Code,
    CommandInfo,
    DeviceEntry,
    DeviceInfo,
    Error,
    Forget,
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
from zdut.transport.links import Link, LoopThrottle

if TYPE_CHECKING:
    from zdut.agentd.uplink import Uplink

log = logging.getLogger("zdut.agent")
#: Lines a peer can cause once per message are rate-limited: a flood of them is a few lines and a summary.
throttled = LoopThrottle(log)

INIT_TIMEOUT_S = 300.0
DEINIT_TIMEOUT_S = 15.0
#: How long a forced unlock waits for the runs it cancelled to close before it answers anyway.
FORCE_WAIT_S = 5.0
#: A busy hold is listed by brokers once it has lasted this long; a shorter run never shows as busy.
BUSY_ANNOUNCE_S = 0.05


def anonymous() -> str:
    return f"unknown-{secrets.token_hex(4)}"


def _command_line(command: str, args: list[str]) -> str:
    return " ".join([command, *args])


def _utc(unix: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix))


class DeviceCapture:
    """A module's background work on one device (``Module.background``), into the device's journal (as the
    journal session ``sid``) and to its watchers."""

    def __init__(self, agent: Agent, device: str, sid: int) -> None:
        self.agent, self.device, self.sid = agent, device, sid

    def output(self, data: bytes) -> None:
        if data:
            self.agent.recorder.captured(self.device, self.sid, data)
            self.agent.watchers.output(self.device, STDOUT, data)

    def note(self, text: str) -> None:
        self.agent.recorder.event(self.device, NOTE, "", text)
        self.agent.watchers.event(self.device, text)

    def gap(self, text: str) -> None:
        self.agent.recorder.event(self.device, GAP, "", text)
        self.agent.watchers.event(self.device, f"gap: {text}")


class Agent:
    """The device authority; transport-independent."""

    def __init__(self, config: AgentConfig, name: str, address: str = "", state_path: Path | None = None) -> None:
        self.config = config
        self.name = name
        self.address = address
        self.started = time.time()
        self.uplinks: list[Uplink] = []  # each told about lock changes
        self.locker = Locker(set(config.devices), state_path, on_change=self._lock_changed,
                             on_busy=self._busy_changed)
        #: Busy holds taken but not yet announced: device -> the timer that announces it (BUSY_ANNOUNCE_S).
        self._unannounced: dict[str, asyncio.TimerHandle] = {}
        self.runs: dict[tuple[int, bytes, int], AgentRun] = {}
        #: Devices whose modules failed to initialise -> why; listed as failed, their runs refused.
        self.failed: dict[str, str] = {}
        self._deferred: set[asyncio.Task[None]] = set()  # replies that wait for cancelled runs to close
        self.watchers = Watchers(self._owners, self._announce)
        self.lock_queue = LockQueue(self.locker, self._announce)
        #: Each device's journal, beside the lock file (none without one: --dry-run).
        self.recorder = Recorder(state_path.with_name(f"{state_path.stem}.journal") if state_path else None,
                                 sorted(config.devices))
        self._journal_ids = itertools.count(int(time.time() * 1000))  # unique across restarts too
        self.closing = False  # shutting down: new runs are refused
        self._background_tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------- module lifecycle
    def _steps(self) -> list[tuple[str, str, Any]]:
        return [(d.name, c.name, step) for d in self.config.devices.values() for c in d.commands.values()
                for step in c.steps]

    async def init_modules(self) -> list[str]:
        """Init every module instance, all at once; return one line per failure.

        A device with a module that fails (or does not finish within INIT_TIMEOUT_S) is marked failed in
        ``self.failed`` with the reason: it is listed so and its runs are refused, while the others serve."""
        steps = self._steps()
        tasks = [asyncio.ensure_future(step.module.init()) for _, _, step in steps]
        pending: set[asyncio.Future[Any]] = set()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=INIT_TIMEOUT_S)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=DEINIT_TIMEOUT_S)
        problems = []
        for (device, command, step), task in zip(steps, tasks, strict=True):
            if task in pending:
                why = f"init did not finish within {INIT_TIMEOUT_S:g}s"
            elif task.cancelled():
                why = "init was cancelled"
            elif (exc := task.exception()) is not None:
                why = str(exc) or type(exc).__name__
            else:
                continue
            line = f'command "{command}": module "{step.module_id}": {why}'
            self.failed[device] = f"{self.failed[device]}; {line}" if device in self.failed else line
            problems.append(f'device "{device}": {line}')
        return problems

    @staticmethod
    def claim_temp_area(root: Path) -> None:
        """At start, before any module runs: remove the temp files a killed predecessor left under ``root``
        and claim this process's own part of it (``devices.scratch``); released at exit."""
        try:
            scratch.claim(root)
        except OSError as exc:
            log.error("cannot use %s for temporary files (%s): using the system temp directory", root, exc)
            return
        atexit.register(scratch.release)

    def start_background(self) -> None:
        """The background work of the modules that do some (a serial port read while nobody is attached), for
        every device that initialised; it reports into the device's journal and to its watchers."""
        for device, command, step in self._steps():
            if device not in self.failed and step.module.has_background():
                capture = DeviceCapture(self, device, next(self._journal_ids))
                task = asyncio.ensure_future(self._background(device, command, step, capture))
                self._background_tasks.add(task)
                task.add_done_callback(self._background_tasks.discard)

    async def _background(self, device: str, command: str, step: Any, capture: DeviceCapture) -> None:
        try:
            await step.module.background(capture)
        except ZdutError as exc:
            log.error('device %s: command "%s": background work stopped: %s', device, command, exc.message)
            capture.note(f"background work of {command} stopped: {exc.message}")
        except Exception:
            log.exception('device %s: command "%s": background work failed', device, command)
            capture.note(f"background work of {command} failed (the agent's log says why)")

    async def deinit_modules(self) -> list[str]:
        tasks = list(self._background_tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=DEINIT_TIMEOUT_S)
        problems = []
        for device, command, step in self._steps():
            try:
                async with asyncio.timeout(DEINIT_TIMEOUT_S):
                    await step.module.deinit()
            except Exception as exc:
                problems.append(f'device "{device}": command "{command}": module "{step.module_id}": {exc!r}')
        return problems

    # ------------------------------------------------------------- registration data
    def device_entries(self) -> list[DeviceEntry]:
        return [
            DeviceEntry(d.name, [CommandInfo(c.name, c.help_text(), c.desc) for _, c in sorted(d.commands.items())],
                        self.failed.get(d.name, ""))
            for _, d in sorted(self.config.devices.items())
        ]

    def _lock_changed(self, device: str, state: LockState | None, shadowed: LockState | None) -> None:
        """The Locker's callback: brokers are told, and a device that became free goes to its next waiter."""
        self._announce(device)
        self.lock_queue.grant(device)

    def _busy_changed(self, device: str, taken: bool) -> None:
        """A busy hold is announced only once it has lasted BUSY_ANNOUNCE_S: a short run (a ``status``, a
        power toggle) then costs brokers nothing, where two announcements would double its messages."""
        if taken:
            if device not in self._unannounced:
                self._unannounced[device] = asyncio.get_running_loop().call_later(
                    BUSY_ANNOUNCE_S, self._announce, device)
            return
        if device not in self._unannounced:  # brokers were told of the hold: tell them it ended
            self._announce(device)
        else:  # they never heard of it, and the device is as they list it
            self._unannounced.pop(device).cancel()
        self.lock_queue.grant(device)

    def _announce(self, device: str) -> None:
        """``device``'s hold, or who watches or waits for it, changed: brokers list it (its busy hold too, so a
        pending announcement of that hold is no longer needed)."""
        pending = self._unannounced.pop(device, None)
        if pending is not None:
            pending.cancel()
        for uplink in self.uplinks:
            uplink.send_control(self._listed(device))

    def _listed(self, device: str) -> LockChanged:
        return LockChanged(device, self.locker.state(device), self.locker.shadowed(device),
                           self.watchers.count(device), self.lock_queue.waiting(device))

    def listed_extras(self) -> list[LockChanged]:
        """The devices someone watches or waits for, for a broker that just registered this agent."""
        return [self._listed(d) for d in sorted(self.config.devices)
                if self.watchers.count(d) or self.lock_queue.waiting(d)]

    # ------------------------------------------------------------- message entry point
    def handle(self, link: Link, peer: bytes, msg: Message, payload: Any) -> None:
        if isinstance(msg, SESSION):
            run = self.runs.get((id(link), peer, msg.sid))
            if run is None:
                return  # late message of a finished session
            try:
                run.deliver(msg, payload)
            except ZdutError as exc:
                throttled(logging.WARNING, "session aborted", "session %s aborted: %s", msg.sid, exc)
                run.cancel(exc)
            return
        if isinstance(msg, RunOpen):
            self._open_run(link, peer, msg)
            return
        if isinstance(msg, UNARY_REQUESTS):
            closing: list[asyncio.Task[Any]] = []
            try:
                check_version("agent", VERSION, msg.version)
                reply = self._unlock(msg, closing) if isinstance(msg, Unlock) else self._unary(msg)
            except ZdutError as exc:
                if exc.code == Code.FAILED_PRECONDITION and "incompatible" in exc.message:
                    throttled(logging.WARNING, "refused version", "refused %s from %s: %s", type(msg).__name__,
                              msg.user, exc.message)
                reply = Error(msg.rid, exc.code, exc.message)
            except Exception as exc:  # a bug costs this request an answer, never a 30 s silence
                log.exception("internal error answering %s", type(msg).__name__)
                reply = Error(msg.rid, Code.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
            if closing:
                self._reply_when_closed(link, peer, msg.user, reply, closing)
            else:
                self._reply(link, peer, msg.user, reply)
            return
        throttled(logging.DEBUG, "ignored", "ignored %s", type(msg).__name__)

    @staticmethod
    def _reply(link: Link, peer: bytes, user: str, reply: Message) -> None:
        try:
            link.send(peer, encode(reply))
        except ZdutError as exc:
            throttled(logging.INFO, "could not reply", "could not reply to %s: %s", user, exc)

    def _reply_when_closed(self, link: Link, peer: bytes, user: str, reply: Message,
                           closing: list[asyncio.Task[Any]]) -> None:
        """Answer once the runs a forced unlock cancelled have closed (their busy hold released, brokers
        told), or after FORCE_WAIT_S if a module's clean-up takes longer."""

        async def later() -> None:
            await asyncio.wait(closing, timeout=FORCE_WAIT_S)
            self._reply(link, peer, user, reply)

        task = asyncio.get_running_loop().create_task(later())
        self._deferred.add(task)
        task.add_done_callback(self._deferred.discard)

    def _unlock(self, msg: Unlock, closing: list[asyncio.Task[Any]]) -> Message:
        """Unlock; a forced one by another user also cancels the broken owner's runs on the device (their
        tasks go to ``closing``) and tells both sides who broke whose lock."""
        user = msg.user or ("" if not msg.force else anonymous())
        broke = self.locker.unlock(msg.device, user, msg.force)
        if not broke:
            self.recorder.event(msg.device, "unlock", user)
            return Unlocked(msg.rid)
        self.recorder.event(msg.device, "force", user, f'broke the lock of "{broke}"')
        why = ZdutError(Code.ABORTED, f'lock on "{msg.device}" broken by "{user}"')
        runs = [r for r in self.runs.values() if r.device == msg.device and r.user == broke]
        for run in runs:
            run.cancel(why)
        closing.extend(r.task for r in runs if r.task is not None and not r.task.done())
        log.warning('device %s: lock of "%s" broken by "%s"; %d running sessions cancelled', msg.device, broke,
                    user, len(runs))
        return Unlocked(msg.rid, broke, len(runs))

    def _unary(self, msg: Message) -> Message:
        match msg:
            case Lock():
                result = LockResult(msg.rid, msg.device, self.locker.lock(msg.device, msg.user, msg.duration_s))
                self.recorder.event(msg.device, "lock", msg.user, f"until {_utc(result.lock.expires_at)}")
                return result
            case Forget():
                raise ZdutError(Code.UNIMPLEMENTED, "forget is served by a broker, not by an agent")
        devices, failed = self.config.devices, self.failed
        return listing(
            msg, "agent", self.name,
            devices=lambda match: [DeviceInfo(n, self.locker.state(n), self.name, True, failed.get(n, ""),
                                        self.watchers.count(n), self.lock_queue.waiting(n))
                                   for n in matching(sorted(devices), match, str)],
            commands=lambda device: [(c.name, c.desc) for _, c in sorted(self._device(device).commands.items())],
            help_text=lambda device, command: self._command(device, command).help_text(),
            agents=lambda: [AgentInfo(self.name, sorted(devices), True, time.time(), VERSION, self.address,
                                      dict(sorted(failed.items())))],
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
                       on_close=lambda r: self._close_run(key, r), stdin_closed=msg.stdin_closed)
        try:
            if key in self.runs:
                raise ZdutError(Code.ALREADY_EXISTS, f"session {msg.sid} is already open")
            if self.closing:
                raise ZdutError(Code.UNAVAILABLE, "agent shutting down")
            check_version("agent", VERSION, msg.version)
            if msg.mode:
                self._open_watch(key, run, msg)
                return
            command = self._command(msg.device, msg.command)
            if msg.device in self.failed:
                raise ZdutError(Code.FAILED_PRECONDITION,
                                f'device "{msg.device}" failed to initialise: {self.failed[msg.device]}')
            step_args = command.resolve(list(msg.args))
        except ZdutError as exc:
            run.refuse(exc)
            return
        self.runs[key] = run
        log.info("run device=%s command=%s args=%s user=%s", msg.device, msg.command, list(msg.args), user)

        async def body(session: AgentRun) -> None:
            self.watchers.greet_owner(session)
            for step, args in zip(command.steps, step_args, strict=True):
                await step.module.run(session, args)

        interactive = any(step.module.wants_terminal(args) for step, args in zip(command.steps, step_args, strict=True))
        run.tap = self._printed
        run.journal_id = next(self._journal_ids)
        run.start(interactive, body, declared_files(command, step_args))
        if run.task is not None:
            self.recorder.started(run, list(msg.args))
            self.watchers.event(msg.device, f"{user} started {_command_line(msg.command, msg.args)}")

    def _open_watch(self, key: tuple[int, bytes, int], run: AgentRun, msg: RunOpen) -> None:
        """``DEV watch [-n N]``, ``DEV log ...`` and ``DEV lock D --wait W``: no command, no hold; any user may
        (security decides who is a user)."""
        self._device(msg.device)
        device, args = msg.device, list(msg.args)
        body: Callable[[AgentRun], Awaitable[None]]
        if msg.mode == WATCH:
            lines = replay_lines(args)

            async def body(session: AgentRun) -> None:
                await self.watchers.watch(device, session, self.recorder.recent_output(device, lines))
        elif msg.mode == JOURNAL:
            query = log_query(args)

            async def body(session: AgentRun) -> None:
                await self.recorder.read(device, session, query)
        elif msg.mode == QUEUE:
            duration_s, wait_s = queue_args(args)

            async def body(session: AgentRun) -> None:
                granted = await self.lock_queue.wait(device, session, duration_s, wait_s)
                self.recorder.event(device, "lock", session.user, f"until {_utc(granted.expires_at)} (after a wait)")
                await session.stdout(msgspec.json.encode(granted) + b"\n")
        else:
            raise ZdutError(Code.INVALID_ARGUMENT, f"unknown session mode {msg.mode!r}")
        self.runs[key] = run
        run.watching = True
        log.info("%s device=%s user=%s", msg.mode, device, run.user)
        run.start(False, body, hold=False)

    def _printed(self, run: AgentRun, stream: int, data: bytes) -> None:
        self.recorder.printed(run, stream, data)
        if stream != STDIN:  # typed input (recorded only where the config asks) is the journal's alone
            self.watchers.output(run.device, stream, data)

    def _owners(self, device: str) -> list[AgentRun]:
        return [r for r in self.runs.values() if r.device == device and not r.watching]

    def _close_run(self, key: tuple[int, bytes, int], run: AgentRun) -> None:
        """A run closed (its own close step released the hold): forget it, and tell the device's watchers."""
        if self.runs.get(key) is run:
            del self.runs[key]
            if not run.watching:
                self.recorder.ended(run)
                code, message = run.exit
                self.watchers.event(run.device, f"{run.user}'s {run.command} ended: "
                                                f"{f'{code}: {message}' if code else 'ok'}")

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

    def begin_shutdown(self, drain_s: float) -> tuple[int, int]:
        """The drain policy (docs/architecture.md, "Shutdown"): from now on new runs are refused; console
        sessions end at once (nobody finishes typing into a console for the agent's sake); every other run
        is told it has ``drain_s`` to finish.  Returns (consoles ended, runs left to drain)."""
        self.closing = True
        consoles = [r for r in self.runs.values() if r.interactive or r.watching]
        for run in consoles:
            run.cancel(ZdutError(Code.UNAVAILABLE, "agent shutting down"))
        running = [r for r in self.runs.values() if not r.cancelled]
        for run in running:
            run.notify(f"zdut-agent {self.name} is shutting down: this command is cancelled unless it ends "
                       f"within {drain_s:g}s\n")
        return len(consoles), len(running)

    async def cancel_all(self, reason: str, wait_s: float) -> None:
        runs = list(self.runs.values())
        for run in runs:
            run.cancel(ZdutError(Code.UNAVAILABLE, reason))
        tasks = [r.task for r in runs if r.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=wait_s)
