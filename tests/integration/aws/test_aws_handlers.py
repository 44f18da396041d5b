"""The Lambda entry points, invoked in-process with realistic events (tests/events/aws-*)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edp.aws import handlers
from edp.store import open_store
from edp_testing import load_event

PREFIX = "instrument/exp 1 (a)/"


@pytest.fixture
def lambda_env(
    aws: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[dict[str, str]]:
    """The store and emit functions' environment (as deploy/edp.yaml sets it), on SQLite."""
    out_url, out_arn = aws.queue("out")
    bus = aws.edp_bus("source-bucket", out_arn)
    values = {
        "EDP_DATABASE_URL": f"sqlite:///{tmp_path / 'lambda.db'}",
        "EDP_BUCKETS": "source-bucket",
        "EDP_BUCKET_PREFIX_DEPTH": "2",
        "EDP_BUCKET_THRESHOLD_EVENT_COUNT": "3",
        "EDP_BUCKET_THRESHOLD_DURATION": "60",
        "EDP_EVENTBRIDGE_BUS": bus,
        "EDP_EVENT_SOURCE": "com.quiltdata.edp",
        "EDP_REGION": "us-east-1",
        "EDP_ACCOUNT": "123456789012",
        "AWS_LAMBDA_FUNCTION_NAME": "edp-store",
        "OUT_QUEUE": out_url,
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    handlers.reset_runtime()
    yield values
    handlers.reset_runtime()


def batches(url: str) -> list[Any]:
    store = open_store(url)
    try:
        return [*store.list_batches(state="open"), *store.list_batches(state="closed")]
    finally:
        store.close()


@pytest.mark.timeout(60)
def test_sqs_batch_then_eventbridge_event_then_schedule(
    aws: Any, lambda_env: dict[str, str]
) -> None:
    # Given an SQS batch of two S3 events (EventBridge shape) and a poison record
    sqs_event = load_event("aws-lambda-sqs-batch.json")

    # When the store function gets it
    result = handlers.store_handler(sqs_event, None)

    # Then no record failed: the poison one is dead-lettered and acknowledged
    assert result == {"batchItemFailures": []}
    store = open_store(lambda_env["EDP_DATABASE_URL"])
    letters = store.dead_letters()
    store.close()
    assert [(d.location, d.source) for d in letters] == [
        ("message id 3b8e1f2a-6c4d-4a9e-8f7b-5d2c1e0f9a8b",
         "sqs:arn:aws:sqs:us-east-1:123456789012:edp-ingest")
    ]
    [open_batch] = batches(lambda_env["EDP_DATABASE_URL"])
    assert (open_batch.prefix, open_batch.object_count, open_batch.state) == (PREFIX, 2, "open")

    # When EventBridge invokes the function directly with the third file
    direct = handlers.store_handler(load_event("aws-eventbridge-direct.json"), None)

    # Then the count batch closes, but nothing is published until the schedule runs
    assert direct["fired"] == 1
    assert aws.collect(lambda_env["OUT_QUEUE"], 1, timeout=1.5, linger=0) == []

    # When the emit function runs on its schedule
    summary = handlers.emit_handler(load_event("aws-scheduled-event.json"), None)

    # Then the event reaches the bus, and a rule with the seeds' pattern forwards it
    # (the sample events are from 2022: their three key memories are past the 24 h
    # retention of the emit function's clock, which is now, so it forgets them)
    assert summary == {"fired": 0, "delivered": 1, "failed": 0, "parked": 0, "pruned": 3}
    [event] = aws.collect(lambda_env["OUT_QUEUE"], 1)
    assert event["detail"]["prefix"] == PREFIX
    assert event["detail"]["object-count"] == 3
    assert event["detail"]["trigger"] == "count"
    assert event["detail"]["first-event-time"] == "2022-12-08T20:01:34Z"
    assert event["detail"]["last-event-time"] == "2022-12-08T20:01:40Z"


@pytest.mark.timeout(60)
def test_emit_fires_quiet_batches_once_the_store_is_quiet(
    aws: Any, lambda_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a batch that got two files in 2022: the store's clock is their event time
    monkeypatch.setenv("EDP_WORKER_TIMEOUT", "1")
    handlers.store_handler(load_event("aws-lambda-sqs-batch.json"), None)

    # When the schedule runs while the store container is live with that clock
    early = handlers.emit_handler(load_event("aws-scheduled-event.json"), None)

    # Then nothing fires yet: a backlog being stored must not be split (SPEC 4)
    assert early["fired"] == 0

    # When the store has been quiet for worker_timeout, the schedule runs again
    time.sleep(1.2)
    late = handlers.emit_handler(load_event("aws-scheduled-event.json"), None)

    # Then the batch fires by duration, at last activity + duration, and is published
    assert (late["fired"], late["delivered"]) == (1, 1)
    events = aws.collect(lambda_env["OUT_QUEUE"], 1)
    assert [(e["detail"]["prefix"], e["detail"]["object-count"], e["detail"]["trigger"])
            for e in events] == [(PREFIX, 2, "duration")]
    assert events[0]["time"] == "2022-12-08T20:02:36Z"


@pytest.mark.timeout(60)
def test_a_quiet_period_shorter_than_worker_timeout_fires_on_the_next_tick(
    aws: Any, lambda_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from edp_testing import eventbridge

    # Given a 5 s quiet period (below worker_timeout, 60 s) and two files written 10 s
    # ago, stored as they arrive: fresh events, no backlog
    monkeypatch.setenv("EDP_BUCKET_THRESHOLD_DURATION", "5")
    written = time.time() - 10
    records = [{"messageId": f"m-{n}", "body": json.dumps(eventbridge(
                   f"{PREFIX}file-{n}.txt", written + n, bucket="source-bucket")),
                "eventSource": "aws:sqs",
                "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:edp-ingest"}
               for n in range(2)]
    assert handlers.store_handler({"Records": records}, None) == {"batchItemFailures": []}

    # When the schedule runs next, with the store container still live
    tick = handlers.emit_handler(load_event("aws-scheduled-event.json"), None)

    # Then the quiet batch is published now, not once the store container's heartbeat
    # is worker_timeout old (a caught-up container's clock is the wall clock)
    assert tick["delivered"] == 1, tick
    [event] = aws.collect(lambda_env["OUT_QUEUE"], 1)
    assert (event["detail"]["prefix"], event["detail"]["object-count"],
            event["detail"]["trigger"]) == (PREFIX, 2, "duration")


@pytest.mark.timeout(60)
def test_live_files_fire_by_quiet_period_on_the_first_tick_after_the_deadline(
    aws: Any, lambda_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from edp_testing import eventbridge

    # Given a 2 s quiet period and two files stored as they arrive (live traffic): the
    # batch's deadline is after the store invocation
    monkeypatch.setenv("EDP_BUCKET_THRESHOLD_DURATION", "2")
    written = time.time()
    records = [{"messageId": f"m-{n}", "body": json.dumps(eventbridge(
                   f"{PREFIX}live-{n}.txt", written, bucket="source-bucket")),
                "eventSource": "aws:sqs",
                "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:edp-ingest"}
               for n in range(2)]
    assert handlers.store_handler({"Records": records}, None) == {"batchItemFailures": []}
    assert handlers.emit_handler(load_event("aws-scheduled-event.json"), None)["fired"] == 0

    # When the schedule runs once the deadline passed (the store container idle, its
    # heartbeat far younger than worker_timeout, 60 s)
    time.sleep(max(0.0, written + 2.5 - time.time()))
    tick = handlers.emit_handler(load_event("aws-scheduled-event.json"), None)

    # Then the batch fires now, by quiet period, and is published
    assert (tick["fired"], tick["delivered"]) == (1, 1), tick
    [event] = aws.collect(lambda_env["OUT_QUEUE"], 1)
    assert (event["detail"]["object-count"], event["detail"]["trigger"]) == (2, "duration")


@pytest.mark.timeout(60)
def test_records_fail_while_the_database_is_unreachable_then_heal(
    lambda_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a warm container whose database connection broke, and a database that
    # cannot be reached again for now
    sqs_event = load_event("aws-lambda-sqs-batch.json")
    ids = {r["messageId"] for r in sqs_event["Records"]}
    handlers.runtime("store").store.close()
    (tmp_path / "not-a-dir").write_text("")
    monkeypatch.setenv("EDP_DATABASE_URL", f"sqlite:///{tmp_path / 'not-a-dir' / 'x.db'}")

    # When a batch arrives
    caplog.set_level(logging.INFO)
    result = handlers.store_handler(sqs_event, None)

    # Then every record is reported failed (none is lost; the poison one too, as
    # its dead letter could not be committed either), and the handler did not raise
    assert {f["itemIdentifier"] for f in result["batchItemFailures"]} == ids
    # as soon as the store proves unreachable: trying every record on its own would
    # wait for the database each time (30 s on PostgreSQL), past the function's timeout
    assert "the store is unreachable" in caplog.text
    assert "SQS message" not in caplog.text  # no record was given up on its own

    # When the database is back and SQS delivers the records again
    monkeypatch.setenv("EDP_DATABASE_URL", lambda_env["EDP_DATABASE_URL"])
    again = handlers.store_handler(sqs_event, None)

    # Then they are stored
    assert again == {"batchItemFailures": []}
    assert [(b.prefix, b.object_count) for b in batches(lambda_env["EDP_DATABASE_URL"])] == [
        (PREFIX, 2)
    ]


@pytest.mark.timeout(60)
def test_a_broken_connection_heals_within_the_same_invocation(
    lambda_env: dict[str, str],
) -> None:
    # Given a warm container whose database connection broke
    handlers.runtime("store").store.close()

    # When a batch arrives
    result = handlers.store_handler(load_event("aws-lambda-sqs-batch.json"), None)

    # Then the handler reconnects and stores every record
    assert result == {"batchItemFailures": []}
    assert [(b.prefix, b.object_count) for b in batches(lambda_env["EDP_DATABASE_URL"])] == [
        (PREFIX, 2)
    ]


@pytest.mark.timeout(60)
def test_database_url_from_the_secret(aws: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given the secret deploy/edp.yaml creates (RDS attachment fields included)
    import boto3

    from edp.aws.secrets import resolve_database_url
    from edp.config import load_settings

    secret = {"username": "edp", "password": "p@ss/w:rd", "host": "db.example.internal",
              "port": 5432, "dbname": "edp", "engine": "postgres"}
    arn = boto3.client("secretsmanager").create_secret(
        Name="edp-db-secret", SecretString=json.dumps(secret)
    )["ARN"]
    monkeypatch.setenv("EDP_DATABASE_SECRET_ARN", arn)

    # When the database URL is resolved
    url = resolve_database_url(load_settings())

    # Then user and password are percent-encoded
    assert url == "postgresql://edp:p%40ss%2Fw%3Ard@db.example.internal:5432/edp"
    # And an explicit EDP_DATABASE_URL wins over the secret
    monkeypatch.setenv("EDP_DATABASE_URL", "sqlite:///x.db")
    assert resolve_database_url(load_settings()) == "sqlite:///x.db"
