"""SPI flash modules: flash (flashrom, flashprog, dpcmd) and flash-emulate (em100).

Both wrap a command-line tool on the agent.  Images stream in chunks into a
directory of the run's own (``scratch.run_dir``: runs of one instance overlap, and
each works on its own image); the tool's combined output streams to the client as
it arrives.  A cancelled run stops the tool's whole process group (see
``process.py``) with TERM_GRACE_S between SIGTERM and SIGKILL, as dutctl does
for flashing: interrupting a write half-way is worse than waiting.
"""

from __future__ import annotations

import codecs
import os
import shlex
import shutil
from pathlib import Path

import msgspec

from zdut.devices import scratch
from zdut.devices.base import FileArg, Module, ModuleError, OptionsT, Session
from zdut.devices.process import exit_message, run_streaming

SUPPORTED_TOOLS = ("flashrom", "flashprog", "dpcmd")
INIT_FAILED_MARKER = "Programmer initialization failed"

#: How to get each tool onto an agent (Debian 12 packages where they exist).
INSTALL_HINTS = {
    "flashrom": "install it with 'apt-get install flashrom'",
    "flashprog": "flashprog is not packaged in Debian 12: build it from source and put it on PATH",
    "dpcmd": "install Dediprog's SF100Linux tools (dpcmd) and put dpcmd on PATH",
    "em100": "em100 is not packaged in Debian 12: build coreboot's util/em100 and put it on PATH",
}


def _tool_hint(tool: str) -> str:
    return INSTALL_HINTS.get(os.path.basename(tool), "install it and put it on PATH")


async def run_tool(session: Session, argv: list[str], cwd: str, grace: float) -> tuple[int, bool]:
    """Run argv, streaming its combined output; return (exit status, whether INIT_FAILED_MARKER appeared)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    tail = ""  # enough recent output to spot the marker across chunk borders
    seen = False

    async def show(chunk: bytes) -> None:
        nonlocal tail, seen
        text = decoder.decode(chunk)
        if text:
            await session.print(text)
            window = tail + text
            seen = seen or INIT_FAILED_MARKER in window
            tail = window[-len(INIT_FAILED_MARKER) :]

    try:
        status = await run_streaming(argv, show, cwd=cwd, grace=grace)
    except FileNotFoundError:
        raise ModuleError(f'tool "{argv[0]}" not found on PATH ({_tool_hint(argv[0])})') from None
    except PermissionError:
        raise ModuleError(f'tool "{argv[0]}" is not executable') from None
    if rest := decoder.decode(b"", final=True):
        await session.print(rest)
    return status, seen


async def receive_file(session: Session, name: str, path: Path) -> None:
    """Stream the client's file ``name`` into ``path`` (in the run's own directory, which goes with the run)."""
    try:
        with open(path, "wb") as fh:
            async for chunk in session.request_file(name):
                fh.write(chunk)
    except OSError as exc:
        raise ModuleError(f"saving image on the agent: {exc.strerror or exc}") from None


class _ToolModule(Module[OptionsT]):
    """A module that runs a tool in a directory of the run's own (its cwd, where the image goes)."""

    #: Seconds between SIGTERM and SIGKILL when a run is cancelled.
    TERM_GRACE_S = 10.0

    @staticmethod
    def _require_tool(tool: str, what: str) -> str:
        """The tool's absolute path (it runs with the work directory as cwd)."""
        path = shutil.which(tool)
        if path is None:
            raise ModuleError(f'{what} "{tool}" not found on PATH ({_tool_hint(tool)})')
        return os.path.abspath(path)


class FlashOptions(msgspec.Struct, forbid_unknown_fields=True):
    tool: str = ""
    # int allowed because dpcmd takes a USB device number here.
    programmer: str | int = ""


class Flash(_ToolModule[FlashOptions]):
    id = "flash"
    Options = FlashOptions

    def help(self) -> str:
        o = self.options
        return (
            "Read and write the SPI flash.\n"
            "Arguments: read|write <image>\n"
            "  write: <image> is the client's file, streamed to the agent and written to the chip.\n"
            "  read:  the chip is read and delivered to the client as <image>.\n"
            "The flash tool runs on the agent; its output is shown as it runs.\n"
            "with: tool (required; flashrom, flashprog or dpcmd, optionally as a path; must be on PATH),\n"
            "      programmer (flashrom/flashprog: the -p argument, required; dpcmd: optional USB device number,\n"
            "      passed as --device N).\n"
            f"Using {o.tool!r} as flash tool with programmer {str(o.programmer)!r}.\n"
        )

    def __init__(self, options: FlashOptions) -> None:
        super().__init__(options)
        # Checked when the config loads (see ipmi), so --check-config refuses what start-up would.
        if not options.tool:
            raise ModuleError(f"tool must be configured (one of {', '.join(SUPPORTED_TOOLS)})")
        if self._basename() not in SUPPORTED_TOOLS:
            raise ModuleError(f"{options.tool!r} unsupported; supported tools are {', '.join(SUPPORTED_TOOLS)}")
        if self._basename() != "dpcmd" and options.programmer in ("", None):
            raise ModuleError("programmer must be configured")

    def file_args(self, args: list[str]) -> list[FileArg]:
        """``write IMAGE`` uploads the client's IMAGE, ``read IMAGE`` downloads into it."""
        if len(args) != 2 or args[0] not in ("read", "write"):
            return []
        return [FileArg(1, args[1], send=args[0] == "write", receive=args[0] == "read")]

    def _basename(self) -> str:
        return os.path.basename(self.options.tool)

    async def init(self) -> None:
        self._require_tool(self.options.tool, "flash tool")

    def cmdline(self, tool: str, op: str, image: Path) -> list[str]:
        programmer = str(self.options.programmer)
        if self._basename() == "dpcmd":
            argv = [tool]
            if programmer:
                argv += ["--device", programmer]
            return [*argv, "-u" if op == "write" else "-r", str(image)]
        return [tool, "-p", programmer, "-w" if op == "write" else "-r", str(image)]

    async def run(self, session: Session, args: list[str]) -> None:
        if not args:
            raise ModuleError("missing argument: flash operation (read or write)")
        op = args[0]
        if op not in ("read", "write"):
            raise ModuleError(f'unknown operation "{op}" (expected read or write)')
        if len(args) < 2:
            raise ModuleError("missing argument: image file name")
        if len(args) > 2:
            raise ModuleError(f"expected 2 arguments (read|write <image>), got {len(args)}")
        tool = self._require_tool(self.options.tool, "flash tool")
        name = args[1]
        with scratch.run_dir(f"zdut-{self.id}") as work:  # nothing is kept between runs: no stale image
            local = work / "image"
            if op == "write":
                await receive_file(session, name, local)
            argv = self.cmdline(tool, op, local)
            await session.print(f"Executing: {shlex.join(argv)}\n")
            code, init_failed = await run_tool(session, argv, str(work), self.TERM_GRACE_S)
            if init_failed:
                raise ModuleError(
                    "programmer initialization failed, check if the programmer hardware is connected and supported"
                )
            if code != 0:
                raise ModuleError(exit_message("flash tool", code))
            await session.print("Flash operation completed successfully\n")
            if op == "read":
                if not local.is_file():
                    raise ModuleError("the flash tool reported success but wrote no image")
                await session.send_file(name, local, local.stat().st_size)


class FlashEmulateOptions(msgspec.Struct, forbid_unknown_fields=True):
    tool: str = "em100"
    chip: str = ""
    # int allowed because it is a USB device number.
    device: str | int = ""


class FlashEmulate(_ToolModule[FlashEmulateOptions]):
    id = "flash-emulate"
    Options = FlashEmulateOptions
    _kept: Path | None = None  # the directory of the image loaded last

    def help(self) -> str:
        o = self.options
        text = (
            "Load a firmware image into an SPI flash emulator on the DUT.\n"
            "Arguments: <image>: the client's file, streamed to the agent and loaded into the emulator.\n"
            "Any running emulation is stopped first, then the image is loaded and emulation starts.\n"
            "with: tool (default em100, must be on PATH), chip (required, e.g. N25Q256A13),\n"
            "      device (optional USB device number when several emulators are connected).\n"
            f"Using {o.tool!r} as emulation tool with chip {o.chip!r}.\n"
        )
        if o.device != "":
            text += f"Using USB device {str(o.device)!r}.\n"
        return text

    def __init__(self, options: FlashEmulateOptions) -> None:
        super().__init__(options)
        # Checked when the config loads (see ipmi), so --check-config refuses what start-up would.
        if not options.tool:
            raise ModuleError("tool must not be empty (default: em100)")
        if not options.chip:
            raise ModuleError('chip must be configured (e.g. "N25Q256A13")')

    async def init(self) -> None:
        self._require_tool(self.options.tool, "emulation tool")

    def file_args(self, args: list[str]) -> list[FileArg]:
        return [FileArg(0, args[0], send=True)] if len(args) == 1 else []

    def cmdline(self, tool: str, image: Path) -> list[str]:
        argv = [tool]
        if self.options.device != "":
            argv += ["--device", str(self.options.device)]
        return [*argv, "--stop", "--set", self.options.chip, "-d", str(image), "-v", "--start"]

    def _keep(self, work: Path | None) -> None:
        """``work`` (a successful run's directory) is now the one kept; the one kept before goes."""
        old, self._kept = self._kept, work
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    async def deinit(self) -> None:
        self._keep(None)

    async def run(self, session: Session, args: list[str]) -> None:
        if not args:
            raise ModuleError("missing argument: image file path")
        if len(args) > 1:
            raise ModuleError(f"expected 1 argument (<image>), got {len(args)}")
        tool = self._require_tool(self.options.tool, "emulation tool")
        # This run's own directory: the image loaded last is kept until a later run loaded another one (as
        # in dutctl), but two runs at once never share a file.
        work = scratch.mkdtemp(f"zdut-{self.id}")
        image = work / "image"
        try:
            await receive_file(session, args[0], image)
            argv = self.cmdline(tool, image)
            await session.print(f"Executing: {shlex.join(argv)}\n")
            code, _ = await run_tool(session, argv, str(work), self.TERM_GRACE_S)
            if code != 0:
                raise ModuleError(exit_message("emulation tool", code))
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        self._keep(work)
        await session.print("Emulation started successfully\n")
