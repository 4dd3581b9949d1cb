"""Running an external tool for a module: in its own process group, output as it arrives, a stop that reaches
every process the tool started, and one wording for how it ended.

The tool runs in a new session (hence a process group of its own) with stdin on /dev/null.  Its output comes
through pipes whose read ends this module owns, so a helper the tool leaves running in the background cannot
keep the run waiting: once the tool exits, the pipes get ``linger`` seconds to drain, then nobody listens.

Whatever ends a run early (the run cancelled, an ``asyncio.timeout`` around it expiring, a sink raising)
stops the whole group: SIGTERM, up to ``grace`` seconds for every process in it to end, then SIGKILL for
what is left.  A second cancel during the grace only cuts it short.  A tool that ends by itself is not
stopped: what it left in the background keeps running.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

READ_SIZE = 64 * 1024
#: How long a stopped tool's group gets between SIGTERM and SIGKILL, unless the caller says otherwise.
KILL_GRACE_S = 2.0
#: After the tool exits, how long what it left behind may keep the pipes open.
PIPE_LINGER_S = 1.0
#: How long to wait for the tool to be reaped after SIGKILL (a process stuck in the kernel may take longer).
REAP_S = 5.0
#: Bytes of each stream that ``run_captured`` keeps (the last ones).
CAPTURE_MAX = 1024 * 1024
_POLL_S = 0.02

#: Where a stream's bytes go as they arrive.
Sink = Callable[[bytes], Awaitable[None]]


class TailBuffer:
    """A sink that keeps the last ``limit`` bytes written to it."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.data = bytearray()

    async def __call__(self, chunk: bytes) -> None:
        self.data.extend(chunk)
        del self.data[: -self.limit]


async def discard(_: bytes) -> None:
    """A sink that drops what it is given."""


def exit_text(status: int) -> str:
    """How a tool ended, from its exit status (negative: the signal, as asyncio reports it):
    ``exited with code N`` or ``terminated by signal SIGX``."""
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = str(-status)
        return f"terminated by signal {name}"
    return f"exited with code {status}"


def exit_message(what: str, status: int) -> str:
    """``<what> exited with code N`` / ``<what> terminated by signal SIGX``."""
    return f"{what} {exit_text(status)}"


async def run_streaming(
    argv: Sequence[str],
    on_stdout: Sink,
    on_stderr: Sink | None = None,
    *,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    grace: float | None = None,
    linger: float | None = None,
) -> int:
    """Run ``argv`` in its own process group, feed its output to the sinks as it arrives, return its exit status.

    Without ``on_stderr`` both streams go through one pipe to ``on_stdout`` (the tool's combined output, in
    the order it wrote it).  A negative status is a signal number.  OSError if the tool cannot be started.
    """
    transports: list[asyncio.BaseTransport] = []
    try:
        out_reader, out_w = await _open_pipe(transports)
        err_reader, err_w = await _open_pipe(transports) if on_stderr is not None else (None, out_w)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out_w,
                stderr=err_w,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        finally:
            for fd in {out_w, err_w}:
                os.close(fd)
        pumps = [_pump(out_reader, on_stdout)]
        if err_reader is not None and on_stderr is not None:
            pumps.append(_pump(err_reader, on_stderr))
        return await _supervise(
            proc, pumps, KILL_GRACE_S if grace is None else grace, PIPE_LINGER_S if linger is None else linger
        )
    finally:
        for transport in transports:
            transport.close()


@dataclass
class Captured:
    """A finished tool: its exit status and the last CAPTURE_MAX bytes of each stream."""

    status: int
    stdout: bytes
    stderr: bytes


async def run_captured(
    argv: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    merge: bool = False,
    grace: float | None = None,
) -> Captured:
    """``run_streaming`` into memory; with ``merge`` stderr is part of ``stdout``."""
    out, err = TailBuffer(CAPTURE_MAX), TailBuffer(CAPTURE_MAX)
    status = await run_streaming(argv, out, None if merge else err, env=env, cwd=cwd, grace=grace)
    return Captured(status, bytes(out.data), bytes(err.data))


async def stop_group(proc: asyncio.subprocess.Process, grace: float) -> None:
    """SIGTERM the tool's process group, give it ``grace`` seconds to end, SIGKILL what is left, reap the tool."""
    cancelled = False
    if proc.returncode is None or group_alive(proc.pid):  # once reaped and alone, its pid may be reused
        _signal_group(proc.pid, signal.SIGTERM)  # start_new_session made the tool its group's leader
    try:
        async with asyncio.timeout(grace):
            await _group_ended(proc)
    except TimeoutError:
        pass
    except asyncio.CancelledError:
        cancelled = True  # a second cancel only cuts the grace short
    if group_alive(proc.pid):
        _signal_group(proc.pid, signal.SIGKILL)
    try:
        async with asyncio.timeout(REAP_S):
            await asyncio.shield(proc.wait())
    except TimeoutError:
        pass  # stuck in the kernel: asyncio reaps it once it goes
    except asyncio.CancelledError:
        cancelled = True
    if cancelled:
        raise asyncio.CancelledError


def group_alive(pgid: int) -> bool:
    """Whether any non-zombie process is left in the group (zombies may never be reaped in containers)."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        # Fields after the parenthesised command name: state ppid pgrp ...
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False


async def _open_pipe(transports: list[asyncio.BaseTransport]) -> tuple[asyncio.StreamReader, int]:
    """A pipe whose read end we own (its transport goes on ``transports``) and its write end for the child."""
    rfd, wfd = os.pipe()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=READ_SIZE)
    try:
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(rfd, "rb", buffering=0)
        )
    except BaseException:
        os.close(wfd)
        raise
    transports.append(transport)
    return reader, wfd


async def _pump(reader: asyncio.StreamReader, sink: Sink) -> None:
    while chunk := await reader.read(READ_SIZE):
        await sink(chunk)


async def _supervise(
    proc: asyncio.subprocess.Process, pumps: Sequence[Coroutine[Any, Any, None]], grace: float, linger: float
) -> int:
    tasks = [asyncio.ensure_future(p) for p in pumps]
    exited = asyncio.ensure_future(proc.wait())
    try:
        try:
            pending: set[asyncio.Future[Any]] = {exited, *tasks}
            while not exited.done():
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done - {exited}:
                    task.result()  # a sink that failed ends the run
        except BaseException:
            exited.cancel()
            await stop_group(proc, grace)
            raise
        # Background children may hold the pipes open; give them a moment, then stop listening.
        done, _ = await asyncio.wait(tasks, timeout=linger)
        for task in done:
            task.result()
        return exited.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _group_ended(proc: asyncio.subprocess.Process) -> None:
    await proc.wait()
    while group_alive(proc.pid):
        await asyncio.sleep(_POLL_S)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
