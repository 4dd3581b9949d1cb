"""zdut's pytest plugin (entry point ``pytest11``): a lab connection for the session, a locked device per test.

    import pytest

    @pytest.mark.zdut_device("board-*")          # a name, or a glob: any free one
    def test_boots(zdut_lab, zdut_device):
        with zdut_lab.open(zdut_device, "serial", "console") as console:
            console.sendline("")
            console.expect("=> ")

``zdut_device`` locks the device before the test (waiting up to ``--zdut-lock-wait`` in its queue) and
unlocks it afterwards, whatever the test did: failed, errored or was interrupted with Ctrl-C.  A test that
fails gets the transcript of every console it opened through ``zdut_lab`` in its report.  Under
pytest-xdist each worker is its own user (``USER@host/gw0``), so two workers never share a lock and each
takes a different device of a glob; with ``--zdut-key``, ``{worker}`` in the path gives each worker its key.
docs/automation.md has the whole story.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from zdut.api import Console, Lab
from zdut.common.client_config import default_user
from zdut.protocol import ZdutError

#: How much of a failed test's console transcript its report shows (the end, where the failure is).
TRANSCRIPT_TAIL_BYTES = 64 * 1024

_TRANSCRIPTS = pytest.StashKey[list[tuple[str, Path]]]()  # a test's consoles: (what, its transcript)
_RUNNING = pytest.StashKey[pytest.Item | None]()  # the test running now


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("zdut", "zdut: lab devices for tests")
    group.addoption("--zdut-server", default=None,
                    help="broker or agent address, host:port, or brokers comma-separated (default: $ZDUT_SERVER, "
                         "else the config file's server, else localhost:1024)")
    group.addoption("--zdut-user", default=None,
                    help="identity for locks and runs (default: $USER@hostname); under xdist each worker adds "
                         "/WORKER, or puts it where {worker} is")
    group.addoption("--zdut-key", default=None,
                    help="your NAME.key_secret for a server with security on; {worker} is the xdist worker")
    group.addoption("--zdut-server-key", default=None, help="the server's public key file")
    group.addoption("--zdut-lock-wait", default="10m",
                    help="how long a test waits in a device's lock queue before it errors (default 10m)")
    group.addoption("--zdut-lock-duration", default="30m",
                    help="how long each test's lock lasts at most, should the run die (default 30m)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "zdut_device(*names): the device the test needs, by name or glob "
                                       "('board-*': any free one); the zdut_device fixture hands over its name")


class PluginLab(Lab):
    """``zdut.api.Lab`` whose consoles keep a transcript for the report of the test that opened them."""

    def __init__(self, *args: object, config: pytest.Config, transcripts: Path, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._config, self._transcripts = config, transcripts

    def open(self, device: str, command: str, *args: str,
             transcript: str | os.PathLike[str] | None = None) -> Console:
        item = self._config.stash.get(_RUNNING, None)
        if transcript is None:
            opened = len(item.stash.get(_TRANSCRIPTS, [])) if item is not None else 0
            name = re.sub(r"[^A-Za-z0-9_.-]+", "_", item.nodeid if item is not None else "session")[-120:]
            transcript = self._transcripts / f"{name}.{opened}.log"
        console = super().open(device, command, *args, transcript=transcript)
        if item is not None:
            item.stash.setdefault(_TRANSCRIPTS, []).append((" ".join([device, command, *args]), Path(transcript)))
        return console


def _worker() -> str:
    return os.environ.get("PYTEST_XDIST_WORKER", "")


@pytest.fixture(scope="session")
def zdut_lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PluginLab]:
    """One connection to the lab for the whole session (``zdut.api.Lab``; consoles keep transcripts)."""
    option = request.config.getoption
    worker = _worker()
    key = option("--zdut-key")
    user = option("--zdut-user")
    if user is None and key is None:
        user = default_user()
    if user is not None and worker:  # two workers as one user would share every lock
        user = user.replace("{worker}", worker) if "{worker}" in user else f"{user}/{worker}"
    if key is not None:
        key = key.replace("{worker}", worker or "main")
    lab = PluginLab(option("--zdut-server"), user, key=key, server_key=option("--zdut-server-key"),
                    config=request.config, transcripts=tmp_path_factory.mktemp("zdut-transcripts"))
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture
def zdut_device(request: pytest.FixtureRequest, zdut_lab: PluginLab) -> Iterator[str]:
    """The name of the device ``@pytest.mark.zdut_device(...)`` asks for, locked for this test."""
    marker = request.node.get_closest_marker("zdut_device")
    if marker is None or not marker.args:
        raise pytest.UsageError(f"{request.node.nodeid}: the zdut_device fixture needs "
                                "@pytest.mark.zdut_device('NAME or GLOB')")
    option = request.config.getoption
    device, _ = zdut_lab.lock_any([str(a) for a in marker.args], option("--zdut-lock-duration"),
                                  wait=option("--zdut-lock-wait"))
    try:
        yield device
    finally:
        try:
            zdut_lab.unlock(device)
        except ZdutError as exc:  # broken by someone, or the lab is gone: the report says so, the run goes on
            request.node.warn(pytest.PytestWarning(f"zdut: could not unlock {device}: {exc.message}"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    item.config.stash[_RUNNING] = item
    try:
        yield
    finally:
        item.config.stash[_RUNNING] = None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if report.failed:
        for label, path in item.stash.get(_TRANSCRIPTS, []):
            report.sections.append((f"zdut console: {label}", _tail(path)))


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - TRANSCRIPT_TAIL_BYTES))
            data = f.read()
    except OSError as exc:
        return f"(no transcript: {exc})"
    cut = f"[... the first {size - len(data)} bytes are in {path}]\n" if size > len(data) else ""
    return cut + data.decode(errors="replace")
