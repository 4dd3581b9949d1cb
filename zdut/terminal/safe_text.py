"""Text that came from another process, made safe to write to a terminal.

A device or agent name, a lock owner (the ``-u`` another client chose), a help text, a desc, an error message,
a version string, a failed-init reason: any peer that registers or answers can put terminal controls in them
(``ESC ]0;title BEL``, ``ESC [2J``, an OSC 52 clipboard write, ``\\r`` overwrites, a U+202E bidi override).
:func:`safe` escapes every such character visibly, in the C style ``-f oneline`` uses: ``\\x1b``, ``\\r``,
``\\u202e``.  Ordinary text (letters of any script, punctuation, emoji) is returned unchanged, so output for
ordinary names stays byte for byte what it was (and what dutctl prints).

A backslash is not doubled: the text format is for people, and doubling would change every ordinary text
that has one (a Windows path, a regex in a help text).  So ``\\x1b`` on the screen may be an escaped ESC or
four typed characters; ``-f json``, ``-f yaml`` and ``-f oneline`` give the exact value.

Module output (a console's bytes) is not remote *text* in this sense and is never passed through here: a
serial console needs its escape sequences.
"""

from __future__ import annotations

import re

#: The line and text direction controls of Unicode (LRM, RLM, ALM, embeddings, overrides, isolates) and the
#: Unicode line and paragraph separators: invisible, they reorder or break what is shown around them.
FORMAT_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u2028\u2029")

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
#: Every character is_unsafe says, as one class: a listing of 100,000 names is searched in C, not char by char.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f" + "".join(sorted(FORMAT_CONTROLS)) + "]")


def is_unsafe(c: str) -> bool:
    """Whether the character ``c`` must not reach a terminal raw: a C0 control (newline and tab included),
    DEL, a C1 control (U+0080 to U+009F) or one of :data:`FORMAT_CONTROLS`."""
    o = ord(c)
    return o < 0x20 or 0x7F <= o <= 0x9F or c in FORMAT_CONTROLS


def escape_char(c: str) -> str:
    """``c`` as a visible escape: ``\\n``, ``\\r``, ``\\t``, else ``\\xHH`` up to U+00FF, ``\\uHHHH`` above."""
    named = _NAMED.get(c)
    if named is not None:
        return named
    o = ord(c)
    return f"\\x{o:02x}" if o <= 0xFF else (f"\\u{o:04x}" if o <= 0xFFFF else f"\\U{o:08x}")


def safe(text: str, multiline: bool = False) -> str:
    """``text`` with every character :func:`is_unsafe` says escaped (see :func:`escape_char`).

    ``multiline`` is for texts that legitimately span lines (a help text, a desc, an error message): their
    newlines and tabs stay; ``\\r`` and every other control are escaped all the same.  A one-line field (a
    name, an owner, a version, a reason) escapes newline and tab too, so it cannot fake a second line."""
    if clean(text):
        return text  # the common case, and ordinary text is returned exactly
    keep = "\n\t" if multiline else ""
    return _UNSAFE.sub(lambda m: m[0] if m[0] in keep else escape_char(m[0]), text)


def safe_lines(text: str) -> str:
    """:func:`safe` for a multi-line text."""
    return safe(text, multiline=True)


def clean(text: str) -> bool:
    """Whether ``text`` has nothing to escape, not even a newline (a candidate a shell may take as is)."""
    return (text.isascii() and text.isprintable()) or _UNSAFE.search(text) is None  # the first: ASCII, in C
