"""The listing answers every zdut server gives, and the error texts of a failed lookup.

An agent answers from its configuration and a broker from its registry; both build their replies here, so
that a client sees the same replies and the same errors from either (docs/protocol.md, "Unary calls").
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from zdut.common.flags import go_quote
from zdut.protocol import (
    MAX_HEADER_BYTES,
    UNARY_REQUESTS,
    VERSION,
    AgentInfo,
    AgentList,
    Code,
    CommandList,
    Details,
    DeviceInfo,
    DeviceList,
    Done,
    Error,
    GetDetails,
    Hello,
    ListAgents,
    ListCommands,
    ListDevices,
    Message,
    RunOpen,
    Welcome,
    ZdutError,
    encode,
)

_SERVED_BY = {"agent": "an agent", "broker": "the broker"}


def no_such_device(device: str) -> ZdutError:
    """What an agent says of a device it does not serve (dutctl's agent's words)."""
    return ZdutError(Code.NOT_FOUND, f'device "{device}": no such device')


def device_not_found(device: str) -> ZdutError:
    """What a broker says of a device no agent registered (dutctl's proxy's words, which differ from its
    agents': ``device "X" not found``)."""
    return ZdutError(Code.NOT_FOUND, f'device "{device}" not found')


def no_such_command(device: str, command: str) -> ZdutError:
    return ZdutError(Code.NOT_FOUND, f'device "{device}", command "{command}": no such command')


def listing(
    msg: Message,
    role: str,
    name: str,
    *,
    devices: Callable[[str], list[DeviceInfo]],
    commands: Callable[[str], list[tuple[str, str]]],
    help_text: Callable[[str, str], str],
    agents: Callable[[], list[AgentInfo]],
    generation: Callable[[], int] = lambda: 0,
) -> Message:
    """The reply of server ``name`` (``role`` "agent" or "broker") to Hello or a listing request; the
    lookups raise ZdutError (no_such_device or device_not_found, no_such_command, or anything else the server
    refuses).  ``devices`` takes a ListDevices' glob ("" for all); ``generation`` numbers the listing it last
    returned (0: unnumbered), so that a caller who holds that one gets no devices back."""
    match msg:
        case Hello():
            return Welcome(msg.rid, VERSION, role, name)
        case ListDevices():
            listed = devices(msg.match)  # first: it brings the listing, and so its generation, up to date
            number = generation()
            return DeviceList(msg.rid, [] if number and msg.known == number else listed, number)
        case ListCommands():
            named = commands(msg.device)  # (name, desc) of each, in order
            return CommandList(msg.rid, [name for name, _ in named], [desc for _, desc in named])
        case GetDetails():
            if msg.keyword != "help":
                raise ZdutError(Code.INVALID_ARGUMENT, f'unknown keyword "{msg.keyword}", possible values are: "help"')
            return Details(msg.rid, help_text(msg.device, msg.command))
        case ListAgents():
            return AgentList(msg.rid, agents())
    raise ZdutError(Code.UNIMPLEMENTED, f"{type(msg).__name__} is not served by {_SERVED_BY[role]}")


class _Prefix(msgspec.Struct, array_like=True):
    """The first two fields of every request: its tag, and its rid (unary) or sid (RunOpen).  Decoding only
    these skips the rest of the array without building it."""

    tag: str
    key: int


_prefix = msgspec.msgpack.Decoder(_Prefix)
_RUN = RunOpen.__struct_config__.tag
_UNARY = frozenset(cls.__struct_config__.tag for cls in UNARY_REQUESTS)


def oversized(header: bytes | memoryview, limit: int) -> Message | None:
    """The answer to a request whose header is over ``limit`` bytes, read from its first two fields alone:
    Error for a unary request, the Done of the run for a RunOpen, None for anything else."""
    try:
        head = _prefix.decode(header)
    except ValueError:  # msgspec.DecodeError: not even a request's first two fields
        return None
    return refusal(head.tag, head.key, Code.INVALID_ARGUMENT, _too_long(len(header), limit))


def _too_long(size: int, limit: int) -> str:
    return f"request refused: its header of {size} bytes exceeds {limit} bytes"


def encode_request(msg: Message) -> bytes:
    """A request's header as a client sends it, refused here in the servers' own words when a server would
    refuse it: a name or argument that is not UTF-8 (bytes from a non-UTF-8 command line), or a header over
    MAX_HEADER_BYTES (past a server's frame cap that would be a dropped connection, not an answer)."""
    try:
        header = encode(msg)
    except UnicodeEncodeError as exc:
        bad = exc.object if isinstance(exc.object, str) else ""
        raise ZdutError(Code.INVALID_ARGUMENT, f"{go_quote(bad)} is not valid UTF-8") from None
    if len(header) > MAX_HEADER_BYTES:
        raise ZdutError(Code.INVALID_ARGUMENT, _too_long(len(header), MAX_HEADER_BYTES))
    return header


def refusal(tag: str, key: int, code: str, message: str) -> Message | None:
    """The answer to a refused request with tag ``tag`` and rid or sid ``key``: the run's Done for a RunOpen
    (a refused run's Done is its first message), Error for a unary request, None for anything else."""
    if tag == _RUN:
        return Done(key, 1, code, message)
    if tag in _UNARY:
        return Error(key, code, message)
    return None
