"""What the agent records of its devices: each device's journal, and ``zdut DEV log`` reading it.

Every session's start (who, which command and arguments), output, and end (its exit), and every lock,
unlock and forced unlock go to the device's journal (``agentd.journal``), on disk under the agent's state
directory, bounded per device and kept across restarts.  Watchers replay from it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import msgspec

from zdut.agentd.journal import Entry, Journal, format_line
from zdut.agentd.run import AgentRun
from zdut.common.watch_args import LogQuery
from zdut.protocol import PRINT, STDERR, STDIN

log = logging.getLogger("zdut.journal")

STREAM_NAMES = {PRINT: "print", STDERR: "stderr", STDIN: "stdin"}
#: How far a ``log --follow`` reader may fall behind before it is told what it missed.
FOLLOW_LIMIT_BYTES = 4 * 1024 * 1024

_json = msgspec.json.Encoder()


class Recorder:
    """The journals of one agent's devices (none without a state directory: then nothing is recorded)."""

    def __init__(self, directory: Path | None, devices: list[str]) -> None:
        self.journals: dict[str, Journal] = {}
        if directory is None:
            return
        for device in devices:
            try:
                self.journals[device] = Journal(directory, device)
            except OSError as exc:
                log.error("device %s: no journal (%s)", device, exc)

    def started(self, run: AgentRun, args: list[str]) -> None:
        journal = self.journals.get(run.device)
        if journal is not None:
            journal.session_started(run.journal_id, run.user, run.command, args)

    def printed(self, run: AgentRun, stream: int, data: bytes) -> None:
        journal = self.journals.get(run.device)
        if journal is not None:
            journal.output(run.journal_id, STREAM_NAMES.get(stream, "stdout"), data)

    def captured(self, device: str, sid: int, data: bytes) -> None:
        """Output a module read while no session ran (a serial port's background reader)."""
        journal = self.journals.get(device)
        if journal is not None:
            journal.output(sid, "stdout", data)

    def ended(self, run: AgentRun) -> None:
        journal = self.journals.get(run.device)
        if journal is not None:
            journal.session_ended(run.journal_id, *run.exit, run.user, run.command)

    def event(self, device: str, kind: str, user: str, message: str = "") -> None:
        journal = self.journals.get(device)
        if journal is not None:
            journal.event(kind, user, message)

    def recent_output(self, device: str, lines: int) -> bytes:
        journal = self.journals.get(device)
        return journal.recent_output(lines) if journal is not None and lines else b""

    def close(self) -> None:
        for journal in self.journals.values():
            journal.close()

    async def read(self, device: str, session: AgentRun, query: LogQuery) -> None:
        """The body of a ``DEV log`` session: the last lines, then (``--follow``) what comes, until cancelled."""
        journal = self.journals.get(device)
        if journal is None:
            await session.stderr(b"this agent keeps no journal (it has no state directory)\n")
            return
        journal.flush()
        subscription = journal.subscribe(FOLLOW_LIMIT_BYTES) if query.follow else None
        try:
            tail = journal.tail(query.lines, query.since)
            if query.json:  # whole records: the oldest may hold more lines than asked for
                for entry in tail:
                    await session.stdout(_render(entry, True))
            elif tail:
                text = b"".join(_render(entry, False) for entry in tail)
                await session.stdout(b"".join(text.splitlines(keepends=True)[-query.lines:]))
            if subscription is None:
                return
            while True:
                for entry in await subscription.next_batch():
                    await session.stdout(_render(entry, query.json))
        finally:
            if subscription is not None:
                subscription.close()


def _render(entry: Entry, as_json: bool) -> bytes:
    if as_json:
        return _json.encode(entry) + b"\n"
    text = format_line(entry)
    return (text if text.endswith("\n") else text + "\n").encode(errors="replace")
