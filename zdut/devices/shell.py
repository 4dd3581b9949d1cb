"""The shell module: run one command string on the agent, streaming its output.

Also home of the small process helpers the ssh module shares: reading a child's
pipes as they fill, and killing a child's whole process group on cancel.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from collections.abc import Awaitable, Callable

import msgspec

from zdut.devices.base import Module, ModuleError, Session

DEFAULT_SHELL = "/bin/sh"
READ_SIZE = 64 * 1024
#: How long a cancelled child gets between SIGTERM and SIGKILL.
KILL_GRACE_S = 2.0
#: After the main process exits, how long its leftover children may keep the pipes open.
PIPE_LINGER_S = 1.0
#: Bytes of stderr quiet mode keeps for the failure report.
QUIET_STDERR_MAX = 64 * 1024

TOO_MANY_ARGS = "too many arguments - if the command-string contains spaces or special characters, quote it"

Sink = Callable[[bytes], Awaitable[None]]


class ShellOptions(msgspec.Struct, forbid_unknown_fields=True):
    path: str = DEFAULT_SHELL
    quiet: bool = False


async def _open_pipe() -> tuple[asyncio.StreamReader, asyncio.BaseTransport, int]:
    """A pipe whose read end we own (so leftover grandchildren cannot keep us waiting)."""
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
    return reader, transport, wfd


async def _pump(reader: asyncio.StreamReader, sink: Sink) -> None:
    while chunk := await reader.read(READ_SIZE):
        await sink(chunk)


async def kill_group(proc: asyncio.subprocess.Process, grace: float) -> None:
    """SIGTERM the child's process group, SIGKILL what is left after ``grace``, and reap the child."""
    loop = asyncio.get_running_loop()
    _killpg_quiet(proc.pid, signal.SIGTERM)
    deadline = loop.time() + grace
    while loop.time() < deadline:
        if proc.returncode is None:
            try:
                await asyncio.wait_for(asyncio.shield(proc.wait()), min(0.05, grace))
            except TimeoutError:
                continue
        if not group_alive(proc.pid):
            break
        await asyncio.sleep(0.02)
    _killpg_quiet(proc.pid, signal.SIGKILL)
    await proc.wait()


def _killpg_quiet(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


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


async def run_streaming(
    argv: list[str],
    on_stdout: Sink,
    on_stderr: Sink,
    env: dict[str, str] | None = None,
    grace: float | None = None,
    linger: float | None = None,
) -> int:
    """Run ``argv`` in its own session, feed its output to the sinks as it arrives, return its exit status.

    A negative status is a signal number (as in asyncio).  Cancellation kills the whole group.
    """
    transports: list[asyncio.BaseTransport] = []
    try:
        out_reader, tr, out_w = await _open_pipe()
        transports.append(tr)
        err_reader, tr, err_w = await _open_pipe()
        transports.append(tr)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out_w, stderr=err_w, env=env, start_new_session=True
            )
        finally:
            os.close(out_w)
            os.close(err_w)
        pumps = [_pump(out_reader, on_stdout), _pump(err_reader, on_stderr)]
        return await _supervise(
            proc, pumps, KILL_GRACE_S if grace is None else grace, PIPE_LINGER_S if linger is None else linger
        )
    finally:
        for tr in transports:
            tr.close()


async def _supervise(
    proc: asyncio.subprocess.Process, pumps: list[Awaitable[None]], grace: float, linger: float
) -> int:
    tasks = [asyncio.ensure_future(p) for p in pumps]
    try:
        try:
            status = await proc.wait()
        except BaseException:
            # Shielded so that a second cancel cannot leave the group half-killed.
            await asyncio.shield(kill_group(proc, grace))
            raise
        # Background children may hold the pipes open; give them a moment, then stop listening.
        done, _ = await asyncio.wait(tasks, timeout=linger)
        for task in done:
            task.result()
        return status
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def exit_text(status: int) -> str:
    """``exited with code N`` or ``terminated by signal SIGX``."""
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = str(-status)
        return f"terminated by signal {name}"
    return f"exited with code {status}"


class Shell(Module):
    id = "shell"
    Options = ShellOptions

    def help(self) -> str:
        text = (
            "Execute a shell command on the DUT agent\n"
            "\n"
            "ARGUMENTS:\n"
            "\t[command-string]\n"
            "\n"
            f'The used shell is "{self.options.path}".\n'
            "\n"
            "The shell is executed with the -c flag and the first argument to the module is passed as the\n"
            "command-string. So make sure to quote the command-string if it contains spaces or special characters.\n"
            'E.g.: "ls -l /tmp"\n'
            "Output is streamed as it arrives (stdout to stdout, stderr to stderr). A non-zero exit fails the run.\n"
            "The shell module is non-interactive: stdin is /dev/null. Cancelling the run kills the command and\n"
            "everything it started (its process group).\n"
            "\n"
            "with: path (shell executable, default /bin/sh, looked up on PATH), quiet (bool: suppress stdout;\n"
            "stderr is shown only if the command fails).\n"
        )
        if self.options.quiet:
            text += "NOTE: The module is configured to quiet mode. Only stderr is forwarded, on failure.\n"
        return text

    async def init(self) -> None:
        path = self.options.path or DEFAULT_SHELL
        if shutil.which(path) is None:
            raise ModuleError(
                f'shell path "{path}": executable file not found in $PATH '
                "(install the shell or set another one with the 'path' key)"
            )
        self._shell = path

    async def run(self, session: Session, args: list[str]) -> None:
        if not args:
            raise ModuleError("missing command-string")
        if len(args) > 1:
            raise ModuleError(TOO_MANY_ARGS)
        quiet = self.options.quiet
        held = bytearray()

        async def drop(_: bytes) -> None:
            return None

        async def hold(data: bytes) -> None:
            held.extend(data)
            del held[:-QUIET_STDERR_MAX]

        shell = getattr(self, "_shell", None) or self.options.path or DEFAULT_SHELL
        try:
            status = await run_streaming(
                [shell, "-c", args[0]],
                drop if quiet else session.stdout,
                hold if quiet else session.stderr,
            )
        except OSError as exc:
            raise ModuleError(f"failed to execute shell: {exc}") from None
        if status == 0:
            return
        if quiet and held:
            await session.stderr(bytes(held) if held.endswith(b"\n") else bytes(held) + b"\n")
        raise ModuleError(f"shell command {exit_text(status)}")
