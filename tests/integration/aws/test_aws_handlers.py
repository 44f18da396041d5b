"""The Lambda entry points, invoked in-process with realistic events (tests/events/aws-*)."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import orjson
import pytest

from edp.aws import handlers
from edp.errors import EdpError
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
    assert summary == {"waiting": None, "fired": 0, "delivered": 1, "failed": 0, "parked": 0,
                       "pruned": 3,
                       "pruned_history": {"events": 0, "batches": 0, "dead_letters": 0}}
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
def test_the_emit_function_fires_nothing_by_time_while_files_wait_in_the_ingest_queue(
    aws: Any, lambda_env: dict[str, str], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from edp_testing import eventbridge

    # Given a 2 s quiet period, the ingest queue named to the emit function (as
    # deploy/edp.yaml does), a file stored, and the next file of its batch, written half
    # a second later, still waiting in the queue (the store function capped or throttled)
    queue, _ = aws.queue("ingest")
    monkeypatch.setenv("EDP_BUCKET_THRESHOLD_DURATION", "2")
    monkeypatch.setenv("EDP_SQS_QUEUES", queue)
    written = time.time()
    assert handlers.store_handler(sqs_records((f"{PREFIX}a.txt", written)), None) == {
        "batchItemFailures": []}
    aws.sqs.send_message(QueueUrl=queue, MessageBody=json.dumps(eventbridge(
        f"{PREFIX}b.txt", written + 0.5, bucket="source-bucket")))
    # When the schedule runs after the first file's quiet period ran out
    sleep_until(written + 2.5)
    early = tick()
    # Then it fires nothing by time: the batch's other file is still on its way
    assert (early["waiting"], early["fired"]) == (1, 0), early
    assert counts_of(lambda_env["EDP_DATABASE_URL"]) == [(PREFIX, "open", 1)]
    # When the store function takes the waiting file, and the schedule runs again
    [message] = aws.sqs.receive_message(QueueUrl=queue, WaitTimeSeconds=1)["Messages"]
    aws.sqs.delete_message(QueueUrl=queue, ReceiptHandle=message["ReceiptHandle"])
    assert handlers.store_handler({"Records": [{
        "messageId": message["MessageId"], "body": message["Body"], "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:edp-ingest"}]}, None) == {
        "batchItemFailures": []}
    sleep_until(written + 3.2)
    later = tick()
    # Then the one batch holds both files
    assert later["waiting"] == 0
    assert counts_of(lambda_env["EDP_DATABASE_URL"]) == [(PREFIX, "closed", 2)]


@pytest.mark.timeout(60)
def test_an_ingest_queue_the_emit_function_cannot_read_is_said_once(
    aws: Any, lambda_env: dict[str, str], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given an ingest queue the emit function cannot read (a stack whose emit role
    # lacks sqs:GetQueueAttributes answers likewise)
    queue, _ = aws.queue("ingest")
    monkeypatch.setenv("EDP_BUCKET_THRESHOLD_DURATION", "2")
    monkeypatch.setenv("EDP_SQS_QUEUES", f"{queue}-gone")
    monkeypatch.setattr(handlers, "_unreadable_queues", {})
    # Then firing by time goes on without it, and the warning is logged once
    assert handlers.store_handler(sqs_records((f"{PREFIX}c.txt", time.time())), None) == {
        "batchItemFailures": []}
    sleep_until(time.time() + 2.5)
    with caplog.at_level(logging.WARNING, logger="edp"):
        assert tick()["fired"] == 1
        tick()
    warnings = [r for r in caplog.records if "cannot read how many messages" in r.message]
    assert len(warnings) == 1
    # And it is asked again only after a while (each try may cost a connection timeout)
    aws.sqs.create_queue(QueueName=f"{queue.rsplit('/', 1)[1]}-gone")
    assert tick()["waiting"] is None
    monkeypatch.setattr(handlers, "ASK_AGAIN_AFTER", 0.0)
    assert tick()["waiting"] == 0


@pytest.mark.timeout(60)
def test_an_unreadable_ingest_queue_is_asked_again_by_the_wall_clock(
    aws: Any, lambda_env: dict[str, str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    import types

    # Given an ingest queue the emit function could not read, in a container whose
    # monotonic clock stands still between invocations (Lambda freezes it then)
    queue, _ = aws.queue("ingest")
    monkeypatch.setenv("EDP_SQS_QUEUES", f"{queue}-gone")
    monkeypatch.setattr(handlers, "_unreadable_queues", {})
    monkeypatch.setattr(handlers, "ASK_AGAIN_AFTER", 1.0)
    frozen = time.monotonic()
    monkeypatch.setattr(handlers, "time", types.SimpleNamespace(
        time=time.time, sleep=time.sleep, monotonic=lambda: frozen))
    assert tick()["waiting"] is None
    # When the queue can be read, and ASK_AGAIN_AFTER has passed on the wall clock
    aws.sqs.create_queue(QueueName=f"{queue.rsplit('/', 1)[1]}-gone")
    time.sleep(1.2)
    # Then it is asked again
    assert tick()["waiting"] == 0


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
    with pytest.raises(EdpError, match=f"{len(ids)} SQS record") as failed:
        handlers.store_handler(sqs_event, None)

    # Then the invocation fails (Lambda's error metric shows it), so every record
    # comes again (none is lost; the poison one too, as its dead letter could not be
    # committed either),
    assert "come again" in str(failed.value)
    # as soon as the store proves unreachable: trying every record on its own would
    # wait for the database each time (30 s on PostgreSQL), past the function's timeout
    # (here when the container rebuilds its runtime: it cannot start)
    assert "cannot start" in caplog.text or "the store is unreachable" in caplog.text
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

    # Then user and password are percent-encoded, and TLS is required (libpq's default
    # would fall back to plain text)
    assert url == ("postgresql://edp:p%40ss%2Fw%3Ard@db.example.internal:5432/edp"
                   "?sslmode=require")
    # And an explicit EDP_DATABASE_URL wins over the secret
    monkeypatch.setenv("EDP_DATABASE_URL", "sqlite:///x.db")
    assert resolve_database_url(load_settings()) == "sqlite:///x.db"


def test_debug_logging_never_shows_the_secret(
    aws: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a database secret, and an operator who turned on DEBUG logging (botocore
    # then logs every response body)
    import boto3

    from edp.aws.secrets import read_secret

    arn = boto3.client("secretsmanager").create_secret(
        Name="edp-debug-secret", SecretString=json.dumps({"password": "hunter2-xyz"})
    )["ARN"]
    # When the secret is read
    with caplog.at_level(logging.DEBUG):
        assert read_secret(arn)["password"] == "hunter2-xyz"
    # Then botocore logged the call, but not the answer that holds the password
    assert any(r.name.startswith("botocore") for r in caplog.records)
    assert "hunter2-xyz" not in caplog.text



@pytest.mark.timeout(60)
def test_operators_commands_find_the_store_through_the_secret(aws: Any) -> None:
    # Given the functions' store named only by its Secrets Manager secret (a fresh
    # PostgreSQL database of this machine's server), which a worker has upgraded
    import subprocess
    from urllib.parse import urlsplit

    import boto3

    from integration.aws.conftest import EDP
    from integration.postgres.pg_testing import fresh_database, require_server

    require_server()
    with fresh_database("secret") as url:
        parts = urlsplit(url)
        secret = {"username": parts.username, "password": parts.password or "trust-ignores-it",
                  "host": parts.hostname, "port": parts.port or 5432,
                  "dbname": parts.path.lstrip("/"), "engine": "postgres"}
        arn = boto3.client("secretsmanager").create_secret(
            Name="edp-ops-secret", SecretString=json.dumps(secret))["ARN"]
        env = {**os.environ, "EDP_DATABASE_SECRET_ARN": arn}
        upgraded = subprocess.run([*EDP, "db", "upgrade"], env=env, capture_output=True,
                                  text=True, timeout=60)
        assert upgraded.returncode == 0, upgraded.stderr
        # When an operator asks for the store's status with that environment
        status = subprocess.run([*EDP, "db", "status"], env=env, capture_output=True,
                                text=True, timeout=60)
        # Then it reads that database (not a local SQLite file of the default path)
        assert status.returncode == 0, status.stderr
        assert "postgresql://" in status.stdout, status.stdout
        assert not (Path(os.environ["XDG_DATA_HOME"]) / "edp").exists()

# -- holds: records not stored come again only after the visibility timeout ----------
QUIET, VISIBILITY, MARGIN = 2.0, 3, 3.0  # a hold lasts VISIBILITY + MARGIN
POISON = [f"{PREFIX}poison-{n}.csv" for n in range(3)]


@pytest.fixture
def holds_env(lambda_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A 2 s quiet period, a 3 s visibility timeout, holds 3 s past it, containers that
    stop counting as live 1 s after their last step (only holds keep a batch open
    longer), and steps that fail (not for the store) on the POISON keys."""
    from edp_testing import FailsOnKey

    monkeypatch.setenv("EDP_BUCKET_THRESHOLD_DURATION", str(int(QUIET)))
    monkeypatch.setenv("EDP_SQS_VISIBILITY_TIMEOUT", str(VISIBILITY))
    monkeypatch.setenv("EDP_WORKER_TIMEOUT", "1")
    monkeypatch.setattr(handlers, "HOLD_MARGIN", MARGIN)
    monkeypatch.setattr(handlers, "_outages", {})
    monkeypatch.setattr(handlers, "build_observers",
                        lambda settings: [FailsOnKey(key) for key in POISON])
    handlers.reset_runtime()
    return lambda_env


def sqs_records(*files: tuple[str, float]) -> dict[str, Any]:
    from edp_testing import eventbridge

    return {"Records": [
        {"messageId": f"m-{key}", "body": json.dumps(eventbridge(key, t, bucket="source-bucket")),
         "eventSource": "aws:sqs",
         "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:edp-ingest"}
        for key, t in files]}


def tick() -> dict[str, Any]:
    return handlers.emit_handler(load_event("aws-scheduled-event.json"), None)


def sleep_until(t: float) -> None:
    time.sleep(max(0.0, t - time.time()))


def counts_of(url: str) -> list[tuple[str, str, int]]:
    return sorted((b.prefix, b.state, b.object_count) for b in batches(url))


def hold_end(url: str) -> float:
    """The latest end of a hold published in the database."""
    import sqlite3

    with closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as conn:
        return float(conn.execute("SELECT max(held_until) FROM workers").fetchone()[0])


def unreachable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The database cannot be reached from now on (a container's next connection fails)."""
    handlers.reset_runtime()
    (tmp_path / "not-a-dir").write_text("")
    monkeypatch.setenv("EDP_DATABASE_URL", f"sqlite:///{tmp_path / 'not-a-dir' / 'x.db'}")


KILL_IN_STEP = """
import json, os, signal, sys
from edp.aws import handlers

class KillsTheContainer:  # the step is cut short, as by the function's timeout
    def observe(self, tx, events, **_):
        os.kill(os.getpid(), signal.SIGKILL)
    def tick(self, tx, **_):
        return 0
    def after_commit(self, store, **_):
        return 0

handlers.build_observers = lambda settings: [KillsTheContainer()]
handlers.HOLD_MARGIN = float(sys.argv[2])
handlers.store_handler(json.loads(sys.argv[1]), None)
"""


@pytest.mark.timeout(60)
def test_a_store_step_cut_short_holds_its_batch_until_its_records_are_back(
    holds_env: dict[str, str],
) -> None:
    import subprocess
    import sys

    url = holds_env["EDP_DATABASE_URL"]
    # Given a file of a prefix stored as it arrived
    t0 = time.time()
    handlers.store_handler(sqs_records((f"{PREFIX}a.csv", t0)), None)
    # When a second file's step dies in another container (its record comes again
    # after the visibility timeout)
    late = sqs_records((f"{PREFIX}b.csv", t0 + 0.5))
    died = subprocess.run([sys.executable, "-c", KILL_IN_STEP, json.dumps(late), str(MARGIN)],
                          capture_output=True, text=True, timeout=30)
    assert died.returncode == -9, died.stderr
    # Then the schedule, past the batch's deadline, does not fire it
    sleep_until(t0 + QUIET + 1)
    assert tick()["fired"] == 0
    assert counts_of(url) == [(PREFIX, "open", 1)]
    # When the record comes again, Then it joins the batch, which fires whole once
    # the hold is over
    end = hold_end(url)
    assert handlers.store_handler(late, None) == {"batchItemFailures": []}
    assert tick()["fired"] == 0
    assert counts_of(url) == [(PREFIX, "open", 2)]
    sleep_until(end + 0.5)
    assert tick()["fired"] == 1
    assert counts_of(url) == [(PREFIX, "closed", 2)]


@pytest.mark.timeout(60)
def test_records_the_store_could_not_reach_hold_their_batch_from_the_next_success(
    holds_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = holds_env["EDP_DATABASE_URL"]
    other = "instrument/other-run/"
    # Given a file of a prefix stored as it arrived
    t0 = time.time()
    handlers.store_handler(sqs_records((f"{PREFIX}a.csv", t0)), None)
    # When the next file of the prefix cannot be stored (the database is unreachable),
    # and then the database is back, and a batch of a file of another prefix and a
    # record that fails alone is stored (its runtime replaced after that failure)
    unreachable(tmp_path, monkeypatch)
    late = sqs_records((f"{PREFIX}b.csv", t0 + 0.5))
    with pytest.raises(EdpError, match="come again"):  # (the invocation fails)
        handlers.store_handler(late, None)
    monkeypatch.setenv("EDP_DATABASE_URL", url)
    back = time.time()
    result = handlers.store_handler(
        sqs_records((f"{other}c.csv", back), (POISON[0], back)), None)
    assert result == {"batchItemFailures": [{"itemIdentifier": f"m-{POISON[0]}"}]}
    # Then the schedule, past the first batch's deadline, does not fire it
    sleep_until(t0 + QUIET + 1)
    tick()
    assert (PREFIX, "open", 1) in counts_of(url)
    # When the record comes again, Then it joins it, and the batch fires whole once
    # the hold (from the recovery) is over
    assert handlers.store_handler(late, None) == {"batchItemFailures": []}
    sleep_until(back + VISIBILITY + MARGIN + 0.5)
    tick()
    assert counts_of(url) == [(PREFIX, "closed", 2), (other, "closed", 1)]


@pytest.mark.timeout(60)
def test_the_emit_function_holds_once_it_reaches_the_store_again(
    holds_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = holds_env["EDP_DATABASE_URL"]
    # Given a file stored as it arrived, and a schedule run before its deadline
    t0 = time.time()
    handlers.store_handler(sqs_records((f"{PREFIX}a.csv", t0)), None)
    assert tick()["fired"] == 0
    # When the next run cannot reach the database (store steps may have failed
    # meanwhile: their records are away), and the one after can, past the deadline
    unreachable(tmp_path, monkeypatch)
    with pytest.raises(OSError):  # (the store module: the path is not a directory)
        tick()
    monkeypatch.setenv("EDP_DATABASE_URL", url)
    sleep_until(t0 + QUIET + 1)
    # Then it does not fire the batch yet; it does once the hold is over (it began
    # then: store steps may have failed until then)
    back = time.time()
    assert tick()["fired"] == 0
    sleep_until(back + VISIBILITY + MARGIN + 0.5)
    assert tick()["fired"] == 1
    assert counts_of(url) == [(PREFIX, "closed", 1)]


@pytest.mark.timeout(60)
def test_the_emit_function_publishes_its_hold_also_while_messages_wait(
    aws: Any, holds_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = holds_env["EDP_DATABASE_URL"]
    queue, _ = aws.queue("ingest")
    monkeypatch.setenv("EDP_SQS_QUEUES", queue)
    # Given an emit container that reached the store before, then could not
    handlers.store_handler(sqs_records((f"{PREFIX}a.csv", time.time())), None)
    tick()
    unreachable(tmp_path, monkeypatch)
    with pytest.raises(OSError):
        tick()
    monkeypatch.setenv("EDP_DATABASE_URL", url)
    # When it reaches the store again while messages wait in the ingest queue (after
    # an outage there is a backlog)
    aws.sqs.send_message(QueueUrl=queue, MessageBody="{}")
    back = time.time()
    summary = tick()
    # Then it fires nothing by time, and still publishes its hold, for the store
    # containers' steps not to fire past records the outage sent away
    assert (summary["waiting"], summary["fired"]) == (1, 0)
    assert hold_end(url) >= back + VISIBILITY + MARGIN - 0.5


@pytest.mark.timeout(60)
def test_the_emit_function_waiting_on_the_queue_holds_no_further_than_its_hold(
    aws: Any, holds_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = holds_env["EDP_DATABASE_URL"]
    queue, _ = aws.queue("ingest")
    monkeypatch.setenv("EDP_SQS_QUEUES", queue)
    monkeypatch.setenv("EDP_WORKER_TIMEOUT", "30")  # (a live row stays live here)
    other = "instrument/other-run/"
    # Given a file stored as it arrived, and a new emit container (it never fired)
    # that could not reach the store past the file's deadline: it holds from there
    t0 = time.time()
    handlers.store_handler(sqs_records((f"{PREFIX}a.csv", t0)), None)
    unreachable(tmp_path, monkeypatch)
    sleep_until(t0 + QUIET + 0.5)
    with pytest.raises(OSError):
        tick()
    monkeypatch.setenv("EDP_DATABASE_URL", url)
    # When it reaches the store again while messages wait in the ingest queue
    aws.sqs.send_message(QueueUrl=queue, MessageBody="{}")
    assert tick()["fired"] == 0
    # Then it publishes its hold and no clock of a container that has seen nothing
    # (the lowest time, which would keep every other worker from firing anything):
    # a store step fires what the hold lets it
    with closing(open_store(url)) as store:
        floors = store.floors("someone-else", now=time.time(), timeout=30.0)
    assert floors.held is not None and floors.held >= t0 + QUIET
    assert floors.clock is None or floors.clock >= floors.held, floors
    handlers.store_handler(sqs_records((f"{other}b.csv", time.time())), None)
    assert (PREFIX, "closed", 1) in counts_of(url)


@pytest.mark.timeout(60)
def test_a_record_failing_alone_holds_nothing(holds_env: dict[str, str]) -> None:
    url = holds_env["EDP_DATABASE_URL"]
    # Given a file of a prefix
    t0 = time.time()
    handlers.store_handler(sqs_records((f"{PREFIX}a.csv", t0)), None)
    # When a batch with a record whose step fails (not for the store) and a good file
    # of the prefix fails, is tried one by one, and only that record fails
    result = handlers.store_handler(
        sqs_records((POISON[0], t0 + 0.2), (f"{PREFIX}b.csv", t0 + 0.4)), None)
    assert result == {"batchItemFailures": [{"itemIdentifier": f"m-{POISON[0]}"}]}
    # Then nothing holds the batch past its deadline: it would hold again at each return
    sleep_until(t0 + 0.4 + QUIET + 1.2)
    assert tick()["fired"] == 1
    assert counts_of(url) == [(PREFIX, "closed", 2)]


@pytest.mark.timeout(60)
def test_records_left_untried_hold_their_batch_and_failing_ones_do_not(
    holds_env: dict[str, str],
) -> None:
    url = holds_env["EDP_DATABASE_URL"]
    other = "instrument/other-run/"
    # Given a file of a prefix, and a batch of three records that each fail alone
    t0 = time.time()
    handlers.store_handler(sqs_records((f"{PREFIX}a.csv", t0)), None)
    failing = sqs_records(*((key, t0) for key in POISON))
    assert len(handlers.store_handler(failing, None)["batchItemFailures"]) == 3
    # Then nothing holds the batch past its deadline
    sleep_until(t0 + QUIET + 1)
    assert tick()["fired"] == 1
    # When a file of another prefix is stored, and then a batch of those three and a
    # second file of that prefix, left untried after three failures in a row
    t1 = time.time()
    handlers.store_handler(sqs_records((f"{other}c.csv", t1)), None)
    untried = sqs_records(*((key, t1) for key in POISON), (f"{other}d.csv", t1 + 0.2))
    assert len(handlers.store_handler(untried, None)["batchItemFailures"]) == 4
    # Then the batch the untried file belongs to is held past its deadline
    sleep_until(t1 + QUIET + 1)
    assert tick()["fired"] == 0
    assert (other, "open", 1) in counts_of(url)
    # And once that file came again, the batch fires whole after the hold
    assert handlers.store_handler(sqs_records((f"{other}d.csv", t1 + 0.2)), None) == {
        "batchItemFailures": []}
    sleep_until(hold_end(url) + 0.5)
    tick()
    assert counts_of(url) == [(PREFIX, "closed", 1), (other, "closed", 2)]


@pytest.mark.timeout(60)
def test_a_worker_id_set_for_the_functions_is_warned_about(
    lambda_env: dict[str, str], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given worker_id set in the functions' environment (every container would share it)
    monkeypatch.setenv("EDP_WORKER_ID", "edp-lambda")
    handlers.reset_runtime()
    # When a container builds its runtime, Then it says why that is wrong
    caplog.set_level(logging.WARNING)
    handlers.store_handler(load_event("aws-lambda-sqs-batch.json"), None)
    assert "worker_id is set (edp-lambda)" in caplog.text
    assert "leave it unset for the Lambda functions" in caplog.text


@pytest.mark.timeout(60)
@pytest.mark.parametrize("payload", [None, [1], "hello", 7])
def test_a_direct_payload_that_is_no_event_is_dead_lettered(
    aws: Any, lambda_env: dict[str, str], payload: Any
) -> None:
    # When the store function is invoked directly with a payload that is no S3 event
    # (JSON null, a list, a string, a number)
    result = handlers.store_handler(payload, None)
    # Then it is kept as a dead letter with its JSON text, and nothing failed
    assert result.get("rejected") == 1, result
    store = open_store(lambda_env["EDP_DATABASE_URL"])
    try:
        [letter] = store.dead_letters()
    finally:
        store.close()
    assert letter.source == "lambda"
    assert letter.body == (payload if isinstance(payload, str) else orjson.dumps(payload).decode())



def secret_unreadable(monkeypatch: pytest.MonkeyPatch, *, until_url: str = "") -> None:
    """The functions' store named by a secret that cannot be read; with ``until_url``,
    the store's URL given again instead."""
    if until_url:
        monkeypatch.delenv("EDP_DATABASE_SECRET_ARN")
        monkeypatch.setenv("EDP_DATABASE_URL", until_url)
        return
    monkeypatch.delenv("EDP_DATABASE_URL")
    monkeypatch.setenv("EDP_DATABASE_SECRET_ARN",
                       "arn:aws:secretsmanager:us-east-1:123456789012:secret:edp-none-AbCdEf")
    handlers.reset_runtime()

def test_records_come_again_whole_when_the_function_cannot_start_and_hold_after(
    holds_env: dict[str, str], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = holds_env["EDP_DATABASE_URL"]
    # Given a store function whose database secret cannot be read
    secret_unreadable(monkeypatch)
    # When a batch of two records arrives
    caplog.set_level(logging.INFO)
    t0 = time.time()
    # Then the invocation fails (Lambda's error metric shows it): both come again, and
    # no record was blamed (none tried one by one)
    with pytest.raises(EdpError, match="cannot start; its 2 SQS record"):
        handlers.store_handler(
            sqs_records((f"{PREFIX}a.csv", t0), (f"{PREFIX}b.csv", t0)), None)
    assert "one by one" not in caplog.text
    # When the function starts again and stores another record
    secret_unreadable(monkeypatch, until_url=url)
    assert handlers.store_handler(sqs_records(("instrument/other/c.csv", time.time())),
                                  None) == {"batchItemFailures": []}
    # Then it holds for the records that come again, as after an outage
    assert hold_end(url) > time.time()


def test_a_direct_event_the_function_cannot_start_for_fails_and_holds_after(
    holds_env: dict[str, str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    from edp_testing import eventbridge

    url = holds_env["EDP_DATABASE_URL"]
    # Given a store function whose database secret cannot be read
    secret_unreadable(monkeypatch)
    # When EventBridge invokes it with an event, Then it fails (Lambda invokes it again)
    with pytest.raises(EdpError, match="cannot start"):
        handlers.store_handler(eventbridge(f"{PREFIX}a.csv", time.time(),
                                           bucket="source-bucket"), None)
    # And once it starts again and stores another event, it holds for the first
    secret_unreadable(monkeypatch, until_url=url)
    handlers.store_handler(eventbridge("instrument/other/c.csv", time.time(),
                                       bucket="source-bucket"), None)
    assert hold_end(url) > time.time()
