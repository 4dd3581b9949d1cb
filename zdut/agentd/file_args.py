"""Which client files one run may move: the modules' declared file arguments that the user typed.

Each step's ``Module.file_args`` names the client paths its arguments stand for (``devices.base.FileArg``);
a declaration counts only where that argument is the user's: every argument of a passthrough step, and a
templated step arg that is exactly ``${name}`` (or, for one side of ``src:dst``, that side).  A path the
config fixes (a static arg, ``prefix/${name}``) is the operator's choice, not the client's file to offer.
The agent sends the result in ``RunStarted.files``; the client transfers nothing else (docs/protocol.md,
"Files").  The client cannot check the agent's word: this narrows what an honest agent's modules can touch,
and it is what authenticating the agent makes trustworthy.
"""

from __future__ import annotations

import re

from zdut.agentd.config import Command

SEND, RECEIVE, BOTH = "send", "receive", "both"
_LONE_REF = re.compile(r"\$\{[a-zA-Z0-9_-]+\}")


def typed(template: str, side: int | None) -> bool:
    """Whether a templated step arg (or the ``side`` of its ``src:dst``) is exactly one runtime argument."""
    if _LONE_REF.fullmatch(template):
        return True
    parts = template.split(":")
    return side is not None and len(parts) == 2 and _LONE_REF.fullmatch(parts[side]) is not None


def declared_files(command: Command, step_args: list[list[str]]) -> dict[str, str]:
    """path -> SEND (the client uploads it), RECEIVE (the client writes it) or BOTH, for one run whose
    steps get ``step_args`` (``Command.resolve``)."""
    ways: dict[str, set[str]] = {}
    for step, args in zip(command.steps, step_args, strict=True):
        try:
            decls = step.module.file_args(list(args))
        except Exception:  # a module bug declares nothing: its transfers are refused, naming the path
            decls = []
        for decl in decls:
            if not 0 <= decl.arg < len(args) or not (step.passthrough or typed(step.args[decl.arg], decl.side)):
                continue
            way = ways.setdefault(decl.path, set())
            way.update(name for name, on in ((SEND, decl.send), (RECEIVE, decl.receive)) if on)
    return {path: BOTH if len(way) == 2 else next(iter(way)) for path, way in ways.items() if way}
