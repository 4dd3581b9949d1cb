"""The arguments of ``DEV watch`` (and ``DEV log``, ``DEV lock --wait``), checked by the client before it
sends them and by the agent, which may be asked by any client."""

from __future__ import annotations

import contextlib
import datetime
import math
import time
from dataclasses import dataclass

from zdut.common.durations import parse_duration
from zdut.protocol import Code, ZdutError

#: What ``-n`` replays by default.
DEFAULT_REPLAY_LINES = 50
#: The most lines a watcher may ask to be replayed.
MAX_REPLAY_LINES = 10_000


def replay_lines(args: list[str]) -> int:
    """The watch's ``-n N`` (the only argument it takes)."""
    if not args:
        return DEFAULT_REPLAY_LINES
    if len(args) == 2 and args[0] == "-n" and args[1].isdigit() and int(args[1]) <= MAX_REPLAY_LINES:
        return int(args[1])
    raise ZdutError(Code.INVALID_ARGUMENT,
                    f"watch takes only -n N, the lines to replay first (0-{MAX_REPLAY_LINES}, default "
                    f"{DEFAULT_REPLAY_LINES}); got: {' '.join(args)}")


#: What ``DEV log -n`` shows by default.
DEFAULT_LOG_LINES = 50
LOG_USAGE = ("log takes -n N (the last N lines, default 50), --since TIME (a Go duration ago such as 10m or 2h, "
             "or a date-time such as 2026-12-02T21:00 or 2026-12-02 21:00:00+01:00) and --follow")


@dataclass(frozen=True)
class LogQuery:
    """What ``DEV log`` asks for; ``since`` is unix seconds, so client and agent agree whatever their zones."""

    lines: int = DEFAULT_LOG_LINES
    since: float | None = None
    follow: bool = False
    json: bool = False  # one JSON record a line, for `-f json`

    def args(self) -> list[str]:
        """The canonical arguments sent to the agent."""
        out = ["-n", str(self.lines)]
        if self.since is not None:
            out += ["--since", repr(self.since)]
        return out + ["--follow"] * self.follow + ["--json"] * self.json


def log_query(args: list[str], now: float | None = None) -> LogQuery:
    """Parse ``DEV log``'s arguments (the client's words, or the canonical ones it sends)."""
    lines, since, follow, as_json = DEFAULT_LOG_LINES, None, False, False
    words = iter(args)
    for word in words:
        if word in ("-n", "--since"):
            value = next(words, None)
            if value is None:
                raise ZdutError(Code.INVALID_ARGUMENT, f"{word} needs a value; {LOG_USAGE}")
            if word == "-n":
                if not value.isdigit() or int(value) > MAX_REPLAY_LINES:
                    raise ZdutError(Code.INVALID_ARGUMENT, f"-n wants 0-{MAX_REPLAY_LINES} lines, got {value!r}")
                lines = int(value)
            else:
                since = since_time(value, time.time() if now is None else now)
        elif word == "--follow":  # not -f: before the device that is the output format
            follow = True
        elif word == "--json":
            as_json = True
        else:
            raise ZdutError(Code.INVALID_ARGUMENT, f"unknown log argument {word!r}; {LOG_USAGE}")
    return LogQuery(lines, since, follow, as_json)


def since_time(text: str, now: float) -> float:
    """``--since``: unix seconds as sent, a Go duration before ``now``, or an ISO date-time (local if no zone)."""
    with contextlib.suppress(ValueError):
        value = float(text)
        if math.isfinite(value):
            return value
    with contextlib.suppress(ValueError):
        ago = parse_duration(text)
        if ago >= 0:
            return now - ago
    try:
        return datetime.datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise ZdutError(Code.INVALID_ARGUMENT, f"--since {text!r} is neither a duration nor a date-time; "
                                               f"{LOG_USAGE}") from None


#: The longest ``lock --wait`` (a CI job waits hours at most; a forgotten one should not wait for ever).
MAX_WAIT_S = 7 * 24 * 3600.0


def queue_args(args: list[str]) -> tuple[int, float]:
    """A lock queue session's arguments, as the client sends them: the lock's seconds (0: the agent's
    default) and the longest wait's seconds."""
    try:
        duration_s, wait_s = int(args[0]), float(args[1])
        valid = len(args) == 2 and duration_s >= 0 and 0 < wait_s <= MAX_WAIT_S
    except (IndexError, ValueError):
        valid = False
    if not valid:
        raise ZdutError(Code.INVALID_ARGUMENT, "a lock queue takes the lock's seconds and the wait's seconds "
                                               f"(0 < wait <= {MAX_WAIT_S:g}); got: {' '.join(args)}")
    return duration_s, wait_s


LOCK_USAGE = ("lock takes at most a duration such as 30m or 1h30m, and --wait MAX to wait that long in the device's "
              "queue (then the device may be several, comma-separated, or a glob such as 'board-*')")


def lock_words(args: list[str]) -> tuple[str, float | None]:
    """The client's ``lock [DURATION] [--wait MAX]``: the duration as written and the wait's seconds (None: no
    wait); InvalidArgument for anything else."""
    words, wait_s = list(args), None
    for i, word in enumerate(words):
        if word == "--wait" or word.startswith("--wait="):
            text = word.partition("=")[2] if "=" in word else (words[i + 1] if i + 1 < len(words) else "")
            del words[i:i + (1 if "=" in word else 2)]
            try:
                wait_s = parse_duration(text)
            except ValueError as exc:
                raise ZdutError(Code.INVALID_ARGUMENT, f"--wait wants a duration such as 10m: {exc}") from None
            if not 0 < wait_s <= MAX_WAIT_S:
                raise ZdutError(Code.INVALID_ARGUMENT,
                                f"--wait must be more than 0 and at most {MAX_WAIT_S / 3600:g}h, got {text}")
            break
    if len(words) > 1 or any(w.startswith("--") for w in words):  # "-5m" is a (bad) duration, not a flag
        raise ZdutError(Code.INVALID_ARGUMENT, LOCK_USAGE)
    return (words[0] if words else ""), wait_s
