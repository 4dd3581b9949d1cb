"""The dummy modules of dutctl: status, repeat (console) and ft (file transfer)."""

from __future__ import annotations

import os

from zdut.devices import scratch
from zdut.devices.base import FileArg, Module, ModuleError, NoOptions, Session

FT_SUFFIX = b"\n\nprocessed by dummy.FT module\n"


class DummyStatus(Module[NoOptions]):
    id = "dummy-status"

    def help(self) -> str:
        return "This dummy module prints status information about itself and the environment."

    async def run(self, session: Session, args: list[str]) -> None:
        await session.print("Hello from dummy status module\n")
        await session.print(f"Called with {len(args)} arguments\n")
        for i, arg in enumerate(args):
            await session.print(f"Arg {i}: {arg}\n")


class DummyRepeat(Module[NoOptions]):
    id = "dummy-repeat"
    interactive = True

    def help(self) -> str:
        return "This dummy module repeats the input from the client."

    async def run(self, session: Session, args: list[str]) -> None:
        await session.stdout(
            b"Hello from dummy repeat module!\nEnter one word per line. (Two words will terminate)\n"
        )
        pending = b""
        while True:
            # A raw-mode terminal sends CR for Enter; a pipe sends LF (or CRLF).
            while b"\n" not in pending:
                chunk = await session.read_stdin()
                if not chunk:
                    raise ModuleError("EOF")
                pending += chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            line, _, pending = pending.partition(b"\n")
            words = line.split(b" ")
            if len(words) > 1:
                await session.stderr(b"Oh no! Can only handle one word per line.\n")
                return
            await session.stdout(words[0] + b"\n")


class DummyFT(Module[NoOptions]):
    """Requests a file, appends a marker and sends it back, streaming through a temp file.

    Unlike dutctl an empty input works (zdut transfers empty files)."""

    id = "dummy-ft"

    def help(self) -> str:
        return (
            "This dummy module demonstrates file transfer.\n"
            "Arguments: <input> <output>: the client's <input> is uploaded, processed and\n"
            "delivered back to the client as <output>."
        )

    def file_args(self, args: list[str]) -> list[FileArg]:
        if len(args) != 2:
            return []
        return [FileArg(0, args[0], send=True), FileArg(1, args[1], receive=True)]

    async def run(self, session: Session, args: list[str]) -> None:
        await session.print("Hello from dummy file transfer module\n")
        await session.print(f"Called with {len(args)} arguments\n")
        if len(args) != 2:
            raise ModuleError(f"expected 2 arguments, got {len(args)}")
        src, dst = args
        await session.print(f'Requesting file "{src}" passed in arg[0] as input\n')
        with scratch.run_dir("zdut-dummy-ft") as tmp:  # the run's own, removed on every way out
            path = os.path.join(tmp, os.path.basename(src) or "input")
            with open(path, "wb") as fh:
                async for chunk in session.request_file(src):
                    fh.write(chunk)
                fh.write(FT_SUFFIX)
            size = os.path.getsize(path)
            await session.send_file(dst, path, size)
        await session.print(f'File operated successfully, delivered "{dst}" as passed in arg[1] as output\n')
