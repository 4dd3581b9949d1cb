"""The arguments of ``DEV watch`` (and ``DEV log``), checked by the client before it sends them and by the
agent, which may be asked by any client."""

from __future__ import annotations

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
