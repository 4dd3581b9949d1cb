"""zdut-broker, the process: flags, start-up checks, signals, and the serve loop around ``zdut.broker.Broker``.

``zdut/broker.py`` stays the entry point (``zdut-broker = zdut.broker:main``) and hands its Broker class in,
so this room never imports the broker module that imports it.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import zmq

from zdut.brokerd.guard import BrokerGuard
from zdut.brokerd.registry import Registry
from zdut.brokerd.store import Store, StoreError, default_state_path
from zdut.common import logs
from zdut.common.addresses import endpoint
from zdut.common.keyring import AGENT, USER
from zdut.common.keys import KeyFileError
from zdut.common.memtune import tune_malloc
from zdut.protocol import VERSION

log = logging.getLogger("zdut.broker")


class Served(Protocol):
    """What the process needs of the Broker it runs."""

    endpoint: str
    name: str
    registry: Registry

    def serve(self, stop: Callable[[], bool] | None = None) -> None: ...

    def stop(self) -> None: ...

    def close(self) -> None: ...


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zdut-broker",
        description="Let agents register their devices and relay zdut clients to them.",
        allow_abbrev=False,
    )
    p.add_argument(
        "-s",
        "--listen",
        default="localhost:1024",
        metavar="ADDR",
        help="listen on host:port or tcp://host:port (default %(default)s)",
    )
    p.add_argument("--state", type=Path, metavar="PATH", help=f"registry file (default {default_state_path()})")
    p.add_argument(
        "--heartbeat",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="heartbeat interval towards agents; silent for 3 intervals = offline (default %(default)s)",
    )
    p.add_argument(
        "--keys",
        "-keys",
        metavar="DIR",
        type=Path,
        help="turn CURVE security on with the keys in DIR: DIR/server.key_secret (this broker's pair; clients and "
        "agents are given its public half), DIR/users/NAME.key (a user: its requests act as NAME, -u must be NAME), "
        "DIR/agents/NAME.key (an agent: it may register as agent NAME only, and its devices stay with that key), "
        "DIR/admins (user names, one a line, who may unlock force and forget). Key files added or removed take "
        "effect within 5s; a removed key's sessions end. Default: security off (anyone reaching ADDR registers as "
        "any agent and acts as any user)",
    )
    p.add_argument("--log", "-log", default="info", metavar="LEVEL", help="debug|info|warn|error (default %(default)s)")
    p.add_argument("--log-json", action="store_true", help="log JSON lines")
    p.add_argument("-v", "--version", action="version", version=f"zdut broker {VERSION}")
    return p


def main(argv: list[str] | None, make: Callable[..., Served]) -> int:
    """Run a broker made by ``make(endpoint, store, heartbeat_s=..., guard=...)`` until SIGINT/SIGTERM."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (0.01 <= args.heartbeat <= 3600):
        parser.error("--heartbeat must be between 0.01 and 3600 seconds")
    try:
        ep = endpoint(args.listen)
    except ValueError as exc:
        parser.error(str(exc))
    logs.setup(args.log, args.log_json)
    guard = None
    if args.keys is not None:
        try:
            guard = BrokerGuard(args.keys)
        except KeyFileError as exc:
            print(f"zdut-broker: --keys: {exc}", file=sys.stderr)
            return 1
    tune_malloc()
    path = args.state or default_state_path()
    try:
        store = Store(path)
    except StoreError as exc:
        print(f"zdut-broker: {exc}", file=sys.stderr)
        return 1
    try:
        broker = make(ep, store, heartbeat_s=args.heartbeat, guard=guard)
    except StoreError as exc:
        store.close()
        print(f"zdut-broker: {exc}", file=sys.stderr)
        return 1
    except zmq.ZMQError as exc:
        store.close()
        if guard is not None:
            guard.close()
        print(f"zdut-broker: cannot listen on {ep}: {exc}", file=sys.stderr)
        return 1
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: broker.stop())
    if guard is None:  # said once it is up: a broker that fails to start has nothing to warn about
        log.warning("security off: anyone who reaches %s can register as any agent and act as any user; "
                    "--keys DIR turns CURVE security on", args.listen)
    reg = broker.registry
    log.info(
        "listening on %s as %s (state %s: %d known agents, %d devices; heartbeat %gs%s)",
        broker.endpoint,
        broker.name,
        path,
        len(reg.agents),
        len(reg.devices),
        args.heartbeat,
        _security(guard),
    )
    try:
        broker.serve()
    finally:
        broker.close()
        log.info("stopped")
    return 0


def _security(guard: BrokerGuard | None) -> str:
    if guard is None:
        return ""
    ring = guard.ring
    admins = ", ".join(sorted(ring.admins)) or "none"
    return (f"; CURVE, keys in {guard.root}: {len(ring.names(USER))} users, {len(ring.names(AGENT))} agents, "
            f"admins: {admins}")
