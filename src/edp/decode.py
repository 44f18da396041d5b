"""Every input format of SPEC section 1 -> :class:`~edp.core.events.ObjectEvent`.

This is the only module that looks inside raw messages. Formats, outermost first:

* SQS message (``Body``, or ``body`` in a Lambda SQS record) -> the inner body;
* SNS envelope (``Type: Notification``, ``Message``) -> the inner message;
* Lambda event of SQS or SNS records (``Records`` with ``eventSource: aws:sqs`` /
  ``EventSource: aws:sns``) -> each record's inner message;
* S3 Event Notification (``Records`` with ``eventSource`` ``aws:s3``, ``minio:s3``,
  ``ceph:s3`` ...) -> one event per record;
* EventBridge S3 event (``source: aws.s3``) -> one event;
* S3 test event (``Event: s3:TestEvent``) -> nothing, and not an error.

Object keys are URL-decoded here and nowhere else (:func:`decode_key`).
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from functools import partial
from typing import Any
from urllib.parse import unquote_plus

import orjson

from edp.core.events import EventKind, ObjectEvent
from edp.errors import DecodeError, is_unicode

_MAX_NESTING = 5


class Decoded:
    """What one input message held: object events, S3 events it ignored (by type), errors."""

    __slots__ = ("errors", "events", "ignored")

    def __init__(self) -> None:
        self.events: list[ObjectEvent] = []
        # Shared empty values until something is ignored or fails (most messages): read
        # them, never change them in place; ignore() and fail() make them the message's own.
        self.ignored: dict[str, int] = _NONE_IGNORED
        self.errors: list[DecodeError] = _NO_ERRORS

    def ignore(self, kind: str) -> None:
        """Count one S3 event ignored for its type (a type S3 does not send: ``other``)."""
        kind = kind if kind in _KNOWN_IGNORED else _known_family(kind)
        if self.ignored is _NONE_IGNORED:
            self.ignored = {}
        self.ignored[kind] = self.ignored.get(kind, 0) + 1

    def fail(self, error: DecodeError) -> None:
        """Keep the error of one bad record among others."""
        if self.errors is _NO_ERRORS:
            self.errors = []
        self.errors.append(error)


_NONE_IGNORED: dict[str, int] = {}
_NO_ERRORS: list[DecodeError] = []


_KNOWN_IGNORED = frozenset({
    "s3:TestEvent",
    # EventBridge detail-types of S3 other than Object Created / Object Deleted
    "Object Restore Initiated", "Object Restore Completed", "Object Restore Expired",
    "Object Tags Added", "Object Tags Deleted", "Object ACL Updated",
    "Object Storage Class Changed", "Object Access Tier Changed",
})
_KNOWN_FAMILIES = frozenset({
    # S3 Event Notification names (``Family:Detail``) other than created and removed
    "ObjectRestore", "Replication", "LifecycleTransition", "IntelligentTiering",
    "ObjectTagging", "ObjectAcl", "ReducedRedundancyLostObject",
    "ObjectAccessed",  # MinIO's GET/HEAD notifications
})


def _known_family(kind: str) -> str:
    """A notification's family (``ObjectTagging:Put`` -> ``ObjectTagging``), or ``other``:
    counter names (and metric labels) must not grow with whatever a sender makes up."""
    family = kind.split(":", 1)[0]
    return family if family in _KNOWN_FAMILIES else "other"


def decode_key(raw: str, *, url_encoded: bool = True) -> str:
    """Decode an S3 object key as producers send it (form-URL-encoding: ``+`` is a space)."""
    if not url_encoded or ("%" not in raw and "+" not in raw):
        return raw
    return unquote_plus(raw)


_TIMES: dict[str, float] = {}
"""Parsed times: event times repeat a lot within a stream (second resolution)."""
_MINUTES: dict[str, float] = {}
"""Epoch seconds of ``YYYY-MM-DDTHH:MM``: a stream's times share their minute 60 at a time."""
_TIMES_MAX = 65536
_SECONDS = {f"{n:02d}": float(n) for n in range(60)}


def parse_time(value: Any, *, what: str) -> float:
    """An ISO 8601 UTC timestamp (``2022-12-08T20:01:34Z``, fractions allowed) -> epoch seconds."""
    if type(value) is str:
        cached = _TIMES.get(value)
        if cached is not None:
            return cached
        # S3's own form, YYYY-MM-DDTHH:MM:SSZ: the minute from a cache, the seconds added
        # (the minute was parsed by datetime once; "60" is no second, as for datetime).
        split = _s3_minute(value)
        if split is not None and split[0] in _MINUTES:
            return _MINUTES[split[0]] + split[1]
    if not isinstance(value, str) or not value:
        raise DecodeError(f"{what} is missing or not a string: {value!r}")
    parsed = _parse_time(value, what)
    if len(_TIMES) >= _TIMES_MAX:
        _TIMES.clear()
        _MINUTES.clear()
    _TIMES[value] = parsed
    split = _s3_minute(value)
    if split is not None and _S3_TIME.fullmatch(value):
        # (only a time of S3's form is its minute plus its seconds: datetime also takes
        # forms whose characters 16-19 are no seconds, such as "20221208T2001Z..:19Z",
        # which Python 3.11 reads as 20:01:00)
        _MINUTES[split[0]] = parsed - split[1]
    return parsed


_S3_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z")
"""S3's own form of a time: the only one whose minute is cached."""


def _s3_minute(value: str) -> tuple[str, float] | None:
    """``YYYY-MM-DDTHH:MM:SSZ`` as (its minute, its seconds), or None for another form."""
    if len(value) != 20 or value[19] != "Z" or value[16] != ":":
        return None
    second = _SECONDS.get(value[17:19])
    return None if second is None else (value[:16], second)


_NAIVE_TIME = re.compile(r"\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d(\.\d{1,9})?")
"""A time with no zone read as UTC: ``YYYY-MM-DDTHH:MM:SS`` and an optional fraction."""


FIRST_TIME = -62_135_596_800.0
"""0001-01-01T00:00:00Z: the first time the output format can hold."""


_ISO_TIME = re.compile(
    r"[0-9]{4}-?[0-9]{2}-?[0-9]{2}(?:[Tt ][0-9:.,]*)?(?: ?(?:[Zz]|[+-][0-9:]+))?"
)
"""The characters an ISO 8601 date and time may hold, in their places: checked before
``datetime.fromisoformat``, which (Python 3.11) takes any character between the date
and the time and ignores what follows some forms' zone (``11111111311Z\x00:19Z`` read
as 1111-11-11T11:00Z)."""


def _parse_time(value: str, what: str) -> float:
    if not _ISO_TIME.fullmatch(value):
        raise DecodeError(f"{what} is not an ISO 8601 time: {value!r}")
    try:
        # (RFC 3339 allows a lower-case "t" and "z"; datetime takes neither)
        lower = value.isascii() and ("z" in value or "t" in value)
        parsed = datetime.fromisoformat(value.upper() if lower else value)
    except ValueError:
        raise DecodeError(f"{what} is not an ISO 8601 time: {value!r}") from None
    if parsed.tzinfo is None:
        # S3's times are UTC; some producers (older moto) leave out the "Z". Only a
        # whole date and time, though: a date alone is no event time.
        if not _NAIVE_TIME.fullmatch(value):
            raise DecodeError(f"{what} is not a date and time (YYYY-MM-DDTHH:MM:SS, with a "
                              f"time zone or none for UTC): {value!r}")
        parsed = parsed.replace(tzinfo=UTC)
    epoch = parsed.timestamp()
    if epoch < FIRST_TIME:  # (0001-01-01T00:00:00+01:00: year 0 in UTC, no ISO 8601 year)
        raise DecodeError(f"{what} is before 0001-01-01T00:00:00Z: {value!r}")
    return epoch


def json_problem(exc: orjson.JSONDecodeError) -> str:
    """What the parser found, where, in words about the one message it read (its "line 2"
    would be the message's second line, not the input's)."""
    if "not valid UTF-8" in exc.msg:
        return "not UTF-8 text"
    if exc.msg.startswith("invalid literal") and exc.pos == 0:
        return "it does not begin like JSON"
    return f"{exc.msg}, at character {exc.pos + 1}"


def decode_message(
    body: bytes | str | dict[str, Any],
    *,
    location: str = "",
    eventbridge_keys_encoded: bool = True,
) -> Decoded:
    """Decode one input message into object events.

    Raises :class:`DecodeError` (naming ``location``) when the message is not JSON
    or is of no known format. A malformed record among good ones in a ``Records``
    list is reported in :attr:`Decoded.errors` while the good records are kept.
    """
    if isinstance(body, dict):
        obj: Any = body
    else:
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise DecodeError(f"not JSON ({json_problem(exc)})", location=location) from None
    out = Decoded()
    try:
        _dispatch(obj, out, eventbridge_keys_encoded, depth=0)
    except DecodeError as exc:
        raise DecodeError(exc.reason, location=location) from None
    if out.errors:
        out.errors = [DecodeError(e.reason, location=location) for e in out.errors]
    return out


def _dispatch(obj: Any, out: Decoded, eb_encoded: bool, depth: int) -> None:
    if depth > _MAX_NESTING:
        raise DecodeError("envelopes nested too deeply")
    if not isinstance(obj, dict):
        raise DecodeError(f"expected a JSON object, got {type(obj).__name__}")
    source = obj.get("source")
    if source == "aws.s3" and "detail-type" in obj:
        _eventbridge(obj, out, eb_encoded)
    elif "Records" in obj:
        _records(obj["Records"], out, eb_encoded, depth)
    elif obj.get("Type") == "Notification" and "Message" in obj:
        _envelope(obj, "MessageId", "SNS", "Message", out, eb_encoded, depth)
    elif "Body" in obj or "body" in obj:
        if "Body" in obj:
            _envelope(obj, "MessageId", "SQS", "Body", out, eb_encoded, depth)
        else:
            _envelope(obj, "messageId", "SQS", "body", out, eb_encoded, depth)
    elif obj.get("Event") == "s3:TestEvent":
        out.ignore("s3:TestEvent")
    elif "detail-type" in obj:
        raise DecodeError(
            f"EventBridge event from source {source!r} with detail-type "
            f"{obj.get('detail-type')!r} is not an S3 event"
        )
    else:
        keys = ", ".join(sorted(map(str, obj))[:8])
        raise DecodeError(f"JSON of no known format (top-level keys: {keys or 'none'})")


def _envelope(obj: dict[str, Any], id_field: str, kind: str, field: str, out: Decoded,
              eb_encoded: bool, depth: int) -> None:
    """Decode an SNS or SQS envelope's inner message; its errors name the envelope's
    message id (SPEC 1: an error says where: line and message id)."""
    message_id = obj.get(id_field)
    errors = len(out.errors)
    try:
        _dispatch(_inner_json(obj.get(field), f"{kind} {field}"), out, eb_encoded, depth + 1)
    except DecodeError as exc:
        if message_id is None:
            raise
        raise DecodeError(f"{kind} message {message_id}: {exc.reason}") from None
    if message_id is not None:
        _name_new_errors(out, errors, f"{kind} message {message_id}")


def _name_new_errors(out: Decoded, since: int, where: str) -> None:
    """Prefix the errors ``out`` gained since it held ``since`` of them with ``where``."""
    if len(out.errors) > since:
        out.errors[since:] = [DecodeError(f"{where}: {e.reason}") for e in out.errors[since:]]


def _inner_json(value: Any, what: str) -> Any:
    if isinstance(value, dict):
        return value
    if not isinstance(value, str):
        raise DecodeError(f"{what} is not a JSON string")
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"{what} is not JSON ({json_problem(exc)})") from None


def _records(records: Any, out: Decoded, eb_encoded: bool, depth: int) -> None:
    if not isinstance(records, list):
        raise DecodeError("Records is not a list")
    for index, record in enumerate(records):
        errors = len(out.errors)
        try:
            _record(record, out, eb_encoded, depth)
        except DecodeError as exc:
            out.fail(DecodeError(f"record {index}: {exc.reason}"))
        else:  # (a nested message's own records may have failed)
            _name_new_errors(out, errors, f"record {index}")


def _record(record: Any, out: Decoded, eb_encoded: bool, depth: int) -> None:
    if not isinstance(record, dict):
        raise DecodeError("record is not a JSON object")
    event_source = str(record.get("eventSource") or record.get("EventSource") or "")
    if event_source == "aws:sqs":
        _envelope(record, "messageId", "SQS", "body", out, eb_encoded, depth)
        return
    if event_source == "aws:sns":
        sns = record.get("Sns")
        if not isinstance(sns, dict):
            raise DecodeError("SNS record has no Sns object")
        _envelope(sns, "MessageId", "SNS", "Message", out, eb_encoded, depth)
        return
    if not event_source.endswith(":s3") and "s3" not in record:
        raise DecodeError(f"record of unknown eventSource {event_source!r}")
    name = record.get("eventName")
    if type(name) is not str or not name:
        # Every S3 notification record names its event: without one it is no S3 event.
        raise DecodeError(f"record has no eventName (got {name!r})")
    # MinIO and newer Ceph prefix event names with "s3:".
    name = name.removeprefix("s3:")
    if name.startswith("ObjectCreated:"):
        kind = EventKind.CREATED
    elif name.startswith(("ObjectRemoved:", "LifecycleExpiration:")):
        kind = EventKind.DELETED
    else:
        out.ignore(name)
        return
    s3 = _obj(record.get("s3"), "s3")
    bucket = _obj(s3.get("bucket"), "s3.bucket").get("name")
    obj = _obj(s3.get("object"), "s3.object")
    out.events.append(
        _event(
            bucket,
            obj.get("key"),
            kind,
            parse_time(record.get("eventTime"), what="eventTime"),
            obj,
            url_encoded=True,
        )
    )


_EVENTBRIDGE_KINDS = {"Object Created": EventKind.CREATED, "Object Deleted": EventKind.DELETED}


def _eventbridge(obj: dict[str, Any], out: Decoded, eb_encoded: bool) -> None:
    detail_type = obj.get("detail-type")
    kind = _EVENTBRIDGE_KINDS.get(str(detail_type))
    if kind is None:
        out.ignore(str(detail_type))
        return
    detail = obj.get("detail")
    if type(detail) is not dict:
        detail = _obj(detail, "detail")
    bucket = detail.get("bucket")
    if type(bucket) is not dict:
        bucket = _obj(bucket, "detail.bucket")
    s3obj = detail.get("object")
    if type(s3obj) is not dict:
        s3obj = _obj(s3obj, "detail.object")
    out.events.append(
        _event(bucket.get("name"), s3obj.get("key"), kind, parse_time(obj.get("time"), what="time"),
               s3obj, url_encoded=eb_encoded)
    )


def _obj(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DecodeError(f"{what} is missing or not an object")
    return value


_object_event = partial(tuple.__new__, ObjectEvent)
"""``ObjectEvent`` from one tuple, without the keyword handling of its constructor."""

_BUCKETS: set[str] = set()
"""Bucket names already found good: a stream names few buckets, many times."""


def _event(
    bucket: Any, key: Any, kind: EventKind, time: float, obj: dict[str, Any], *, url_encoded: bool
) -> ObjectEvent:
    # The checks of the common case (ASCII text without NUL) are inline: this runs per event.
    if type(bucket) is not str or bucket not in _BUCKETS:
        _good_bucket(bucket)
    if type(key) is not str or not key:
        raise DecodeError("object key is missing" if key is None else
                          f"object key is empty or not a string: {key!r}")
    key = decode_key(key, url_encoded=url_encoded)
    if len(key) > 256 and len(key.encode("utf-8", "surrogatepass")) > 1024:  # 4 bytes a char
        # S3's own limit; a longer key would also not fit PostgreSQL's index entries (the
        # step would fail whole, again and again).
        raise DecodeError(f"object key longer than 1024 bytes: {key[:60]!r}...")
    if "\x00" in key or not key.isascii():
        _storable(key, "object key")
    etag = obj.get("etag") or obj.get("eTag") or None
    if etag is not None:
        etag = (etag if type(etag) is str else str(etag)).strip('"')
        if "\x00" in etag or not etag.isascii():
            _storable(etag, "etag")
    size = obj.get("size")
    if type(size) is not int:
        size = int(size) if type(size) is float and math.isfinite(size) else None
    if size is not None and not 0 <= size < 2**63:
        # No store column holds it (a step would fail whole, again and again).
        raise DecodeError(f"object size out of range: {size}")
    sequencer = obj.get("sequencer") or None
    if sequencer is not None:
        if type(sequencer) is not str:
            sequencer = str(sequencer)
        if "\x00" in sequencer or not sequencer.isascii():
            _storable(sequencer, "sequencer")
    return _object_event((bucket, key, kind, time, etag, size, sequencer))


def _good_bucket(bucket: Any) -> None:
    if type(bucket) is not str or not bucket:
        raise DecodeError("bucket name is missing")
    if len(bucket) > 255:  # S3 allows 63; a folder name 255
        raise DecodeError(f"bucket name is not one: {bucket[:60]!r}")
    _storable(bucket, "bucket name")
    if len(_BUCKETS) >= 1024:
        _BUCKETS.clear()
    _BUCKETS.add(bucket)


def _storable(text: str, what: str) -> str:
    """``text`` if every store can hold it, else :class:`DecodeError`: S3 sends neither a
    NUL character (PostgreSQL refuses it) nor a lone surrogate (not UTF-8; a Lambda
    runtime's JSON parser lets one through), and such a value would fail its whole step
    again and again."""
    if "\x00" in text:
        raise DecodeError(f"{what} contains a NUL character: {text[:80]!r}")
    if not text.isascii() and not is_unicode(text):  # (the common case inline: per event)
        raise DecodeError(f"{what} is not valid Unicode (a lone surrogate): {text[:80]!r}")
    return text
