"""The one HTTP server (aiohttp): webhook routes, /metrics, /healthz, /readyz and the /v1 API."""

from __future__ import annotations

import asyncio
import errno
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import anyio
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from dispatcher.api import HttpHandler, HttpRequest, HttpResponse
from dispatcher.errors import EventswarmError
from dispatcher.executors.base import LIVE
from dispatcher.metrics import Metrics
from dispatcher.state import StateStore
from dispatcher.telemetry import Telemetry

log = logging.getLogger("eventswarm.http")

Endpoint = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]

API_MAX_BODY = 1024 * 1024
LOGS_PREFIX, LOGS_SUFFIX = "/v1/invocations/", "/logs"
"""The largest request body the /v1 API reads."""
STATUSES = ("queued", "running", "succeeded", "failed", "timed_out")
ROUTE_DOWN_RETRY_AFTER = "5"
LINGER = 5.0
"""At most this long is a body left unread after an early answer (413, 408) still read, so the client sees the answer."""
_FULL = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class _Refused(asyncio.Protocol):
    """A connection over ``max_connections``: answered 503 and closed at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(_FULL)
        transport.close()


class _Counted(asyncio.Protocol):
    """aiohttp's protocol for one connection, counted from its creation to its end (for ``max_connections``).

    Counting at creation, not at ``connection_made``, matters: asyncio accepts a burst of connections
    and creates all their protocols before any of them is told it is connected.
    """

    def __init__(self, inner: asyncio.Protocol, gone: Callable[[], None]) -> None:
        self.inner = inner
        self.gone = gone

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone()
        self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class _QuietBadRequests(logging.Filter):
    """aiohttp logs every malformed request at ERROR with a traceback: a client's mistake is one line at INFO."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, RequestPayloadError):
            return False  # (a body its Content-Encoding does not fit: the route said so, in one line with its path)
        if isinstance(error, HttpProcessingError):
            record.levelno, record.levelname = logging.INFO, "INFO"
            peer = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            what = " ".join(str(error.message or type(error).__name__).split())  # aiohttp's own spans lines
            record.msg, record.args = "bad request from %s: %s", (peer, what[:300])
            record.exc_info, record.exc_text = None, None
        return True


logging.getLogger("aiohttp.server").addFilter(_QuietBadRequests())

Probe = Callable[[], Awaitable[dict[str, Any]]]
Replay = Callable[[list[str], str | None], Awaitable[dict[str, Any]]]
Reload = Callable[[], Awaitable[tuple[int, dict[str, Any]]]]
Letters = Callable[[str | None, int], Awaitable[list[dict[str, Any]]]]
FOLLOW_EVERY = 0.2
"""How often ``logs --follow`` looks for new output."""
FOLLOW_MAX = 24 * 3600.0
"""A follow ends after this long, whatever happens (an invocation's timeout ends it much sooner)."""
PAGE = Path(__file__).parent / "static" / "index.html"
"""The status page: HTML, CSS and JavaScript in one file, nothing fetched from elsewhere."""


class HttpServer:
    """Serves the daemon's endpoints and the routes sources add (``SourceContext.add_route``)."""

    def __init__(self, host: str, port: int, *, metrics: Metrics, state: StateStore, status: Probe, ready: Probe,
                 replay: Replay, reload: Reload | None = None, letters: Letters | None = None,
                 client_timeout: float = 30.0, max_connections: int = 1000,
                 tokens: Sequence[str] = (), metrics_public: bool = False) -> None:
        self.host = host
        self.port = port
        self.metrics = metrics
        self.state = state
        self.status = status
        self.ready = ready
        self.replay = replay
        self.reload = reload
        self.letters = letters
        self.accepting = True
        self.client_timeout = client_timeout
        self.max_connections = max_connections
        self.tokens = [token.encode() for token in tokens if token]
        """Bearer tokens that open ``/v1`` (and ``/metrics`` unless ``metrics_public``); none: open to all."""
        self.metrics_public = metrics_public
        self._routes: dict[str, dict[str, tuple[HttpHandler | None, int]]] = {}
        self._runner: web.ServerRunner | None = None
        self._listener: asyncio.Server | None = None
        self.connections = 0
        """Open HTTP connections."""
        self._route_triggers: dict[str, str] = {}
        self.busy: dict[HttpHandler, int] = {}
        """Requests each source route's handler is answering now."""
        self._answered: anyio.Event | None = None
        """Set as a source route's request is answered, while ``answered`` waits."""
        self.telemetry: Telemetry | None = None
        """Traces: a server span for each request to a source's route (set by the daemon when export is on)."""

    async def answered(self, handlers: Collection[HttpHandler]) -> None:
        """Returns once none of ``handlers`` is answering a request."""
        while any(self.busy.get(handler) for handler in handlers):
            self._answered = event = self._answered or anyio.Event()
            await event.wait()

    def add_route(self, method: str, path: str, handler: HttpHandler, *, max_body: int, trigger: str = "") -> None:
        """Serve ``method path`` with ``handler`` (for ``trigger``: its answers are counted under its name)."""
        if trigger:
            self._route_triggers[path] = trigger
        methods = self._routes.setdefault(path, {})
        current = methods.get(method.upper())
        if current is not None and current[0] is not None:
            raise ValueError(f"two triggers serve {method.upper()} {path}")
        methods[method.upper()] = (handler, max_body)

    def remove_routes(self, handlers: set[HttpHandler]) -> None:
        """Take ``handlers`` off their routes: those paths answer 503 until a source serves them again."""
        for methods in self._routes.values():
            for method, (handler, _) in list(methods.items()):
                if handler is not None and handler in handlers:
                    methods[method] = (None, 0)

    async def start(self) -> None:
        self._endpoints: dict[str, dict[str, Endpoint]] = {
            "/healthz": {"GET": self._healthz},
            "/readyz": {"GET": self._readyz},
            "/metrics": {"GET": self._metrics},
            "/v1/invocations": {"GET": self._invocations},
            "/v1/status": {"GET": self._status},
            "/v1/dead-letters/replay": {"POST": self._replay},
            "/v1/reload": {"POST": self._reload},
            "/v1/dead-letters": {"GET": self._dead_letters},
            "/": {"GET": self._page},
        }
        # aiohttp's low-level server with one handler: a webhook costs one dict lookup to route, not a
        # walk through an application's router and middlewares (measured: about a tenth of a request's cost).
        # keepalive_timeout closes a connection that has not sent a whole request's headers in time, from
        # its start or since its last answer: idle and slowloris clients alike (aiohttp >= 3.14, pinned).
        # lingering_time: how long a body left unread after an early answer (413, 408) is still drained.
        server = web.Server(self._dispatch, access_log=None, keepalive_timeout=self.client_timeout,
                            lingering_time=min(self.client_timeout, LINGER))
        self._runner = web.ServerRunner(server, handle_signals=False)
        await self._runner.setup()

        def connection() -> asyncio.BaseProtocol:
            if self.connections >= self.max_connections:
                return _Refused()
            self.connections += 1
            return _Counted(server(), self._gone)

        try:
            self._listener = await asyncio.get_running_loop().create_server(
                connection, self.host, self.port, reuse_address=True, backlog=128)
        except OSError as exc:
            reasons = {errno.EADDRINUSE: "the address is in use (another daemon, or another program, listens there)",
                       errno.EADDRNOTAVAIL: "no interface of this machine has that address",
                       errno.EACCES: "a port below 1024 needs root (or CAP_NET_BIND_SERVICE)"}
            why = reasons.get(exc.errno or 0, exc.strerror or str(exc))
            raise EventswarmError(f"cannot listen on {self.host}:{self.port}: {why}; daemon.listen chooses "
                                  "where") from None
        self.port = int(self._listener.sockets[0].getsockname()[1])

    def _gone(self) -> None:
        self.connections -= 1

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _dispatch(self, request: web.BaseRequest) -> web.StreamResponse:
        """Route a request: to a source's route (the hot path first), to one of the daemon's endpoints, or 404."""
        path = request.path
        methods = self._routes.get(path)
        if methods:
            trigger = self._route_triggers.get(path, "")
            if self.telemetry is None:
                response = await self._source_route(request, methods)
            else:
                host, port = self.host, self.port
                with self.telemetry.serving(trigger, request.method, path, request.headers, request.scheme, host,
                                            port, request.remote) as answered:
                    response = await self._source_route(request, methods)
                    answered(response.status)
            self.metrics.webhook_responses.labels(trigger, str(response.status)).inc()
            return response
        endpoints = self._endpoints.get(path)
        if endpoints is None and path.startswith(LOGS_PREFIX):
            rest = path[len(LOGS_PREFIX):]
            invocation_id = rest.removesuffix(LOGS_SUFFIX)
            if invocation_id and "/" not in invocation_id:
                wanted = self._logs if rest.endswith(LOGS_SUFFIX) else self._invocation
                endpoints = {"GET": lambda request: wanted(request, invocation_id)}
        if endpoints is None:
            return _error(404, f"nothing is served at {path}")
        endpoint = endpoints.get("GET" if request.method == "HEAD" else request.method)
        if endpoint is None:
            return _error(405, f"{request.method} not allowed", {"Allow": ", ".join(sorted(endpoints))})
        if self.tokens and (path.startswith("/v1/") or (path == "/metrics" and not self.metrics_public)):
            refused = self._unauthorized(request)
            if refused is not None:
                return refused
        return await endpoint(request)

    def _unauthorized(self, request: web.BaseRequest) -> web.Response | None:
        """None when the request carries one of the tokens (``Authorization: Bearer …``); else the 401."""
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return _error(401, "this endpoint needs the API token: Authorization: Bearer <token>",
                          {"WWW-Authenticate": 'Bearer realm="eventswarm"'})
        candidate = given.strip().encode()
        if any(hmac.compare_digest(candidate, token) for token in self.tokens):
            return None
        return _error(401, "wrong API token", {"WWW-Authenticate": 'Bearer realm="eventswarm", error="invalid_token"'})

    async def _healthz(self, _request: web.BaseRequest) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, _request: web.BaseRequest) -> web.Response:
        report = await self.ready()
        return web.json_response(report, status=200 if report.get("ready") else 503)

    async def _metrics(self, _request: web.BaseRequest) -> web.Response:
        body, content_type = self.metrics.render(_request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _status(self, _request: web.BaseRequest) -> web.Response:
        return web.json_response(await self.status())

    async def _replay(self, request: web.BaseRequest) -> web.StreamResponse:
        usage = 'expected {"ids": ["…", …]} or {"trigger": "…"}'
        body = await self._body(request, API_MAX_BODY)
        if isinstance(body, web.StreamResponse):
            return body
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError):
            return _error(400, f"the body is not JSON: {usage}")
        ids = doc.get("ids", []) if isinstance(doc, dict) else None
        trigger = doc.get("trigger") if isinstance(doc, dict) else None
        if (not isinstance(ids, list) or not all(isinstance(i, str) for i in ids)
                or not (trigger is None or isinstance(trigger, str))):
            return _error(400, usage)
        if not ids and not trigger:
            return _error(400, f"name the dead letters to replay: {usage}")
        return web.json_response(await self.replay(ids, trigger))

    async def _page(self, _request: web.BaseRequest) -> web.Response:
        """The status page (it reads /v1 with the API token it is given, so it needs none itself)."""
        return web.Response(body=PAGE.read_bytes(), headers={
            "Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-cache",
            "Content-Security-Policy": "default-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
                                       "connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'"})

    async def _dead_letters(self, request: web.BaseRequest) -> web.Response:
        if self.letters is None:
            return _error(404, "this server keeps no dead letters")
        try:
            limit = max(1, min(int(request.query.get("limit", "100")), 1000))
        except ValueError:
            return _error(400, "limit must be a number")
        return web.json_response(await self.letters(request.query.get("trigger"), limit))

    async def _reload(self, _request: web.BaseRequest) -> web.Response:
        if self.reload is None:
            return _error(404, "this server cannot reload")
        status, report = await self.reload()
        return web.json_response(report, status=status)

    async def _invocations(self, request: web.BaseRequest) -> web.Response:
        query = request.query
        try:
            limit = max(1, min(int(query.get("limit", "50")), 1000))
        except ValueError:
            return web.json_response({"error": "limit must be a number"}, status=400)
        if query.get("status") and query["status"] not in STATUSES:
            return _error(400, f"status must be one of {', '.join(STATUSES)}")
        records = await self.state.read(
            lambda s: s.invocations(trigger=query.get("trigger"), status=query.get("status"), limit=limit))
        return web.json_response([r.to_json() for r in records])

    async def _of_invocation(self, prefix: str, read: Callable[[Any, str], Any]) -> Any:
        """``read(store, id)`` for the invocation ``prefix`` names (whole, or a unique prefix); else the 404 or 400
        answer saying why."""
        found = await self.state.read(lambda s: s.resolve("invocations", prefix))
        if len(found) > 1:
            return _error(400, f"{prefix} is the start of several invocation ids: give more of it")
        result = await self.state.read(lambda s: read(s, found[0])) if found else None
        return _error(404, f"no invocation {prefix}") if result is None else result

    async def _invocation(self, _request: web.BaseRequest, prefix: str) -> web.Response:
        record = await self._of_invocation(prefix, lambda s, i: s.invocation(i))
        return record if isinstance(record, web.Response) else web.json_response(record.to_json())

    async def _logs(self, request: web.BaseRequest, prefix: str) -> web.StreamResponse:
        if request.query.get("follow", "") not in ("", "0", "false"):
            return await self._follow(request, prefix)
        found = await self._of_invocation(prefix, lambda s, i: s.logs(i))
        if isinstance(found, web.Response):
            return found
        return web.json_response({"stdout": found[0].decode("utf-8", "replace"), "stderr": found[1].decode("utf-8", "replace")})

    async def _follow(self, request: web.BaseRequest, prefix: str) -> web.StreamResponse:
        """``?follow=1``: the invocation's output as it comes, as NDJSON lines (``{"stdout": …}``, ``{"stderr": …}``),
        then ``{"status": …, "exit_code": …}`` once it ended. Live where the executor reads output as it comes
        (process, docker); at the end otherwise (swarm)."""
        record = await self._of_invocation(prefix, lambda s, i: s.invocation(i))
        if isinstance(record, web.Response):
            return record
        invocation_id = record.id
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-cache"})
        await response.prepare(request)
        sent = [0, 0]
        deadline = anyio.current_time() + FOLLOW_MAX
        try:
            while anyio.current_time() < deadline:
                live = LIVE.running.get(invocation_id)
                if live is not None:
                    for index, (stream, capture) in enumerate(zip(("stdout", "stderr"), live, strict=True)):
                        chunk, sent[index] = capture.since(sent[index])
                        if chunk:
                            await response.write(json.dumps({stream: chunk.decode("utf-8", "replace")}).encode() + b"\n")
                else:
                    record = await self.state.read(lambda s: s.invocation(invocation_id))
                    if record is None or record.status not in ("queued", "running"):
                        stored = await self.state.read(lambda s: s.logs(invocation_id)) or (b"", b"")
                        for index, stream in enumerate(("stdout", "stderr")):
                            if len(stored[index]) > sent[index]:
                                text = stored[index][sent[index]:].decode("utf-8", "replace")
                                await response.write(json.dumps({stream: text}).encode() + b"\n")
                        await response.write(json.dumps({"status": record.status if record else "gone",
                                                         "exit_code": record.exit_code if record else None}).encode()
                                             + b"\n")
                        break
                await anyio.sleep(FOLLOW_EVERY)
            await response.write_eof()
        except (ConnectionResetError, RuntimeError):
            pass  # the client left
        return response

    async def _source_route(self, request: web.BaseRequest,
                            methods: dict[str, tuple[HttpHandler | None, int]]) -> web.StreamResponse:
        entry = methods.get(request.method)
        if entry is None:
            return web.json_response({"error": f"{request.method} not allowed"}, status=405,
                                     headers={"Allow": ", ".join(sorted(methods))})
        if not self.accepting:
            return web.json_response({"error": "shutting down"}, status=503, headers={"Retry-After": "5"})
        handler, max_body = entry
        if handler is None:
            return web.json_response({"error": "the trigger serving this path is not running"}, status=503,
                                     headers={"Retry-After": ROUTE_DOWN_RETRY_AFTER})
        body = await self._body(request, max_body)
        if isinstance(body, web.StreamResponse):
            return body
        self.busy[handler] = self.busy.get(handler, 0) + 1
        try:
            response: HttpResponse = await handler(HttpRequest(
                method=request.method, path=request.path, headers=request.headers, body=body, query=request.query))
        finally:
            left = self.busy.pop(handler) - 1
            if left:
                self.busy[handler] = left
            if self._answered is not None:
                self._answered.set()
                self._answered = None
        return web.Response(status=response.status, body=response.body, headers=response.headers)

    async def _body(self, request: web.BaseRequest, max_body: int) -> bytes | web.StreamResponse:
        """The request's body, read within ``client_timeout`` and ``max_body`` (``max_body`` counts what is read,
        after its Content-Encoding is undone); or the 4xx answer saying why not."""
        encoding = request.headers.get("Content-Encoding", "").strip().lower()
        if encoding not in CONTENT_ENCODINGS:
            return _error(415, f"Content-Encoding {encoding[:40]!r} is not accepted: send the body as it is, or with "
                               "one of gzip, deflate, br, zstd", {"Accept-Encoding": "gzip, deflate, br, zstd"})
        length = request.content_length
        if length is not None and length > max_body:
            return _error(413, f"body larger than {max_body} bytes")
        try:
            if length is not None and request.content.is_eof():
                return request.content.read_nowait()  # it came with the headers (the common case): all is here
            body = bytearray()
            with anyio.move_on_after(self.client_timeout):
                async for chunk in request.content.iter_any():
                    body += chunk
                    if len(body) > max_body:
                        return _error(413, f"body larger than {max_body} bytes")
                return bytes(body)
        except (HttpProcessingError, RequestPayloadError) as exc:
            # (a body that is not what its Content-Encoding says: the sender's error, said in one line at INFO)
            why = " ".join(str(getattr(exc, "message", None) or exc).split()).removeprefix("400, message: ")
            log.info("a request to %s had a malformed body: %s", request.path, why)
            return _error(400, f"malformed body: {why}")
        return _error(408, f"the body did not arrive within {self.client_timeout:g}s", {"Connection": "close"})


CONTENT_ENCODINGS = ("", "identity", "gzip", "x-gzip", "deflate", "br", "zstd")
"""What a request's body may be encoded with (aiohttp undoes them, with Brotli and backports.zstd for the last two);
signatures are checked on what it gives: the bytes the sender signed before compressing."""


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


