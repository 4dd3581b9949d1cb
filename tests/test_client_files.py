"""Files the client writes and reads are handled where and how the user asked (issue 11, point 1).

Every case drives the real ``zdut`` CLI against a real agent serving conf/demo.yaml's ``device3
file-transfer SRC DST``: the agent asks for SRC, appends a marker and sends the result back as DST.  We run
as root here, so nothing touches the real /dev: FIFOs, device nodes and symlinks to /dev/stdout live in the
test's own directory.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import CONF, Lab, exe, wait_for
from zdut.devices.dummy import FT_SUFFIX

DATA = b"hello, file\n"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, str]]:
    """One agent (and the Lab that runs the CLI) for the module's tests."""
    lab = Lab(tmp_path_factory.mktemp("served"))
    try:
        _, addr = lab.agent(CONF / "demo.yaml")
        yield lab, addr
    finally:
        lab.close()


def ft(served: tuple[Lab, str], cwd: Path, src: str, dst: str,
       addr: str | None = None) -> subprocess.CompletedProcess[str]:
    lab, agent = served
    (cwd / "in.bin").write_bytes(DATA)
    return lab.zdut("-s", addr or agent, "device3", "file-transfer", src, dst, cwd=cwd)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.zdut-part"))


def assert_one_line_error(r: subprocess.CompletedProcess[str], text: str) -> None:
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "received" not in r.stdout, (r.stdout, r.stderr)
    assert [line for line in r.stderr.splitlines() if text in line] == [r.stderr.strip().splitlines()[-1]], r.stderr


@pytest.mark.parametrize("name", ["-", "/dev/stdout"])
def test_dash_and_dev_stdout_stream_to_stdout(served: tuple[Lab, str], tmp_path: Path, name: str) -> None:
    before = os.lstat("/dev/stdout")
    r = ft(served, tmp_path, "in.bin", name)
    assert r.returncode == 0, r.stderr
    assert DATA + FT_SUFFIX in r.stdout.encode()
    assert r.stdout.index(DATA.decode()) > r.stdout.index("Requesting file")  # in order with the output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.bin"]  # no file named "-"
    after = os.lstat("/dev/stdout")
    assert (stat.S_IFMT(after.st_mode), after.st_ino) == (stat.S_IFMT(before.st_mode), before.st_ino)


def test_a_symlink_to_stdout_streams_there_and_is_kept(served: tuple[Lab, str], tmp_path: Path) -> None:
    """What root's `zdut box ft big.bin /dev/stdout` used to replace: a link to this process's stdout pipe."""
    (tmp_path / "out").symlink_to("/dev/stdout")
    r = ft(served, tmp_path, "in.bin", "out")
    assert r.returncode == 0, r.stderr
    assert DATA + FT_SUFFIX in r.stdout.encode()
    assert os.readlink(tmp_path / "out") == "/dev/stdout"


def test_a_fifo_is_written_directly(served: tuple[Lab, str], tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # so the writer's open needs nobody else
    try:
        r = ft(served, tmp_path, "in.bin", "fifo")
        assert r.returncode == 0, r.stderr
        assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
        assert os.read(reader, 1 << 16) == DATA + FT_SUFFIX
        assert f'received "fifo" ({len(DATA + FT_SUFFIX)} B)' in r.stdout
    finally:
        os.close(reader)


def test_a_fifo_through_a_symlink_gets_a_large_file_through_a_broker(served: tuple[Lab, str], tmp_path: Path) -> None:
    """Several chunks, more than the pipe holds: the writer waits for its reader without stalling the session."""
    lab, _ = served
    _, broker = lab.broker()
    lab.brokered_agent(CONF / "demo.yaml", broker)
    big = os.urandom(3 * (1 << 20) + 5)
    (tmp_path / "big.bin").write_bytes(big)
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "link").symlink_to("fifo")
    with open(tmp_path / "copy.bin", "wb") as out:
        cat = subprocess.Popen(["cat", str(tmp_path / "fifo")], stdout=out)
    try:
        r = lab.zdut("-s", broker, "device3", "file-transfer", "big.bin", "link", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert cat.wait(timeout=30) == 0
    finally:
        cat.kill()
        cat.wait()
    assert (tmp_path / "copy.bin").read_bytes() == big + FT_SUFFIX
    assert os.readlink(tmp_path / "link") == "fifo" and stat.S_ISFIFO(os.lstat(tmp_path / "fifo").st_mode)
    assert leftovers(tmp_path) == []


def _node(path: Path, minor: int) -> None:
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, minor))
    except PermissionError:
        pytest.skip("making a device node needs root")


def test_a_character_device_is_written_directly(served: tuple[Lab, str], tmp_path: Path) -> None:
    _node(tmp_path / "null", 3)  # what /dev/null is
    r = ft(served, tmp_path, "in.bin", "null")
    assert r.returncode == 0, r.stderr
    assert stat.S_ISCHR(os.lstat(tmp_path / "null").st_mode)
    assert leftovers(tmp_path) == []


def test_a_device_that_fails_a_write_is_one_line_and_exit_1(served: tuple[Lab, str], tmp_path: Path) -> None:
    _node(tmp_path / "full", 7)  # what /dev/full is: every write fails with ENOSPC
    r = ft(served, tmp_path, "in.bin", "full")
    assert_one_line_error(r, 'cannot write "full": No space left on device')
    assert stat.S_ISCHR(os.lstat(tmp_path / "full").st_mode)


def test_a_symlink_is_followed_its_target_replaced_and_its_mode_kept(served: tuple[Lab, str], tmp_path: Path) -> None:
    target = tmp_path / "real.bin"
    target.write_bytes(b"old")
    target.chmod(0o751)
    (tmp_path / "link").symlink_to("real.bin")
    r = ft(served, tmp_path, "in.bin", "link")
    assert r.returncode == 0, r.stderr
    assert os.readlink(tmp_path / "link") == "real.bin"
    assert target.read_bytes() == DATA + FT_SUFFIX
    assert stat.S_IMODE(target.stat().st_mode) == 0o751
    assert leftovers(tmp_path) == []


def test_a_new_file_gets_the_umask_mode(served: tuple[Lab, str], tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        r = ft(served, tmp_path, "in.bin", "new.bin")
    finally:
        os.umask(old)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "new.bin").read_bytes() == DATA + FT_SUFFIX
    assert stat.S_IMODE((tmp_path / "new.bin").stat().st_mode) == 0o640


@pytest.mark.parametrize("through_broker", [False, True])
def test_a_directory_is_refused_before_any_byte_moves(served: tuple[Lab, str], tmp_path: Path,
                                                       through_broker: bool) -> None:
    lab, _ = served
    addr = None
    if through_broker:
        _, addr = lab.broker()
        lab.brokered_agent(CONF / "demo.yaml", addr)
    (tmp_path / "d").mkdir()
    r = ft(served, tmp_path, "in.bin", "d", addr)
    assert_one_line_error(r, 'cannot write "d": it is a directory')
    assert list((tmp_path / "d").iterdir()) == [] and leftovers(tmp_path) == []


def test_an_upload_from_a_directory_is_one_line_and_exit_1(served: tuple[Lab, str], tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    r = ft(served, tmp_path, "d", "out.bin")
    assert_one_line_error(r, 'cannot read "d": it is a directory')
    assert not (tmp_path / "out.bin").exists()


def test_an_upload_from_a_fifo_is_read_as_a_stream(served: tuple[Lab, str], tmp_path: Path) -> None:
    """A FIFO's size is unknown (fstat says 0): it is sent until its writer closes it."""
    os.mkfifo(tmp_path / "fifo")
    writer = subprocess.Popen(["sh", "-c", f"printf 'streamed bytes' > '{tmp_path / 'fifo'}'"])
    try:
        r = ft(served, tmp_path, "fifo", "out.bin")
        assert r.returncode == 0, r.stderr
    finally:
        writer.kill()
        writer.wait()
    assert (tmp_path / "out.bin").read_bytes() == b"streamed bytes" + FT_SUFFIX


def test_ctrl_c_while_a_fifo_waits_for_its_reader_ends_the_run_and_keeps_the_fifo(served: tuple[Lab, str],
                                                                                   tmp_path: Path) -> None:
    """The agent has sent everything and is done; the client still waits for a reader: SIGINT stops that."""
    lab, addr = served
    (tmp_path / "in.bin").write_bytes(DATA)
    os.mkfifo(tmp_path / "fifo")
    proc = lab.zdut_bg("-s", addr, "device3", "file-transfer", str(tmp_path / "in.bin"), str(tmp_path / "fifo"))
    wait_for(lambda: "File operated successfully" in proc.text() or not proc.alive(), 15, "the agent's Done")
    assert proc.alive(), proc.text()
    proc.kill(signal.SIGINT)
    assert proc.popen.wait(10) == 130, proc.text()
    assert "interrupted" in proc.text() and "Traceback" not in proc.text()
    assert stat.S_ISFIFO(os.lstat(tmp_path / "fifo").st_mode) and leftovers(tmp_path) == []


def test_a_full_disk_mid_download_is_one_line_and_leaves_no_temp_file(served: tuple[Lab, str], tmp_path: Path) -> None:
    """A 1 MiB tmpfs (in a mount namespace of its own, so nothing outside sees it) fills at the second chunk."""
    lab, addr = served
    if subprocess.run(["unshare", "-m", "mount", "-t", "tmpfs", "none", str(tmp_path)], capture_output=True).returncode:
        pytest.skip("needs a private mount namespace (root)")
    (tmp_path / "big.bin").write_bytes(os.urandom(3 << 20))
    small = tmp_path / "small"
    small.mkdir()
    script = ('mount -t tmpfs -o size=1m none "$1" || exit 99; '
              '"$2" -s "$3" device3 file-transfer big.bin "$1/out.bin"; rc=$?; echo "left: [$(ls -A "$1")]"; exit $rc')
    r = subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", str(small), exe("zdut"), addr],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path, env=lab.env)
    assert r.stdout.rstrip().endswith("left: []"), (r.stdout, r.stderr)
    assert_one_line_error(r, f'cannot write "{small}/out.bin": No space left on device')
