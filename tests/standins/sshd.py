"""A real OpenSSH server on a free loopback port, with throw-away host and user keys.

Runs ``sshd -D -e -f <own config>`` as root (the config permits root login;
a non-root sshd cannot allocate the pseudo-terminal the module asks for).
Needs the openssh-server package; callers skip when ``missing()`` says why it
cannot run.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd")


def find_sshd() -> str | None:
    found = shutil.which("sshd")
    if found:
        return found
    return next((p for p in SSHD_CANDIDATES if os.access(p, os.X_OK)), None)


def missing() -> str | None:
    """Why the stand-in cannot run here, or None."""
    if shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        return "needs the OpenSSH client (apt-get install openssh-client)"
    if find_sshd() is None:
        return "needs sshd (apt-get install openssh-server)"
    if os.geteuid() != 0:
        # A non-root sshd cannot hand out pseudo-terminals (it fails to chown the pty), which the module uses.
        return "the sshd stand-in must run as root"
    return None


def keygen(path: Path, kind: str = "ed25519") -> str:
    """Create a key pair at ``path``; return the public key line."""
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", "zdut-test", "-f", str(path)], check=True)
    return Path(f"{path}.pub").read_text().strip()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class SSHServer:
    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.port = free_port()
        self.user = getpass.getuser()
        self.host_pub = keygen(workdir / "host_key")
        self.user_pub = keygen(workdir / "user_key")
        self.user_key = workdir / "user_key"
        (workdir / "authorized_keys").write_text(self.user_pub + "\n")
        self.log = workdir / "sshd.log"
        self.config = workdir / "sshd_config"
        self.config.write_text(
            f"Port {self.port}\n"
            "ListenAddress 127.0.0.1\n"
            f"HostKey {workdir / 'host_key'}\n"
            f"AuthorizedKeysFile {workdir / 'authorized_keys'}\n"
            "PidFile none\n"
            "PermitRootLogin yes\n"
            "PasswordAuthentication yes\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            "StrictModes no\n"
            "PrintMotd no\n"
            "PrintLastLog no\n"
            "LogLevel VERBOSE\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> SSHServer:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # root's sshd wants its privilege-separation directory
        sshd = find_sshd()
        assert sshd is not None
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(self.config)], stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"sshd did not start: {self.log.read_text()}")
            time.sleep(0.02)
        return self

    def _ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                return sock.recv(8).startswith(b"SSH-")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def options(self, **extra: object) -> dict[str, object]:
        """``with:`` keys for the ssh module pointing at this server."""
        return {"host": "127.0.0.1", "port": self.port, "user": self.user, "privatekey": str(self.user_key), **extra}
