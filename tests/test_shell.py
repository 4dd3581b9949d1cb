"""``zdut shell``: its pieces (notices, completion, line resolution) and script mode against a real agent.

The terminal behaviour (prompt, Tab, history, raw consoles, a dying agent) is in test_shell_terminal.py."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document

from conftest import CONF, Lab
from zdut.protocol import DeviceInfo, LockState
from zdut.shell import history_file
from zdut.terminal.completion import ShellCompleter
from zdut.terminal.shell_view import LabView, Tracker, changes, resolve, takes_files

FT_HELP = "Command with 2 module(s)\n\nArguments:\n  source-file: Source file path\n  dest-file: Destination path\n"
ME = "tester"


def dev(name: str, online: bool = True, owner: str = "", expires: int = 0) -> DeviceInfo:
    lock = LockState(owner, 1, expires) if owner else None
    return DeviceInfo(name, lock, "agent", online)


def devices(*items: DeviceInfo) -> dict[str, DeviceInfo]:
    return {d.name: d for d in items}


# ------------------------------------------------------------------ notices


def test_changes_online_offline_appeared_gone() -> None:
    old = devices(dev("a"), dev("b"), dev("c", online=False), dev("d"))
    new = devices(dev("a", online=False), dev("b", online=False), dev("c"), dev("e"))
    assert changes(old, new, ME, time.time()) == ["a, b went offline", "c back online", "new: e", "gone: d"]
    assert changes(new, new, ME, time.time()) == []


def test_changes_locks_of_others_but_not_our_own_or_busy_holds() -> None:
    now = time.time()
    later = int(now) + 1800
    free = devices(dev("a"), dev("b"), dev("c"))
    taken = devices(dev("a", owner="bob", expires=later), dev("b", owner=ME, expires=later), dev("c", owner="eve"))
    assert changes(free, taken, ME, now) == ['a locked by "bob"']  # ours and a busy hold (a run) are no news
    assert changes(taken, free, ME, now, released={"b"}) == ["a unlocked"]  # we released ours ourselves
    expiring = devices(dev("b", owner=ME, expires=int(now)))
    assert changes(expiring, devices(dev("b")), ME, now) == ["your lock on b expired"]


def test_our_lock_broken_by_someone_else_is_news() -> None:
    """``unlock force`` by another user ends our reservation: the shell says so, and who holds it now; our
    own unlock (the shell records it) and a busy hold of ours ending are no news."""
    now = time.time()
    later = int(now) + 1800
    ours = devices(dev("a", owner=ME, expires=later), dev("b", owner=ME, expires=later))
    taken = devices(dev("a"), dev("b", owner="bob", expires=later))
    broken_b = 'your lock on b was broken: now locked by "bob"'
    assert changes(ours, taken, ME, now) == ["your lock on a was broken", broken_b]
    assert changes(ours, taken, ME, now, released={"a"}) == [broken_b]
    busy = devices(dev("a", owner=ME), dev("b"))
    assert changes(busy, devices(dev("a"), dev("b")), ME, now) == []
    view = LabView()
    view.update(list(ours.values()), ME, now)
    view.listed = True
    view.released.add("a")
    assert view.update(list(taken.values()), ME, now) == [broken_b]
    assert view.released == set()  # consumed by the list that showed the change


def test_labview_first_list_is_silent_and_counts() -> None:
    view = LabView()
    assert view.update([dev("a"), dev("b", online=False, owner="x")], ME, time.time()) == []
    view.listed = True
    assert view.counts() == (1, 1, 1)
    assert view.update([dev("a", online=False), dev("b", online=False, owner="x")], ME, time.time()) == [
        "a went offline"
    ]


def test_labview_refetches_commands_of_a_device_back_online() -> None:
    view = LabView()
    view.update([dev("a", online=False)], ME, time.time())
    view.fetched["a"] = time.monotonic()
    assert view.stale(time.monotonic()) == []
    view.update([dev("a")], ME, time.time())
    assert view.stale(time.monotonic()) == ["a"]


def test_takes_files_reads_the_arguments_paragraph() -> None:
    assert takes_files(FT_HELP)
    assert takes_files("Transfer files.\nArguments: SRC[:DST]. Without DST the file keeps its base name.\n")
    assert takes_files("Flash.\nArguments: read|write <image>\n")
    assert not takes_files("This dummy module prints status information about itself and the environment.")
    assert not takes_files("Waits.\nArguments: [duration] (Go duration syntax)\nwith: path of nothing\n")
    assert not takes_files("ARGUMENTS:\n\t[command-string]\n\nwith: path (shell executable)\n")


# ------------------------------------------------------------------ use DEV


def test_resolve_prefixes_the_device_in_use() -> None:
    view = LabView(devices=devices(dev("d1"), dev("d2")), commands={"d2": ["status", "d1"]})
    assert resolve(["status", "x"], None, view) == ["status", "x"]
    assert resolve(["status", "x"], "d2", view) == ["d2", "status", "x"]
    assert resolve(["lock", "1h"], "d2", view) == ["d2", "lock", "1h"]
    assert resolve(["list"], "d2", view) == ["list"]
    assert resolve(["d2", "status"], "d1", view) == ["d2", "status"]  # another device, addressed in full
    assert resolve(["d1"], "d2", view) == ["d2", "d1"]  # ... unless the device in use has such a command


# ------------------------------------------------------------------ completion


@pytest.fixture
def view() -> LabView:
    return LabView(
        devices=devices(dev("device1"), dev("device2", owner="bob", expires=1), dev("device3", online=False)),
        commands={"device1": ["status"], "device2": ["repeat", "status"], "device3": ["file-transfer", "status"]},
        helps={("device3", "file-transfer"): FT_HELP, ("device2", "repeat"): "Repeat input"},
        listed=True,
    )


def complete(view: LabView, text: str, device: str | None = None) -> list[str]:
    completer = ShellCompleter(lambda: view, lambda: device)
    return [c.text for c in completer.get_completions(Document(text), CompleteEvent(completion_requested=True))]


def test_complete_devices_and_keywords(view: LabView) -> None:
    assert complete(view, "dev") == ["device1", "device2", "device3"]
    assert complete(view, "device2") == ["device2 "]  # a single match gets its space, as in bash
    assert complete(view, "fo") == ["format "]
    assert complete(view, "use d") == ["device1", "device2", "device3"]
    assert complete(view, "format j") == ["json "]


def test_complete_commands_keywords_and_arguments(view: LabView) -> None:
    assert complete(view, "device3 ") == ["file-transfer", "lock", "status", "unlock"]
    assert complete(view, "device3 fi") == ["file-transfer "]
    assert complete(view, "device2 lock ") == ["1h", "2h", "30m", "8h"]
    assert complete(view, "device2 unlock ") == ["force "]
    assert complete(view, "device1 status ") == ["help "]
    assert complete(view, "list ") == []


def test_complete_in_use_mode(view: LabView) -> None:
    assert complete(view, "re", device="device2") == ["repeat "]
    assert "status" in complete(view, "", device="device2")
    assert complete(view, "repeat h", device="device2") == ["help "]
    assert complete(view, "device1 st", device="device2") == ["status "]


def test_complete_device_meta(view: LabView) -> None:
    completer = ShellCompleter(lambda: view, lambda: None)
    metas = {c.text: c.display_meta_text for c in completer.get_completions(Document("dev"), CompleteEvent(True))}
    assert metas == {
        "device1": "device, online",
        "device2": "device, online, locked by bob",
        "device3": "device, OFFLINE",
    }


def test_complete_local_paths_for_file_arguments(
    view: LabView, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "test.txt").write_text("x")
    (tmp_path / "tdir").mkdir()
    monkeypatch.chdir(tmp_path)
    assert sorted(complete(view, "device3 file-transfer t")) == ["dir", "est.txt"]
    assert complete(view, "device3 file-transfer test.txt te") == ["st.txt"]
    assert complete(view, "device1 status t") == []  # status takes no files
    assert complete(view, "device1 status ./te") == ["st.txt"]  # ... but a path is a path


# ------------------------------------------------------------------ history location


def test_history_file_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert history_file() == str(tmp_path / "zdut" / "shell_history")
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert history_file() == str(tmp_path / ".local" / "state" / "zdut" / "shell_history")


# ------------------------------------------------------------------ script mode (stdin not a terminal)


def test_script_mode_grammar_and_the_first_error_ends_the_script(lab: Lab) -> None:
    """A script runs the shell's grammar line by line until a line fails: that line's status is the shell's,
    and nothing after it runs (each failing word and its status: test_shell_script.py)."""
    _, addr = lab.agent(CONF / "demo.yaml")
    script = (
        "help\n"
        "list\n"
        'device1 status "two words"\n'
        "use device2\n"
        "status\n"  # runs on device2
        "device1 status\n"  # another device, addressed in full
        "lock 10m\n"
        "..\n"
        "device3\n"
        "format json\n"
        "device2 unlock\n"
        "bogus status\n"  # an unknown device: a message, and the end of the script
        "list\n"  # never run
    )
    r = lab.zdut("-s", addr, "-u", "tester", "shell", input=script.encode(), timeout=20)
    out, err = r.stdout, r.stderr
    assert out.startswith("The one-shot CLI's grammar") and "use DEV " in out
    assert "- device1\n- device2\n- device3\n" in out
    assert "Called with 1 arguments\nArg 0: two words\n" in out
    assert "Called with 2 arguments\nArg 0: foo\nArg 1: bar\n" in out
    assert "Called with 0 arguments\n" in out
    assert '✓ Device "device2" locked by "tester" for 10m' in out
    assert "- file-transfer  Transfer a file\n- status         Report status\n" in out
    # a lock-result record in JSON, as `lock` gives (differences row 21)
    unlocked = out.rsplit("- status         Report status", 1)[1]
    assert '"contentType": "lock-result"' in unlocked and '"Locked": false' in unlocked
    assert json.loads(err)["data"] == 'device "bogus": no such device'  # the one error (in json by now)
    assert out.count("- device1") == 1  # nothing after the failing line ran
    assert r.returncode == 1


def test_script_mode_exit_status_is_the_first_failing_lines(lab: Lab) -> None:
    _, addr = lab.agent(CONF / "demo.yaml")
    assert lab.zdut("-s", addr, "shell", input=b"device1 status\nnope\n").returncode == 1
    r = lab.zdut("-s", addr, "shell", input=b"nope\ndevice1 status\n")
    assert r.returncode == 1 and "Called with" not in r.stdout  # it stopped at nope
    assert lab.zdut("-s", addr, "shell", input=b"nope\nexit 0\n").returncode == 1


def test_script_mode_without_a_server(lab: Lab) -> None:
    r = lab.zdut("-s", "127.0.0.1:1", "shell", input=b"list\ndevice1 status\n", timeout=20)
    assert r.stderr.count("cannot reach zdut server at 127.0.0.1:1") == 1, r.stderr  # and the script ends
    assert r.returncode == 1


def test_shell_takes_no_arguments(lab: Lab) -> None:
    r = lab.zdut("shell", "list")
    assert r.returncode == 2
    assert "zdut shell takes no arguments" in r.stderr


def test_the_tracker_closes_when_a_refresh_is_due_as_it_is_cancelled(lab: Lab) -> None:
    """A refresh poked (as every shell command does) in the same loop turn as the shell's exit cancels the
    refresh loop: Python 3.11's wait_for returned the poke instead of the cancel, the loop went on and the
    shell never exited after Ctrl-D (seen in CI)."""
    _, addr = lab.agent(CONF / "demo.yaml")

    async def scenario() -> None:
        tracker = Tracker(addr, "tester", lambda _: None, lambda: None)
        tracker.start()
        deadline = time.monotonic() + 10
        while not tracker.view.listed:  # the first refresh is in: the loop now waits for its next turn or a poke
            assert time.monotonic() < deadline, "no first refresh"
            await asyncio.sleep(0.01)
        for _ in range(5):
            await asyncio.sleep(0)
        tracker.poke()
        await asyncio.wait_for(tracker.close(), 5)

    asyncio.run(scenario())


def test_the_shell_keeps_its_view_when_the_broker_says_the_listing_is_unchanged(lab: Lab) -> None:
    """Each poll names the listing the shell holds; a broker whose listing has not changed sends no devices,
    and the shell keeps showing the ones it has, then takes the next change."""
    _, broker = lab.broker()
    lab.brokered_agent(CONF / "demo.yaml", broker)

    async def scenario() -> None:
        tracker = Tracker(broker, "tester", lambda _: None, lambda: None)
        await tracker._connect()
        client = tracker.client
        assert client is not None
        sent: list[int] = []  # how many devices each poll's reply carried
        listing = client.listing

        async def counted(match: str = "", known: int = 0) -> tuple[int, list[DeviceInfo] | None]:
            generation, devices = await listing(match, known)
            sent.append(-1 if devices is None else len(devices))
            return generation, devices

        client.listing = counted  # type: ignore[method-assign]
        for _ in range(3):
            await tracker._refresh(client)
        assert sent == [3, -1, -1] and sorted(tracker.view.devices) == ["device1", "device2", "device3"]
        await client.lock("device2", 300)
        deadline = time.monotonic() + 5
        while tracker.view.devices["device2"].lock is None:  # the agent tells the broker just after it answers
            assert time.monotonic() < deadline, f"the lock never reached the shell's view: {sent}"
            await tracker._refresh(client)
        assert sent[-1] == 3  # the change came with the whole listing
        await tracker.close()

    asyncio.run(scenario())
