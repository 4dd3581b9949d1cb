"""The zdut wire contract: every message, status code, version and frame layout.

Frames on every socket are ``[header][payload?]``: the header is one msgspec ``Message`` (a tagged, array-like
Struct, a few dozen bytes); ``Data`` and ``FileChunk`` are followed by exactly one raw payload frame that relays
forward untouched.  ROUTER sockets see a routing-id frame in front.

Envelopes (see docs/protocol.md):

* client DEALER -> server ROUTER: ``[header][payload?]``
* broker -> agent DEALER: ``[client-id][header][payload?]``, and the agent answers with the same shape
  (a direct agent ROUTER delivers it too: the handlers cannot tell a broker sits in between).
* broker <-> agent control traffic uses an empty client-id frame ``b""``.

It imports nothing from zdut but the package version. Addresses are read in common/addresses.
"""

from __future__ import annotations

import re
from typing import Union, get_args

import msgspec

from zdut import __version__

VERSION = __version__  # zdut release, the package's: its semver major decides compatibility (dutctl's policy)
#: Longest header a server accepts from a peer; larger frames are dropped as garbage.
MAX_HEADER_BYTES = 64 * 1024
#: Longest header a client accepts from its server: listings of 10,000 devices are ~300 KiB.
MAX_REPLY_BYTES = 64 * 1024 * 1024
#: Largest payload chunk a sender emits (file chunks, console output).
CHUNK_SIZE = 1024 * 1024
#: Credit each side grants the other when a Run opens; stdin has its own window, so that unread console input
#: never starves a file transfer the module asks for later (docs/protocol.md).
INITIAL_WINDOW = 16 * 1024 * 1024
STDIN_WINDOW = 256 * 1024
WINDOW_MAIN, WINDOW_STDIN = 0, 1
#: Credit cost charged per stream message on top of its payload, so that a flood of empty messages is bounded too.
MESSAGE_COST = 1024
#: Session keepalive: each side pings when quiet this long, and gives up after SESSION_TIMEOUT of silence.
SESSION_PING_S = 1.0
SESSION_TIMEOUT_S = 4.0


class Code:
    """dutctl (Connect/gRPC) status codes, carried as strings."""

    OK = ""
    NOT_FOUND = "NotFound"
    INVALID_ARGUMENT = "InvalidArgument"
    FAILED_PRECONDITION = "FailedPrecondition"
    PERMISSION_DENIED = "PermissionDenied"
    UNAUTHENTICATED = "Unauthenticated"
    ABORTED = "Aborted"
    CANCELED = "Canceled"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    INTERNAL = "Internal"
    UNAVAILABLE = "Unavailable"
    ALREADY_EXISTS = "AlreadyExists"
    UNIMPLEMENTED = "Unimplemented"
    OUT_OF_RANGE = "OutOfRange"  # read past the end: an expect on a console whose session ended (zdut.expect)


class ZdutError(Exception):
    """An error with a dutctl status code; what every failure turns into on the wire."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message


class ProtocolError(Exception):
    """A frame that is not a valid zdut message."""


PRINT, STDOUT, STDERR, STDIN = 0, 1, 2, 3  # stream ids of Data frames


class _Msg(msgspec.Struct, array_like=True, tag=True, frozen=True):
    pass


# ---------------------------------------------------------------- shared shapes

class LockState(msgspec.Struct, array_like=True, frozen=True, gc=False):
    owner: str
    locked_at: int
    expires_at: int  # unix seconds; 0 = busy hold (no expiry)


class DeviceInfo(msgspec.Struct, array_like=True, frozen=True, gc=False):  # gc=False: no cycles; 100k fast
    name: str
    lock: LockState | None = None
    agent: str = ""
    online: bool = True
    failed: str = ""  # why its modules failed to initialise; "" = healthy
    watchers: int = 0  # `DEV watch` sessions following its output
    waiting: list[str] = msgspec.field(default_factory=list)  # its lock queue, first in line first


class CommandInfo(msgspec.Struct, array_like=True, frozen=True, gc=False):
    name: str
    help: str
    desc: str = ""  # the config's one-line desc; a peer or state file from before it sends [name, help]


class DeviceEntry(msgspec.Struct, array_like=True, frozen=True, gc=False):
    name: str
    commands: list[CommandInfo]
    failed: str = ""  # as DeviceInfo.failed


class AgentInfo(msgspec.Struct, array_like=True, frozen=True, gc=False):
    name: str
    devices: list[str]
    online: bool
    last_seen: float  # unix seconds
    version: str
    address: str = ""
    failed: dict[str, str] = msgspec.field(default_factory=dict)  # device -> why it failed to initialise


# ---------------------------------------------------------------- unary calls
# Every request carries the caller's zdut version and identity (dutctl's
# Dutctl-Version and From headers) so that any server can enforce the version
# policy without connection state: ZeroMQ reconnects silently.


class Hello(_Msg, tag="hello", frozen=True):
    rid: int
    version: str
    user: str


class Welcome(_Msg, tag="welcome", frozen=True):
    rid: int
    version: str
    role: str  # "agent" or "broker"
    name: str


class ListDevices(_Msg, tag="list", frozen=True):
    rid: int
    version: str
    user: str
    match: str = ""  # only the devices whose names match this glob (fnmatchcase); a server before it lists all
    known: int = 0  # the listing the caller holds (its DeviceList.generation): if current, no devices are sent


class DeviceList(_Msg, tag="devices", frozen=True):
    rid: int
    devices: list[DeviceInfo]
    generation: int = 0  # this listing's number at this server (0: unnumbered); == known: what the caller holds


class ListCommands(_Msg, tag="cmds", frozen=True):
    rid: int
    version: str
    user: str
    device: str


class CommandList(_Msg, tag="cmdlist", frozen=True):
    rid: int
    commands: list[str]
    descs: list[str] = msgspec.field(default_factory=list)  # the desc of each command, "" for none


class GetDetails(_Msg, tag="details", frozen=True):
    rid: int
    version: str
    user: str
    device: str
    command: str
    keyword: str


class Details(_Msg, tag="detail", frozen=True):
    rid: int
    text: str


class Lock(_Msg, tag="lock", frozen=True):
    rid: int
    version: str
    user: str
    device: str
    duration_s: int  # 0 = the agent's default


class LockResult(_Msg, tag="locked", frozen=True):
    rid: int
    device: str
    lock: LockState


class Unlock(_Msg, tag="unlock", frozen=True):
    rid: int
    version: str
    user: str
    device: str
    force: bool


class Unlocked(_Msg, tag="unlocked", frozen=True):
    rid: int
    broke: str = ""  # a forced unlock: the owner whose lock (reservation or busy hold) it broke
    cancelled: int = 0  # ... and how many of that owner's running sessions it cancelled


class ListAgents(_Msg, tag="agents", frozen=True):
    rid: int
    version: str
    user: str


class AgentList(_Msg, tag="agentlist", frozen=True):
    rid: int
    agents: list[AgentInfo]


class Forget(_Msg, tag="forget", frozen=True):
    rid: int
    version: str
    user: str
    agent: str  # an offline agent for a broker to drop, with its devices (``zdut forget``)


class Forgotten(_Msg, tag="forgotten", frozen=True):
    rid: int
    agent: str
    devices: list[str]


class Error(_Msg, tag="error", frozen=True):
    rid: int
    code: str
    message: str


# ---------------------------------------------------------------- Run sessions
# sid is chosen by the client, unique per client connection.  Every session
# message after RunOpen carries seq: 1, 2, 3 ... per direction, so a gap is
# detected at once.  Data and FileChunk cost credit (payload + MESSAGE_COST);
# so do FileRequest/FileOpen/FileEnd/FileAbort/StdinEof (MESSAGE_COST).


#: RunOpen.mode: what a session is, besides running one of the device's commands.
WATCH, JOURNAL, QUEUE = "watch", "log", "queue"


class RunOpen(_Msg, tag="run", frozen=True):
    """``mode`` "" runs ``command``; WATCH follows the device's output; JOURNAL reads its journal; QUEUE waits
    for its lock (``args``: lock and wait seconds), then writes the granted ``LockState`` as JSON on stdout.
    ``stdin_closed``: the client sends no input, so no StdinEof follows (RunStarted says whether it was taken)."""
    sid: int
    version: str
    user: str
    device: str
    command: str
    args: list[str]
    mode: str = ""
    stdin_closed: bool = False


class RunStarted(_Msg, tag="started", frozen=True):
    """Agent -> client, first session message: the command passed the lock check
    and runs; ``interactive`` tells the client to offer raw mode on a terminal.
    ``files``: the only client paths the run may move, path -> "send" | "receive" |
    "both" (the modules' declared file arguments; docs/protocol.md, "Which files")."""

    sid: int
    seq: int
    interactive: bool
    files: dict[str, str] = msgspec.field(default_factory=dict)
    stdin_closed: bool = False  # RunOpen.stdin_closed was taken (an agent from before it leaves it False)


class Data(_Msg, tag="data", frozen=True):
    """Console or print bytes; the bytes are the next frame."""

    sid: int
    seq: int
    stream: int


class StdinEof(_Msg, tag="eof", frozen=True):
    sid: int
    seq: int


class FileRequest(_Msg, tag="freq", frozen=True):
    """Agent asks the client for a file that RunStarted.files declares for sending."""

    sid: int
    seq: int
    xfer: int
    path: str


class FileOpen(_Msg, tag="fopen", frozen=True):
    """Sender starts a transfer of ``size`` bytes (either direction)."""

    sid: int
    seq: int
    xfer: int
    path: str
    size: int


class FileChunk(_Msg, tag="fchunk", frozen=True):
    """Bytes at ``offset`` of transfer ``xfer``; the bytes are the next frame."""

    sid: int
    seq: int
    xfer: int
    offset: int


class FileEnd(_Msg, tag="fend", frozen=True):
    sid: int
    seq: int
    xfer: int
    sha256: bytes


class FileAbort(_Msg, tag="fabort", frozen=True):
    sid: int
    seq: int
    xfer: int
    code: str
    message: str


class Credit(_Msg, tag="credit", frozen=True):
    sid: int
    seq: int
    nbytes: int
    window: int = WINDOW_MAIN  # WINDOW_STDIN for stdin credit


class Ping(_Msg, tag="ping", frozen=True):
    sid: int
    seq: int


class Cancel(_Msg, tag="cancel", frozen=True):
    sid: int
    seq: int


class Break(_Msg, tag="break", frozen=True):
    """Client -> agent: send a serial break (the console's Ctrl-] b); a command that cannot says so."""
    sid: int
    seq: int


class Resize(_Msg, tag="resize", frozen=True):
    """The client's terminal changed size."""

    sid: int
    seq: int
    rows: int
    cols: int


class Done(_Msg, tag="done", frozen=True):
    """The final message of a session: code "" is success."""

    sid: int
    seq: int
    code: str
    message: str


# ---------------------------------------------------------------- broker <-> agent

class Register(_Msg, tag="register", frozen=True):
    version: str
    agent: str  # stable agent name: who may take this registration over
    instance: str  # random per agent process
    address: str  # the agent's own direct address, informative only
    devices: list[DeviceEntry]
    locks: dict[str, LockState]  # the effective hold of each held device (a reservation shadows a busy hold)
    busy: dict[str, LockState] = msgspec.field(default_factory=dict)  # busy holds shadowed by a reservation


class Registered(_Msg, tag="registered", frozen=True):
    broker: str
    version: str
    heartbeat_ms: int


class Refused(_Msg, tag="refused", frozen=True):
    code: str
    message: str


class Heartbeat(_Msg, tag="hb", frozen=True):
    pass


class Reregister(_Msg, tag="rereg", frozen=True):
    """The broker does not know this peer (it restarted or expired it)."""


class LockChanged(_Msg, tag="lockchg", frozen=True):
    """Agent -> broker: a device's listed state changed (its hold, who watches it, who waits for it)."""
    device: str
    lock: LockState | None  # the effective hold, as listed
    busy: LockState | None = None  # a busy hold under that reservation: listed once the reservation expires
    watchers: int = 0
    waiting: list[str] = msgspec.field(default_factory=list)  # its lock queue


class SessionGone(_Msg, tag="gone", frozen=True):
    """Broker -> agent: the client of session (peer, sid) is unreachable."""

    peer: bytes
    sid: int


Message = Union[
    Hello, Welcome, ListDevices, DeviceList, ListCommands, CommandList, GetDetails, Details,
    Lock, LockResult, Unlock, Unlocked, ListAgents, AgentList, Forget, Forgotten, Error,
    RunOpen, RunStarted, Data, StdinEof, FileRequest, FileOpen, FileChunk, FileEnd, FileAbort,
    Credit, Ping, Cancel, Break, Resize, Done,
    Register, Registered, Refused, Heartbeat, Reregister, LockChanged, SessionGone,
]

#: Messages followed by exactly one payload frame.
WITH_PAYLOAD = (Data, FileChunk)
#: Requests a server answers with one reply carrying the same rid.
UNARY_REQUESTS = (Hello, ListDevices, ListCommands, GetDetails, Lock, Unlock, ListAgents, Forget)
#: Messages of a Run session after RunOpen (everything that carries sid and seq), as a type and a tuple.
SessionMessage = Union[RunStarted, Data, StdinEof, FileRequest, FileOpen, FileChunk, FileEnd, FileAbort,
                       Credit, Ping, Cancel, Break, Resize, Done]
SESSION: tuple[type[SessionMessage], ...] = get_args(SessionMessage)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)

encode = _encoder.encode


def decode(frame: bytes | memoryview, limit: int = MAX_HEADER_BYTES) -> Message:
    """Decode a header frame, raising ProtocolError for anything that is not one."""
    if len(frame) > limit:
        raise ProtocolError(f"header of {len(frame)} bytes exceeds {limit}")
    try:
        return _decoder.decode(frame)
    except (msgspec.DecodeError, ValueError) as exc:  # invalid UTF-8 in a str field is a UnicodeDecodeError
        raise ProtocolError(str(exc)) from None


# ---------------------------------------------------------------- versions
_SEMVER = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?$")

COMPATIBLE, TOLERATED, INCOMPATIBLE = "compatible", "tolerated", "incompatible"


def compare_versions(a: str, b: str) -> tuple[str, str]:
    """dutctl's compat.Compare: (level, reason) for two semver strings."""
    ma, mb = _SEMVER.match(a or ""), _SEMVER.match(b or "")
    if not ma or not mb:
        return TOLERATED, "versions not comparable"
    if ma.group(1) != mb.group(1):
        return INCOMPATIBLE, "major version mismatch"
    if ma.group(2) != mb.group(2):
        return TOLERATED, "minor version mismatch"
    if ma.group(4) != mb.group(4):
        return TOLERATED, "pre-release version mismatch"
    return COMPATIBLE, ""


def check_version(server_role: str, server_version: str, peer_version: str, peer_role: str = "client") -> None:
    """Raise FailedPrecondition for a major mismatch: what a server does before any handler (the peer is a
    client), and a broker before it accepts a registration (the peer is an agent)."""
    level, reason = compare_versions(server_version, peer_version)
    if level == INCOMPATIBLE:
        raise ZdutError(Code.FAILED_PRECONDITION,
                        f"incompatible zdut versions: {server_role} {server_version}, {peer_role} {peer_version} "
                        f"({reason})")


def version_drift(client_version: str, server_role: str, server_version: str) -> str | None:
    """The client's warning for a tolerated drift, or None."""
    level, reason = compare_versions(client_version, server_version)
    if level != TOLERATED:
        return None
    ca, sa = _SEMVER.match(client_version or ""), _SEMVER.match(server_version or "")
    relation = "differs from"
    if ca and sa:
        ka, kb = (tuple(int(x) for x in m.groups()[:3]) for m in (ca, sa))
        relation = "is older than" if ka < kb else "is newer than" if ka > kb else "differs from"
    return f"zdut client {client_version} {relation} {server_role} {server_version} ({reason})"
