"""Both Python APIs behind one face, so every API test runs against each.

``Lab`` is called as it is; ``AsyncLab`` runs on an event loop that keeps running in its own thread for the
whole test, as a Jupyter kernel's loop does, and the test waits for each coroutine it hands that loop.
Tests use them through the ``open_api`` fixture (``pytest_plugins = ["api_drivers"]``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from zdut.aio import AsyncLab
from zdut.api import Lab

T = TypeVar("T")
#: Opens an API on ``address`` as ``user`` (keyword arguments go to the constructor); closed after the test.
Opener = Callable[..., Any]


class LoopThread:
    """An event loop running in a thread of its own until closed."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="api-test-loop", daemon=True)
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class OnLoop:
    """An AsyncLab whose every method is awaited on the loop thread; the caller blocks for the answer."""

    def __init__(self, runner: LoopThread, lab: AsyncLab) -> None:
        self.runner, self.lab = runner, lab

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.lab, name)
        return lambda *args, **kwargs: self.runner.call(method(*args, **kwargs))


@pytest.fixture(params=["Lab", "AsyncLab"])
def open_api(request: pytest.FixtureRequest) -> Iterator[Opener]:
    closers: list[Callable[[], Any]] = []
    runner = LoopThread() if request.param == "AsyncLab" else None

    def open_(address: str, user: str | None = "ci@rack", **kwargs: Any) -> Any:
        if runner is None:
            lab = Lab(address, user, **kwargs)
            closers.append(lab.close)
            return lab
        api = OnLoop(runner, AsyncLab(address, user, **kwargs))
        closers.append(api.close)  # a failed connect leaves nothing open, so closing it again is harmless
        api.connect()
        return api

    try:
        yield open_
    finally:
        for close in reversed(closers):
            close()
        if runner is not None:
            runner.close()
