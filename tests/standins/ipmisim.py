"""Run ``ipmi_sim`` (Debian package ``openipmi``) as a BMC on a free loopback UDP port.

The configuration in ``ipmi_sim/`` is copied into a temporary folder per
simulator; its ``chassis.sh`` keeps the power state in the file ``power`` and
logs every change to ``log``.  User ``ipmiusr`` / ``test`` has admin rights.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import IO

HERE = Path(__file__).parent / "ipmi_sim"
USER, PASSWORD = "ipmiusr", "test"


def missing_tools() -> str | None:
    """Why the simulator cannot run here, or None."""
    for tool, package in (("ipmi_sim", "openipmi"), ("ipmitool", "ipmitool")):
        if shutil.which(tool) is None:
            return f"{tool} not installed (apt-get install {package})"
    return None


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _udp_bound(port: int) -> bool:
    """True once some process listens on 127.0.0.1:port (read from /proc/net/udp)."""
    wanted = f"0100007F:{port:04X}"
    try:
        lines = Path("/proc/net/udp").read_text().splitlines()[1:]
    except OSError:
        return False
    return any(line.split()[1] == wanted for line in lines if len(line.split()) > 1)


class IPMISim:
    def __init__(self, workdir: Path) -> None:
        self.dir = workdir / "bmc"
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._out: IO[bytes] | None = None

    @property
    def power(self) -> int:
        """The simulated chassis power: 1 on, 0 off."""
        path = self.dir / "power"
        return int(path.read_text().strip() or 0) if path.exists() else 0

    @property
    def log(self) -> list[str]:
        """Every chassis change the BMC performed, e.g. ["power 1", "power 0", "power 1"]."""
        path = self.dir / "log"
        return path.read_text().split("\n")[:-1] if path.exists() else []

    def __enter__(self) -> IPMISim:
        shutil.copytree(HERE, self.dir)
        (self.dir / "chassis.sh").chmod(0o755)
        (self.dir / "state").mkdir()
        self.port = _free_udp_port()
        conf = (self.dir / "lan.conf.in").read_text().replace("@DIR@", str(self.dir)).replace("@PORT@", str(self.port))
        (self.dir / "lan.conf").write_text(conf)
        self._out = open(self.dir / "sim.out", "wb")
        self._proc = subprocess.Popen(
            ["ipmi_sim", "-c", "lan.conf", "-f", "sim.emu", "-n", "-s", str(self.dir / "state")],
            cwd=self.dir,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while not _udp_bound(self.port):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                out = (self.dir / "sim.out").read_text(errors="replace")
                self.__exit__()
                raise RuntimeError(f"ipmi_sim did not start listening on UDP {self.port}: {out}")
            time.sleep(0.02)  # polling a condition with a deadline, not a fixed wait
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._out is not None:
            self._out.close()
            self._out = None


#: A fake ipmitool for the retry tests: appends "<argv> | IPMI_PASSWORD=<env>" to
#: $FAKE_DIR/calls, fails (exit 1, an ipmitool-like message) while fewer than
#: $FAIL_TIMES calls were made, then answers like a BMC whose power is off.
FAKE_IPMITOOL = """\
#!/bin/sh
echo "$* | IPMI_PASSWORD=$IPMI_PASSWORD" >> "$FAKE_DIR/calls"
n=$(wc -l < "$FAKE_DIR/calls")
if [ "$n" -le "${FAIL_TIMES:-0}" ]; then
  echo "Error: Unable to establish IPMI v2 / RMCP+ session" >&2
  exit 1
fi
echo "Chassis Power is off"
"""


def install_fake_ipmitool(bin_dir: Path) -> Path:
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / "ipmitool"
    path.write_text(FAKE_IPMITOOL)
    path.chmod(0o755)
    return path
