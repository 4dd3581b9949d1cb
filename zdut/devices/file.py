"""The file module: copy one file between the client and the agent.

Path rules (dutctl's): the configured ``source``/``destination``
fix one or both ends; the single runtime argument supplies the rest, either as
one path or as ``src:dst``.  Paths the *user* chooses for the agent's side are
sanitized (relative, not escaping upwards); paths fixed in the config are
trusted because the agent's operator wrote them.

zdut's wording differs from dutctl in one place: a missing download source is
reported as ``source file "x" not found on the agent`` (dutctl says
"dutagent"), since zdut has no program called dutagent.
"""

from __future__ import annotations

import os
import posixpath
import stat

import msgspec

from zdut.common.flags import FlagError, parse_flags
from zdut.devices import scratch
from zdut.devices.base import FileArg, Module, ModuleError, Session

UPLOAD = "upload"
DOWNLOAD = "download"
DIR_MODE = 0o755


class FileOptions(msgspec.Struct, forbid_unknown_fields=True):
    operation: str = ""
    source: str = ""
    destination: str = ""
    # str | int so that an unquoted YAML 0755 (an int) is caught with a helpful message.
    permission: str | int = "0644"


def parse_permission(value: str | int) -> int:
    """``"0644"`` -> 0o644; dutctl insists on a leading 0 so nobody writes 644 meaning octal."""
    if isinstance(value, int):
        raise ModuleError(f"invalid permission {value}: write it as a quoted octal string such as '0644'")
    if not value.startswith("0"):
        raise ModuleError(f"invalid permission {value!r}: must be octal format starting with '0' (e.g., '0644')")
    try:
        mode = int(value, 8)
    except ValueError:
        raise ModuleError(f"invalid permission {value!r}: must be octal format (e.g., '0644')") from None
    if mode > 0o7777:
        raise ModuleError(f"invalid permission {value!r}: larger than 07777")
    return mode


def sanitize(path: str) -> str:
    """Clean a user-chosen agent path; refuse absolute paths and leading '..'."""
    cleaned = posixpath.normpath(path)
    if cleaned.startswith("/"):
        raise ModuleError(f"absolute paths are not allowed: {path!r}")
    if cleaned == ".." or cleaned.startswith("../"):
        raise ModuleError(f"paths with leading '..' are not allowed: {path!r}")
    return cleaned


def positional(args: list[str]) -> list[str]:
    """The operands, parsed like Go's ``flag.Parse`` with no flags defined: any ``-x`` before them is an error."""
    try:
        return parse_flags(args).rest
    except FlagError as exc:
        raise ModuleError(f"failed to parse arguments: {exc}") from None


def resolve_paths(source: str, destination: str, args: list[str]) -> tuple[str, str]:
    """(source, destination) from the configured ends and the runtime argument."""
    operands = positional(args)
    if source and destination:
        if operands:
            raise ModuleError("no path expected when both source and destination are configured")
        return source, destination
    if not operands:
        raise ModuleError("missing argument: path required")
    if len(operands) > 1:
        raise ModuleError(f"invalid argument count: expected 1 arg, got {len(operands)}")
    arg = operands[0]
    if not arg:
        raise ModuleError("destination path cannot be empty" if source else "source path cannot be empty")
    if ":" in arg:
        return _colon_paths(source, destination, arg)
    if source:
        return source, sanitize(arg)
    if destination:
        return arg, destination
    return arg, posixpath.basename(arg.rstrip("/")) or arg


def _colon_paths(source: str, destination: str, arg: str) -> tuple[str, str]:
    if source:
        raise ModuleError(f"cannot use colon syntax when source is configured: {source!r}")
    if destination:
        raise ModuleError(f"cannot use colon syntax when destination is configured: {destination!r}")
    parts = arg.split(":")
    if len(parts) != 2:
        raise ModuleError("colon syntax requires exactly one colon")
    src, dst = parts
    if not src:
        raise ModuleError("src path cannot be empty in 'src:dest' syntax")
    if not dst:
        raise ModuleError("destination path cannot be empty in 'src:dest' syntax")
    return sanitize(src), sanitize(dst)


class File(Module[FileOptions]):
    id = "file"
    Options = FileOptions

    def help(self) -> str:
        o = self.options
        op = o.operation or "<upload|download>"
        here, there = ("client", "agent") if o.operation != DOWNLOAD else ("agent", "client")
        src = o.source or "SRC"
        dst = o.destination or "DST"
        if o.source and o.destination:
            usage = "Arguments: none."
        elif o.source:
            usage = "Arguments: DST (relative to the agent's working directory for uploads; no leading '..')."
        elif o.destination:
            usage = "Arguments: SRC."
        else:
            usage = "Arguments: SRC[:DST]. Without DST the file keeps its base name."
        return (
            f"Transfer files between client and agent ({op}).\n"
            f"{usage}\n"
            f"Copies {src} on the {here} to {dst} on the {there}.\n"
            "with: operation (required: upload|download), source, destination (fix one or both ends),\n"
            f"      permission (octal string starting with 0, default 0644; now {o.permission}).\n"
        )

    def __init__(self, options: FileOptions) -> None:
        super().__init__(options)
        # Checked when the config loads (see ipmi), so --check-config refuses what start-up would.
        parse_permission(options.permission)
        if not options.operation:
            raise ModuleError("operation must be set in config: must be 'upload' or 'download'")
        if options.operation not in (UPLOAD, DOWNLOAD):
            raise ModuleError(f"invalid operation {options.operation!r}: must be 'upload' or 'download'")

    def file_args(self, args: list[str]) -> list[FileArg]:
        """The client's end, when the runtime argument names it: an upload's source, a download's
        destination (one side of ``src:dst``, or a source's base name).  A configured end is not one."""
        o = self.options
        try:
            src, dst = resolve_paths(o.source, o.destination, args)
        except ModuleError:
            return []
        if not args:
            return []  # both ends configured
        operand = len(args) - 1  # the one operand is the last argument (``--`` may precede it)
        side = None if ":" not in args[operand] else 0 if o.operation == UPLOAD else 1
        if o.operation == UPLOAD and not o.source:
            return [FileArg(operand, src, send=True, side=side)]
        if o.operation == DOWNLOAD and not o.destination:
            return [FileArg(operand, dst, receive=True, side=side)]
        return []

    async def run(self, session: Session, args: list[str]) -> None:
        o = self.options
        src, dst = resolve_paths(o.source, o.destination, args)
        if o.operation == UPLOAD:
            await self._upload(session, src, dst)
        elif o.operation == DOWNLOAD:
            await self._download(session, src, dst)
        else:
            raise ModuleError(f"invalid operation {o.operation!r}: must be 'upload' or 'download'")

    async def _upload(self, session: Session, src: str, dst: str) -> None:
        mode = parse_permission(self.options.permission)
        incoming = session.request_file(src)
        folder = os.path.dirname(dst) or "."
        try:
            os.makedirs(folder, DIR_MODE, exist_ok=True)
        except OSError as exc:
            raise ModuleError(f"failed to create parent directories for {dst!r}: {exc.strerror}") from None
        # A temp file beside the destination, renamed at the end: a failed or cancelled upload never
        # leaves a truncated file under the real name, and ``scratch.Beside`` removes the temp file on every
        # way out (and notes it, so that the next agent removes it if this one is killed meanwhile).
        try:
            staging = scratch.Beside(dst)
        except OSError as exc:
            raise ModuleError(f"failed to create destination file {dst!r}: {exc.strerror}") from None
        with staging:
            tmp, written = staging.path, 0
            try:
                with os.fdopen(staging.fd, "wb") as fh:
                    async for chunk in incoming:
                        fh.write(chunk)  # local-disk writes of one chunk are short enough for the event loop
                        written += len(chunk)
                os.chmod(tmp, mode)
                os.replace(tmp, dst)
            except OSError as exc:
                raise ModuleError(f"failed to write {dst!r}: {exc.strerror or exc}") from None
        await session.print(f"Upload complete: {src} -> {dst} ({written} bytes)\n")

    async def _download(self, session: Session, src: str, dst: str) -> None:
        try:
            info = os.stat(src)
        except FileNotFoundError:
            raise ModuleError(f'source file "{src}" not found on the agent') from None
        except OSError as exc:
            raise ModuleError(f'failed to open source file "{src}": {exc.strerror}') from None
        if not stat.S_ISREG(info.st_mode):
            raise ModuleError(f'source "{src}" is not a regular file')
        if not os.access(src, os.R_OK):
            raise ModuleError(f'failed to open source file "{src}": permission denied')
        await session.send_file(dst, src, info.st_size)
        await session.print(f"Download complete: {src} -> {dst} ({info.st_size} bytes)\n")

