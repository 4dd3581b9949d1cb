"""Shell completion for the one-shot ``zdut``: ``zdut completion bash|zsh|fish`` prints a script, and the script
asks ``zdut __complete WORDS...`` (the words after ``zdut``, the last one the word being completed) for the
candidates, one a line.

Devices and commands come from a small cache file under the state directory: fresh (under
:data:`FRESH_S`) it answers alone; otherwise the server is asked with a :data:`QUERY_TIMEOUT_S` deadline and, if
it does not answer, the stale cache answers. So a shell never waits long for a server that is away, and this
module imports the client only when it has to ask.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from zdut.common.paths import state_dir

FRESH_S = 60.0
QUERY_TIMEOUT_S = 0.25
#: Bounds of the cache file: servers kept (the least recently used out first), devices and commands each.
MAX_SERVERS, MAX_NAMES = 16, 4096
KEYWORDS = ("list", "agents", "forget", "shell", "version", "help", "completion")
DEVICE_WORDS = ("lock", "unlock", "help")
SHELLS = ("bash", "zsh", "fish")
VALUE_FLAGS = {"s", "f", "u", "log"}
BOOL_FLAGS = ("-v", "--no-color", "--version", "-h", "--help")
FLAG_VALUES = {"f": ("text", "json", "yaml", "oneline", "csv"), "log": ("debug", "warn", "none")}

BASH = r"""# zdut completion for bash: eval "$(zdut completion bash)"
_zdut() {
    local IFS=$'\n' i w words=()
    for ((i = 1; i <= COMP_CWORD; i++)); do  # bash splits host:port at the colon: join it again
        w=${COMP_WORDS[i]}
        if ((${#words[@]})) && [[ $w == : || ${words[-1]} == *: ]]; then
            words[-1]+=$w
        else
            words+=("$w")
        fi
    done
    COMPREPLY=($("${COMP_WORDS[0]}" __complete "${words[@]}" 2>/dev/null))
}
complete -o default -F _zdut zdut
"""
ZSH = r"""#compdef zdut
# zdut completion for zsh: source <(zdut completion zsh)
_zdut() {
    local -a candidates
    candidates=("${(@f)$(${words[1]} __complete "${(@)words[2,CURRENT]}" 2>/dev/null)}")
    if [[ -n ${candidates[1]} ]]; then
        compadd -a candidates
    else
        _files
    fi
}
compdef _zdut zdut
"""
FISH = r"""# zdut completion for fish: zdut completion fish | source
function __zdut_complete
    set -l words (commandline -opc)
    set -e words[1]
    zdut __complete $words (commandline -ct) 2>/dev/null
end
complete -c zdut -a '(__zdut_complete)'
"""
SCRIPTS = {"bash": BASH, "zsh": ZSH, "fish": FISH}


def script(args: list[str]) -> int:
    """``zdut completion SHELL``."""
    if len(args) != 1 or args[0] not in SCRIPTS:
        sys.stderr.write("usage: zdut completion bash|zsh|fish\n")
        return 2
    sys.stdout.write(SCRIPTS[args[0]])
    return 0


def complete(words: list[str]) -> int:
    """``zdut __complete WORDS...``: the candidates for the last word, one a line; never an error."""
    with contextlib.suppress(Exception):  # a completion that fails offers nothing, it never breaks the shell
        sys.stdout.write("".join(f"{c}\n" for c in candidates(words or [""])))
    return 0


def candidates(words: list[str]) -> list[str]:
    *before, current = words
    server, wants = os.environ.get("ZDUT_SERVER") or "localhost:1024", ""
    positional: list[str] = []
    for word in before:
        if wants:
            server = word if wants == "s" else server
            wants = ""
        elif positional or not word.startswith("-") or word in ("-", "--"):
            positional.append(word)
        else:
            name, eq, value = word.lstrip("-").partition("=")
            if name in VALUE_FLAGS and not eq:
                wants = name
            elif name == "s":
                server = value
    if wants:
        return _starting(current, FLAG_VALUES.get(wants, ()))
    if not positional and current.startswith("-"):
        return _starting(current, [*(f"-{f}" for f in sorted(VALUE_FLAGS) if len(f) == 1), "--log", *BOOL_FLAGS])
    if not positional:
        return _starting(current, [*KEYWORDS, *Cache(server).devices()])
    if positional[0] in KEYWORDS:
        return _starting(current, SHELLS) if positional == ["completion"] else []
    if len(positional) == 1:
        return _starting(current, [*Cache(server).commands(positional[0]), *DEVICE_WORDS])
    if len(positional) == 2:
        return _starting(current, {"lock": ["30m", "1h", "2h", "8h"], "unlock": ["force"]}.get(positional[1], ["help"]))
    return []


def _starting(prefix: str, names: Any) -> list[str]:
    return [n for n in dict.fromkeys(names) if n.startswith(prefix)]


class Cache:
    """One server's device names and their commands, in ``$XDG_STATE_HOME/zdut/completion.json``."""

    def __init__(self, server: str) -> None:
        self.server, self.path = server, state_dir() / "completion.json"
        try:
            data = json.loads(self.path.read_text())
            self.all: dict[str, Any] = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            self.all = {}
        entry = self.all.get(server)
        self.entry: dict[str, Any] = entry if isinstance(entry, dict) else {}

    def devices(self) -> list[str]:
        return self._names("devices", None)

    def commands(self, device: str) -> list[str]:
        return self._names(f"commands:{device}", device)

    def _names(self, key: str, device: str | None) -> list[str]:
        held = self.entry.get(key)
        if isinstance(held, dict) and time.time() - float(held.get("at", 0)) < FRESH_S:
            return [str(n) for n in held.get("names", [])]
        fetched = _ask(self.server, device)
        if fetched is None:  # the server is away: what we knew
            return [str(n) for n in held.get("names", [])] if isinstance(held, dict) else []
        self.entry[key] = {"at": time.time(), "names": fetched[:MAX_NAMES]}
        self._save()
        return fetched

    def _save(self) -> None:
        self.all.pop(self.server, None)
        self.all[self.server] = dict(list(self.entry.items())[-MAX_NAMES:])
        while len(self.all) > MAX_SERVERS:
            self.all.pop(next(iter(self.all)))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{self.path}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(self.all))
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)


def _ask(server: str, device: str | None) -> list[str] | None:
    """The server's device names (or ``device``'s commands) within :data:`QUERY_TIMEOUT_S`; None if it did not
    answer in time."""
    import asyncio

    from zdut.client import Client

    async def query() -> list[str]:
        client = Client(server, "completion", connect_timeout=QUERY_TIMEOUT_S, call_timeout=QUERY_TIMEOUT_S)
        try:
            await client.connect()
            if device is None:
                return [d.name for d in await client.list()]
            return list(await client.commands(device))
        finally:
            await client.close()

    async def bounded() -> list[str]:
        return await asyncio.wait_for(query(), QUERY_TIMEOUT_S)

    try:
        return asyncio.run(bounded())
    except Exception:
        return None
