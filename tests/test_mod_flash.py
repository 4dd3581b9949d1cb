"""flash and flash-emulate modules.

Real flashing runs flashrom (Debian package ``flashrom``) with its ``dummy``
programmer emulating a 128 KiB M25P10 chip whose contents persist in a file.
em100 and dpcmd cannot be installed here (not packaged, need USB hardware), so
those tests use small recording scripts placed first on PATH; so do the
streaming and cancellation tests, which need a tool that waits on the test.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from modhelpers import alive
from modhelpers import until as wait_for
from standins.flash_tools import IGNORES_TERM, RECORDER, RUNS_UNTIL_TERM, WAITS_FOR_GO, install

from zdut.devices import get
from zdut.devices.base import ModuleError, decode_options
from zdut.devices.flash import Flash, FlashEmulate
from zdut.devices.testing import LocalSession

ROOT = Path(__file__).resolve().parent.parent
CHIP_SIZE = 128 * 1024  # M25P10
needs_flashrom = pytest.mark.skipif(
    shutil.which("flashrom") is None, reason="flashrom not installed (apt-get install flashrom)"
)


def run(coro):
    return asyncio.run(coro)


def flash(**with_keys) -> Flash:
    return Flash(decode_options(Flash, with_keys))


def emulate(**with_keys) -> FlashEmulate:
    return FlashEmulate(decode_options(FlashEmulate, with_keys))


@pytest.fixture(autouse=True)
def no_leftovers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Work directories go to a private TMPDIR that must be empty after every test."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    yield
    assert sorted(p.name for p in tmp.iterdir()) == []


@pytest.fixture
def client(tmp_path: Path) -> Path:
    folder = tmp_path / "client"
    folder.mkdir()
    return folder


@pytest.fixture
def fake_bin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder first on PATH for fake tools; $FAKE_DIR is where they record."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "record"
    record.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("FAKE_DIR", str(record))
    return bin_dir


def test_registry_maps_ids() -> None:
    assert get("flash") is Flash
    assert get("flash-emulate") is FlashEmulate


# ------------------------------------------------------------------ flashrom, real


@needs_flashrom
def test_write_then_read_back_with_flashrom_dummy(tmp_path: Path, client: Path) -> None:
    chip = tmp_path / "chip.bin"
    image = os.urandom(CHIP_SIZE)
    (client / "fw.bin").write_bytes(image)
    mod = flash(tool="flashrom", programmer=f"dummy:emulate=M25P10.RES,image={chip}")

    async def scenario() -> tuple[LocalSession, LocalSession]:
        await mod.init()
        try:
            wrote = LocalSession(files_dir=client)
            await mod.run(wrote, ["write", "fw.bin"])
            read = LocalSession(files_dir=client)
            await mod.run(read, ["read", "back.bin"])
            assert list(Path(tempfile.gettempdir()).iterdir()) == []  # the work files go after each run
            return wrote, read
        finally:
            await mod.deinit()

    wrote, read = run(scenario())
    assert chip.read_bytes() == image  # the emulated chip really holds the image
    assert hashlib.sha256(read.sent_files["back.bin"]).digest() == hashlib.sha256(image).digest()
    assert wrote.prints[0].startswith("Executing: ") and " -w " in wrote.prints[0]
    assert 'Found Micron/Numonyx/ST flash chip "M25P10"' in wrote.text
    assert "VERIFIED" in wrote.text
    assert wrote.prints[-1] == "Flash operation completed successfully\n"
    assert " -r " in read.prints[0]


@needs_flashrom
def test_programmer_initialization_failure_is_explained(tmp_path: Path, client: Path) -> None:
    mod = flash(tool="flashrom", programmer="dummy:emulate=NO_SUCH_CHIP")
    session = LocalSession(files_dir=client)
    run(mod.init())
    with pytest.raises(ModuleError, match="programmer initialization failed, check if the programmer hardware"):
        run(mod.run(session, ["read", "x.bin"]))
    assert "Programmer initialization failed" in session.text  # the tool's own words reached the client
    assert session.sent_files == {}


@needs_flashrom
def test_tool_failure_reports_exit_code(tmp_path: Path, client: Path) -> None:
    (client / "small.bin").write_bytes(b"x" * 100)  # wrong size for the chip
    mod = flash(tool="flashrom", programmer=f"dummy:emulate=M25P10.RES,image={tmp_path / 'chip.bin'}")
    session = LocalSession(files_dir=client)
    run(mod.init())
    with pytest.raises(ModuleError, match=r"^flash tool exited with code 1$"):
        run(mod.run(session, ["write", "small.bin"]))
    assert "Flash operation completed successfully\n" not in session.prints


def test_missing_flashrom_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH
    with pytest.raises(ModuleError, match=r'flash tool "flashrom" not found on PATH .*apt-get install flashrom'):
        run(flash(tool="flashrom", programmer="dummy").init())


# ------------------------------------------------------------------ option checks


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"programmer": "dummy"}, "tool must be configured"),
        ({"tool": "/bin/cat", "programmer": "dummy"}, "unsupported; supported tools are flashrom, flashprog, dpcmd"),
        ({"tool": "flashprog", "programmer": "dummy"}, 'flash tool "flashprog" not found on PATH .*not packaged'),
    ],
)
def test_init_rejects_bad_options(options: dict, error: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ModuleError, match=error):
        run(flash(**options).init())


def test_programmer_required_except_for_dpcmd(fake_bin: Path) -> None:
    install(fake_bin, "flashrom", RECORDER)
    install(fake_bin, "dpcmd", RECORDER)
    with pytest.raises(ModuleError, match="programmer must be configured"):
        run(flash(tool="flashrom").init())
    mod = flash(tool="dpcmd")
    run(mod.init())
    run(mod.deinit())


def test_unknown_with_key_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown 'with' key 'chip'"):
        decode_options(Flash, {"tool": "flashrom", "chip": "x"})


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ([], "missing argument: flash operation"),
        (["erase", "x"], 'unknown operation "erase"'),
        (["write"], "missing argument: image file name"),
        (["read", "a", "b"], "expected 2 arguments"),
    ],
)
def test_run_rejects_bad_arguments(args: list[str], error: str, fake_bin: Path) -> None:
    install(fake_bin, "flashrom", RECORDER)
    mod = flash(tool="flashrom", programmer="dummy")
    run(mod.init())
    with pytest.raises(ModuleError, match=error):
        run(mod.run(LocalSession(), args))
    run(mod.deinit())


# ------------------------------------------------------------------ dpcmd command line (fake tool)


@pytest.mark.parametrize(
    ("programmer", "op", "expected"),
    [
        ("", "write", ["-u", "IMG"]),
        (2, "write", ["--device", "2", "-u", "IMG"]),
        ("1", "read", ["--device", "1", "-r", "IMG"]),
    ],
)
def test_dpcmd_arguments(programmer, op: str, expected: list[str], fake_bin: Path, client: Path) -> None:
    install(fake_bin, "dpcmd", RECORDER)
    (client / "fw.bin").write_bytes(b"image")
    mod = flash(tool="dpcmd", programmer=programmer)
    session = LocalSession(files_dir=client)

    async def scenario() -> None:
        await mod.init()
        if op == "read":  # the fake writes no image, so read fails after the tool ran
            with pytest.raises(ModuleError, match="wrote no image"):
                await mod.run(session, [op, "fw.bin"])
        else:
            await mod.run(session, [op, "fw.bin"])
        await mod.deinit()

    run(scenario())
    argv = (Path(os.environ["FAKE_DIR"]) / "argv").read_text().splitlines()
    image = argv[-1]
    assert Path(image).name == "image"
    assert [("IMG" if a == image else a) for a in argv] == expected
    assert "fake dpcmd ran" in session.text


# ------------------------------------------------------------------ streaming and cancellation (fake tool)


def test_tool_output_streams_while_the_tool_runs(fake_bin: Path, client: Path, tmp_path: Path, monkeypatch) -> None:
    install(fake_bin, "flashrom", WAITS_FOR_GO)
    go = tmp_path / "go"
    monkeypatch.setenv("GO_FILE", str(go))
    (client / "fw.bin").write_bytes(b"image")
    mod = flash(tool="flashrom", programmer="dummy")
    session = LocalSession(files_dir=client)

    async def scenario() -> None:
        await mod.init()
        task = asyncio.create_task(mod.run(session, ["write", "fw.bin"]))
        # The tool blocks until "go" exists, so "first line" can only be seen if it is forwarded live.
        await wait_for(lambda: "first line" in session.text, "the tool's first line while it runs")
        assert "second line" not in session.text
        go.touch()
        await asyncio.wait_for(task, 10)
        await mod.deinit()

    run(scenario())
    text = session.text
    assert text.index("first line") < text.index("second line") < text.index("Flash operation completed")


async def _cancel_write(mod: Flash, session: LocalSession) -> float:
    """Start a write, cancel it once the tool runs; return how long the cancel took."""
    await mod.init()
    task = asyncio.create_task(mod.run(session, ["write", "fw.bin"]))
    await wait_for(lambda: "started" in session.text, "the tool to start")
    start = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    elapsed = time.monotonic() - start
    await mod.deinit()
    return elapsed


def test_cancel_sends_sigterm_to_the_process_group(fake_bin: Path, client: Path) -> None:
    install(fake_bin, "flashrom", RUNS_UNTIL_TERM)
    record = Path(os.environ["FAKE_DIR"])
    (client / "fw.bin").write_bytes(b"image")
    mod = flash(tool="flashrom", programmer="dummy")
    session = LocalSession(files_dir=client)

    elapsed = run(_cancel_write(mod, session))
    assert (record / "terminated").read_text().strip() == "terminated"  # its TERM trap ran
    assert not alive(int((record / "pid").read_text()))
    assert elapsed < Flash.TERM_GRACE_S  # it ended on SIGTERM, not by the SIGKILL fallback


def test_cancel_kills_a_tool_that_ignores_sigterm(fake_bin: Path, client: Path, monkeypatch) -> None:
    install(fake_bin, "flashrom", IGNORES_TERM)
    monkeypatch.setattr(Flash, "TERM_GRACE_S", 0.3)
    record = Path(os.environ["FAKE_DIR"])
    (client / "fw.bin").write_bytes(b"image")
    mod = flash(tool="flashrom", programmer="dummy")
    session = LocalSession(files_dir=client)

    elapsed = run(_cancel_write(mod, session))
    assert not alive(int((record / "pid").read_text()))
    assert elapsed >= 0.3  # it was given the grace period first
    assert not (record / "terminated").exists()


# ------------------------------------------------------------------ flash-emulate (fake em100)


def test_flash_emulate_runs_em100_with_dutctls_arguments(fake_bin: Path, client: Path) -> None:
    """em100 is not installable here: a recording script named em100 stands in for it."""
    install(fake_bin, "em100", RECORDER)
    record = Path(os.environ["FAKE_DIR"])
    image = os.urandom(4096)
    (client / "fw.rom").write_bytes(image)
    mod = emulate(chip="W25Q128FV", device=2)
    session = LocalSession(files_dir=client)

    async def scenario() -> None:
        await mod.init()
        await mod.run(session, ["fw.rom"])
        kept = mod._kept
        assert kept is not None and (kept / "image").read_bytes() == image  # kept until the next run or deinit
        await mod.run(LocalSession(files_dir=client), ["fw.rom"])
        assert not kept.exists()
        workdir = mod._kept
        assert workdir is not None and workdir.is_dir()
        await mod.deinit()
        assert mod._kept is None and not workdir.exists()

    run(scenario())
    argv = (record / "argv").read_text().splitlines()
    assert argv[:5] == ["--device", "2", "--stop", "--set", "W25Q128FV"]
    assert argv[5] == "-d" and Path(argv[6]).name == "image"
    assert argv[7:] == ["-v", "--start"]
    assert (record / "image").read_bytes() == image
    executing = session.prints[0]
    assert executing.startswith(f"Executing: {fake_bin / 'em100'} --device 2 --stop --set W25Q128FV -d ")
    assert executing.endswith(" -v --start\n")
    assert "fake em100 ran" in session.text
    assert session.prints[-1] == "Emulation started successfully\n"


def test_flash_emulate_without_device(fake_bin: Path, client: Path) -> None:
    install(fake_bin, "em100", RECORDER)
    (client / "fw.rom").write_bytes(b"rom")
    mod = emulate(chip="N25Q256A13")
    run(mod.init())
    run(mod.run(LocalSession(files_dir=client), ["fw.rom"]))
    run(mod.deinit())
    argv = (Path(os.environ["FAKE_DIR"]) / "argv").read_text().splitlines()
    assert argv[:3] == ["--stop", "--set", "N25Q256A13"]


@pytest.mark.parametrize(
    ("body", "said", "ended"),
    [
        (RECORDER, "fake em100 ran\n", "exited with code 2"),  # RECORDER exits with $FAKE_EXIT
        ("echo dying\nkill -9 $$\n", "dying\n", "terminated by signal SIGKILL"),
    ],
)
def test_flash_emulate_tool_failure(
    fake_bin: Path, client: Path, monkeypatch: pytest.MonkeyPatch, body: str, said: str, ended: str
) -> None:
    install(fake_bin, "em100", body)
    monkeypatch.setenv("FAKE_EXIT", "2")
    (client / "fw.rom").write_bytes(b"rom")
    mod = emulate(chip="N25Q256A13")
    run(mod.init())
    session = LocalSession(files_dir=client)
    with pytest.raises(ModuleError, match=rf"^emulation tool {ended}$"):
        run(mod.run(session, ["fw.rom"]))
    assert said in session.text  # the tool's output reached the client before the failure
    assert mod._kept is None and list(Path(tempfile.gettempdir()).iterdir()) == []  # the failed image is gone
    assert "Emulation started successfully\n" not in session.prints
    run(mod.deinit())


def test_flash_emulate_missing_em100_says_how_to_get_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ModuleError, match=r'emulation tool "em100" not found on PATH .*util/em100'):
        run(emulate(chip="W25Q128FV").init())


def test_flash_emulate_needs_chip_and_one_argument(fake_bin: Path) -> None:
    install(fake_bin, "em100", RECORDER)
    with pytest.raises(ModuleError, match="chip must be configured"):
        run(emulate().init())
    mod = emulate(chip="W25Q128FV")
    run(mod.init())
    with pytest.raises(ModuleError, match="missing argument: image file path"):
        run(mod.run(LocalSession(), []))
    with pytest.raises(ModuleError, match="expected 1 argument"):
        run(mod.run(LocalSession(), ["a", "b"]))
    run(mod.deinit())


def test_help_documents_arguments_and_keys() -> None:
    text = flash(tool="flashrom", programmer="dediprog").help()
    assert "read|write <image>" in text and "programmer" in text and "'dediprog'" in text
    text = emulate(chip="W25Q128FV", device="1").help()
    for word in ("<image>", "tool", "chip", "device", "em100"):
        assert word in text


@pytest.mark.parametrize(("name", "cls"), [("flash.yaml", Flash), ("flash-emulate.yaml", FlashEmulate)])
def test_example_configs_decode(name: str, cls: type) -> None:
    config = yaml.safe_load((ROOT / "conf" / name).read_text())
    steps = [s for d in config["devices"].values() for c in d["cmds"].values() for s in c["uses"]]
    assert steps and all(s["module"] == cls.id for s in steps)
    for step in steps:
        decode_options(cls, step.get("with"))


# ------------------------------------------------------------------ concurrent runs, end to end

#: A real flashrom behind a wrapper that waits (bounded) until two runs are inside the tool at once, then
#: prints the SHA-256 of the image it is about to flash, so each client can see which image its run wrote.
_OVERLAP = """\
for a; do [ "$prev" = "-w" ] && img="$a"; prev="$a"; done
touch "{barrier}/$$"
i=0
while [ "$(ls "{barrier}" | wc -l)" -lt 2 ] && [ "$i" -lt 1000 ]; do i=$((i + 1)); sleep 0.01; done
echo "flashing image sha256 $(sha256sum "$img" | cut -d' ' -f1)"
exec {flashrom} "$@"
"""


@needs_flashrom
def test_two_concurrent_writes_each_flash_their_own_image(lab, tmp_path: Path) -> None:
    """Two `flash write` of one module instance at once (same user) each write and verify their own image."""
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    tool = install(tmp_path / "wrap", "flashrom", _OVERLAP.format(barrier=barrier, flashrom=shutil.which("flashrom")))
    cfg = tmp_path / "flash.yaml"
    cfg.write_text(yaml.safe_dump({"version": "0.1.0", "devices": {"board": {"cmds": {"flash": {"uses": [{
        "module": "flash", "passthrough": True,
        "with": {"tool": str(tool), "programmer": f"dummy:emulate=M25P10.RES,image={tmp_path / 'chip.bin'}"},
    }]}}}}}))
    _, addr = lab.agent(cfg)
    images = {name: os.urandom(CHIP_SIZE) for name in ("a.bin", "b.bin")}
    for name, data in images.items():
        (lab.tmp / name).write_bytes(data)
    clients = {name: lab.zdut_bg("-s", addr, "board", "flash", "write", name, name=name) for name in images}
    for proc in clients.values():
        proc.popen.wait(60)
    for name, proc in clients.items():
        text = proc.text()
        assert proc.popen.returncode == 0, text
        assert f"flashing image sha256 {hashlib.sha256(images[name]).hexdigest()}" in text, text
        assert "VERIFIED" in text and "Flash operation completed successfully" in text
    assert len(list(barrier.iterdir())) == 2  # both runs really were in the tool at once
