"""file module: dutctl's path rules, permissions, errors and chunked streaming.

The agent side is a temporary working directory; the client side is a
LocalSession serving files from another one.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml

from zdut.devices import get
from zdut.devices.base import ModuleError, decode_options
from zdut.devices.file import File, resolve_paths
from zdut.devices.testing import LocalSession
from zdut.protocol import CHUNK_SIZE, Code, ZdutError

ROOT = Path(__file__).resolve().parent.parent


def run(coro):
    return asyncio.run(coro)


def module(**with_keys) -> File:
    mod = File(decode_options(File, with_keys))
    run(mod.init())
    return mod


@pytest.fixture
def client(tmp_path: Path) -> Path:
    folder = tmp_path / "client"
    folder.mkdir()
    return folder


@pytest.fixture
def agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The agent's working directory (relative destinations land here)."""
    folder = tmp_path / "agent"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.part"))


def test_registry_maps_id() -> None:
    assert get("file") is File


# ------------------------------------------------------------------ path rules


@pytest.mark.parametrize(
    ("source", "destination", "args", "expected"),
    [
        # both configured: no argument
        ("/srv/a", "/srv/b", [], ("/srv/a", "/srv/b")),
        # source only: the argument is the destination, sanitized
        ("/srv/a", "", ["out/b"], ("/srv/a", "out/b")),
        ("/srv/a", "", ["x/../y//b"], ("/srv/a", "y/b")),
        # destination only: the argument is the source, taken as is
        ("", "/srv/b", ["/home/me/../a"], ("/home/me/../a", "/srv/b")),
        # neither: the argument is the source, the destination its base name
        ("", "", ["dir/sub/a.bin"], ("dir/sub/a.bin", "a.bin")),
        ("", "", ["/abs/a.bin"], ("/abs/a.bin", "a.bin")),
        # neither, src:dst: both parts sanitized
        ("", "", ["./a.bin:d/./b.bin"], ("a.bin", "d/b.bin")),
        # "--" ends flag parsing, "-" alone is an operand
        ("", "", ["--", "-odd"], ("-odd", "-odd")),
        ("", "", ["-"], ("-", "-")),
        # ".." inside a name is not a parent reference
        ("/srv/a", "", ["..b"], ("/srv/a", "..b")),
    ],
)
def test_resolve_paths(source: str, destination: str, args: list[str], expected: tuple[str, str]) -> None:
    assert resolve_paths(source, destination, args) == expected


@pytest.mark.parametrize(
    ("source", "destination", "args", "error"),
    [
        ("/srv/a", "/srv/b", ["x"], "no path expected when both source and destination are configured"),
        ("/srv/a", "", ["/etc/passwd"], "absolute paths are not allowed"),
        ("/srv/a", "", ["../up"], "paths with leading '..' are not allowed"),
        ("/srv/a", "", ["a/../../up"], "paths with leading '..' are not allowed"),
        ("", "", ["a:/etc/passwd"], "absolute paths are not allowed"),
        ("", "", ["../a:b"], "paths with leading '..' are not allowed"),
        ("", "", ["a:b:c"], "colon syntax requires exactly one colon"),
        ("", "", [":b"], "src path cannot be empty"),
        ("", "", ["a:"], "destination path cannot be empty"),
        ("/srv/a", "", ["x:y"], "cannot use colon syntax when source is configured"),
        ("", "/srv/b", ["x:y"], "cannot use colon syntax when destination is configured"),
        ("", "", [], "missing argument: path required"),
        ("", "", ["a", "b"], "invalid argument count: expected 1 arg, got 2"),
        ("", "", ["-f", "a"], "failed to parse arguments: flag provided but not defined: -f"),
        ("", "", ["--f=1", "a"], "failed to parse arguments: flag provided but not defined: -f"),
        ("", "", ["-h"], "failed to parse arguments: flag: help requested"),
        ("", "", ["---a"], "failed to parse arguments: bad flag syntax: ---a"),
        ("", "", [""], "source path cannot be empty"),
        ("/srv/a", "", [""], "destination path cannot be empty"),
    ],
)
def test_resolve_paths_errors(source: str, destination: str, args: list[str], error: str) -> None:
    with pytest.raises(ModuleError, match=error):
        resolve_paths(source, destination, args)


# ------------------------------------------------------------------ upload


def test_upload_to_base_name_in_agent_cwd(client: Path, agent: Path) -> None:
    (client / "fw.bin").write_bytes(b"firmware")
    session = LocalSession(files_dir=client)
    run(module(operation="upload").run(session, ["fw.bin"]))
    target = agent / "fw.bin"
    assert target.read_bytes() == b"firmware"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert session.prints == ["Upload complete: fw.bin -> fw.bin (8 bytes)\n"]
    assert leftovers(agent) == []


def test_upload_colon_syntax_creates_directories(client: Path, agent: Path) -> None:
    (client / "fw.bin").write_bytes(b"abc")
    session = LocalSession(files_dir=client)
    run(module(operation="upload").run(session, ["fw.bin:deep/er/copy.bin"]))
    assert (agent / "deep/er/copy.bin").read_bytes() == b"abc"
    assert stat.S_IMODE((agent / "deep/er").stat().st_mode) & 0o755 == 0o755
    assert session.prints == ["Upload complete: fw.bin -> deep/er/copy.bin (3 bytes)\n"]


def test_upload_configured_destination_and_permission(client: Path, agent: Path, tmp_path: Path) -> None:
    (client / "install.sh").write_text("#!/bin/sh\n")
    dest = tmp_path / "opt" / "scripts" / "install.sh"
    session = LocalSession(files_dir=client)
    run(module(operation="upload", destination=str(dest), permission="0755").run(session, ["install.sh"]))
    assert dest.read_text() == "#!/bin/sh\n"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o755  # exactly, whatever the umask
    assert session.prints == [f"Upload complete: install.sh -> {dest} (10 bytes)\n"]


def test_upload_configured_source_takes_destination_argument(client: Path, agent: Path) -> None:
    (client / "device.conf").write_text("k=v\n")
    session = LocalSession(files_dir=client)
    run(module(operation="upload", source="device.conf").run(session, ["etc/device.conf"]))
    assert (agent / "etc/device.conf").read_text() == "k=v\n"


def test_upload_both_configured_takes_no_argument(client: Path, agent: Path) -> None:
    (client / "a.txt").write_text("A")
    mod = module(operation="upload", source="a.txt", destination="b.txt", permission="0600")
    run(mod.run(LocalSession(files_dir=client), []))
    assert (agent / "b.txt").read_text() == "A"
    assert stat.S_IMODE((agent / "b.txt").stat().st_mode) == 0o600
    with pytest.raises(ModuleError, match="no path expected"):
        run(mod.run(LocalSession(files_dir=client), ["c.txt"]))


def test_upload_missing_client_file(client: Path, agent: Path) -> None:
    with pytest.raises(ZdutError) as info:
        run(module(operation="upload").run(LocalSession(files_dir=client), ["nope.bin"]))
    assert info.value.code == Code.NOT_FOUND
    assert list(agent.iterdir()) == []


class InterruptedUpload(LocalSession):
    """A client whose upload runs ``after_first_chunk`` once the first chunk is delivered."""

    async def after_first_chunk(self, name: str) -> None:
        raise NotImplementedError

    def request_file(self, name: str):
        outer = super().request_file(name)
        session = self

        class Incoming:
            path, size = outer.path, outer.size

            async def __aiter__(self) -> AsyncIterator[bytes]:
                async for chunk in outer:
                    yield chunk
                    await session.after_first_chunk(name)

        return Incoming()


class BrokenTransfer(InterruptedUpload):
    """The upload fails after the first chunk (e.g. a SHA-256 mismatch)."""

    async def after_first_chunk(self, name: str) -> None:
        raise ZdutError(Code.ABORTED, f"file {name!r}: SHA-256 mismatch")


def test_failed_upload_leaves_no_file_and_keeps_the_old_one(client: Path, agent: Path) -> None:
    (client / "fw.bin").write_bytes(os.urandom(3 * CHUNK_SIZE))
    (agent / "fw.bin").write_bytes(b"old")
    with pytest.raises(ZdutError, match="SHA-256 mismatch"):
        run(module(operation="upload").run(BrokenTransfer(files_dir=client), ["fw.bin"]))
    assert (agent / "fw.bin").read_bytes() == b"old"
    assert leftovers(agent) == []
    with pytest.raises(ZdutError, match="SHA-256 mismatch"):
        run(module(operation="upload").run(BrokenTransfer(files_dir=client), ["fw.bin:new.bin"]))
    assert not (agent / "new.bin").exists()
    assert leftovers(agent) == []


def test_cancelled_upload_removes_the_partial_file(client: Path, agent: Path) -> None:
    (client / "fw.bin").write_bytes(os.urandom(2 * CHUNK_SIZE))

    class Stalls(InterruptedUpload):
        async def after_first_chunk(self, name: str) -> None:
            await asyncio.Event().wait()  # the client goes quiet

    mod = module(operation="upload")

    async def scenario() -> None:
        task = asyncio.create_task(mod.run(Stalls(files_dir=client), ["fw.bin"]))
        while not leftovers(agent):  # the temp file exists once the first chunk is written
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(asyncio.wait_for(scenario(), 5))
    assert list(agent.iterdir()) == []


def test_multi_megabyte_upload_streams_chunk_by_chunk(client: Path, agent: Path) -> None:
    data = os.urandom(5 * 1024 * 1024 + 123)
    (client / "big.bin").write_bytes(data)
    seen_on_disk: list[int] = []

    class Watching(LocalSession):
        def request_file(self, name: str):
            outer = super().request_file(name)

            class Incoming:
                path, size = outer.path, outer.size

                async def __aiter__(self) -> AsyncIterator[bytes]:
                    async for chunk in outer:
                        yield chunk
                        # back here only when the module asks for the next chunk: what is on disk now?
                        seen_on_disk.append(sum(p.stat().st_size for p in agent.rglob("*.part")))

            return Incoming()

    session = Watching(files_dir=client)
    run(module(operation="upload").run(session, ["big.bin"]))
    assert hashlib.sha256((agent / "big.bin").read_bytes()).digest() == hashlib.sha256(data).digest()
    chunks = -(-len(data) // CHUNK_SIZE)
    assert len(seen_on_disk) == chunks
    # every full chunk reached the disk before the next one was requested: nothing piles up in memory
    assert seen_on_disk[:-1] == [(i + 1) * CHUNK_SIZE for i in range(chunks - 1)]
    assert session.prints == [f"Upload complete: big.bin -> big.bin ({len(data)} bytes)\n"]


# ------------------------------------------------------------------ download


def test_download_configured_source(agent: Path) -> None:
    (agent / "log.txt").write_text("line\n")
    session = LocalSession()
    run(module(operation="download", source="log.txt").run(session, ["logs/today.txt"]))
    assert session.sent_files == {"logs/today.txt": b"line\n"}
    assert session.prints == ["Download complete: log.txt -> logs/today.txt (5 bytes)\n"]


def test_download_neither_configured_uses_base_name(agent: Path, tmp_path: Path) -> None:
    source = tmp_path / "var" / "dut.log"
    source.parent.mkdir()
    source.write_bytes(b"x" * 10)
    session = LocalSession()
    run(module(operation="download").run(session, [str(source)]))
    assert session.sent_files == {"dut.log": b"x" * 10}


def test_download_colon_and_configured_destination(agent: Path) -> None:
    (agent / "a.bin").write_bytes(b"A")
    session = LocalSession()
    run(module(operation="download").run(session, ["a.bin:copy/b.bin"]))
    assert session.sent_files == {"copy/b.bin": b"A"}
    session = LocalSession()
    run(module(operation="download", destination="fixed.bin").run(session, ["a.bin"]))
    assert session.sent_files == {"fixed.bin": b"A"}


def test_download_client_path_is_sanitized(agent: Path) -> None:
    (agent / "log.txt").write_text("x")
    with pytest.raises(ModuleError, match="absolute paths are not allowed"):
        run(module(operation="download", source="log.txt").run(LocalSession(), ["/home/me/.bashrc"]))


def test_download_missing_source(agent: Path) -> None:
    session = LocalSession()
    with pytest.raises(ModuleError, match=r'^source file "gone.txt" not found on the agent$'):
        run(module(operation="download").run(session, ["gone.txt"]))
    assert session.sent_files == {}


def test_download_directory_is_refused(agent: Path) -> None:
    (agent / "dir").mkdir()
    with pytest.raises(ModuleError, match="is not a regular file"):
        run(module(operation="download").run(LocalSession(), ["dir"]))


def test_multi_megabyte_download(agent: Path) -> None:
    data = os.urandom(4 * 1024 * 1024 + 7)
    (agent / "big.bin").write_bytes(data)
    session = LocalSession()
    run(module(operation="download").run(session, ["big.bin:got.bin"]))
    assert session.sent_files["got.bin"] == data
    assert session.prints == [f"Download complete: big.bin -> got.bin ({len(data)} bytes)\n"]


# ------------------------------------------------------------------ options


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({}, "operation must be set in config"),
        ({"operation": "copy"}, "invalid operation 'copy'"),
        ({"operation": "upload", "permission": "644"}, "must be octal format starting with '0'"),
        ({"operation": "upload", "permission": "0998"}, "must be octal format"),
        ({"operation": "upload", "permission": 493}, "quoted octal string"),
    ],
)
def test_init_rejects_bad_options(options: dict, error: str) -> None:
    with pytest.raises(ModuleError, match=error):
        run(File(decode_options(File, options)).init())


def test_with_keys_are_lowercased_and_checked() -> None:
    options = decode_options(File, {"Operation": "download", "SOURCE": "/x"})
    assert (options.operation, options.source, options.permission) == ("download", "/x", "0644")
    with pytest.raises(ValueError, match="unknown 'with' key 'mode'"):
        decode_options(File, {"operation": "upload", "mode": "0644"})


def test_help_follows_the_configuration() -> None:
    assert "SRC[:DST]" in File(decode_options(File, {"operation": "upload"})).help()
    text = File(decode_options(File, {"operation": "download", "source": "/var/log/x"})).help()
    assert "Arguments: DST" in text and "/var/log/x on the agent" in text
    for key in ("operation", "source", "destination", "permission"):
        assert key in text


def test_example_config_decodes() -> None:
    config = yaml.safe_load((ROOT / "conf" / "file.yaml").read_text())
    steps = [s for d in config["devices"].values() for c in d["cmds"].values() for s in c["uses"]]
    assert steps and all(s["module"] == "file" for s in steps)
    for step in steps:
        run(File(decode_options(File, step["with"])).init())
