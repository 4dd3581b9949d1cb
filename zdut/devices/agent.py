"""Modules about the agent itself: agent-status and time-wait."""

from __future__ import annotations

import asyncio

import msgspec

from zdut.common.durations import format_duration, parse_duration
from zdut.devices.base import Module, ModuleError, NoOptions, Session
from zdut.devices.process import run_captured


class AgentStatus(Module[NoOptions]):
    id = "agent-status"

    def help(self) -> str:
        return "Prints information about the agent host (the output of `uname -a`). Arguments are ignored."

    async def run(self, session: Session, args: list[str]) -> None:
        try:
            result = await run_captured(["uname", "-a"], merge=True)
        except FileNotFoundError:
            raise ModuleError("uname not found on the agent (install coreutils)") from None
        await session.print(result.stdout.decode(errors="replace").rstrip("\n") + "\n")


class TimeWaitOptions(msgspec.Struct, forbid_unknown_fields=True):
    duration: str = "1s"


class TimeWait(Module[TimeWaitOptions]):
    id = "time-wait"
    Options = TimeWaitOptions

    def help(self) -> str:
        return (
            "Waits for a while.\n"
            "Arguments: [duration] (Go duration syntax, e.g. 500ms, 2s, 1m30s) overrides the configured one.\n"
            "with: duration (default 1s)."
        )

    async def init(self) -> None:
        try:
            parse_duration(self.options.duration)
        except ValueError as exc:
            raise ModuleError(f"invalid duration: {exc}") from None

    async def run(self, session: Session, args: list[str]) -> None:
        if len(args) > 1:
            raise ModuleError(f"expected at most 1 argument, got {len(args)}")
        text = args[0] if args else self.options.duration
        try:
            seconds = parse_duration(text)
        except ValueError as exc:
            raise ModuleError(f"invalid duration: {exc}") from None
        await session.print(f"Waiting for {format_duration(seconds)}\n")
        await asyncio.sleep(seconds)
