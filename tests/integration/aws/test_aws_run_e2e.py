"""`edp run` end to end on moto: S3 uploads in, package-objects-ready events out.

The input reaches the daemon's queue three ways (EventBridge rule, S3 Event
Notifications, S3 -> SNS -> SQS); the events leave through the EventBridge sink to
a custom bus whose rule (the seeds' pattern) feeds an SQS queue that the test reads.

Moto quirks, handled here: moto puts EventBridge keys unencoded (hence
``--eventbridge-raw-keys`` on that path) and gives every event the same sequencer,
so no test overwrites a key (an overwrite would look stale).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

COUNT_KEYS = ("instrument A/exp ü1/raw/f 1.tif", "instrument A/exp ü1/raw/f+2.tif",
              "instrument A/exp ü1/f3 é.tif")
QUIET_KEYS = ("instrument A/exp 2/a.txt", "instrument A/exp 2/b c.txt")
MARKER_KEYS = ("lab é/run 7/data 1.csv", "lab é/run 7/_SUCCESS")

GROUPING = ["--prefix-depth", "2", "--threshold-event-count", "3",
            "--threshold-duration", "2", "--complete-markers", "_SUCCESS"]

EXPECTED = {
    ("instrument A/exp ü1/", 3, "count"),
    ("instrument A/exp 2/", 2, "duration"),
    ("lab é/run 7/", 2, "marker"),
}


def plumb(aws: Any, path: str, bucket: str, queue_arn: str) -> list[str]:
    """Route the bucket's S3 events to the ingest queue; returns extra `edp run` flags."""
    if path == "eventbridge":
        aws.s3_events_via_eventbridge(bucket, queue_arn)
        return ["--eventbridge-raw-keys"]  # moto does not URL-encode EventBridge keys
    if path == "s3-notification":
        aws.s3_events_to_queue(bucket, queue_arn)
        return []
    aws.s3_events_via_sns(bucket, queue_arn)
    return []


def summary(events: list[dict[str, Any]]) -> set[tuple[str, int, str]]:
    return {(e["detail"]["prefix"], e["detail"]["object-count"], e["detail"]["trigger"])
            for e in events}


@pytest.mark.timeout(90)
@pytest.mark.parametrize("path", ["eventbridge", "s3-notification", "sns-to-sqs"])
def test_uploads_become_one_event_per_batch(
    aws: Any, start_edp: Any, tmp_path: Path, path: str
) -> None:
    # Given a bucket whose S3 events reach an ingest queue, and an edp bus whose
    # rule (the seeds' pattern) feeds an output queue
    bucket = aws.bucket()
    ingest_url, ingest_arn = aws.queue("ingest")
    out_url, out_arn = aws.queue("out")
    flags = plumb(aws, path, bucket, ingest_arn)
    bus = aws.edp_bus(bucket, out_arn)
    # ... and `edp run` consuming the queue
    edp = start_edp(
        "run", "--sqs-queue", ingest_url, "--eventbridge-bus", bus,
        "--database-url", f"sqlite:///{tmp_path / 'edp.db'}", *GROUPING, *flags,
        env={"EDP_BUCKETS": bucket, "EDP_SQS_WAIT_SECONDS": "1"},
    )

    # When files arrive under three prefixes (spaces, '+', non-ASCII in the keys)
    aws.put(bucket, *COUNT_KEYS, *QUIET_KEYS, *MARKER_KEYS)

    # Then exactly one event per batch arrives, with prefix, object-count and trigger
    events = aws.collect(out_url, 3, timeout=30)
    assert edp.stop() == 0, edp.log()
    assert summary(events) == EXPECTED, edp.log()
    assert len(events) == 3
    for event in events:
        assert event["detail-type"] == "package-objects-ready"
        assert event["source"] == "com.quiltdata.edp"
        assert event["resources"] == [f"arn:aws:s3:::{bucket}"]
        assert event["detail"]["bucket"] == bucket
        assert event["detail"]["first-event-time"] <= event["detail"]["last-event-time"]
    # And every ingest message was deleted once committed
    left = aws.sqs.get_queue_attributes(
        QueueUrl=ingest_url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    assert left == {"ApproximateNumberOfMessages": "0",
                    "ApproximateNumberOfMessagesNotVisible": "0"}


@pytest.mark.timeout(90)
def test_every_sink_gets_every_event_with_its_stable_id(
    aws: Any, start_edp: Any, webhook: Any, tmp_path: Path
) -> None:
    # Given EventBridge, SNS (subscribed by a queue) and a signed webhook as sinks
    bucket = aws.bucket()
    ingest_url, ingest_arn = aws.queue("ingest")
    bus_url, bus_arn = aws.queue("bus-out")
    sns_url, sns_arn = aws.queue("sns-out")
    aws.s3_events_via_eventbridge(bucket, ingest_arn)
    bus = aws.edp_bus(bucket, bus_arn)
    topic = aws.sns_to_queue(sns_arn)
    edp = start_edp(
        "run", "--sqs-queue", ingest_url, "--eventbridge-bus", bus, "--sns-topic", topic,
        "--webhook", webhook.url, "--database-url", f"sqlite:///{tmp_path / 'edp.db'}",
        "--eventbridge-raw-keys", *GROUPING,
        env={"EDP_BUCKETS": bucket, "EDP_SQS_WAIT_SECONDS": "1",
             "EDP_WEBHOOK_SECRET": webhook.secret},
    )

    # When two batches fire
    aws.put(bucket, *COUNT_KEYS, *MARKER_KEYS)

    # Then each sink got both events, once, with the same ids
    from_bus = aws.collect(bus_url, 2)
    envelopes = aws.collect(sns_url, 2)
    assert edp.stop() == 0, edp.log()
    from_sns = [json.loads(e["Message"]) for e in envelopes]
    ids = {e["id"] for e in from_sns}
    assert len(from_sns) == 2 and len(ids) == 2
    # EventBridge gives its own id to each event; edp's stable id rides in the detail
    assert sorted(e["detail"]["event-id"] for e in from_bus) == sorted(ids)
    assert {e["id"] for e in webhook.valid()} == ids
    assert len(webhook.received) == 2
    assert summary(from_sns) == {("instrument A/exp ü1/", 3, "count"),
                                 ("lab é/run 7/", 2, "marker")}
    # And the SNS subject names the event in plain ASCII, under 100 characters
    assert {e["Subject"] for e in envelopes} == {
        f"edp package-objects-ready {bucket}/instrument A/exp u1/",
        f"edp package-objects-ready {bucket}/lab e/run 7/",
    }
    assert {e["MessageAttributes"]["detail-type"]["Value"] for e in envelopes} == {
        "package-objects-ready"
    }
