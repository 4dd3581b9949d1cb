"""Blocking calls that may never return (a FIFO nobody opens, a resolver that hangs), awaited from the loop."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def off_loop(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a daemon thread of its own: a read that never returns (a FIFO nobody writes) keeps
    neither the loop nor the process's exit waiting, as an executor's thread would."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(value: T | None, exc: BaseException | None) -> None:
        if fut.done():
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(value)  # type: ignore[arg-type]

    def work() -> None:
        try:
            value, exc = fn(*args), None
        except BaseException as e:  # handed to the awaiting task, which re-raises it
            value, exc = None, e
        with contextlib.suppress(RuntimeError):  # the loop is gone
            loop.call_soon_threadsafe(settle, value, exc)

    threading.Thread(target=work, name="zdut-daemon", daemon=True).start()
    return await fut
