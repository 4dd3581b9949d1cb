"""pdu and wifisocket modules against local HTTP stand-ins that keep outlet state.

The stand-ins (tests/standins/pdu_http.py, tests/standins/tasmota.py) follow the
vendors' documented endpoints; see their docstrings.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path

import pytest
import yaml
from standins.pdu_http import PDUServer
from standins.tasmota import TasmotaServer
from thirdparty import install_shelly, zdut_shelly

from zdut.devices import get, pdu_backends
from zdut.devices.base import ModuleError, decode_options
from zdut.devices.power import PDU, WifiSocket
from zdut.devices.testing import LocalSession

ROOT = Path(__file__).resolve().parent.parent


def run(coro):
    return asyncio.run(coro)


def pdu(**with_keys) -> PDU:
    mod = PDU(decode_options(PDU, with_keys))
    run(mod.init())
    return mod


def socket_module(**with_keys) -> WifiSocket:
    mod = WifiSocket(decode_options(WifiSocket, with_keys))
    run(mod.init())
    return mod


def say(mod, *args: str) -> str:
    session = LocalSession()
    run(mod.run(session, list(args)))
    return session.text


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_registry_maps_ids() -> None:
    assert get("pdu") is PDU
    assert get("wifisocket") is WifiSocket


# ------------------------------------------------------------------ PDU: Intellinet


def test_intellinet_on_off_toggle_status() -> None:
    with PDUServer("intellinet", outlets=8, user="admin", password="secret") as server:
        mod = pdu(host=server.url, user="admin", password="secret", outlet=3)
        assert say(mod, "status") == "PDU outlet 3 state: off\n"
        assert say(mod, "on") == "PDU outlet 3 powered on\n"
        assert server.states == [False, False, False, True, False, False, False, False]
        assert say(mod, "status") == "PDU outlet 3 state: on\n"
        assert say(mod, "toggle") == "PDU outlet 3 powered off\n"  # read back from status.xml
        assert server.states[3] is False
        assert say(mod, "ON") == "PDU outlet 3 powered on\n"  # case-insensitive
        assert say(mod, "off") == "PDU outlet 3 powered off\n"
        assert not any(server.states)
        assert server.requests[:3] == [
            "/status.xml",
            "/control_outlet.htm?outlet3=1&op=0",
            "/status.xml",
        ]
        assert "/control_outlet.htm?outlet3=1&op=2" in server.requests
        assert "/control_outlet.htm?outlet3=1&op=1" in server.requests


def test_intellinet_is_the_default_vendor_and_outlet_0() -> None:
    with PDUServer("intellinet", outlets=2) as server:
        mod = pdu(host=server.url + "/")
        assert say(mod, "on") == "PDU outlet 0 powered on\n"
        assert server.states == [True, False]


def test_intellinet_unknown_outlet() -> None:
    with PDUServer("intellinet", outlets=4) as server:
        mod = pdu(host=server.url, outlet=9)
        with pytest.raises(ModuleError, match="outlet 9 not found in PDU status"):
            run(mod.run(LocalSession(), ["status"]))


# ------------------------------------------------------------------ PDU: Gude


def test_gude_on_off_toggle_status() -> None:
    with PDUServer("gude", outlets=4, user="admin", password="pw") as server:
        mod = pdu(vendor="gude", host=server.url, user="admin", password="pw", outlet=1)
        assert say(mod, "status") == "PDU outlet 1 state: off\n"
        assert say(mod, "on") == "PDU outlet 1 powered on\n"
        assert server.states == [False, True, False, False]  # outlet 1 is Gude's port 2
        assert "/ov.html?cmd=1&p=2&s=1" in server.requests
        server.requests.clear()
        assert say(mod, "toggle") == "PDU outlet 1 powered off\n"
        assert server.requests == ["/statusjsn.js?components=1", "/ov.html?cmd=1&p=2&s=0"]  # read, then set
        assert say(mod, "toggle") == "PDU outlet 1 powered on\n"
        assert say(mod, "off") == "PDU outlet 1 powered off\n"
        assert say(mod, "status") == "PDU outlet 1 state: off\n"
        assert not any(server.states)


def test_gude_outlet_beyond_the_device() -> None:
    with PDUServer("gude", outlets=2) as server:
        mod = pdu(vendor="gude", host=server.url, outlet=5)
        with pytest.raises(ModuleError, match=r"outlet 5 not found in PDU status \(only 2 outlets available\)"):
            run(mod.run(LocalSession(), ["status"]))


# ------------------------------------------------------------------ PDU: errors


@pytest.mark.parametrize("vendor", ["intellinet", "gude"])
def test_pdu_wrong_credentials(vendor: str) -> None:
    with PDUServer(vendor, user="admin", password="secret") as server:
        for creds in ({"user": "admin", "password": "wrong"}, {}):
            mod = pdu(vendor=vendor, host=server.url, **creds)
            with pytest.raises(ModuleError, match=rf"PDU at {server.url} request failed with status 401"):
                run(mod.run(LocalSession(), ["on"]))
        assert not any(server.states)


def test_pdu_arguments_are_required_and_checked() -> None:
    with PDUServer("intellinet") as server:
        mod = pdu(host=server.url)
        with pytest.raises(ModuleError, match="no command specified, available commands: on, off, toggle, status"):
            run(mod.run(LocalSession(), []))
        with pytest.raises(ModuleError, match="unknown command 'reboot', available commands"):
            run(mod.run(LocalSession(), ["reboot"]))
        assert server.requests == []


def test_pdu_unreachable_names_the_host() -> None:
    port = closed_port()
    mod = pdu(host=f"http://127.0.0.1:{port}")
    with pytest.raises(ModuleError, match=rf"cannot reach PDU at http://127.0.0.1:{port}: .*refused"):
        run(mod.run(LocalSession(), ["status"]))


def test_pdu_answer_that_is_not_http() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]

        def answer_garbage() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")

        thread = threading.Thread(target=answer_garbage, daemon=True)
        thread.start()
        mod = pdu(host=f"http://127.0.0.1:{port}")
        with pytest.raises(ModuleError, match=rf"bad answer from PDU at http://127.0.0.1:{port}"):
            run(mod.run(LocalSession(), ["status"]))
        thread.join(5)


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({}, "PDU host address not configured"),
        ({"host": "192.168.1.5"}, "must be an absolute URL including scheme"),
        ({"host": "ftp://pdu"}, "must be an absolute URL including scheme"),
        ({"host": "http://pdu", "outlet": -1}, "outlet must be 0 or greater"),
        ({"host": "http://pdu", "user": "admin"}, "both user and password to be set, or neither"),
        ({"host": "http://pdu", "password": "x"}, "both user and password to be set, or neither"),
        ({"host": "http://pdu", "vendor": "apc"}, r"^unknown PDU vendor 'apc' \(known vendors: gude, intellinet\)$"),
    ],
)
def test_pdu_init_rejects_bad_options(options: dict, error: str) -> None:
    with pytest.raises(ModuleError, match=error):
        run(PDU(decode_options(PDU, options)).init())


def test_pdu_run_before_init() -> None:
    with pytest.raises(ModuleError, match="not initialized"):
        run(PDU(decode_options(PDU, {"host": "http://pdu"})).run(LocalSession(), ["on"]))


# ------------------------------------------------------------------ PDU: vendor backends


@pytest.fixture
def forget_vendors():
    """Vendors a test registers; dropped from the registry afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        pdu_backends._BACKENDS.loaded.pop(name, None)


def drive_shelly(vendor: str) -> None:
    """The real pdu module over a third-party backend that has no toggle of its own."""
    with PDUServer("shelly", outlets=2, user="admin", password="pw") as server:
        mod = pdu(vendor=vendor, host=server.url, user="admin", password="pw", outlet=1)
        assert say(mod, "status") == "PDU outlet 1 state: off\n"
        assert say(mod, "on") == "PDU outlet 1 powered on\n"
        assert server.states == [False, True]
        server.requests.clear()
        assert say(mod, "toggle") == "PDU outlet 1 powered off\n"
        assert server.requests == ["/relay/1", "/relay/1?turn=off"]  # read, then set the opposite
        assert say(mod, "Toggle") == "PDU outlet 1 powered on\n"
        assert server.states == [False, True]
        assert "shelly" in mod.help()


def test_third_party_backend_registered_at_run_time(forget_vendors: list[str]) -> None:
    with pytest.raises(ModuleError, match=r"unknown PDU vendor 'shelly'"):
        PDU(decode_options(PDU, {"vendor": "shelly"}))
    pdu_backends.register("shelly", zdut_shelly)
    forget_vendors.append("shelly")
    assert pdu_backends.vendors() == ["gude", "intellinet", "shelly"]
    drive_shelly("Shelly")  # vendor names are case-insensitive
    with pytest.raises(ValueError, match="PDU vendor 'shelly' is already registered"):
        pdu_backends.register("shelly", zdut_shelly)


def test_third_party_backend_through_an_entry_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, forget_vendors: list[str]
) -> None:
    monkeypatch.syspath_prepend(str(install_shelly(tmp_path / "site")))
    monkeypatch.setattr(pdu_backends._BACKENDS, "_external", None)  # read the entry points again
    forget_vendors.append("shelly")
    drive_shelly("shelly")


class _SlowOutlet:
    """A backend without a toggle of its own whose reads take a while: one outlet, state in memory."""

    def __init__(self) -> None:
        self.on = False

    def get_outlet(self, host: object, outlet: int) -> bool:
        state = self.on
        threading.Event().wait(0.05)  # the answer is on its way while the other run reads too
        return state

    def set_outlet(self, host: object, outlet: int, on: bool) -> None:
        self.on = on


def test_two_toggles_at_once_toggle_twice(forget_vendors: list[str]) -> None:
    """Runs of one instance overlap: a toggle (read, then set the opposite) must not interleave with another,
    or both read "off", both switch on, and the outlet ends on instead of back off."""
    backend = _SlowOutlet()
    pdu_backends.register("slowfake", backend)
    forget_vendors.append("slowfake")
    mod = pdu(vendor="slowfake", host="http://pdu", outlet=0)

    async def both() -> None:
        await asyncio.gather(mod.run(LocalSession(), ["toggle"]), mod.run(LocalSession(), ["toggle"]))

    run(both())
    assert backend.on is False


def test_backend_must_have_set_and_get() -> None:
    with pytest.raises(TypeError, match="is not a PDU backend: it lacks set_outlet and get_outlet"):
        pdu_backends.register("empty", object())
    assert "empty" not in pdu_backends.vendors()


def test_backend_that_cannot_be_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(pdu_backends._BUILTIN, "ghost", "zdut.devices.pdu_backends.ghost_not_written")
    with pytest.raises(ModuleError, match=r"^PDU vendor 'ghost' cannot be loaded: No module named"):
        PDU(decode_options(PDU, {"vendor": "ghost", "host": "http://pdu"}))


def test_toggle_whose_state_cannot_be_read() -> None:
    with PDUServer("intellinet", outlets=2) as server:  # toggles by itself, then reads the result back
        server.broken.add("/status.xml")
        mod = pdu(host=server.url, outlet=1)
        message = rf"^toggled outlet 1 but could not read back the resulting state: PDU at {server.url} .* 500"
        with pytest.raises(ModuleError, match=message):
            run(mod.run(LocalSession(), ["toggle"]))
        assert server.states == [False, True]
    with PDUServer("gude", outlets=2) as server:  # reads first, so nothing is switched
        server.broken.add("/statusjsn.js")
        mod = pdu(vendor="gude", host=server.url, outlet=1)
        with pytest.raises(ModuleError, match=rf"^could not read outlet 1 state to toggle it: PDU at {server.url}"):
            run(mod.run(LocalSession(), ["toggle"]))
        assert server.requests == ["/statusjsn.js?components=1"]
        assert server.states == [False, False]


# ------------------------------------------------------------------ wifisocket (Tasmota)


def test_wifisocket_single_relay_with_tasmota_password() -> None:
    with TasmotaServer(relays=1, user="admin", password="joker") as server:
        mod = socket_module(host=server.url, user="admin", password="joker")
        assert say(mod, "status") == "WiFi socket channel 1 state: off\n"
        assert say(mod, "on") == "WiFi socket channel 1 set to 'on'\n"
        assert server.states == [True]
        assert say(mod, "Toggle") == "WiFi socket channel 1 set to 'off'\n"
        assert say(mod, "toggle") == "WiFi socket channel 1 set to 'on'\n"
        assert say(mod, "off") == "WiFi socket channel 1 set to 'off'\n"
        assert server.commands == ["Power", "Power ON", "Power TOGGLE", "Power TOGGLE", "Power OFF"]
        assert server.paths[1] == "/cm?user=admin&password=joker&cmnd=Power%20ON"
        assert server.states == [False]


def test_wifisocket_channels_of_a_multi_relay_device() -> None:
    with TasmotaServer(relays=3) as server:
        second = socket_module(host=server.url, channel=2)
        assert say(second, "on") == "WiFi socket channel 2 set to 'on'\n"
        assert say(second, "status") == "WiFi socket channel 2 state: on\n"
        first = socket_module(host=server.url)  # channel 1: "Power", answered as POWER1
        assert say(first, "status") == "WiFi socket channel 1 state: off\n"
        assert server.states == [False, True, False]
        assert server.commands == ["Power2 ON", "Power2", "Power"]


def test_wifisocket_bare_address_and_url_encoding() -> None:
    with TasmotaServer() as server:
        mod = socket_module(host=server.address)  # "127.0.0.1:PORT" gets http://
        assert say(mod, "on") == "WiFi socket channel 1 set to 'on'\n"
        assert server.states == [True]
        assert server.paths == ["/cm?cmnd=Power%20ON"]


def test_wifisocket_wrong_password_is_an_error() -> None:
    """Tasmota answers HTTP 200 with a WARNING; dutctl would have printed "set to 'on'"."""
    with TasmotaServer(user="admin", password="joker") as server:
        mod = socket_module(host=server.url, user="admin", password="wrong")
        for arg in ("on", "status"):
            with pytest.raises(ModuleError, match="WiFi socket refused the command: Need user="):
                run(mod.run(LocalSession(), [arg]))
        assert server.states == [False]


def test_wifisocket_basic_auth_behind_a_proxy() -> None:
    with TasmotaServer(user="admin", password="joker", auth="basic") as server:
        assert say(socket_module(host=server.url, user="admin", password="joker"), "on").endswith("'on'\n")
        wrong = socket_module(host=server.url, user="admin", password="nope")
        with pytest.raises(ModuleError, match=rf"WiFi socket at {server.url} request failed with status 401"):
            run(wrong.run(LocalSession(), ["off"]))
        assert server.states == [True]


def test_wifisocket_no_or_unknown_argument_prints_and_succeeds() -> None:
    with TasmotaServer() as server:
        mod = socket_module(host=server.url)
        assert say(mod) == "No command specified. Call 'help' for usage.\n"
        assert say(mod, "blink") == "Unknown command: blink\nAvailable commands: on, off, toggle, status\n"
        assert server.commands == []


def test_wifisocket_unreachable_names_the_host() -> None:
    port = closed_port()
    mod = socket_module(host=f"127.0.0.1:{port}")
    with pytest.raises(ModuleError, match=rf"cannot reach WiFi socket at http://127.0.0.1:{port}"):
        run(mod.run(LocalSession(), ["on"]))


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({}, "host must be configured"),
        ({"host": "  "}, "host must be configured"),
        ({"host": "10.0.0.5", "user": "admin"}, "both user and password"),
    ],
)
def test_wifisocket_init_rejects_bad_options(options: dict, error: str) -> None:
    with pytest.raises(ModuleError, match=error):
        run(WifiSocket(decode_options(WifiSocket, options)).init())


def test_help_documents_arguments_and_keys() -> None:
    text = PDU(decode_options(PDU, {"host": "http://10.0.0.5", "outlet": 2})).help()
    for word in ("on|off|toggle|status", "vendor", "host", "user", "password", "outlet", "gude"):
        assert word in text
    text = WifiSocket(decode_options(WifiSocket, {"host": "10.0.0.6"})).help()
    for word in ("on|off|toggle|status", "host", "user", "password", "channel"):
        assert word in text


def test_usage_blocks_share_one_shape() -> None:
    pdu_help = PDU(decode_options(PDU, {"host": "http://10.0.0.5", "outlet": 2})).help()
    assert pdu_help.startswith(
        "PDU module: control of a Power Distribution Unit (PDU) via HTTP.\n"
        "Arguments: on|off|toggle|status (one is required)\n"
        "  on      - Power on the outlet\n"
        "  off     - Power off the outlet\n"
        "  toggle  - Toggle the outlet power\n"
        "  status  - Report the current power state\n"
        "with: vendor (intellinet (default) | gude), host"
    )
    assert pdu_help.endswith("Controls outlet 2 of the PDU at http://10.0.0.5 via the intellinet API.\n")
    assert WifiSocket(decode_options(WifiSocket, {"host": "10.0.0.6"})).help().startswith(
        "WiFi Socket (Tasmota) module.\n"
        "Arguments: on|off|toggle|status\n"
        "  on      - Power on the socket\n"
        "  off     - Power off the socket\n"
        "  toggle  - Toggle the socket\n"
        "  status  - Query the current state\n"
        "with: host"
    )


def test_wifisocket_reports_the_asked_state_when_the_answer_has_none() -> None:
    with TasmotaServer(relays=1) as server:
        mod = socket_module(host=server.url, channel=5)  # a relay the device lacks: {"Command":"Unknown"}
        assert say(mod, "on") == "WiFi socket channel 5 set to 'on'\n"  # dutctl falls back to the request
        assert say(mod, "toggle") == "WiFi socket channel 5 set to 'toggle'\n"
        with pytest.raises(ModuleError, match=r"^unexpected device response: \{\"Command\": \"Unknown\"\}"):
            run(mod.run(LocalSession(), ["status"]))
        assert server.states == [False]


@pytest.mark.parametrize(("name", "cls"), [("pdu.yaml", PDU), ("wifisocket.yaml", WifiSocket)])
def test_example_configs_decode_and_init(name: str, cls: type) -> None:
    config = yaml.safe_load((ROOT / "conf" / name).read_text())
    steps = [s for d in config["devices"].values() for c in d["cmds"].values() for s in c["uses"]]
    assert steps and all(s["module"] == cls.id for s in steps)
    for step in steps:
        run(cls(decode_options(cls, step["with"])).init())  # init makes no network call
