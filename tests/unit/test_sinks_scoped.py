"""A watcher's own sink serves its bucket only (edp.sinks.base.BucketScoped)."""

from __future__ import annotations

import orjson

from edp.sinks.base import BucketScoped
from edp.store.base import OutboxEntry
from edp_testing import ListSink


def entry(seq: int, kind: str, bucket: str) -> OutboxEntry:
    payload = {"id": f"e{seq}", "detail-type": kind, "detail": {"bucket": bucket}}
    return OutboxEntry(seq, f"e{seq}", kind, orjson.dumps(payload).decode(), 0.0)


def test_other_buckets_batches_are_accepted_and_not_sent() -> None:
    inner = ListSink("stdout@watch-1/lab")
    scoped = BucketScoped(inner, "lab")
    assert scoped.name == "stdout@watch-1/lab"
    failures = scoped.send([entry(1, "package-objects-ready", "lab"),
                            entry(2, "package-objects-ready", "other"),
                            entry(3, "package-ready", "registry")])
    assert list(failures) == []
    assert [e["id"] for e in inner.sent] == ["e1", "e3"]
    # (nothing of its own in a page: the inner sink is not called at all)
    inner.fail_next = 1
    assert list(scoped.send([entry(4, "package-objects-ready", "other")])) == []
