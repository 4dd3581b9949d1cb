"""Issue 12 end to end: the real ``zdut`` CLI with keys, a real ``zdut-broker --keys`` and a real ``zdut-agent
--keys`` registered with it, both reached the way users reach them (through the broker and directly).

Users alice (an admin everywhere), bob and carol hold keys both servers list; erin only the broker's;
mallory's key is known to nobody. The agent's key is agent "rack1" at the broker, and the broker's key is the
one its ``brokers/`` trusts. Its uplink and the users' connections to the broker go through TCP relays in this
process that record every byte, which is how the wire is shown to carry no plaintext.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import CONF, Lab, Proc, exe, free_port, wait_for
from zdut.common import keys as keys_module

pytestmark = pytest.mark.serial  # a revocation must end a console within 5 s: run alone, not beside another worker

DEMO = CONF / "demo.yaml"
MARKER = "typed-secret-6f1d9a"  # what a user types into a console: it must not cross the wire in clear


class Relay:
    """A loopback TCP relay towards ``target`` that keeps a copy of every byte, both ways, of every connection."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.captured = bytearray()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def seen(self) -> bytes:
        with self._lock:
            return bytes(self.captured)

    def _accept(self) -> None:
        while True:
            try:
                inbound, _ = self.listener.accept()
            except OSError:  # closed
                return
            outbound = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((inbound, outbound), (outbound, inbound)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                with self._lock:
                    self.captured += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


@dataclass
class Site:
    """One broker and the demo agent registered with it, each behind a recording relay."""

    lab: Lab
    tmp: Path
    broker: Proc
    agent: Proc
    broker_relay: Relay  # what users connect to
    uplink_relay: Relay  # what the agent connects to
    direct: str  # the agent's own -a address
    secure: bool

    def keys(self, user: str | None, server: str = "broker") -> list[str]:
        """The CLI's key flags for ``user`` towards ``server`` ("broker" or "agent"); none for None."""
        if user is None:
            return []
        return ["--key", str(self.tmp / "cli" / f"{user}.key_secret"),
                "--server-key", str(self.tmp / server / "server.key")]

    def zdut(self, user: str | None, *args: str, direct: bool = False, input: bytes | None = None,
             ) -> subprocess.CompletedProcess[str]:
        addr, server = (self.direct, "agent") if direct else (self.broker_relay.addr, "broker")
        return self.lab.zdut("-s", addr, *self.keys(user, server), *args, input=input, timeout=20)

    def owners(self, direct: bool = False) -> dict[str, str]:
        r = self.zdut("alice" if self.secure else None, "-f", "json", "list", direct=direct)
        assert r.returncode == 0, r.stderr
        return {d["Name"]: d.get("Owner") or "" for d in json.loads(r.stdout)["data"]}


def make_keys(tmp: Path) -> None:
    """tmp/broker and tmp/agent: the two --keys DIRs; tmp/cli: every user's and the agent's pairs."""
    cli, broker, agent = tmp / "cli", tmp / "broker", tmp / "agent"
    keys_module.generate("server", broker)
    for name in ("alice", "bob", "carol", "erin", "mallory", "rack1"):
        keys_module.generate(name, cli)
    for sub in ("users", "agents"):
        (broker / sub).mkdir()
    for sub in ("users", "brokers"):
        (agent / sub).mkdir(parents=True)
    for name in ("alice", "bob", "carol", "erin"):
        shutil.copy(cli / f"{name}.key", broker / "users")
    for name in ("alice", "bob", "carol"):
        shutil.copy(cli / f"{name}.key", agent / "users")
    shutil.copy(cli / "rack1.key", broker / "agents")
    shutil.copy(cli / "rack1.key_secret", agent / "server.key_secret")  # the agent's own pair is rack1's
    shutil.copy(cli / "rack1.key", agent / "server.key")
    shutil.copy(broker / "server.key", agent / "brokers" / "lab.key")
    for root in (broker, agent):
        (root / "admins").write_text("alice\n")


def start_site(tmp: Path, secure: bool) -> Site:
    lab = Lab(tmp)
    if secure:
        make_keys(tmp)
    port = free_port()
    broker_keys = ["--keys", str(tmp / "broker")] if secure else []
    broker = lab.spawn([*lab.broker_args(port), *broker_keys], "broker")
    wait_for(lambda: "listening on" in broker.text() or not broker.alive(), 15, "the broker to listen")
    assert broker.alive(), broker.text()
    broker_relay, uplink_relay = Relay(port), Relay(port)
    agent_keys = ["--keys", str(tmp / "agent")] if secure else []
    agent, direct = lab.agent(DEMO, None, *agent_keys, "--server", uplink_relay.addr, "--name", "rack1", ready=False)
    wait_for(lambda: 'agent "rack1" registered' in broker.text() or not agent.alive(), 15, "rack1 to register")
    assert agent.alive(), agent.text()
    return Site(lab, tmp, broker, agent, broker_relay, uplink_relay, direct, secure)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    s = start_site(tmp_path_factory.mktemp("secure-site"), secure=True)
    try:
        yield s
    finally:
        s.lab.close()
        s.broker_relay.close()
        s.uplink_relay.close()


# ---------------------------------------------------------------- who may connect


@pytest.mark.parametrize(("case", "flags", "said"), [
    ("no key", [], "the server has security on (CURVE) and this client has no key"),
    ("unknown key", ["mallory"], "the server refused key mallory"),
    ("wrong server key", ["alice", "agent"], "no CURVE handshake: is the server key"),
])
def test_the_cli_without_the_right_keys_is_refused_in_one_line(site: Site, case: str, flags: list[str],
                                                                said: str) -> None:
    keys = site.keys(flags[0], *flags[1:]) if flags else []
    started = time.monotonic()
    r = site.lab.zdut("-s", site.broker_relay.addr, *keys, "list", timeout=20)
    took = time.monotonic() - started
    print(f"{case}: exit {r.returncode} after {took:.2f}s: {r.stderr.strip()}")
    assert r.returncode == 1 and said in r.stderr and r.stderr.count("\n") == 1, (case, r.stderr)
    assert r.stdout == "" and took < 5, (case, took)


# ---------------------------------------------------------------- identity, locks


def test_the_key_is_the_user_through_the_broker_and_directly(site: Site) -> None:
    assert site.zdut("alice", "device1", "lock", "10m").returncode == 0
    assert site.zdut("bob", "device2", "lock", "10m", direct=True).returncode == 0
    try:
        for direct in (False, True):  # each server shows the key's name as the owner, whichever way it was taken
            owners = site.owners(direct)
            assert (owners["device1"], owners["device2"]) == ("alice", "bob"), (direct, owners)
        for direct in (False, True):
            r = site.zdut("alice", "-u", "bob", "device3", "lock", direct=direct)
            assert r.returncode != 0 and "-u must be your key's name" in r.stderr, (direct, r.stderr)
        assert site.owners()["device3"] == ""
    finally:
        site.zdut("alice", "device1", "unlock")
        site.zdut("bob", "device2", "unlock", direct=True)


@pytest.mark.parametrize("direct", [False, True], ids=["brokered", "direct"])
def test_only_the_owner_unlocks_and_only_an_admin_forces(site: Site, direct: bool) -> None:
    assert site.zdut("bob", "device3", "lock", "10m", direct=direct).returncode == 0
    r = site.zdut("carol", "device3", "unlock", direct=direct)
    assert r.returncode != 0 and 'locked by "bob"' in r.stderr, r.stderr
    r = site.zdut("carol", "device3", "unlock", "force", direct=direct)
    assert r.returncode != 0 and 'unlock force refused: user "carol" is not an admin' in r.stderr, r.stderr
    assert site.owners(direct)["device3"] == "bob"
    r = site.zdut("alice", "device3", "unlock", "force", direct=direct)
    assert r.returncode == 0 and "bob" in r.stdout, (r.stdout, r.stderr)
    assert site.owners(direct)["device3"] == ""


# ---------------------------------------------------------------- revocation


def test_a_removed_key_ends_a_console_through_the_broker_within_5s(site: Site) -> None:
    console = subprocess.Popen([exe("zdut"), "-s", site.broker_relay.addr, *site.keys("erin"), "device2", "repeat"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=site.lab.env, cwd=site.tmp)
    try:
        assert console.stdin is not None and console.stdout is not None
        assert b"Two words will terminate" in console.stdout.readline() + console.stdout.readline()
        console.stdin.write(b"still-here\n")
        console.stdin.flush()
        assert console.stdout.readline() == b"still-here\n"  # the console works while erin's key is listed
        os.remove(site.tmp / "broker" / "users" / "erin.key")
        removed = time.monotonic()
        code = console.wait(5.0)  # stdin stays open: the end of the session must end the client
        took = time.monotonic() - removed
        err = console.stderr.read().decode() if console.stderr else ""
        print(f"the console ended {took:.2f}s after erin's key was removed, exit {code}: {err.strip()}")
        assert code != 0 and 'the key of user "erin" was removed' in err, err
        r = site.zdut("erin", "list")
        assert r.returncode != 0 and "refused key erin" in r.stderr, r.stderr
    finally:
        console.kill()
        console.wait()


# ---------------------------------------------------------------- the wire


def typed_into_a_console(site: Site) -> bytes:
    """What crossed the relays while a user typed MARKER into ``device2 repeat`` through the broker."""
    before = len(site.broker_relay.seen()), len(site.uplink_relay.seen())
    r = site.zdut("alice" if site.secure else None, "device2", "repeat", input=f"{MARKER}\ntwo words\n".encode())
    assert r.returncode == 0 and MARKER in r.stdout, (r.stdout, r.stderr)  # it went through, both ways
    return site.broker_relay.seen()[before[0]:] + site.uplink_relay.seen()[before[1]:]


def test_a_console_through_the_broker_shows_no_plaintext_on_the_wire(site: Site, tmp_path: Path) -> None:
    wire = typed_into_a_console(site)
    assert len(wire) > 1000, len(wire)  # the greeting, the handshakes, the session: something was captured
    for clear in (MARKER, "device2", "repeat", "alice", "Two words will terminate"):
        assert clear.encode() not in wire, f"{clear!r} crossed the wire in clear"
    # the control: the same capture with security off sees all of it, so the capture itself works
    plain = start_site(tmp_path, secure=False)
    try:
        wire = typed_into_a_console(plain)
        for clear in (MARKER, "device2", "repeat", "Two words will terminate"):
            assert clear.encode() in wire, f"{clear!r} not captured with security off: the capture is broken"
    finally:
        plain.lab.close()
        plain.broker_relay.close()
        plain.uplink_relay.close()
