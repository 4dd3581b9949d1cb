"""Plain HTTP GETs for network power switches (PDUs, WiFi sockets), with the standard library.

Proxies from the environment are ignored on purpose: these devices sit on the lab
network and an inherited http_proxy would only break them.  Every failure becomes a
ModuleError naming the device (``what``).
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import urllib.error
import urllib.parse
import urllib.request

from zdut.devices.base import ModuleError

HTTP_TIMEOUT_S = 10.0
MAX_BODY = 1024 * 1024  # status pages are a few KiB; never buffer a runaway response
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class HTTPStatusError(ModuleError):
    """The device answered with a non-200 status."""


def basic_auth(user: str, password: str) -> dict[str, str]:
    if not (user and password):
        return {}
    token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
    return {"Authorization": f"Basic {token}"}


def get(url: str, headers: dict[str, str], what: str, timeout: float = HTTP_TIMEOUT_S) -> bytes:
    """GET url and return the body of a 200 answer; ModuleError naming ``what`` otherwise.  Blocks."""
    request = urllib.request.Request(url, headers=headers, method="GET")
    try:
        with _OPENER.open(request, timeout=timeout) as resp:
            return bytes(resp.read(MAX_BODY))
    except urllib.error.HTTPError as exc:
        body = exc.read(512).decode(errors="replace").strip()
        raise HTTPStatusError(f"{what} request failed with status {exc.code} {exc.reason}: {body}") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError):
            raise ModuleError(f"{what} did not answer within {timeout:g}s") from None
        raise ModuleError(f"cannot reach {what}: {exc.reason}") from None
    except TimeoutError:
        raise ModuleError(f"{what} did not answer within {timeout:g}s") from None
    except OSError as exc:
        raise ModuleError(f"cannot reach {what}: {exc}") from None
    except http.client.HTTPException as exc:  # not HTTP at all, or a connection cut mid-answer
        raise ModuleError(f"bad answer from {what}: {exc!r}") from None


async def http_get(url: str, headers: dict[str, str], what: str, timeout: float = HTTP_TIMEOUT_S) -> bytes:
    """``get`` in a thread, so the event loop keeps serving other sessions."""
    return await asyncio.to_thread(get, url, headers, what, timeout)


def join_url(base: str, path: str, query: str = "") -> str:
    """base URL + one path segment (keeping any path prefix of base) + query."""
    url = base.rstrip("/") + "/" + path
    return f"{url}?{query}" if query else url


def absolute_url(host: str, what: str) -> str:
    parts = urllib.parse.urlsplit(host)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ModuleError(
            f"invalid {what} host {host!r}: must be an absolute URL including scheme (e.g. http://10.0.0.5)"
        )
    return host
