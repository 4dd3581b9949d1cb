"""The shell module: run one command string on the agent, streaming its output."""

from __future__ import annotations

import shutil

import msgspec

from zdut.devices.base import Module, ModuleError, Session
from zdut.devices.process import TailBuffer, discard, exit_message, run_streaming

DEFAULT_SHELL = "/bin/sh"
#: Bytes of stderr quiet mode keeps for the failure report.
QUIET_STDERR_MAX = 64 * 1024

TOO_MANY_ARGS = "too many arguments - if the command-string contains spaces or special characters, quote it"


class ShellOptions(msgspec.Struct, forbid_unknown_fields=True):
    path: str = DEFAULT_SHELL
    quiet: bool = False


class Shell(Module[ShellOptions]):
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
        held = TailBuffer(QUIET_STDERR_MAX)
        shell = getattr(self, "_shell", None) or self.options.path or DEFAULT_SHELL
        try:
            status = await run_streaming(
                [shell, "-c", args[0]],
                discard if quiet else session.stdout,
                held if quiet else session.stderr,
            )
        except OSError as exc:
            raise ModuleError(f"failed to execute shell: {exc}") from None
        if status == 0:
            return
        if quiet and held.data:
            text = bytes(held.data)
            await session.stderr(text if text.endswith(b"\n") else text + b"\n")
        raise ModuleError(exit_message("shell command", status))
