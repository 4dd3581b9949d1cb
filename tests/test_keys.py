"""``zdut keys generate NAME [--dir DIR]`` and ``zdut keys show FILE`` (issue 12, point 1): CurveZMQ key pairs in
pyzmq's certificate format, the secret file created 0600, nothing overwritten; and the loader the CURVE work will
use, which refuses a secret file open to others.

The CLI runs as the real ``zdut`` process; the loader is tested in-process."""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest
import zmq
import zmq.auth

from conftest import Lab, exe
from zdut.common import keys
from zdut.terminal.commands import HELP

USAGE_LINE = "usage: zdut keys generate NAME [--dir DIR]"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def generated(lab: Lab, name: str = "alice", *extra: str) -> tuple[Path, Path]:
    r = lab.zdut("keys", "generate", name, *extra)
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    return lab.tmp / f"{name}.key", lab.tmp / f"{name}.key_secret"


def test_generate_writes_a_pair_that_pyzmq_loads(lab: Lab) -> None:
    r = lab.zdut("keys", "generate", "alice")
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    assert [line.split()[0] for line in r.stdout.splitlines()] == ["alice.key", "alice.key_secret"]  # the cwd
    public_file, secret_file = lab.tmp / "alice.key", lab.tmp / "alice.key_secret"
    public, none = zmq.auth.load_certificate(public_file)
    public_too, secret = zmq.auth.load_certificate(secret_file)
    assert none is None and secret is not None
    assert public == public_too and len(public) == len(secret) == 40
    assert zmq.curve_public(secret) == public


def test_the_files_are_pyzmqs_own_format(lab: Lab, tmp_path: Path) -> None:
    ours = generated(lab)
    (tmp_path / "pyzmq").mkdir()
    theirs = [Path(p) for p in zmq.auth.create_certificates(tmp_path / "pyzmq", "alice")]

    def shape(path: Path) -> str:  # the keys and the date differ; everything else must not
        text = re.sub(r'-key = ".{40}"', '-key = "KEY"', path.read_text())
        return re.sub(r"Generated on \S+ \S+ by", "Generated on DATE by", text)

    assert [shape(p) for p in ours] == [shape(p) for p in theirs]
    assert ours[0].read_text().count('-key = "') == 1 and ours[1].read_text().count('-key = "') == 2


def test_secret_file_is_0600_and_a_new_dir_0700_whatever_the_umask(lab: Lab) -> None:
    public_file, secret_file = generated(lab)
    assert mode(secret_file) == 0o600 and mode(public_file) == 0o644  # the runner's umask is 022
    r = subprocess.run(["sh", "-c", f"umask 000; exec '{exe('zdut')}' keys generate bob --dir new/sub"],
                       capture_output=True, text=True, cwd=lab.tmp, env=lab.env, timeout=30)
    assert r.returncode == 0, r.stderr
    new = lab.tmp / "new"
    assert (mode(new), mode(new / "sub"), mode(new / "sub" / "bob.key_secret")) == (0o700, 0o700, 0o600)
    assert r.stdout.splitlines()[1].startswith("new/sub/bob.key_secret")
    r = subprocess.run(["sh", "-c", f"umask 277; exec '{exe('zdut')}' keys generate carol"],  # takes owner bits
                       capture_output=True, text=True, cwd=lab.tmp, env=lab.env, timeout=30)
    assert r.returncode == 0 and mode(lab.tmp / "carol.key_secret") == 0o600, r.stderr


def test_the_secret_file_is_created_0600_never_chmod_after(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: dict[str, tuple[int, int]] = {}
    real_open, real_chmod = os.open, os.chmod

    def recording_open(path: str, flags: int, mode: int = 0o777, *args: object, **kw: object) -> int:
        opened[os.fspath(path)] = (flags, mode)
        return real_open(path, flags, mode)

    def no_chmod(*args: object, **kw: object) -> None:
        raise AssertionError("chmod after creation leaves a window")

    monkeypatch.setattr(os, "open", recording_open)
    monkeypatch.setattr(os, "chmod", no_chmod)
    keys.generate("carol", tmp_path)
    monkeypatch.setattr(os, "chmod", real_chmod)
    flags, created = opened[str(tmp_path / "carol.key_secret")]
    assert flags & os.O_CREAT and flags & os.O_EXCL and created == 0o600
    assert opened[str(tmp_path / "carol.key")][0] & os.O_EXCL


def test_a_second_generate_refuses_and_changes_nothing(lab: Lab) -> None:
    public_file, secret_file = generated(lab)
    before = public_file.read_bytes(), secret_file.read_bytes()
    r = lab.zdut("keys", "generate", "alice")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("zdut keys: alice.key already exists") and r.stderr.count("\n") == 1, r.stderr
    assert (public_file.read_bytes(), secret_file.read_bytes()) == before

    secret_file.unlink()  # either file alone is enough to refuse, and then neither is written
    r = lab.zdut("keys", "generate", "alice")
    assert r.returncode == 1 and "alice.key already exists" in r.stderr
    assert not secret_file.exists() and public_file.read_bytes() == before[0]
    public_file.unlink()
    secret_file.write_bytes(before[1])
    r = lab.zdut("keys", "generate", "alice")
    assert r.returncode == 1 and "alice.key_secret already exists" in r.stderr and not public_file.exists()


@pytest.mark.parametrize("name", ["", ".hidden", "..", "a/b", "x" * 65, "sp ace", "tab\tname", "bell\a", "-x"])
def test_bad_names_are_usage_errors_and_write_nothing(lab: Lab, name: str) -> None:
    r = lab.zdut("keys", "generate", name)
    assert r.returncode == 2 and r.stdout == "", r.stderr
    assert r.stderr.startswith("zdut keys: ") and USAGE_LINE in r.stderr
    assert not [p for p in lab.tmp.iterdir() if p.name.endswith((".key", ".key_secret"))]


def test_a_64_character_name_and_an_at_sign_are_fine(lab: Lab) -> None:
    for name in ("x" * 64, "alice@laptop"):
        public_file, secret_file = generated(lab, name)
        assert public_file.exists() and secret_file.exists()


@pytest.mark.parametrize("args", [[], ["frob"], ["generate"], ["generate", "a", "b"], ["show"],
                                  ["generate", "a", "--dir"], ["generate", "a", "--bogus"]])
def test_usage_errors_go_to_stderr_with_exit_2(lab: Lab, args: list[str]) -> None:
    r = lab.zdut("keys", *args)
    assert (r.returncode, r.stdout) == (2, ""), r.stderr
    assert r.stderr.startswith("zdut keys: ") and USAGE_LINE in r.stderr


def test_help_goes_to_stdout_with_exit_0(lab: Lab) -> None:
    for flag in ("-h", "--help"):
        r = lab.zdut("keys", flag)
        assert (r.returncode, r.stderr) == (0, "") and r.stdout.startswith(USAGE_LINE) and "0600" in r.stdout
    assert "keys generate NAME" in HELP


def test_show_prints_the_public_key_of_either_file_never_the_secret(lab: Lab) -> None:
    public_file, secret_file = generated(lab)
    public, secret = zmq.auth.load_certificate(secret_file)
    assert secret is not None
    for path in (public_file, secret_file):
        r = lab.zdut("keys", "show", path.name)
        assert (r.returncode, r.stdout, r.stderr) == (0, public.decode() + "\n", "")
        assert secret.decode() not in r.stdout + r.stderr


def test_show_of_a_missing_or_malformed_file_is_one_line_exit_1(lab: Lab) -> None:
    (lab.tmp / "garbage.key").write_text("hello\nworld\n")
    (lab.tmp / "short.key").write_text('curve\n    public-key = "abc"\n')
    (lab.tmp / "alphabet.key").write_text('curve\n    public-key = "' + "~" * 40 + '"\n')
    cases = {"missing.key": "no such file", "garbage.key": "no public-key line", "short.key": "malformed public-key",
             "alphabet.key": "malformed public-key", ".": "not a regular file", "/dev/null": "not a regular file"}
    for name, why in cases.items():
        r = lab.zdut("keys", "show", name)
        assert (r.returncode, r.stdout) == (1, ""), (name, r.stdout)
        assert r.stderr.startswith(f"zdut keys: {name}: ") and why in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1, r.stderr


def test_show_warns_of_a_secret_file_open_to_others(lab: Lab) -> None:
    _, secret_file = generated(lab)
    secret_file.chmod(0o644)
    r = lab.zdut("keys", "show", secret_file.name)
    assert r.returncode == 0 and len(r.stdout) == 41
    assert "permissions 0644 are too open" in r.stderr


def test_the_loader_refuses_a_secret_file_open_to_others(tmp_path: Path) -> None:
    public_file, secret_file = keys.generate("dave", tmp_path)
    public, secret = keys.load_pair(secret_file)
    assert keys.load_public(public_file) == keys.load_public(secret_file) == public
    assert zmq.curve_public(secret) == public
    for too_open in (0o644, 0o640, 0o604, 0o620):
        secret_file.chmod(too_open)
        with pytest.raises(keys.KeyFileError, match=f"{secret_file}: permissions {too_open:04o} are too open"):
            keys.load_pair(secret_file)
    secret_file.chmod(0o400)  # owner-only, even read-only, is fine
    assert keys.load_pair(secret_file) == (public, secret)


def test_the_loader_names_each_bad_file(tmp_path: Path) -> None:
    public_file, secret_file = keys.generate("erin", tmp_path)
    with pytest.raises(keys.KeyFileError, match="holds no secret-key"):
        keys.load_pair(public_file)
    with pytest.raises(keys.KeyFileError, match=f"{tmp_path / 'nope.key_secret'}: no such file"):
        keys.load_pair(tmp_path / "nope.key_secret")
    other, _ = zmq.curve_keypair()
    text = secret_file.read_text()
    mismatched = tmp_path / "mismatched.key_secret"
    mismatched.write_text(re.sub(r'public-key = ".{40}"', f'public-key = "{other.decode()}"', text))
    mismatched.chmod(0o600)
    with pytest.raises(keys.KeyFileError, match="is not the secret-key's"):
        keys.load_pair(mismatched)
    with pytest.raises(ValueError, match=r"starts with '\.'"):
        keys.generate(".x", tmp_path)


def test_no_half_pair_is_left_when_the_public_file_cannot_be_written(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open

    def failing_open(path: str, flags: int, mode: int = 0o777, *args: object, **kw: object) -> int:
        if os.fspath(path).endswith(".key"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", failing_open)
    with pytest.raises(keys.KeyFileError, match=r"cannot create .*frank\.key: Permission denied"):
        keys.generate("frank", tmp_path)
    assert list(tmp_path.iterdir()) == []
