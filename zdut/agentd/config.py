"""Agent configuration: dutctl's YAML schema turned into validated devices, commands and module instances.

The loader walks the composed node tree instead of ``yaml.safe_load`` output, so that every error carries
the line dutctl reports, duplicate keys are refused (PyYAML silently keeps the last one, dutctl's yaml.v3
refuses them) and a wrong shape becomes a ConfigError rather than a TypeError deep inside.  Unlike dutctl,
an unknown key at any level, an empty file and an unknown ``version`` are errors (``agentd.config_checks``),
and a module whose constructor refuses its options fails here, so ``--check-config`` and start-up, which both
call ``load_config``, refuse the same configs with the same line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NoReturn

import msgspec
import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from zdut import devices as registry
from zdut.agentd import config_checks as checks
from zdut.common.flags import go_quote
from zdut.devices.base import Module, decode_options
from zdut.protocol import Code, ZdutError

# dutctl reserves list/version (devices) and lock/unlock/help (commands); zdut's CLI also takes shell/agents/forget.
RESERVED_DEVICES = frozenset({"list", "version", "shell", "agents", "forget"})
RESERVED_COMMANDS = frozenset({"lock", "unlock", "help"})
MODULES_DOC = "docs/modules.md"

ErrorKind = Literal[
    "empty_devices", "no_commands", "no_modules", "multiple_passthrough", "passthrough_with_args",
    "passthrough_and_args_decl", "module_not_found", "module_load", "undefined_argument", "reserved_name",
    "validation", "unknown_key", "version", "empty", "yaml", "io",
]

_TEMPLATE_REF = re.compile(r"\$\{([a-zA-Z0-9_-]+)\}")
_NULL = "tag:yaml.org,2002:null"
_BOOL = "tag:yaml.org,2002:bool"
_MERGE = "tag:yaml.org,2002:merge"


class ConfigError(Exception):
    """An invalid configuration, rendered ``device "D": command "C": line N: <message>`` (known parts only)."""

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        device: str | None = None,
        command: str | None = None,
        line: int | None = None,
        path: str | None = None,
    ) -> None:
        super().__init__(message)
        self.kind: ErrorKind = kind
        self.message = message
        self.device = device
        self.command = command
        self.line = line
        self.path = path

    def __str__(self) -> str:
        parts = []
        if self.device is not None:
            parts.append(f"device {go_quote(self.device)}: ")
        if self.command is not None:
            parts.append(f"command {go_quote(self.command)}: ")
        if self.line:
            parts.append(f"line {self.line}: ")
        return "".join(parts) + self.message


@dataclass
class ArgDecl:
    name: str
    desc: str


@dataclass
class Step:
    """One ``uses`` entry: its module instance lives as long as the agent (state persists across runs)."""

    module_id: str
    passthrough: bool
    args: list[str]
    options: msgspec.Struct
    module: Module
    line: int  # of the uses entry


@dataclass
class Command:
    name: str
    desc: str
    args: list[ArgDecl]
    steps: list[Step]
    line: int  # of the command's name

    def resolve(self, runtime_args: list[str]) -> list[list[str]]:
        """The arguments of each step for one run (dutctl's static, passthrough and templating modes)."""
        has_passthrough = any(step.passthrough for step in self.steps)
        if runtime_args and not has_passthrough and not self.args:
            raise ZdutError(
                Code.INVALID_ARGUMENT,
                "arguments provided but command has neither a passthrough module nor declared arguments to receive "
                "them",
            )
        if self.args and len(runtime_args) != len(self.args):
            raise ZdutError(Code.INVALID_ARGUMENT, f"expected {len(self.args)} argument(s) but got {len(runtime_args)}")
        values = {decl.name: value for decl, value in zip(self.args, runtime_args, strict=True)} if self.args else {}

        def substitute(arg: str) -> str:
            # One pass: a value that itself contains ${x} is not expanded again.
            return _TEMPLATE_REF.sub(lambda m: values.get(m.group(1), m.group(0)), arg)

        return [
            list(runtime_args) if step.passthrough else [substitute(arg) for arg in step.args] for step in self.steps
        ]

    def help_text(self) -> str:
        """What ``<device> <command> help`` shows: the config's desc, then the passthrough module's help or
        dutctl's summary of the modules and arguments."""
        passthrough = next((step for step in self.steps if step.passthrough), None)
        if passthrough is not None:
            text = passthrough.module.help()
        else:
            text = f"Command with {len(self.steps)} module(s): {', '.join(step.module_id for step in self.steps)}"
            if self.args:
                text += "\n\nArguments:\n" + "".join(f"  {decl.name}: {decl.desc}\n" for decl in self.args)
        return f"{self.desc}\n\n{text}" if self.desc else text


@dataclass
class Device:
    name: str
    desc: str
    commands: dict[str, Command]
    line: int  # of the device's name


@dataclass
class AgentConfig:
    version: str
    devices: dict[str, Device]
    path: str | None


# ---------------------------------------------------------------- entry points


def load_config(path: str | os.PathLike[str]) -> AgentConfig:
    """Read and validate an agent config file.  Like every ConfigError, a read failure keeps the file name
    in ``path``, not in the message, so callers print ``<path>: <error>`` once."""
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError("io", f"cannot read config file: {exc.strerror or exc}", path=name) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError("io", f"cannot read config file: not UTF-8 ({exc.reason})", path=name) from exc
    return parse_config(text, name)


def parse_config(text: str, path: str | None = None) -> AgentConfig:
    """A full agent config document: ``{version, devices}``."""

    def parse(root: Node | None) -> AgentConfig:
        version, devices, line = "", None, None
        if root is None or _is_null(root):
            raise _TOP.error("empty", checks.EMPTY)
        want = "the config (want a mapping with version and devices)"
        for key, value in _fields(root, _TOP, want, checks.CONFIG_KEYS):
            if key.value == "version":
                version, line = _text(value, _TOP, "version (want a string)"), _line(value)
            elif key.value == "devices":
                devices = value
        if problem := checks.version_problem(version):
            raise _TOP.error("version", problem, line if version else None)
        # Like dutctl, a missing or null `devices` is an agent without devices; only `{}` is an error.
        return AgentConfig(version, _devices(devices), path)

    return _parse(text, path, parse)


def parse_devices(text: str, path: str | None = None) -> AgentConfig:
    """Only the value of ``devices:`` (the format of dutctl's validation cases)."""
    return _parse(text, path, lambda root: AgentConfig("", _devices(root), path))


def _parse(text: str, path: str | None, parse: Callable[[Node | None], AgentConfig]) -> AgentConfig:
    try:
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            message = ": ".join(part for part in (exc.context, exc.problem) if part) or "invalid YAML"
            raise ConfigError("yaml", message, line=mark.line + 1 if mark else None) from None
        except yaml.YAMLError as exc:
            raise ConfigError("yaml", str(exc)) from None
        try:
            return parse(root)
        except RecursionError:
            # An alias that contains itself (`&a [*a]`) composes fine but never ends.
            raise ConfigError("yaml", "recursive YAML alias") from None
    except ConfigError as exc:
        exc.path = path
        raise


# ---------------------------------------------------------------- node helpers


@dataclass(frozen=True)
class _Where:
    """The device and command an error belongs to."""

    device: str | None = None
    command: str | None = None

    def error(self, kind: ErrorKind, message: str, line: int | None = None) -> ConfigError:
        return ConfigError(kind, message, device=self.device, command=self.command, line=line)


_TOP = _Where()


def _line(node: Node) -> int:
    return node.start_mark.line + 1


def _is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == _NULL


def _shape_error(where: _Where, node: Node, want: str) -> NoReturn:
    tag = node.tag.replace("tag:yaml.org,2002:", "!!")
    shown = ""
    if isinstance(node, ScalarNode):
        value = node.value if len(node.value) <= 40 else node.value[:37] + "..."
        shown = f" `{value}`"
    raise where.error("yaml", f"cannot unmarshal {tag}{shown} into {want}", _line(node))


def _check_unique(node: MappingNode, where: _Where, fold: bool = False) -> None:
    seen: dict[str, ScalarNode] = {}
    for key, _ in node.value:
        if not isinstance(key, ScalarNode) or key.tag == _MERGE:
            continue
        name = key.value.lower() if fold else key.value
        if name in seen:
            raise where.error(
                "yaml", f"mapping key {go_quote(key.value)} already defined at line {_line(seen[name])}", _line(key)
            )
        seen[name] = key


def _mapping(node: Node, where: _Where, want: str) -> list[tuple[ScalarNode, Node]]:
    """The key/value pairs of a mapping node: duplicates refused, merge keys (``<<``) expanded with the
    explicit keys winning, as yaml.v3 does."""
    if not isinstance(node, MappingNode):
        _shape_error(where, node, want)
    _check_unique(node, where)
    merged: dict[str, tuple[ScalarNode, Node]] = {}
    explicit: dict[str, tuple[ScalarNode, Node]] = {}
    for key, value in node.value:
        if not isinstance(key, ScalarNode):
            _shape_error(where, key, "a mapping key (want a scalar)")
        if key.tag == _MERGE:
            sources = value.value if isinstance(value, SequenceNode) else [value]
            for source in sources:
                for pair in _mapping(source, where, "a merge (want a mapping)"):
                    merged.setdefault(pair[0].value, pair)
        else:
            explicit[key.value] = (key, value)
    return [pair for name, pair in merged.items() if name not in explicit] + list(explicit.values())


def _fields(node: Node, where: _Where, want: str, known: tuple[str, ...]) -> list[tuple[ScalarNode, Node]]:
    """A mapping of schema keys: a key outside ``known`` is an error naming the nearest known one."""
    pairs = _mapping(node, where, want)
    for key, _ in pairs:
        if key.value not in known:
            raise where.error("unknown_key", checks.unknown_key(key.value, known), _line(key))
    return pairs


def _sequence(node: Node, where: _Where, want: str) -> list[Node]:
    """The items of a sequence node; null is an empty list."""
    if _is_null(node):
        return []
    if not isinstance(node, SequenceNode):
        _shape_error(where, node, want)
    return list(node.value)


def _text(node: Node, where: _Where, want: str) -> str:
    """A scalar as written (yaml.v3 decodes `1.0` into a string field as "1.0"); null is ""."""
    if _is_null(node):
        return ""
    if not isinstance(node, ScalarNode):
        _shape_error(where, node, want)
    return node.value


def _flag(node: Node, where: _Where, want: str) -> bool:
    if _is_null(node):
        return False
    value = None
    if isinstance(node, ScalarNode) and node.tag == _BOOL:
        value = yaml.constructor.SafeConstructor.bool_values.get(node.value.lower())
    if value is None:
        _shape_error(where, node, want)
    return value


def _with_options(node: Node | None, where: _Where) -> object:
    """The ``with`` mapping as plain Python values, for decode_options."""
    if node is None or _is_null(node):
        return None
    if not isinstance(node, MappingNode):
        _shape_error(where, node, "with (want a mapping of module options)")
    # Option names are matched case-insensitively, so `Port` and `port` would silently collide.
    _check_unique(node, where, fold=True)
    _check_nested_unique(node, where, set())
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise where.error("yaml", exc.problem or "invalid YAML", mark.line + 1 if mark else _line(node)) from None
    except Exception as exc:  # PyYAML's constructors raise KeyError/ValueError for odd explicit tags (`!!bool x`)
        raise where.error("yaml", f"invalid value in with: {exc!r}", _line(node)) from None
    finally:
        loader.dispose()


def _check_nested_unique(node: Node, where: _Where, seen: set[int]) -> None:
    if id(node) in seen:
        return
    seen.add(id(node))
    if isinstance(node, MappingNode):
        _check_unique(node, where)
        for key, value in node.value:
            _check_nested_unique(key, where, seen)
            _check_nested_unique(value, where, seen)
    elif isinstance(node, SequenceNode):
        for item in node.value:
            _check_nested_unique(item, where, seen)


# ---------------------------------------------------------------- schema


def _devices(node: Node | None) -> dict[str, Device]:
    if node is None or _is_null(node):
        return {}
    pairs = _mapping(node, _TOP, "devices (want a mapping of device names to devices)")
    if not pairs:
        raise _TOP.error("empty_devices", "devices must not be empty")
    devices: dict[str, Device] = {}
    for key, value in pairs:
        where = _Where(device=key.value)
        if key.value in RESERVED_DEVICES:
            raise where.error("reserved_name", "name is reserved", _line(key))
        devices[key.value] = _device(key, value, where)
    return devices


def _device(key: ScalarNode, node: Node, where: _Where) -> Device:
    desc = ""
    commands: dict[str, Command] = {}
    if not _is_null(node):
        for field, value in _fields(node, where, "a device (want a mapping with desc and cmds)", checks.DEVICE_KEYS):
            if field.value == "desc":
                desc = _text(value, where, "desc (want a string)")
            elif field.value == "cmds" and not _is_null(value):
                for name_node, cmd_node in _mapping(value, where, "cmds (want a mapping of command names to commands)"):
                    cmd_where = _Where(where.device, name_node.value)
                    if name_node.value in RESERVED_COMMANDS:
                        raise cmd_where.error("reserved_name", "name is reserved", _line(name_node))
                    commands[name_node.value] = _command(name_node, cmd_node, cmd_where)
    # dutctl reports this without a line: the device name already says where.
    if not commands:
        raise where.error("no_commands", "device must have at least one command")
    return Device(key.value, desc, commands, _line(key))


def _command(key: ScalarNode, node: Node, where: _Where) -> Command:
    # Command-level errors point at the command's body (its first key), as dutctl's node.Line does.
    line = _line(key) if _is_null(node) else _line(node)
    desc = ""
    decls: list[ArgDecl] = []
    steps: list[Step] = []
    if not _is_null(node):
        want = "a command (want a mapping with desc, args and uses)"
        for field, value in _fields(node, where, want, checks.COMMAND_KEYS):
            if field.value == "desc":
                desc = _text(value, where, "desc (want a string)")
            elif field.value == "args":
                decls = [
                    _arg_decl(item, where) for item in _sequence(value, where, "args (want a list of {name, desc})")
                ]
            elif field.value == "uses":
                steps = [_step(item, where) for item in _sequence(value, where, "uses (want a list of modules)")]

    if not steps:
        raise where.error("no_modules", "command must have at least one module", line)
    passthrough = [step for step in steps if step.passthrough]
    if len(passthrough) > 1:
        raise where.error("multiple_passthrough", "command must have at most one passthrough module", line)
    if passthrough and decls:
        raise where.error(
            "passthrough_and_args_decl", "command cannot have both passthrough module and args declaration", line
        )
    if passthrough and passthrough[0].args:
        raise where.error("passthrough_with_args", "passthrough module must not have args set", line)
    names = [decl.name for decl in decls]
    for step in steps:
        for arg in step.args:
            for ref in _TEMPLATE_REF.findall(arg):
                if ref not in names:
                    raise where.error(
                        "undefined_argument",
                        f"undefined argument reference: module {go_quote(step.module_id)} references "
                        f"undefined argument {go_quote(ref)} (available: [{' '.join(names)}])",
                        line,
                    )
    return Command(key.value, desc, decls, steps, _line(key))


def _arg_decl(node: Node, where: _Where) -> ArgDecl:
    decl = ArgDecl("", "")
    if not _is_null(node):
        want = "an argument declaration (want a mapping with name and desc)"
        for field, value in _fields(node, where, want, checks.ARGUMENT_KEYS):
            if field.value == "name":
                decl.name = _text(value, where, "name (want a string)")
            elif field.value == "desc":
                decl.desc = _text(value, where, "desc (want a string)")
    return decl


def _step(node: Node, where: _Where) -> Step:
    line = _line(node)
    module_id, passthrough, args = "", False, []
    with_node: Node | None = None
    if not _is_null(node):
        want = "a uses entry (want a mapping with module, passthrough, args, with)"
        for field, value in _fields(node, where, want, checks.USES_KEYS):
            if field.value == "module":
                module_id = _text(value, where, "module (want a string)")
            elif field.value == "passthrough":
                passthrough = _flag(value, where, "passthrough (want true or false)")
            elif field.value == "args":
                args = [
                    _text(item, where, "an arg (want a string)")
                    for item in _sequence(value, where, "args (want a list of strings)")
                ]
            elif field.value == "with":
                with_node = value

    if not module_id:
        raise where.error("module_not_found", "module name must not be empty", line)
    try:
        module_cls = registry.get(module_id)
    except Exception as exc:  # a registered module whose code cannot be imported: say which one
        raise where.error("module_load", f"module {go_quote(module_id)} cannot be loaded: {exc}", line) from exc
    if module_cls is None:
        raise where.error(
            "module_not_found", f"module {go_quote(module_id)} not found, maybe not registered, see {MODULES_DOC}", line
        )
    if isinstance(with_node, MappingNode):
        keys = [key for key, _ in _mapping(with_node, where, "with (want a mapping of module options)")]
        if bad := checks.unknown_with_key([key.value for key in keys], module_cls.Options):
            raise where.error("validation", f"module {go_quote(module_id)}: {bad[1]}", _line(keys[bad[0]]))
    try:
        options = decode_options(module_cls, _with_options(with_node, where))
    except ValueError as exc:
        raise where.error("validation", f"module {go_quote(module_id)}: {exc}", line) from None
    try:
        module = module_cls(options)
    except Exception as exc:  # a module constructor refusing its options is a config error, not a crash
        raise where.error("validation", f"module {go_quote(module_id)}: {exc}", line) from exc
    return Step(module_id, passthrough, args, options, module, line)
