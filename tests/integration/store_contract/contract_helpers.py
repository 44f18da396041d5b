"""Builders of the values a store is given, shared by the contract tests."""

from __future__ import annotations

from edp.core.batching import KeyMemory, ObjectRecord, OpenBatch
from edp.store.base import ClosedBatch, SavedBatch, StepWrite, Store

T0 = 1_700_000_000.0


def batch(
    batch_id: str = "b-1",
    *,
    bucket: str = "bkt",
    prefix: str = "a/b/",
    generation: int = 1,
    count: int = 1,
    first: float = T0,
    last: float = T0,
) -> OpenBatch:
    """An open batch."""
    return OpenBatch(batch_id, bucket, prefix, generation, count, first, last, first, last)


def saved(b: OpenBatch, deadline: float | None = None) -> SavedBatch:
    """``b`` with a duration deadline (300 s after its last activity by default)."""
    return SavedBatch(b, b.last_activity + 300 if deadline is None else deadline, "duration")


def closed(b: OpenBatch, *, trigger: str = "count", fired_at: float | None = None) -> ClosedBatch:
    """``b`` fired, with an outbox event ``ev-<batch id>``."""
    return ClosedBatch(
        batch=b,
        trigger=trigger,
        fired_at=b.last_activity if fired_at is None else fired_at,
        event_id=f"ev-{b.batch_id}",
        payload=f'{{"id": "ev-{b.batch_id}"}}',
    )


def write_open(store: Store, *batches: OpenBatch, deadline: float | None = None) -> None:
    """Save open batches (with one object each) in one transaction."""
    with store.transaction() as tx:
        tx.save(
            StepWrite(
                open_batches=[saved(b, deadline) for b in batches],
                objects=[ObjectRecord(b.batch_id, f"{b.prefix}f0", 1, "e", "01", b.first_activity)
                         for b in batches],
                keys={(b.bucket, f"{b.prefix}f0"): KeyMemory("01", b.first_activity, b.batch_id)
                      for b in batches},
            ),
            sinks=["s1"],
            now=T0,
        )


def write_closed(store: Store, *batches: OpenBatch, sinks: tuple[str, ...] = ("s1",)) -> None:
    """Save fired batches and their outbox events in one transaction."""
    with store.transaction() as tx:
        tx.save(StepWrite(closed=[closed(b) for b in batches]), sinks=list(sinks), now=T0)
