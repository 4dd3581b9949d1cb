"""The one-shot ``zdut`` command: parse the flags, then run one command line (or start ``zdut shell``)."""

from __future__ import annotations

import asyncio
import sys

from zdut.common.addresses import server_list
from zdut.common.client_config import KeyConfigError, client_keys
from zdut.common.memtune import tune_malloc
from zdut.terminal.commands import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    HELP,
    OPTIONS,
    SYNOPSIS,
    Cli,
    UsageError,
    parse_flags,
)


def _usage(exc: UsageError) -> int:
    sys.stderr.write(f"{exc}\n\n{SYNOPSIS}\n{OPTIONS}")
    return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["completion"], ["__complete"], ["__complete_described"]):  # the shell's: no server needed
        from zdut.terminal import completion_scripts as scripts

        if argv[0] == "completion":
            return scripts.script(argv[1:])
        return scripts.complete(argv[1:], described=argv[0] == "__complete_described")
    if argv[:1] == ["keys"]:  # local files only: no server needed
        from zdut.common import keys

        return keys.main(argv[1:])
    try:
        opts, words = parse_flags(argv)
        if words and words[0] == "shell" and len(words) > 1:  # `zdut shell -s ADDR` as `zdut -s ADDR shell`
            opts, rest = parse_flags(argv[: len(argv) - len(words)] + words[1:])
            words = ["shell", *rest]
    except UsageError as exc:
        return _usage(exc)
    except KeyConfigError as exc:  # a bad config file: not a grammar problem, the line alone without the usage
        sys.stderr.write(f"{exc}\n")
        return EXIT_USAGE
    if opts.help or words == ["help"]:  # asked for: stdout, exit 0 (docs/differences.md row 15)
        sys.stdout.write(HELP)
        return EXIT_OK
    if not opts.version and words[:1] != ["version"]:  # every other command talks to a server
        try:
            opts.server_keys = {a: client_keys(a, opts.key, opts.server_key) for a in server_list(opts.server)}
            opts.keys = next(iter(opts.server_keys.values()))
        except KeyConfigError as exc:  # not a grammar problem: the line alone, without the usage
            sys.stderr.write(f"{exc}\n")
            return EXIT_USAGE
    tune_malloc()  # the shell transfers files too
    if words and words[0] == "shell":
        from zdut.shell import main as shell_main  # prompt-toolkit only when needed

        return shell_main(opts, words[1:])
    cli = Cli(opts)
    if opts.version:
        return cli.version()
    try:
        return asyncio.run(cli.execute(words))
    except KeyboardInterrupt:
        cli.error("interrupted")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
