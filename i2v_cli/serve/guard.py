"""What every request passes before the application: the Host check, the bearer token, the body size limit and
the time limit on receiving the body. A plain ASGI middleware, so it holds for every route, the page included.

- **Token**: with a token, every route but ``/healthz``, ``/login`` and ``/static/`` needs
  ``Authorization: Bearer TOKEN`` (or the cookie that ``POST /login`` sets for the page); compared in constant time.
- **Host**: without a token the server is loopback-only, and a request whose ``Host`` is not a loopback name is
  refused (421), so a web page cannot reach it by DNS rebinding.
- **Origin**: a request other than GET or HEAD that a browser sends from another origin (its ``Origin``, else its
  ``Sec-Fetch-Site``, says so) is refused (403) before anything else, unless ``--allow-origin`` names it: a page
  elsewhere cannot make the browser post wrong tokens to ``/login`` (locking the real clients out) or images to
  the API. Scripts and curl send neither header and are not concerned. Every answer carries
  ``Cross-Origin-Resource-Policy: same-origin``, so other origins cannot embed the index's images either.
- **Body**: larger than the limit is 413 (from Content-Length before reading, or counted while reading); a body
  that does not arrive within the request timeout is 408. The body is read whole here, then handed on; a
  multipart/form-data body without its closing boundary (cut short) is 400.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection, MutableMapping
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import urlsplit

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

COOKIE = "i2v_token"
#: Sent with an answer given before the body was read: the connection ends with it (the rest of the body is not
#: read; a client waiting for the end of the connection waited until its own timeout).
_CLOSE = [(b"connection", b"close")]
#: Routes that never need the token: the health check, the login form of the page, the page's script and style.
OPEN_PATHS = ("/healthz", "/login")
OPEN_PREFIXES = ("/static/",)
LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, IPv6 with or without brackets) is this machine's loopback."""
    host = host.strip("[]")
    if host.casefold() in LOOPBACK_NAMES or host.casefold().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def token_ok(expected: str | None, authorization: str | None, cookie: str | None = None) -> bool:
    """Whether a request may pass: no token is set, or ``Authorization: Bearer <token>`` (or the page's cookie)
    holds it. Constant-time comparison."""
    if not expected:
        return True
    want = expected.encode("utf-8")
    given: list[str] = []
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.casefold() == "bearer":
            given.append(value.strip())
    if cookie:
        given.append(cookie)
    return any(hmac.compare_digest(g.encode("utf-8", "surrogateescape"), want) for g in given)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _cookie(scope: Scope) -> str | None:
    raw = _header(scope, b"cookie")
    if not raw:
        return None
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(raw)
    except CookieError:
        return None
    morsel = jar.get(COOKIE)
    return morsel.value if morsel is not None else None


async def send_error(send: Send, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """A JSON error body ``{"error": message}`` with ``status``."""
    body = json.dumps({"error": message}, ensure_ascii=False).encode("utf-8")
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class Throttle:
    """Wrong tokens counted per client address: after ``limit`` of them within ``window`` seconds, that address's
    attempts (a token sent, or ``/login``) are 429 until the oldest counted one is ``window`` old. Guessing a token
    then costs a minute per ``limit`` guesses. Behind a proxy every client has the proxy's address, so they share
    one budget: a guesser slows them all down, never gets in faster."""

    def __init__(self, limit: int = 20, window: float = 60.0, clock: Callable[[], float] | None = None) -> None:
        self.limit, self.window = limit, window
        self.clock = clock or time.monotonic
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, address: str) -> deque[float] | None:
        now = self.clock()
        times = self._failures.get(address)
        while times and now - times[0] >= self.window:
            times.popleft()
        if times is not None and not times:
            del self._failures[address]
            return None
        return times

    def wait(self, address: str) -> float:
        """Seconds until ``address`` may try again (0 when it may now)."""
        times = self._recent(address)
        if times is None or len(times) < self.limit:
            return 0.0
        return max(0.0, times[0] + self.window - self.clock())

    def failed(self, address: str) -> None:
        """Count one wrong token from ``address``."""
        if len(self._failures) > 100_000:  # many addresses: forget those whose window has passed
            for old in list(self._failures):
                self._recent(old)
        self._failures.setdefault(address, deque()).append(self.clock())


def client_address(scope: Scope) -> str:
    """The peer's address of a request (what :class:`Throttle` counts by)."""
    client = scope.get("client")
    return str(client[0]) if client else ""


_DEFAULT_PORTS = {"http": "80", "https": "443"}


def _netloc(host: str, scheme: str) -> str:
    """``host[:port]`` in one spelling: lower case, without the scheme's default port."""
    host = host.strip().casefold()
    default = _DEFAULT_PORTS.get(scheme)
    return host[: -len(default) - 1] if default and host.endswith(":" + default) else host


def origin_of(text: str) -> str:
    """An origin (``scheme://host[:port]``) in one spelling: lower case, without the scheme's default port or a
    trailing slash; I2VError for what is not one (a path, another scheme)."""
    from ..errors import I2VError

    parts = urlsplit(text.strip())
    if parts.scheme.casefold() not in _DEFAULT_PORTS or not parts.netloc or parts.path not in ("", "/"):
        raise I2VError(f"--allow-origin {text!r} is not an origin: give scheme://host[:port], as a browser sends it")
    scheme = parts.scheme.casefold()
    return f"{scheme}://{_netloc(parts.netloc, scheme)}"


def foreign_origin(scope: Scope, allowed: Collection[str] = ()) -> str | None:
    """Why a request comes from a page of another origin, or None: its ``Origin`` is neither this server's (as the
    ``Host`` header, or a proxy's ``X-Forwarded-Host``, names it) nor one of ``allowed`` (:func:`origin_of`), or
    without one, ``Sec-Fetch-Site`` says cross-site or same-site (another port or subdomain is another origin)."""
    origin = _header(scope, b"origin")
    if origin is None:
        site = (_header(scope, b"sec-fetch-site") or "").strip().casefold()
        if site in ("cross-site", "same-site"):
            return f"a request from a page of another site (Sec-Fetch-Site: {site})"
        return None
    parts = urlsplit(origin.strip())
    scheme = parts.scheme.casefold()
    if origin.strip() != "null" and scheme in _DEFAULT_PORTS and parts.netloc:
        ours = {_netloc(h, scheme) for h in (_header(scope, b"host"), _header(scope, b"x-forwarded-host")) if h}
        netloc = _netloc(parts.netloc, scheme)
        if netloc in ours or f"{scheme}://{netloc}" in allowed:
            return None
    return f"a request from a page of another origin ({origin.strip()[:100]!r})"


#: On every answer: other origins may not embed what this server sends (the index's images, its thumbnails).
_CORP = (b"cross-origin-resource-policy", b"same-origin")


class Guard:
    """The middleware: ``token`` (None: loopback only), ``max_body`` bytes, ``timeout`` seconds for the body;
    ``throttle`` counts wrong tokens (shared with ``POST /login``)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        token: str | None,
        max_body: int,
        timeout: float,
        throttle: Throttle | None = None,
        allowed_origins: Collection[str] = (),
    ) -> None:
        self.app = app
        self.allowed_origins = frozenset(allowed_origins)
        self.token = token or None
        self.max_body = max_body
        self.timeout = timeout
        self.throttle = throttle or Throttle()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        inner_send = send

        async def send(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), _CORP]}
            await inner_send(message)

        if self.token is None:
            host = _header(scope, b"host") or ""
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if host and not is_loopback(name):
                await send_error(send, 421, f"this server answers only to loopback host names, not {host!r}")
                return
        if scope.get("method") not in ("GET", "HEAD") and (why := foreign_origin(scope, self.allowed_origins)):
            hint = "a page behind a proxy that rewrites Host: start i2v serve with --allow-origin ORIGIN"
            await send_error(send, 403, f"{why} is refused: use the page this server serves, or a script ({hint})")
            return
        path = scope.get("path", "")
        authorization, cookie = _header(scope, b"authorization"), _cookie(scope)
        address = client_address(scope)
        if self.token is not None and (authorization or cookie or path == "/login"):
            wait = self.throttle.wait(address)
            if wait > 0:
                await send_error(send, 429, f"too many wrong tokens from this address: try again in {wait:.0f} s",
                                 [(b"retry-after", str(int(wait) + 1).encode())])  # fmt: skip
                return
        if not (path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)) and not token_ok(
            self.token, authorization, cookie
        ):
            if authorization or cookie:
                self.throttle.failed(address)
            if path == "/" and scope.get("method") == "GET":
                from .page import login_page

                body = login_page().encode("utf-8")
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"text/html; charset=utf-8")]})  # fmt: skip
                await send({"type": "http.response.body", "body": body})
                return
            await send_error(send, 401, "missing or wrong bearer token (Authorization: Bearer TOKEN)",
                             [(b"www-authenticate", b"Bearer")])  # fmt: skip
            return
        length = _header(scope, b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await send_error(send, 400, "bad Content-Length header")
                return
            if declared > self.max_body:
                await send_error(send, 413, f"the request body is {declared:,} bytes; the limit is {self.max_body:,}",
                                 _CLOSE)  # fmt: skip
                return
        try:
            body, more = await asyncio.wait_for(self._read(receive), self.timeout)
        except asyncio.TimeoutError:
            await send_error(send, 408, f"the request body did not arrive within {self.timeout:g} s", _CLOSE)
            return
        if more is not None:
            await send_error(send, 413, f"the request body is over the limit of {self.max_body:,} bytes", _CLOSE)
            return
        if body is None:
            return  # the client went away
        if multipart_incomplete(_header(scope, b"content-type"), body):
            await send_error(send, 400, "the multipart body is malformed or incomplete (no closing boundary)")
            return

        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _read(self, receive: Receive) -> tuple[bytes | None, bytes | None]:
        """(body, None), or (None, b"") when it is over the limit, or (None, None) when the client disconnected."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return None, b""
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None


def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen beyond loopback without a token (an open tagger and index on the network), and a token
    that no client could send: HTTP headers and cookies carry ASCII (a token of other characters locked the API)."""
    from ..errors import I2VError

    if token and not all("!" <= c <= "~" for c in token):
        raise I2VError("--token must be printable ASCII without spaces: HTTP headers and cookies carry no other")
    if not is_loopback(host) and not token:
        raise I2VError(
            f"--host {host} listens beyond this machine: give --token TOKEN (or set $I2V_TOKEN); clients then send "
            "'Authorization: Bearer TOKEN'"
        )


def listening_sockets(host: str, port: int) -> list[Any]:
    """Sockets bound to every address ``host`` names (``""``: every interface) at ``port`` and listening, as asyncio
    binds them for uvicorn (IPv6 ones IPv6-only), before the server starts: an address in use is then one line
    naming it, and the port announced is the real one (``port`` 0: a free one, the same for every address).
    Raises OSError."""
    import socket

    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    socks: list[socket.socket] = []
    seen = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address[:2]) in seen:
                continue
            seen.add((family, address[:2]))
            if socks and port == 0:  # the port the first one took
                address = (address[0], socks[0].getsockname()[1], *address[2:])
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPV6_V6ONLY"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(2048)
            sock.set_inheritable(True)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


def multipart_incomplete(content_type: str | None, body: bytes) -> bool:
    """Whether ``body``, sent as multipart/form-data with a boundary, lacks its closing delimiter ``--BOUNDARY--``.

    The form parser ends such a body quietly: its last part, never closed, is dropped, so a cut upload was a 422
    "image: Field required", or the request answered without its last image. (No boundary at all is left to the
    form parser, which says so.)"""
    if content_type is None:
        return False
    from python_multipart.multipart import parse_options_header

    kind, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        return False
    return b"--" + boundary + b"--" not in body


def guarded_protocol(timeout_s: float, max_connections: int | None = None) -> type:
    """uvicorn's h11 protocol with what it lacks against clients that stall, and JSON for its own errors:

    - a deadline on each request's head: a connection that sends nothing, or its headers a byte at a time, is
      closed after ``timeout_s`` (uvicorn waited for ever; the body and the answer have their own limits,
      :class:`Guard` and the application's);
    - an answer the client stops reading (nothing of it taken for ``timeout_s`` to twice that) aborts the
      connection: uvicorn waited for ever, the slot held, and a few such clients made every other request 503;
    - ``max_connections`` (connections and requests at once, counted as uvicorn's ``limit_concurrency`` does)
      answered with a JSON 503 and ``Retry-After``, and a request that is not HTTP with a JSON 400: uvicorn's
      own answers were plain text, where the API promises a JSON body for every error.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Guarded(H11Protocol):  # type: ignore[misc]
        _deadline: asyncio.TimerHandle | None = None
        _stall: asyncio.TimerHandle | None = None
        _pending = 0  # bytes of answers waiting to be sent at the last look
        _drained = False  # whether the transport took more since then

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.limit_concurrency = None  # counted here instead, to answer in JSON
            if max_connections is not None:
                self.app = _limited(self.app, self.connections, self.tasks, max_connections)

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()
            self._watch()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()  # the next request's head, on a kept-alive connection

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if self._stall is not None:
                self._stall.cancel()
                self._stall = None
            super().connection_lost(exc)

        def resume_writing(self) -> None:
            self._drained = True
            super().resume_writing()

        def send_400_response(self, msg: str) -> None:
            import h11

            body = json.dumps({"error": f"not an HTTP request i2v can read: {msg}"}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]  # fmt: skip
            answer = h11.Response(status_code=400, headers=headers, reason=b"Bad Request")
            for event in (answer, h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(timeout_s, self._head_late)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _head_late(self) -> None:
            self._deadline = None
            cycle = getattr(self, "cycle", None)
            if (cycle is None or cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()  # no request under way: its head is late

        def _watch(self) -> None:
            self._stall = self.loop.call_later(timeout_s, self._look_at_writes)

        def _look_at_writes(self) -> None:
            pending = self.transport.get_write_buffer_size()
            if pending and self._pending and pending >= self._pending and not self._drained:
                self.transport.abort()  # a whole period without taking a byte: the client stopped reading
                return
            self._pending, self._drained = pending, False
            self._watch()

    return Guarded


def _limited(app: ASGIApp, connections: Any, tasks: Any, limit: int) -> ASGIApp:
    """``app`` behind uvicorn's ``limit_concurrency`` rule (``limit`` connections or request tasks at once, this
    connection included), answered with a JSON 503 and ``Retry-After``. Checked as the request's task starts, so
    its own task counts too (uvicorn checked just before creating it)."""

    async def limited(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (len(connections) >= limit or len(tasks) > limit):
            await send_error(send, 503, f"the server has {limit} connections or requests at once (--max-connections): "
                             "try again shortly", [(b"retry-after", b"1"), (b"connection", b"close")])  # fmt: skip
            return
        await app(scope, receive, send)

    return limited
