"""Go-style command-line flags (the rules of Go's ``flag`` package), as dutctl users type them.

One parser for the ``zdut`` client's options and for the modules that take flags (serial, file):

- ``-name`` and ``--name`` are the same flag; ``-name=value`` or ``-name value`` give a value flag its value
  (the next word is taken even if it starts with ``-``);
- a boolean is set by ``-name`` alone, or by ``-name=`` one of ``1 0 t f T F true false TRUE FALSE True False``
  (never by a following word);
- flags come first: ``--`` ends them (and is dropped), as does the first word that is not a flag (``-`` alone
  is such a word);
- ``-h``/``-help`` ask for help unless the caller defines them.

Errors are :class:`FlagError` with Go's wording (``flag provided but not defined: -x``, ``flag needs an
argument: -t``, ...); callers put their own prefix in front.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

#: What Go's strconv.ParseBool accepts.
TRUE_WORDS = frozenset({"1", "t", "T", "TRUE", "true", "True"})
FALSE_WORDS = frozenset({"0", "f", "F", "FALSE", "false", "False"})

_GO_ESCAPES = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v"}


def go_quote(text: str) -> str:
    """Go's %q for a string: double quotes, backslash escapes, printable Unicode kept.

    A byte that is not UTF-8 (decoded by Python as a surrogate escape, U+DC80..U+DCFF, as in ``sys.argv``)
    is shown as ``\\xNN``, as Go shows an invalid byte."""
    out = ['"']
    for ch in text:
        if "\udc80" <= ch <= "\udcff":
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        elif ch in '"\\':
            out.append("\\" + ch)
        elif ch in _GO_ESCAPES:
            out.append(_GO_ESCAPES[ch])
        elif ch.isprintable():
            out.append(ch)
        elif ord(ch) < 0x80:
            out.append(f"\\x{ord(ch):02x}")
        elif ord(ch) < 0x10000:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    out.append('"')
    return "".join(out)


def utf8_problem(text: str) -> str | None:
    """Why ``text`` cannot travel as UTF-8 (a non-UTF-8 byte from the command line, a lone surrogate), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return f"{go_quote(text)} is not valid UTF-8"
    return None


class FlagError(ValueError):
    """A command line Go's flag package refuses, in its words."""


@dataclass
class ParsedFlags:
    """The flags a command line set (booleans and values apart) and the words after them."""

    switches: dict[str, bool] = field(default_factory=dict)
    values: dict[str, str] = field(default_factory=dict)
    rest: list[str] = field(default_factory=list)


def parse_flags(
    args: Sequence[str],
    booleans: Collection[str] = (),
    values: Collection[str] = (),
    checks: Mapping[str, Callable[[str], object]] | None = None,
) -> ParsedFlags:
    """Parse the leading flags of ``args``; a flag given twice keeps its last value.

    ``checks`` maps a value flag to a function that raises ValueError for a bad value (Go's ``Value.Set``),
    reported as ``invalid value "x" for flag -name: parse error``.
    """
    parsed = ParsedFlags()
    i = 0
    while i < len(args):
        arg = args[i]
        if len(arg) < 2 or arg[0] != "-":
            break
        i += 1
        if arg == "--":
            break
        name, has_value, value = arg[2 if arg[1] == "-" else 1 :].partition("=")
        if not name or name[0] == "-":
            raise FlagError(f"bad flag syntax: {arg}")
        if name in booleans:
            parsed.switches[name] = _boolean(name, value) if has_value else True
        elif name in values:
            if not has_value:
                if i >= len(args):
                    raise FlagError(f"flag needs an argument: -{name}")
                value, i = args[i], i + 1
            _check(name, value, (checks or {}).get(name))
            parsed.values[name] = value
        elif name in ("h", "help"):
            raise FlagError("flag: help requested")
        else:
            raise FlagError(f"flag provided but not defined: -{name}")
    parsed.rest = list(args[i:])
    return parsed


def _boolean(name: str, value: str) -> bool:
    if value in TRUE_WORDS:
        return True
    if value in FALSE_WORDS:
        return False
    raise FlagError(f"invalid boolean value {go_quote(value)} for -{name}: parse error")


def _check(name: str, value: str, check: Callable[[str], object] | None) -> None:
    if check is None:
        return
    try:
        check(value)
    except ValueError:
        raise FlagError(f"invalid value {go_quote(value)} for flag -{name}: parse error") from None
