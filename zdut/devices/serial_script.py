"""The serial module's arguments: its flags, the mode they select and the step script.

``[-t dur] [-eol cr|lf|crlf|none] [-keep-escapes] [-i] [--] [console | <step>...]`` where a step is
``expect <regex>``, ``send <data>`` or ``send-raw <data>``.  Everything is checked here, before the port
opens, so that a typo fails at once rather than half-way through a boot.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from zdut.common.durations import parse_duration
from zdut.common.flags import FlagError, go_quote, parse_flags
from zdut.devices.base import ModuleError

MAX_LABEL = 20
CONSOLE_WORD = "console"
EOLS = {"cr": b"\r", "lf": b"\n", "crlf": b"\r\n", "none": b""}
BOOL_FLAGS = ("keep-escapes", "i")
VALUE_FLAGS = ("t", "eol")


@dataclass
class Step:
    kind: str  # "expect", "send" or "send-raw"
    src: str
    pattern: re.Pattern[str] | None = None
    payload: bytes = b""


@dataclass
class Script:
    timeout: float = 0.0
    keep_escapes: bool = False
    console: bool = False
    steps: list[Step] = field(default_factory=list)


def label(text: str) -> str:
    """A step's argument as shown in markers and errors: at most 20 characters, then ``...``."""
    return text if len(text) <= MAX_LABEL else text[:MAX_LABEL] + "..."


def decode_escapes(text: str) -> bytes:
    r"""``\r \n \t \\ \xNN`` -> bytes; any other escape is an error so that typos surface."""
    out = bytearray()
    i = 0
    while i < len(text):
        ch = text[i]
        if ch != "\\":
            out += ch.encode()
            i += 1
            continue
        i += 1
        if i >= len(text):
            raise ValueError("trailing backslash")
        esc = text[i]
        if esc in "rnt\\":
            out += {"r": b"\r", "n": b"\n", "t": b"\t", "\\": b"\\"}[esc]
        elif esc == "x":
            digits = text[i + 1 : i + 3]
            if len(digits) < 2:
                raise ValueError(r"\x requires two hex digits")
            if not re.fullmatch(r"[0-9a-fA-F]{2}", digits):
                raise ValueError(rf"invalid \x escape {go_quote(digits)}: invalid syntax")
            out.append(int(digits, 16))
            i += 2
        else:
            raise ValueError(f"unknown escape {go_quote(chr(92) + esc)}")
        i += 1
    return bytes(out)


def _parse_steps(tokens: list[str], eol: bytes) -> list[Step]:
    steps: list[Step] = []
    i = 0
    while i < len(tokens):
        verb, i = tokens[i], i + 1
        if verb not in ("expect", "send", "send-raw"):
            raise ModuleError(f"unknown step verb {go_quote(verb)} (want expect, send, or send-raw)")
        if i >= len(tokens):
            what = "pattern" if verb == "expect" else "data"
            raise ModuleError(f"{go_quote(verb)} requires a {what} argument")
        arg, i = tokens[i], i + 1
        if verb == "expect":
            try:
                steps.append(Step("expect", arg, pattern=re.compile(arg)))
            except re.error as exc:
                raise ModuleError(f"invalid regular expression {go_quote(arg)}: {exc}") from None
            continue
        try:
            data = decode_escapes(arg)
        except ValueError as exc:
            raise ModuleError(f"invalid data {go_quote(arg)}: {exc}") from None
        steps.append(Step(verb, arg, payload=data + eol if verb == "send" else data))
    return steps


def parse_args(args: list[str]) -> Script:
    """The run's arguments -> a checked Script; ModuleError with dutctl's wording for anything wrong."""
    try:
        flags = parse_flags(args, BOOL_FLAGS, VALUE_FLAGS, {"t": parse_duration})
    except FlagError as exc:
        raise ModuleError(f"failed to parse arguments: {exc}") from None
    eol_name = flags.values.get("eol", "cr")
    if eol_name.lower() not in EOLS:
        raise ModuleError(f"invalid -eol {go_quote(eol_name)}: want cr, lf, crlf, or none")
    script = Script(
        timeout=max(0.0, parse_duration(flags.values["t"])) if "t" in flags.values else 0.0,
        keep_escapes=flags.switches.get("keep-escapes", False),
        console=flags.switches.get("i", False),
    )
    rest = flags.rest
    if rest and rest[0] == CONSOLE_WORD:
        script.console, rest = True, rest[1:]
    script.steps = _parse_steps(rest, EOLS[eol_name.lower()])
    if script.console and script.steps:
        raise ModuleError(f"console mode takes no steps, got {len(script.steps)}")
    return script
