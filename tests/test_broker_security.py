"""``zdut-broker --keys DIR`` (issue 12): a real broker, a real ``zdut-agent --keys`` behind it, and raw pyzmq CURVE
DEALERs speaking zdut.protocol as clients and agents (the zdut client's own key support is being built apart).

One broker and one agent (rack1, conf/demo.yaml) serve the whole module; each test uses its own users and agent
names so that none depends on another's leftovers. Users alice (an admin), bob, carol, erin, frank are listed;
dave is added at runtime; mallory's key is known to nobody. Agent keys rack1..rack4 are listed."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zmq
from test_agent_security import SILENCE_S, lines, peer, reply

from conftest import CONF, Lab, Proc, exe, free_port, wait_for
from zdut import protocol as p
from zdut.common import keys as keys_module
from zdut.common.keys import load_pair, load_public

pytestmark = pytest.mark.serial  # a handshake under a flood is timed: run alone, not beside another worker

DEMO = CONF / "demo.yaml"
USERS = ("alice", "bob", "carol", "erin", "frank")
AGENTS = ("rack1", "rack2", "rack3", "rack4")


@dataclass
class World:
    lab: Lab
    tmp: Path
    broker: Proc
    addr: str
    agent: Proc
    ctx: zmq.Context[Any]

    @property
    def keys(self) -> Path:
        return self.tmp / "broker"

    @property
    def server(self) -> bytes:
        return load_public(self.keys / "server.key")

    def pair(self, name: str) -> tuple[bytes, bytes]:
        return load_pair(self.tmp / "cli" / f"{name}.key_secret")

    def client(self, name: str | None) -> zmq.Socket[Any]:
        """A raw DEALER holding ``name``'s pair (None: NULL, no CURVE) towards the broker."""
        return peer(self.ctx, self.addr, self.pair(name) if name else None, self.server)

    def agent_dir(self, name: str) -> Path:
        """A ``zdut-agent --keys`` DIR holding agent key ``name`` and trusting this broker."""
        root = self.tmp / f"agent-{name}"
        if not root.exists():
            (root / "brokers").mkdir(parents=True)
            shutil.copy(self.tmp / "cli" / f"{name}.key_secret", root / "server.key_secret")
            (root / "server.key_secret").chmod(0o600)
            shutil.copy(self.keys / "server.key", root / "brokers" / "lab.key")
        return root


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("broker-security")
    lab = Lab(tmp)
    keys, cli = tmp / "broker", tmp / "cli"
    keys_module.generate("server", keys)
    for name in (*USERS, *AGENTS, "dave", "mallory", "stranger"):
        keys_module.generate(name, cli)
    for sub, names in (("users", USERS), ("agents", AGENTS)):
        (keys / sub).mkdir()
        for name in names:
            shutil.copy(cli / f"{name}.key", keys / sub)
    (keys / "admins").write_text("# who may unlock force\nalice\n")
    port = free_port()
    broker = lab.spawn([*lab.broker_args(port), "--keys", str(keys)], "broker")
    wait_for(lambda: "listening on" in broker.text() or not broker.alive(), 15, "the broker to listen")
    assert broker.alive(), broker.text()
    ctx = zmq.Context()
    w = World(lab, tmp, broker, f"127.0.0.1:{port}", broker, ctx)  # the agent is started next, with w's help
    w.agent = start_agent(w, "rack1")
    wait_for(lambda: 'agent "rack1" registered' in broker.text() or not w.agent.alive(), 15, "rack1 to register")
    try:
        yield w
    finally:
        ctx.destroy(0)
        lab.close()


def start_agent(w: World, key: str, name: str | None = None) -> Proc:
    """A real zdut-agent serving conf/demo.yaml through the broker with agent key ``key``, as ``name`` (the key's
    name unless given)."""
    proc, _ = w.lab.agent(DEMO, None, "--keys", str(w.agent_dir(key)), "--server", w.addr, "--name", name or key,
                          ready=False)
    return proc


def request(sock: zmq.Socket[Any], msg: p.Message, want: type = object, timeout_s: float = 5.0) -> Any:
    sock.send(p.encode(msg))
    return reply(sock, want, timeout_s)


def listing(w: World, user: str = "alice") -> dict[str, p.DeviceInfo]:
    got = request(w.client(user), p.ListDevices(1, p.VERSION, user), p.DeviceList)
    assert got is not None, w.broker.text()[-3000:]
    return {d.name: d for d in got.devices}


def rack1_keeps_its_devices(w: World) -> None:
    devices = listing(w)
    assert {n: (d.agent, d.online) for n, d in devices.items() if n.startswith("device")} == {
        f"device{i}": ("rack1", True) for i in (1, 2, 3)}, devices


class RawAgent:
    """A raw DEALER holding an agent key, speaking the broker <-> agent control protocol."""

    def __init__(self, w: World, key: str) -> None:
        self.sock = w.client(key)

    def register(self, name: str, devices: list[str], timeout_s: float = 5.0) -> Any:
        entries = [p.DeviceEntry(d, [p.CommandInfo("status", "")]) for d in devices]
        self.sock.send_multipart([b"", p.encode(p.Register(p.VERSION, name, os.urandom(4).hex(), "", entries, {}))])
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if self.sock.poll(int(left * 1000)):
                frames = self.sock.recv_multipart()
                msg = p.decode(frames[-1])
                if isinstance(msg, (p.Registered, p.Refused)):
                    return msg
        return None

    def heartbeat(self) -> None:
        """What keeps a registered agent online (the broker's heartbeat is 0.5 s: offline after 1.5 s of silence)."""
        self.sock.send_multipart([b"", p.encode(p.Heartbeat())])

    def close(self) -> None:
        self.sock.close(0)


# ---------------------------------------------------------------- switch and handshakes


def test_security_off_says_so_in_one_line(lab: Lab) -> None:
    broker, _ = lab.broker()  # the plain CLI gets in: a bench needs no keys
    assert lines(broker, "security off: anyone who reaches") == 1, broker.text()
    assert "--keys DIR turns CURVE security on" in broker.text()


def test_start_up_errors_are_one_line(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([exe("zdut-broker"), "-s", f"127.0.0.1:{free_port()}", "--state",
                               str(tmp_path / "state.sqlite3"), *args], capture_output=True, text=True, timeout=30)

    r = run("--keys", str(tmp_path / "nope"))
    assert r.returncode == 1 and r.stderr.strip() == (
        f"zdut-broker: --keys: {tmp_path / 'nope'}: no such directory (--keys wants a key directory)"), r.stderr
    (tmp_path / "empty").mkdir()
    r = run("-keys", str(tmp_path / "empty"))
    assert r.returncode == 1 and r.stderr.startswith(f"zdut-broker: --keys: {tmp_path / 'empty'}/server.key_secret")
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = subprocess.run([exe("zdut-broker"), "--help"], capture_output=True, text=True, timeout=30)
    assert all(part in " ".join(r.stdout.split()) for part in (
        "--keys DIR, -keys DIR", "DIR/server.key_secret", "DIR/users/NAME.key", "DIR/agents/NAME.key", "DIR/admins",
    )), r.stdout


def test_null_and_unknown_keys_get_nothing_while_a_known_key_is_served(world: World) -> None:
    assert set(listing(world)) >= {"device1", "device2", "device3"}
    refused = {
        "NULL": lambda: world.client(None),
        "unknown key": lambda: world.client("mallory"),
        "wrong server key": lambda: peer(world.ctx, world.addr, world.pair("bob"), world.pair("mallory")[0]),
    }
    # A NULL peer's refusal is seen as a mechanism mismatch, or (when its reset beats its greeting) as a peer that
    # hung up mid-handshake: either is logged, each once.
    logged = {"NULL": ("refused a connection without CURVE", "hung up during its CURVE handshake"),
              "unknown key": ("is not in",), "wrong server key": ("holds the wrong server key for this broker",)}
    for what, make in refused.items():
        first, second = make(), make()  # two connections (an unknown key's retrying too): logged once all the same
        for sock in (first, second):
            sock.send(p.encode(p.ListDevices(1, p.VERSION, "mallory")))
        assert reply(first, object, SILENCE_S) is None and reply(second, object, 0.1) is None, what
        wait_for(lambda what=what: any(lines(world.broker, text) for text in logged[what]), 5,
                 f"the {what} refusal logged")
        assert all(lines(world.broker, text) <= 1 for text in logged[what]), (what, world.broker.text()[-3000:])
        first.close()
        second.close()
    assert "refused a connection from 127.0.0.1: key " in world.broker.text()  # the ZAP handler names the key
    assert set(listing(world)) >= {"device1", "device2", "device3"}  # and the broker serves on


def test_keys_made_up_per_attempt_cannot_flood_the_log(world: World) -> None:
    def refusals() -> tuple[int, int]:  # (ZAP lines at warning level, handshakes the monitor saw refused by ZAP)
        return lines(world.broker, "refused a connection from"), world.broker.text().count("refused by ZAP")

    logged, refused = refusals()
    socks = [peer(world.ctx, world.addr, zmq.curve_keypair(), world.server) for _ in range(20)]
    for sock in socks:
        sock.send(p.encode(p.ListDevices(1, p.VERSION, "x")))
    wait_for(lambda: refusals()[1] - refused >= 20, 10, "20 made-up keys refused")
    assert refusals()[0] - logged <= 5, world.broker.text()[-3000:]  # the broker's log throttle: 5 per 10 s
    for sock in socks:
        sock.close()


def test_zap_is_answered_while_another_peer_floods_the_broker(world: World) -> None:
    flooder = subprocess.Popen([sys.executable, "-c", FLOOD, world.addr, str(world.tmp / "cli" / "frank.key_secret"),
                                str(world.keys / "server.key"), "6"], stdout=subprocess.PIPE, text=True)
    try:
        assert flooder.stdout is not None and flooder.stdout.readline().strip() == "flooding"
        wait_for(lambda: "dropped late Ping of client" in world.broker.text(), 5, "the flood to reach the broker")
        started = time.monotonic()
        got = request(world.client("bob"), p.ListDevices(1, p.VERSION, "bob"), p.DeviceList, 3.0)
        took = time.monotonic() - started
        assert flooder.poll() is None, "the flood ended before the handshake was tried"
        print(f"a new connection's handshake and listing took {took * 1000:.0f} ms during the flood")
        assert got is not None, "no handshake within 3 s while another peer floods the broker"
    finally:
        flooder.kill()
        flooder.wait()


FLOOD = """
import sys, time, zmq
from zdut import protocol as p
from zdut.common.keyring import secure_client
from zdut.common.keys import load_pair, load_public
addr, pair, server, seconds = sys.argv[1], load_pair(sys.argv[2]), load_public(sys.argv[3]), float(sys.argv[4])
ctx = zmq.Context()
socks = []
for _ in range(3):
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    secure_client(s, pair, server)
    s.connect("tcp://" + addr)
    socks.append(s)
late = p.encode(p.Ping(424242, 1))  # a session nobody has: the broker reads, looks up and drops each
print("flooding", flush=True)
end = time.monotonic() + seconds
while time.monotonic() < end:
    for s in socks:
        for _ in range(100):
            s.send(late)
"""


# ---------------------------------------------------------------- identity from the key


def test_the_user_named_must_be_the_keys(world: World) -> None:
    carol = world.client("carol")
    err = request(carol, p.ListDevices(7, p.VERSION, "bob"), p.Error)
    assert err is not None and (err.rid, err.code) == (7, p.Code.PERMISSION_DENIED), err
    assert err.message == ('user "bob" refused: this connection\'s key is user "carol" '
                           "(with security on, -u must be your key's name)")
    done = request(carol, p.RunOpen(3, p.VERSION, "bob", "device1", "status", []), p.Done)
    assert done is not None and (done.sid, done.code) == (3, p.Code.PERMISSION_DENIED), done
    assert 'user "bob" refused' in done.message
    done = request(carol, p.RunOpen(4, p.VERSION, "carol", "device1", "status", []), p.Done)
    assert done is not None and (done.sid, done.code) == (4, p.Code.OK), done
    assert lines(world.agent, "run ended device=device1 command=status user=carol: ok") == 1  # the agent saw carol


def test_keys_of_the_wrong_kind_are_refused(world: World) -> None:
    as_user = RawAgent(world, "alice")
    refused = as_user.register("alice", ["alices-board"])
    assert isinstance(refused, p.Refused) and refused.code == p.Code.PERMISSION_DENIED, refused
    assert refused.message.startswith('key "alice" is a user key: only an agent key'), refused
    as_agent = world.client("rack2")
    err = request(as_agent, p.ListDevices(5, p.VERSION, "rack2"), p.Error)
    assert err is not None and err.code == p.Code.PERMISSION_DENIED, err
    assert err.message.startswith('key "rack2" is an agent key: it registers devices and cannot act as a user'), err
    assert "alices-board" not in listing(world)


def test_an_agent_without_an_allowed_key_cannot_register(world: World) -> None:
    stranger = start_agent(world, "stranger")
    wait_for(lambda: "refused our key" in stranger.text(), 10, "the stranger agent to be refused")
    assert "registered with broker" not in stranger.text()
    assert 'agent "stranger"' not in world.broker.text()
    assert "stranger" not in {d.agent for d in listing(world).values()}
    stranger.stop()


def test_an_agent_name_or_its_devices_cannot_be_taken_over_by_another_key(world: World) -> None:
    impostor = start_agent(world, "rack2", "rack1")  # rack1's name, with rack2's key
    wait_for(lambda: "refused registration" in impostor.text(), 10, "the impostor to be refused")
    assert ('refused registration: agent name "rack1" refused: this connection\'s key is agent "rack2"'
            in impostor.text()), impostor.text()[-2000:]
    impostor.stop()
    squatter = start_agent(world, "rack2")  # its own name, rack1's devices (the same config)
    wait_for(lambda: "refused registration" in squatter.text(), 10, "the squatter to be refused")
    assert 'device "device1" is already registered by agent "rack1" (online)' in squatter.text()
    squatter.stop()
    rack1_keeps_its_devices(world)

    # offline, a device still stays with its agent's key
    owner = RawAgent(world, "rack3")
    assert isinstance(owner.register("rack3", ["spare1"]), p.Registered)
    owner.close()
    wait_for(lambda: not listing(world)["spare1"].online, 10, "rack3 to go offline")
    thief = RawAgent(world, "rack2")
    refused = thief.register("rack2", ["spare1", "spare2"])
    assert isinstance(refused, p.Refused) and refused.code == p.Code.PERMISSION_DENIED, refused
    assert refused.message == ('device "spare1" is registered by agent "rack3" (offline): with security on, only '
                               'the key of agent "rack3" may register it (or "zdut forget rack3" once it is offline)')
    assert listing(world)["spare1"].agent == "rack3"
    thief.close()
    rack1_keeps_its_devices(world)


def test_unlock_force_is_for_the_brokers_admins(world: World) -> None:
    bob, carol, alice = world.client("bob"), world.client("carol"), world.client("alice")
    assert request(bob, p.Lock(1, p.VERSION, "bob", "device3", 0), p.LockResult) is not None
    err = request(carol, p.Unlock(2, p.VERSION, "carol", "device3", False), p.Error)
    assert err is not None and err.code == p.Code.PERMISSION_DENIED and 'locked by "bob"' in err.message, err
    err = request(carol, p.Unlock(3, p.VERSION, "carol", "device3", True), p.Error)
    assert err is not None and err.code == p.Code.PERMISSION_DENIED, err
    assert err.message == ('unlock force refused: user "carol" is not an admin of this broker '
                           f"(the admins are listed in {world.keys / 'admins'})")
    assert listing(world)["device3"].lock is not None
    done = request(alice, p.Unlock(4, p.VERSION, "alice", "device3", True), p.Unlocked)
    assert done is not None and done.broke == "bob", done
    assert listing(world)["device3"].lock is None


def test_forget_is_for_the_brokers_admins(world: World) -> None:
    """Forgetting an offline agent frees its device names for another agent key: an admin's call."""
    carol, alice = world.client("carol"), world.client("alice")
    err = request(carol, p.Forget(1, p.VERSION, "carol", "nosuch"), p.Error)
    assert err is not None and err.code == p.Code.PERMISSION_DENIED, err
    assert err.message.startswith('forget refused: user "carol" is not an admin of this broker'), err
    err = request(alice, p.Forget(2, p.VERSION, "alice", "nosuch"), p.Error)  # let through, to the broker's answer
    assert err is not None and err.code != p.Code.PERMISSION_DENIED, err


# ---------------------------------------------------------------- keys added and removed at runtime


def test_a_key_added_at_runtime_gets_in_within_5s(world: World) -> None:
    assert request(world.client("dave"), p.ListDevices(1, p.VERSION, "dave"), object, SILENCE_S) is None
    shutil.copy(world.tmp / "cli" / "dave.key", world.keys / "users")
    added = time.monotonic()
    got = None
    while got is None and time.monotonic() - added < 5.0:  # a refused DEALER may not retry: a fresh one each try
        got = request(world.client("dave"), p.ListDevices(2, p.VERSION, "dave"), p.DeviceList, 0.5)
    assert got is not None, "an added key was not let in within 5s"
    print(f"dave got in {time.monotonic() - added:.2f}s after his key was added")


def test_a_removed_user_key_ends_its_session_within_5s(world: World) -> None:
    erin = world.client("erin")
    erin.send(p.encode(p.RunOpen(9, p.VERSION, "erin", "device2", "repeat", [])))
    assert reply(erin, p.RunStarted) is not None
    seqs = itertools.count(1)
    assert reply(erin, p.Done, 1.0, 9, seqs) is None  # the console runs on while erin's key is there
    os.remove(world.keys / "users" / "erin.key")
    removed = time.monotonic()
    done = reply(erin, p.Done, 5.0, 9, seqs)
    assert done is not None, world.broker.text()[-2000:]
    print(f"Done {time.monotonic() - removed:.2f}s after the key went: {done.message}")
    assert done.code == p.Code.PERMISSION_DENIED, done
    assert done.message == f'the key of user "erin" was removed from {world.keys / "users"}: session ended'
    wait_for(lambda: "run ended device=device2 command=repeat user=erin: Unavailable: module execution aborted: "
             "client unreachable" in world.agent.text(), 3, "the agent to cancel erin's run")  # SessionGone, not 4 s
    err = request(erin, p.ListDevices(10, p.VERSION, "erin"), p.Error)
    assert err is not None and err.code == p.Code.PERMISSION_DENIED, err
    assert err.message == f"this connection's key was removed from {world.keys}: connect with a key it lists"
    assert request(world.client("erin"), p.ListDevices(11, p.VERSION, "erin"), object, SILENCE_S) is None


def test_a_removed_agent_key_takes_that_agent_offline_within_5s(world: World) -> None:
    rack4 = RawAgent(world, "rack4")
    assert isinstance(rack4.register("rack4", ["bench4"]), p.Registered)
    os.remove(world.keys / "agents" / "rack4.key")
    removed = time.monotonic()
    wait_for(lambda: rack4.heartbeat() or not listing(world)["bench4"].online, 5, "rack4's device to go offline")
    print(f"rack4 offline {time.monotonic() - removed:.2f}s after its key went")
    refused = rack4.register("rack4", ["bench4"])  # on its old connection
    assert isinstance(refused, p.Refused) and refused.code == p.Code.PERMISSION_DENIED, refused
    assert lines(world.broker, 'key of agent "rack4" removed: it goes offline, its connection refused') == 1
    rack4.close()
