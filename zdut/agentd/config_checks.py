"""What the config loader checks beyond dutctl's schema, worded to point at the cause.

dutctl ignores keys it does not know, so a typo (`usse:`) turns into a misleading "command must have at least
one module"; it never looks at ``version``, and an empty file is an agent without devices.  zdut refuses all
three, naming the unknown key with the nearest valid one.  These are pure functions on names and texts; the
loader (``agentd.config``) adds the device, command and line.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

import msgspec

from zdut.common.flags import go_quote

#: The keys each level of dutctl's schema takes (yaml.v3 matches them case-sensitively).
CONFIG_KEYS = ("version", "devices")
DEVICE_KEYS = ("desc", "cmds")
COMMAND_KEYS = ("desc", "args", "uses")
ARGUMENT_KEYS = ("name", "desc")
USES_KEYS = ("module", "passthrough", "args", "with")

#: Keys older dutctl configs used, and the key that replaced them.
FORMER_KEYS = {"main": "passthrough"}

#: Major config versions this agent reads: dutctl 1.x writes ``1.0.0-alpha.1``, zdut's own configs ``0.1.0``.
SUPPORTED_MAJORS = (0, 1)
_VERSION = re.compile(r"v?(0|[1-9][0-9]*)(\.[0-9]+){0,2}(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?")

EMPTY = "the config is empty (want version and devices)"


def quote(text: str) -> str:
    """``'name'`` as written when that is unambiguous and short, else Go's quoting (escapes control characters)."""
    if len(text) > 60:
        return go_quote(text[:57] + "...")
    return f"'{text}'" if text.isprintable() and "'" not in text else go_quote(text)


def nearest(name: str, valid: Sequence[str]) -> str | None:
    """The valid key ``name`` most likely meant: a former name's successor, a case slip, or a close spelling."""
    folded = name.lower()
    former = FORMER_KEYS.get(folded)
    if former in valid:
        return former
    for key in valid:
        if key.lower() == folded:
            return key
    matches = difflib.get_close_matches(folded, [key.lower() for key in valid], n=1, cutoff=0.6)
    return next((key for key in valid if matches and key.lower() == matches[0]), None)


def unknown_key(name: str, valid: Sequence[str], what: str = "key") -> str:
    """``unknown key 'usse' (did you mean 'uses'?)``, or the allowed keys when none is close."""
    guess = nearest(name, valid)
    if guess is not None:
        return f"unknown {what} {quote(name)} (did you mean {quote(guess)}?)"
    return f"unknown {what} {quote(name)} (allowed: {', '.join(valid) or 'none'})"


def unknown_with_key(names: Sequence[str], options: type[msgspec.Struct]) -> tuple[int, str] | None:
    """The first ``with`` key that ``options`` does not take (matched case-insensitively, as decode_options
    does) and its message; None if all are known or the options Struct takes any key."""
    if not options.__struct_config__.forbid_unknown_fields:
        return None
    fields = [field.encode_name for field in msgspec.structs.fields(options)]
    known = {field.lower() for field in fields}
    for index, name in enumerate(names):
        if name.lower() not in known:
            return index, unknown_key(name, fields, "'with' key")
    return None


def version_problem(version: str) -> str | None:
    """Why ``version`` is refused, or None for a version this agent reads."""
    if not version:
        return "version is missing (want e.g. version: 1.0.0)"
    match = _VERSION.fullmatch(version)
    if match is None:
        return f"invalid version {quote(version)} (want MAJOR.MINOR.PATCH, e.g. 1.0.0)"
    if int(match.group(1)) not in SUPPORTED_MAJORS:
        majors = " and ".join(f"{major}.x" for major in SUPPORTED_MAJORS)
        return f"unknown version {quote(version)} (this agent reads config versions {majors})"
    return None
