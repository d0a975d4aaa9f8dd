"""A small HTTP/1.1 server on the peer's own trio event loop: GET only, one request a connection.

Every byte it reads comes from whoever can reach the port, so every resource is bounded: the
request line and the head in bytes, each connection in time (a client that sends nothing is
dropped after `timeout_s`), and the open connections in count. A client that breaks a bound
gets an error status, or nothing, and is closed; nothing it does reaches the peer's nursery.

Why not a library: the ASGI servers (hypercorn) bring their own lifecycle and a dozen
dependencies for four GET routes, and `http.server` needs a thread per client, which the
style guide keeps for training. Without keep-alive, a request is read, answered and closed.
"""

from __future__ import annotations

import ipaddress
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import trio

logger = logging.getLogger(__name__)

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            414: "URI Too Long", 431: "Request Header Fields Too Large", 500: "Internal Server "
            "Error", 503: "Service Unavailable"}
# Only this origin's inline script and style: the dashboard loads nothing from elsewhere.
_SECURITY = (("Content-Security-Policy", "default-src 'self'; script-src 'unsafe-inline'; "
              "style-src 'unsafe-inline'; img-src 'self' data:"),
             ("X-Content-Type-Options", "nosniff"), ("Cache-Control", "no-store"))
_HTTP_HELP = ("give PORT (on 127.0.0.1), HOST:PORT or [IPv6]:PORT with HOST an IP address or "
              "localhost, e.g. --http 8080 or --http 127.0.0.1:0")


def http_listen(value: Any) -> str:
    """Check an `--http` value and return it as HOST:PORT ("8080" -> "127.0.0.1:8080").

    A bare port listens on loopback only; another host is taken only when spelled out. An
    empty value is "" (off), as the default is.

    Raises:
        ValueError: one line that says what to give instead.
    """
    if not str(value).strip():
        return ""
    host, port = split_listen(str(value))
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_listen(text: str) -> tuple[str, int]:
    """HOST and PORT of an `--http` value; see `http_listen`."""
    text = text.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host = "127.0.0.1"
    elif host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host == "localhost":
        host = "127.0.0.1"
    try:
        port = int(port_text)
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r} is not an address to listen on; {_HTTP_HELP}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 0..65535 (0: any free port)")
    return host, port


def is_loopback(host: str) -> bool:
    return ipaddress.ip_address(host).is_loopback


@dataclass(frozen=True)
class HttpLimits:
    """What one client may cost the peer."""

    max_line_bytes: int = 2048  # the request line: method, path and query
    max_head_bytes: int = 8192  # the request line and every header
    timeout_s: float = 10.0  # one connection, from accept to the last byte of the reply
    max_connections: int = 32


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


def text(status: int, message: str) -> Response:
    return Response(status, (message + "\n").encode())


# A route takes the query string (after "?", maybe empty) and answers.
Route = Callable[[str], Awaitable[Response]]


class _BadRequest(Exception):
    """The client's request breaks a bound or HTTP/1.x; it gets `response` and is closed."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


@dataclass
class HttpStatistics:
    """Connections open now, replies by status, and clients dropped without one, by reason."""

    open: int = 0
    replies: Counter[int] = field(default_factory=Counter)
    dropped: Counter[str] = field(default_factory=Counter)


class HttpServer:
    """Serves `routes` (path -> route) to bounded GET requests."""

    def __init__(self, routes: Mapping[str, Route], limits: HttpLimits | None = None) -> None:
        self.routes = dict(routes)
        self.limits = limits or HttpLimits()
        self._stats = HttpStatistics()

    def statistics(self) -> HttpStatistics:
        return self._stats

    async def serve(self, host: str, port: int, *,
                    task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on host:port (0: a free one) and serve until cancelled.

        `task_status.started` gets the URL it listens on, "http://HOST:PORT/".
        """
        listeners = await trio.open_tcp_listeners(port, host=host)
        sockname = listeners[0].socket.getsockname()
        shown = f"[{host}]" if ":" in host else host
        task_status.started(f"http://{shown}:{sockname[1]}/")
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        """One client: never raises, so that no client can stop the server's nursery."""
        stats = self._stats
        if stats.open >= self.limits.max_connections:
            stats.dropped["busy"] += 1
            # Briefly: a flood of these must not pile up tasks that wait on slow clients.
            with trio.move_on_after(0.5), suppress(trio.BrokenResourceError, OSError):
                await self._reply(stream, text(503, "too many connections; retry shortly"))
                await _drain(stream, max_bytes=4096, seconds=0.5)
            await trio.aclose_forcefully(stream)
            return
        stats.open += 1
        try:
            with trio.move_on_after(self.limits.timeout_s) as scope:
                await self._exchange(stream)
            if scope.cancelled_caught:
                stats.dropped["timeout"] += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            stats.dropped["broken"] += 1
        finally:
            stats.open -= 1
            await trio.aclose_forcefully(stream)

    async def _exchange(self, stream: trio.SocketStream) -> None:
        try:
            head = await self._read_head(stream)
            if head is None:
                self._stats.dropped["closed"] += 1
                return
            response = await self._answer(head)
        except _BadRequest as bad:
            await self._reply(stream, bad.response)
            await _drain(stream)
            return
        await self._reply(stream, response)

    async def _read_head(self, stream: trio.SocketStream) -> bytes | None:
        """The request line and headers, or None when the client closed before sending them."""
        limits, data = self.limits, bytearray()
        while b"\r\n\r\n" not in data and b"\n\n" not in data:
            if b"\n" not in data and len(data) > limits.max_line_bytes:
                raise _BadRequest(text(414, "request line too long"))
            if len(data) > limits.max_head_bytes:
                raise _BadRequest(text(431, "request head too long"))
            chunk = await stream.receive_some(4096)
            if not chunk:
                return None
            data += chunk
        line = bytes(data.split(b"\n", 1)[0])
        if len(line) > limits.max_line_bytes:
            raise _BadRequest(text(414, "request line too long"))
        return line

    async def _answer(self, line: bytes) -> Response:
        parts = line.strip().split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1.") or not parts[1].startswith(b"/"):
            return text(400, "expected: GET /path HTTP/1.1")
        method, target = parts[0], parts[1].decode("ascii", "replace")
        path, _, query = target.partition("?")
        route = self.routes.get(path)
        if route is None:
            return text(404, f"no such page; try {', '.join(sorted(self.routes))}")
        if method != b"GET":
            return Response(405, b"only GET\n", headers=(("Allow", "GET"),))
        try:
            return await route(query)
        except Exception:
            # A bug in a page must not stop the peer that it only describes.
            logger.exception("http: %s failed", path)
            return text(500, "internal error; see the peer's log")

    async def _reply(self, stream: trio.SocketStream, response: Response) -> None:
        self._stats.replies[response.status] += 1
        headers = [("Content-Type", response.content_type),
                   ("Content-Length", str(len(response.body))), ("Connection", "close"),
                   *_SECURITY, *response.headers]
        head = f"HTTP/1.1 {response.status} {_REASONS.get(response.status, '')}\r\n"
        head += "".join(f"{name}: {value}\r\n" for name, value in headers) + "\r\n"
        await stream.send_all(head.encode("latin-1") + response.body)


async def _drain(stream: trio.SocketStream, *, max_bytes: int = 65536,
                 seconds: float = 1.0) -> None:
    """Read a little of what a refused client still sends before closing on it.

    Closed with unread bytes, the socket sends a reset, and the client may lose the reply that
    says what was wrong before it reads it.
    """
    await stream.send_eof()
    with trio.move_on_after(seconds):
        while max_bytes > 0 and (chunk := await stream.receive_some(4096)):
            max_bytes -= len(chunk)
