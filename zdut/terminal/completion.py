"""Tab completion for the shell, from the Tracker's cache only: never a network round trip here.

Names and help texts come from other processes: a name with a control character is not offered (as by
``zdut __complete``), and what the menu shows beside a name has its controls escaped (``safe_text``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prompt_toolkit.completion import CompleteEvent, Completer, Completion, PathCompleter
from prompt_toolkit.document import Document

from zdut.terminal.safe_text import clean, safe
from zdut.terminal.shell_view import KEYWORDS, LabView, resolve

FORMAT_NAMES = ("text", "json", "yaml", "oneline")
LOCK_DURATIONS = ("30m", "1h", "2h", "8h")
#: A word that starts like this is completed as a local path whatever the command.
PATH_STARTS = ("/", "./", "../", "~")


class ShellCompleter(Completer):
    def __init__(self, view: Callable[[], LabView], device: Callable[[], str | None]) -> None:
        self.view, self.device = view, device
        self.paths = PathCompleter(expanduser=True)

    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterator[Completion]:
        text = document.text_before_cursor
        words = text.split()
        current = "" if not text or text[-1].isspace() else words.pop()
        view, device = self.view(), self.device()
        if not words:
            in_use = [*view.commands.get(device, []), "lock", "unlock"] if device else []
            yield from _words(current, [*KEYWORDS, *in_use, *view.devices], self._device_meta(view, device))
            return
        if words == ["use"]:
            yield from _words(current, view.devices, self._device_meta(view, None))
            return
        if words == ["format"]:
            yield from _words(current, FORMAT_NAMES)
            return
        if words[0] in KEYWORDS:
            return
        words = resolve(words, device, view)
        dev = words[0]
        if len(words) == 1:
            helps = {c: _first_line(view.helps.get((dev, c), "")) for c in view.commands.get(dev, [])}
            yield from _words(current, [*helps, "lock", "unlock"], helps.get)
        elif words[1] == "lock":
            if len(words) == 2:
                yield from _words(current, LOCK_DURATIONS, lambda _: "lock duration")
        elif words[1] == "unlock":
            if len(words) == 2:
                yield from _words(current, ["force"], lambda _: "break anyone's lock")
        elif view.takes_files(dev, words[1]) or current.startswith(PATH_STARTS):
            yield from self._paths(current)
        elif len(words) == 2:
            yield from _words(current, ["help"], lambda _: "usage of the command")

    def _paths(self, current: str) -> Iterable[Completion]:
        if current.count(":") == 1 and not current.startswith(PATH_STARTS):
            current = current.split(":")[1]  # SRC:DST: complete the side being typed
        return self.paths.get_completions(Document(current), CompleteEvent(completion_requested=True))

    @staticmethod
    def _device_meta(view: LabView, device: str | None) -> Callable[[str], str | None]:
        def meta(name: str) -> str | None:
            d = view.devices.get(name)
            if d is None:
                return _first_line(view.helps.get((device, name), "")) if device else None
            state = "online" if d.online else "OFFLINE"
            if d.lock is not None:
                state += f", {'in use' if not d.lock.expires_at else 'locked'} by {d.lock.owner}"
            return f"device, {state}"

        return meta


def _first_line(text: str) -> str:
    return text.strip().split("\n", 1)[0][:60]


def _words(
    current: str, names: Iterable[str], meta: Callable[[str], str | None] = lambda _: None
) -> Iterator[Completion]:
    """The names starting with ``current``; a single match gets its trailing space, as in bash."""
    matches = sorted({n for n in names if n.startswith(current) and clean(n)})
    for name in matches:
        text = name + " " if len(matches) == 1 else name
        shown = meta(name)
        yield Completion(text, -len(current), display=name, display_meta=None if shown is None else safe(shown))
