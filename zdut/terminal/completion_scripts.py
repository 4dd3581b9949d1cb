"""Shell completion for the one-shot ``zdut``: ``zdut completion bash|zsh|fish`` prints a script, and the script
asks ``zdut __complete WORDS...`` (the words after ``zdut``, the last one the word being completed) for the
candidates, one a line.  zsh and fish, which can show what a candidate is, ask ``zdut __complete_described``:
the same lines, each followed by a tab and its description where it has one (a command's config ``desc``).

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
from zdut.terminal.safe_text import clean, safe

FRESH_S = 60.0
QUERY_TIMEOUT_S = 0.25
#: Bounds of the cache file: servers kept (the least recently used out first), devices and commands each.
MAX_SERVERS, MAX_NAMES = 16, 4096
KEYWORDS = ("list", "agents", "forget", "shell", "version", "help", "completion", "keys")
DEVICE_WORDS = {"lock": "reserve the device", "unlock": "release the device", "help": "list the commands"}
SHELLS = ("bash", "zsh", "fish")
VALUE_FLAGS = {"s", "f", "u", "log", "key", "server-key"}
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
    local -a lines names shown
    local line
    lines=("${(@f)$(${words[1]} __complete_described "${(@)words[2,CURRENT]}" 2>/dev/null)}")
    for line in "${lines[@]}"; do  # NAME, or NAME<tab>DESCRIPTION
        [[ -n $line ]] || continue
        names+=("${line%%$'\t'*}")
        shown+=("${line/$'\t'/  -- }")
    done
    if ((${#names})); then
        compadd -l -d shown -a names
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
    zdut __complete_described $words (commandline -ct) 2>/dev/null
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


def complete(words: list[str], described: bool = False) -> int:
    """``zdut __complete WORDS...``: the candidates for the last word, one a line, each with a tab and its
    description when ``described`` and it has one; never an error.

    A name with a control character (a newline would make a second candidate, an ESC would drive the terminal,
    a bidi override would hide what is typed) is not offered: ``zdut list`` shows it, escaped.  A description
    has its controls escaped."""
    with contextlib.suppress(Exception):  # a completion that fails offers nothing, it never breaks the shell
        found = [(c, d) for c, d in candidates(words or [""]) if clean(c)]
        sys.stdout.write("".join(f"{c}\t{_one_line(d)}\n" if described and d else f"{c}\n" for c, d in found))
    return 0


def _one_line(text: str) -> str:
    return safe(" ".join(text.split()))


def candidates(words: list[str]) -> list[tuple[str, str]]:
    """(candidate, description or "") for the last of ``words``."""
    *before, current = words
    given: dict[str, str] = {}  # the value flags typed so far
    wants = ""
    positional: list[str] = []
    for word in before:
        if wants:
            given[wants], wants = word, ""
        elif positional or not word.startswith("-") or word in ("-", "--"):
            positional.append(word)
        else:
            name, eq, value = word.lstrip("-").partition("=")
            if name in VALUE_FLAGS and not eq:
                wants = name
            elif name in VALUE_FLAGS:
                given[name] = value
    if wants:
        return _starting(current, FLAG_VALUES.get(wants, ()))  # --key FILE: none, so the shell offers files
    if not positional and current.startswith("-"):
        return _starting(current, [*(f"-{f}" if len(f) == 1 else f"--{f}" for f in sorted(VALUE_FLAGS)),
                                   *BOOL_FLAGS])
    server = given["s"] if "s" in given else _default_server()
    keys = given.get("key"), given.get("server-key")
    if not positional:
        return _starting(current, [*KEYWORDS, *Cache(server, *keys).devices()])
    if positional[0] in KEYWORDS:
        return _starting(current, SHELLS) if positional == ["completion"] else []
    if len(positional) == 1:
        return _starting(current, {**Cache(server, *keys).commands(positional[0]), **DEVICE_WORDS})
    if len(positional) == 2:
        after = {"lock": dict.fromkeys(["30m", "1h", "2h", "8h"], "lock duration"),
                 "unlock": {"force": "break anyone's lock"}}
        return _starting(current, after.get(positional[1], {"help": "usage of the command"}))
    return []


def _starting(prefix: str, names: Any) -> list[tuple[str, str]]:
    """The names (an iterable, or a mapping of name to description) that start with ``prefix``."""
    described = names if isinstance(names, dict) else dict.fromkeys(names, "")
    return [(n, d) for n, d in described.items() if n.startswith(prefix)]


class Cache:
    """One server's device names and their commands, in ``$XDG_STATE_HOME/zdut/completion.json``; asked with
    the keys the command line, the environment or the config file name for it (as ``zdut`` would be)."""

    def __init__(self, server: str, key: str | None = None, server_key: str | None = None) -> None:
        self.server, self.path = server, state_dir() / "completion.json"
        self.key, self.server_key = key, server_key
        try:
            data = json.loads(self.path.read_text())
            self.all: dict[str, Any] = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            self.all = {}
        entry = self.all.get(server)
        self.entry: dict[str, Any] = entry if isinstance(entry, dict) else {}

    def devices(self) -> list[str]:
        return list(self._names("devices", None))

    def commands(self, device: str) -> dict[str, str]:
        """Each command of ``device`` with its desc ("" where it has none)."""
        return self._names(f"commands:{device}", device)

    def _names(self, key: str, device: str | None) -> dict[str, str]:
        held = self.entry.get(key)
        if isinstance(held, dict) and time.time() - float(held.get("at", 0)) < FRESH_S:
            return _held(held)
        fetched = _ask(self.server, device, self.key, self.server_key)
        if fetched is None:  # the server is away: what we knew
            return _held(held) if isinstance(held, dict) else {}
        kept = fetched[:MAX_NAMES]
        self.entry[key] = {"at": time.time(), "names": [n for n, _ in kept], "descs": [d for _, d in kept]}
        self._save()
        return dict(fetched)

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


def _held(entry: dict[str, Any]) -> dict[str, str]:
    """A cache entry's names with their descs (an entry written before descs has none)."""
    names, descs = entry.get("names", []), entry.get("descs", [])
    return {str(n): str(descs[i]) if i < len(descs) else "" for i, n in enumerate(names)}


def _default_server() -> str:
    from zdut.common.client_config import DEFAULT_SERVER, KeyConfigError, default_server

    try:
        return default_server()[0]
    except KeyConfigError:  # a bad config file: zdut itself says why; completion offers what it can
        return DEFAULT_SERVER


def _ask(server: str, device: str | None, key: str | None = None,
         server_key: str | None = None) -> list[tuple[str, str]] | None:
    """The server's device names (or ``device``'s commands with their descs) within :data:`QUERY_TIMEOUT_S`;
    None if it did not answer in time, or the keys for it cannot be settled (``zdut`` itself says why).
    ``server`` may be a list of brokers, as for ``zdut -s``: the first that answers is asked."""
    import asyncio

    from zdut.brokers import client_order, connect_first
    from zdut.client import Client
    from zdut.common.client_config import client_keys
    from zdut.protocol import ZdutError

    try:
        addresses = client_order(server)
    except ZdutError:  # not a list of addresses: zdut itself says why
        return None
    share = QUERY_TIMEOUT_S / len(addresses)  # each broker of a list its part of the time a Tab may take

    def make(address: str, _: float) -> Client:
        keys = client_keys(address, key, server_key)  # with keys, the user must be the key's
        return Client(address, None if keys else "completion", connect_timeout=share, call_timeout=QUERY_TIMEOUT_S,
                      keys=keys)

    async def query() -> list[tuple[str, str]]:
        client = await connect_first(addresses, make)
        try:
            if device is None:
                return [(d.name, "") for d in await client.list()]
            return await client.described_commands(device)
        finally:
            await client.close()

    async def bounded() -> list[tuple[str, str]]:
        async with asyncio.timeout(QUERY_TIMEOUT_S):
            return await query()

    try:
        return asyncio.run(bounded())
    except Exception:
        return None
