"""A zdut-agent with one extra test module, ``winsize``, that prints the client's terminal size whenever
it changes: how test_shell_terminal.py sees a window resize reach the module.

Run as ``python tests/shell_winsize.py AGENT-ARGS...``."""

from __future__ import annotations

import asyncio
import sys

from zdut import devices
from zdut.devices.base import Module, Session
from zdut.worker import main

POLL_S = 0.02


class WinSize(Module):
    id = "winsize"
    interactive = True

    def help(self) -> str:
        return "Prints the client's terminal size (rows x cols) whenever it changes, until cancelled."

    async def run(self, session: Session, args: list[str]) -> None:
        last: tuple[int, int] | None = None
        while True:
            size = session.terminal_size
            if size is not None and size != last:
                last = size
                await session.stdout(f"size {size[0]}x{size[1]}\n".encode())
            await asyncio.sleep(POLL_S)


if __name__ == "__main__":
    devices.register(WinSize.id, WinSize)
    sys.exit(main(sys.argv[1:]))
