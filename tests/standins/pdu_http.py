"""A PDU stand-in: Intellinet, Gude or Shelly (Gen1) HTTP endpoints with outlet state and Basic auth.

Follows the vendors' documented pages: Intellinet ``control_outlet.htm?outletN=1&op=0|1|2``
(0 = on, 1 = off, 2 = toggle) and ``status.xml`` with ``<outletStatN>on|off</outletStatN>``;
Gude ``ov.html?cmd=1&p=<port, 1-based>&s=0|1`` and ``statusjsn.js?components=1`` whose
``outputs[i].state`` is 0 or 1; Shelly Gen1 ``relay/<N>?turn=on|off|toggle`` and ``relay/<N>``,
both answering ``{"ison": true|false, ...}`` (no built-in backend: the third-party backend tests use it).
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit

from standins.http_thread import ThreadedHTTP


class PDUServer(ThreadedHTTP):
    """Serve one PDU on 127.0.0.1 (random port) in a thread; use as a context manager."""

    def __init__(self, vendor: str = "intellinet", outlets: int = 8, user: str = "", password: str = "") -> None:
        self.vendor = vendor
        self.states = [False] * outlets
        self.user, self.password = user, password
        self.requests: list[str] = []  # path?query of every authorised request, in order
        self.broken: set[str] = set()  # paths answered with 500, as a PDU whose web server fails
        self.lock = threading.Lock()
        super().__init__(self._handler())

    # ------------------------------------------------------------ vendor logic
    def intellinet(self, path: str, query: dict[str, list[str]]) -> tuple[int, str, str]:
        if path == "/control_outlet.htm":
            op = query.get("op", [""])[0]
            targets = [
                int(k[6:]) for k, v in query.items() if k.startswith("outlet") and k[6:].isdigit() and v == ["1"]
            ]
            if op not in ("0", "1", "2") or not targets or any(t >= len(self.states) for t in targets):
                return 400, "text/plain", "bad request"
            for t in targets:
                self.states[t] = {"0": True, "1": False, "2": not self.states[t]}[op]
            return 200, "text/html", "<html><body>outlet control</body></html>"
        if path == "/status.xml":
            stats = "".join(f"<outletStat{i}>{'on' if s else 'off'}</outletStat{i}>" for i, s in enumerate(self.states))
            xml = f'<?xml version="1.0" encoding="UTF-8"?><response><curBan>0.0</curBan>{stats}</response>'
            return 200, "text/xml", xml
        return 404, "text/plain", "not found"

    def gude(self, path: str, query: dict[str, list[str]]) -> tuple[int, str, str]:
        if path == "/ov.html":
            cmd, port, state = (query.get(k, [""])[0] for k in ("cmd", "p", "s"))
            if cmd != "1" or not port.isdigit() or not 1 <= int(port) <= len(self.states) or state not in ("0", "1"):
                return 400, "text/plain", "bad request"
            self.states[int(port) - 1] = state == "1"
            return 200, "text/html", "<html><body>ok</body></html>"
        if path == "/statusjsn.js":
            components = int(query.get("components", ["0"])[0] or 0)
            body: dict[str, object] = {}
            if components & 1:
                body["outputs"] = [
                    {"name": f"Power Port {i + 1}", "state": int(s), "sw_cnt": 0, "type": 1, "batch": [0, 0, 0, 0, 0]}
                    for i, s in enumerate(self.states)
                ]
            return 200, "application/json", json.dumps(body)
        return 404, "text/plain", "not found"

    def shelly(self, path: str, query: dict[str, list[str]]) -> tuple[int, str, str]:
        index = path.removeprefix("/relay/")
        if not path.startswith("/relay/") or not index.isdigit() or int(index) >= len(self.states):
            return 404, "text/plain", "Not Found"
        n, turn = int(index), query.get("turn", [""])[0]
        if turn not in ("", "on", "off", "toggle"):
            return 400, "text/plain", "Bad turn!"
        if turn:
            self.states[n] = {"on": True, "off": False, "toggle": not self.states[n]}[turn]
        body = {"ison": self.states[n], "has_timer": False, "timer_duration": 0, "overpower": False, "source": "http"}
        return 200, "application/json", json.dumps(body)

    def _authorised(self, header: str | None) -> bool:
        if not self.user:
            return True
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        return header == f"Basic {token}"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        pdu = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if not pdu._authorised(self.headers.get("Authorization")):
                    self._reply(401, "text/plain", "401 Unauthorized", {"WWW-Authenticate": 'Basic realm="PDU"'})
                    return
                parts = urlsplit(self.path)
                with pdu.lock:
                    pdu.requests.append(self.path)
                    if parts.path in pdu.broken:
                        self._reply(500, "text/plain", "Internal Server Error")
                        return
                    serve = {"gude": pdu.gude, "shelly": pdu.shelly}.get(pdu.vendor, pdu.intellinet)
                    status, ctype, body = serve(parts.path, parse_qs(parts.query))
                self._reply(status, ctype, body)

            def _reply(self, status: int, ctype: str, body: str, headers: dict[str, str] | None = None) -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:  # keep test output clean
                pass

        return Handler
