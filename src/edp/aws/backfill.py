"""``edp backfill``: objects already in S3 fed to the engine as created events.

For data that landed before edp ran, or while its events were lost. Objects are
listed (``ListObjectsV2``, paginated) and each becomes an S3 Event Notification
record: ``ObjectCreated:Put`` at its ``LastModified`` time, with its ETag and size,
and no sequencer. Without a sequencer the engine deduplicates on (bucket, key,
type, time, etag, size) (SPEC 3.1), so backfilling the same objects again
changes nothing, while an object rewritten since is counted again.

The objects are fed in chunks of ``chunk_size`` through :meth:`Engine.process`
as a caught-up source: they join batches as if they arrived now (listing order
keeps a prefix's objects together, so a batch is not split), count and marker
batches fire at once, and quiet-period batches fire ``bucket_threshold_duration``
after the backfill, by ``edp run`` or the emit Lambda.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import quote_plus

from edp.aws.clients import aws_errors, error_code
from edp.aws.clients import client as make_client
from edp.bootstrap import Runtime
from edp.engine import Message
from edp.errors import ConfigError, EdpError, plural


@dataclass(frozen=True, slots=True)
class S3Location:
    """``s3://bucket/prefix``, parsed."""

    bucket: str
    prefix: str = ""

    @classmethod
    def parse(cls, url: str) -> S3Location:
        """Parse ``s3://bucket[/prefix]``; raise :class:`ConfigError` otherwise."""
        if not url.startswith("s3://") or not url[5:].split("/", 1)[0]:
            raise ConfigError(f"expected s3://bucket[/prefix], got {url!r}")
        bucket, _, prefix = url[5:].partition("/")
        return cls(bucket, prefix)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


@dataclass(slots=True)
class BackfillSummary:
    """What a backfill did."""

    listed: int = 0
    skipped_older: int = 0
    fired: Counter[str] = field(default_factory=Counter)
    counts: Counter[str] = field(default_factory=Counter)
    delivered: int = 0

    def describe(self) -> str:
        """One line for the terminal."""
        batches = sum(self.fired.values())
        by_trigger = ", ".join(f"{k} {v}" for k, v in sorted(self.fired.items()))
        skipped = sum(v for k, v in self.counts.items() if k.startswith("skipped."))
        return (
            f"edp backfill: {plural(self.listed, 'object')} listed, "
            f"{self.counts['events.counted']} counted, "
            f"{self.counts['events.duplicate']} already seen, {skipped} not batched, "
            + (f"{self.skipped_older} older than --since, " if self.skipped_older else "")
            + f"{plural(batches, 'batch', 'batches')} fired ({by_trigger or 'none'}), "
            f"{plural(self.delivered, 'event')} delivered"
        )


def created_record(bucket: str, item: dict[str, Any]) -> dict[str, Any]:
    """An S3 Event Notification for one ``ListObjectsV2`` item (key URL-encoded as AWS does)."""
    modified: datetime = item["LastModified"]
    obj: dict[str, Any] = {"key": quote_plus(item["Key"], safe="/")}
    if item.get("ETag"):
        obj["eTag"] = str(item["ETag"]).strip('"')
    if item.get("Size") is not None:
        obj["size"] = int(item["Size"])
    return {"Records": [{
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "eventName": "ObjectCreated:Put",
        "eventTime": modified.isoformat(),
        "s3": {"bucket": {"name": bucket}, "object": obj},
    }]}


def list_objects(location: S3Location, *, s3: Any = None) -> Iterator[dict[str, Any]]:
    """Every object under ``location``, in key order."""
    client = s3 if s3 is not None else make_client("s3")
    pages = client.get_paginator("list_objects_v2").paginate(
        Bucket=location.bucket, Prefix=location.prefix
    )
    try:
        for page in pages:
            yield from page.get("Contents", [])
    except aws_errors() as exc:
        raise EdpError(
            f"cannot list {location}: {error_code(exc) or type(exc).__name__}: {exc}"
        ) from None


def backfill(
    runtime: Runtime,
    location: S3Location,
    *,
    s3: Any = None,
    since: float | None = None,
    chunk_size: int | None = None,
    progress: Callable[[int], None] | None = None,
    clock: Callable[[], float] = time.time,
) -> BackfillSummary:
    """Feed the objects under ``location`` to ``runtime``'s engine, then relay the outbox.

    ``since`` (epoch seconds) skips objects last modified before it. ``progress``
    is called with the number of objects listed so far after each chunk.
    """
    if not runtime.settings.rule_book().is_watched(location.bucket):
        raise ConfigError(
            f"bucket {location.bucket} is not watched (buckets = "
            f"{', '.join(runtime.settings.buckets)}): its events would all be skipped"
        )
    size = chunk_size or runtime.settings.chunk_size
    summary = BackfillSummary()
    # The clock is the wall clock from the start: objects join batches as if they
    # arrived now, instead of at their (old) LastModified, which would make every
    # batch overdue at once.
    summary.fired.update(r.trigger.value for r in runtime.engine.fire_due(now=clock()))
    chunk: list[Message] = []
    for item in list_objects(location, s3=s3):
        summary.listed += 1
        if since is not None and item["LastModified"].timestamp() < since:
            summary.skipped_older += 1
            continue
        chunk.append(Message(created_record(location.bucket, item),
                             location=f"s3://{location.bucket}/{item['Key']}", source="backfill"))
        if len(chunk) >= size:
            _step(runtime, chunk, summary, clock)
            chunk = []
            if progress is not None:
                progress(summary.listed)
    if chunk:
        _step(runtime, chunk, summary, clock)
    if progress is not None:
        progress(summary.listed)
    summary.delivered = runtime.relay.deliver().delivered
    # A finished backfill must not hold the other workers' clock floor back.
    runtime.store.finish_worker(runtime.engine.worker_id)
    return summary


def _step(runtime: Runtime, chunk: list[Message], summary: BackfillSummary,
          clock: Callable[[], float]) -> None:
    report = runtime.engine.process(chunk, now=clock(), caught_up=True)
    summary.counts.update(report.counts)
    summary.fired.update(ready.trigger.value for ready in report.fired)


__all__ = ["BackfillSummary", "S3Location", "backfill", "created_record", "list_objects"]
