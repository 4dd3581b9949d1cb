"""``zdut shell``: an interactive prompt on one lasting connection to a broker or agent.

Every line goes through the one-shot CLI's grammar and actions (``terminal.commands.Cli``), run
on the shell's connected client instead of a fresh one.  The prompt appears at
once and the connection is made in the background; a ``Tracker`` keeps a cache
of the lab for completion and the toolbar.  Lines are split by POSIX quoting
(``terminal.shell_words``).  At the prompt no error ends the shell: it prints the
message and prompts again; lines typed while a command runs wait in the terminal
and run after it.  Ctrl-C cancels the running command; Ctrl-D or ``exit [N]``
leaves.  With stdin not a terminal, lines are read as a script (no prompt,
commands get no stdin) that stops at its first failing line, with its status.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

from prompt_toolkit import PromptSession
from prompt_toolkit.application import run_in_terminal
from prompt_toolkit.application.current import set_app
from prompt_toolkit.formatted_text import FormattedText
from prompt_toolkit.history import FileHistory, History, InMemoryHistory
from prompt_toolkit.output import ColorDepth
from prompt_toolkit.styles import Style

from zdut.client import Client, Run
from zdut.common.client_config import default_user
from zdut.common.paths import state_dir
from zdut.protocol import ZdutError
from zdut.terminal import shell_words
from zdut.terminal.commands import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, Action, Cli, Options, UsageError
from zdut.terminal.completion import ShellCompleter
from zdut.terminal.output import FORMATS
from zdut.terminal.printer import OutputFailed
from zdut.terminal.safe_text import safe
from zdut.terminal.shell_view import CONNECTED, CONNECTING, Tracker, resolve

HELP = """\
The one-shot CLI's grammar, without flags:
  list                      devices and their locks
  agents                    agents behind a broker
  forget AGENT              drop an offline agent and its devices from the broker
  DEV                       commands of a device
  DEV CMD [args...]         run a command (Ctrl-C cancels it; Ctrl-] leaves an interactive console)
  DEV CMD help              usage of a command
  DEV lock [DURATION]       reserve a device (default 30m, e.g. 1h30m); DEV unlock [force]
And the shell's own:
  use DEV                   work on DEV: then `CMD args`, `lock`, `unlock`... run on it; `use` or `..` leaves
  format [text|json|yaml|oneline]
  help, version, exit [N] (or Ctrl-D)
Words are split as by sh: quotes and backslashes, # comments; no $ expansion, pipes or redirections.
Tab completes devices, commands, keywords and file arguments; Up/Down and Ctrl-R search the history.
"""

STYLE = Style.from_dict(
    {
        "zdut": "bold",
        "device": "ansicyan bold",
        "state": "ansiyellow",
        "bottom-toolbar.down": "bg:ansired",
    }
)
GRAY, RESET = "\x1b[90m", "\x1b[0m"


def history_file() -> str:
    """$XDG_STATE_HOME/zdut/shell_history, else ~/.local/state/zdut/shell_history."""
    return str(state_dir() / "shell_history")


def open_history() -> History:
    path = history_file()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "a").close()
    except OSError as exc:
        sys.stderr.write(f"zdut shell: history not kept ({path}: {exc.strerror})\n")
        return InMemoryHistory()
    return FileHistory(path)


class ShellCli(Cli):
    """The CLI's actions, with Ctrl-C routed through the shell (which owns the signals) and stdin only for
    an interactive command (a console) at the prompt: what is typed during any other command is the
    shell's next lines, and a script's rest is not the commands' either."""

    def __init__(self, opts: Options, shell: Shell) -> None:
        super().__init__(opts)
        self.shell = shell

    @contextlib.contextmanager
    def interrupts(self, handler: Callable[[], None]) -> Iterator[None]:
        previous, self.shell.on_interrupt = self.shell.on_interrupt, handler
        try:
            yield
        finally:
            self.shell.on_interrupt = previous

    async def _attach(self, run: Run, interactive: bool) -> bool:
        if interactive and self.shell.interactive:
            return await super()._attach(run, interactive)
        await run.close_stdin()  # typed-ahead lines stay in the terminal for the prompt to read
        return False


class Shell:
    def __init__(self, opts: Options, interactive: bool, script: bool | None = None) -> None:
        """``interactive``: a prompt (stdin and stdout are a terminal); ``script``: stdin is not a terminal,
        so the first failing line ends the shell with its status (default: not interactive)."""
        self.opts, self.interactive = opts, interactive
        self.script = not interactive if script is None else script
        self.cli = ShellCli(opts, self)
        self.tracker = Tracker(opts.server, opts.user or default_user(opts.keys), self._notify, self._invalidate,
                               opts.keys, opts.server_keys)
        self.device: str | None = None
        #: What Ctrl-C does right now: cancel the command being executed, or nothing.
        self.on_interrupt: Callable[[], None] | None = None
        self.session: PromptSession[str] | None = None
        self.notice = ""
        self.held: list[str] = []  # notices that arrived while a command owned the terminal
        self.status = EXIT_OK  # of the last line (empty lines and comments have none)
        self.leaving = False  # exit was typed

    # ------------------------------------------------------------- main loops
    async def main(self) -> int:
        self.tracker.start(refresh=self.interactive)
        try:
            if self.interactive:
                await self._prompt_loop()
            else:
                await self._script_loop()
        finally:
            await self.tracker.close()
        return self.status

    async def _prompt_loop(self) -> None:
        self.session = PromptSession(
            history=open_history(),
            completer=ShellCompleter(lambda: self.tracker.view, lambda: self.device),
            complete_while_typing=False,
            bottom_toolbar=self.toolbar,
            style=STYLE,
            color_depth=ColorDepth.MONOCHROME if self.opts.no_color else None,
        )
        while True:
            self._print_held()
            try:
                line = await self.session.prompt_async(self.prompt)
            except KeyboardInterrupt:
                continue
            except EOFError:
                return
            if not await self.handle(line):
                return

    async def _script_loop(self) -> None:
        while line := await _readline():
            if not await self.handle(line):
                return

    def interrupt(self) -> None:
        if self.on_interrupt is not None:
            self.on_interrupt()

    # ------------------------------------------------------------- one line
    async def handle(self, line: str) -> bool:
        """Execute one line and keep its status; False when the shell should end: ``exit``, or in a script
        the first line that fails (an empty line or a comment keeps the status it found)."""
        status = await self._line(line)
        if status is not None:
            self.status = status
        return not self.leaving and (self.status == EXIT_OK or not self.script)

    async def _line(self, line: str) -> int | None:
        try:
            words = shell_words.split(line)
        except shell_words.LineError as exc:
            self.cli.error(f"cannot parse the line: {exc}")
            return EXIT_USAGE
        if not words:
            return None
        head, rest = words[0], words[1:]
        if head in ("exit", "quit"):
            return self._exit(head, rest)
        if head == "help":
            if rest:
                return self._fail("help takes no arguments; a command's usage is DEV CMD help")
            return self._help()
        if head == "format":
            return self._format(rest)
        if head == "use":
            return await self._use(rest)
        if head == "..":
            self.device = None
            return EXIT_OK
        if head == "version":
            return self._output(self.cli.version)
        return await self.interruptible(self._execute(words))

    def _fail(self, text: str, status: int = EXIT_ERROR) -> int:
        self.cli.error(text)
        return status

    def _exit(self, head: str, args: list[str]) -> int:
        """``exit`` leaves with the last line's status, as sh's does; ``exit N`` with N (0 to 255)."""
        if not args:
            self.leaving = True
            return self.status
        if len(args) > 1 or not re.fullmatch(r"[0-9]{1,3}", args[0]) or int(args[0]) > 255:
            return self._fail(f"{head} takes nothing or a status from 0 to 255", EXIT_USAGE)
        self.leaving = True
        return int(args[0])

    async def _execute(self, words: list[str]) -> int:
        """A line of the CLI's grammar, on the shell's client."""
        if self.device is not None:
            await self.tracker.prepare(self.device)
        try:
            words = resolve(words, self.device, self.tracker.view)
            action = self.cli.plan(words)
        except UsageError as exc:
            self.cli.error(f"{exc} (type help for the grammar)")
            return EXIT_ERROR
        status = await self.perform(action)
        if status == 0 and words[1:2] == ["unlock"]:
            self.tracker.view.released.add(words[0])  # our own unlock: no "your lock was broken" notice
        return status

    async def perform(self, action: Action) -> int:
        try:
            client = await self.tracker.ready()
        except ZdutError as exc:
            self.cli.error(exc.message)
            return EXIT_ERROR
        return await self.cli.perform(action, client)

    async def interruptible(self, job: Coroutine[Any, Any, int]) -> int:
        """Run a job so that Ctrl-C cancels it, not the shell (a Run re-routes Ctrl-C to its own cancel)."""
        task = asyncio.ensure_future(job)
        interrupted = False

        def interrupt() -> None:
            nonlocal interrupted
            interrupted = True
            task.cancel()

        self.on_interrupt = interrupt
        try:
            return await task
        except asyncio.CancelledError:
            if not interrupted:
                raise
            self.cli.error("interrupted")
            return EXIT_INTERRUPTED
        finally:
            self.on_interrupt = None
            self.tracker.poke()  # locks may have changed

    def _help(self) -> int:
        text = HELP
        if self.device is not None:
            commands = self.tracker.view.commands.get(self.device)
            listed = ", ".join(map(safe, commands)) if commands else "(not known yet)"
            text += f"Using {safe(self.device)}; its commands: {listed}\n"
        return self._write(text)

    def _format(self, args: list[str]) -> int:
        if len(args) > 1 or (args and args[0] not in FORMATS):
            return self._fail("format takes one of: text, json, yaml, oneline")
        if args:
            self.cli.out.fmt = "oneline" if args[0] == "csv" else args[0]
            if not self.interactive:
                return EXIT_OK  # a script's output stays pure json/yaml
        return self._write(f"output format: {self.cli.out.fmt}\n")

    def _write(self, text: str) -> int:
        def write() -> int:
            self.cli.out.raw(text.encode())
            return EXIT_OK

        return self._output(write)

    def _output(self, write: Callable[[], int]) -> int:
        """A shell word's own output; stdout full or gone is the line's failure, as for a command."""
        try:
            return write()
        except OutputFailed:
            return self.cli.output_failed()

    async def _use(self, args: list[str]) -> int:
        if not args:
            self.device = None
            return EXIT_OK
        if len(args) > 1:
            return self._fail("use takes one device name")
        name = args[0]
        if name in self.tracker.view.devices:
            self.device = name
            return EXIT_OK

        async def check(client: Client) -> int:
            await client.commands(name)  # NotFound for a device the server does not know
            return EXIT_OK

        status = await self.interruptible(self.perform(check))
        if status == EXIT_OK:
            self.device = name
        return status

    # ------------------------------------------------------------- display
    # Device and server names, owners and notices came from other processes: shown with controls escaped.
    def prompt(self) -> FormattedText:
        parts = [("class:zdut", "zdut")]
        if self.tracker.state != CONNECTED:
            parts.append(("class:state", f" ({self.tracker.state})"))
        if self.device is not None:
            parts.append(("class:device", f" {safe(self.device)}"))
        parts.append(("", "> "))
        return FormattedText(parts)

    def toolbar(self) -> FormattedText:
        t = self.tracker
        where = t.address
        if t.client is not None:
            where += f" ({safe(t.client.server_role)} {safe(t.client.server_name)})"
        if t.state == CONNECTED:
            state = [("", " connected")]
        elif t.state == CONNECTING:
            state = [("", " connecting...")]
        else:
            state = [("class:bottom-toolbar.down", " DISCONNECTED ")]
        online, offline, locked = t.view.counts()
        fresh = t.view.listed and t.state == CONNECTED  # a lost direct agent's devices are unknown, not online
        counts = f" | {online} online, {offline} offline, {locked} locked" if fresh else ""
        if fresh:
            counts += "".join(f" | {n} watching {safe(name)}" for name, n in t.view.watched(t.user))
        notice = f" | {safe(self.notice)}" if self.notice else ""
        return FormattedText([("", f" {where}"), *state, ("", counts + notice)])

    def _invalidate(self) -> None:
        if self.session is not None and self.session.app.is_running:
            self.session.app.invalidate()

    def _notify(self, notices: list[str]) -> None:
        """Show lab changes: in the toolbar, and as lines above the prompt without disturbing the input
        (run_in_terminal hides the prompt, prints, and draws it again); held while a command runs."""
        self.notice = f"{time.strftime('%H:%M:%S')} {'; '.join(notices)}"
        if not self.interactive or self.session is None:
            return
        app = self.session.app
        if app.is_running:
            with set_app(app):  # our tasks were started outside the prompt's context
                run_in_terminal(lambda: self._print_notices(notices))
            app.invalidate()
        else:
            self.held.extend(notices)

    def _print_held(self) -> None:
        held, self.held = self.held, []
        self._print_notices(held)

    def _print_notices(self, notices: list[str]) -> None:
        color = self.cli.out.color and not self.opts.no_color
        for text in notices:
            line = f"· {safe(text)}"
            sys.stdout.write(f"{GRAY}{line}{RESET}\n" if color else line + "\n")
        sys.stdout.flush()


async def _readline() -> str:
    """One line of stdin, read on a daemon thread: a blocked read must not keep the process alive."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[str] = loop.create_future()

    def work() -> None:
        try:
            line = sys.stdin.readline()
        except (OSError, ValueError):
            line = ""
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_settle, fut, line)

    threading.Thread(target=work, name="zdut-stdin", daemon=True).start()
    return await fut


def _settle(fut: asyncio.Future[str], line: str) -> None:
    if not fut.done():  # the prompt may have been cancelled meanwhile
        fut.set_result(line)


def main(opts: Options, words: list[str]) -> int:
    if words:
        sys.stderr.write(f"zdut shell takes no arguments, got: {' '.join(words)}\n")
        return EXIT_USAGE
    shell = Shell(opts, sys.stdin.isatty() and sys.stdout.isatty(), script=not sys.stdin.isatty())
    loop: asyncio.AbstractEventLoop | None = None
    main_task: asyncio.Task[int] | None = None

    # Python-level handlers that survive prompt-toolkit and console.attach adding and removing
    # their own loop handlers: Ctrl-C goes to the running command, SIGTERM ends the shell cleanly.
    def on_sigint(*_: Any) -> None:
        if loop is not None:
            loop.call_soon_threadsafe(shell.interrupt)

    def on_sigterm(*_: Any) -> None:
        if loop is not None and main_task is not None:
            loop.call_soon_threadsafe(main_task.cancel)

    async def run() -> int:
        nonlocal loop, main_task
        loop, main_task = asyncio.get_running_loop(), asyncio.current_task()
        try:
            return await shell.main()
        except asyncio.CancelledError:
            return 128 + signal.SIGTERM

    saved = signal.signal(signal.SIGINT, on_sigint), signal.signal(signal.SIGTERM, on_sigterm)
    try:
        return asyncio.run(run())
    finally:
        signal.signal(signal.SIGINT, saved[0])
        signal.signal(signal.SIGTERM, saved[1])
