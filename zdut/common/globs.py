"""Device-name globs (``zdut list --match 'board-*'``, ``lock --wait 'board-*'``, the pytest plugin's marks):
shell-style and case-sensitive, as fnmatch.fnmatchcase reads them."""

from __future__ import annotations

import bisect
import fnmatch
import re
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

GLOB_CHARS = frozenset("*?[")
_FIRST_GLOB = re.compile(r"[*?\[]")


def is_glob(pattern: str) -> bool:
    return not GLOB_CHARS.isdisjoint(pattern)


def _name(item: Any) -> str:
    return str(item.name)


def matching(items: Sequence[T], pattern: str, name: Callable[[T], str] = _name) -> list[T]:
    """The items whose names match ``pattern`` ("" matches all), in order; they are sorted by ``name`` (a
    device's name unless told otherwise).  The pattern's literal prefix is found by bisection first, so that
    ``agent0042*`` over a listing of 100,000 devices tests a few dozen names rather than every one."""
    if not pattern:
        return list(items)
    prefix = pattern[: m.start()] if (m := _FIRST_GLOB.search(pattern)) else pattern
    first = bisect.bisect_left(items, prefix, key=name)
    last = bisect.bisect_right(items, prefix, lo=first, key=lambda item: name(item)[: len(prefix)])
    test = re.compile(fnmatch.translate(pattern)).match
    return [item for item in items[first:last] if test(name(item))]
