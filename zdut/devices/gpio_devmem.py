"""GPIO lines through the Raspberry Pi's GPIO registers (BCM2835/2836/2837/2711) mapped from ``/dev/gpiomem``."""

from __future__ import annotations

import ctypes
import mmap
import os

from zdut.devices.base import ModuleError

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
