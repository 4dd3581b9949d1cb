"""CurveZMQ key pairs (issue 12, point 1): ``zdut keys generate NAME [--dir DIR]`` and ``zdut keys show FILE``.

The files are exactly pyzmq's certificates (what ``zmq.auth.create_certificates`` writes and
``zmq.auth.load_certificate`` reads): ``DIR/NAME.key`` holds the public key, ``DIR/NAME.key_secret`` the public
and the secret key. NAME becomes the user's name on the sockets later, so it is checked here, once.

Defaults and exits: DIR is the current directory (as pyzmq's ``create_certificates`` and most key tools: the key
goes where you are, and the two paths written are printed); a missing DIR is created mode 0700. Usage problems
(no subcommand, a bad NAME, an unknown flag) exit 2 with the usage on stderr; a file that exists, cannot be
written or read, or is not a certificate exits 1 with one line naming the file.
"""

from __future__ import annotations

import datetime
import os
import stat
import struct
import sys
from pathlib import Path

import zmq
from zmq.utils import z85

PUBLIC_SUFFIX, SECRET_SUFFIX = ".key", ".key_secret"
NAME_MAX = 64
#: A certificate is some 400 bytes: anything much larger (``/dev/zero``, a disk image) is not one.
MAX_FILE_BYTES = 64 * 1024
USAGE = "usage: zdut keys generate NAME [--dir DIR]\n       zdut keys show FILE\n"
HELP = f"""{USAGE}
    generate  write a new CurveZMQ key pair: DIR/NAME.key (public, to give to the server's admin) and
              DIR/NAME.key_secret (secret, mode 0600); DIR defaults to the current directory and is
              created (mode 0700) if missing; an existing file is never overwritten
    show      print the public key (Z85, 40 characters) of a .key or .key_secret file; never the secret
"""

# pyzmq's banners (zmq/auth/certs.py), byte for byte, so that our files are indistinguishable from its own.
_SECRET_BANNER = """#   ****  Generated on {0} by pyzmq  ****
#   ZeroMQ CURVE **Secret** Certificate
#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.

"""
_PUBLIC_BANNER = """#   ****  Generated on {0} by pyzmq  ****
#   ZeroMQ CURVE Public Certificate
#   Exchange securely, or use a secure mechanism to verify the contents
#   of this file after exchange. Store public certificates in your home
#   directory, in the .curve subdirectory.

"""


class KeyFileError(Exception):
    """A key file that cannot be written or used; the message names the file."""


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a key pair (and later a user), or None."""
    if not name:
        return "is empty"
    if len(name) > NAME_MAX:
        return f"is longer than {NAME_MAX} characters"
    if "/" in name:
        return "contains '/'"  # a name, not a path: --dir says where
    if name.startswith("."):
        return "starts with '.'"  # hidden files, and '.', '..'
    if name.startswith("-"):
        return "starts with '-'"  # would read as a flag everywhere it is typed
    if not name.isprintable() or any(c.isspace() for c in name):
        return "contains a space or an unprintable character"  # also catches undecodable argv bytes (surrogates)
    return None


def certificate_text(banner: str, when: datetime.datetime, public: bytes, secret: bytes | None = None) -> str:
    """A certificate as pyzmq's ``_write_key_file`` writes it, with no metadata."""
    text = banner.format(when) + "metadata\n" + "curve\n" + f'    public-key = "{public.decode()}"\n'
    return text + (f'    secret-key = "{secret.decode()}"\n' if secret else "")


def generate(name: str, directory: Path) -> tuple[Path, Path]:
    """Write a new pair as ``directory/name.key`` and ``directory/name.key_secret``; return the two paths.

    Raises ValueError for a bad name, KeyFileError when a file exists or cannot be written."""
    problem = name_problem(name)
    if problem:
        raise ValueError(f"invalid key name {name!r}: {problem}")
    public_path, secret_path = directory / (name + PUBLIC_SUFFIX), directory / (name + SECRET_SUFFIX)
    for path in (public_path, secret_path):  # both checked first: refuse before writing either
        if os.path.lexists(path):
            raise KeyFileError(f"{path} already exists: not overwriting it (remove it, or choose another NAME)")
    try:
        public, secret = zmq.curve_keypair()
    except zmq.ZMQError as exc:  # a libzmq built without CURVE
        raise KeyFileError(f"cannot generate a CurveZMQ key pair: {exc}") from None
    _make_dirs(directory)
    now = datetime.datetime.now()
    _create(secret_path, certificate_text(_SECRET_BANNER, now, public, secret), 0o600)
    try:
        _create(public_path, certificate_text(_PUBLIC_BANNER, now, public), 0o644)
    except KeyFileError:
        secret_path.unlink()  # half a pair is worse than none: the next generate would refuse for it
        raise
    return public_path, secret_path


def _make_dirs(directory: Path) -> None:
    """Create ``directory`` and any missing parents, each mode 0700: key directories are nobody else's."""
    missing: list[Path] = []
    here = directory
    while not here.is_dir() and here != here.parent:
        missing.append(here)
        here = here.parent
    for path in reversed(missing):
        try:
            path.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            raise KeyFileError(f"cannot create directory {path}: {exc.strerror or exc}") from None


def _create(path: Path, text: str, mode: int) -> None:
    """Write a new file: O_EXCL so that nothing existing (nor a symlink) is replaced, and the mode given at
    creation, so that a secret file is never readable by others, not even between open and chmod."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode)
    except FileExistsError:
        raise KeyFileError(f"{path} already exists: not overwriting it") from None
    except OSError as exc:
        raise KeyFileError(f"cannot create {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            if mode == 0o600:
                os.fchmod(f.fileno(), 0o600)  # exactly 0600 whatever the umask (it can only have taken bits away)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # a key pair cut short by a crash would be refused later, far from its cause
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise KeyFileError(f"cannot write {path}: {exc.strerror or exc}") from None


def read_small_file(path: str | os.PathLike[str], limit: int, error: type[Exception],
                    too_big: str) -> tuple[bytes, int]:
    """The bytes and mode of a regular file of at most ``limit`` bytes; ``error`` with one line naming the path
    otherwise (``too_big`` says what a larger file is not). FileNotFoundError is left to the caller."""
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode  # of the file read, not of whatever the path names later
            if not stat.S_ISREG(mode):
                raise error(f"{path}: not a regular file")
            data = f.read(limit + 1)
    except (FileNotFoundError, error):
        raise
    except IsADirectoryError:
        raise error(f"{path}: not a regular file") from None
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise error(f"{path}: {too_big}")
    return data, mode


def _read(path: str | os.PathLike[str]) -> tuple[dict[str, bytes], int]:
    """The ``public-key``/``secret-key`` values of a certificate (read as pyzmq does) and the file's mode."""
    try:
        data, mode = read_small_file(path, MAX_FILE_BYTES, KeyFileError,
                                     f"not a CurveZMQ certificate (over {MAX_FILE_BYTES} bytes)")
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such file") from None
    found: dict[str, bytes] = {}
    for raw in data.splitlines():
        line = raw.strip()
        if line.startswith(b"#") or b"=" not in line:
            continue
        key, _, value = line.partition(b"=")
        label = key.strip().decode("ascii", "replace")
        if label in ("public-key", "secret-key"):
            found.setdefault(label, value.strip(b" \t'\""))  # the first one counts, as in pyzmq
    return found, stat.S_IMODE(mode)


def _z85_key(path: str | os.PathLike[str], found: dict[str, bytes], label: str) -> bytes:
    """The Z85 key under ``label``, checked to be 40 characters that decode to 32 bytes."""
    value = found[label]
    try:  # outside Z85's alphabet z85.decode raises KeyError; a group of 5 over 2**32, struct.error
        ok = len(value) == 40 and len(z85.decode(value)) == 32
    except (ValueError, KeyError, struct.error):
        ok = False
    if not ok:
        raise KeyFileError(f"{path}: malformed {label} (want 40 Z85 characters)")
    return value


def _public(path: str | os.PathLike[str], found: dict[str, bytes]) -> bytes:
    if "public-key" not in found:
        raise KeyFileError(f"{path}: not a CurveZMQ certificate (no public-key line)")
    return _z85_key(path, found, "public-key")


def load_public(path: str | os.PathLike[str]) -> bytes:
    """The public key (Z85) from a ``.key`` or a ``.key_secret`` file."""
    return _public(path, _read(path)[0])


def open_to_others(mode: int) -> bool:
    """Whether a secret file's mode lets group or others at it (ssh's rule: any of the 077 bits)."""
    return bool(mode & 0o077)


def load_pair(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """(public, secret), both Z85, from a ``.key_secret`` file that only its owner can read or write."""
    found, mode = _read(path)
    if "secret-key" not in found:
        raise KeyFileError(f"{path}: holds no secret-key (the secret key is in the NAME{SECRET_SUFFIX} file)")
    if open_to_others(mode):
        raise KeyFileError(f"{path}: permissions {mode:04o} are too open for a secret key file (chmod 600 {path})")
    public, secret = _public(path, found), _z85_key(path, found, "secret-key")
    if zmq.curve_public(secret) != public:
        raise KeyFileError(f"{path}: malformed: its public-key is not the secret-key's")
    return public, secret


def _split(args: list[str]) -> tuple[list[str], str | None, bool]:
    """(positionals, --dir value, help asked); flags may come before or after NAME, ``--`` ends them."""
    words: list[str] = []
    directory: str | None = None
    helped, i = False, 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            words.extend(args[i + 1:])
            break
        if arg in ("-h", "-help", "--help"):
            helped = True
        elif arg in ("-dir", "--dir"):
            if i + 1 == len(args):
                raise ValueError(f"flag needs an argument: {arg}")
            i += 1
            directory = args[i]
        elif arg.startswith(("-dir=", "--dir=")):
            directory = arg.partition("=")[2]
        elif arg.startswith("-") and arg != "-":
            raise ValueError(f"flag provided but not defined: {arg}")
        else:
            words.append(arg)
        i += 1
    if directory == "":
        raise ValueError("--dir: empty directory")
    return words, directory, helped


def main(args: list[str]) -> int:
    """``zdut keys ARGS...``: 0 done, 1 a file problem, 2 a usage problem."""
    try:
        words, directory, helped = _split(args)
        if helped:
            sys.stdout.write(HELP)
            return 0
        if not words:
            raise ValueError("missing subcommand: generate or show")
        if words[0] == "generate":
            if len(words) != 2:
                raise ValueError("generate takes one NAME" if len(words) > 2 else "generate: missing NAME")
            problem = name_problem(words[1])
            if problem:
                raise ValueError(f"invalid key name {words[1]!r}: {problem}")
            return _generate(words[1], Path(directory or "."))
        if words[0] == "show":
            if len(words) != 2 or directory is not None:
                raise ValueError("show takes one FILE (and no --dir)")
            return _show(words[1])
        raise ValueError(f"unknown subcommand {words[0]!r}: want generate or show")
    except ValueError as exc:
        sys.stderr.write(f"zdut keys: {exc}\n{USAGE}")
        return 2


def _generate(name: str, directory: Path) -> int:
    try:
        public_path, secret_path = generate(name, directory)
    except KeyFileError as exc:
        sys.stderr.write(f"zdut keys: {exc}\n")
        return 1
    sys.stdout.write(f"{public_path}  public key: give it to the server's admin\n"
                     f"{secret_path}  secret key (mode 0600): keep it to yourself\n")
    return 0


def _show(path: str) -> int:
    try:
        found, mode = _read(path)
        public = _public(path, found)
    except KeyFileError as exc:
        sys.stderr.write(f"zdut keys: {exc}\n")
        return 1
    if "secret-key" in found and open_to_others(mode):  # show still works; using it later will not
        sys.stderr.write(f"zdut keys: warning: {path}: permissions {mode:04o} are too open for a secret key "
                         f"file (chmod 600 {path})\n")
    sys.stdout.write(public.decode() + "\n")
    return 0
