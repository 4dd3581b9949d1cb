"""zdut-agent, the process: flags, config loading, module init, the direct ROUTER, uplinks, signals.

The device authority itself (handlers, runs, locks) is ``zdut.agentd.agent.Agent``.
It answers on its own ROUTER (``-a``) and through any number of brokers it registers
with (``--server``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import zmq
from zmq.utils.monitor import parse_monitor_message

from zdut.agentd.agent import Agent
from zdut.agentd.config import ConfigError, load_config
from zdut.agentd.keyed import KeyedLink
from zdut.agentd.security import AgentSecurity
from zdut.common import logs
from zdut.common.addresses import endpoint, server_endpoint
from zdut.common.handshakes import FAILED_EVENTS, HandshakeWatch
from zdut.common.keys import KeyFileError
from zdut.common.limits import AGENT_MAX_FRAME, new_router, tcp_keepalive_instead_of_zmtp_heartbeats
from zdut.common.memtune import tune_malloc
from zdut.common.paths import state_dir
from zdut.protocol import (
    VERSION,
    ZdutError,
)
from zdut.transport.links import Link, tune
from zdut.transport.stream import keep_alive

log = logging.getLogger("zdut.agent")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zdut-agent",
        description="Serve the devices of a dutctl-style YAML config to zdut clients, directly and through brokers.",
        allow_abbrev=False,
    )
    p.add_argument("-c", "--config", default="dutctl.yaml", help="agent config file (default %(default)s)")
    p.add_argument("-a", "--address", metavar="ADDR", type=address,
                   help="serve clients directly on host:port or tcp://host:port (default localhost:1024 unless "
                        "--server is given, then no direct address)")
    p.add_argument("--server", "-server", action="append", default=[], metavar="ADDR", type=address,
                   help="register with the zdut-broker at ADDR; repeat for several brokers")
    p.add_argument("--keys", "-keys", metavar="DIR", type=Path,
                   help="turn CURVE security on with the keys in DIR: DIR/server.key_secret (this agent's pair), "
                        "DIR/users/NAME.key and DIR/admins (who may use -a, and unlock force there), "
                        "DIR/brokers/NAME.key (the brokers it trusts). The key for --server ADDR is "
                        "brokers/ADDR.key (ADDR as given, e.g. brokers/lab1:1024.key), else brokers/HOST.key, "
                        "else the only key in brokers/. Key files added or removed take effect within 5s. "
                        "Default: security off (anyone reaching -a acts as any user)")
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


def address(value: str) -> str:
    """An ``-a``/``--server`` value, checked when the flags are parsed so a typo is a usage error (exit 2,
    naming the flag) before any module touches hardware; the same rule as the client's ``-s``."""
    try:
        server_endpoint(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"invalid address {value!r}: {exc}") from None
    return value


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
        sys.stdout.write(version_block("zdut agent"))  # dutagent -v ends with the Python line
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
    security = None
    if args.keys is not None:
        try:
            security = AgentSecurity(args.keys)
        except KeyFileError as exc:
            print(f"zdut-agent: --keys: {exc}", file=sys.stderr)
            return 1
        missing = [security.missing_broker(s) for s in args.server if security.broker_key(s) is None]
        if missing:
            print(f"zdut-agent: {missing[0]}", file=sys.stderr)
            return 1
    args.security = security
    tune_malloc()
    name = agent_name(args)
    state = args.state or state_dir() / f"agent-{name.replace('/', '_').replace(':', '_')}.json"
    try:
        agent = Agent(config, name, args.address or "", None if args.dry_run else state)
    except ZdutError as exc:
        print(f"zdut-agent: {exc}", file=sys.stderr)
        return 1
    if not args.dry_run:
        agent.claim_temp_area(state.with_suffix(".tmp"))  # sweeps what a killed predecessor left
    return asyncio.run(_serve(agent, args))


async def _serve(agent: Agent, args: argparse.Namespace) -> int:
    problems = await agent.init_modules()
    if problems:
        log.error("module initialization failed - %d problem(s)", len(problems))
        for line in problems:
            log.error("%s", line)
            print(f"zdut-agent: {line}", file=sys.stderr)
        total = len(agent.config.devices)
        if args.dry_run or len(agent.failed) == total:  # --dry-run is strict; nothing left to serve is fatal
            if not args.dry_run:
                print("zdut-agent: every device failed to initialise; exiting", file=sys.stderr)
            await agent.deinit_modules()
            return 1
        log.error("%d of %d devices failed to initialise (%s): they are listed as failed, the others serve on",
                  len(agent.failed), total, ", ".join(sorted(agent.failed)))
    if args.dry_run:
        problems = await agent.deinit_modules()
        for line in problems:
            print(f"zdut-agent: deinit: {line}", file=sys.stderr)
        print(f"{args.config}: dry run OK")
        return 1 if problems else 0

    try:
        agent.start_background()  # after the dry-run exit: a check of the config reads no port
        code = await _listen(agent, args)
    finally:  # every way out once modules are up (a bind failure, a signal, a bug) de-initialises them
        problems = await agent.deinit_modules()
        agent.recorder.close()
        for line in problems:
            log.error("deinit failed: %s (system might be in an UNKNOWN STATE)", line)
    return 1 if problems else code


#: On exit, replies already queued (the Done telling a user the agent is shutting down) get this long to
#: leave; a peer that does not read them never holds the exit up longer.
EXIT_LINGER_MS = 500
#: How long cancelled runs get for their modules' own clean-up (a tool's SIGTERM, then SIGKILL) at exit.
CLEANUP_S = 5.0


async def _listen(agent: Agent, args: argparse.Namespace) -> int:
    """Serve on ``-a`` and through every ``--server`` until SIGINT/SIGTERM, then shut down (docs/architecture.md,
    "Shutdown")."""
    from zdut.agentd.uplink import Curve, Uplink  # the broker link; imported here to keep --check-config light

    security: AgentSecurity | None = args.security
    ctx = zmq.Context()
    watch = None
    tasks: list[asyncio.Task[Any]] = []
    peers: _Peers | None = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    direct: Link | None = None
    try:
        if security is None:
            log.warning("security off: %s; --keys DIR turns CURVE security on",
                        f"the direct port {args.address} lets anyone who reaches it act as any user"
                        if args.address else "brokers are reached without CURVE and trusted unchecked")
        else:
            security.start_zap(ctx)  # bound before the direct ROUTER binds: libzmq asks only a bound handler
        if args.address:
            sock = _direct_router(ctx)
            if security is not None:
                security.ring.secure_server(sock)
                watch = HandshakeWatch(str(security.root), log)
            try:
                sock.bind(endpoint(args.address))
            except (zmq.ZMQError, ValueError) as exc:
                print(f"zdut-agent: cannot listen on {args.address}: {exc}", file=sys.stderr)
                return 1
            peers = _Peers(sock, watch)
            if security is None:
                direct = Link(sock, f"direct {args.address}")
            else:
                direct = KeyedLink(sock, f"direct {args.address}", security.admit, security.known)
            tasks.append(asyncio.create_task(direct.run(lambda p, m, d: agent.handle(direct, p, m, d))))
            log.info("serving %d devices on %s%s", len(agent.config.devices), args.address,
                     f" (CURVE, keys in {security.root})" if security is not None else "")
        for server in args.server:
            curve = None
            if security is not None:
                name, key = security.broker_key(server) or ("", None)
                curve = Curve(security.pair, key, name, str(security.root))
            uplink = Uplink(agent, ctx, server, curve)
            agent.uplinks.append(uplink)
            tasks.append(asyncio.create_task(uplink.run()))
        if security is not None:
            security.start(agent, direct)
        tasks.append(asyncio.create_task(keep_alive(agent.watched)))
        await stop.wait()
        consoles, running = agent.begin_shutdown(args.drain)
        log.info("shutting down: %d console sessions ended, draining %d running commands (up to %gs)",
                 consoles, running, args.drain)
        await _drain(agent, stop, args.drain)
        await agent.cancel_all("agent shutting down", CLEANUP_S)
        if peers is not None:  # clients read their Done and hang up first, so none sees a lost connection
            await peers.gone(EXIT_LINGER_MS / 1000)
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if peers is not None:
            peers.close()
        if security is not None:
            security.close()
        for uplink in agent.uplinks:
            uplink.close(EXIT_LINGER_MS)
        ctx.destroy(linger=EXIT_LINGER_MS)


def _direct_router(ctx: zmq.Context[Any]) -> zmq.Socket[Any]:
    """The ``-a`` socket: routing ids no peer can predict, frames no peer can choose, and TCP keepalive in place
    of the ZMTP heartbeats that can abort libzmq (all in common.limits)."""
    sock = new_router(ctx, AGENT_MAX_FRAME)
    tune(sock)
    tcp_keepalive_instead_of_zmtp_heartbeats(sock, 1.0)
    return sock


class _Peers:
    """How many clients are connected to the direct ROUTER, kept from its socket monitor (read as events come,
    so its queue never grows and no event is lost to its HWM); with security on, its failed handshakes go to
    a HandshakeWatch (libzmq allows one monitor per socket)."""

    def __init__(self, sock: zmq.Socket[Any], watch: HandshakeWatch | None = None) -> None:
        events = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED
        self._watch = watch
        self._monitor = sock.get_monitor_socket(events | (FAILED_EVENTS if watch is not None else 0))
        self._count = 0
        asyncio.get_running_loop().add_reader(self._monitor.fileno(), self.count)
        self.count()  # ZMQ_FD is edge-like: it wakes the loop only once ZMQ_EVENTS has been read

    def count(self) -> int:
        while not self._monitor.closed and self._monitor.poll(0):
            message = parse_monitor_message(self._monitor.recv_multipart())
            event = message["event"]
            if event in (zmq.EVENT_ACCEPTED, zmq.EVENT_DISCONNECTED):
                self._count += 1 if event == zmq.EVENT_ACCEPTED else -1
            elif self._watch is not None:
                self._watch.event(event, message["value"])
        return self._count

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self._monitor.fileno())
        self._monitor.close(linger=0)

    async def gone(self, timeout_s: float, interval_s: float = 0.01) -> None:
        """Wait until no client is connected, for at most ``timeout_s``."""
        end = time.monotonic() + timeout_s
        while self.count() > 0 and time.monotonic() < end:
            await asyncio.sleep(interval_s)


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
