"""The webhook sink: each outbox event POSTed as JSON to a URL.

The body is the event JSON exactly as stored. Headers:

* ``X-Edp-Event-Id``: the stable event id (the same on every retry), to deduplicate;
* ``X-Edp-Signature: sha256=<hex>``: HMAC-SHA256 of the body with ``webhook_secret``
  (absent when no secret is configured). A receiver recomputes it over the raw
  body and compares with :func:`hmac.compare_digest`.

Credentials in the URL (``https://user:password@host/...``) are sent as HTTP Basic
authentication (``Authorization``), never as part of the address.

A 2xx answer delivers. 408, 429 and 5xx answers, timeouts and connection errors
are retried by the relay (backoff with jitter); any other answer (4xx, or a
redirect: edp does not follow them) is permanent and parks the event. Neither the
secret nor credentials or query strings of the URL are ever logged.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import http.client
import logging
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from edp.config import http_url_problem
from edp.errors import ConfigError
from edp.net import is_loopback
from edp.redact import redact_endpoint
from edp.sinks.base import Failure
from edp.store.base import OutboxEntry

log = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 429})
USER_AGENT = "edp-webhook/1"


def signature(body: bytes, secret: str) -> str:
    """The ``X-Edp-Signature`` header value of ``body``."""
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer, not an instruction: a POST must not turn into a GET."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class _Deadline:
    """The sockets one POST opens, and whether its deadline passed: past it, those
    already open are cut and any opened later is cut at once (a deadline that passed
    during a name lookup, a connect or a TLS handshake still holds)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.passed = False
        self.sockets: list[socket.socket] = []

    def expire(self) -> None:
        """The deadline's timer: cut every socket of the POST."""
        with self.lock:
            self.passed = True
            sockets = list(self.sockets)
        for sock in sockets:
            _cut(sock)

    def opened(self, sock: socket.socket) -> None:
        """A socket of the POST: closed at once, with an error, if the deadline passed
        already."""
        with self.lock:
            self.sockets.append(sock)
            passed = self.passed
        if passed:
            _cut(sock)
            sock.close()
            raise TimeoutError("the POST's deadline passed")


def _cut(sock: socket.socket) -> None:
    # The plain socket's shutdown, also for a TLS one: SSLSocket.shutdown would unwrap it
    # under the thread using it. Shutting down wakes a recv blocked in that thread.
    with contextlib.suppress(OSError):  # (closed, or detached by the TLS wrap)
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _Current(threading.local):
    """The deadline of the POST this thread is making, if any."""

    deadline: _Deadline | None = None


_current = _Current()


def _recorded(base: type[http.client.HTTPConnection]) -> type[http.client.HTTPConnection]:
    class Recorded(base):  # type: ignore[valid-type,misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            deadline = _current.deadline
            create: Callable[..., socket.socket] = self._create_connection  # type: ignore[has-type]

            def create_connection(*a: Any, **k: Any) -> socket.socket:
                sock = create(*a, **k)
                if deadline is not None:  # (the TCP socket: before a TLS handshake)
                    deadline.opened(sock)
                return sock

            self._create_connection = create_connection
            self._deadline = deadline

        def connect(self) -> None:
            super().connect()
            if self._deadline is not None and self.sock is not None:
                self._deadline.opened(self.sock)  # (the TLS socket, wrapped around it)

    return Recorded


class _Http(urllib.request.HTTPHandler):
    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_recorded(http.client.HTTPConnection), req)


class _Https(urllib.request.HTTPSHandler):
    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(_recorded(http.client.HTTPSConnection), req,
                            context=self._context)  # type: ignore[attr-defined]


def post_opener() -> urllib.request.OpenerDirector:
    """An opener for webhook POSTs: redirects are answers (3xx), never followed; the
    sockets it opens are known, so that :func:`post` can cut them at its deadline."""
    return urllib.request.build_opener(_NoRedirect(), _Http(), _Https())


def post(
    opener: urllib.request.OpenerDirector, url: str, body: bytes, headers: dict[str, str],
    timeout: float,
) -> int:
    """POST ``body`` once and return the HTTP status (an error status too).

    The whole exchange takes at most ``timeout`` seconds (with :func:`post_opener`'s
    opener): an endpoint that answers a byte at a time is cut off then, rather than
    hold the worker (a socket timeout alone bounds each read, not their sum).

    Raises :class:`urllib.error.URLError` or :class:`OSError` when no usable answer came
    (no connection, a timeout, or an answer that is not HTTP). ``url`` must be http(s)
    (callers check it once, up front, with :func:`check_url`).
    """
    url, authorization = _without_credentials(url)
    if authorization is not None:
        headers = {**headers, "Authorization": authorization}
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")  # noqa: S310
    deadline = _Deadline()
    _current.deadline = deadline
    timer = threading.Timer(timeout, deadline.expire)
    timer.daemon = True
    timer.start()
    try:
        with opener.open(request, timeout=timeout) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code
    except (http.client.HTTPException, OSError) as exc:
        if deadline.passed:
            raise urllib.error.URLError(f"no whole answer within {timeout:g}s") from None
        if isinstance(exc, http.client.HTTPException):  # a garbled or cut answer
            raise urllib.error.URLError(type(exc).__name__) from None
        raise
    finally:
        timer.cancel()
        _current.deadline = None


def _without_credentials(url: str) -> tuple[str, str | None]:
    """``url`` without its user info, and the ``Authorization`` header that carries it
    (urllib would take ``user:password@host`` for the host name, and look it up)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, None
    userinfo, _, host = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    token = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode()
    return urlunsplit(parts._replace(netloc=host)), f"Basic {token}"


def check_url(url: str, setting: str) -> None:
    """Refuse, at start, a URL that ``post`` could never use (settings are checked when
    loaded; this guards a sink built by other code)."""
    problem = http_url_problem(url)
    if problem is not None:
        raise ConfigError(f"{setting} {problem}")
    parts = urlsplit(url)
    if parts.scheme == "http" and "@" in parts.netloc and not is_loopback(parts.hostname or ""):
        # (sent as HTTP Basic authentication: readable by anyone on the way)
        log.warning("%s %s: its credentials go over plain http, unencrypted; use https",
                    setting, redact_endpoint(url))


def is_retryable(status: int) -> bool:
    """Whether an HTTP answer may go away on a later attempt (5xx, 408, 429)."""
    return status >= 500 or status in RETRYABLE_STATUS


class WebhookSink:
    """POSTs outbox events to an HTTP(S) endpoint."""

    name = "webhook"

    def __init__(self, url: str, *, secret: str | None = None, timeout: float = 10.0) -> None:
        check_url(url, "webhook_url")
        self.url = url
        # One POST per event, each up to ``timeout``: a page must fit in the PostgreSQL
        # store's delivery lease (60 s by default), or another relay would take it too.
        self.max_page = max(1, int(45 // max(timeout, 0.001)))
        self.where = redact_endpoint(url)  # a chat webhook's path is its token
        self._secret = secret
        self.timeout = timeout
        self._opener = post_opener()
        if secret is None:
            log.warning("webhook %s: no webhook_secret set, events are sent unsigned", self.where)

    def send(self, entries: Sequence[OutboxEntry]) -> Sequence[Failure]:
        """POST each entry in order; stop at the first failure that a retry may fix."""
        failures: list[Failure] = []
        for index, entry in enumerate(entries):
            failure = self._post(entry)
            if failure is None:
                continue
            failures.append(failure)
            if not failure.permanent:
                # Keep the order: the rest waits for this one's retry.
                failures += [Failure(e.event_id, "not sent: an earlier event failed")
                             for e in entries[index + 1:]]
                break
        return failures

    def _post(self, entry: OutboxEntry) -> Failure | None:
        body = entry.payload.encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "X-Edp-Event-Id": entry.event_id,
        }
        if self._secret is not None:
            headers["X-Edp-Signature"] = signature(body, self._secret)
        try:
            # The scheme was checked in __init__: http or https only, never file:.
            status = post(self._opener, self.url, body, headers, self.timeout)
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            return Failure(entry.event_id, f"webhook {self.where}: {reason}")
        if 200 <= status < 300:
            return None
        permanent = not is_retryable(status)
        return Failure(entry.event_id, f"webhook {self.where}: HTTP {status}", permanent=permanent)


__all__ = ["WebhookSink", "check_url", "is_retryable", "post", "post_opener", "signature"]
