"""The synchronous Python API against a real agent."""

from __future__ import annotations

import time

import pytest

from conftest import CONF, Lab
from zdut.api import Lab as Api
from zdut.api import ZdutError
from zdut.protocol import Code


def test_api_calls_and_runs(lab: Lab) -> None:
    _, addr = lab.agent(CONF / "demo.yaml")
    with Api(addr, user="ci@rack") as api:
        assert [d.name for d in api.devices()] == ["device1", "device2", "device3"]
        assert [d.name for d in api.devices("device[2-9]")] == ["device2", "device3"]
        assert api.commands("device2") == ["repeat", "status"]
        assert api.help("device1", "status").startswith("Report status\n\nThis dummy module prints")
        result = api.run("device1", "status", "a", "b")
        assert result.ok and result.text.endswith("Arg 0: a\nArg 1: b\n")
        echo = api.run("device2", "repeat", stdin=b"one\ntwo words\n")
        assert echo.stdout.endswith(b"one\n") and b"Oh no!" in echo.stderr
        failed = api.run("device2", "repeat", stdin=b"one\n", check=False)
        assert not failed.ok and failed.error is not None and "EOF" in failed.error.message
        lock = api.lock("device1", "5m")
        assert lock.owner == "ci@rack" and lock.expires_at > time.time() + 240
        api.unlock("device1")
        with pytest.raises(ZdutError) as info:
            api.run("nodev", "status")
        assert info.value.code == Code.NOT_FOUND
