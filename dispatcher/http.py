"""The one HTTP server (aiohttp): webhook routes, /metrics, /healthz, /readyz and the /v1 API."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from dispatcher.api import HttpHandler, HttpRequest, HttpResponse
from dispatcher.metrics import CONTENT_TYPE, Metrics
from dispatcher.store import StateStore

log = logging.getLogger("eventswarm.http")

Probe = Callable[[], Awaitable[dict[str, Any]]]
Replay = Callable[[list[str], str | None], Awaitable[dict[str, Any]]]


class HttpServer:
    """Serves the daemon's endpoints and the routes sources add (``SourceContext.add_route``)."""

    def __init__(self, host: str, port: int, *, metrics: Metrics, state: StateStore, status: Probe, ready: Probe,
                 replay: Replay) -> None:
        self.host = host
        self.port = port
        self.metrics = metrics
        self.state = state
        self.status = status
        self.ready = ready
        self.replay = replay
        self.accepting = True
        self._routes: dict[str, dict[str, tuple[HttpHandler, int]]] = {}
        self._runner: web.AppRunner | None = None

    def add_route(self, method: str, path: str, handler: HttpHandler, *, max_body: int) -> None:
        methods = self._routes.setdefault(path, {})
        if method.upper() in methods:
            raise ValueError(f"two triggers serve {method.upper()} {path}")
        methods[method.upper()] = (handler, max_body)

    def remove_routes(self, handlers: set[HttpHandler]) -> None:
        for methods in self._routes.values():
            for method in [m for m, (h, _) in methods.items() if h in handlers]:
                del methods[method]

    async def start(self) -> None:
        app = web.Application(client_max_size=1024**3)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/v1/invocations", self._invocations)
        app.router.add_get("/v1/invocations/{id}/logs", self._logs)
        app.router.add_get("/v1/status", self._status)
        app.router.add_post("/v1/dead-letters/replay", self._replay)
        app.router.add_route("*", "/{tail:.*}", self._source_route)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        if self.port == 0:
            server: Any = site._server
            if server is not None and getattr(server, "sockets", None):
                self.port = int(server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, _request: web.Request) -> web.Response:
        report = await self.ready()
        return web.json_response(report, status=200 if report.get("ready") else 503)

    async def _metrics(self, _request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def _status(self, _request: web.Request) -> web.Response:
        return web.json_response(await self.status())

    async def _replay(self, request: web.Request) -> web.Response:
        try:
            doc = await request.json()
            ids = [str(i) for i in doc.get("ids") or []]
            trigger = doc.get("trigger")
        except (ValueError, AttributeError):
            return web.json_response({"error": "expected {\"ids\": [...], \"trigger\": ...}"}, status=400)
        return web.json_response(await self.replay(ids, trigger))

    async def _invocations(self, request: web.Request) -> web.Response:
        query = request.query
        try:
            limit = max(1, min(int(query.get("limit", "50")), 1000))
        except ValueError:
            return web.json_response({"error": "limit must be a number"}, status=400)
        records = await self.state.read(
            lambda s: s.invocations(trigger=query.get("trigger"), status=query.get("status"), limit=limit))
        return web.json_response([r.to_json() for r in records])

    async def _logs(self, request: web.Request) -> web.Response:
        invocation_id = request.match_info["id"]
        found = await self.state.read(lambda s: s.logs(invocation_id))
        if found is None:
            return web.json_response({"error": f"no invocation {invocation_id}"}, status=404)
        return web.json_response({"stdout": found[0].decode("utf-8", "replace"), "stderr": found[1].decode("utf-8", "replace")})

    async def _source_route(self, request: web.Request) -> web.StreamResponse:
        methods = self._routes.get(request.path)
        if not methods:
            return web.json_response({"error": f"no trigger serves {request.path}"}, status=404)
        entry = methods.get(request.method)
        if entry is None:
            return web.json_response({"error": f"{request.method} not allowed"}, status=405,
                                     headers={"Allow": ", ".join(sorted(methods))})
        if not self.accepting:
            return web.json_response({"error": "shutting down"}, status=503, headers={"Retry-After": "5"})
        handler, max_body = entry
        if request.content_length is not None and request.content_length > max_body:
            return web.json_response({"error": f"body larger than {max_body} bytes"}, status=413)
        body = bytearray()
        async for chunk in request.content.iter_any():
            body += chunk
            if len(body) > max_body:
                return web.json_response({"error": f"body larger than {max_body} bytes"}, status=413)
        response: HttpResponse = await handler(HttpRequest(
            method=request.method, path=request.path, headers=request.headers, body=bytes(body),
            query=dict(request.query)))
        return web.Response(status=response.status, body=response.body, headers=dict(response.headers))


