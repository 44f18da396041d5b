"""The input of the packager: a ``package-objects-ready`` event, parsed at the edge.

Accepted shapes (one message each): the EventBridge envelope of SPEC section 5;
the same inside an SNS envelope (``"Message"``) or an SQS message (``"Body"``,
as ReceiveMessage returns it, or ``"body"`` in a Lambda SQS record); or its bare
``detail`` object. Anything else is an :class:`~edp.quilt.errors.InvalidRequest`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from edp.core.envelopes import BATCH_EVENT
from edp.errors import is_unicode, plural
from edp.quilt.errors import InvalidRequest

DETAIL_TYPE = BATCH_EVENT


@dataclass(frozen=True, slots=True)
class BatchRequest:
    """The facts of one batch to package."""

    bucket: str
    prefix: str
    object_count: int | None = None
    trigger: str | None = None
    batch_id: str | None = None
    event_id: str | None = None
    time: str | None = None
    first_event_time: str | None = None
    last_event_time: str | None = None

    @property
    def source(self) -> str:
        """``s3://bucket/prefix``."""
        return f"s3://{self.bucket}/{self.prefix}"

    def facts(self) -> dict[str, Any]:
        """The batch facts as stored in the package metadata (``edp`` key)."""
        return {
            "bucket": self.bucket,
            "prefix": self.prefix,
            "object-count": self.object_count,
            "trigger": self.trigger,
            "batch-id": self.batch_id,
            "event-id": self.event_id,
            "first-event-time": self.first_event_time,
            "last-event-time": self.last_event_time,
        }

    def fields(self) -> dict[str, Any]:
        """The facts for text templates (README, message): snake_case names."""
        return {
            "bucket": self.bucket,
            "prefix": self.prefix,
            "source": self.source,
            "object_count": "?" if self.object_count is None else self.object_count,
            "files": ("? files" if self.object_count is None
                      else plural(self.object_count, "file")),
            "trigger": self.trigger or "-",
            "batch_id": self.batch_id or "-",
            "event_id": self.event_id or "-",
            "first_event_time": self.first_event_time or "-",
            "last_event_time": self.last_event_time or "-",
        }


def _json(body: bytes | str | dict[str, Any], what: str) -> dict[str, Any]:
    if isinstance(body, dict):
        return body
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"{what} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidRequest(f"{what} is JSON but not an object")
    return value


def _unwrap(message: dict[str, Any]) -> dict[str, Any]:
    for _ in range(3):  # SQS -> SNS -> EventBridge at most
        if isinstance(message.get("Body"), str):
            message = _json(message["Body"], "the SQS message body")
        elif isinstance(message.get("body"), str) and message.get("eventSource") == "aws:sqs":
            message = _json(message["body"], "the SQS record body")
        elif message.get("Type") == "Notification" and isinstance(message.get("Message"), str):
            message = _json(message["Message"], "the SNS message")
        else:
            break
    return message


def _optional_int(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"detail.object-count must be an integer, got {value!r}")
    return value


def _optional_text(detail: dict[str, Any], name: str) -> str | None:
    value = detail.get(name)
    return None if value is None else str(value)


def parse_request(body: bytes | str | dict[str, Any]) -> BatchRequest:
    """One input message -> :class:`BatchRequest`, or :class:`InvalidRequest` saying why
    (carrying the identifiers the input gave, as text)."""
    message = _unwrap(_json(body, "the message"))
    if isinstance(message.get("Records"), list) and "detail" not in message:
        raise InvalidRequest(
            f"a 'Records' list of {len(message['Records'])} messages (an S3 notification or "
            "a Lambda SQS event) is not one package-objects-ready event: give one message "
            "per input")
    try:
        return _parse(message)
    except InvalidRequest as exc:
        given = message.get("detail")
        detail: dict[str, Any] = given if isinstance(given, dict) else message
        exc.bucket = _text(detail.get("bucket")) or ""
        exc.prefix = _text(detail.get("prefix")) or ""
        exc.batch_id = _text(detail.get("batch-id"))
        exc.event_id = (_text(_event_id(message, detail)) if "detail" in message
                        else None)
        raise


def _event_id(message: dict[str, Any], detail: dict[str, Any]) -> Any:
    """edp's stable id of a batch event: the detail's ``event-id`` when it has one (an
    event published to EventBridge, which gives each delivery an ``id`` of its own),
    else the envelope's ``id``."""
    given = detail.get("event-id")
    return given if isinstance(given, str) and given else message.get("id")


def _text(value: Any) -> str | None:
    """``value`` when it is text a report can hold (UTF-8, no NUL), else None."""
    if not isinstance(value, str) or "\x00" in value or not is_unicode(value):
        return None
    return value


def _parse(message: dict[str, Any]) -> BatchRequest:
    if "detail" in message or "detail-type" in message:
        kind = message.get("detail-type")
        if kind != DETAIL_TYPE:
            raise InvalidRequest(f"detail-type is {kind!r}, not {DETAIL_TYPE!r}")
        detail = message.get("detail")
        if not isinstance(detail, dict):
            raise InvalidRequest("the event has no detail object")
        event_id = _event_id(message, detail)
        time = message.get("time")
    else:
        detail, event_id, time = message, None, None
    bucket = detail.get("bucket")
    prefix = detail.get("prefix")
    if not isinstance(bucket, str) or not bucket:
        raise InvalidRequest("detail.bucket is missing or not a string")
    if bucket in {".", ".."} or any(c in bucket for c in "/\\\x00"):
        # A bucket is one folder of a local registry root: it must not name another place.
        raise InvalidRequest(f"detail.bucket {bucket!r} is not a bucket name")
    if not isinstance(prefix, str):
        raise InvalidRequest(f"detail.prefix is missing or not a string (bucket {bucket})")
    if any(part in {".", ".."} for part in prefix.split("/")):
        raise InvalidRequest(f"detail.prefix {prefix!r} has '.' or '..' segments (bucket {bucket})")
    if _text(bucket) is None or (_text(prefix) is None and "\x00" not in prefix):
        raise InvalidRequest("detail.bucket or detail.prefix is not valid Unicode text "
                             "(a lone surrogate)")
    if "\x00" in prefix:  # (no S3 key holds one, and no path can)
        raise InvalidRequest(f"detail.prefix {prefix!r} contains a NUL character "
                             f"(bucket {bucket})")
    return BatchRequest(
        bucket=bucket,
        prefix=prefix,
        object_count=_optional_int(detail.get("object-count")),
        trigger=_optional_text(detail, "trigger"),
        batch_id=_optional_text(detail, "batch-id"),
        event_id=None if event_id is None else str(event_id),
        time=None if time is None else str(time),
        first_event_time=_optional_text(detail, "first-event-time"),
        last_event_time=_optional_text(detail, "last-event-time"),
    )


__all__ = ["DETAIL_TYPE", "BatchRequest", "parse_request"]
