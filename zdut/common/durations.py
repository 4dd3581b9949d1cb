"""Go-style durations (``time.ParseDuration`` / ``Duration.String``), as dutctl users type them."""

from __future__ import annotations

import datetime
import math
import re

from zdut.protocol import Code, ZdutError

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """``1h30m``, ``500ms``, ``-2s``, ``0`` -> seconds; ValueError like Go's for anything else."""
    s = text.strip()
    if not s:
        raise ValueError(f'time: invalid duration "{text}"')
    sign = 1.0
    if s[0] in "+-":
        sign, s = (-1.0 if s[0] == "-" else 1.0), s[1:]
    if s == "0":
        return 0.0
    pos, total = 0, 0.0
    while pos < len(s):
        m = _PART.match(s, pos)
        if not m:
            if re.match(r"(\d+\.?\d*|\.\d+)$", s[pos:]):
                raise ValueError(f'time: missing unit in duration "{text}"')
            raise ValueError(f'time: invalid duration "{text}"')
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    return sign * total


#: Go's longest Duration (2^63-1 ns, about 292 years), in seconds.
MAX_DURATION_S = (2**63 - 1) / 1e9


def lock_seconds(duration: str | float | datetime.timedelta | None) -> int:
    """A lock duration as the CLI and the Python API take it -> whole seconds for the wire (0: the agent's default).

    None or ``""`` ask for the agent's default (30m); a string is Go syntax (``90s``, ``1h30m``, ``1.5h``); a
    number or timedelta is seconds.  A positive fraction of a second rounds up (``500ms`` locks for 1s, never for
    the default).  Zero, negative, NaN, past Go's range or not a duration at all: ZdutError InvalidArgument."""
    if duration is None or duration == "":
        return 0
    if isinstance(duration, str):
        shown = duration
        try:
            value = parse_duration(duration)
        except ValueError as exc:
            raise ZdutError(Code.INVALID_ARGUMENT, f'invalid lock duration "{duration}": {exc}') from None
    elif isinstance(duration, datetime.timedelta):
        shown, value = str(duration), duration.total_seconds()
    elif isinstance(duration, int | float) and not isinstance(duration, bool) and math.isfinite(duration):
        shown, value = f"{duration}s", float(duration)
    else:
        raise ZdutError(Code.INVALID_ARGUMENT, f"invalid lock duration {duration!r}: want a Go duration such as "
                        "30m, or a finite number of seconds")
    if abs(value) > MAX_DURATION_S:
        raise ZdutError(Code.INVALID_ARGUMENT, f'invalid lock duration "{shown}": time: invalid duration "{shown}"')
    if value <= 0:
        raise ZdutError(Code.INVALID_ARGUMENT, f'lock duration must be positive, got "{shown}"')
    return math.ceil(round(value, 9))  # to Go's nanoseconds first, so float dust never adds a second


def format_duration(seconds: float) -> str:
    """Go's Duration.String: ``1h30m0s``, ``2s``, ``500ms``, ``0s``."""
    if seconds == 0:
        return "0s"
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    if seconds < 1:
        for unit, scale in (("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9)):
            if seconds >= scale:
                return f"{sign}{_trim(seconds / scale)}{unit}"
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    out = sign
    if h:
        out += f"{int(h)}h"
    if h or m:
        out += f"{int(m)}m"
    return out + f"{_trim(s)}s"


def format_left(seconds: float) -> str:
    """Time left on a lock: seconds under a minute (``45s``, never ``0m``), else rounded to the minute as dutctl
    writes it (``1h30m``, ``25m``).  Every lock message uses it: the client's, the agent's and the broker's."""
    if seconds < 59.5:
        return f"{max(0, round(seconds))}s"
    minutes = round(seconds / 60)
    h, m = divmod(minutes, 60)
    return f"{h}h{m}m" if h else f"{m}m"


def _trim(value: float) -> str:
    text = f"{value:.9f}".rstrip("0").rstrip(".")
    return text or "0"
