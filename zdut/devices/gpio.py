"""GPIO modules: gpio-button (press for a while) and gpio-switch (on/off/toggle).

Backends:

* ``chardev`` (default): the Linux GPIO character device (``/dev/gpiochipN``) through
  the GPIO v2 uAPI ioctls; works on any board with a kernel GPIO driver.
* ``devmem``: dutctl's Raspberry Pi register access (BCM2835/2836/2837/2711) through
  ``/dev/gpiomem``; refused with a clear error on hosts without it.
* ``sim``: an in-process simulation used by the tests (no GPIO chip needed).

Levels are physical (1 = high): ``activelow`` is applied by the modules, as in dutctl.
A line is requested at init and held until deinit, which drives it low and releases it.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import mmap
import os
import threading
import time
from typing import NamedTuple, Protocol

import msgspec

from zdut.common.durations import format_duration, parse_duration
from zdut.devices.base import Module, ModuleError, Session

DEFAULT_CHIP = "/dev/gpiochip0"
DEFAULT_PRESS_S = 0.5
BACKENDS = ("chardev", "devmem", "sim")
CONSUMER = b"zdut"


class ButtonOptions(msgspec.Struct, forbid_unknown_fields=True):
    pin: int
    activelow: bool = False
    backend: str = "chardev"
    chip: str = DEFAULT_CHIP


class SwitchOptions(msgspec.Struct, forbid_unknown_fields=True):
    pin: int
    initial: str | bool = "off"  # YAML 1.1 reads a bare on/off as a bool
    activelow: bool = False
    backend: str = "chardev"
    chip: str = DEFAULT_CHIP


class Line(Protocol):
    """One output line owned by a module."""

    def set(self, level: int) -> None: ...

    def get(self) -> int: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------- chardev (GPIO v2 uAPI, linux/gpio.h)

_GPIO_MAX_NAME_SIZE = 32
_GPIO_V2_LINES_MAX = 64
_GPIO_V2_LINE_NUM_ATTRS_MAX = 10
_GPIO_V2_LINE_FLAG_OUTPUT = 1 << 3
_GPIO_V2_LINE_ATTR_ID_OUTPUT_VALUES = 2


class _ChipInfo(ctypes.Structure):
    _fields_ = (("name", ctypes.c_char * 32), ("label", ctypes.c_char * 32), ("lines", ctypes.c_uint32))


class _LineValues(ctypes.Structure):
    _fields_ = (("bits", ctypes.c_uint64), ("mask", ctypes.c_uint64))


class _LineAttribute(ctypes.Structure):
    # The kernel's union of flags/values/debounce is 8 bytes; we only use ``values``.
    _fields_ = (("id", ctypes.c_uint32), ("padding", ctypes.c_uint32), ("values", ctypes.c_uint64))


class _LineConfigAttribute(ctypes.Structure):
    _fields_ = (("attr", _LineAttribute), ("mask", ctypes.c_uint64))


class _LineConfig(ctypes.Structure):
    _fields_ = (
        ("flags", ctypes.c_uint64),
        ("num_attrs", ctypes.c_uint32),
        ("padding", ctypes.c_uint32 * 5),
        ("attrs", _LineConfigAttribute * _GPIO_V2_LINE_NUM_ATTRS_MAX),
    )


class _LineRequest(ctypes.Structure):
    _fields_ = (
        ("offsets", ctypes.c_uint32 * _GPIO_V2_LINES_MAX),
        ("consumer", ctypes.c_char * _GPIO_MAX_NAME_SIZE),
        ("config", _LineConfig),
        ("num_lines", ctypes.c_uint32),
        ("event_buffer_size", ctypes.c_uint32),
        ("padding", ctypes.c_uint32 * 5),
        ("fd", ctypes.c_int32),
    )


def _iowr(nr: int, size: int, read_only: bool = False) -> int:
    direction = 2 if read_only else 3  # _IOC_READ, or _IOC_READ|_IOC_WRITE
    return (direction << 30) | (size << 16) | (0xB4 << 8) | nr


GPIO_GET_CHIPINFO_IOCTL = _iowr(0x01, ctypes.sizeof(_ChipInfo), read_only=True)
GPIO_V2_GET_LINE_IOCTL = _iowr(0x07, ctypes.sizeof(_LineRequest))
GPIO_V2_LINE_GET_VALUES_IOCTL = _iowr(0x0E, ctypes.sizeof(_LineValues))
GPIO_V2_LINE_SET_VALUES_IOCTL = _iowr(0x0F, ctypes.sizeof(_LineValues))


class ChardevLine:
    """A line requested as an output from a GPIO character device."""

    def __init__(self, chip: str, pin: int, level: int) -> None:
        self.fd = -1
        chip_fd = _open_chip(chip)
        try:
            req = _LineRequest()
            req.offsets[0] = pin
            req.consumer = CONSUMER
            req.num_lines = 1
            req.config.flags = _GPIO_V2_LINE_FLAG_OUTPUT
            req.config.num_attrs = 1
            req.config.attrs[0].attr.id = _GPIO_V2_LINE_ATTR_ID_OUTPUT_VALUES
            req.config.attrs[0].attr.values = level & 1
            req.config.attrs[0].mask = 1
            try:
                fcntl.ioctl(chip_fd, GPIO_V2_GET_LINE_IOCTL, req)
            except OSError as exc:
                raise _request_error(exc, chip, chip_fd, pin) from None
            self.fd = req.fd
        finally:
            os.close(chip_fd)

    def set(self, level: int) -> None:
        fcntl.ioctl(self.fd, GPIO_V2_LINE_SET_VALUES_IOCTL, _LineValues(bits=level & 1, mask=1))

    def get(self) -> int:
        values = _LineValues(mask=1)
        fcntl.ioctl(self.fd, GPIO_V2_LINE_GET_VALUES_IOCTL, values)
        return int(values.bits & 1)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _open_chip(chip: str) -> int:
    try:
        return os.open(chip, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ModuleError(
            f"GPIO chip {chip} not found: this host has no such GPIO character device "
            "(list them with 'ls /dev/gpiochip*' or gpiodetect from the gpiod package; "
            "set 'chip', or use backend 'sim' without hardware)"
        ) from None
    except PermissionError:
        raise ModuleError(
            f"permission denied opening GPIO chip {chip} (run the agent as a user in the group owning it, "
            "e.g. gpio or plugdev)"
        ) from None
    except OSError as exc:
        raise ModuleError(f"cannot open GPIO chip {chip}: {exc.strerror}") from None


def _request_error(exc: OSError, chip: str, chip_fd: int, pin: int) -> ModuleError:
    if exc.errno == errno.EBUSY:
        return ModuleError(f"GPIO line {pin} of {chip} is busy (requested by another module or process)")
    if exc.errno == errno.EINVAL:
        info = _ChipInfo()
        try:
            fcntl.ioctl(chip_fd, GPIO_GET_CHIPINFO_IOCTL, info)
            return ModuleError(f"GPIO line {pin} does not exist on {chip} (it has {info.lines} lines)")
        except OSError:
            pass
    if exc.errno == errno.ENOTTY:
        return ModuleError(f"{chip} is not a GPIO character device (or the kernel lacks the GPIO v2 uAPI)")
    return ModuleError(f"cannot request GPIO line {pin} of {chip}: {exc.strerror}")


# ---------------------------------------------------------------- devmem (Raspberry Pi BCM283x/2711 registers)

GPIOMEM = "/dev/gpiomem"
_GPFSEL0, _GPSET0, _GPCLR0, _GPLEV0 = 0x00, 0x1C, 0x28, 0x34
_BCM_MAX_PIN = 57


class DevmemLine:
    """dutctl's devmem backend: the Raspberry Pi GPIO block mapped from /dev/gpiomem."""

    def __init__(self, pin: int, level: int) -> None:
        if not 0 <= pin <= _BCM_MAX_PIN:
            raise ModuleError(f"pin {pin} out of range for devmem (BCM GPIO 0-{_BCM_MAX_PIN})")
        if not os.path.exists(GPIOMEM):
            raise ModuleError(
                f"gpio backend 'devmem' is not supported on this host: {GPIOMEM} does not exist "
                "(it is the Raspberry Pi BCM283x/BCM2711 GPIO block); use backend 'chardev'"
            )
        try:
            fd = os.open(GPIOMEM, os.O_RDWR | os.O_SYNC | os.O_CLOEXEC)
        except OSError as exc:
            raise ModuleError(f"cannot open {GPIOMEM}: {exc.strerror} (is the agent user in the gpio group?)") from None
        try:
            self._mem = mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.pin = pin
        self.set(level)
        reg, shift = _GPFSEL0 + 4 * (pin // 10), 3 * (pin % 10)
        self._write(reg, (self._read(reg) & ~(7 << shift)) | (1 << shift))  # function 001 = output

    def _reg(self, offset: int) -> ctypes.c_uint32:
        # One 32-bit access per register: the GPIO block does not tolerate byte-wise copies.
        return ctypes.c_uint32.from_buffer(self._mem, offset)

    def _read(self, offset: int) -> int:
        return int(self._reg(offset).value)

    def _write(self, offset: int, value: int) -> None:
        self._reg(offset).value = value & 0xFFFFFFFF

    def set(self, level: int) -> None:
        bank, bit = divmod(self.pin, 32)
        self._write((_GPSET0 if level else _GPCLR0) + 4 * bank, 1 << bit)

    def get(self) -> int:
        bank, bit = divmod(self.pin, 32)
        return (self._read(_GPLEV0 + 4 * bank) >> bit) & 1

    def close(self) -> None:
        self._mem.close()


# ---------------------------------------------------------------- sim


class SimEvent(NamedTuple):
    at: float  # time.monotonic()
    chip: str
    pin: int
    level: int


_sim_lock = threading.Lock()
_sim_levels: dict[tuple[str, int], int] = {}
_sim_owned: set[tuple[str, int]] = set()
#: Every level the sim backend drove, in order (tests read it through sim_history).
SIM_EVENTS: list[SimEvent] = []


def sim_level(pin: int, chip: str = DEFAULT_CHIP) -> int | None:
    """The level a sim line was last driven to, None if never."""
    with _sim_lock:
        return _sim_levels.get((chip, pin))


def sim_history(pin: int, chip: str = DEFAULT_CHIP) -> list[tuple[float, int]]:
    """(monotonic time, level) of every write to a sim line."""
    with _sim_lock:
        return [(e.at, e.level) for e in SIM_EVENTS if e.chip == chip and e.pin == pin]


class SimLine:
    """An in-memory line; if ``chip`` is a directory the level is also written to ``<chip>/gpio<pin>``."""

    def __init__(self, chip: str, pin: int, level: int) -> None:
        if pin < 0:
            raise ModuleError(f"GPIO line {pin} does not exist on {chip}")
        with _sim_lock:
            if (chip, pin) in _sim_owned:
                raise ModuleError(f"GPIO line {pin} of {chip} is busy (requested by another module or process)")
            _sim_owned.add((chip, pin))
        self.key = (chip, pin)
        self._file = os.path.join(chip, f"gpio{pin}") if os.path.isdir(chip) else None
        self.set(level)

    def set(self, level: int) -> None:
        with _sim_lock:
            _sim_levels[self.key] = level & 1
            SIM_EVENTS.append(SimEvent(time.monotonic(), *self.key, level & 1))
        if self._file:
            with open(self._file, "w") as fh:
                fh.write(f"{level & 1}\n")

    def get(self) -> int:
        with _sim_lock:
            return _sim_levels[self.key]

    def close(self) -> None:
        with _sim_lock:
            _sim_owned.discard(self.key)


# ---------------------------------------------------------------- modules


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


class _GpioModule(Module):
    line: Line | None = None

    def _open(self, level: int) -> None:
        opts = self.options
        if opts.backend not in BACKENDS:
            raise ModuleError(f'unknown gpio backend "{opts.backend}" (want chardev, devmem or sim)')
        if opts.pin < 0:
            raise ModuleError(f"invalid pin {opts.pin}: must not be negative")
        self.line = open_line(opts.backend, opts.chip, opts.pin, level)

    def _set(self, level: int) -> None:
        if self.line is None:
            raise ModuleError("GPIO line is not initialised")
        try:
            self.line.set(level)
        except OSError as exc:
            raise ModuleError(f"cannot drive GPIO line {self.options.pin}: {exc.strerror}") from None

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


class GpioButton(_GpioModule):
    id = "gpio-button"
    Options = ButtonOptions

    def help(self) -> str:
        opts = self.options
        idle = (
            "The button is active low. Thus 'Idle' mean 'High', 'Pressed' means 'Low'\n"
            if opts.activelow
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
            + idle
            + f"The used GPIO pin is pin {opts.pin}.\n"
            + _backend_help(opts.backend, opts.chip)
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


class GpioSwitch(_GpioModule):
    id = "gpio-switch"
    Options = SwitchOptions

    state: str = "off"

    def help(self) -> str:
        opts = self.options
        polarity = (
            "The switch is active low. Thus 'On' mean 'Low', 'Off' means 'High'\n"
            if opts.activelow
            else "The switch is active high. Thus 'On' mean 'High', 'Off' means 'Low'\n"
        )
        return (
            "Simulate an on/off switch by changing the state of a GPIO pin\n"
            "\nARGUMENTS:\n\t[on|off|toggle]\n\n"
            "The on, off and toggle commands control the state of the switch.\n"
            "If no argument is passed, the current state is printed.\n\n"
            + polarity
            + f"The used GPIO pin is pin {opts.pin}.\n"
            + _backend_help(opts.backend, opts.chip)
            + _BACKEND_TEXT
            + "initial: state after the agent starts, on or off (case-insensitive, default off).\n"
            + _SHARED_PIN
        )

    def _level(self, state: str) -> int:
        on = state == "on"
        return int(on != self.options.activelow)

    async def init(self) -> None:
        raw = self.options.initial
        initial = ("on" if raw else "off") if isinstance(raw, bool) else raw.lower()
        if initial not in ("on", "off"):
            raise ModuleError(f'invalid initial state "{self.options.initial}" (want on or off)')
        self._open(self._level(initial))
        self.state = initial

    async def run(self, session: Session, args: list[str]) -> None:
        if not args:
            await session.print(f"Current state: {self.state}\n")
            return
        verb = args[0]
        if verb not in ("on", "off", "toggle"):
            raise ModuleError(f"unknown argument: {verb}")
        target = ("off" if self.state == "on" else "on") if verb == "toggle" else verb
        self._set(self._level(target))
        already = verb != "toggle" and self.state == target
        self.state = target
        await session.print(f"Already {target}" if already else f"Turned {target}")
