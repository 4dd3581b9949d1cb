"""zdut.agentd.config: dutctl's agent config schema, its validation cases and examples, and argument resolution."""

from __future__ import annotations

import textwrap
from pathlib import Path

import msgspec
import pytest
import yaml

from zdut import devices as registry
from zdut.agentd import config
from zdut.agentd.config import ConfigError, load_config, parse_config, parse_devices
from zdut.devices.agent import TimeWait, TimeWaitOptions
from zdut.devices.base import Module, NoOptions, Session
from zdut.devices.dummy import DummyFT, DummyRepeat, DummyStatus
from zdut.protocol import Code, ZdutError

DATA = Path(__file__).parent / "data" / "dutctl"
TESTDATA = DATA / "testdata"
EXAMPLES = DATA / "examples"

# The two complete configurations among the validation cases; every other file holds only the devices map.
FULL_DOCUMENTS = {"valid_config.yaml", "invalid_config_empty_devices.yaml"}


def load_case(name: str) -> config.AgentConfig:
    path = TESTDATA / name
    if name in FULL_DOCUMENTS:
        return load_config(path)
    return parse_devices(path.read_text(), str(path))


def devices(text: str) -> config.AgentConfig:
    return parse_devices(textwrap.dedent(text))


def error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        devices(text)
    return info.value


# ---------------------------------------------------------------- dutctl's validation cases

ND, NC = "device must have at least one command", "command must have at least one module"
INVALID = {
    # file: (kind, device, command, line, str(error))
    "invalid_empty_devices.yaml": ("empty_devices", None, None, None, "devices must not be empty"),
    "invalid_config_empty_devices.yaml": ("empty_devices", None, None, None, "devices must not be empty"),
    "invalid_no_commands.yaml": ("no_commands", "device1", None, None, f'device "device1": {ND}'),
    "invalid_null_device.yaml": ("no_commands", "device1", None, None, f'device "device1": {ND}'),
    "invalid_no_modules.yaml": (
        "no_modules",
        "device1",
        "status",
        5,
        f'device "device1": command "status": line 5: {NC}',
    ),
    "invalid_missing_uses.yaml": (
        "no_modules",
        "device1",
        "status",
        5,
        f'device "device1": command "status": line 5: {NC}',
    ),
    "invalid_multiple_passthrough.yaml": (
        "multiple_passthrough",
        "device1",
        "status",
        5,
        'device "device1": command "status": line 5: command must have at most one passthrough module',
    ),
    "invalid_passthrough_with_module_args.yaml": (
        "passthrough_with_args",
        "device1",
        "status",
        5,
        'device "device1": command "status": line 5: passthrough module must not have args set',
    ),
    "invalid_unknown_module.yaml": (
        "module_not_found",
        "device1",
        "status",
        7,
        'device "device1": command "status": line 7: '
        'module "nonexistent" not found, maybe not registered, see docs/modules.md',
    ),
    "invalid_empty_module_name.yaml": (
        "module_not_found",
        "device1",
        "status",
        7,
        'device "device1": command "status": line 7: module name must not be empty',
    ),
    "invalid_uses_wrong_type.yaml": (
        "yaml",
        "device1",
        "status",
        6,
        'device "device1": command "status": line 6: '
        "cannot unmarshal !!str `not-a-list` into uses (want a list of modules)",
    ),
    "invalid_device_context.yaml": (
        "no_modules",
        "myboard",
        "flash",
        5,
        f'device "myboard": command "flash": line 5: {NC}',
    ),
    "invalid_command_context.yaml": (
        "no_modules",
        "device1",
        "flash",
        5,
        f'device "device1": command "flash": line 5: {NC}',
    ),
    "invalid_second_device.yaml": (
        "no_modules",
        "device2",
        "broken",
        12,
        f'device "device2": command "broken": line 12: {NC}',
    ),
    "invalid_reserved_command.yaml": (
        "reserved_name",
        "device1",
        "lock",
        4,
        'device "device1": command "lock": line 4: name is reserved',
    ),
    "invalid_reserved_device.yaml": ("reserved_name", "version", None, 1, 'device "version": line 1: name is reserved'),
}

# file: {device: [commands]}; the two "invalid_*" names are legacy names of valid cases.
VALID = {
    "valid_single.yaml": {"device1": ["status"]},
    "valid_single_module.yaml": {"device1": ["status"]},
    "valid_explicit_passthrough.yaml": {"device1": ["status"]},
    "valid_helper_args.yaml": {"device1": ["status"]},
    "valid_multi_device.yaml": {"device1": ["status"], "device2": ["repeat"]},
    "valid_multi_command.yaml": {"device1": ["status", "repeat"]},
    "valid_desc.yaml": {"device1": ["flash"]},
    "valid_all_dummies.yaml": {"device1": ["all"]},
    "valid_config.yaml": {"device1": ["status"]},
    "invalid_main_with_args.yaml": {"device1": ["status"]},
    "invalid_no_main_multi.yaml": {"device1": ["status"]},
}


def test_every_validation_case_is_covered() -> None:
    assert sorted(p.name for p in TESTDATA.iterdir()) == sorted({*INVALID, *VALID})


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_case(name: str) -> None:
    kind, device, command, line, rendered = INVALID[name]
    with pytest.raises(ConfigError) as info:
        load_case(name)
    err = info.value
    assert (err.kind, err.device, err.command, err.line, str(err)) == (kind, device, command, line, rendered)
    assert err.path == str(TESTDATA / name)


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_case(name: str) -> None:
    cfg = load_case(name)
    assert {dev: list(d.commands) for dev, d in cfg.devices.items()} == VALID[name]
    assert cfg.path == str(TESTDATA / name)


def test_valid_case_contents() -> None:
    single = load_case("valid_single_module.yaml").devices["device1"].commands["status"]
    # A lone module is not implicitly passthrough: runtime args are refused.
    assert [(s.module_id, s.passthrough, s.args) for s in single.steps] == [("dummy-repeat", False, [])]

    helper = load_case("valid_helper_args.yaml").devices["device1"].commands["status"]
    assert [(s.module_id, s.passthrough, s.args, s.line) for s in helper.steps] == [
        ("dummy-repeat", True, [], 7),
        ("dummy-status", False, ["verbose"], 9),
    ]

    desc = load_case("valid_desc.yaml").devices["device1"]
    assert (desc.desc, desc.commands["flash"].desc) == ("My Test Device", "Flash the firmware")

    all_dummies = load_case("valid_all_dummies.yaml").devices["device1"].commands["all"]
    assert [type(s.module) for s in all_dummies.steps] == [DummyStatus, DummyRepeat, DummyFT]

    full = load_case("valid_config.yaml")
    assert full.version == "1.0.0-alpha.1"
    assert (full.devices["device1"].line, full.devices["device1"].commands["status"].line) == (4, 7)


def test_module_instances_are_created_per_uses_entry() -> None:
    cmd = load_case("invalid_no_main_multi.yaml").devices["device1"].commands["status"]
    first, second = (step.module for step in cmd.steps)
    assert isinstance(first, DummyRepeat) and isinstance(second, DummyRepeat)
    assert first is not second
    assert cmd.steps[0].options == NoOptions() and first.options is cmd.steps[0].options


# ---------------------------------------------------------------- dutctl's examples


def _example_module_ids(path: Path) -> set[str]:
    doc = yaml.safe_load(path.read_text())
    return {step["module"] for dev in doc["devices"].values() for cmd in dev["cmds"].values() for step in cmd["uses"]}


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.iterdir()))
def test_example_loads(name: str) -> None:
    path = EXAMPLES / name
    for module_id in sorted(_example_module_ids(path)):
        try:
            registry.get(module_id)
        except ModuleNotFoundError as exc:
            # Skip only while the registry's own target file is missing, never for a missing dependency.
            if exc.name and exc.name.startswith("zdut.devices."):
                pytest.skip(f"module {module_id!r}: {exc.name} is not written yet")
            raise
    cfg = load_config(path)
    assert cfg.version == "1.0.0-alpha.1"
    assert cfg.devices
    for dev in cfg.devices.values():
        for cmd in dev.commands.values():
            assert all(isinstance(step.module, Module) for step in cmd.steps)


def test_examples_with_existing_modules() -> None:
    """These must never skip: their modules exist in this tree."""
    assert {d: list(v.commands) for d, v in load_config(EXAMPLES / "dutagent-cfg-example.yaml").devices.items()} == {
        "device1": ["status"],
        "device2": ["status", "repeat"],
        "device3": ["status", "file-transfer"],
    }
    assert list(load_config(EXAMPLES / "config-1.yaml").devices) == ["device1"]
    assert list(load_config(EXAMPLES / "config-2.yaml").devices["device2"].commands) == ["status", "repeat"]
    dummy = load_config(EXAMPLES / "dummy-example-cfg.yml").devices["self"]
    assert dummy.desc.startswith("This device represents no DUT")
    assert [s.module_id for s in dummy.commands["combined"].steps] == ["dummy-status", "dummy-ft", "dummy-status"]

    timed = load_config(EXAMPLES / "time-example-cfg.yml").devices["self"].commands
    wait = timed["system-double-check"].steps[1]
    assert isinstance(wait.module, TimeWait)
    assert wait.options == TimeWaitOptions(duration="2s")
    assert timed["just-wait"].steps[0].options == TimeWaitOptions(duration="1s")


# ---------------------------------------------------------------- argument modes


def _command(name: str, device: str, command: str) -> config.Command:
    return load_config(EXAMPLES / name).devices[device].commands[command]


def _invalid_argument(cmd: config.Command, args: list[str]) -> str:
    with pytest.raises(ZdutError) as info:
        cmd.resolve(args)
    assert info.value.code == Code.INVALID_ARGUMENT
    return info.value.message


def test_templating_resolution() -> None:
    cmd = _command("dutagent-cfg-example.yaml", "device3", "file-transfer")
    assert cmd.resolve(["in.bin", "out.bin"]) == [["transferring", "in.bin"], ["in.bin", "out.bin"]]
    # Single pass: a value that looks like a reference is not expanded again.
    assert cmd.resolve(["${dest-file}", "x"]) == [["transferring", "${dest-file}"], ["${dest-file}", "x"]]
    # The configured args are not modified by a run.
    assert cmd.steps[1].args == ["${source-file}", "${dest-file}"]


def test_templating_several_references_and_bare_dollar() -> None:
    cfg = devices(
        """
        dev:
          cmds:
            flash:
              args:
                - {name: fw, desc: firmware image}
                - {name: v_2, desc: version}
              uses:
                - module: dummy-status
                  args: ["$HOME/${fw}-${v_2}.bin", "${fw}${fw}", "$fw", "${ fw}"]
        """
    )
    cmd = cfg.devices["dev"].commands["flash"]
    assert cmd.resolve(["a", "b"]) == [["$HOME/a-b.bin", "aa", "$fw", "${ fw}"]]


def test_templating_count_mismatch() -> None:
    cmd = _command("dutagent-cfg-example.yaml", "device3", "file-transfer")
    assert _invalid_argument(cmd, ["one"]) == "expected 2 argument(s) but got 1"
    assert _invalid_argument(cmd, []) == "expected 2 argument(s) but got 0"
    assert _invalid_argument(cmd, ["a", "b", "c"]) == "expected 2 argument(s) but got 3"


def test_undefined_reference_is_a_load_error() -> None:
    err = error(
        """
        dev:
          cmds:
            flash:
              args:
                - {name: fw, desc: firmware}
                - {name: img, desc: image}
              uses:
                - module: dummy-status
                  args: ["${fw}"]
                - module: dummy-ft
                  args: ["${fw}", "${out}"]
        """
    )
    assert err.kind == "undefined_argument"
    assert str(err) == (
        'device "dev": command "flash": line 5: undefined argument reference: '
        'module "dummy-ft" references undefined argument "out" (available: [fw img])'
    )


def test_reference_without_declarations_is_a_load_error() -> None:
    err = error(
        """
        dev:
          cmds:
            run:
              uses:
                - module: dummy-status
                  args: ["${x}"]
        """
    )
    assert (err.kind, str(err)) == (
        "undefined_argument",
        'device "dev": command "run": line 5: undefined argument reference: '
        'module "dummy-status" references undefined argument "x" (available: [])',
    )


STATIC_ERROR = "arguments provided but command has neither a passthrough module nor declared arguments to receive them"


def test_static_mode() -> None:
    cmd = load_case("invalid_main_with_args.yaml").devices["device1"].commands["status"]
    assert cmd.resolve([]) == [["foo"]]
    assert _invalid_argument(cmd, ["x"]) == STATIC_ERROR
    two = load_case("invalid_no_main_multi.yaml").devices["device1"].commands["status"]
    assert two.resolve([]) == [[], []]
    assert _invalid_argument(two, ["a", "b"]) == STATIC_ERROR


def test_passthrough_mode() -> None:
    cmd = load_case("valid_helper_args.yaml").devices["device1"].commands["status"]
    assert cmd.resolve(["-t", "60s", "--", "${x}"]) == [["-t", "60s", "--", "${x}"], ["verbose"]]
    assert cmd.resolve([]) == [[], ["verbose"]]


def test_help_text_passthrough_leads_with_the_desc() -> None:
    cmd = load_case("valid_explicit_passthrough.yaml").devices["device1"].commands["status"]
    assert cmd.help_text() == "Explicit passthrough with helper\n\nThis dummy module repeats the input from the client."


def test_help_text_static() -> None:
    cmd = load_case("invalid_no_main_multi.yaml").devices["device1"].commands["status"]
    assert cmd.help_text() == "two modules, neither passthrough\n\nCommand with 2 module(s): dummy-repeat, dummy-repeat"


def test_help_text_templating() -> None:
    cmd = _command("dutagent-cfg-example.yaml", "device3", "file-transfer")
    assert cmd.help_text() == (
        "Transfer a file\n\n"
        "Command with 2 module(s): dummy-status, dummy-ft\n\n"
        "Arguments:\n"
        "  source-file: Source file path\n"
        "  dest-file: Destination file path\n"
    )


def test_interactive() -> None:
    cmds = load_config(EXAMPLES / "dummy-example-cfg.yml").devices["self"].commands
    assert {name: any(step.module.interactive for step in cmd.steps) for name, cmd in cmds.items()} == {
        "status": False,
        "repeat": True,
        "file-transfer": False,
        "combined": False,
    }


def test_passthrough_and_args_declaration() -> None:
    err = error(
        """
        dev:
          cmds:
            run:
              args: [{name: a, desc: x}]
              uses:
                - module: dummy-status
                  passthrough: true
        """
    )
    assert (err.kind, str(err)) == (
        "passthrough_and_args_decl",
        'device "dev": command "run": line 5: command cannot have both passthrough module and args declaration',
    )


# ---------------------------------------------------------------- names


@pytest.mark.parametrize("name", ["list", "version", "shell", "agents", "forget"])
def test_reserved_device_names(name: str) -> None:
    err = error(
        f"""
        ok:
          cmds: {{status: {{uses: [{{module: dummy-status}}]}}}}
        {name}:
          cmds: {{status: {{uses: [{{module: dummy-status}}]}}}}
        """
    )
    assert (err.kind, str(err)) == ("reserved_name", f'device "{name}": line 4: name is reserved')


@pytest.mark.parametrize("name", ["lock", "unlock", "help"])
def test_reserved_command_names(name: str) -> None:
    err = error(f"dev:\n  cmds:\n    {name}:\n      uses: [{{module: dummy-status}}]\n")
    assert str(err) == f'device "dev": command "{name}": line 3: name is reserved'


def test_unreserved_names_load() -> None:
    uses = "{uses: [{module: dummy-status}]}"
    cfg = devices(f"force:\n  cmds:\n    force: {uses}\n    Lock: {uses}\n")
    assert list(cfg.devices["force"].commands) == ["force", "Lock"]


def test_error_quotes_names_like_go() -> None:
    err = error('"a\\"b":\n  cmds: {}\n')
    assert str(err) == 'device "a\\"b": device must have at least one command'


# ---------------------------------------------------------------- module options


def _with(options: str, module: str = "time-wait") -> str:
    return f"dev:\n  cmds:\n    wait:\n      uses:\n        - module: {module}\n          with:\n{options}"


def test_with_options_decoded() -> None:
    step = devices(_with("            Duration: 3s\n")).devices["dev"].commands["wait"].steps[0]
    assert step.options == TimeWaitOptions(duration="3s")
    assert step.module.options is step.options


def test_unknown_with_key() -> None:
    err = error(_with("            durations: 3s\n"))
    assert (err.kind, str(err)) == (
        "validation",
        'device "dev": command "wait": line 7: module "time-wait": unknown \'with\' key \'durations\' '
        "(did you mean 'duration'?)",
    )
    err = error(_with("            verbose: true\n", module="dummy-status"))
    assert str(err) == (
        'device "dev": command "wait": line 7: module "dummy-status": unknown \'with\' key \'verbose\' (allowed: none)'
    )


def test_wrong_with_type() -> None:
    err = error(_with("            duration: [1, 2]\n"))
    assert (err.kind, str(err)) == (
        "validation",
        'device "dev": command "wait": line 5: module "time-wait": bad \'with\' key \'duration\': '
        "Expected `str`, got `array`",
    )
    err = error("dev:\n  cmds:\n    wait:\n      uses:\n        - module: time-wait\n          with: 2s\n")
    assert (err.kind, str(err)) == (
        "yaml",
        'device "dev": command "wait": line 6: '
        "cannot unmarshal !!str `2s` into with (want a mapping of module options)",
    )


def test_with_merge_key() -> None:
    cfg = devices(
        """
        dev:
          cmds:
            a:
              uses:
                - module: time-wait
                  with: &slow {duration: 5s}
            b:
              uses:
                - module: time-wait
                  with: {<<: *slow}
            c:
              uses:
                - module: time-wait
                  with: {<<: *slow, duration: 1ms}
        """
    )
    durations = {name: cmd.steps[0].options.duration for name, cmd in cfg.devices["dev"].commands.items()}
    assert durations == {"a": "5s", "b": "5s", "c": "1ms"}


class _Refuses(Module):
    def __init__(self, options: msgspec.Struct) -> None:
        raise ValueError("needs a port")

    def help(self) -> str:
        return ""

    async def run(self, session: Session, args: list[str]) -> None:
        return None


def test_module_constructor_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry._loaded, "refuses", _Refuses)
    err = error("dev:\n  cmds:\n    c:\n      uses:\n        - module: refuses\n")
    assert (err.kind, str(err)) == ("validation", 'device "dev": command "c": line 5: module "refuses": needs a port')


def test_module_whose_code_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry._BUILTIN, "ghost", "zdut.devices.ghost_not_written:Ghost")
    err = error("dev:\n  cmds:\n    c:\n      uses:\n        - module: ghost\n")
    assert (err.kind, str(err)) == (
        "module_load",
        'device "dev": command "c": line 5: module "ghost" cannot be loaded: '
        "No module named 'zdut.devices.ghost_not_written'",
    )
    assert isinstance(err.__cause__, ModuleNotFoundError)


# ---------------------------------------------------------------- YAML shape and syntax


def test_duplicate_device() -> None:
    err = error(
        """
        dev:
          cmds: {a: {uses: [{module: dummy-status}]}}
        dev:
          cmds: {b: {uses: [{module: dummy-status}]}}
        """
    )
    assert (err.kind, str(err)) == ("yaml", 'line 4: mapping key "dev" already defined at line 2')


@pytest.mark.parametrize(
    ("text", "rendered"),
    [
        (
            "dev:\n  cmds:\n    a: {uses: [{module: dummy-status}]}\n    a: {uses: [{module: dummy-repeat}]}\n",
            'device "dev": line 4: mapping key "a" already defined at line 3',
        ),
        (
            "dev:\n  cmds:\n    a:\n      uses:\n        - module: dummy-status\n          module: dummy-repeat\n",
            'device "dev": command "a": line 6: mapping key "module" already defined at line 5',
        ),
        (
            "dev:\n  desc: x\n  desc: y\n  cmds: {a: {uses: [{module: dummy-status}]}}\n",
            'device "dev": line 3: mapping key "desc" already defined at line 2',
        ),
        (
            _with("            duration: 1s\n            duration: 2s\n"),
            'device "dev": command "wait": line 8: mapping key "duration" already defined at line 7',
        ),
        (
            # with keys are case-insensitive, so these would silently collide
            _with("            duration: 1s\n            DURATION: 2s\n"),
            'device "dev": command "wait": line 8: mapping key "DURATION" already defined at line 7',
        ),
        (
            _with("            duration: {a: 1,\n              a: 2}\n"),
            'device "dev": command "wait": line 8: mapping key "a" already defined at line 7',
        ),
    ],
)
def test_duplicate_keys(text: str, rendered: str) -> None:
    err = error(text)
    assert (err.kind, str(err)) == ("yaml", rendered)


def test_duplicate_top_level_key() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("version: 1\ndevices: {}\ndevices: {}\n")
    assert (info.value.kind, str(info.value)) == ("yaml", 'line 3: mapping key "devices" already defined at line 2')


_USES = "dev:\n  cmds:\n    c:\n      uses:\n        - module: dummy-status\n"
WRONG_SHAPES = [
    # (yaml, device, command, line, message)
    ("- a\n- b\n", None, None, 1, "!!seq into devices (want a mapping of device names to devices)"),
    ("dev: [a]\n", "dev", None, 1, "!!seq into a device (want a mapping with desc and cmds)"),
    ("dev: text\n", "dev", None, 1, "!!str `text` into a device (want a mapping with desc and cmds)"),
    ("dev: {cmds: x}\n", "dev", None, 1, "!!str `x` into cmds (want a mapping of command names to commands)"),
    ("dev: {desc: [a], cmds: {}}\n", "dev", None, 1, "!!seq into desc (want a string)"),
    ("dev: {cmds: {[c]: {}}}\n", "dev", None, 1, "!!seq into a mapping key (want a scalar)"),
    ("dev: {cmds: {c: [a]}}\n", "dev", "c", 1, "!!seq into a command (want a mapping with desc, args and uses)"),
    ("dev: {cmds: {c: {uses: {module: x}}}}\n", "dev", "c", 1, "!!map into uses (want a list of modules)"),
    ("dev: {cmds: {c: {args: fw}}}\n", "dev", "c", 1, "!!str `fw` into args (want a list of {name, desc})"),
    (
        "dev: {cmds: {c: {args: [fw]}}}\n",
        "dev",
        "c",
        1,
        "!!str `fw` into an argument declaration (want a mapping with name and desc)",
    ),
    (
        "dev:\n  cmds:\n    c:\n      uses: [dummy-status]\n",
        "dev",
        "c",
        4,
        "!!str `dummy-status` into a uses entry (want a mapping with module, passthrough, args, with)",
    ),
    ("dev: {cmds: {c: {uses: [{module: [x]}]}}}\n", "dev", "c", 1, "!!seq into module (want a string)"),
    (_USES + "          passthrough: maybe\n", "dev", "c", 6, "!!str `maybe` into passthrough (want true or false)"),
    (_USES + "          passthrough: 'true'\n", "dev", "c", 6, "!!str `true` into passthrough (want true or false)"),
    (_USES + "          args: {a: 1}\n", "dev", "c", 6, "!!map into args (want a list of strings)"),
    (_USES + "          args: [[a]]\n", "dev", "c", 6, "!!seq into an arg (want a string)"),
]


@pytest.mark.parametrize(("text", "device", "command", "line", "message"), WRONG_SHAPES)
def test_wrong_shapes(text: str, device: str | None, command: str | None, line: int, message: str) -> None:
    err = error(text)
    assert (err.kind, err.device, err.command, err.line, err.message) == (
        "yaml",
        device,
        command,
        line,
        f"cannot unmarshal {message}",
    )


def test_wrong_top_level_shape() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("- version: 1\n")
    assert str(info.value) == (
        "line 1: cannot unmarshal !!seq into the config (want a mapping with version and devices)"
    )
    with pytest.raises(ConfigError) as info:
        parse_config("version: 1\ndevices: [a]\n")
    assert str(info.value) == "line 2: cannot unmarshal !!seq into devices (want a mapping of device names to devices)"


def test_yaml_syntax_error() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("version: 1\ndevices:\n\tdev: {}\n", path="agent.yaml")
    err = info.value
    assert (err.kind, err.line, err.path) == ("yaml", 3, "agent.yaml")
    assert str(err) == "line 3: while scanning for the next token: found character '\\t' that cannot start any token"


def test_several_documents_are_refused() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("version: 1\n---\ndevices: {}\n")
    assert str(info.value) == "line 2: expected a single document in the stream: but found another document"


def test_recursive_alias() -> None:
    err = error("dev: &d {<<: *d}\n")
    assert (err.kind, str(err)) == ("yaml", "recursive YAML alias")


def test_null_command_has_no_modules() -> None:
    err = error("dev:\n  cmds:\n    c:\n")
    assert (err.kind, str(err)) == ("no_modules", f'device "dev": command "c": line 3: {NC}')


def test_version_as_written_and_yaml_booleans() -> None:
    # Unlike dutctl, unknown keys are refused (tests/test_config_checks.py).
    cfg = parse_config(
        textwrap.dedent(
            """
            version: 1.0
            devices:
              dev:
                cmds:
                  c:
                    uses:
                      - module: dummy-status
                        passthrough: yes
            """
        )
    )
    assert cfg.version == "1.0"  # as written, not the float 1.0
    step = cfg.devices["dev"].commands["c"].steps[0]
    assert (step.module_id, step.passthrough) == ("dummy-status", True)


def test_devices_missing_or_null_means_no_devices() -> None:
    assert parse_config("version: 1.0.0\n").devices == {}
    assert parse_config("version: 1.0.0\ndevices:\n").devices == {}


def test_null_fields_are_empty() -> None:
    cfg = devices(
        """
        dev:
          desc:
          cmds:
            c:
              desc:
              args:
              uses:
                - module: dummy-status
                  args:
                  with:
                  passthrough:
        """
    )
    cmd = cfg.devices["dev"].commands["c"]
    assert (cmd.desc, cmd.args, cmd.steps[0].args, cmd.steps[0].passthrough) == ("", [], [], False)


def test_device_merge_key() -> None:
    cfg = devices(
        """
        base: &base
          desc: shared
          cmds: {status: {uses: [{module: dummy-status}]}}
        other:
          <<: *base
          desc: own
        """
    )
    other = cfg.devices["other"]
    assert (other.desc, list(other.commands)) == ("own", ["status"])


# ---------------------------------------------------------------- files


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert (err.kind, err.path, str(err)) == ("io", str(path), "cannot read config file: No such file or directory")
    assert isinstance(err.__cause__, FileNotFoundError)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert (info.value.kind, str(info.value)) == ("io", "cannot read config file: Is a directory")
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(ConfigError) as info:
        load_config(binary)
    assert (info.value.kind, str(info.value)) == ("io", "cannot read config file: not UTF-8 (invalid start byte)")


def test_error_in_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text("version: 1\ndevices:\n  dev:\n    cmds: {}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (info.value.path, str(info.value)) == (str(path), f'device "dev": {ND}')


def test_unconstructable_with_value() -> None:
    err = error(_with("            duration: !!int x\n"))
    assert (err.kind, str(err)) == (
        "yaml",
        'device "dev": command "wait": line 7: invalid value in with: '
        "ValueError(\"invalid literal for int() with base 10: 'x'\")",
    )
    err = error(_with("            duration: !custom x\n"))
    assert (err.kind, str(err)) == (
        "yaml",
        'device "dev": command "wait": line 7: could not determine a constructor for the tag \'!custom\'',
    )
