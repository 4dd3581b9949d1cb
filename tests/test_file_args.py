"""A client sends or accepts file data only for the arguments the command's modules declare as file paths
(issue 12, point 4): ``Module.file_args`` names them, the agent lists them in ``RunStarted.files`` for the
run, and the client refuses every other path, even one the user typed.

The hostile agents are raw ROUTER sockets speaking zdut.protocol that the real ``zdut`` CLI connects to
directly; the honest ones are real agents (directly and through a broker).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq

from conftest import Lab, free_port
from zdut import protocol as p
from zdut.devices.dummy import FT_SUFFIX

VICTIM = b"the user's own file\n"
NOT_DECLARED = "the command's module does not declare it as a file argument"


class FakeAgent:
    """A hostile agent: answers Hello, and a RunOpen with ``script(sid)``, a list of (header bytes, payload)
    with the session's seq numbers already in them.  It then collects what the client sends until the client
    aborts a transfer or finishes an upload (or a second passes), and ends the run with Done."""

    def __init__(self, ctx: zmq.Context[Any], script: Callable[[int], list[tuple[bytes, bytes | None]]]) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.addr = f"127.0.0.1:{free_port()}"
        self.sock.bind(f"tcp://{self.addr}")
        self.script = script
        self.got: list[p.Message] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        sid = seq = 0
        peer = b""
        while self.sock.poll(10_000):
            peer, header, *_ = self.sock.recv_multipart()
            msg = p.decode(header)
            if isinstance(msg, p.Hello):
                self.sock.send_multipart([peer, p.encode(p.Welcome(msg.rid, p.VERSION, "agent", "fake"))])
            elif isinstance(msg, p.RunOpen):
                sid = msg.sid
                for frames in self.script(sid):
                    self.sock.send_multipart([peer, *[f for f in frames if f is not None]])
                    seq += 1
                break
        code, text = p.Code.OK, ""
        while self.sock.poll(1000):
            _, header, *_ = self.sock.recv_multipart()
            msg = p.decode(header)
            self.got.append(msg)
            if isinstance(msg, p.FileAbort):
                code, text = msg.code, f"module failed: {msg.message}"
                break
            if isinstance(msg, p.FileEnd):
                break
        self.sock.send_multipart([peer, p.encode(p.Done(sid, seq + 1, code, text))])

    def close(self) -> None:
        self.thread.join(15)
        self.sock.close(0)


@pytest.fixture
def fake(ctx: zmq.Context[Any]) -> Iterator[Callable[..., FakeAgent]]:
    agents: list[FakeAgent] = []

    def start(script: Callable[[int], list[tuple[bytes, bytes | None]]]) -> FakeAgent:
        agents.append(FakeAgent(ctx, script))
        return agents[-1]

    yield start
    for agent in agents:
        agent.close()


def started(sid: int, files: dict[str, str] | None) -> bytes:
    """RunStarted declaring ``files``; None: as an agent from before the field sends it (no trailing field)."""
    return msgspec.msgpack.encode(["started", sid, 1, False] + ([] if files is None else [files]))


def download(sid: int, files: dict[str, str] | None, path: str, data: bytes = b"owned\n") -> list[Any]:
    return [(started(sid, files), None), (p.encode(p.FileOpen(sid, 2, 1, path, len(data))), None),
            (p.encode(p.FileChunk(sid, 3, 1, 0)), data),
            (p.encode(p.FileEnd(sid, 4, 1, hashlib.sha256(data).digest())), None)]


def upload(sid: int, files: dict[str, str] | None, path: str) -> list[Any]:
    return [(started(sid, files), None), (p.encode(p.FileRequest(sid, 2, 1, path)), None)]


@pytest.fixture
def victim(lab: Lab) -> Path:
    path = lab.tmp / "victim.txt"
    path.write_bytes(VICTIM)
    return path


# ------------------------------------------------------------------ hostile agents


@pytest.mark.parametrize("files", [{}, None, {"victim.txt": "send"}, {"other.txt": "receive"}],
                         ids=["none-declared", "no-field", "declared-for-sending", "another-file"])
def test_a_download_to_a_typed_but_undeclared_argument_is_refused(lab: Lab, fake: Callable[..., FakeAgent],
                                                                  victim: Path, files: dict[str, str] | None) -> None:
    """`zdut DEV status victim.txt` must not let the agent overwrite victim.txt."""
    agent = fake(lambda sid: download(sid, files, "victim.txt"))
    r = lab.zdut("-s", agent.addr, "dev", "status", "victim.txt")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert f'refusing to write "victim.txt": {NOT_DECLARED} to download' in r.stderr
    assert victim.read_bytes() == VICTIM
    assert sorted(f.name for f in lab.tmp.iterdir() if f.name.startswith(".victim")) == []  # no temp file


@pytest.mark.parametrize("name", ["-", "/dev/stdout"])
def test_a_download_to_stdout_needs_a_declaration_too(lab: Lab, fake: Callable[..., FakeAgent], name: str) -> None:
    agent = fake(lambda sid: download(sid, {}, name, b"INJECTED\n"))
    r = lab.zdut("-s", agent.addr, "dev", "status", name)
    assert r.returncode == 1 and "INJECTED" not in r.stdout, (r.stdout, r.stderr)
    assert f'refusing to write "{name}": {NOT_DECLARED}' in r.stderr


@pytest.mark.parametrize("files", [{}, None, {"victim.txt": "receive"}],
                         ids=["none-declared", "no-field", "declared-for-receiving"])
def test_an_upload_of_a_typed_but_undeclared_argument_is_refused(lab: Lab, fake: Callable[..., FakeAgent],
                                                                 victim: Path, files: dict[str, str] | None) -> None:
    """`zdut DEV status victim.txt` must not let the agent read victim.txt: not one byte of it goes out."""
    agent = fake(lambda sid: upload(sid, files, "victim.txt"))
    r = lab.zdut("-s", agent.addr, "dev", "status", "victim.txt")
    agent.close()
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert f'refusing to send "victim.txt": {NOT_DECLARED} to upload' in r.stderr
    assert [type(m) for m in agent.got if isinstance(m, p.FileOpen | p.FileChunk | p.FileEnd | p.FileAbort)] \
        == [p.FileAbort]


def test_a_declared_path_is_transferred_and_only_in_its_direction(lab: Lab, fake: Callable[..., FakeAgent],
                                                                  victim: Path) -> None:
    """The normal case against the same fake: what RunStarted declares moves, with ./ and the like normalised."""
    agent = fake(lambda sid: upload(sid, {"./victim.txt": "both"}, "victim.txt"))
    r = lab.zdut("-s", agent.addr, "dev", "put", "victim.txt")
    agent.close()
    assert r.returncode == 0, r.stderr
    chunks = [m for m in agent.got if isinstance(m, p.FileChunk)]
    assert len(chunks) == 1 and [type(m) for m in agent.got if isinstance(m, p.FileEnd)] == [p.FileEnd]
    agent = fake(lambda sid: download(sid, {"out.txt": "receive"}, "out.txt", b"fresh\n"))
    r = lab.zdut("-s", agent.addr, "dev", "get", "out.txt")
    assert r.returncode == 0, r.stderr
    assert (lab.tmp / "out.txt").read_bytes() == b"fresh\n"


# ------------------------------------------------------------------ honest agents

CONFIG = """version: 0.1.0
devices:
  box:
    cmds:
      ft:
        uses:
          - module: dummy-ft
            passthrough: true
      templated:
        args:
          - {name: src, desc: the client's input}
          - {name: dst, desc: the client's output}
        uses:
          - module: dummy-ft
            args: ["${src}", "${dst}"]
      half-static:
        args:
          - {name: src, desc: the client's input}
        uses:
          - module: dummy-ft
            args: ["${src}", "victim.txt"]
      status:
        uses:
          - module: dummy-status
            passthrough: true
      put:
        uses:
          - module: file
            passthrough: true
            with: {operation: upload}
      get:
        uses:
          - module: file
            passthrough: true
            with: {operation: download}
      fetch:
        uses:
          - module: file
            passthrough: true
            with: {operation: download, source: agent-side.txt}
"""


@pytest.fixture
def honest(lab: Lab) -> str:
    cfg = lab.tmp / "files.yaml"
    cfg.write_text(CONFIG)
    (lab.tmp / "agent").mkdir()
    _, addr = lab.agent(cfg)
    return addr


def run_started(ctx: zmq.Context[Any], addr: str, command: str, args: list[str]) -> p.RunStarted:
    """The RunStarted a real agent sends for ``box COMMAND ARGS``, read by a raw client."""
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(f"tcp://{addr}")
    try:
        sock.send(p.encode(p.RunOpen(1, p.VERSION, "tester", "box", command, args)))
        while sock.poll(5000):
            msg = p.decode(sock.recv_multipart()[0])
            if isinstance(msg, p.RunStarted):
                return msg
            assert not isinstance(msg, p.Done), msg
        raise AssertionError("no RunStarted")
    finally:
        sock.close(0)


@pytest.mark.parametrize(("command", "args", "files"), [
    ("ft", ["in.bin", "out.bin"], {"in.bin": "send", "out.bin": "receive"}),
    ("ft", ["same.bin", "same.bin"], {"same.bin": "both"}),
    ("templated", ["in.bin", "out.bin"], {"in.bin": "send", "out.bin": "receive"}),
    ("half-static", ["in.bin"], {"in.bin": "send"}),  # the static victim.txt is not the user's to offer
    ("status", ["victim.txt"], {}),
    ("put", ["local.txt:remote.txt"], {"local.txt": "send"}),
    ("get", ["remote.txt:local.txt"], {"local.txt": "receive"}),
    ("get", ["logs/today.txt"], {"today.txt": "receive"}),
    ("fetch", ["mine.txt"], {"mine.txt": "receive"}),
])
def test_the_agent_declares_the_runs_file_arguments(honest: str, ctx: zmq.Context[Any], command: str,
                                                    args: list[str], files: dict[str, str]) -> None:
    assert run_started(ctx, honest, command, args).files == files


def test_a_config_that_fixes_the_clients_path_gets_no_file(lab: Lab, honest: str, victim: Path) -> None:
    (lab.tmp / "in.bin").write_bytes(b"input")
    r = lab.zdut("-s", honest, "box", "half-static", "in.bin")
    assert r.returncode == 1
    assert f'refusing to write "victim.txt": {NOT_DECLARED} to download' in r.stderr
    assert victim.read_bytes() == VICTIM


def test_dummy_ft_works_directly_through_a_broker_and_templated(lab: Lab, honest: str, tmp_path: Path) -> None:
    _, broker = lab.broker()
    lab.brokered_agent(lab.tmp / "files.yaml", broker)
    (lab.tmp / "in.bin").write_bytes(b"input")
    for addr, command, out in [(honest, "ft", "a.bin"), (broker, "ft", "b.bin"), (broker, "templated", "c.bin"),
                               (honest, "ft", "-")]:
        r = lab.zdut("-s", addr, "box", command, "in.bin", out)
        assert r.returncode == 0, r.stderr
        if out == "-":
            assert "input" + FT_SUFFIX.decode() in r.stdout
        else:
            assert (lab.tmp / out).read_bytes() == b"input" + FT_SUFFIX


def test_the_file_module_uploads_and_downloads(lab: Lab, honest: str) -> None:
    """The agent runs in lab.tmp: its side of each copy lands there too, under the names the module chose."""
    (lab.tmp / "local.txt").write_bytes(b"payload")
    r = lab.zdut("-s", honest, "box", "put", "local.txt:agent/remote.txt")
    assert r.returncode == 0, r.stderr
    assert (lab.tmp / "agent" / "remote.txt").read_bytes() == b"payload"
    client = lab.tmp / "client"
    client.mkdir()
    r = lab.zdut("-s", honest, "box", "get", "agent/remote.txt:back.txt", cwd=client)
    assert r.returncode == 0, r.stderr
    assert (client / "back.txt").read_bytes() == b"payload"
    r = lab.zdut("-s", honest, "box", "get", str(lab.tmp / "agent" / "remote.txt"), cwd=client)
    assert r.returncode == 0, r.stderr  # without DST the file keeps its base name
    assert (client / "remote.txt").read_bytes() == b"payload"
