"""The EventBridge sink: ``PutEvents`` to a named bus.

Each outbox event (an EventBridge envelope, SPEC section 5) becomes one
``PutEvents`` entry: ``Source``, ``DetailType``, ``Detail``, ``Resources`` and
``Time`` from the envelope, ``EventBusName`` from the ``eventbridge_bus`` setting.
EventBridge gives every event its own ``id``; the stable id of the envelope is
added to the detail as ``event-id`` so that consumers can still deduplicate.

Limits (checked before sending): at most 10 entries per call, and an entry, as
EventBridge sizes it, below 256 KB; calls are also cut so that their total stays
below 256 KB. Errors:

* a per-entry ``InternalFailure``/``ThrottlingException`` (or a code not known to
  be final) -> retried by the relay with backoff and jitter;
* a per-entry validation or permission code, or an entry too large -> permanent:
  parked in the outbox (``edp batches reemit`` sends it again once fixed);
* the whole call failing (throttled, network down, bus missing) -> :class:`SinkError`
  for the entries not yet sent: the relay retries them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import orjson

from edp.aws import clients
from edp.aws.clients import aws_errors, error_code, region_of_arn
from edp.aws.clients import client as make_client
from edp.errors import ConfigError, SinkError
from edp.sinks._calls import Prepared, send_in_calls
from edp.sinks.base import Failure
from edp.store.base import OutboxEntry

log = logging.getLogger(__name__)

MAX_ENTRIES = 10
MAX_SIZE = 256 * 1024
"""Bytes, for one entry and for one call, as EventBridge counts them."""

PERMANENT_CODES = frozenset({
    "AccessDeniedException",
    "InvalidAccountIdException",
    "InvalidArgument",
    "MalformedDetail",
    "RedactionFailure",
    "NotAuthorizedForSourceException",
    "NotAuthorizedForDetailTypeException",
    "ValidationException",
})
"""Per-entry error codes that retrying will not fix (the others are retried)."""


def entry_size(entry: dict[str, Any]) -> int:
    """The size of a ``PutEvents`` entry as EventBridge computes it."""
    size = 14 if entry.get("Time") is not None else 0
    size += len(entry["Source"].encode()) + len(entry["DetailType"].encode())
    size += len(entry.get("Detail", "").encode())
    size += sum(len(r.encode()) for r in entry.get("Resources", ()))
    return size


def to_entry(payload: str, bus: str) -> dict[str, Any]:
    """The ``PutEvents`` entry of a stored envelope (``OutboxEntry.payload``)."""
    envelope = orjson.loads(payload)
    detail = dict(envelope.get("detail") or {})
    detail.setdefault("event-id", envelope["id"])
    entry: dict[str, Any] = {
        "Source": envelope["source"],
        "DetailType": envelope["detail-type"],
        "Detail": orjson.dumps(detail).decode(),
        "EventBusName": bus,
    }
    if envelope.get("resources"):
        entry["Resources"] = list(envelope["resources"])
    if envelope.get("time"):
        entry["Time"] = datetime.fromisoformat(envelope["time"])
    return entry


class EventBridgeSink:
    """Publishes outbox events to an EventBridge bus (name or ARN)."""

    name = "eventbridge"

    def __init__(self, bus: str, *, events: Any = None, fallback_region: str | None = None) -> None:
        self.bus = bus
        self._events = events
        self._fallback_region = fallback_region

    @property
    def events(self) -> Any:
        """The boto3 ``events`` client, made on first use."""
        if self._events is None:
            self._events = make_client(
                "events", region=region_of_arn(self.bus), fallback_region=self._fallback_region,
                read_timeout=clients.SINK_READ_TIMEOUT, max_attempts=0,
            )
        return self._events

    def check(self) -> None:
        """Fail early, with a clear message, when the bus does not exist; say so (a
        warning) when it cannot be checked (no events:DescribeEventBus: a least
        privilege role need not have it)."""
        try:
            self.events.describe_event_bus(Name=self.bus)
        except aws_errors() as exc:
            code = error_code(exc)
            # (a bus of another account, by ARN, may take events and not be described)
            if code == "ResourceNotFoundException" and not self.bus.startswith("arn:"):
                raise ConfigError(f"eventbridge_bus {self.bus!r} does not exist (in this "
                                  "region and account): create it, or fix the name") from None
            log.warning("eventbridge_bus %s could not be checked (%s); events are sent to "
                        "it anyway", self.bus, code or type(exc).__name__)

    def send(self, entries: Sequence[OutboxEntry]) -> Sequence[Failure]:
        """Send ``entries`` in calls of at most 10 entries and 256 KB."""
        return send_in_calls(
            entries, prepare=lambda outbox: to_entry(outbox.payload, self.bus),
            size_of=entry_size, call=self._put, service="EventBridge",
            max_entries=MAX_ENTRIES, max_size=MAX_SIZE,
        )

    def _put(self, call: list[Prepared]) -> list[Failure]:
        try:
            response = self.events.put_events(Entries=[entry for _, entry, _ in call])
        except aws_errors() as exc:
            code = error_code(exc)
            raise SinkError(
                f"EventBridge PutEvents to bus {self.bus} failed: {code or type(exc).__name__}: "
                f"{exc}"
            ) from exc
        failures: list[Failure] = []
        if not response.get("FailedEntryCount"):
            return failures
        for (outbox, _, _), result in zip(call, response.get("Entries", []), strict=False):
            code = result.get("ErrorCode")
            if not code:
                continue
            failures.append(Failure(
                outbox.event_id,
                f"EventBridge {code}: {result.get('ErrorMessage', '')}".strip(),
                permanent=code in PERMANENT_CODES,
            ))
        return failures



__all__ = ["EventBridgeSink", "entry_size", "to_entry"]
