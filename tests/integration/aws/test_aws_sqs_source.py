"""The SQS source on its own: receipts, caught-up, acknowledgement, visibility, checks."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from edp.cli import main
from edp.config import load_settings
from edp.errors import ConfigError
from edp.sources.sqs import SqsSource
from edp_testing import FailsOnKey


def counts(aws: Any, url: str) -> tuple[int, int]:
    attributes = aws.sqs.get_queue_attributes(
        QueueUrl=url,
        AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"]
    return (int(attributes["ApproximateNumberOfMessages"]),
            int(attributes["ApproximateNumberOfMessagesNotVisible"]))


@contextmanager
def daemon_on(source: SqsSource, tmp_path: Path) -> Iterator[Any]:
    """A daemon on ``source`` alone (SQLite store, a list sink, no back-off between
    rounds); closes both after."""
    from edp.bootstrap import build_runtime
    from edp.daemon import Daemon
    from edp_testing import ListSink, settings

    runtime = build_runtime(settings(database_url=f"sqlite:///{tmp_path / 'd.db'}"),
                            sinks=[ListSink()])
    try:
        yield Daemon(runtime, [source], max_wait=0, error_backoff=0)
    finally:
        source.close()
        runtime.close()


@pytest.mark.timeout(30)
def test_receive_names_each_message_and_deletes_only_on_ack(aws: Any) -> None:
    # Given a queue with 12 messages and a source taking 10 at a time
    url, _ = aws.queue("src")
    ids = [aws.sqs.send_message(QueueUrl=url, MessageBody=f'{{"n": {n}}}')["MessageId"]
           for n in range(12)]
    source = SqsSource(url, wait_seconds=0, max_messages=10)

    # When it receives
    first = source.receive(wait=0)

    # Then it got a full batch (so it is not caught up), each message named by its id
    assert len(first.messages) == 10 and not first.caught_up
    assert {m.location for m in first.messages} <= {f"message id {i}" for i in ids}
    assert {m.source for m in first.messages} == {f"sqs:{url}"}
    assert counts(aws, url) == (2, 10)

    # When the rest is received and both receives are acknowledged
    second = source.receive(wait=0)
    assert len(second.messages) == 2 and second.caught_up
    source.ack(first)
    source.ack(second)

    # Then the queue is empty
    assert counts(aws, url) == (0, 0)
    source.close()


@pytest.mark.timeout(30)
def test_visibility_is_extended_while_a_step_holds_messages(aws: Any) -> None:
    # Given a source with a 2 s visibility timeout that received a message
    url, _ = aws.queue("slow")
    aws.sqs.send_message(QueueUrl=url, MessageBody="{}")
    source = SqsSource(url, wait_seconds=0, visibility_timeout=2)
    received = source.receive(wait=0)
    assert len(received.messages) == 1

    # When the step takes longer than the timeout
    time.sleep(3.5)

    # Then the message stayed invisible: another consumer does not get it
    other = aws.sqs.receive_message(QueueUrl=url, WaitTimeSeconds=0)
    assert other.get("Messages", []) == []
    assert source.keeper.extensions >= 1

    # And once acknowledged it is gone
    source.ack(received)
    assert counts(aws, url) == (0, 0)
    source.close()


@pytest.mark.timeout(30)
def test_an_abandoned_receive_comes_back_after_its_timeout(aws: Any) -> None:
    # Given a received message whose step failed (never acknowledged)
    url, _ = aws.queue("retry")
    aws.sqs.send_message(QueueUrl=url, MessageBody="{}")
    source = SqsSource(url, wait_seconds=0, visibility_timeout=2)
    assert len(source.receive(wait=0).messages) == 1

    # When the source receives again (the previous receive is abandoned: its
    # visibility is no longer extended), and again after the timeout
    assert source.receive(wait=0).messages == []
    time.sleep(2.3)
    again = source.receive(wait=0)

    # Then the same message is delivered again
    assert len(again.messages) == 1
    source.ack(again)
    source.close()


def losing_answers(aws: Any, name: str) -> tuple[SqsSource, list[Any], Any]:
    """A queue holding one message, and a source on it behind a network that loses the
    answer to each receive after the queue served it (the message is then invisible,
    and nobody holds it): the source, what the queue served, the hook doing it."""
    from botocore.exceptions import ReadTimeoutError

    url, _ = aws.queue(name)
    aws.sqs.send_message(QueueUrl=url, MessageBody="{}")
    source = SqsSource(url, wait_seconds=0, visibility_timeout=30)
    served: list[Any] = []

    def lose_the_answer(request: Any, **_: Any) -> None:
        served.append(aws.sqs.receive_message(QueueUrl=url, VisibilityTimeout=30))
        raise ReadTimeoutError(endpoint_url=request.url)

    source.receiver.meta.events.register("before-send.sqs.ReceiveMessage", lose_the_answer)
    return source, served, lose_the_answer


@pytest.mark.timeout(30)
def test_a_receive_whose_answer_is_lost_fails_once_saying_it_may_have_taken_messages(
    aws: Any,
) -> None:
    from edp.daemon import ReceiveFailed

    # Given a message, and a network that loses the answer to a receive
    source, served, hook = losing_answers(aws, "lost-answer")

    # When the source receives, Then it fails after one attempt (no retry of botocore's
    # that would not see the message, nor make a stop wait), saying it may have taken
    # messages
    with pytest.raises(ReceiveFailed, match="cannot receive") as failed:
        source.receive(wait=0)
    assert failed.value.maybe_taken
    assert len(served) == 1 and served[0]["Messages"]
    source.receiver.meta.events.unregister("before-send.sqs.ReceiveMessage", hook)
    # And the message is away until its visibility timeout ends
    assert source.receive(wait=0).messages == []
    source.close()


@pytest.mark.timeout(30)
def test_a_daemon_holds_firing_after_a_receive_whose_answer_was_lost(
    aws: Any, tmp_path: Path
) -> None:
    from edp.daemon import Daemon

    # Given a daemon whose receive loses its answer after the queue served it
    source, served, _ = losing_answers(aws, "lost-answer-daemon")
    with daemon_on(source, tmp_path) as daemon:
        engine = daemon.runtime.engine
        assert engine.held(daemon.clock()) is None
        # When it receives, Then the round goes on (the receive failed: an error counted)
        daemon.run_once()
        assert len(served) == 1 and served[0]["Messages"] and daemon.stats.errors == 1
        # And it holds firing for the visibility timeout and a margin, not longer
        now = daemon.clock()
        assert engine.held(now) is not None
        # ... published for the other workers (a round whose receive failed has no
        # step that would), and a stop meanwhile is not clean (its next start holds)
        assert daemon.runtime.store.worker_hold(engine.worker_id) is not None
        assert not daemon.stopped_cleanly
        assert engine.held(now + 30 + Daemon.REDELIVERY_MARGIN + 1) is None


def test_a_partly_bad_message_left_to_the_redrive_comes_again_after_a_failed_step(
    aws: Any, caplog: pytest.LogCaptureFixture,
) -> None:
    # Given poison left to the redrive policy, a message with a good record and a bad
    # one, and a message with nothing good in it
    from edp_testing import iso

    url, _ = aws.queue("partly")
    good = {"eventSource": "aws:s3", "eventName": "ObjectCreated:Put", "eventTime": iso(0),
            "s3": {"bucket": {"name": "b"}, "object": {"key": "a/b/c.csv"}}}
    aws.sqs.send_message(QueueUrl=url, MessageBody=json.dumps({"Records": [good, {"x": 1}]}))
    aws.sqs.send_message(QueueUrl=url, MessageBody="this is not JSON")
    source = SqsSource(url, wait_seconds=0, visibility_timeout=1, delete_poison=False)
    first = source.receive(wait=0)
    assert len(first.messages) == 2

    # When the step that read them failed (never acknowledged: the next receive abandons
    # them) and they come back after their visibility timeout
    assert source.receive(wait=0).messages == []
    time.sleep(1.3)
    again = source.receive(wait=0)

    # Then the partly bad one is handed to the engine again (its good record must not be
    # lost), while the wholly bad one only waits for the redrive
    assert [m.body for m in again.messages] == [json.dumps({"Records": [good, {"x": 1}]})]
    assert len(again.receipts) == 2
    # And once committed, the log tells the two apart (the good record counted)
    with caplog.at_level(logging.WARNING, logger="edp.sources.sqs"):
        source.ack(again)
    said = sorted(r.getMessage().split(" (see")[0].split(" ", 5)[5] for r in caplog.records)
    assert said == ["could not be decoded",
                    "holds records that could not be decoded (its other records count, once)"]
    source.close()


@pytest.mark.timeout(30)
def test_a_missing_queue_fails_at_start(aws: Any, tmp_path: Path) -> None:
    # Given a queue URL that does not exist
    url = aws.sqs.get_queue_url(QueueName=aws.queue("gone")[0].rsplit("/", 1)[1])["QueueUrl"]
    aws.sqs.delete_queue(QueueUrl=url)

    # When edp run starts on it
    result = CliRunner().invoke(main, ["run", "--sqs-queue", url, "--database-url",
                                       f"sqlite:///{tmp_path / 'x.db'}"])

    # Then it stops at once with a configuration error naming the queue
    assert result.exit_code == 2
    assert url in result.output and "cannot be used" in result.output


@pytest.mark.timeout(30)
@pytest.mark.parametrize("flag", ["--eventbridge-bus", "--sns-topic"])
def test_a_missing_bus_or_topic_fails_at_start(aws: Any, tmp_path: Path, flag: str) -> None:
    # Given a queue, and an EventBridge bus or SNS topic that does not exist
    url = aws.queue("in")[0]
    target = ("no-such-bus" if flag == "--eventbridge-bus"
              else "arn:aws:sns:us-east-1:123456789012:no-such-topic")

    # When edp run starts with it
    result = CliRunner().invoke(main, ["run", "--sqs-queue", url, flag, target,
                                       "--database-url", f"sqlite:///{tmp_path / 'x.db'}"])

    # Then it stops at once with a configuration error naming it (it used to start, and
    # retry each batch's delivery for ever)
    assert result.exit_code == 2, result.output
    assert target in result.output and "does not exist" in result.output


def test_edp_run_needs_a_queue(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["run", "--database-url", f"sqlite:///{tmp_path / 'x.db'}"])
    assert result.exit_code == 2
    assert "--sqs-queue" in result.output


@pytest.mark.parametrize(
    ("name", "value"),
    [("EDP_SQS_MAX_MESSAGES", "11"), ("EDP_SQS_WAIT_SECONDS", "21"),
     ("EDP_SQS_VISIBILITY_TIMEOUT", "0"), ("EDP_SQS_DELETE_POISON", "maybe")],
)
def test_sqs_settings_are_checked(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        load_settings()


def test_settings_accept_the_cloudformation_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given the variables deploy/edp.yaml sets on both Lambdas
    values = {
        "EDP_DATABASE_SECRET_ARN": "arn:aws:secretsmanager:us-east-1:123:secret:edp-AbC",
        "EDP_BUCKETS": "b1,b2", "EDP_BUCKET_IGNORE_PREFIXES": "raw/*",
        "EDP_BUCKET_PREFIX_DEPTH": "2", "EDP_BUCKET_THRESHOLD_DURATION": "300",
        "EDP_BUCKET_THRESHOLD_EVENT_COUNT": "20", "EDP_BUCKET_MAX_BATCH_AGE": "0",
        "EDP_BUCKET_COMPLETE_MARKERS": "", "EDP_EVENTBRIDGE_BUS": "quilt-edp",
        "EDP_EVENT_SOURCE": "com.quiltdata.edp", "EDP_REGION": "eu-west-1",
        "EDP_ACCOUNT": "123456789012",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)

    # When settings load, Then every one is taken
    settings = load_settings()
    assert settings.database_secret_arn == values["EDP_DATABASE_SECRET_ARN"]
    assert settings.eventbridge_bus == "quilt-edp"
    assert (settings.region, settings.account) == ("eu-west-1", "123456789012")
    assert settings.buckets == ("b1", "b2")


def test_the_webhook_secret_is_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDP_WEBHOOK_SECRET", "s3cr3t-value")
    result = CliRunner().invoke(main, ["config"])
    assert result.exit_code == 0
    assert "webhook_secret" in result.output and "s3cr3t-value" not in result.output


@pytest.mark.timeout(30)
def test_one_daemon_drains_several_queues_into_one_engine(aws: Any, tmp_path: Path) -> None:
    # Given two queues, one with EventBridge S3 events and one with S3 notifications
    # for the same prefix, and a daemon on both

    from edp_testing import ListSink, eventbridge, settings

    first, _ = aws.queue("a")
    second, _ = aws.queue("b")
    now = time.time()
    for n in range(2):
        aws.sqs.send_message(QueueUrl=first, MessageBody=json.dumps(
            eventbridge(f"lab/run 1/eb{n}.csv", now, bucket="bkt", sequencer=f"0{n}")))
        aws.sqs.send_message(QueueUrl=second, MessageBody=json.dumps(notification(
            "bkt", f"lab/run 1/s3 {n}.csv", now)))
    sink = ListSink()
    cfg = settings(bucket_threshold_event_count=4, database_url=f"sqlite:///{tmp_path / 'd.db'}")
    sources = [SqsSource(url, wait_seconds=1) for url in (first, second)]
    # When it runs until the batch is out
    run_daemon_until(cfg, sources, sink, lambda: sink.sent, timeout=15)

    # Then the four files from both queues made one batch, and both queues are empty
    assert [(e["detail"]["prefix"], e["detail"]["object-count"], e["detail"]["trigger"])
            for e in sink.sent] == [("lab/run 1/", 4, "count")]
    assert counts(aws, first) == counts(aws, second) == (0, 0)


def run_daemon_until(cfg: Any, sources: list[SqsSource], sink: Any, done: Any, *,
                     timeout: float, worker_id: str | None = None) -> None:
    """The real daemon (SQLite store) in a thread, on ``sources``, until ``done()`` is
    true or ``timeout`` seconds passed; then stopped."""
    import threading

    from edp.bootstrap import build_runtime
    from edp.daemon import Daemon

    daemons: list[Daemon] = []

    def work() -> None:  # SQLite connections belong to the thread that made them
        runtime = build_runtime(cfg, sinks=[sink], worker_id=worker_id)
        daemons.append(Daemon(runtime, sources, max_wait=1))
        try:
            daemons[0].run()
        finally:
            runtime.close()

    thread = threading.Thread(target=work)
    thread.start()
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        time.sleep(0.1)
    daemons[0].stop()
    thread.join(timeout=10)


def notification(bucket: str, key: str, t: float) -> dict[str, Any]:
    from urllib.parse import quote_plus

    from edp_testing import iso

    return {"Records": [{
        "eventSource": "aws:s3", "eventName": "ObjectCreated:Put", "eventTime": iso(t),
        "s3": {"bucket": {"name": bucket},
               "object": {"key": quote_plus(key, safe="/"), "size": 1, "eTag": "e"}},
    }]}


@pytest.mark.timeout(30)
def test_a_message_that_fails_every_step_does_not_hold_back_the_others(
    aws: Any, tmp_path: Path
) -> None:
    # Given a queue holding two good S3 events around one whose step always fails
    from edp.bootstrap import build_runtime
    from edp.daemon import Daemon
    from edp_testing import ListSink, eventbridge, settings

    url, _ = aws.queue("mixed")
    now = time.time()
    keys = ["lab/run/a.csv", "lab/run/poison.csv", "lab/run/b.csv"]
    for n, key in enumerate(keys):
        aws.sqs.send_message(QueueUrl=url, MessageBody=json.dumps(
            eventbridge(key, now, bucket="bkt", sequencer=f"0{n}")))
    cfg = settings(bucket_threshold_event_count=2, database_url=f"sqlite:///{tmp_path / 'd.db'}")
    sink = ListSink()
    runtime = build_runtime(cfg, sinks=[sink], observers=[FailsOnKey("lab/run/poison.csv")])
    source = SqsSource(url, wait_seconds=0, visibility_timeout=2)
    daemon = Daemon(runtime, [source], max_wait=0)
    try:
        # When the daemon receives all three at once
        daemon.run_once()

        # Then the two good ones made their batch and were deleted; the other one was
        # not acknowledged: it is invisible now and comes again (for the queue's redrive)
        assert [(e["detail"]["object-count"], e["detail"]["trigger"]) for e in sink.sent] == [
            (2, "count")]
        assert counts(aws, url) == (0, 1)
        assert daemon.stats.errors == 1
        # (and firing by time is not held for it: it fails alone, again and again)
        assert runtime.engine.held(daemon.clock()) is None
        time.sleep(2.5)
        again = source.receive(wait=0)
        assert [m.body for m in again.messages] and "poison" in str(again.messages[0].body)
    finally:
        source.close()
        runtime.close()


@pytest.mark.timeout(30)
def test_a_lone_message_that_fails_its_step_does_not_hold(aws: Any, tmp_path: Path) -> None:
    from edp.bootstrap import build_runtime
    from edp.daemon import Daemon
    from edp_testing import ListSink, eventbridge, settings

    # Given a message whose step always fails (not for the store), received alone
    url, _ = aws.queue("lone-poison")
    aws.sqs.send_message(QueueUrl=url, MessageBody=json.dumps(
        eventbridge("lab/run/poison.csv", time.time())))
    runtime = build_runtime(settings(database_url=f"sqlite:///{tmp_path / 'd.db'}"),
                            sinks=[ListSink()], observers=[FailsOnKey("lab/run/poison.csv")])
    source = SqsSource(url, wait_seconds=0, max_messages=1, visibility_timeout=2)
    daemon = Daemon(runtime, [source], max_wait=0)
    try:
        # When its step fails, Then it comes again (not acknowledged), but firing by
        # time is not held for it: it would fail again at each return, holding forever
        with pytest.raises(RuntimeError, match="step fails"):
            daemon.run_once()
        assert counts(aws, url) == (0, 1)
        assert runtime.engine.held(daemon.clock()) is None
    finally:
        source.close()
        runtime.close()


@pytest.mark.timeout(30)
def test_a_store_outage_acknowledges_nothing(aws: Any, tmp_path: Path) -> None:
    # Given three messages and a store that fails (as when it is unreachable)
    from edp.bootstrap import build_runtime
    from edp.daemon import Daemon
    from edp.errors import StoreError
    from edp_testing import ListSink, eventbridge, settings

    url, _ = aws.queue("outage")
    for n, key in enumerate(["lab/run/a.csv", "lab/run/x.csv", "lab/run/b.csv"]):
        aws.sqs.send_message(QueueUrl=url, MessageBody=json.dumps(
            eventbridge(key, time.time(), bucket="bkt", sequencer=f"0{n}")))
    cfg = settings(database_url=f"sqlite:///{tmp_path / 'd.db'}")
    runtime = build_runtime(cfg, sinks=[ListSink()],
                            observers=[FailsOnKey("lab/run/x.csv", StoreError)])
    source = SqsSource(url, wait_seconds=0, visibility_timeout=30)
    daemon = Daemon(runtime, [source], max_wait=0)
    try:
        # When a step fails for that reason, Then it is not tried message by message
        # (each would wait for the store again): all three come again, none is deleted
        with pytest.raises(StoreError):
            daemon.run_once()
        assert counts(aws, url) == (0, 3)
        assert daemon.stats.steps == 0
    finally:
        source.close()
        runtime.close()


def two_runs(old: float, *, first: tuple[int, ...] = (0, 1, 2, 3)) -> list[tuple[str, float]]:
    """An hour-old backlog of two batches (3 s quiet period): run-1's files ``first`` of
    four, 1 s apart, then run-2's six files ten seconds later, whose times move the clock
    past run-1's deadline."""
    return ([(f"lab/run-1/f{n}", old + n) for n in first]
            + [(f"lab/run-2/g{n}", old + 10 + n) for n in range(6)])


ONE_BATCH_PER_RUN = [("lab/run-1/", 4), ("lab/run-2/", 6)]


def prefixes_and_counts(sink: Any) -> list[tuple[str, int]]:
    """(prefix, object-count) of the batches a list sink got, sorted."""
    return sorted((e["detail"]["prefix"], e["detail"]["object-count"]) for e in sink.sent)


def quiet_3s(tmp_path: Path) -> Any:
    """Settings of the two-run tests: batches by a 3 s quiet period alone, a SQLite store
    in ``tmp_path``."""
    from edp_testing import settings

    return settings(bucket_threshold_duration=3, bucket_threshold_event_count=0,
                    database_url=f"sqlite:///{tmp_path / 'd.db'}")


def send_files(aws: Any, url: str, files: list[tuple[str, float]]) -> None:
    """One EventBridge S3 event per (key, time), sequencers in the list's order."""
    from edp_testing import eventbridge

    for n, (key, t) in enumerate(files):
        aws.sqs.send_message(QueueUrl=url, MessageBody=json.dumps(
            eventbridge(key, t, sequencer=f"{n:02d}")))


@pytest.fixture
def short_margin(monkeypatch: pytest.MonkeyPatch) -> None:
    """Holds for messages on their way back last 3 s past their visibility timeout, not
    5 s (Daemon.REDELIVERY_MARGIN): the messages of these tests come back within a
    receive (1 s long poll) of it."""
    from edp.daemon import Daemon

    monkeypatch.setattr(Daemon, "REDELIVERY_MARGIN", 3.0)


def restart_w(aws: Any, url: str, cfg: Any, *, batches: int = 2,
              timeout: float = 30) -> Any:
    """Worker ``w`` started again on ``url`` (3 s visibility timeout) until ``batches``
    batches came out and the queue is empty; the list sink it delivered to."""
    from edp_testing import ListSink

    sink = ListSink()
    source = SqsSource(url, wait_seconds=1, visibility_timeout=3)
    run_daemon_until(cfg, [source], sink, timeout=timeout, worker_id="w",
                     done=lambda: len(sink.sent) >= batches and counts(aws, url) == (0, 0))
    return sink


@pytest.mark.timeout(60)
def test_after_a_crash_newer_files_do_not_fire_the_batch_a_returning_file_belongs_to(
    aws: Any, tmp_path: Path, short_margin: None
) -> None:
    from edp.store import open_store

    # Given an hour-old backlog: four files of run-1, 1 s apart (one batch with a 3 s
    # quiet period), then six files of run-2 ten seconds later, whose event times move
    # the clock past run-1's deadline; a worker killed in the middle of a step had
    # received run-1's second file (it comes back after the 3 s visibility timeout)
    url, _ = aws.queue("crash-newer")
    old = float(int(time.time()) - 3600)
    send_files(aws, url, two_runs(old))
    taken = aws.sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=1,
                                    VisibilityTimeout=3)["Messages"]
    assert len(taken) == 1 and "run-1/f0" in taken[0]["Body"]
    cfg = quiet_3s(tmp_path)
    store = open_store(cfg.database_url)
    store.heartbeat("w", clock=old - 100, now=time.time())  # its last step, then killed
    store.close()

    # When the worker is restarted under its name and drains the queue
    sink = restart_w(aws, url, cfg)

    # Then the file that came back joined its batch: one batch per run, as without the
    # crash (the newer files did not fire run-1's batch while its file was away)
    assert prefixes_and_counts(sink) == ONE_BATCH_PER_RUN


@pytest.mark.timeout(60)
def test_a_worker_killed_while_it_held_holds_as_low_after_its_restart(
    aws: Any, tmp_path: Path, short_margin: None
) -> None:
    from edp.engine import Engine, Message
    from edp.store import open_store
    from edp_testing import eventbridge

    # Given a worker that applied run-1's files but its second (away: a step of it had
    # failed, so it held firing at a time before them) and run-2's, ten seconds later,
    # then was killed; the missing file comes back after the 3 s visibility timeout
    url, _ = aws.queue("killed-holding")
    old = float(int(time.time()) - 3600)
    cfg = quiet_3s(tmp_path)
    store = open_store(cfg.database_url)
    engine = Engine(store, cfg, sinks=["list"], worker_id="w")
    engine.hold(now=time.time(), seconds=60, at=old - 100)
    applied = two_runs(old, first=(0, 2, 3))
    engine.process([Message(eventbridge(k, t, sequencer=f"{n:02d}"), f"m{n}")
                    for n, (k, t) in enumerate(applied)], now=time.time())
    assert engine.clock == old + 15 and store.list_batches(state="closed", limit=9) == []
    store.close()  # (killed: not finished)
    aws.sqs.send_message(QueueUrl=url, MessageBody=json.dumps(
        eventbridge("lab/run-1/f1", old + 1, sequencer="20")))
    taken = aws.sqs.receive_message(QueueUrl=url, VisibilityTimeout=3)["Messages"]
    assert len(taken) == 1

    # When it is restarted under its name
    sink = restart_w(aws, url, cfg)

    # Then it held as low as before (not at its clock, past run-1's deadline): the
    # file that came back is in run-1's batch
    assert prefixes_and_counts(sink) == ONE_BATCH_PER_RUN


class FailsOnce(FailsOnKey):
    """Fails the first step holding the key (as a store outage would), then lets it be."""

    def observe(self, tx: Any, events: Any, *, clock: float, now: float, sinks: Any) -> None:
        if self.key:
            try:
                super().observe(tx, events, clock=clock, now=now, sinks=sinks)
            except Exception:
                self.key = ""
                raise


@pytest.mark.timeout(60)
def test_a_failed_step_holds_firing_until_its_messages_came_again(
    aws: Any, tmp_path: Path, short_margin: None
) -> None:
    from edp.bootstrap import build_runtime
    from edp.daemon import Daemon
    from edp.errors import StoreError
    from edp_testing import ListSink

    # Given an hour-old backlog received one message at a time: run-1's second file
    # first (its step fails: the store is out), then the three other files of run-1,
    # 1 s apart (3 s quiet period), then six files of run-2 ten seconds later
    url, _ = aws.queue("failed-step")
    old = float(int(time.time()) - 3600)
    send_files(aws, url, [("lab/run-1/f1", old + 1), *two_runs(old, first=(0, 2, 3))])
    cfg = quiet_3s(tmp_path)
    sink = ListSink()
    runtime = build_runtime(cfg, sinks=[sink],
                            observers=[FailsOnce("lab/run-1/f1", StoreError)])
    source = SqsSource(url, wait_seconds=0, max_messages=1, visibility_timeout=2)
    daemon = Daemon(runtime, [source], max_wait=0)
    try:
        with pytest.raises(StoreError):
            daemon.run_once()

        # When the daemon goes on: the others, then (after the 2 s visibility timeout)
        # the file whose step failed, and the queue is empty
        end = time.monotonic() + 30
        while time.monotonic() < end and len(sink.sent) < 2 + (counts(aws, url) != (0, 0)):
            daemon.run_once()

        # Then that file is in its batch: one batch per run, as without the failure
        assert prefixes_and_counts(sink) == ONE_BATCH_PER_RUN
    finally:
        source.close()
        runtime.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("crashed", [True, False])
def test_after_a_crash_mid_step_its_receive_comes_back_before_the_worker_is_caught_up(
    aws: Any, tmp_path: Path, crashed: bool, short_margin: None
) -> None:

    from edp.store import open_store

    # Given an hour-old backlog of four files of one prefix, 1 s apart (one batch with
    # a 3 s quiet period), whose second file a worker had received when it was killed
    # (it comes back when the queue's 3 s visibility timeout runs out)
    url, _ = aws.queue("crash")
    old = float(int(time.time()) - 3600)
    send_files(aws, url, [(f"lab/run-1/f{n}", old + n) for n in range(4)])
    taken = aws.sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=1,
                                    VisibilityTimeout=3)["Messages"]
    assert len(taken) == 1
    store = open_store(quiet_3s(tmp_path).database_url)
    store.heartbeat("w", clock=old - 100, now=time.time())  # its last step, then killed
    if not crashed:
        store.finish_worker("w")  # (a clean stop instead)
    store.close()
    # When the worker is restarted under its name
    sink = restart_w(aws, url, quiet_3s(tmp_path), batches=1 if crashed else 2, timeout=20)
    got = sorted(e["detail"]["object-count"] for e in sink.sent)
    if crashed:
        # Then it stayed behind until the file came back: one batch of the four
        assert got == [4]
    else:
        # (after a clean stop nothing is in flight: it is caught up once the queue
        # is drained, and the file that comes back later is a late one)
        assert got == [1, 3]


class Stall:
    """A TCP server on 127.0.0.1 that accepts connections and never answers."""

    def __init__(self) -> None:
        import socket
        import threading

        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.accepted: list[Any] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        self.listener.close()
        for conn in self.accepted:
            conn.close()


@pytest.mark.timeout(60)
def test_a_stalled_receive_is_tried_once_then_the_daemon_holds_and_goes_on(
    aws: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a queue behind a network that takes requests and never answers (the
    # receive's read timeout, wait_seconds + RECEIVE_MARGIN - CONNECT_TIMEOUT, cut from
    # 5 s to 1 s: it times out the same way, sooner)
    from edp.aws.clients import CONNECT_TIMEOUT

    stall = Stall()
    monkeypatch.setenv("AWS_ENDPOINT_URL", stall.url)
    monkeypatch.setattr("edp.sources.sqs.RECEIVE_MARGIN", CONNECT_TIMEOUT + 1.0)
    source = SqsSource(f"{stall.url}/123456789012/stalled", wait_seconds=0,
                       visibility_timeout=30)
    try:
        with daemon_on(source, tmp_path) as daemon:
            # When the daemon runs two rounds
            with caplog.at_level(logging.INFO, logger="edp"):
                daemon.run_once()
                daemon.run_once()
            # Then each receive was tried once (a stop does not wait out botocore's
            # retries), failed without failing its round, and the daemon holds firing
            # (the request may have been served: its messages would come again only
            # after 30 s)
            assert len(stall.accepted) == 2
            assert daemon.stats.errors == 2
            assert daemon.runtime.engine.held(daemon.clock()) is not None
        # And it said so in one line, without a traceback (then at the 2nd failure), and
        # that it holds (once: the second failure extends the hold)
        record, _ = [r for r in caplog.records if "cannot receive" in r.getMessage()]
        assert record.levelname == "WARNING" and record.exc_info is None
        assert "1 failed receive(s) in a row" in record.getMessage()
        assert [r.getMessage() for r in caplog.records if "holding" in r.getMessage()] == [
            f"holding firing by time for 35s: messages received from {source.name} may come "
            "again only then"]
    finally:
        stall.close()


@pytest.mark.timeout(60)
def test_a_refused_receive_does_not_hold_and_is_logged_less_and_less(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import socket

    # Given a queue that refuses connections (nothing can have been taken)
    with socket.create_server(("127.0.0.1", 0)) as probe:
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed)
    with daemon_on(SqsSource(f"{closed}/123456789012/refused", wait_seconds=0),
                   tmp_path) as daemon:
        # When the daemon runs four rounds
        with caplog.at_level(logging.INFO, logger="edp"):
            for _ in range(4):
                daemon.run_once()
        # Then each receive failed, the daemon does not hold
        assert daemon.stats.errors == 4
        assert daemon.runtime.engine.held(daemon.clock()) is None
    # And it logged the 1st, 2nd and 4th failure, one line each
    lines = [r.getMessage() for r in caplog.records if "cannot receive" in r.getMessage()]
    assert [re.search(r"\((\d+) failed", line)[1] for line in lines] == ["1", "2", "4"]


@pytest.mark.timeout(60)
def test_a_stop_while_the_store_is_out_skips_the_last_delivery_and_is_not_clean(
    aws: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import threading

    from edp.bootstrap import build_runtime
    from edp.daemon import Daemon
    from edp.errors import StoreError
    from edp_testing import ListSink, eventbridge, settings

    # Given a worker whose every round fails because the store is out
    class StoreDown(FailsOnKey):
        def tick(self, tx: Any, *, clock: float, now: float, sinks: Any) -> int:
            raise StoreError("the store is out")

    url, _ = aws.queue("store-out")
    aws.sqs.send_message(QueueUrl=url, MessageBody=json.dumps(
        eventbridge("lab/run/x.csv", time.time())))
    daemons: list[Daemon] = []
    relays: list[int] = []
    outcome: list[BaseException | None] = []

    def work() -> None:  # (SQLite connections belong to the thread that made them)
        runtime = build_runtime(settings(database_url=f"sqlite:///{tmp_path / 'd.db'}"),
                                sinks=[ListSink()],
                                observers=[StoreDown("lab/run/x.csv", StoreError)])
        deliver = runtime.relay.deliver

        def counted() -> Any:
            relays.append(len(daemons))
            return deliver()

        runtime.relay.deliver = counted  # type: ignore[method-assign]
        daemons.append(Daemon(runtime, [SqsSource(url, wait_seconds=0)], max_wait=0,
                              error_backoff=0.2))
        try:
            daemons[0].run()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)
        finally:
            runtime.close()

    with caplog.at_level(logging.WARNING, logger="edp"):
        thread = threading.Thread(target=work)
        thread.start()
        wait_for = time.monotonic() + 20
        while (not daemons or daemons[0].stats.errors < 2) and time.monotonic() < wait_for:
            time.sleep(0.05)
        # When it is stopped meanwhile
        relays.clear()
        daemons[0].stop()
        thread.join(timeout=20)

    # Then it stops without an error, without trying the outbox again, and not cleanly
    # (the next start holds as after a crash: the failed step's message comes again)
    assert outcome == [None]
    assert relays == []
    assert not daemons[0].stopped_cleanly
    assert any("outbox is delivered at the next start" in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(30)
def test_a_receive_never_sent_says_it_took_nothing(
    aws: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edp.daemon import ReceiveFailed

    # Given no credentials at all (the request is never made; no instance metadata)
    url, _ = aws.queue("no-credentials")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    source = SqsSource(url, wait_seconds=0)
    # When it receives, Then it fails saying it cannot have taken messages (no hold)
    with pytest.raises(ReceiveFailed, match="credentials") as failed:
        source.receive(wait=0)
    assert not failed.value.maybe_taken
    source.close()


@pytest.mark.timeout(30)
def test_an_unknown_aws_profile_is_a_configuration_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edp.aws.clients import client

    # Given an AWS_PROFILE that no config file defines
    monkeypatch.setenv("AWS_PROFILE", "edp-test-no-such-profile")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    # When a client is made, Then the error names the profile (no traceback of botocore's)
    with pytest.raises(ConfigError, match="edp-test-no-such-profile"):
        client("sqs")
    # And so do the commands that make one first: one line, exit status 2
    import subprocess

    from integration.aws.conftest import EDP

    for args in (("run", "--sqs-queue", "https://sqs.us-east-1.amazonaws.com/1/q",
                  "--database-url", f"sqlite:///{tmp_path / 'edp.db'}"),
                 ("package", "--sqs-queue", "https://sqs.us-east-1.amazonaws.com/1/q",
                  "--registry", str(tmp_path / "registry"), "--once", "--wait", "0")):
        done = subprocess.run([*EDP, *args], capture_output=True, text=True, timeout=60,
                              env=dict(os.environ))
        assert done.returncode == 2, (args, done.stderr)
        assert "edp-test-no-such-profile" in done.stderr and "Traceback" not in done.stderr
