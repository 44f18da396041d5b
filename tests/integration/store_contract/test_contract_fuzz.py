"""No input makes a step fail, on any backend: it is batched, skipped or a dead letter.

A step that fails for its input fails again each time the input comes back, and takes
every message received with it along (SPEC section 1: bad input is kept, the rest goes
on). Hypothesis throws odd S3 events at the real engine and store: keys and bucket
names with any characters (NUL, lone surrogates, 3 kB), sizes of any type and range,
odd sequencers, etags and times, as the dicts a Lambda runtime hands over and as JSON.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edp.config import Settings
from edp.engine import Engine, Message
from edp.store import Store

pytestmark = pytest.mark.timeout(300)

NASTY = st.sampled_from(["\x00", "\ud800", "\udfff", "\x1b", "\u2028", "%00", "%ED%A0%80",
                         "%", "+", " ", "/", ".", "..", "\\", "'", '"', "é", "\U0001f600"])
SHORT = st.lists(st.characters(exclude_categories=()) | NASTY, max_size=12).map("".join)
ANY_TEXT = SHORT | st.builds(lambda text, times: text * times,  # and long ones, cheaply
                             st.text(min_size=1, max_size=3), st.integers(300, 3000)) | (
    st.builds(lambda start, count: "".join(chr(0x4E00 + (start + n * 7) % 20000)  # varied:
                                           for n in range(count)),  # no compression
              st.integers(0, 20000), st.integers(200, 1200)))
KEYS = st.builds(lambda a, b, c: f"{a}/{b}/{c}", SHORT, SHORT, ANY_TEXT) | ANY_TEXT
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | ANY_TEXT
VALID_TIMES = st.datetimes(min_value=dt.datetime(1, 1, 2), max_value=dt.datetime(9999, 12, 30),
                           timezones=st.just(dt.UTC)).map(lambda t: t.isoformat())
# Mostly well-formed around the odd part, so that most events get past decoding and
# reach the store (an event refused while decoding is a dead letter: fine, but dull).
TIMES = st.one_of(VALID_TIMES, VALID_TIMES, VALID_TIMES, SCALARS)
BUCKETS = st.one_of(st.just("b"), st.just("b"), ANY_TEXT)
SIZES = st.one_of(st.integers(0, 10**6), st.integers(0, 10**6), SCALARS)


@st.composite
def events(draw: st.DrawFn) -> dict[str, Any]:
    """An EventBridge S3 event or an S3 notification with odd fields."""
    obj = {"key": draw(KEYS), "size": draw(SIZES), "sequencer": draw(SCALARS),
           draw(st.sampled_from(["etag", "eTag"])): draw(SCALARS)}
    bucket = draw(BUCKETS)
    if draw(st.booleans()):
        return {"version": "0", "id": "x", "source": "aws.s3",
                "detail-type": draw(st.sampled_from(["Object Created", "Object Deleted"])),
                "time": draw(TIMES), "detail": {"bucket": {"name": bucket}, "object": obj}}
    return {"Records": [{"eventSource": "aws:s3", "eventTime": draw(TIMES),
                         "eventName": draw(st.sampled_from(["ObjectCreated:Put",
                                                            "ObjectRemoved:Delete"])),
                         "s3": {"bucket": {"name": bucket}, "object": obj}}]}


def as_json(event: dict[str, Any]) -> bytes | None:
    """The event as an SQS body would carry it (None when JSON cannot: lone surrogates)."""
    try:
        return json.dumps(event).encode("utf-8")
    except (UnicodeEncodeError, ValueError):
        return None


@pytest.fixture
def engine(opened: Callable[[], Store]) -> Engine:
    cfg = Settings(database_url="sqlite:///:memory:", bucket_threshold_event_count=3)
    return Engine(opened(), cfg, sinks=["out"], worker_id="fuzz")


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(batch=st.lists(events(), min_size=1, max_size=4))
def test_no_input_makes_a_step_fail(engine: Engine, batch: list[dict[str, Any]]) -> None:
    # Given odd events, as dicts (a Lambda event) and as JSON text (an SQS body)
    messages = [Message(event, f"m{i}") for i, event in enumerate(batch)]
    messages += [Message(body, f"j{i}") for i, event in enumerate(batch)
                 if (body := as_json(event)) is not None]
    # When they are processed in one step
    report = engine.process(messages, now=1_700_000_000.0)
    # Then the step committed: each message was decoded or kept as a dead letter
    assert report.messages == len(messages)
