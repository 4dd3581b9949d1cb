"""Helpers shared by the module unit tests (which run modules against LocalSession)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from zdut.devices.base import Module, decode_options

M = TypeVar("M", bound=Module)


async def until(pred: Callable[[], object], what: str, timeout: float = 5.0) -> None:
    """Wait for a condition with a deadline (polling; never a bare sleep as synchronisation)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def make_module(cls: type[M], **with_: object) -> M:
    """A module instance with ``with:`` options, initialised as the agent would."""
    mod = cls(decode_options(cls, with_))
    await mod.init()
    return mod


def alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie (a killed child not yet reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False
