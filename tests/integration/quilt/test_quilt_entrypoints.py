"""``edp package`` (file, stdin, SQS) and the Lambda handler."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from edp.cli import main
from edp.quilt import handler
from integration.quilt.quilt_support import batch_event, local_revisions, put_files, s3_revisions

pytestmark = pytest.mark.timeout(90)

PREFIX = "instrument/exp-1/"


def test_edp_package_reads_json_lines_and_prints_one_result_per_event(
    tmp_path: Path, quilt: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a local root with one batch, and a file with its event and a broken line
    folder = tmp_path / "lab" / PREFIX
    folder.mkdir(parents=True)
    (folder / "a.txt").write_text("a")
    events = tmp_path / "events.jsonl"
    events.write_text(json.dumps(batch_event("lab", PREFIX)) + "\n\nnot json\n")
    registry = tmp_path / "registry"
    monkeypatch.chdir(tmp_path)

    # When `edp package FILE --local-root DIR --registry DIR` runs
    result = CliRunner().invoke(main, ["package", str(events), "--local-root", str(tmp_path),
                                       "--registry", str(registry)])

    # Then stdout has one JSON result per event, the exit status reports the failure
    assert result.exit_code == 1, result.output
    first, second = (json.loads(line) for line in result.stdout.splitlines())
    assert first["status"] == "pushed"
    assert first["package"] == "instrument/exp-1"
    assert second["status"] == "failed"
    assert second["error"].startswith("line 3: ")
    assert "1 event(s) failed" in result.stderr
    assert len(local_revisions(registry, "instrument/exp-1")) == 1


def test_edp_package_reads_stdin(tmp_path: Path, quilt: Any,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "lab" / PREFIX).mkdir(parents=True)
    (tmp_path / "lab" / PREFIX / "a.txt").write_text("a")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EDP_PACKAGE_LOCAL_ROOT", str(tmp_path))
    result = CliRunner().invoke(main, ["package", "-"],
                                input=json.dumps(batch_event("lab", PREFIX)) + "\n")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["registry"] == (tmp_path / "lab").as_uri()


def test_edp_package_needs_exactly_one_input() -> None:
    result = CliRunner().invoke(main, ["package"])
    assert result.exit_code == 2
    assert "either FILE" in result.output


def test_edp_package_consumes_an_sqs_queue_and_keeps_what_may_succeed_later(
    aws: Callable[[str], Any], make_bucket: Callable[[str], str], quilt: Any,
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a queue with a batch event, and one whose bucket does not exist (yet)
    s3, sqs = aws("s3"), aws("sqs")
    bucket = make_bucket("sqsrc")
    put_files(s3, bucket, {f"{PREFIX}a.txt": b"a", f"{PREFIX}b.txt": b"b"})
    queue = sqs.create_queue(QueueName=f"{bucket}-ready",
                             Attributes={"VisibilityTimeout": "60"})["QueueUrl"]
    sqs.send_message(QueueUrl=queue, MessageBody=json.dumps(batch_event(bucket, PREFIX)))
    sqs.send_message(QueueUrl=queue,
                     MessageBody=json.dumps(batch_event(f"{bucket}-missing", PREFIX)))

    # When `edp package --sqs-queue URL --once` runs (no edp.toml in its directory)
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.INFO, logger="edp"):
        result = CliRunner().invoke(main, ["package", "--sqs-queue", queue, "--once"])

    # Then the failure is logged once, saying why and what became of the message
    [said] = [r.getMessage() for r in caplog.records if "-missing" in r.getMessage()]
    assert "kept in the queue for a retry" in said
    assert "NoSuchBucket" in said or "does not exist" in said, said
    # And the good batch is packaged and deleted; the other stays for a retry
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(line["status"] for line in lines) == ["failed", "pushed"]
    assert [line["retryable"] for line in lines if line["status"] == "failed"] == [True]
    assert len(s3_revisions(s3, bucket, "instrument/exp-1")) == 1
    attrs = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["All"])["Attributes"]
    assert attrs["ApproximateNumberOfMessages"] == "0"
    assert attrs["ApproximateNumberOfMessagesNotVisible"] == "1"
    assert result.exit_code == 1


@pytest.fixture
def lambda_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A fresh handler configured from EDP_* variables, as in a Lambda function."""
    monkeypatch.setattr(handler, "_packager", [])
    monkeypatch.setenv("EDP_PACKAGE_METADATA", '{"Pipeline": "lambda"}')
    monkeypatch.chdir(tmp_path)


def test_the_lambda_handler_packages_an_eventbridge_event(
    aws: Callable[[str], Any], make_bucket: Callable[[str], str], quilt: Any, lambda_env: None
) -> None:
    s3 = aws("s3")
    bucket = make_bucket("lambda")
    put_files(s3, bucket, {f"{PREFIX}a.txt": b"a"})

    result = handler.package_handler(batch_event(bucket, PREFIX), None)

    assert result["status"] == "pushed"
    pkg = quilt.Package.browse("instrument/exp-1", registry=f"s3://{bucket}")
    assert pkg.meta["Pipeline"] == "lambda"


def test_the_lambda_handler_reports_sqs_records_to_retry(
    aws: Callable[[str], Any], make_bucket: Callable[[str], str], quilt: Any, lambda_env: None
) -> None:
    s3 = aws("s3")
    bucket = make_bucket("lambdasqs")
    put_files(s3, bucket, {f"{PREFIX}a.txt": b"a"})
    records = [
        {"messageId": "ok", "eventSource": "aws:sqs",
         "body": json.dumps(batch_event(bucket, PREFIX))},
        {"messageId": "later", "eventSource": "aws:sqs",
         "body": json.dumps(batch_event(f"{bucket}-missing", PREFIX))},
        {"messageId": "never", "eventSource": "aws:sqs", "body": "garbage"},
    ]

    response = handler.package_handler({"Records": records}, None)

    assert response == {"batchItemFailures": [{"itemIdentifier": "later"}]}
    assert len(s3_revisions(s3, bucket, "instrument/exp-1")) == 1


def test_edp_package_keeps_a_message_that_fails_for_good_as_a_dead_letter(
    aws: Callable[[str], Any], quilt: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    # Given a queue holding a message that is not a batch event at all
    sqs = aws("sqs")
    queue = sqs.create_queue(QueueName="poison-ready")["QueueUrl"]
    sqs.send_message(QueueUrl=queue, MessageBody="this is not json")
    url = f"sqlite:///{tmp_path / 'edp.db'}"
    monkeypatch.setenv("EDP_DATABASE_URL", url)
    monkeypatch.chdir(tmp_path)

    # When `edp package --sqs-queue URL --once` runs
    result = CliRunner().invoke(main, ["package", "--sqs-queue", queue, "--once"])

    # Then the message leaves the queue but is kept, with why, in the dead-letter table
    assert result.exit_code == 1
    attrs = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["All"])["Attributes"]
    assert attrs["ApproximateNumberOfMessages"] == "0"
    assert attrs["ApproximateNumberOfMessagesNotVisible"] == "0"
    from edp.store import open_store

    store = open_store(url)
    [letter] = store.dead_letters()
    store.close()
    assert letter.body == "this is not json"
    assert letter.location.startswith("message id ")
    assert letter.source == f"package:{queue}"


def test_the_queue_consumer_holds_one_message_at_a_time(
    aws: Callable[[str], Any], quilt: Any, tmp_path: Path,
) -> None:
    # Given two batch events in a queue (local mode: the files are folders)
    from edp.quilt.packager import Packager
    from edp.quilt.queue import consume_queue
    from integration.quilt.quilt_support import quilt_settings

    sqs = aws("sqs")
    queue = sqs.create_queue(QueueName="one-at-a-time",
                             Attributes={"VisibilityTimeout": "60"})["QueueUrl"]
    for prefix in ("inst/exp-1/", "inst/exp-2/"):
        (tmp_path / "lab" / prefix).mkdir(parents=True)
        (tmp_path / "lab" / prefix / "a.txt").write_text(prefix)
        sqs.send_message(QueueUrl=queue, MessageBody=json.dumps(batch_event("lab", prefix)))
    packager = Packager(quilt_settings(), local_root=tmp_path, registry=str(tmp_path / "reg"))
    in_flight: list[str] = []

    def seen(result: Any) -> None:
        attrs = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["All"])["Attributes"]
        in_flight.append(attrs["ApproximateNumberOfMessagesNotVisible"])

    # When the consumer packages them
    handled = consume_queue(packager, queue, client=sqs, on_result=seen, until_empty=True)

    # Then while one was packaged the other was still in the queue, not waiting in hand
    # (its visibility timeout would run while it waits: it could come back, twice packaged)
    assert handled == 2
    assert in_flight == ["1", "1"]


def test_edp_package_on_a_queue_long_polls_for_sqs_wait_seconds(
    aws: Callable[[str], Any], quilt: Any, tmp_path: Path,
) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time
    import uuid

    # Given a queue holding one batch event (of a bucket that does not exist: it fails,
    # and waits in the queue for a retry), and the setting sqs_wait_seconds = 1
    sqs = aws("sqs")
    queue = sqs.create_queue(QueueName=f"wait-{uuid.uuid4().hex[:8]}",
                             Attributes={"VisibilityTimeout": "120"})["QueueUrl"]
    sqs.send_message(QueueUrl=queue, MessageBody=json.dumps(batch_event("no-such-bkt", PREFIX)))
    consumer = subprocess.Popen(
        [sys.executable, "-m", "edp", "package", "--sqs-queue", queue],
        env={**os.environ, "EDP_SQS_WAIT_SECONDS": "1"}, cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        # When it has handled the event (so it is in its next receive) and is stopped
        assert consumer.stdout is not None
        assert json.loads(consumer.stdout.readline())["status"] == "failed"
        # (emptied, so that its receives long-poll: moto answers at once while a
        # message is in flight)
        sqs.purge_queue(QueueUrl=queue)
        time.sleep(2.5)
        stopping = time.monotonic()
        consumer.send_signal(signal.SIGTERM)
        consumer.wait(timeout=30)
        # Then it stops once that receive ends: a long poll of the setting's second,
        # not of the command's own 20 s
        assert time.monotonic() - stopping < 10
    finally:
        consumer.kill()
        consumer.communicate()
