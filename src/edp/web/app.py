"""The web app of ``edp serve``: the ingest endpoint, the dashboard, its JSON API, ``/metrics``.

Routes::

    POST /ingest                 S3-format notifications (MinIO, Ceph RGW ... webhooks)
    GET  /                       the dashboard          GET /batches/{id}  a batch's page
    GET  /api/batches            ?state=open|closed&limit=N (N per state, 1-1000, default 50)
    GET  /api/batches/{id}       a batch and its files
    GET  /api/events             ?limit=N, the recent package-objects-ready (and other) events
    GET  /api/stats              figures, counters, the time series of the charts, dead letters
    GET  /metrics                Prometheus text format
    GET  /healthz                liveness

``/ingest`` always needs ``Authorization: Bearer <token>``. The read-only routes need
the token too (header, or the cookie that ``?token=...`` on a page sets) unless the
server is bound to a loopback address. A query parameter out of range (``limit=abc``)
is refused with 400 and a message saying which and why. Every store access goes through the
:class:`~edp.web.reader.StoreReader` thread or the engine's daemon thread.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import queue
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import orjson
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edp.config import Settings
from edp.errors import NotFound
from edp.sources.http import HttpSource, IngestResult, SourceClosed, bearer_ok
from edp.store.base import Store
from edp.web import figures
from edp.web.metrics import CONTENT_TYPE, WebMetrics
from edp.web.reader import StoreReader

log = logging.getLogger(__name__)
T = TypeVar("T")

STATIC = Path(__file__).with_name("static")
COOKIE = "edp_token"


def cookie_value(token: str) -> str:
    """The dashboard cookie: a value derived from the token, not the token itself, so a
    cookie read out of a browser opens the read-only pages but never ``/ingest``."""
    return hmac.new(token.encode(), b"edp dashboard cookie v1", "sha256").hexdigest()


SECURITY_HEADERS = [
    (b"content-security-policy",
     b"default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
     b"connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]


@dataclass(slots=True)
class WebContext:
    """What the app needs. ``source`` None: no ingest endpoint (a read-only dashboard)."""

    settings: Settings
    reader: StoreReader
    token: str
    source: HttpSource | None = None
    protect_reads: bool = False
    allowed_hosts: list[str] | None = None
    commit_timeout: float = 30.0
    step_errors: Callable[[], int] = lambda: 0
    metrics: WebMetrics = field(default_factory=WebMetrics)


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON response (orjson)."""
    return Response(orjson.dumps(data), status_code=status, media_type="application/json",
                    headers=headers)


class SecurityHeaders:
    """Adds a strict Content-Security-Policy and friends to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass through, adding the headers to ``http.response.start``."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(ctx: WebContext) -> Starlette:
    """Build the Starlette app over ``ctx``."""
    web = _Handlers(ctx)
    routes = [
        Route("/", web.page("index.html")),
        Route("/batches/{batch_id}", web.page("batch.html")),
        Route("/healthz", web.healthz),
        Route("/api/batches", web.reads(web.api_batches)),
        Route("/api/batches/{batch_id}", web.reads(web.api_batch)),
        Route("/api/events", web.reads(web.api_events)),
        Route("/api/stats", web.reads(web.api_stats)),
        Route("/api/dead-letters", web.reads(web.api_dead_letters)),
        Route("/metrics", web.reads(web.metrics)),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    if ctx.source is not None:
        routes.append(Route("/ingest", web.ingest, methods=["POST", "HEAD"]))
    middleware = [Middleware(SecurityHeaders)]
    if ctx.allowed_hosts:  # loopback: refuse DNS-rebinding requests for other host names
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=ctx.allowed_hosts))
    return Starlette(routes=routes, middleware=middleware)


Handler = Callable[[Request], Awaitable[Response]]


class _Handlers:
    def __init__(self, ctx: WebContext) -> None:
        self.ctx = ctx

    # -- access ------------------------------------------------------------------
    def _read_allowed(self, request: Request) -> bool:
        if not self.ctx.protect_reads:
            return True
        if bearer_ok(request.headers.get("authorization"), self.ctx.token):
            return True
        cookie = request.cookies.get(COOKIE, "")
        return hmac.compare_digest(cookie.encode(), cookie_value(self.ctx.token).encode())

    @staticmethod
    def _unauthorized() -> Response:
        return json_response({"error": "missing or wrong bearer token"}, 401,
                             {"WWW-Authenticate": 'Bearer realm="edp"'})

    def reads(self, handler: Handler) -> Handler:
        async def guarded(request: Request) -> Response:
            if not self._read_allowed(request):
                return self._unauthorized()
            try:
                return await handler(request)
            except BadQuery as exc:
                return json_response({"error": str(exc)}, 400)

        return guarded

    def page(self, name: str) -> Handler:
        async def serve(request: Request) -> Response:
            given = request.query_params.get("token")
            if given is not None and self.ctx.protect_reads:
                if not hmac.compare_digest(given.encode(), self.ctx.token.encode()):
                    return self._unauthorized()
                redirect = RedirectResponse(request.url.path, status_code=303)
                redirect.set_cookie(COOKIE, cookie_value(given), httponly=True, samesite="strict",
                                    secure=request.url.scheme == "https")
                return redirect
            if not self._read_allowed(request):
                return Response("edp: open this page with ?token=<serve_token> once.\n", 401,
                                media_type="text/plain")
            return FileResponse(STATIC / name, media_type="text/html")

        return serve

    async def _query(self, query: Callable[[Store], T]) -> T:
        return await asyncio.wrap_future(self.ctx.reader.submit(query))

    async def _query_now(self, query: Callable[[Store, float], T]) -> tuple[float, T]:
        """A query given the store's wall clock, read with it: ages and deadlines are
        those the workers see (on PostgreSQL the server's clock, not this machine's)."""
        def run(store: Store) -> tuple[float, T]:
            now = store.wall_clock()
            return now, query(store, now)

        return await self._query(run)

    # -- read-only API ---------------------------------------------------------------
    async def healthz(self, request: Request) -> Response:
        return json_response({"ok": True})

    async def api_batches(self, request: Request) -> Response:
        state = request.query_params.get("state")
        if state not in (None, "open", "closed"):
            raise BadQuery(f"state must be open or closed, got {state[:40]!r}")
        limit = _limit(request)
        settings = self.ctx.settings
        now, rows = await self._query_now(
            lambda store, now: figures.batches(store, settings, now, state=state, limit=limit)
        )
        return json_response({"now": now, "batches": rows})

    async def api_batch(self, request: Request) -> Response:
        batch_id = request.path_params["batch_id"]
        settings = self.ctx.settings
        try:
            now, data = await self._query_now(
                lambda store, now: figures.batch_detail(store, settings, batch_id, now)
            )
        except NotFound as exc:
            return json_response({"error": str(exc)}, 404)
        return json_response({"now": now, **data})

    async def api_events(self, request: Request) -> Response:
        limit = _limit(request)
        now, rows = await self._query_now(lambda store, _: figures.events(store, limit=limit))
        return json_response({"now": now, "events": rows})

    async def api_dead_letters(self, request: Request) -> Response:
        limit = _limit(request)
        now, rows = await self._query_now(
            lambda store, _: [figures.dead_letter_dict(d) for d in store.dead_letters(limit=limit)]
        )
        return json_response({"now": now, "dead_letters": rows})

    async def api_stats(self, request: Request) -> Response:
        _, data = await self._query_now(figures.overview)
        letters = await self._query(
            lambda store: [figures.dead_letter_dict(d) for d in store.dead_letters(limit=5)]
        )
        rules = self.ctx.settings.grouping()
        data.update(
            series=self.ctx.reader.series.as_list(),
            interval=self.ctx.reader.interval,
            dead_letters=letters,
            step_errors=self.ctx.step_errors(),
            ingest=self.ctx.source is not None,
            rules={"prefix_depth": rules.prefix_depth,
                   "threshold_duration": rules.threshold_duration,
                   "threshold_event_count": rules.threshold_event_count,
                   "max_batch_age": rules.max_batch_age},
        )
        return json_response(data)

    async def metrics(self, request: Request) -> Response:
        _, data = await self._query_now(figures.overview)
        data["step_errors"] = self.ctx.step_errors()
        return Response(self.ctx.metrics.render(data), media_type=CONTENT_TYPE)

    # -- ingest ------------------------------------------------------------------------
    async def ingest(self, request: Request) -> Response:
        if request.method == "HEAD":  # MinIO's reachability check, sent without credentials
            return Response(status_code=200)
        started = time.monotonic()
        response = await self._ingest(request)
        self.ctx.metrics.ingest_requests.labels(str(response.status_code)).inc()
        if response.status_code < 300:
            self.ctx.metrics.ingest_seconds.observe(time.monotonic() - started)
        return response

    async def _ingest(self, request: Request) -> Response:
        source = self.ctx.source
        assert source is not None
        if not bearer_ok(request.headers.get("authorization"), self.ctx.token):
            return self._unauthorized()
        body = await _read_limited(request, self.ctx.settings.serve_max_body)
        if body is None:
            return json_response(
                {"error": f"body larger than serve_max_body "
                          f"({self.ctx.settings.serve_max_body} bytes)"}, 413)
        remote = request.client.host if request.client else ""
        try:
            # (decoding a large body takes a while: off the event loop, so that the
            # dashboard and other requests are served meanwhile)
            future = await run_in_threadpool(source.submit, body, remote=remote)
            result: IngestResult = await asyncio.wait_for(
                asyncio.shield(asyncio.wrap_future(future)), self.ctx.commit_timeout
            )
        except (SourceClosed, queue.Full) as exc:
            return json_response({"error": f"not accepted now, retry later: {exc}"},
                                 503, {"Retry-After": "5"})
        except TimeoutError:
            return json_response({"error": "not committed in time; retry later "
                                           "(a repeated event is recognised as a duplicate)"},
                                 503, {"Retry-After": "5"})
        if result.error is not None:
            return json_response({"error": result.error, "kept": "dead-letter store"}, 400)
        if result.rejected and not result.events and not result.ignored:
            return json_response({"error": "; ".join(result.rejected),
                                  "kept": "dead-letter store"}, 400)
        return json_response({"events": result.events, "ignored": result.ignored,
                              "rejected": result.rejected})


class BadQuery(ValueError):
    """A query parameter the API cannot use (answered with 400 and this message)."""


def _limit(request: Request, default: int = 50, maximum: int = 1000) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return default
    # isascii: str.isdigit() also accepts digits such as '²' that int() refuses
    if not (raw.isascii() and raw.isdigit() and 1 <= int(raw) <= maximum):
        raise BadQuery(f"limit must be an integer from 1 to {maximum}, got {raw[:40]!r}")
    return int(raw)


async def _read_limited(request: Request, limit: int) -> bytes | None:
    """The request body, or None as soon as it proves longer than ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


__all__ = ["WebContext", "create_app", "json_response"]
