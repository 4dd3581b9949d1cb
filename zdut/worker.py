"""zdut-agent: owns a config's devices, their module instances, sessions and locks.

It answers the client protocol on its own ROUTER (``-a``) and through any number
of brokers it registers with (``--server``); both deliver messages as
``(link, client-id, header, payload)`` so one set of handlers serves both.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import zmq

from zdut import logs
from zdut.agent_run import AgentRun
from zdut.config import AgentConfig, Command, ConfigError, load_config
from zdut.links import Link, tune
from zdut.locker import Locker
from zdut.memtune import tune_malloc
from zdut.protocol import (
    SESSION,
    UNARY_REQUESTS,
    VERSION,
    AgentInfo,
    AgentList,
    Code,
    CommandInfo,
    CommandList,
    Details,
    DeviceEntry,
    DeviceInfo,
    DeviceList,
    Done,
    Error,
    GetDetails,
    Hello,
    ListAgents,
    ListCommands,
    ListDevices,
    Lock,
    LockChanged,
    LockResult,
    LockState,
    Message,
    RunOpen,
    Unlock,
    Unlocked,
    Welcome,
    ZdutError,
    check_client_version,
    encode,
    endpoint,
)
from zdut.stream import keep_alive

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
        self.uplinks: list[Any] = []  # zdut.uplink.Uplink, each told about lock changes
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
            run = self.runs.get((id(link), peer, msg.sid))  # type: ignore[union-attr]
            if run is None:
                return  # late message of a finished session
            try:
                run.deliver(msg, payload)
            except ZdutError as exc:
                log.warning("session %s aborted: %s", msg.sid, exc)  # type: ignore[union-attr]
                run.cancel(exc)
            return
        if isinstance(msg, RunOpen):
            self._open_run(link, peer, msg)
            return
        if isinstance(msg, UNARY_REQUESTS):
            try:
                check_client_version("agent", VERSION, msg.version)
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
            case Hello():
                return Welcome(msg.rid, VERSION, "agent", self.name)
            case ListDevices():
                return DeviceList(msg.rid, [DeviceInfo(n, self.locker.state(n), self.name, True)
                                            for n in sorted(self.config.devices)])
            case ListCommands():
                return CommandList(msg.rid, sorted(self._device(msg.device).commands))
            case GetDetails():
                if msg.keyword != "help":
                    raise ZdutError(Code.INVALID_ARGUMENT,
                                    f'unknown keyword "{msg.keyword}", possible values are: "help"')
                return Details(msg.rid, self._command(msg.device, msg.command).help_text())
            case Lock():
                return LockResult(msg.rid, msg.device, self.locker.lock(msg.device, msg.user, msg.duration_s))
            case Unlock():
                self.locker.unlock(msg.device, msg.user or ("" if not msg.force else anonymous()), msg.force)
                return Unlocked(msg.rid)
            case ListAgents():
                return AgentList(msg.rid, [AgentInfo(self.name, sorted(self.config.devices), True, time.time(),
                                                     VERSION, self.address)])
        raise ZdutError(Code.UNIMPLEMENTED, f"{type(msg).__name__} is not served by an agent")

    def _device(self, name: str) -> Any:
        device = self.config.devices.get(name)
        if device is None:
            raise ZdutError(Code.NOT_FOUND, f'device "{name}": no such device')
        return device

    def _command(self, device: str, command: str) -> Command:
        cmd = self._device(device).commands.get(command)
        if cmd is None:
            raise ZdutError(Code.NOT_FOUND, f'device "{device}", command "{command}": no such command')
        return cmd

    # ------------------------------------------------------------- Run
    def _open_run(self, link: Link, peer: bytes, msg: RunOpen) -> None:
        key = (id(link), peer, msg.sid)
        user = msg.user or anonymous()
        run = AgentRun(msg.sid, link.sender(peer), msg.device, msg.command, user,
                       on_close=lambda r: self._close_run(key, r))
        try:
            if key in self.runs:
                raise ZdutError(Code.ALREADY_EXISTS, f"session {msg.sid} is already open")
            check_client_version("agent", VERSION, msg.version)
            command = self._command(msg.device, msg.command)
            step_args = command.resolve(list(msg.args))
            self.locker.acquire_busy(msg.device, user)
        except ZdutError as exc:
            try:
                run.stream.send(Done, code=exc.code, message=exc.message)
            except ZdutError:
                pass
            return
        self.runs[key] = run
        log.info("run device=%s command=%s args=%s user=%s", msg.device, msg.command, list(msg.args), user)

        async def body(session: AgentRun) -> None:
            for step, args in zip(command.steps, step_args, strict=True):
                await step.module.run(session, args)

        interactive = any(step.module.wants_terminal(args) for step, args in zip(command.steps, step_args, strict=True))
        run.start(interactive, body)

    def _close_run(self, key: tuple[int, bytes, int], run: AgentRun) -> None:
        if self.runs.pop(key, None) is run:
            self.locker.release_busy(run.device, run.user)

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
        log.warning("cancelling run device=%s user=%s: client lost (%s)", run.device, run.user, error)
        run.cancel(ZdutError(Code.UNAVAILABLE, f"client lost: {error.message}"))

    async def cancel_all(self, reason: str, wait_s: float) -> None:
        runs = list(self.runs.values())
        for run in runs:
            run.cancel(ZdutError(Code.UNAVAILABLE, reason))
        tasks = [r.task for r in runs if r.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=wait_s)


# ---------------------------------------------------------------- process


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "zdut"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zdut-agent",
        description="Serve the devices of a dutctl-style YAML config to zdut clients, directly and through brokers.",
        allow_abbrev=False,
    )
    p.add_argument("-c", "--config", default="dutctl.yaml", help="agent config file (default %(default)s)")
    p.add_argument("-a", "--address", metavar="ADDR",
                   help="serve clients directly on host:port or tcp://host:port (default localhost:1024 unless "
                        "--server is given, then no direct address)")
    p.add_argument("--server", "-server", action="append", default=[], metavar="ADDR",
                   help="register with the zdut-broker at ADDR; repeat for several brokers")
    p.add_argument("--name", help="stable agent name brokers know it by (default HOST:PORT of -a, else HOST/CONFIG)")
    p.add_argument("--state", type=Path, help="lock state file (default $XDG_STATE_HOME/zdut/agent-NAME.json)")
    p.add_argument("--check-config", "-check-config", action="store_true",
                   help="validate the config (module lookup and options included) and exit; non-zero if invalid")
    p.add_argument("--dry-run", "-dry-run", action="store_true",
                   help="load the config, init and de-init every module, exit; non-zero on any failure")
    p.add_argument("--drain", type=float, default=15.0, metavar="SECONDS",
                   help="on SIGINT/SIGTERM, let running commands finish this long before cancelling them")
    p.add_argument("-v", "--version", action="store_true", help="print the version and exit")
    p.add_argument("--log", "-log", default="info", help="debug|info|warn|error (default %(default)s)")
    p.add_argument("--log-json", "-log-json", action="store_true", help="log JSON lines")
    return p


def agent_name(args: argparse.Namespace) -> str:
    if args.name:
        return str(args.name)
    host = socket.gethostname()
    if args.address:
        return f"{host}:{args.address.rpartition(':')[2]}"
    return f"{host}/{Path(args.config).stem}"


def version_block(title: str) -> str:
    return f"{title}\nVersion: {VERSION}\nPython {sys.version.split()[0]}\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.version:
        print(version_block("zdut agent"))
        return 0
    logs.setup(args.log, args.log_json)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"zdut-agent: {args.config}: {exc}", file=sys.stderr)
        return 1
    if args.check_config:
        n_cmds = sum(len(d.commands) for d in config.devices.values())
        print(f"{args.config}: OK ({len(config.devices)} devices, {n_cmds} commands)")
        return 0
    if not args.address and not args.server:
        args.address = "localhost:1024"
    tune_malloc()
    name = agent_name(args)
    state = args.state or default_state_dir() / f"agent-{name.replace('/', '_').replace(':', '_')}.json"
    try:
        agent = Agent(config, name, args.address or "", None if args.dry_run else state)
    except ZdutError as exc:
        print(f"zdut-agent: {exc}", file=sys.stderr)
        return 1
    return asyncio.run(_serve(agent, args))


async def _serve(agent: Agent, args: argparse.Namespace) -> int:
    problems = await agent.init_modules()
    if problems:
        log.error("module initialization failed - %d problem(s)", len(problems))
        for line in problems:
            log.error("%s", line)
            print(f"zdut-agent: {line}", file=sys.stderr)
        await agent.deinit_modules()
        return 1
    if args.dry_run:
        problems = await agent.deinit_modules()
        for line in problems:
            print(f"zdut-agent: deinit: {line}", file=sys.stderr)
        print(f"{args.config}: dry run OK")
        return 1 if problems else 0

    from zdut.uplink import Uplink  # the broker link; imported here to keep --check-config light

    ctx = zmq.Context()
    tasks: list[asyncio.Task[Any]] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        if args.address:
            sock = ctx.socket(zmq.ROUTER)
            tune(sock)
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            try:
                sock.bind(endpoint(args.address))
            except (zmq.ZMQError, ValueError) as exc:
                print(f"zdut-agent: cannot listen on {args.address}: {exc}", file=sys.stderr)
                return 1
            direct = Link(sock, f"direct {args.address}")
            tasks.append(asyncio.create_task(direct.run(lambda p, m, d: agent.handle(direct, p, m, d))))
            log.info("serving %d devices on %s", len(agent.config.devices), args.address)
        for server in args.server:
            uplink = Uplink(agent, ctx, server)
            agent.uplinks.append(uplink)
            tasks.append(asyncio.create_task(uplink.run()))
        tasks.append(asyncio.create_task(keep_alive(agent.watched)))
        await stop.wait()
        log.info("shutting down: draining %d running commands (up to %gs)", len(agent.runs), args.drain)
        await _drain(agent, stop, args.drain)
        await agent.cancel_all("agent shutting down", 5.0)
        for uplink in agent.uplinks:
            uplink.close()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        ctx.destroy(linger=0)
    problems = await agent.deinit_modules()
    if problems:
        for line in problems:
            log.error("deinit failed: %s (system might be in an UNKNOWN STATE)", line)
        return 1
    return 0


async def _drain(agent: Agent, stop: asyncio.Event, seconds: float) -> None:
    """Let running commands finish for up to ``seconds``; a second signal ends the wait at once."""
    stop.clear()
    second = asyncio.ensure_future(stop.wait())
    pending: set[asyncio.Future[Any]] = {r.task for r in agent.runs.values() if r.task is not None}
    end = time.monotonic() + seconds
    while pending and not second.done() and (left := end - time.monotonic()) > 0:
        _, pending = await asyncio.wait(pending | {second}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        pending.discard(second)
    second.cancel()


if __name__ == "__main__":
    sys.exit(main())
