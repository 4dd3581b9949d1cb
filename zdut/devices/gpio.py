"""GPIO modules: gpio-button (press for a while) and gpio-switch (on/off/toggle).

Backends (one engine file each):

* ``chardev`` (default, ``gpio_chardev``): the Linux GPIO character device (``/dev/gpiochipN``)
  through the GPIO v2 uAPI ioctls; works on any board with a kernel GPIO driver.
* ``devmem`` (``gpio_devmem``): dutctl's Raspberry Pi register access (BCM2835/2836/2837/2711)
  through ``/dev/gpiomem``; refused with a clear error on hosts without it.
* ``sim`` (``gpio_sim``): an in-process simulation used by the tests (no GPIO chip needed).

Levels are physical (1 = high): ``activelow`` is applied by the modules, as in dutctl.
A line is requested at init and held until deinit, which drives it low and releases it.
"""

from __future__ import annotations

import asyncio
from typing import ClassVar, Protocol, TypeVar

import msgspec

from zdut.common.durations import format_duration, parse_duration
from zdut.devices.base import Module, ModuleError, Session
from zdut.devices.gpio_chardev import DEFAULT_CHIP, ChardevLine
from zdut.devices.gpio_devmem import GPIOMEM, DevmemLine
from zdut.devices.gpio_sim import SimLine
from zdut.devices.powerbase import OFF, ON, TOGGLE, PowerModule, on_off

DEFAULT_PRESS_S = 0.5
BACKENDS = ("chardev", "devmem", "sim")


class LineOptions(msgspec.Struct, forbid_unknown_fields=True):
    pin: int
    activelow: bool = False
    backend: str = "chardev"
    chip: str = DEFAULT_CHIP


class ButtonOptions(LineOptions, forbid_unknown_fields=True):
    pass


class SwitchOptions(LineOptions, forbid_unknown_fields=True):
    initial: str | bool = "off"  # YAML 1.1 reads a bare on/off as a bool


LineOptionsT = TypeVar("LineOptionsT", bound=LineOptions)


class Line(Protocol):
    """One output line owned by a module."""

    def set(self, level: int) -> None: ...

    def get(self) -> int: ...

    def close(self) -> None: ...


def open_line(backend: str, chip: str, pin: int, level: int) -> Line:
    if backend == "chardev":
        return ChardevLine(chip, pin, level)
    if backend == "devmem":
        return DevmemLine(pin, level)
    if backend == "sim":
        return SimLine(chip, pin, level)
    raise ModuleError(f'unknown gpio backend "{backend}" (want chardev, devmem or sim)')


def _backend_help(backend: str, chip: str) -> str:
    if backend == "sim":
        return "Backend: sim (SIMULATED: no hardware is driven; for tests and demos).\n"
    if backend == "devmem":
        return f"Backend: devmem (Raspberry Pi GPIO registers via {GPIOMEM}).\n"
    return f"Backend: chardev (Linux GPIO character device {chip}).\n"


_BACKEND_TEXT = (
    "\nwith: pin (line offset on the chip; for devmem the raw BCM number), activelow (bool),\n"
    "backend (chardev = Linux GPIO character device, the default; devmem = Raspberry Pi /dev/gpiomem;\n"
    "sim = simulated, no hardware), chip (GPIO chip for chardev, default /dev/gpiochip0; for sim an\n"
    "optional directory where each level is written to gpio<pin>).\n"
)

_SHARED_PIN = (
    "\nIt is the users responsibility to ensure that the used GPIO pin is not also used by\n"
    "other modules or otherwise occupied by the system!\n"
)


class _GpioModule(Module[LineOptionsT]):
    line: Line | None = None

    def __init__(self, options: LineOptionsT) -> None:
        super().__init__(options)
        # Checked when the config loads (see ipmi), so --check-config refuses what start-up would.
        if options.backend not in BACKENDS:
            raise ModuleError(f'unknown gpio backend "{options.backend}" (want chardev, devmem or sim)')
        if options.pin < 0:
            raise ModuleError(f"invalid pin {options.pin}: must not be negative")

    def _open(self, level: int) -> None:
        opts = self.options
        self.line = open_line(opts.backend, opts.chip, opts.pin, level)

    def _set(self, level: int) -> None:
        if self.line is None:
            raise ModuleError("GPIO line is not initialised")
        try:
            self.line.set(level)
        except OSError as exc:
            raise ModuleError(f"cannot drive GPIO line {self.options.pin}: {exc.strerror}") from None

    def _pin_help(self, polarity: str) -> str:
        opts = self.options
        return polarity + f"The used GPIO pin is pin {opts.pin}.\n" + _backend_help(opts.backend, opts.chip)

    async def deinit(self) -> None:
        if self.line is None:
            return
        try:
            self.line.set(0)  # dutctl leaves every pin low on shutdown
        except OSError:
            pass
        finally:
            self.line.close()
            self.line = None


class GpioButton(_GpioModule[ButtonOptions]):
    id = "gpio-button"
    Options = ButtonOptions

    def help(self) -> str:
        idle = (
            "The button is active low. Thus 'Idle' mean 'High', 'Pressed' means 'Low'\n"
            if self.options.activelow
            else "The button is active high. Thus 'Idle' mean 'Low', 'Pressed' means 'High'\n"
        )
        return (
            "Simulate a button press by changing the state of a GPIO pin\n"
            "\nARGUMENTS:\n\t[duration]\n\n"
            "The duration controls the time the button is pressed. If no duration is passed, a default is used.\n"
            f"Default duration is {format_duration(DEFAULT_PRESS_S)}.\n"
            "\nA duration string is a possibly signed sequence of decimal numbers, each with optional fraction\n"
            'and a unit suffix, such as "300ms", "-1.5h" or "2h45m".\n'
            'Valid time units are "ns", "us" (or "µs"), "ms", "s", "m", "h".\n\n'
            + self._pin_help(idle)
            + _BACKEND_TEXT
            + _SHARED_PIN
        )

    @property
    def _idle(self) -> int:
        return 1 if self.options.activelow else 0

    async def init(self) -> None:
        self._open(self._idle)

    async def run(self, session: Session, args: list[str]) -> None:
        duration = DEFAULT_PRESS_S
        if args:
            try:
                duration = parse_duration(args[0])
            except ValueError as exc:
                raise ModuleError(str(exc)) from None
            if duration < 0:
                raise ModuleError(f'invalid duration "{args[0]}": must not be negative')
        self._set(1 - self._idle)
        try:
            await asyncio.sleep(duration)
        finally:
            # Released on every path, cancellation included: a stuck reset line would hold the DUT.
            self._set(self._idle)
        await session.print(f"Button pressed for {format_duration(duration)}\n")


class GpioSwitch(_GpioModule[SwitchOptions], PowerModule[SwitchOptions]):
    """dutctl's switch: no verb reports the state, verbs are case-sensitive, an unknown one is an error."""

    id = "gpio-switch"
    Options = SwitchOptions
    more_verbs: ClassVar[dict[str, str]] = {TOGGLE: ""}  # dutctl's help lists the verbs without descriptions
    fold_case = False

    on: bool = False

    def __init__(self, options: SwitchOptions) -> None:
        super().__init__(options)
        raw = options.initial
        self._initial = on_off(raw) if isinstance(raw, bool) else raw.lower()
        if self._initial not in (ON, OFF):
            raise ModuleError(f'invalid initial state "{options.initial}" (want on or off)')

    def help(self) -> str:
        polarity = (
            "The switch is active low. Thus 'On' mean 'Low', 'Off' means 'High'\n"
            if self.options.activelow
            else "The switch is active high. Thus 'On' mean 'High', 'Off' means 'Low'\n"
        )
        return (
            "Simulate an on/off switch by changing the state of a GPIO pin\n"
            f"\nARGUMENTS:\n\t[{'|'.join(self.verbs)}]\n\n"
            "The on, off and toggle commands control the state of the switch.\n"
            "If no argument is passed, the current state is printed.\n\n"
            + self._pin_help(polarity)
            + _BACKEND_TEXT
            + "initial: state after the agent starts, on or off (case-insensitive, default off).\n"
            + _SHARED_PIN
        )

    def _level(self, on: bool) -> int:
        return int(on != self.options.activelow)

    async def init(self) -> None:
        self._open(self._level(self._initial == ON))
        self.on = self._initial == ON

    def report(self, on: bool) -> str:
        return f"Current state: {on_off(on)}\n"

    async def no_verb(self, session: Session) -> None:
        await session.print(self.report(await self.read()))

    async def unknown_verb(self, session: Session, verb: str) -> None:
        raise ModuleError(f"unknown argument: {verb}")

    async def read(self) -> bool:
        return self.on

    async def switch(self, verb: str) -> str:
        target = await self.target(verb)
        self._set(self._level(target))
        already = verb != TOGGLE and self.on == target
        self.on = target
        return f"{'Already' if already else 'Turned'} {on_off(target)}"
