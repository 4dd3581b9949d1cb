"""Serial ports for the serial module: who holds which port, opening one, and reading it on the event loop.

A process-wide registry keyed by the port's real path makes sure two sessions never read one port (two
names for one device, such as a /dev/serial/by-id link, count as one): the second gets a busy error.
A port's background reader (``serial_background``) is not a session: it yields the port to the session
that claims it and takes it back afterwards.  The port is read and written through its non-blocking file
descriptor on the event loop, so a cancelled run stops at once and closes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import threading
from collections.abc import AsyncIterator
from typing import Protocol

import serial as pyserial

from zdut.devices.base import ModuleError
from zdut.protocol import Code

#: Bytes per read: a chatty console at full speed costs one event-loop round per this much output.
READ_CHUNK = 64 * 1024

_registry_lock = threading.Lock()
_open_ports: set[str] = set()


class Yielding(Protocol):
    """A holder of a port that gives it up while a session needs it (a background reader)."""

    path: str

    async def pause(self) -> None:
        """Close the port; return once it is closed."""

    def resume(self) -> None:
        """The session is done: open the port again."""


_yielding: dict[str, Yielding] = {}  # by the configured path


def add_yielding(holder: Yielding) -> None:
    """Register ``holder`` for its path; a second one for the same port is refused (ModuleError)."""
    key = os.path.realpath(holder.path)
    with _registry_lock:
        if holder.path in _yielding or any(os.path.realpath(p) == key for p in _yielding):
            raise ModuleError(f"serial port {holder.path} already has a background reader")
        _yielding[holder.path] = holder


def remove_yielding(holder: Yielding) -> None:
    with _registry_lock:
        if _yielding.get(holder.path) is holder:
            del _yielding[holder.path]


def _yielding_for(path: str, key: str) -> Yielding | None:
    # By name first: a replugged adapter's link may point elsewhere by now, yet it is the same port.
    with _registry_lock:
        holder = _yielding.get(path)
        return holder or next((h for p, h in _yielding.items() if os.path.realpath(p) == key), None)


@contextlib.asynccontextmanager
async def claim_port(path: str) -> AsyncIterator[None]:
    """Reserve ``path`` (by real path) for this session, or fail with the busy error; a background reader of
    the port closes it first and reopens it when the session is done."""
    key = os.path.realpath(path)
    with _registry_lock:
        if key in _open_ports:
            raise ModuleError(f"serial port {path} is busy (in use by another session)", Code.FAILED_PRECONDITION)
        _open_ports.add(key)
    holder = _yielding_for(path, key)
    try:
        if holder is not None:
            await holder.pause()
        yield
    finally:
        with _registry_lock:
            _open_ports.discard(key)
        if holder is not None:
            holder.resume()


def ports_in_use() -> frozenset[str]:
    """The real paths of the ports some session holds now."""
    with _registry_lock:
        return frozenset(_open_ports)


def _open_serial(path: str, baud: int) -> pyserial.Serial:
    if not os.path.exists(path):
        raise ModuleError(
            f"failed to open serial port {path}: no such device (is the serial adapter plugged in? "
            "check 'ls /dev/serial/by-id/' and the 'port' key)"
        )
    try:
        port = pyserial.Serial(port=path, baudrate=baud, timeout=0)
        port.reset_input_buffer()  # stale bytes from an earlier boot must not satisfy an expect
    except pyserial.SerialException as exc:
        code = exc.errno if isinstance(exc.errno, int) else None
        if code in (errno.EACCES, errno.EPERM):
            raise ModuleError(
                f"failed to open serial port {path}: permission denied (add the agent user to the dialout group)"
            ) from None
        raise ModuleError(f"failed to open serial port {path}: {exc}") from None
    return port


def _resolve(fut: asyncio.Future[bool], ready: bool = True) -> None:
    if not fut.done():
        fut.set_result(ready)


def os_text(exc: OSError) -> str:
    """An OSError as the user reads it: its strerror when it has one."""
    return exc.strerror or str(exc)


#: How long a serial break holds the line (the usual 250 ms: long enough for any baud rate's frame).
BREAK_S = 0.25


class Port:
    """A pyserial port driven through its non-blocking fd on the event loop."""

    def __init__(self, ser: pyserial.Serial) -> None:
        self.ser = ser
        self.fd = ser.fileno()

    @classmethod
    async def open(cls, path: str, baud: int) -> Port:
        task = asyncio.ensure_future(asyncio.to_thread(_open_serial, path, baud))
        try:
            return cls(await asyncio.shield(task))
        except asyncio.CancelledError:
            task.add_done_callback(lambda t: t.cancelled() or t.exception() or t.result().close())
            raise

    async def _ready(self, writing: bool, deadline: float | None = None) -> bool:
        """Wait until the fd is ready (True) or the loop time ``deadline`` passed (False)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        if writing:
            loop.add_writer(self.fd, _resolve, fut)
        else:
            loop.add_reader(self.fd, _resolve, fut)
        timer = loop.call_at(deadline, _resolve, fut, False) if deadline is not None else None
        try:
            return await fut
        finally:
            (loop.remove_writer if writing else loop.remove_reader)(self.fd)
            if timer is not None:
                timer.cancel()

    async def read(self, deadline: float | None = None) -> bytes:
        """The next bytes from the port; b"" once the loop time ``deadline`` passed without any; OSError when
        the device is gone.

        A port that has output waiting is read at once (a chatty console costs no readiness round trip
        per read), yet every read gives the event loop a turn, so other sessions are never starved."""
        waited = False
        while True:
            try:
                data = os.read(self.fd, READ_CHUNK)  # VMIN=0 (pyserial's timeout=0): b"" if nothing waits
            except BlockingIOError:
                waited = False  # readiness that came to nothing: wait again
            else:
                if data:
                    if not waited:
                        await asyncio.sleep(0)
                    return data
                if waited:
                    # Readable yet empty: the tty was hung up (adapter unplugged, pty closed).
                    raise OSError(errno.EIO, "device disconnected (end of file)")
            waited = await self._ready(writing=False, deadline=deadline)
            if not waited:
                return b""

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self.fd, view) :]
            except BlockingIOError:
                await self._ready(writing=True)

    async def send_break(self, seconds: float = BREAK_S) -> None:
        """Hold the line in the break condition for ``seconds`` (ioctls that never block, unlike tcsendbreak)."""
        self.ser.break_condition = True
        try:
            await asyncio.sleep(seconds)
        finally:
            self.ser.break_condition = False

    def close(self) -> None:
        self.ser.close()
