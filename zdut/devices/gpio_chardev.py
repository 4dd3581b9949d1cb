"""GPIO lines through the Linux GPIO character device (``/dev/gpiochipN``) and its v2 uAPI ioctls.

The ctypes structures mirror ``include/uapi/linux/gpio.h``; only what requesting one output line,
setting it and reading it back needs is bound.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os

from zdut.devices.base import ModuleError

DEFAULT_CHIP = "/dev/gpiochip0"
CONSUMER = b"zdut"

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
