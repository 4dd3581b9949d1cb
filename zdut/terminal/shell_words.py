"""The words of a ``zdut shell`` line, split by the POSIX shell's quoting rules (XCU 2.2 and 2.3).

Blanks (space, tab) separate words; a backslash outside quotes keeps the next character literal; single
quotes keep everything literal; inside double quotes a backslash escapes only ``$``, a backquote, ``"`` and
``\\`` (before anything else it stays); a word that begins with ``#`` starts a comment.  The one expansion
is the tilde prefix (``~/fw.bin``, ``~user``: a home directory, as the shell completes local paths); there is
no other (``$HOME``, backquotes, ``*`` reach the command as typed) and there are no operators: an unquoted
``| & ; < > ( )`` is an error rather than an argument, since ``sh`` would give it another meaning.  A line
is one command: an unterminated quote or a final backslash is an error, not a continuation.
"""

from __future__ import annotations

import os

BLANKS = " \t"
OPERATORS = "|&;<>()"
#: What a backslash escapes inside double quotes (a newline too, but a line has none).
DQ_ESCAPES = '$`"\\'
QUOTING = "'\"\\"


class LineError(ValueError):
    """A line that cannot be split into words."""


def split(line: str) -> list[str]:
    """The words of one line (a trailing newline is ignored); raises LineError."""
    if line.endswith("\n"):
        line = line[:-1]
    words: list[str] = []
    word: list[str] = []
    started = False  # a word is open: quotes open one even when nothing is inside them
    i, n = 0, len(line)
    while i < n:
        c = line[i]
        if c in BLANKS:
            if started:
                words.append("".join(word))
                word, started = [], False
            i += 1
            continue
        if c == "#" and not started:
            break
        if c == "~" and not started:
            started, end = True, _tilde(line, i, word)
            if end > i:
                i = end
                continue
        started = True
        if c == "\\":
            if i + 1 == n:
                raise LineError("the line ends with a backslash (a line is one command; write \\\\ for a backslash)")
            word.append(line[i + 1])
            i += 2
        elif c == "'":
            end = line.find("'", i + 1)
            if end < 0:
                raise LineError(f"unterminated ' quote at column {i + 1}")
            word.append(line[i + 1 : end])
            i = end + 1
        elif c == '"':
            i = _double_quoted(line, i, word)
        elif c in OPERATORS:
            raise LineError(
                f"unquoted {c!r} at column {i + 1}: the shell runs one command per line, without pipes, "
                "redirections or lists (quote it to pass it on)"
            )
        else:
            word.append(c)
            i += 1
    if started:
        words.append("".join(word))
    return words


def _tilde(line: str, start: int, word: list[str]) -> int:
    """Expand an unquoted tilde prefix at ``start`` (``~``, ``~user`` up to a ``/``) into ``word``, as sh does;
    returns where the rest of the word starts (``start`` itself when a quoted character is in the prefix)."""
    end, n = start + 1, len(line)
    while end < n and line[end] not in BLANKS + OPERATORS + QUOTING + "/":
        end += 1
    if end < n and line[end] in QUOTING:
        return start
    word.append(os.path.expanduser(line[start:end]))
    return end


def _double_quoted(line: str, start: int, word: list[str]) -> int:
    """Append the inside of the double quotes opened at ``start``; returns the index after them."""
    i, n = start + 1, len(line)
    while i < n:
        c = line[i]
        if c == '"':
            return i + 1
        if c == "\\" and i + 1 < n and line[i + 1] in DQ_ESCAPES:
            word.append(line[i + 1])
            i += 2
        else:
            word.append(c)
            i += 1
    raise LineError(f'unterminated " quote at column {start + 1}')
