"""The ingest endpoint's source: S3-format notifications POSTed by MinIO, Ceph RGW & co.

The web app (:mod:`edp.web.app`) hands each request body to :meth:`HttpSource.submit`
and awaits the returned future; the daemon's loop takes the queued bodies with
:meth:`HttpSource.receive`, runs them through the engine in one step and
acknowledges them, which resolves the futures. So a request is answered only
after its events are committed (a webhook that gets a 2xx may forget them).

A body of no known format is still processed: the engine keeps it in the
dead-letter store, and the request is answered 400 with the decoder's message.
The verdict comes from the same decoder the engine runs, applied once more to the
body here (it is a pure function), since the daemon's ``ack`` sees no step report.

**Backlogs.** A webhook sends one body at a time and waits for its answer, so the
queue is empty between two bodies even while a sender re-sends an hour of old
events. Reporting "caught up" then would move the clock to the wall clock after
every body (SPEC section 4): the first old file's batch would fire alone and every
later one would join a batch kept open by the wall clock. So the source counts as
behind from a body holding an event more than :data:`BACKLOG_LAG` seconds older
than the wall clock until :data:`BACKLOG_IDLE` seconds after the last such
body: the engine then batches the backlog by its own times, as a replay
would, and a receive waits (rather than spins) meanwhile. The source also starts
behind, for as long: after a restart, senders re-send what they queued meanwhile.
A backlog that arrives after that, at a worker already caught up, is applied at the
worker's clock (the wall clock: it never goes back, SPEC section 4).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import cast

from edp.daemon import Received
from edp.decode import decode_message
from edp.engine import BACKLOG_LAG, Message
from edp.errors import DecodeError, EdpError, list_reasons

log = logging.getLogger(__name__)

BACKLOG_IDLE = 2.0
"""Seconds without a body after a backlog body before the source is caught up."""


def bearer_ok(header: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header carries ``token`` (constant-time compare).

    ``Bearer <token>`` (MinIO's ``auth_token``), or ``Basic`` credentials whose password
    is the token (for stores that can only put ``user:password@`` in an endpoint URL).
    """
    if not header:
        return False
    # (only HTTP's own whitespace: str.strip() would also take U+0085 and U+00A0,
    # which are bytes of a UTF-8 token read as Latin-1)
    scheme, _, given = header.strip(" \t").partition(" ")
    given = given.strip(" \t")
    if scheme.lower() == "basic":
        try:
            raw = base64.b64decode(given, validate=True).partition(b":")[2]
        except binascii.Error:
            return False
    elif scheme.lower() == "bearer":
        try:
            # The header's bytes, as sent: ASGI servers hand headers over read as
            # Latin-1, while clients send a non-ASCII token as UTF-8.
            raw = given.encode("latin-1")
        except UnicodeEncodeError:  # (a caller that decoded them otherwise)
            raw = given.encode()
    else:
        return False
    return hmac.compare_digest(raw, token.encode())


@dataclass(slots=True)
class IngestResult:
    """The outcome of one ingested body, once the engine committed it."""

    events: int = 0
    ignored: int = 0
    rejected: list[str] = field(default_factory=list)
    error: str | None = None
    """Set when the whole body was of no known format (answered 400)."""


@dataclass(slots=True)
class _Ticket:
    message: Message
    verdict: IngestResult
    future: Future[IngestResult]
    oldest: float | None = None
    """The time of the body's oldest object event (None: it has none)."""


class SourceClosed(EdpError):
    """The ingest source stopped before a body was committed; the sender should retry."""


class HttpSource:
    """A daemon source fed by HTTP requests (thread-safe :meth:`submit`)."""

    def __init__(self, *, name: str = "http", chunk: int = 500, max_queue: int = 10_000,
                 max_bytes: int = 64 * 1024 * 1024, backlog_lag: float = BACKLOG_LAG,
                 backlog_idle: float = BACKLOG_IDLE,
                 clock: Callable[[], float] = time.time) -> None:
        self.name = name
        self.backlog_lag, self.backlog_idle, self.clock = backlog_lag, backlog_idle, clock
        # (time.monotonic()) A source starts behind: a sender that queued bodies while
        # edp was down (MinIO's queue_dir, a webhook's retries) re-sends them now.
        self._behind_until = time.monotonic() + backlog_idle
        self.chunk = chunk
        self._queue: queue.Queue[_Ticket | None] = queue.Queue(maxsize=max_queue)
        # Bodies waiting, in bytes: many large ones at once must not fill the memory (one
        # is always taken, so any body the server accepts can get in).
        self.max_bytes = max_bytes
        self._bytes = 0
        self._closed = threading.Event()
        self._inflight: Received | None = None
        self._count = 0
        self._lock = threading.Lock()

    def submit(self, body: bytes, *, remote: str = "") -> Future[IngestResult]:
        """Queue one body for the engine; the future resolves once it is committed.

        Raises :class:`SourceClosed` when the source no longer takes bodies, and
        ``queue.Full`` when too many, or too many bytes, are waiting (answer 503).
        """
        if self._closed.is_set():
            raise SourceClosed("the ingest source is stopping")
        with self._lock:
            if self._bytes and self._bytes + len(body) > self.max_bytes:
                raise queue.Full(f"overloaded: {self._bytes} bytes of bodies not yet "
                                 f"committed, at most {self.max_bytes}")
            self._bytes += len(body)
            self._count += 1
            number = self._count
        location = f"request {number}" + (f" from {remote}" if remote else "")
        verdict = IngestResult()
        oldest = None
        try:
            decoded = decode_message(body, location=location)
        except DecodeError as exc:
            verdict.error = str(exc)
        else:
            verdict.events = len(decoded.events)
            verdict.ignored = sum(decoded.ignored.values())
            verdict.rejected = list_reasons([str(error) for error in decoded.errors])
            oldest = min((event.time for event in decoded.events), default=None)
        ticket = _Ticket(Message(body, location, source=self.name), verdict, Future(), oldest)
        try:
            self._queue.put_nowait(ticket)
        except queue.Full:
            self._release([ticket])
            raise queue.Full(f"overloaded: {self._queue.maxsize} bodies waiting for the "
                             "engine") from None
        return ticket.future

    def _release(self, tickets: list[_Ticket]) -> None:
        """Their bodies are no longer held: answered, or given back to their senders
        (a body taken by a step still counts until its step committed)."""
        size = sum(len(cast(bytes, t.message.body)) for t in tickets)
        with self._lock:
            self._bytes -= size

    def receive(self, *, wait: float) -> Received:
        """The queued bodies (at most ``chunk``), waiting up to ``wait`` for the first
        (while the source is behind, until it is caught up: see the module's doc)."""
        if self._inflight is not None:  # the last step failed: the same bodies again
            return self._inflight
        wait = max(wait, self._behind_until - time.monotonic())
        taken: list[_Ticket | None] = []
        try:
            taken.append(self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait())
            while len(taken) < self.chunk and taken[-1] is not None:
                taken.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        tickets = [t for t in taken if t is not None]
        oldest = min((t.oldest for t in tickets if t.oldest is not None), default=None)
        if oldest is not None and oldest < self.clock() - self.backlog_lag:
            self._behind_until = time.monotonic() + self.backlog_idle
        caught_up = self._queue.empty() and time.monotonic() >= self._behind_until
        received = Received([t.message for t in tickets], caught_up=caught_up,
                            receipts=tickets)
        with self._lock:  # against close() from another thread (several sources)
            closed = self._closed.is_set()
            if tickets and not closed:
                self._inflight = received
        if closed:
            self._release(tickets)
            for ticket in tickets:
                _resolve(ticket.future, SourceClosed("edp stopped before committing"))
            return Received([], caught_up=True)
        return received

    def ack(self, received: Received) -> None:
        """The engine committed these bodies: answer their requests."""
        self._release(list(received.receipts))
        for ticket in received.receipts:
            _resolve(ticket.future, ticket.verdict)
        if received is self._inflight:
            self._inflight = None

    def interrupt(self) -> None:
        """Wake a :meth:`receive` that is waiting (the daemon is stopping)."""
        with contextlib.suppress(queue.Full):  # a full queue does not wait anyway
            self._queue.put_nowait(None)

    def close(self) -> None:
        """Take no more bodies; fail the requests still waiting (the sender retries)."""
        with self._lock:
            self._closed.set()
            pending = list(self._inflight.receipts) if self._inflight is not None else []
            self._inflight = None
        self._release(pending)
        while True:
            try:
                ticket = self._queue.get_nowait()
            except queue.Empty:
                break
            if ticket is not None:
                pending.append(ticket)
                self._release([ticket])
        for ticket in pending:
            _resolve(ticket.future, SourceClosed("edp stopped before committing"))


def _resolve(future: Future[IngestResult], outcome: IngestResult | Exception) -> None:
    """Answer a waiting request, unless it gave up meanwhile (timed out, disconnected)."""
    try:
        if isinstance(outcome, Exception):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
    except InvalidStateError:
        pass


__all__ = ["HttpSource", "IngestResult", "SourceClosed", "bearer_ok"]
