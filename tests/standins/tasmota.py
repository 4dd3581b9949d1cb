"""A Tasmota stand-in: ``/cm?cmnd=Power[N] [ON|OFF|TOGGLE]`` with relay state.

Answers like the firmware: a one-relay device reports ``{"POWER":"ON"}``, a
multi-relay device ``{"POWER<n>":"ON"}``; unknown commands give
``{"Command":"Unknown"}``.  Authentication has two modes:

* ``auth="query"`` (Tasmota's own WebPassword): the ``user``/``password`` query
  arguments must match, otherwise HTTP 200 with
  ``{"WARNING":"Need user=<username>&password=<password>"}``;
* ``auth="basic"`` (an authenticating reverse proxy in front, as dutctl assumes):
  HTTP Basic, otherwise 401.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit

from standins.http_thread import ThreadedHTTP

_POWER = re.compile(r"power(\d*)$", re.I)


class TasmotaServer(ThreadedHTTP):
    def __init__(self, relays: int = 1, user: str = "", password: str = "", auth: str = "query") -> None:
        self.states = [False] * relays
        self.user, self.password, self.auth = user, password, auth
        self.commands: list[str] = []  # every accepted cmnd value, decoded
        self.paths: list[str] = []  # every request line's path, as sent
        self.lock = threading.Lock()
        super().__init__(self._handler())

    def execute(self, cmnd: str) -> dict[str, str]:
        name, _, param = cmnd.strip().partition(" ")
        match = _POWER.match(name)
        if match is None:
            return {"Command": "Unknown"}
        index = int(match.group(1) or 1)
        if not 1 <= index <= len(self.states):
            return {"Command": "Unknown"}
        param = param.strip().upper()
        current = self.states[index - 1]
        new = {"": current, "ON": True, "1": True, "OFF": False, "0": False, "TOGGLE": not current, "2": not current}
        if param not in new:
            return {"Command": "Error"}
        self.states[index - 1] = new[param]
        key = "POWER" if len(self.states) == 1 else f"POWER{index}"
        return {key: "ON" if self.states[index - 1] else "OFF"}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        sock = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with sock.lock:
                    sock.paths.append(self.path)
                parts = urlsplit(self.path)
                if parts.path != "/cm":
                    self._reply(404, "text/plain", "404: File Not Found")
                    return
                query = parse_qs(parts.query, keep_blank_values=True)
                if sock.user and sock.auth == "basic":
                    token = base64.b64encode(f"{sock.user}:{sock.password}".encode()).decode()
                    if self.headers.get("Authorization") != f"Basic {token}":
                        self._reply(401, "text/plain", "401 Unauthorized")
                        return
                if sock.user and sock.auth == "query":
                    given = (query.get("user", [""])[0], query.get("password", [""])[0])
                    if given != (sock.user, sock.password):
                        warning = {"WARNING": "Need user=<username>&password=<password>"}
                        self._reply(200, "application/json", json.dumps(warning))
                        return
                cmnd = query.get("cmnd", [""])[0]
                if not cmnd:
                    self._reply(200, "application/json", json.dumps({"WARNING": "Enter command cmnd="}))
                    return
                with sock.lock:
                    sock.commands.append(cmnd)
                    answer = sock.execute(cmnd)
                self._reply(200, "application/json", json.dumps(answer))

            def _reply(self, status: int, ctype: str, body: str) -> None:
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:  # keep test output clean
                pass

        return Handler
