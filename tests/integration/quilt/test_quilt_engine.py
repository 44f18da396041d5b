"""The packager and package-ready together with the real engine, store and S3 events.

moto sends the bucket's S3 Event Notifications to an SQS queue; the tests feed what
arrives there to the engine exactly as ``edp run`` would.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edp.bootstrap import Runtime, build_observers, build_runtime
from edp.config import Settings
from edp.engine import Message
from edp.quilt import BatchRequest, Packager, PackageStatus
from edp.quilt.ready import event_id
from edp_testing import ListSink
from integration.quilt.quilt_support import METADATA_ROWS, put_files, s3_revisions, xlsx

pytestmark = pytest.mark.timeout(120)

PREFIX = "instrument/exp-1/"


@pytest.fixture
def watched(aws: Callable[[str], Any], make_bucket: Callable[[str], str]) -> tuple[str, str]:
    """A bucket whose object-created notifications go to an SQS queue: (bucket, queue URL)."""
    bucket = make_bucket("edp")
    sqs = aws("sqs")
    queue = sqs.create_queue(QueueName=f"{bucket}-events")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=queue, AttributeNames=["QueueArn"])
    aws("s3").put_bucket_notification_configuration(Bucket=bucket, NotificationConfiguration={
        "QueueConfigurations": [{"QueueArn": arn["Attributes"]["QueueArn"],
                                 "Events": ["s3:ObjectCreated:*"]}]})
    return bucket, queue


def drain(sqs: Any, queue: str) -> list[Message]:
    """Every message in the queue (deleted), as engine input."""
    messages: list[Message] = []
    while True:
        got = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10).get("Messages", [])
        if not got:
            return messages
        for item in got:
            messages.append(Message(item["Body"], f"message {item['MessageId']}", "sqs"))
            sqs.delete_message(QueueUrl=queue, ReceiptHandle=item["ReceiptHandle"])


def runtime(db: Path, sink: ListSink, **values: Any) -> Runtime:
    """The runtime a worker would build, on a SQLite file, with the configured observers."""
    settings = Settings(database_url=f"sqlite:///{db}", bucket_threshold_duration=60,
                        bucket_threshold_event_count=0, **values)
    return build_runtime(settings, sinks=[sink], observers=build_observers(settings))


def of_type(sink: ListSink, kind: str) -> list[dict[str, Any]]:
    """The events of one detail-type the sink received."""
    return [e for e in sink.sent if e["detail-type"] == kind]


def test_the_packagers_own_writes_never_make_another_batch(
    aws: Callable[[str], Any], watched: tuple[str, str], tmp_path: Path, quilt: Any
) -> None:
    # Given a bucket that is both the source and the registry, watched by an engine
    bucket, queue = watched
    s3, sqs = aws("s3"), aws("sqs")
    sink = ListSink()
    rt = runtime(tmp_path / "edp.db", sink, buckets=(bucket,))
    put_files(s3, bucket, {f"{PREFIX}a.txt": b"a", f"{PREFIX}b.txt": b"bb",
                           f"{PREFIX}metadata.xlsx": xlsx(METADATA_ROWS)})
    now = time.time()
    rt.engine.process(drain(sqs, queue), now=now)
    rt.engine.fire_due(now=now + 120)
    rt.relay.deliver()
    [ready] = of_type(sink, "package-objects-ready")
    assert ready["detail"]["object-count"] == 3

    # When the batch is packaged into the same bucket, twice (a re-delivery),
    # and every S3 event those pushes caused goes through the engine
    packager = Packager(rt.settings)
    first = packager.package(ready)
    after_first = drain(sqs, queue)
    second = packager.package(ready)
    after_second = drain(sqs, queue)
    rt.engine.process(after_first + after_second, now=now + 130)
    rt.engine.fire_due(now=now + 100_000)
    rt.relay.deliver()

    # Then the pushes did write to the bucket (helpers, manifest, pointers) ...
    assert first.status is PackageStatus.PUSHED, first.error
    assert second.status is PackageStatus.UNCHANGED
    assert len(after_first) >= 3
    assert len(s3_revisions(s3, bucket, "instrument/exp-1")) == 1
    # ... yet no second package-objects-ready came out of it
    assert len(of_type(sink, "package-objects-ready")) == 1
    assert rt.store.stats()["open_batches"] == 0
    rt.close()


def test_package_ready_follows_a_new_revision_after_the_delay_and_across_a_restart(
    aws: Callable[[str], Any], watched: tuple[str, str], tmp_path: Path, quilt: Any
) -> None:
    # Given a watched registry with a 30 s settle delay, and a new revision pushed to it
    bucket, queue = watched
    s3, sqs = aws("s3"), aws("sqs")
    put_files(s3, bucket, {f"{PREFIX}a.txt": b"a"})
    drain(sqs, queue)
    options = {"package_ready_registries": (bucket,), "package_ready_delay": 30}
    sink = ListSink()
    rt = runtime(tmp_path / "edp.db", sink, **options)
    result = Packager(rt.settings).package_batch(BatchRequest(bucket, PREFIX))
    assert result.status is PackageStatus.PUSHED, result.error
    pointer_events = drain(sqs, queue)
    now = time.time()

    # When the engine sees the push's S3 events, and the delay has not passed yet
    rt.engine.process(pointer_events, now=now)
    rt.engine.fire_due(now=now + 29)
    rt.relay.deliver()
    # Then nothing is emitted yet
    assert of_type(sink, "package-ready") == []

    # When the worker restarts (new store, engine and observer on the same file)
    # and the delay has passed
    rt.close()
    rt = runtime(tmp_path / "edp.db", sink, **options)
    rt.engine.fire_due(now=now + 31)
    rt.relay.deliver()

    # Then exactly one package-ready names the package and its top hash
    [event] = of_type(sink, "package-ready")
    assert event["source"] == "com.quiltdata.edp"
    assert event["resources"] == [f"arn:aws:s3:::{bucket}"]
    assert event["detail"] == {"version": "0.1", "package-name": "instrument/exp-1",
                               "bucket": bucket, "top-hash": result.top_hash}
    [pointer] = s3_revisions(s3, bucket, "instrument/exp-1")
    assert event["id"] == event_id(bucket, "instrument/exp-1",
                                   f".quilt/named_packages/instrument/exp-1/{pointer}",
                                   str(result.top_hash))

    # When the same S3 events are delivered again
    rt.engine.process(pointer_events, now=now + 40)
    rt.engine.fire_due(now=now + 100)
    rt.relay.deliver()
    # Then no second package-ready is emitted
    assert len(of_type(sink, "package-ready")) == 1
    rt.close()
