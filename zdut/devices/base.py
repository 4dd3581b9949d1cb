"""The device-module contract: what a module implements and what a Session gives it.

A module sees only its typed options (``with:``), its runtime arguments and the
Session: never sockets or agent internals.  One instance exists per
(device, command, uses-entry); it is created when the config loads, initialised
once at agent start, reused for every run and de-initialised at shutdown.

Cancellation is asyncio cancellation: when the client cancels or disappears the
task running ``run`` is cancelled, so every ``await`` may raise CancelledError.
Modules that start processes kill them in a ``finally``/``except CancelledError``.
"""

from __future__ import annotations

import abc
import os
from collections.abc import AsyncIterator, Callable
from typing import Any, ClassVar, Generic, NamedTuple, Protocol, TypeVar

import msgspec

from zdut.protocol import Code, ZdutError


class ModuleError(ZdutError):
    """A module failure the client should see verbatim (Aborted "module failed: ...")."""

    def __init__(self, message: str, code: str = Code.ABORTED) -> None:
        super().__init__(code, message)


class NoOptions(msgspec.Struct, forbid_unknown_fields=True):
    """Options of a module that takes no ``with:`` keys."""


class FileArg(NamedTuple):
    """A client-side file that one of a module's arguments names, for one run (``Module.file_args``).

    The client sends or writes nothing else: a ``request_file`` or ``send_file`` for a path no module of the
    command declares is refused (PermissionDenied), however the user spelt the command line."""

    #: The position, in the module's own args for this run, of the argument that names the file.  It counts
    #: only if that argument is the user's: passed through, or a step arg that is exactly ``${name}``.
    arg: int
    #: The name the module gives ``request_file``/``send_file`` (the argument itself, one side of its
    #: ``src:dst``, its base name: whatever the module derives from it).
    path: str
    #: The client may send it: the module calls ``request_file(path)`` (an upload to the agent).
    send: bool = False
    #: The client may receive it: the module calls ``send_file(path, ...)`` (a download to the client).
    receive: bool = False
    #: 0 or 1 when only one side of a ``src:dst`` argument is the file: a templated step arg then counts if
    #: that side is exactly ``${name}`` (``${src}:/fixed``).  None: the argument as a whole.
    side: int | None = None


class IncomingFile(Protocol):
    """A file streaming from the client, opened by ``Session.request_file``."""

    path: str
    size: int  # bytes announced by the client

    def __aiter__(self) -> AsyncIterator[bytes]:
        """Chunks in order; raises ZdutError if the transfer fails or its SHA-256 differs."""
        ...


class Session(Protocol):
    """What a running command may do.  Every method may raise CancelledError."""

    device: str
    command: str
    user: str
    #: A module that can send a serial break sets this; the client's Ctrl-] b calls it (None: the user is told
    #: the command cannot).
    on_break: Callable[[], None] | None

    async def print(self, text: str) -> None:
        """Text for the user (dutctl's Print)."""

    async def stdout(self, data: bytes) -> None:
        """Console output to the client's stdout."""

    async def stderr(self, data: bytes) -> None:
        """Console output to the client's stderr."""

    async def read_stdin(self) -> bytes:
        """The next chunk of the client's stdin, b"" once it reached EOF."""

    async def readline(self) -> bytes:
        """One line of stdin including its newline; the final partial line at EOF; b"" after EOF."""

    def record_input(self, data: bytes) -> None:
        """Keep input the user typed in the device's journal (never shown to watchers).  A module calls it only
        where its config asks (input can hold passwords): the serial module's ``record_input: true``."""

    def request_file(self, name: str) -> IncomingFile:
        """Ask the client for the file ``name``; iterate the result for its bytes.  The client sends it only
        if ``Module.file_args`` declared ``name`` with ``send`` for this run."""

    async def send_file(self, name: str, source: str | os.PathLike[str] | AsyncIterator[bytes], size: int = -1) -> None:
        """Send a file to the client as ``name`` from a local path or an async byte iterator.  The client
        writes it only if ``Module.file_args`` declared ``name`` with ``receive`` for this run."""

    @property
    def terminal_size(self) -> tuple[int, int] | None:
        """(rows, cols) of the client's terminal when it runs in raw mode, else None."""


class Capture(Protocol):
    """Where a module's background work reports what its device does while no session runs
    (``Module.background``): the device's journal and its watchers."""

    def output(self, data: bytes) -> None:
        """What the device printed."""

    def note(self, text: str) -> None:
        """Something the journal and the watchers should know (the port went away)."""

    def gap(self, text: str) -> None:
        """Output was lost, and why (the port was gone for a while)."""


OptionsT = TypeVar("OptionsT", bound=msgspec.Struct)


class Module(abc.ABC, Generic[OptionsT]):
    """Base of every device module, generic in its options type: ``class Relay(Module[RelayOptions])``.

    Runs of one instance may overlap: two users (or one user twice) can run commands that share a module
    instance at the same time, each in its own task with its own Session.  So a module keeps nothing about
    a run on ``self``: temporary files, subprocesses, buffers and counters live in ``run``'s locals.
    ``self`` holds only what ``init`` set up and every run may share (a port registry, a parsed option),
    and anything shared and mutable is guarded (an ``asyncio.Lock``) or exclusive by design.
    """

    #: The id used in ``uses: - module: ID``.
    id: ClassVar[str] = ""
    #: The msgspec Struct that ``with:`` decodes into (the class named as ``OptionsT``).
    Options: ClassVar[type[msgspec.Struct]] = NoOptions
    #: True if the module reads stdin (the client then forwards it in raw mode on a terminal).
    interactive: ClassVar[bool] = False

    def __init__(self, options: OptionsT) -> None:
        self.options: OptionsT = options

    @abc.abstractmethod
    def help(self) -> str:
        """Usage text: arguments and ``with:`` keys."""

    async def init(self) -> None:
        """Check options and reach the hardware; raise to refuse to start."""

    async def deinit(self) -> None:
        """Release what init took; must be safe after a failed init."""

    def has_background(self) -> bool:
        """Whether ``background`` should run from init to deinit (the serial module's ``background: true``)."""
        return False

    async def background(self, capture: Capture) -> None:
        """Work done while no session runs, until cancelled at deinit; it reports through ``capture``.  Called
        only when ``has_background()``; it must give way to the module's own runs (it shares ``self``)."""

    def wants_terminal(self, args: list[str]) -> bool:
        """Whether this run reads the user's keystrokes (the client then uses raw mode on a terminal).

        Defaults to the class's ``interactive``; a module with both scripted and console modes decides
        per run from its arguments."""
        return self.interactive

    def file_args(self, args: list[str]) -> list[FileArg]:
        """The client-side files this run's arguments name, and which way each may move (see ``FileArg``).

        The agent tells the client (``RunStarted.files``), and the client transfers nothing else: a module
        that calls ``request_file`` or ``send_file`` declares those paths here.  ``args`` are this run's,
        unchecked (``run`` reports bad ones): declare what the module would transfer, nothing for args it
        would refuse.  The default declares nothing, so a module gets no file access."""
        return []

    @abc.abstractmethod
    async def run(self, session: Session, args: list[str]) -> None:
        """Run once with the resolved arguments; raise ModuleError to fail."""


def decode_options(module_cls: type[Module[Any]], raw: object) -> msgspec.Struct:
    """``with:`` mapping -> the module's typed options, naming the bad key on error."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"'with' must be a mapping, got {type(raw).__name__}")
    lowered = {str(k).lower(): v for k, v in raw.items()}
    # YAML reads `password: 1234` as a number; Go's yaml.v3 hands it to a string field as text.
    str_fields = {f.name for f in msgspec.structs.fields(module_cls.Options) if f.type in (str, str | None)}
    for key in str_fields & lowered.keys():
        value = lowered[key]
        if isinstance(value, int | float) and not isinstance(value, bool):
            lowered[key] = str(value)
    try:
        return msgspec.convert(lowered, module_cls.Options, strict=False)
    except msgspec.ValidationError as exc:
        text = str(exc)
        if "unknown field" in text:
            key = text.split("`")[1] if "`" in text else text
            allowed = ", ".join(module_cls.Options.__struct_fields__) or "none"
            raise ValueError(f"unknown 'with' key {key!r} (allowed: {allowed})") from None
        if " - at `$." in text:
            what, _, where = text.partition(" - at `$.")
            raise ValueError(f"bad 'with' key {where.rstrip('`')!r}: {what}") from None
        raise ValueError(f"bad 'with' options: {text}") from None
