"""The ssh module: run one command on the DUT through the system OpenSSH client.

No SSH library: the agent host's ``ssh`` (and ``sshpass`` for passwords) run as
a child in its own process group, with every option on the command line
(``-F /dev/null``) so that no user or system ssh config changes behaviour.

The command runs on a pseudo-terminal (``ssh -tt``): when a run is cancelled
the local ssh dies, sshd hangs up the terminal and the kernel's SIGHUP ends the
remote command too; without a terminal it would keep running on the DUT.  A
terminal merges stderr into stdout (dutctl combined them as well) and turns
newlines into CR LF, which the module turns back.
"""

from __future__ import annotations

import base64
import binascii
import os
import shutil
import stat
import struct

import msgspec

from zdut.devices import scratch
from zdut.devices.base import Module, ModuleError, Session
from zdut.devices.process import TailBuffer, exit_message, run_streaming
from zdut.devices.shell import TOO_MANY_ARGS

HOST_ALIAS = "zdut-dut"
CONNECT_TIMEOUT_S = 10
STDERR_TAIL = 8 * 1024
# sshpass's own exit codes (it passes ssh's through otherwise).
_SSHPASS_ERRORS = {
    5: "permission denied (wrong password?)",
    6: "host key unknown",
    7: "host key changed (possible man-in-the-middle attack)",
}


class SSHOptions(msgspec.Struct, forbid_unknown_fields=True):
    host: str = ""
    port: int = 22
    user: str = "root"
    password: str = ""
    privatekey: str = ""
    hostkey: str = ""


def parse_hostkey(text: str) -> tuple[str, str]:
    """``(key type, base64 blob)`` from ``ssh-ed25519 AAAA... [comment]``, a known_hosts line or a bare blob."""
    for token in text.split():
        try:
            blob = base64.b64decode(token, validate=True)
        except (binascii.Error, ValueError):
            continue
        if len(blob) < 4:
            continue
        (size,) = struct.unpack(">I", blob[:4])
        name = blob[4 : 4 + size]
        if 0 < size < 64 and len(name) == size and name.isascii() and name.decode().isprintable():
            return name.decode(), base64.b64encode(blob).decode()
    raise ModuleError(
        'failed to parse host key: want an OpenSSH public key ("ssh-ed25519 AAAA...", as in the host\'s '
        "/etc/ssh/ssh_host_*_key.pub or ssh-keyscan output) or its bare base64 blob"
    )


def _host_key_algorithms(key_type: str) -> str:
    # RSA keys sign with the SHA-2 algorithms; their key type name alone would ask for SHA-1.
    if key_type == "ssh-rsa":
        return "rsa-sha2-512,rsa-sha2-256,ssh-rsa"
    return key_type


class _CRLF:
    """Turns the terminal's CR LF back into LF, also across chunk boundaries."""

    def __init__(self) -> None:
        self.held_cr = False

    def feed(self, data: bytes) -> bytes:
        if self.held_cr:
            data = b"\r" + data
        self.held_cr = data.endswith(b"\r")
        if self.held_cr:
            data = data[:-1]
        return data.replace(b"\r\n", b"\n")

    def flush(self) -> bytes:
        held, self.held_cr = self.held_cr, False
        return b"\r" if held else b""


class SSH(Module[SSHOptions]):
    id = "ssh"
    Options = SSHOptions

    _tmpdir: str | None = None
    _known_hosts: str | None = None
    _key_type: str = ""

    def __init__(self, options: SSHOptions) -> None:
        super().__init__(options)
        # Checked when the config loads (see ipmi), so --check-config refuses what start-up would; what needs
        # the host (ssh, sshpass, the key file) stays in init.
        if not options.host:
            raise ModuleError("host is required")
        if options.host.startswith("-"):
            raise ModuleError(f"invalid host {options.host!r}")
        if not 0 <= options.port <= 65535:
            raise ModuleError(f"invalid port {options.port}")
        if not options.password and not options.privatekey:
            raise ModuleError("unable to authenticate, either password or private key must be configured")
        self._hostkey = parse_hostkey(options.hostkey) if options.hostkey else None

    def help(self) -> str:
        opts = self.options
        return (
            "Establish a Secure Shell (SSH) connection to the DUT and execute a command.\n"
            "\nARGUMENTS:\n\t[command-string]\n\n"
            f"Host: {opts.host}, Port: {opts.port or 22}\n"
            f"User: {opts.user or 'root'}\n"
            "\nThe connection is closed after the passed command is executed.\n"
            "The command-string is passed to the remote shell as a single argument.\n"
            'Quote the command-string if it contains spaces or special characters. E.g.: "ls -l /tmp"\n'
            "Output is streamed as it arrives; the command runs on a pseudo-terminal, so stdout and stderr\n"
            "arrive combined, and cancelling the run hangs the terminal up, which ends the remote command.\n"
            "A non-zero exit status fails the run. The ssh module is non-interactive (no stdin).\n"
            "\nwith: host (required), port (22), user (root), privatekey (path to a key file, mode 0600),\n"
            "password (needs sshpass on the agent), hostkey (the DUT's public host key, e.g. the content of\n"
            "/etc/ssh/ssh_host_ed25519_key.pub; without it any host key is accepted).\n"
            "Uses the agent's OpenSSH client (apt-get install openssh-client; sshpass for passwords).\n"
        )

    async def init(self) -> None:
        opts = self.options
        if shutil.which("ssh") is None:
            raise ModuleError(
                "the ssh module needs the OpenSSH client, but 'ssh' is not on PATH "
                "(install it: apt-get install openssh-client)"
            )
        if opts.password and shutil.which("sshpass") is None:
            raise ModuleError(
                "password authentication needs sshpass, which is not on PATH "
                "(install it: apt-get install sshpass), or configure 'privatekey' instead"
            )
        if opts.privatekey:
            self._key = self._check_key(opts.privatekey)
        if self._hostkey is not None:
            self._key_type, blob = self._hostkey
            self._tmpdir = str(scratch.mkdtemp("zdut-ssh"))  # the agent's own temp area: swept after a crash
            self._known_hosts = os.path.join(self._tmpdir, "known_hosts")
            with open(self._known_hosts, "w") as fh:
                fh.write(f"{HOST_ALIAS} {self._key_type} {blob}\n")

    @staticmethod
    def _check_key(path: str) -> str:
        path = os.path.abspath(path)
        try:
            with open(path, "rb") as fh:
                head = fh.read(64)
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except OSError as exc:
            raise ModuleError(f"failed to read private key: {exc.strerror}: {path}") from None
        if b"PRIVATE KEY" not in head:
            raise ModuleError(f"failed to parse private key: {path} is not a PEM/OpenSSH private key file")
        if mode & 0o077:
            raise ModuleError(
                f"private key {path} is accessible by others (mode {mode:04o}) and ssh refuses such keys: "
                f"chmod 600 {path}"
            )
        return path

    async def deinit(self) -> None:
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = self._known_hosts = None

    def argv(self, command: str) -> list[str]:
        """The full ssh (or sshpass + ssh) command line for ``command``."""
        opts = self.options
        args = ["ssh", "-F", "/dev/null", "-tt", "-e", "none", "-p", str(opts.port or 22), "-l", opts.user or "root"]
        settings = {
            "BatchMode": "no" if opts.password else "yes",
            "ConnectTimeout": str(CONNECT_TIMEOUT_S),
            "ServerAliveInterval": "10",
            "ServerAliveCountMax": "3",
            "LogLevel": "ERROR",
            "IdentityAgent": "none",
            "CheckHostIP": "no",
            "UpdateHostKeys": "no",
            "GlobalKnownHostsFile": "/dev/null",
        }
        if opts.privatekey:
            settings |= {"IdentitiesOnly": "yes", "IdentityFile": self._key}
        else:
            settings["PubkeyAuthentication"] = "no"
        if opts.password:
            settings |= {
                "PreferredAuthentications": "publickey,keyboard-interactive,password"
                if opts.privatekey
                else "keyboard-interactive,password",
                "NumberOfPasswordPrompts": "1",
            }
        if self._known_hosts:
            settings |= {
                "StrictHostKeyChecking": "yes",
                "UserKnownHostsFile": self._known_hosts,
                "HostKeyAlias": HOST_ALIAS,
                "HostKeyAlgorithms": _host_key_algorithms(self._key_type),
            }
        else:
            # dutctl accepts any host key when none is configured.
            settings |= {"StrictHostKeyChecking": "no", "UserKnownHostsFile": "/dev/null"}
        for key, value in settings.items():
            args += ["-o", f"{key}={value}"]
        # "--" keeps a host or command starting with "-" from being read as an ssh option.
        args += ["--", opts.host, command]
        return ["sshpass", "-e", *args] if opts.password else args

    async def run(self, session: Session, args: list[str]) -> None:
        if not args:
            raise ModuleError("missing command-string")
        if len(args) > 1:
            raise ModuleError(TOO_MANY_ARGS)
        env = dict(os.environ, TERM="dumb")  # the remote terminal type: no pagers, no colours
        if self.options.password:
            env["SSHPASS"] = self.options.password  # not on the command line, where ps would show it
        crlf = _CRLF()
        received = 0
        tail = TailBuffer(STDERR_TAIL)

        async def on_stdout(data: bytes) -> None:
            nonlocal received
            received += len(data)
            if out := crlf.feed(data):
                await session.stdout(out)

        try:
            status = await run_streaming(self.argv(args[0]), on_stdout, tail, env=env)
        except FileNotFoundError as exc:
            raise ModuleError(
                f"failed to execute command: {exc.filename or 'ssh'} not found (is it installed?)"
            ) from None
        if rest := crlf.flush():
            await session.stdout(rest)
        if status != 0:
            raise ModuleError(self._failure(status, received > 0, bytes(tail.data)))

    def _failure(self, status: int, got_output: bool, stderr: bytes) -> str:
        lines = [line.strip() for line in stderr.decode(errors="replace").splitlines() if line.strip()]
        reason = lines[-1] if lines else ""
        if not got_output and self.options.password and status in _SSHPASS_ERRORS:
            return f"failed to dial SSH server: {_SSHPASS_ERRORS[status]}"
        if status == 255:
            # ssh's own failure (connect, auth, host key), reported on its stderr.
            what = "failed to execute command" if got_output else "failed to dial SSH server"
            return f"{what}: {reason or exit_message('ssh', status)}"
        if status < 0:
            return f"failed to execute command: {exit_message('ssh', status)}"
        return f"failed to execute command: Process exited with status {status}"
