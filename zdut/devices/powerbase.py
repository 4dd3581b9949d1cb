"""What the power-like modules (pdu, wifisocket, ipmi, gpio-switch) share.

Each run takes one verb from the module's table (on, off, toggle, status, cycle, reset: whichever it
supports).  ``status`` reads the power state and prints ``report``; any other verb goes to ``switch``, which
returns the text to print.  The usage block has one shape: a title, ``Arguments: a|b|c``, a line per verb.

What dutctl made differ per module stays a hook: whether the verb's case is folded, what a missing verb does
(``no_verb``) and what an unknown one does (``unknown_verb``).  By default they print usage and succeed (ipmi,
wifisocket); pdu fails instead, gpio-switch reports its state.
"""

from __future__ import annotations

import abc
import asyncio
from typing import ClassVar

from zdut.devices.base import Module, OptionsT, Session

ON, OFF, TOGGLE, STATUS = "on", "off", "toggle", "status"


def on_off(on: bool) -> str:
    return ON if on else OFF


class PowerModule(Module[OptionsT]):
    #: First line of the usage block.
    title: ClassVar[str] = ""
    #: What on and off switch, as usage names it: "Power on the outlet".
    powers: ClassVar[str] = "device"
    #: The verbs after on and off, in the order usage lists them, each with its one-line description.
    more_verbs: ClassVar[dict[str, str]] = {STATUS: "Show current power status"}
    #: What follows ``Arguments: on|off|...`` on its line, e.g. " (case-insensitive)".
    arguments_note: ClassVar[str] = ""
    #: Whether ``ON`` means ``on``.
    fold_case: ClassVar[bool] = True

    @property
    def verbs(self) -> dict[str, str]:
        """Every verb, in usage order, with its description."""
        return {ON: f"Power on the {self.powers}", OFF: f"Power off the {self.powers}", **self.more_verbs}

    @property
    def available(self) -> str:
        return ", ".join(self.verbs)

    @property
    def subject(self) -> str:
        """What ``report`` says the state of, e.g. "PDU outlet 3"."""
        return "Power"

    def usage(self) -> str:
        head = f"{self.title}\nArguments: {'|'.join(self.verbs)}{self.arguments_note}\n"
        return head + "".join(f"  {verb:<7} - {text}\n" for verb, text in self.verbs.items())

    def help(self) -> str:
        return self.usage() + self.details()

    def details(self) -> str:
        """What help says after the verbs: the ``with:`` keys and what this instance controls."""
        return ""

    def report(self, on: bool) -> str:
        return f"{self.subject} state: {on_off(on)}\n"

    async def no_verb(self, session: Session) -> None:
        await session.print(f"No command specified. Try 'help' for usage.\nAvailable commands: {self.available}\n")

    async def unknown_verb(self, session: Session, verb: str) -> None:
        await session.print(f"Unknown command: {verb}\nAvailable commands: {self.available}\n")

    @abc.abstractmethod
    async def read(self) -> bool:
        """Whether the power is on."""

    @abc.abstractmethod
    async def switch(self, verb: str) -> str:
        """Carry out a verb other than status; the text to print."""

    async def target(self, verb: str) -> bool:
        """The state on/off/toggle asks for; toggle reads the current one."""
        return not await self.read() if verb == TOGGLE else verb == ON

    async def run(self, session: Session, args: list[str]) -> None:
        if not args:
            await self.no_verb(session)
            return
        verb = args[0].lower() if self.fold_case else args[0]
        if verb not in self.verbs:
            await self.unknown_verb(session, verb)
        elif verb == STATUS:
            await session.print(self.report(await self.read()))
        else:
            async with self._switching():  # toggle reads, then sets: two runs at once must not interleave
                text = await self.switch(verb)
            await session.print(text)

    def _switching(self) -> asyncio.Lock:
        """The lock that makes this instance's switch verbs one at a time (created on first use)."""
        lock: asyncio.Lock | None = self.__dict__.get("_switch_lock")
        if lock is None:
            lock = self.__dict__["_switch_lock"] = asyncio.Lock()
        return lock
