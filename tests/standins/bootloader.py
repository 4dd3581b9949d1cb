"""A simulated U-Boot-like board on the far end of a pseudo-terminal.

The module under test opens ``board.path`` (the pty's slave side) like any
serial port; the board thread owns the master side.  It echoes what it
receives, like a real boot loader, and understands a handful of commands.

States: ``boot`` (banner, then an autoboot countdown that any key stops),
``uboot`` (prompt ``=> ``) and ``linux`` (after ``boot``: kernel lines, then a
``login:`` prompt and a ``# `` shell whose ``reboot`` restarts the board).
"""

from __future__ import annotations

import os
import select
import threading
import time
import tty

BANNER = b"\r\nU-Boot 2024.01-zdut (Simulated Board)\r\n\r\nDRAM:  1 GiB\r\nMMC:   mmc@7e202000: 0\r\n"
VERSION = b"U-Boot 2024.01-zdut (Simulated Board)\r\naarch64-linux-gnu-gcc 12.2.0\r\n"
PROMPT = b"=> "
#: Output of the ``color`` command: SGR colour, a cursor move, an OSC title and a DCS string around plain text.
COLOR = b"\x1b[1;32mgreen\x1b[0m \x1b[2A\x1b]0;board title\x07plain \x1bP1$r0m\x1b\\text\r\n"


def serial_device(name: str, port: str, more_commands: str = "") -> str:
    """An agent config's entry for device ``name``: a passthrough ``serial`` command on ``port``, then
    ``more_commands`` (YAML at the commands' indentation)."""
    return (f"  {name}:\n    cmds:\n      serial:\n        uses:\n          - module: serial\n"
            f"            passthrough: true\n            with: {{port: {port}}}\n{more_commands}")


class Bootloader:
    def __init__(self, autoboot: int = 0, tick: float = 0.1, link: str | None = None) -> None:
        """``link``: a symlink to keep pointing at the pty, as udev keeps /dev/serial/by-id/... pointing at
        a USB adapter (``unplug`` removes it, ``replug`` makes it again for a new pty); ``path`` is then it."""
        self.autoboot = autoboot  # countdown seconds (ticks); 0 = stop at the prompt at once
        self.tick = tick
        self.link = link
        self.master, self.slave = self._plug()
        self.path = link or os.ttyname(self.slave)
        self.received = bytearray()
        self.sent = bytearray()
        self.state = "uboot"  # powered on long ago, sitting at the prompt
        self._line = bytearray()
        self._countdown = 0
        self._next_tick = 0.0
        self._cond = threading.Condition()
        self._wake_r, self._wake_w = os.pipe()
        self._actions: list[str] = []
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="bootloader", daemon=True)

    def _plug(self) -> tuple[int, int]:
        master, slave = os.openpty()
        tty.setraw(master)
        tty.setraw(slave)  # the module's pyserial reconfigures the slave too
        if self.link is not None:
            os.symlink(os.ttyname(slave), self.link)
        return master, slave

    # -- control from the test
    def unplug(self) -> None:
        """Pull the USB adapter: the pty's master side closes (its reader gets EIO) and the link goes away."""
        assert self.link is not None, "unplug needs a link"
        self._post("unplug")
        with self._cond:
            self._cond.wait_for(lambda: self.master < 0, 5)

    def replug(self) -> None:
        """Plug it back in: a new pty, the link pointing at it."""
        self._post("replug")
        with self._cond:
            self._cond.wait_for(lambda: self.master >= 0, 5)

    def start(self) -> Bootloader:
        self._thread.start()
        return self

    def reset(self) -> None:
        """Press the board's reset button: banner and autoboot start again."""
        self._post("reset")

    def say(self, data: bytes) -> None:
        """Make the board print ``data`` unprompted."""
        self._post("say:" + data.hex())

    def flood(self, total: int, marker: bytes) -> None:
        """Make the board print ``total`` bytes of kernel-log lines as fast as the pty takes them, then ``marker``.

        Unlike everything else the board prints, the flood is not kept in ``sent``."""
        self._post(f"flood:{total}:{marker.hex()}")

    def close(self) -> None:
        self._stop = True
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=5)
        for fd in (self.master, self.slave, self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        if self.link is not None and os.path.islink(self.link):
            os.unlink(self.link)

    def wait_received(self, needle: bytes, timeout: float = 5.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: needle in self.received, timeout)

    def wait_state(self, state: str, timeout: float = 5.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.state == state, timeout)

    def _post(self, action: str) -> None:
        with self._cond:
            self._actions.append(action)
        os.write(self._wake_w, b"x")

    # -- the board
    def _out(self, data: bytes) -> None:
        self.sent += data
        self._write(data)

    def _write(self, data: bytes) -> None:
        if self.master < 0:
            return  # printed while the adapter is unplugged: nobody can see it
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.master, view) :]
            except BlockingIOError:
                select.select([], [self.master], [], 0.1)

    def _set_state(self, state: str) -> None:
        with self._cond:
            self.state = state
            self._cond.notify_all()

    def _power_on(self) -> None:
        self._line.clear()
        self._out(BANNER)
        if self.autoboot:
            self._countdown = self.autoboot
            self._next_tick = time.monotonic() + self.tick
            self._out(b"Hit any key to stop autoboot: %2d " % self._countdown)
            self._set_state("boot")
        else:
            self._out(PROMPT)
            self._set_state("uboot")

    def _loop(self) -> None:
        while not self._stop:
            timeout = max(0.0, self._next_tick - time.monotonic()) if self.state == "boot" else None
            ready, _, _ = select.select([fd for fd in (self.master, self._wake_r) if fd >= 0], [], [], timeout)
            if self._wake_r in ready:
                os.read(self._wake_r, 64)
                self._run_actions()
            if self.master in ready:
                try:
                    data = os.read(self.master, 4096)
                except OSError:
                    data = b""  # nobody has the slave open right now
                if data:
                    self._receive(data)
            if self.state == "boot" and time.monotonic() >= self._next_tick:
                self._tick()

    def _run_actions(self) -> None:
        with self._cond:
            actions, self._actions = self._actions, []
        for action in actions:
            if action == "reset":
                self._power_on()
            elif action == "unplug" and self.master >= 0:
                assert self.link is not None
                os.unlink(self.link)
                os.close(self.master)
                os.close(self.slave)
                with self._cond:
                    self.master = self.slave = -1
                    self._cond.notify_all()
            elif action == "replug" and self.master < 0:
                master, slave = self._plug()
                with self._cond:
                    self.master, self.slave = master, slave
                    self._cond.notify_all()
            elif action.startswith("say:"):
                self._out(bytes.fromhex(action[4:]))
            elif action.startswith("flood:"):
                _, total, marker = action.split(":")
                self._flood(int(total), bytes.fromhex(marker))

    def _flood(self, total: int, marker: bytes) -> None:
        line = b"[ 1234.567890] kernel: a chatty driver says something at 115200 baud, again and again\r\n"
        block = line * (65536 // len(line))
        for _ in range(total // len(block)):
            self._write(block)
        self._write(block[: total % len(block)] + marker)

    def _tick(self) -> None:
        self._countdown -= 1
        self._out(b"\b\b\b%2d " % self._countdown)
        if self._countdown > 0:
            self._next_tick = time.monotonic() + self.tick
        else:
            self._out(b"\r\n")
            self._boot()

    def _receive(self, data: bytes) -> None:
        with self._cond:
            self.received += data
            self._cond.notify_all()
        if self.state == "boot":
            self._out(b"\b\b\b 0 \r\n" + PROMPT)  # any key stops autoboot and is swallowed
            self._set_state("uboot")
            return
        for byte in data:
            self._key(byte)

    def _key(self, byte: int) -> None:
        if byte == 0x0A and self._line_ended_by_cr:
            self._line_ended_by_cr = False  # the LF of a CR LF
            return
        self._line_ended_by_cr = byte == 0x0D
        if byte in (0x0D, 0x0A):
            self._out(b"\r\n")
            line, self._line = bytes(self._line), bytearray()
            self._command(line.decode(errors="replace").strip())
        elif byte == 0x03:
            self._line.clear()
            self._out(b"^C\r\n" + self._prompt())
        else:
            self._line.append(byte)
            self._out(bytes([byte]))

    _line_ended_by_cr = False

    def _prompt(self) -> bytes:
        return {"uboot": PROMPT, "login": b"zdut-board login: ", "shell": b"# "}.get(self.state, b"")

    def _command(self, line: str) -> None:
        before = self.state
        if self.state == "login":
            self._set_state("shell")
            self._out(b"# ")
        elif self.state == "shell":
            self._shell(line)
        elif self.state == "uboot":
            self._uboot(line)
        if self.state == before:
            self._out(self._prompt())

    def _uboot(self, line: str) -> None:
        word, _, rest = line.partition(" ")
        if not word:
            return
        if word == "version":
            self._out(VERSION)
        elif word == "echo":
            self._out(rest.encode() + b"\r\n")
        elif word == "color":
            self._out(COLOR)
        elif word == "help":
            self._out(b"boot    - boot the kernel\r\ncolor   - print in colour\r\necho    - echo args\r\n")
            self._out(b"version - print version\r\n")
        elif word == "boot":
            self._boot()
        else:
            self._out(b"Unknown command '%s' - try 'help'\r\n" % word.encode())

    def _boot(self) -> None:
        self._out(b"Starting kernel ...\r\n\r\n[    0.000000] Booting Linux on physical CPU 0x0\r\n")
        self._out(b"[    1.234567] Run /sbin/init as init process\r\n\r\nWelcome to zdut Linux\r\n")
        self._set_state("login")
        self._out(self._prompt())

    def _shell(self, line: str) -> None:
        if line == "reboot":
            self._out(b"reboot: Restarting system\r\n")
            self._power_on()
        elif line.startswith("echo "):
            self._out(line[5:].encode() + b"\r\n")
        elif line == "uname":
            self._out(b"Linux zdut-board 6.1.0 aarch64\r\n")
        elif line:
            self._out(b"sh: %s: not found\r\n" % line.split()[0].encode())
