"""The ssh module against a real sshd on a loopback port."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from modhelpers import alive, make_module, until

from zdut.devices.base import ModuleError
from zdut.devices.ssh import SSH, parse_hostkey
from zdut.devices.testing import LocalSession

try:
    from standins import sshd
except ImportError:  # tests/ imported as a package
    from tests.standins import sshd


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sshd.SSHServer]:
    reason = sshd.missing()
    if reason:
        pytest.skip(reason)
    srv = sshd.SSHServer(tmp_path_factory.mktemp("sshd")).start()
    yield srv
    srv.stop()


async def make(**with_: object) -> SSH:
    return await make_module(SSH, **with_)


def run_cmd(with_: dict[str, object], command: str) -> LocalSession:
    async def main() -> LocalSession:
        mod = await make(**with_)
        session = LocalSession()
        try:
            await mod.run(session, [command])
        finally:
            await mod.deinit()
        return session

    return asyncio.run(main())


def test_output_streams_as_it_arrives(server: sshd.SSHServer, tmp_path: Path) -> None:
    flag = tmp_path / "go-on"
    command = f"echo first; while [ ! -e {flag} ]; do sleep 0.02; done; echo second"

    async def main() -> LocalSession:
        mod = await make(**server.options())
        session = LocalSession()
        task = asyncio.create_task(mod.run(session, [command]))
        await until(lambda: b"first\n" in session.out or task.done(), "the first line", 10)
        assert not task.done(), "the command finished before its first line was seen"
        assert b"second" not in session.out
        flag.touch()
        await task
        return session

    session = asyncio.run(main())
    assert bytes(session.out) == b"first\nsecond\n"  # CR LF from the terminal turned back into LF


def test_exit_status_is_reported(server: sshd.SSHServer) -> None:
    session = LocalSession()

    async def main() -> None:
        mod = await make(**server.options())
        await mod.run(session, ["echo out; echo err >&2; exit 3"])

    with pytest.raises(ModuleError) as err:
        asyncio.run(main())
    assert err.value.message == "failed to execute command: Process exited with status 3"
    assert b"out\n" in session.out and b"err\n" in session.out  # combined, as dutctl's CombinedOutput


def test_host_key_verification(server: sshd.SSHServer, tmp_path: Path) -> None:
    # The right key, as authorized_keys text and as a bare base64 blob.
    assert run_cmd(server.options(hostkey=server.host_pub), "echo ok").out == b"ok\n"
    blob = server.host_pub.split()[1]
    assert run_cmd(server.options(hostkey=blob), "echo ok").out == b"ok\n"
    # A different key must be refused before anything runs.
    other = sshd.keygen(tmp_path / "impostor")
    marker = tmp_path / "ran"
    with pytest.raises(ModuleError) as err:
        run_cmd(server.options(hostkey=other), f"touch {marker}")
    assert err.value.message.startswith("failed to dial SSH server: ")
    assert "Host key verification failed" in err.value.message
    assert not marker.exists()


def test_cancel_kills_the_remote_command(server: sshd.SSHServer, tmp_path: Path) -> None:
    pidfile = tmp_path / "remote.pid"

    async def main() -> int:
        mod = await make(**server.options())
        session = LocalSession()
        task = asyncio.create_task(
            mod.run(session, [f"echo $$ > {pidfile}.tmp; mv {pidfile}.tmp {pidfile}; exec sleep 300"])
        )
        await until(lambda: pidfile.exists() or task.done(), "the remote pid file", 10)
        assert not task.done()
        pid = int(pidfile.read_text())
        assert alive(pid)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await until(lambda: not alive(pid), "the remote command to die", 10)
        return pid

    asyncio.run(main())


def test_connection_refused(server: sshd.SSHServer) -> None:
    port = sshd.free_port()
    with pytest.raises(ModuleError) as err:
        run_cmd(server.options(port=port), "true")
    assert err.value.message.startswith("failed to dial SSH server: ")
    assert "Connection refused" in err.value.message


def test_password_uses_sshpass(server: sshd.SSHServer) -> None:
    if shutil.which("sshpass") is None:
        pytest.skip("needs sshpass (apt-get install sshpass)")
    opts = server.options(password="not-the-password")
    del opts["privatekey"]
    with pytest.raises(ModuleError) as err:
        run_cmd(opts, "true")
    assert err.value.message.startswith("failed to dial SSH server: ")


# ---------------------------------------------------------------- init and command line (no server needed)


def test_missing_ssh_client_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ModuleError) as err:
        asyncio.run(make(host="dut", privatekey="/nonexistent"))
    assert "'ssh' is not on PATH" in err.value.message
    assert "apt-get install openssh-client" in err.value.message


def test_missing_sshpass_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    ssh = shutil.which("ssh")
    if ssh is None:
        pytest.skip("needs the OpenSSH client (apt-get install openssh-client)")
    os.symlink(ssh, tmp_path / "ssh")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ModuleError) as err:
        asyncio.run(make(host="dut", password="secret"))
    assert "apt-get install sshpass" in err.value.message


@pytest.fixture
def fake_ssh_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A PATH with stub ssh/sshpass, so init checks run without OpenSSH installed."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in ("ssh", "sshpass"):
        (bindir / name).write_text("#!/bin/sh\nexit 0\n")
        (bindir / name).chmod(0o755)
    monkeypatch.setenv("PATH", str(bindir))
    return tmp_path


@pytest.mark.parametrize(
    ("with_", "message"),
    [
        ({"privatekey": "/k"}, "host is required"),
        ({"host": "dut"}, "unable to authenticate, either password or private key must be configured"),
        ({"host": "dut", "privatekey": "/nonexistent/key"}, "failed to read private key: No such file or directory"),
        ({"host": "dut", "password": "x", "hostkey": "not a key"}, "failed to parse host key: "),
        ({"host": "-oProxyCommand=x", "password": "x"}, "invalid host "),
    ],
)
def test_init_errors(fake_ssh_path: Path, with_: dict[str, object], message: str) -> None:
    with pytest.raises(ModuleError) as err:
        asyncio.run(make(**with_))
    assert err.value.message.startswith(message)


def test_private_key_permissions_are_checked(fake_ssh_path: Path) -> None:
    key = fake_ssh_path / "id_test"
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    key.chmod(0o644)
    with pytest.raises(ModuleError, match=r"accessible by others \(mode 0644\).*chmod 600"):
        asyncio.run(make(host="dut", privatekey=str(key)))
    key.chmod(0o600)
    asyncio.run(make(host="dut", privatekey=str(key)))


def test_command_line(fake_ssh_path: Path) -> None:
    key = fake_ssh_path / "id_test"
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    key.chmod(0o600)
    pub = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHhDBbqxD4wVGlP5prkfE3h5A3ePM2Umh+x3ZItjP4ms host"

    async def main() -> tuple[list[str], list[str], str]:
        with_key = await make(host="dut", port=2222, user="oscar", privatekey=str(key), hostkey=pub)
        with_password = await make(host="dut", password="secret")
        assert with_key._known_hosts is not None
        known = Path(with_key._known_hosts).read_text()
        argv = with_key.argv("-V; ls"), with_password.argv("uptime")
        await with_key.deinit()
        assert not os.path.exists(with_key._known_hosts or "/nonexistent")
        return *argv, known

    key_argv, pw_argv, known = asyncio.run(main())
    assert key_argv[-3:] == ["--", "dut", "-V; ls"]
    assert ["-p", "2222", "-l", "oscar"] == key_argv[key_argv.index("-p") : key_argv.index("-p") + 4]
    assert "StrictHostKeyChecking=yes" in key_argv and "HostKeyAlgorithms=ssh-ed25519" in key_argv
    assert f"IdentityFile={key}" in key_argv and "BatchMode=yes" in key_argv
    assert known == "zdut-dut ssh-ed25519 " + pub.split()[1] + "\n"
    assert pw_argv[:3] == ["sshpass", "-e", "ssh"]
    assert "secret" not in " ".join(pw_argv)
    assert "StrictHostKeyChecking=no" in pw_argv and "UserKnownHostsFile=/dev/null" in pw_argv


def test_parse_hostkey_forms() -> None:
    blob = "AAAAC3NzaC1lZDI1NTE5AAAAIHhDBbqxD4wVGlP5prkfE3h5A3ePM2Umh+x3ZItjP4ms"
    assert parse_hostkey(f"ssh-ed25519 {blob} comment") == ("ssh-ed25519", blob)
    assert parse_hostkey(blob) == ("ssh-ed25519", blob)
    assert parse_hostkey(f"[dut]:2222 ssh-ed25519 {blob}") == ("ssh-ed25519", blob)
    with pytest.raises(ModuleError):
        parse_hostkey("ssh-ed25519 bm90IGEga2V5")
