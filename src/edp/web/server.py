"""``edp serve`` put together: the engine's daemon thread, the reader thread, uvicorn.

The daemon thread owns the engine's store and runs :class:`~edp.daemon.Daemon` over
the ingest endpoint's :class:`~edp.sources.http.HttpSource` (and any other source,
such as a watched folder); its loop also fires due batches on time and relays the
outbox, so quiet periods end without traffic. The web app reads through a
:class:`~edp.web.reader.StoreReader`. Only loopback binds may go without
``serve_token``; then a random token is made for ``/ingest`` and shown once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import signal
import socket
import threading
import time
from collections.abc import Sequence
from types import FrameType

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from edp.bootstrap import Runtime, build_observers, build_runtime
from edp.config import Settings
from edp.daemon import Daemon, Source
from edp.errors import ConfigError, EdpError
from edp.net import is_loopback
from edp.sinks.base import Sink
from edp.sources.http import HttpSource
from edp.web.app import WebContext, create_app
from edp.web.reader import StoreReader

log = logging.getLogger(__name__)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with two bounds uvicorn lacks, so that holding
    connections open (sending nothing, or a request head a byte at a time) cannot
    take the server down without a token:

    * a request's head must be complete within ``head_timeout`` seconds of the
      connection's start (or of the previous response on a kept-alive connection),
      else the connection is closed;
    * at most ``max_connections`` are open at once; one more is answered 503 and
      closed at once.
    """

    head_timeout = 10.0
    max_connections = 1000
    _warned_at = -math.inf
    _head_timer: asyncio.TimerHandle | None = None
    _armed_cycle: object = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            now = time.monotonic()
            if now - GuardedH11Protocol._warned_at > 60:  # (once a minute: a flood)
                GuardedH11Protocol._warned_at = now
                log.warning("edp serve: %d connections open, refusing more",
                            len(self.connections) - 1)
            transport.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n"
                            b"retry-after: 5\r\nconnection: close\r\n\r\n")
            transport.close()
            return
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._armed_cycle = self.cycle
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_late)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if self._head_timer is not None and self.cycle is not self._armed_cycle:
            self._disarm()  # a request's head arrived: the app's own bounds apply now

    def on_response_complete(self) -> None:
        answered = self.cycle
        super().on_response_complete()  # (may start a pipelined request at once)
        if not self.transport.is_closing() and self.cycle is answered:
            self._arm()  # waiting for the next request's head

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


MIN_EXPOSED_TOKEN = 16
"""Shortest ``serve_token`` accepted when the server is reachable from other hosts."""


def resolve_token(settings: Settings, host: str) -> tuple[str, bool]:
    """The bearer token, and whether it was made up now (loopback without ``serve_token``).

    Raises :class:`ConfigError` for a non-loopback bind without ``serve_token``.
    """
    if settings.serve_token is not None:
        token = settings.serve_token.get_secret_value()
        if not is_loopback(host) and len(token) < MIN_EXPOSED_TOKEN:
            raise ConfigError(
                f"edp serve: binding {host} exposes the server; serve_token must be at least "
                f"{MIN_EXPOSED_TOKEN} characters, got {len(token)} (use a long random secret, "
                "e.g. python -c 'import secrets; print(secrets.token_urlsafe(24))')"
            )
        return token, False
    if not is_loopback(host):
        raise ConfigError(
            f"edp serve: binding {host} exposes the server; set serve_token "
            "(EDP_SERVE_TOKEN or the config file) to a long random secret, or bind 127.0.0.1"
        )
    return secrets.token_urlsafe(24), True


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket (``port`` 0: any free port); ConfigError when it cannot bind."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"edp serve: cannot listen on {host}:{port}: {exc}") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


def loopback_host_names(bound: str) -> list[str]:
    """The ``Host`` names a browser sends to a server bound to loopback address ``bound``
    (an IPv6 literal in brackets, as in ``http://[::1]:8080/``); any other name is a
    DNS-rebinding attempt."""
    names = ["127.0.0.1", "localhost", "[::1]"]
    own = f"[{bound}]" if ":" in bound else bound.lower()
    return names if own in names or not own else [*names, own]


class ServeStack:
    """Everything ``edp serve`` runs, startable in the foreground or in a background thread."""

    def __init__(
        self,
        settings: Settings,
        *,
        host: str | None = None,
        port: int | None = None,
        database_url: str | None = None,
        sinks: Sequence[Sink] | None = None,
        stdout: bool = False,
        sources: Sequence[Source] = (),
        sample_interval: float = 5.0,
        worker_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.daemon: Daemon | None = None
        self.host = host or settings.serve_host
        self.token, self.token_generated = resolve_token(settings, self.host)
        self.url_db = database_url or settings.database_url
        self.reader = StoreReader(self.url_db, settings, interval=sample_interval,
                                  extra_errors=self.step_errors)
        self.sock = bind(self.host, settings.serve_port if port is None else port)
        self.port: int = self.sock.getsockname()[1]
        self.source = HttpSource(chunk=min(500, settings.chunk_size),
                                 backlog_idle=settings.serve_backlog_idle)
        self.sources: list[Source] = [self.source, *sources]
        self._sinks, self._stdout = sinks, stdout
        self.worker_id = worker_id or settings.worker_id or (
            f"serve-{socket.gethostname()}-{self.port}"
        )
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._engine_error: BaseException | None = None
        self._daemon_thread: threading.Thread | None = None
        self._server_thread: threading.Thread | None = None
        loopback = is_loopback(self.host)
        self.app = create_app(WebContext(
            settings=settings, reader=self.reader, token=self.token, source=self.source,
            protect_reads=not loopback,
            allowed_hosts=loopback_host_names(self.host) if loopback else None,
            step_errors=self.step_errors,
        ))
        self.server = uvicorn.Server(uvicorn.Config(
            self.app, log_level="warning", access_log=False, lifespan="off",
            server_header=False, proxy_headers=False, http=GuardedH11Protocol,
        ))

    @property
    def url(self) -> str:
        """The base URL of the server."""
        host = f"[{self.host.strip('[]')}]" if ":" in self.host.strip("[]") else self.host
        return f"http://{host}:{self.port}"

    def step_errors(self) -> int:
        """Failed engine steps in this process."""
        return self.daemon.stats.errors if self.daemon is not None else 0

    # -- life cycle --------------------------------------------------------------------
    def start_engine(self) -> None:
        """Start the daemon thread (it opens and migrates the store) and the reader."""
        self._daemon_thread = threading.Thread(target=self._run_daemon, name="edp-daemon",
                                               daemon=True)
        self._daemon_thread.start()
        self._ready.wait(timeout=120)
        if self._startup_error is not None:
            self.sock.close()
            raise self._startup_error
        if not self._ready.is_set():
            raise EdpError("edp serve: the engine did not start within 120 s")
        self.reader.start()

    def serve_forever(self) -> None:
        """Start the engine, serve in this thread until SIGINT/SIGTERM, then stop everything."""
        self.start_engine()

        def exit_gracefully(signum: int, _frame: FrameType | None) -> None:
            log.info("signal %d: stopping", signum)
            self.server.should_exit = True

        # uvicorn re-raises the signal that stopped it once it restored the handlers it
        # found; these make that re-raise harmless, so the engine still stops cleanly.
        previous = {sig: signal.signal(sig, exit_gracefully)
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.server.run(sockets=[self.sock])
        finally:
            self._stop_engine()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if self._engine_error is not None:  # (the engine ended, not a signal)
            raise self._engine_error

    def start_background(self, timeout: float = 30.0) -> None:
        """Start the engine and serve from a background thread (tests, the demo)."""
        self.start_engine()
        self._server_thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, name="edp-http", daemon=True
        )
        self._server_thread.start()
        stop = threading.Event()
        while not self.server.started and self._server_thread.is_alive():
            stop.wait(0.02)
            timeout -= 0.02
            if timeout <= 0:
                raise EdpError("edp serve: the HTTP server did not start")

    def stop(self) -> None:
        """Stop serving, finish the current step, flush the outbox, close the stores."""
        self.server.should_exit = True
        if self._server_thread is not None:
            self._server_thread.join(timeout=15)
        self._stop_engine()

    def _stop_engine(self) -> None:
        self.sock.close()  # uvicorn closed it if it served; else it was never used
        if self.daemon is not None:
            self.daemon.stop()
            self.source.interrupt()
        if self._daemon_thread is not None:
            self._daemon_thread.join(timeout=30)
            self._daemon_thread = None
        self.reader.close()

    def _run_daemon(self) -> None:
        runtime: Runtime | None = None
        try:
            runtime = build_runtime(self.settings, database_url=self.url_db, sinks=self._sinks,
                                    stdout=self._stdout, worker_id=self.worker_id,
                                    observers=build_observers(self.settings))
            self.daemon = Daemon(runtime, self.sources, max_wait=1.0)
        except BaseException as exc:  # noqa: BLE001  (re-raised in the starting thread)
            self._startup_error = exc
            if runtime is not None:
                runtime.close()
            for source in self.sources:
                source.close()
            return
        finally:
            self._ready.set()
        try:
            self.daemon.run()
        except BaseException as exc:  # noqa: BLE001  (re-raised by serve_forever)
            # Without its engine the server would answer /healthz and take bodies that
            # nothing commits (503 after 30 s, forever): it stops, and says why (a worker
            # id in use by another process, found at start or at a later check).
            self._engine_error = exc
            self.server.should_exit = True
        finally:
            runtime.close()


__all__ = ["ServeStack", "bind", "resolve_token"]
