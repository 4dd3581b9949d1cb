"""The listing answers every zdut server gives, and the error texts of a failed lookup.

An agent answers from its configuration and a broker from its registry; both build their replies here, so
that a client sees the same replies and the same errors from either (docs/protocol.md, "Unary calls").
"""

from __future__ import annotations

from collections.abc import Callable

from zdut.protocol import (
    VERSION,
    AgentInfo,
    AgentList,
    Code,
    CommandList,
    Details,
    DeviceInfo,
    DeviceList,
    GetDetails,
    Hello,
    ListAgents,
    ListCommands,
    ListDevices,
    Message,
    Welcome,
    ZdutError,
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
    devices: Callable[[], list[DeviceInfo]],
    commands: Callable[[str], list[str]],
    help_text: Callable[[str, str], str],
    agents: Callable[[], list[AgentInfo]],
) -> Message:
    """The reply of server ``name`` (``role`` "agent" or "broker") to Hello or a listing request; the
    lookups raise ZdutError (no_such_device or device_not_found, no_such_command, or anything else the server
    refuses)."""
    match msg:
        case Hello():
            return Welcome(msg.rid, VERSION, role, name)
        case ListDevices():
            return DeviceList(msg.rid, devices())
        case ListCommands():
            return CommandList(msg.rid, commands(msg.device))
        case GetDetails():
            if msg.keyword != "help":
                raise ZdutError(Code.INVALID_ARGUMENT, f'unknown keyword "{msg.keyword}", possible values are: "help"')
            return Details(msg.rid, help_text(msg.device, msg.command))
        case ListAgents():
            return AgentList(msg.rid, agents())
    raise ZdutError(Code.UNIMPLEMENTED, f"{type(msg).__name__} is not served by {_SERVED_BY[role]}")
