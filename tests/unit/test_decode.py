"""Decoding every input format of SPEC section 1."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from edp.core.events import EventKind
from edp.decode import FIRST_TIME, decode_key, decode_message, parse_time
from edp.errors import DecodeError
from edp_testing import eventbridge, load_event

KEY = "instrument/exp 1 (a)/x+y=z%.tif"
UKEY = "mikroskop/versuch-ü/bild é.tif"


def test_eventbridge_created_key_is_form_decoded() -> None:
    decoded = decode_message(load_event("eventbridge-object-created.json"))
    [event] = decoded.events
    assert event.key == KEY
    assert event.bucket == "source-bucket"
    assert event.kind is EventKind.CREATED
    assert event.size == 1024
    assert event.etag == "d41d8cd98f00b204e9800998ecf8427e"
    assert event.sequencer == "0062E99A88DC407460"
    assert event.time == 1670529694.0


def test_eventbridge_unicode_key() -> None:
    [event] = decode_message(load_event("eventbridge-object-created-unicode.json")).events
    assert event.key == UKEY


def test_eventbridge_deleted_without_size_or_etag() -> None:
    [event] = decode_message(load_event("eventbridge-object-deleted.json")).events
    assert event.kind is EventKind.DELETED
    assert event.size is None and event.etag is None
    assert event.key == KEY


def test_moto_eventbridge_event_with_raw_key_and_etag_spelling() -> None:
    raw = load_event("eventbridge-object-created-moto.json")
    [event] = decode_message(raw, eventbridge_keys_encoded=False).events
    assert event.key == KEY
    assert event.etag == "d41d8cd98f00b204e9800998ecf8427e"
    # By default EventBridge keys are URL-decoded, which mangles moto's raw keys.
    [mangled] = decode_message(raw).events
    assert mangled.key != KEY


def test_other_eventbridge_types_are_ignored_and_counted() -> None:
    decoded = decode_message(load_event("eventbridge-object-tags-added.json"))
    assert decoded.events == []
    assert decoded.ignored == {"Object Tags Added": 1}


def test_records_several_per_message() -> None:
    decoded = decode_message(load_event("s3-notification-created.json"))
    assert [e.key for e in decoded.events] == [KEY, UKEY]
    assert decoded.events[0].time == pytest.approx(1670529694.123)
    assert all(e.kind is EventKind.CREATED for e in decoded.events)


def test_records_removed_and_lifecycle_expiration_are_deletes() -> None:
    decoded = decode_message(load_event("s3-notification-removed.json"))
    assert [e.kind for e in decoded.events] == [EventKind.DELETED, EventKind.DELETED]
    assert decoded.events[0].size is None


def test_records_other_types_are_ignored_and_missing_sequencer_tolerated() -> None:
    decoded = decode_message(load_event("s3-notification-mixed-types.json"))
    assert decoded.ignored == {"ObjectTagging": 1, "ObjectRestore": 1}  # counted by family
    [event] = decoded.events
    assert event.sequencer is None and event.key == "instrument/exp-1/c.tif"


def test_minio_notification() -> None:
    [event] = decode_message(load_event("minio-notification.json")).events
    assert (event.bucket, event.key) == ("minio-bucket", "lab/run 7/data=1.csv")
    assert event.kind is EventKind.CREATED


def test_ceph_notification() -> None:
    [event] = decode_message(load_event("ceph-notification.json")).events
    assert (event.bucket, event.key) == ("ceph-bucket", "lab/run 8/a b.csv")


def test_s3_test_event_is_ignored_not_an_error() -> None:
    decoded = decode_message(load_event("s3-test-event.json"))
    assert decoded.events == [] and decoded.ignored == {"s3:TestEvent": 1}


@pytest.mark.parametrize(
    "name",
    ["sns-envelope-records.json", "sqs-message-sns-records.json"],
)
def test_envelopes_around_records(name: str) -> None:
    assert [e.key for e in decode_message(load_event(name)).events] == [KEY, UKEY]


@pytest.mark.parametrize("name", ["sqs-message-eventbridge.json", "lambda-sqs-event.json"])
def test_sqs_around_eventbridge(name: str) -> None:
    assert [e.key for e in decode_message(load_event(name)).events] == [KEY]


def test_bytes_and_str_bodies() -> None:
    raw = json.dumps(load_event("eventbridge-object-created.json"))
    assert decode_message(raw).events == decode_message(raw.encode()).events


def test_a_bad_record_inside_lambda_records_names_the_message_and_its_record() -> None:
    inner = json.dumps({"Records": [{"eventSource": "aws:s3"}]})
    sqs = {"Records": [{"eventSource": "aws:sqs", "messageId": "q-1", "body": "{}"},
                       {"eventSource": "aws:sqs", "messageId": "q-2", "body": inner}]}
    errors = [str(e) for e in decode_message(sqs, location="line 4").errors]
    assert errors == [
        "line 4: record 0: SQS message q-1: JSON of no known format (top-level keys: none)",
        "line 4: record 1: SQS message q-2: record 0: record has no eventName (got None)"]
    sns = {"Records": [{"EventSource": "aws:sns", "Sns": {"MessageId": "n-1", "Message": 5}}]}
    [error] = decode_message(sns, location="line 5").errors
    assert str(error) == "line 5: record 0: SNS message n-1: SNS Message is not a JSON string"


def test_a_bad_record_inside_an_sqs_message_names_the_message_id() -> None:
    good = {"eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
            "eventTime": "2024-01-01T00:00:00Z",
            "s3": {"bucket": {"name": "b"}, "object": {"key": "a/b/c"}}}
    body = json.dumps({"Records": [good, {"eventSource": "aws:s3"}]})
    decoded = decode_message({"MessageId": "m-1", "Body": body}, location="line 2")
    assert len(decoded.events) == 1
    [error] = decoded.errors
    assert str(error) == "line 2: SQS message m-1: record 1: record has no eventName (got None)"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "not JSON (it does not begin like JSON)"),
        # (where the parser stopped, in the one message: its "line 2" misled)
        (b"{\n", "not JSON (unexpected end of data, at character 3)"),
        (b'{"a": 1,}', "not JSON (trailing comma is not allowed, at character 8)"),
        (b"\xff\xfe", "not JSON (not UTF-8 text)"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"hello": "world"}', "no known format (top-level keys: hello)"),
        (b'{"source": "aws.ec2", "detail-type": "EC2 Instance State-change"}', "not an S3 event"),
        (b'{"Type": "Notification", "Message": "{oops"}', "SNS Message is not JSON"),
        (b'{"Body": 42}', "SQS Body is not a JSON string"),
        (b'{"MessageId": "m-9", "Body": "{}"}', "SQS message m-9: JSON of no known format"),
        (b'{"Type": "Notification", "MessageId": "n-3", "Message": "{oops"}',
         "SNS message n-3: SNS Message is not JSON"),
        (b'{"source": "aws.s3", "detail-type": "Object Created", "time": "2022-12-08T20:01:34Z",'
         b' "detail": {"bucket": {"name": "b"}, "object": {}}}', "object key is missing"),
        (b'{"source": "aws.s3", "detail-type": "Object Created", "time": "yesterday",'
         b' "detail": {"bucket": {"name": "b"}, "object": {"key": "a/b/c"}}}', "not an ISO 8601"),
    ],
)
def test_bad_messages_name_what_and_where(body: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode_message(body, location="line 7")
    assert reason in str(info.value)
    assert str(info.value).startswith("line 7: ")
    assert info.value.location == "line 7"


def test_a_bad_record_does_not_lose_the_good_ones() -> None:
    message = load_event("s3-notification-created.json")
    del message["Records"][0]["s3"]["object"]["key"]
    decoded = decode_message(message, location="message id m-1")
    assert [e.key for e in decoded.events] == [UKEY]
    [error] = decoded.errors
    assert str(error) == "message id m-1: record 0: object key is missing"


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ("a+b", "a b"),
        ("a%2Bb", "a+b"),
        ("100%25", "100%"),
        ("x%3Dy", "x=y"),
        ("%28a%29", "(a)"),
        ("caf%C3%A9", "café"),
        ("plain/key.txt", "plain/key.txt"),
    ],
)
def test_decode_key(raw: str, key: str) -> None:
    assert decode_key(raw) == key
    assert decode_key(raw, url_encoded=False) == raw


_CLOCKISH = st.text(alphabet="0123456789-T:Z.+²٣ ", min_size=18, max_size=22)


@given(
    st.one_of(
        st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2200, 1, 1)).map(
            lambda d: d.strftime("%Y-%m-%dT%H:%M:%SZ")
        ),
        _CLOCKISH,
        _CLOCKISH.map(lambda t: "2024-01-01T" + t[:8] + "Z"),
    )
)
@example("2024-01-01T00:00:60Z")
@example("2024-01-01T24:00:00Z")
@example("2024-01-01T00:60:00Z")
@example("2023-02-29T00:00:00Z")
@example("2024-01-01T0²:00:00Z")
@example("2024-01-01T00:00:01.5Z")
@example("2024-01-01T00:00:01+00:00")
@example("2024-01-01T00:00:01")
@example("2024-01-01t00:00:01z")
@example("2024-01-01")
@example("2024-01-01T10")
@example("0001-01-01T00:00:00+01:00")
@example("0001-01-01T00:00:00Z")
def test_event_times_parse_as_datetime_reads_them(text: str) -> None:
    # Given any text shaped like an S3 event time (valid or not; RFC 3339's lower-case
    # "t" and "z" read as upper case; a time with no zone is UTC, S3's zone)
    upper = text.upper() if text.isascii() else text
    try:
        if not re.fullmatch(r"[0-9]{4}-?[0-9]{2}-?[0-9]{2}([Tt ][0-9:.,]*)?( ?([Zz]|[+-][0-9:]+))?",
                            text):
            # (only an ISO 8601 time's characters, in their places: datetime takes more)
            raise ValueError(text)
        parsed = datetime.fromisoformat(upper)
        utc = parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
        expected: float | None = utc.timestamp()
        if not parsed.tzinfo and not re.fullmatch(
            r"\d{4}-\d\d-\d\d[Tt]\d\d:\d\d:\d\d(\.\d+)?", text
        ):
            expected = None  # (a date, or a time without seconds, is no event time)
        if expected is not None and expected < FIRST_TIME:
            expected = None  # (year 0 in UTC: no output could write it)
    except ValueError:
        expected = None
    # When edp parses it (twice: the second read may come from its caches)
    # Then it gives datetime's answer, or a DecodeError where datetime has none
    for _ in range(2):
        if expected is None:
            with pytest.raises(DecodeError):
                parse_time(text, what="time")
        else:
            assert parse_time(text, what="time") == expected


def test_a_time_of_another_form_never_reads_as_a_cached_minute_plus_seconds() -> None:
    from edp.decode import _parse_time

    # Given times of 20 characters with ":SS" and "Z" where S3's form has them, that
    # datetime reads otherwise (Python 3.11 takes "20221208T2001Z" and ignores the rest)
    first, other = "20221208T2001Z\x00\x00:19Z", "20221208T2001Z\x00\x00:45Z"
    # When edp has parsed the first, then parses the second
    outcomes = []
    for text in (first, other):
        try:
            outcomes.append(parse_time(text, what="time"))
        except DecodeError:
            outcomes.append(None)
    # Then the second reads as it reads uncached (it read as the first's minute plus
    # 45 s: a time depending on what came before it, in decoding that must be pure)
    try:
        expected: float | None = _parse_time(other, "time")
    except DecodeError:
        expected = None
    assert outcomes[1] == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("2022-12-08T20:01:34Z", "2022-12-08T20:01:34+00:00"),  # EventBridge
    ("2022-12-08T20:01:34.123Z", "2022-12-08T20:01:34.123+00:00"),  # S3, MinIO
    ("2022-12-08T20:01:34.123456Z", "2022-12-08T20:01:34.123456+00:00"),  # Ceph
    ("2022-12-08T20:01:34", "2022-12-08T20:01:34+00:00"),  # older moto: no zone, UTC
    ("2022-12-08T21:01:34+01:00", "2022-12-08T20:01:34+00:00"),
    ("2022-12-08T20:01:34 +00:00", "2022-12-08T20:01:34+00:00"),
    ("2022-12-08 20:01:34 +0000", "2022-12-08T20:01:34+00:00"),
    ("2022-12-08t20:01:34z", "2022-12-08T20:01:34+00:00"),  # RFC 3339's lower case
])
def test_the_time_forms_producers_send_are_read(text: str, expected: str) -> None:
    assert parse_time(text, what="time") == datetime.fromisoformat(expected).timestamp()


@pytest.mark.parametrize("text", ["11111111311Z\x00\x00\x08\x00:19Z",
                                  "2024-01-01x10:00:00Z", "2024-01-01T10:00:00Z junk"])
def test_a_time_with_characters_no_iso_time_holds_is_refused(text: str) -> None:
    # (Python 3.11's datetime reads the first as 1111-11-11T11:00Z, the second as 10:00)
    with pytest.raises(DecodeError, match="is not an ISO 8601 time"):
        parse_time(text, what="time")


def test_a_date_alone_is_refused_as_no_date_and_time() -> None:
    # ("has no time zone" sent users looking for a zone that would not have helped)
    with pytest.raises(DecodeError, match=r"time is not a date and time .*'2024-01-01'"):
        parse_time("2024-01-01", what="time")


def test_a_record_time_without_a_zone_is_read_as_utc() -> None:
    # Given a record as older moto releases wrote it (eventTime with no "Z")
    record = {"eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
              "eventTime": "2024-01-01T00:00:07.250000",
              "s3": {"bucket": {"name": "b"}, "object": {"key": "a/b/c"}}}
    # When it is decoded, Then it is an event at that time in UTC, not an error
    decoded = decode_message({"Records": [record]}, location="line 1")
    assert decoded.errors == []
    assert [e.time for e in decoded.events] == [1704067207.25]


@pytest.mark.parametrize(
    ("message", "reason"),
    [({"evil\nkey": 1}, "JSON of no known format (top-level keys: evil\\x0akey)"),
     ({"csi\x9b2J": 1}, "JSON of no known format (top-level keys: csi\\x9b2J)"),
     ({"MessageId": "id\u2028x", "Body": "{}"},
      "SQS message id\\u2028x: JSON of no known format (top-level keys: none)")],
)
def test_a_rejection_is_one_line_whatever_names_the_input_brings(
    message: dict[str, object], reason: str
) -> None:
    # Given a message whose own names hold line breaks
    try:
        [error] = decode_message(message, location="line\r9").errors
    except DecodeError as raised:
        error = raised
    # Then its reason and location are one line each, the breaks written escaped
    assert error.reason == reason and error.location == "line\\x0d9"
    assert len(str(error).splitlines()) == 1


@pytest.mark.parametrize("name", [None, "", 7])
def test_a_record_without_an_event_name_is_an_error_not_an_ignored_type(name: object) -> None:
    record = {"eventSource": "aws:s3", "eventTime": "2024-01-01T00:00:00Z",
              "s3": {"bucket": {"name": "b"}, "object": {"key": "a/b/c"}}}
    good = {**record, "eventName": "ObjectCreated:Put"}
    bad = record if name is None else {**record, "eventName": name}
    decoded = decode_message({"Records": [good, bad]}, location="line 3")
    # The good record goes on; the bad one is reported, with where and why
    assert [e.key for e in decoded.events] == ["a/b/c"]
    assert decoded.ignored == {}
    [error] = decoded.errors
    assert error.location == "line 3" and "record 1: record has no eventName" in error.reason


def test_made_up_event_types_are_counted_as_other() -> None:
    # Counter names and metric labels must not grow with what a sender makes up
    made_up = [eventbridge("a/b/c", 0, kind=f"Object Invented {n}") for n in range(3)]
    records = {"Records": [{"eventSource": "aws:s3", "eventName": f"Made:Up{n}"}
                           for n in range(3)]}
    ignored: dict[str, int] = {}
    for message in [*made_up, records]:
        for kind, count in decode_message(message).ignored.items():
            ignored[kind] = ignored.get(kind, 0) + count
    assert ignored == {"other": 6}
    tags = decode_message(eventbridge("a/b/c", 0, kind="Object Tags Added"))
    assert tags.ignored == {"Object Tags Added": 1}


def test_a_key_with_a_nul_character_is_refused() -> None:
    # PostgreSQL cannot store it; a store error would fail the step with every message
    # received alongside, again and again: it must be a dead letter instead
    with pytest.raises(DecodeError, match="NUL"):
        decode_message(eventbridge("a/b/bad\x00.txt", 0))
    records = {"Records": [
        {"eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
         "eventTime": "2024-01-01T00:00:00Z",
         "s3": {"bucket": {"name": "b"}, "object": {"key": "a/b/bad%00.txt"}}},
        {"eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
         "eventTime": "2024-01-01T00:00:00Z",
         "s3": {"bucket": {"name": "b"}, "object": {"key": "a/b/good.txt"}}},
    ]}
    decoded = decode_message(records)
    assert [e.key for e in decoded.events] == ["a/b/good.txt"]
    assert "NUL" in decoded.errors[0].reason


@pytest.mark.parametrize("size", [10**20, -1, 2**63, 1e300])
def test_a_size_no_store_can_hold_is_refused(size: float) -> None:
    event = eventbridge("a/b/c.txt", 0)
    event["detail"]["object"]["size"] = size
    with pytest.raises(DecodeError, match="size out of range"):
        decode_message(event)


def test_a_size_that_is_not_a_number_is_no_size() -> None:
    # (a Lambda event parsed by Python's json may hold NaN or Infinity)
    for odd in (float("nan"), float("inf")):
        event = eventbridge("a/b/c.txt", 0)
        event["detail"]["object"]["size"] = odd
        [decoded] = decode_message(event).events
        assert decoded.size is None


@pytest.mark.parametrize(("field", "value", "why"), [
    ("key", "a/b/\ud800.txt", "lone surrogate"), ("bucket", "b\udfff", "lone surrogate"),
    ("etag", "e\x00", "NUL"), ("sequencer", "0\x00", "NUL"),
])
def test_values_no_store_can_hold_are_refused(field: str, value: str, why: str) -> None:
    # (a Lambda runtime's JSON parser lets lone surrogates through; PostgreSQL refuses NUL)
    event = eventbridge("a/b/c.txt", 0, sequencer="01")
    if field == "bucket":
        event["detail"]["bucket"]["name"] = value
    else:
        event["detail"]["object"][field] = value
    with pytest.raises(DecodeError, match=why):
        decode_message(event, eventbridge_keys_encoded=False)


@given(
    st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2200, 1, 1)),
    st.integers(min_value=0, max_value=59),
)
def test_times_of_a_minute_already_seen_parse_as_datetime_reads_them(
    first: datetime, second: int
) -> None:
    # Given a time of S3's form that edp has parsed (its minute is now cached)
    parse_time(first.strftime("%Y-%m-%dT%H:%M:%SZ"), what="time")
    # When another second of that same minute comes
    other = first.replace(second=second).strftime("%Y-%m-%dT%H:%M:%SZ")
    # Then it reads as datetime reads it (UTC)
    assert parse_time(other, what="time") == datetime.fromisoformat(other).timestamp()
