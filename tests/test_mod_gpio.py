"""gpio-button and gpio-switch on the sim backend (no GPIO chip exists here), plus backend errors."""

from __future__ import annotations

import asyncio
import ctypes
import os
from pathlib import Path

import pytest
from modhelpers import make_module, until

from zdut.devices import gpio_chardev, gpio_devmem
from zdut.devices.base import Module, ModuleError, decode_options
from zdut.devices.gpio import GpioButton, GpioSwitch
from zdut.devices.gpio_sim import sim_history, sim_level
from zdut.devices.testing import LocalSession


async def make(cls: type[Module], **with_: object) -> Module:
    return await make_module(cls, **{"backend": "sim", **with_})


def levels(pin: int, chip: Path) -> list[int]:
    return [level for _, level in sim_history(pin, str(chip))]


# ---------------------------------------------------------------- button


def test_button_press_with_duration(tmp_path: Path) -> None:
    async def main() -> LocalSession:
        mod = await make(GpioButton, pin=9, chip=str(tmp_path))
        assert sim_level(9, str(tmp_path)) == 0  # idle low
        session = LocalSession()
        await mod.run(session, ["200ms"])
        await mod.deinit()
        return session

    session = asyncio.run(main())
    assert session.prints == ["Button pressed for 200ms\n"]
    history = sim_history(9, str(tmp_path))
    assert [level for _, level in history] == [0, 1, 0, 0]  # init, press, release, deinit
    pressed = history[2][0] - history[1][0]
    assert 0.2 <= pressed < 1.0


def test_button_default_duration(tmp_path: Path) -> None:
    async def main() -> LocalSession:
        mod = await make(GpioButton, pin=3, chip=str(tmp_path))
        session = LocalSession()
        await mod.run(session, [])
        return session

    session = asyncio.run(main())
    assert session.prints == ["Button pressed for 500ms\n"]
    history = sim_history(3, str(tmp_path))
    assert history[2][0] - history[1][0] >= 0.5


def test_button_active_low(tmp_path: Path) -> None:
    async def main() -> None:
        mod = await make(GpioButton, pin=10, activelow=True, chip=str(tmp_path))
        assert sim_level(10, str(tmp_path)) == 1  # idle high
        await mod.run(LocalSession(), ["10ms"])
        await mod.deinit()

    asyncio.run(main())
    assert levels(10, tmp_path) == [1, 0, 1, 0]  # pressed = low; deinit drives low like dutctl
    assert (tmp_path / "gpio10").read_text() == "0\n"  # the state file other processes can watch


def test_button_released_when_cancelled(tmp_path: Path) -> None:
    async def main() -> None:
        mod = await make(GpioButton, pin=4, chip=str(tmp_path))
        task = asyncio.create_task(mod.run(LocalSession(), ["1h"]))
        await until(lambda: sim_level(4, str(tmp_path)) == 1, "the press")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert sim_level(4, str(tmp_path)) == 0

    asyncio.run(main())


@pytest.mark.parametrize(
    ("arg", "message"),
    [("soon", 'time: invalid duration "soon"'), ("5", 'time: missing unit in duration "5"'), ("-1s", "negative")],
)
def test_button_bad_duration(tmp_path: Path, arg: str, message: str) -> None:
    async def main() -> None:
        mod = await make(GpioButton, pin=5, chip=str(tmp_path))
        await mod.run(LocalSession(), [arg])

    with pytest.raises(ModuleError, match=message):
        asyncio.run(main())
    assert levels(5, tmp_path) == [0]  # never pressed


# ---------------------------------------------------------------- switch


def test_switch_on_off_toggle_texts(tmp_path: Path) -> None:
    chip = str(tmp_path)

    async def main() -> list[tuple[list[str], int | None]]:
        mod = await make(GpioSwitch, pin=11, chip=chip)
        steps = []
        for args in ([], ["on"], ["on"], ["toggle"], ["off"], ["toggle"], []):
            session = LocalSession()
            await mod.run(session, args)
            steps.append((session.prints, sim_level(11, chip)))
        with pytest.raises(ModuleError, match=r"^unknown argument: blink$"):
            await mod.run(LocalSession(), ["blink"])
        return steps

    assert asyncio.run(main()) == [
        (["Current state: off\n"], 0),
        (["Turned on"], 1),
        (["Already on"], 1),
        (["Turned off"], 0),
        (["Already off"], 0),
        (["Turned on"], 1),
        (["Current state: on\n"], 1),
    ]


def test_switch_verbs_are_case_sensitive(tmp_path: Path) -> None:
    async def main() -> None:
        mod = await make(GpioSwitch, pin=13, chip=str(tmp_path))
        with pytest.raises(ModuleError, match=r"^unknown argument: ON$"):
            await mod.run(LocalSession(), ["ON"])
        await mod.deinit()

    asyncio.run(main())
    assert levels(13, tmp_path) == [0, 0]  # init, deinit: never switched


def test_switch_initial_on_active_low(tmp_path: Path) -> None:
    async def main() -> list[str]:
        mod = await make(GpioSwitch, pin=12, initial="ON", activelow=True, chip=str(tmp_path))
        assert sim_level(12, str(tmp_path)) == 0  # on = low
        session = LocalSession()
        await mod.run(session, [])
        await mod.run(session, ["off"])
        assert sim_level(12, str(tmp_path)) == 1
        await mod.deinit()
        return session.prints

    assert asyncio.run(main()) == ["Current state: on\n", "Turned off"]
    assert sim_level(12, str(tmp_path)) == 0


def test_switch_initial_as_yaml_bool(tmp_path: Path) -> None:
    async def main() -> None:
        mod = await make(GpioSwitch, pin=2, initial=True, chip=str(tmp_path))  # `initial: on` unquoted
        assert mod.on
        assert sim_level(2, str(tmp_path)) == 1

    asyncio.run(main())


def test_switch_bad_initial(tmp_path: Path) -> None:
    with pytest.raises(ModuleError, match='invalid initial state "maybe"'):
        asyncio.run(make(GpioSwitch, pin=1, initial="maybe", chip=str(tmp_path)))


def test_one_owner_per_line(tmp_path: Path) -> None:
    async def main() -> None:
        first = await make(GpioSwitch, pin=6, chip=str(tmp_path))
        with pytest.raises(ModuleError, match=r"GPIO line 6 of .* is busy"):
            await make(GpioButton, pin=6, chip=str(tmp_path))
        await first.deinit()
        await (await make(GpioButton, pin=6, chip=str(tmp_path))).deinit()

    asyncio.run(main())


# ---------------------------------------------------------------- backends


def test_missing_chip_is_named() -> None:
    async def main() -> None:
        mod = GpioSwitch(decode_options(GpioSwitch, {"pin": 1, "chip": "/dev/gpiochip-zdut-missing"}))
        try:
            await mod.init()
        finally:
            await mod.deinit()  # safe after a failed init

    with pytest.raises(ModuleError) as err:
        asyncio.run(main())
    assert err.value.message.startswith("GPIO chip /dev/gpiochip-zdut-missing not found")
    assert "gpiodetect" in err.value.message


def test_chardev_rejects_a_non_gpio_file(tmp_path: Path) -> None:
    plain = tmp_path / "not-a-chip"
    plain.write_text("")
    with pytest.raises(ModuleError, match="is not a GPIO character device"):
        asyncio.run(make(GpioButton, pin=1, backend="chardev", chip=str(plain)))


def test_devmem_needs_gpiomem() -> None:
    if os.path.exists(gpio_devmem.GPIOMEM):
        pytest.skip("this host has /dev/gpiomem")
    with pytest.raises(ModuleError, match="not supported on this host: /dev/gpiomem does not exist"):
        asyncio.run(make(GpioButton, pin=17, backend="devmem"))


def test_unknown_backend_and_required_pin() -> None:
    with pytest.raises(ModuleError, match='unknown gpio backend "sysfs"'):
        asyncio.run(make(GpioButton, pin=1, backend="sysfs"))
    with pytest.raises(ValueError, match="pin"):
        decode_options(GpioButton, {"backend": "sim"})


def test_uapi_layout_matches_linux_gpio_h() -> None:
    # Sizes and ioctl numbers from include/uapi/linux/gpio.h (x86_64/arm64).
    assert ctypes.sizeof(gpio_chardev._LineRequest) == 592
    assert ctypes.sizeof(gpio_chardev._LineConfig) == 272
    assert gpio_chardev.GPIO_V2_GET_LINE_IOCTL == 0xC250B407
    assert gpio_chardev.GPIO_V2_LINE_SET_VALUES_IOCTL == 0xC010B40F
    assert gpio_chardev.GPIO_V2_LINE_GET_VALUES_IOCTL == 0xC010B40E
    assert gpio_chardev.GPIO_GET_CHIPINFO_IOCTL == 0x8044B401


def test_help_says_which_backend() -> None:
    sim = GpioButton(decode_options(GpioButton, {"pin": 9, "backend": "sim"})).help()
    assert "SIMULATED" in sim and "Default duration is 500ms." in sim
    real = GpioSwitch(decode_options(GpioSwitch, {"pin": 11})).help()
    assert real.startswith(
        "Simulate an on/off switch by changing the state of a GPIO pin\n\nARGUMENTS:\n\t[on|off|toggle]\n\n"
    )
    assert "The used GPIO pin is pin 11.\n" in real
    assert "chardev (Linux GPIO character device /dev/gpiochip0)" in real
    assert "'On' mean 'High'" in real
