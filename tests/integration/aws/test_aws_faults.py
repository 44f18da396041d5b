"""Faults: the bus unreachable for a while, the daemon killed mid-stream, poison messages."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from edp.store import open_store
from edp_testing import load_event


class Gate:
    """A TCP relay to the moto server that can be cut (connections dropped) and restored."""

    def __init__(self, target: str) -> None:
        parts = urlsplit(target)
        self.target = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.up = False
        self.closing = False
        self.lock = threading.Lock()
        self.live: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def cut(self) -> None:
        """Drop every connection and refuse new ones."""
        with self.lock:
            self.up = False
            for sock in self.live:
                # (shutdown first: a close alone leaves a thread blocked in its recv
                # holding the socket open, and the peer would never hear of the cut)
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self.live.clear()

    def restore(self) -> None:
        """Relay again."""
        with self.lock:
            self.up = True

    def close(self) -> None:
        self.closing = True
        self.cut()
        self.listener.close()
        self.thread.join(timeout=5)

    def _accept(self) -> None:
        self.listener.settimeout(0.2)
        while not self.closing:
            try:
                client, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            with self.lock:
                if not self.up:
                    client.close()
                    continue
                upstream = socket.create_connection(self.target)
                self.live += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.close()


@pytest.fixture
def gate(moto_endpoint: str) -> Any:
    relay = Gate(moto_endpoint)
    yield relay
    relay.close()


def closed_batches(url: str) -> list[Any]:
    store = open_store(url)
    try:
        return store.list_batches(state="closed", limit=1000)
    finally:
        store.close()


@pytest.mark.timeout(90)
def test_events_wait_in_the_outbox_while_the_bus_is_unreachable(
    aws: Any, start_edp: Any, gate: Gate, tmp_path: Path
) -> None:
    # Given edp run whose EventBridge endpoint is unreachable
    bucket = aws.bucket()
    ingest_url, ingest_arn = aws.queue("ingest")
    out_url, out_arn = aws.queue("out")
    aws.s3_events_via_eventbridge(bucket, ingest_arn)
    bus = aws.edp_bus(bucket, out_arn)
    database = f"sqlite:///{tmp_path / 'edp.db'}"
    edp = start_edp(
        "run", "--sqs-queue", ingest_url, "--eventbridge-bus", bus, "--database-url", database,
        "--eventbridge-raw-keys", "--threshold-event-count", "2", "--threshold-duration", "300",
        env={"EDP_BUCKETS": bucket, "EDP_SQS_WAIT_SECONDS": "1",
             "AWS_ENDPOINT_URL_EVENTBRIDGE": gate.url},
    )

    # When three batches fire during the outage
    aws.put(bucket, "a/1/x", "a/1/y", "a/2/x", "a/2/y", "b/1/x", "b/1/y")
    deadline = time.monotonic() + 20
    while len(closed_batches(database)) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(closed_batches(database)) == 3, edp.log()

    # Then nothing arrives while the bus is unreachable
    assert aws.collect(out_url, 1, timeout=2, linger=0) == []

    # When the bus is reachable again
    gate.restore()

    # Then every event arrives, each id once
    events = aws.collect(out_url, 3, timeout=40, linger=2)
    assert edp.stop() == 0, edp.log()
    ids = [e["detail"]["event-id"] for e in events]
    assert len(ids) == 3 and len(set(ids)) == 3
    assert {e["detail"]["prefix"] for e in events} == {"a/1/", "a/2/", "b/1/"}
    assert "will retry" in edp.log() or "retry in" in edp.log()


@pytest.mark.timeout(120)
def test_sigkill_mid_stream_then_restart_gives_the_uninterrupted_batches(
    aws: Any, start_edp: Any, store_url: str
) -> None:
    # Given edp run on a stream of 30 files round-robin over 3 prefixes, 5 per batch
    bucket = aws.bucket()
    ingest_url, ingest_arn = aws.queue("ingest")
    out_url, out_arn = aws.queue("out")
    aws.s3_events_via_eventbridge(bucket, ingest_arn)
    bus = aws.edp_bus(bucket, out_arn)
    database = store_url
    args = ["run", "--sqs-queue", ingest_url, "--eventbridge-bus", bus, "--database-url",
            database, "--worker-id", "w1", "--eventbridge-raw-keys",
            "--threshold-event-count", "5", "--threshold-duration", "300"]
    env = {"EDP_BUCKETS": bucket, "EDP_SQS_WAIT_SECONDS": "1",
           "EDP_SQS_VISIBILITY_TIMEOUT": "2"}
    keys = [f"p{i % 3}/run/file {i:02d}.dat" for i in range(30)]
    first = start_edp(*args, env=env)
    uploaded = threading.Event()

    def upload() -> None:
        for key in keys:
            aws.put(bucket, key)
            time.sleep(0.05)
        uploaded.set()

    uploader = threading.Thread(target=upload)
    uploader.start()

    # When the daemon is killed with SIGKILL once the first batch came out
    events = aws.collect(out_url, 1, timeout=30, linger=0)
    first.kill()
    assert events, first.log()
    # ... and restarted with the same store and worker id
    second = start_edp(*args, env=env)
    uploader.join()

    # Then the final set of batches is the uninterrupted run's: 6 batches of 5
    events += aws.collect(out_url, 6 - len(events), timeout=40, linger=3)
    assert second.stop() == 0, second.log()
    by_id = {e["detail"]["event-id"]: e["detail"] for e in events}
    assert Counter((d["prefix"], d["object-count"], d["trigger"]) for d in by_id.values()) == {
        ("p0/run/", 5, "count"): 2, ("p1/run/", 5, "count"): 2, ("p2/run/", 5, "count"): 2,
    }
    # And each file was counted in exactly one batch
    store = open_store(database)
    counted = [o.key for d in by_id.values() for o in store.batch_objects(d["batch-id"])]
    store.close()
    assert sorted(counted) == sorted(keys)


def poison_plumbing(aws: Any, bucket: str, **queue_attributes: str) -> tuple[str, list[str]]:
    """An ingest queue holding two good S3 events around two poison messages."""
    ingest_url, _ = aws.queue("ingest", **queue_attributes)
    template = json.dumps(load_event("aws-eventbridge-direct.json")).replace(
        "source-bucket", bucket
    )
    good = [json.loads(template) for _ in range(2)]
    for n, event in enumerate(good):
        event["detail"]["object"]["key"] = f"instrument/exp+1/file+{n}.tif"
        event["detail"]["object"]["sequencer"] = f"0062E99A88DC40746{n}"
    bodies = [json.dumps(good[0]), "this is not JSON", '{"hello": "world"}', json.dumps(good[1])]
    ids = [aws.sqs.send_message(QueueUrl=ingest_url, MessageBody=b)["MessageId"] for b in bodies]
    return ingest_url, [ids[1], ids[2]]


@pytest.mark.timeout(60)
def test_poison_messages_are_dead_lettered_and_deleted(
    aws: Any, start_edp: Any, tmp_path: Path
) -> None:
    # Given a queue with two poison messages among two good ones
    bucket = aws.bucket()
    out_url, out_arn = aws.queue("out")
    bus = aws.edp_bus(bucket, out_arn)
    ingest_url, poison_ids = poison_plumbing(aws, bucket)
    database = f"sqlite:///{tmp_path / 'edp.db'}"

    # When edp run consumes it
    edp = start_edp(
        "run", "--sqs-queue", ingest_url, "--eventbridge-bus", bus, "--database-url", database,
        "--threshold-event-count", "2",
        env={"EDP_BUCKETS": bucket, "EDP_SQS_WAIT_SECONDS": "1"},
    )

    # Then the good ones still make their batch
    events = aws.collect(out_url, 1)
    assert edp.stop() == 0, edp.log()
    assert [(e["detail"]["prefix"], e["detail"]["object-count"]) for e in events] == [
        ("instrument/exp 1/", 2)
    ]
    # And the poison ones are in the dead-letter store, named by message id, and deleted
    store = open_store(database)
    letters = store.dead_letters()
    store.close()
    assert sorted(d.location for d in letters) == sorted(f"message id {i}" for i in poison_ids)
    assert {d.body for d in letters} == {"this is not JSON", '{"hello": "world"}'}
    assert aws.sqs.get_queue_attributes(
        QueueUrl=ingest_url, AttributeNames=["ApproximateNumberOfMessages",
                                             "ApproximateNumberOfMessagesNotVisible"],
    )["Attributes"] == {"ApproximateNumberOfMessages": "0",
                        "ApproximateNumberOfMessagesNotVisible": "0"}


@pytest.mark.timeout(60)
def test_poison_messages_can_be_left_to_the_redrive_policy(
    aws: Any, start_edp: Any, tmp_path: Path
) -> None:
    # Given a queue with a redrive policy (2 receives, then its DLQ) holding poison
    bucket = aws.bucket()
    out_url, out_arn = aws.queue("out")
    dlq_url, dlq_arn = aws.queue("dlq")
    bus = aws.edp_bus(bucket, out_arn)
    ingest_url, poison_ids = poison_plumbing(aws, bucket, RedrivePolicy=json.dumps(
        {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": 2}
    ))
    database = f"sqlite:///{tmp_path / 'edp.db'}"

    # When edp run consumes it with sqs_delete_poison off
    edp = start_edp(
        "run", "--sqs-queue", ingest_url, "--eventbridge-bus", bus, "--database-url", database,
        "--threshold-event-count", "2",
        env={"EDP_BUCKETS": bucket, "EDP_SQS_WAIT_SECONDS": "1",
             "EDP_SQS_DELETE_POISON": "false", "EDP_SQS_VISIBILITY_TIMEOUT": "1"},
    )

    # Then the good batch is published and the poison moves to the queue's DLQ
    events = aws.collect(out_url, 1)
    moved = aws.collect(dlq_url, 2, timeout=20, linger=0, raw=True)
    assert edp.stop() == 0, edp.log()
    assert len(events) == 1
    assert sorted(moved) == sorted(["this is not JSON", '{"hello": "world"}'])
    # And each poison message was dead-lettered once, on its first receive
    store = open_store(database)
    letters = store.dead_letters()
    store.close()
    assert sorted(d.location for d in letters) == sorted(f"message id {i}" for i in poison_ids)


@pytest.mark.postgres
@pytest.mark.timeout(180)
def test_sigterm_while_postgresql_is_unreachable_exits_0_and_the_restart_delivers(
    aws: Any, start_edp: Any
) -> None:
    from integration.postgres.pg_testing import fresh_database, require_server

    require_server()
    with fresh_database("stop") as url:
        # Given edp run on PostgreSQL through a relay that can be cut, one file per batch
        pg = Gate(url)
        pg.restore()
        gated = url.replace(f":{urlsplit(url).port}/", f":{urlsplit(pg.url).port}/")
        ingest_url, _ = aws.queue("ingest")
        args = ["run", "--sqs-queue", ingest_url, "--database-url", gated, "--worker-id", "w1",
                "--stdout", "--threshold-event-count", "1"]
        # (the restart takes the worker id over once the first has been silent that
        # long: cut off, its session stays on the server, which cannot know it is gone)
        env = {"EDP_SQS_WAIT_SECONDS": "1", "EDP_SQS_VISIBILITY_TIMEOUT": "2",
               "EDP_WORKER_TIMEOUT": "5"}
        body = load_event("eventbridge-object-created.json")
        try:
            first = start_edp(*args, env=env)
            aws.sqs.send_message(QueueUrl=ingest_url, MessageBody=json.dumps(body))
            deadline = time.monotonic() + 30
            while not first.stdout.read_text() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert first.stdout.read_text(), first.log()

            # When the database becomes unreachable while a file is on its way
            pg.cut()
            second = dict(body, detail=dict(body["detail"], object=dict(
                body["detail"]["object"], key="other/run/b.dat", sequencer="0FF")))
            aws.sqs.send_message(QueueUrl=ingest_url, MessageBody=json.dumps(second))
            time.sleep(3)
            # ... and the worker is told to stop
            try:
                status = first.stop(timeout=90)
            except subprocess.TimeoutExpired:
                pytest.fail(f"no exit 90 s after SIGTERM: {first.log()}")

            # Then it exits 0, saying what waits, without a traceback
            log = first.log()
            assert status == 0, log
            assert "Traceback" not in log
            assert "delivered at the next start" in log or "unreachable" in log, log

            # When the database is back and the worker starts again
            pg.restore()
            again = start_edp(*args, env=env)
            deadline = time.monotonic() + 40
            while "other/run/" not in again.stdout.read_text() and time.monotonic() < deadline:
                time.sleep(0.2)
            # Then the file whose step failed is in a batch of its own, once (the first
            # batch may come again, with its id: it was printed, but its delivery
            # may not have been marked before the cut)
            assert again.stop() == 0, again.log()
            before = [json.loads(line) for line in first.stdout.read_text().splitlines()]
            after = [json.loads(line) for line in again.stdout.read_text().splitlines()]
            new = [b for b in after if b["id"] not in {e["id"] for e in before}]
            assert [b["detail"]["prefix"] for b in new] == ["other/run/"], again.log()
            assert {b["detail"]["prefix"] for b in before} == {"instrument/exp 1 (a)/"}
        finally:
            pg.close()
