"""The figures that the dashboard, its JSON API, ``/metrics`` and ``edp status`` show.

Plain functions from a :class:`~edp.store.base.Store` (and the settings) to JSON-ready
dicts; no web framework here, so ``edp status`` works without the ``web`` extra.
Times are epoch seconds (UTC); durations are seconds.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import orjson

from edp.config import Settings
from edp.core.batching import ObjectRecord
from edp.store.base import BatchRow, DeadLetter, OutboxEntry, Store

IN_PREFIXES = ("events.", "skipped.", "ignored.")
"""Counters of object events that came in (counted, duplicate, delete, not batched...)."""
OUT_PREFIX = "batches."
"""Counters of batches fired, by trigger: one package-objects-ready event each."""
BATCH_FIELDS = (
    "batch_id", "bucket", "prefix", "generation", "state", "object_count", "first_activity",
    "last_activity", "first_event_time", "last_event_time", "deadline", "deadline_trigger",
    "trigger", "fired_at", "event_id",
)
OBJECT_FIELDS = ("batch_id", "key", "size", "etag", "sequencer", "event_time")


NOT_AN_OUTCOME = frozenset({"events.clock_ahead"})
"""Counters under ``events.`` that count events already counted by their outcome (an
event dated ahead of the clock is also ``counted``, ``duplicate``...)."""


def events_in(counters: Mapping[str, int]) -> int:
    """Every S3 event decoded so far."""
    return sum(v for k, v in counters.items()
               if k.startswith(IN_PREFIXES) and k not in NOT_AN_OUTCOME)


def events_out(counters: Mapping[str, int]) -> int:
    """Every batch event emitted so far."""
    return sum(v for k, v in counters.items() if k.startswith(OUT_PREFIX))


def batch_dict(row: BatchRow, settings: Settings, now: float) -> dict[str, Any]:
    """One batch, with its age, time to deadline and the thresholds of its bucket."""
    rules = settings.grouping(row.bucket)
    data: dict[str, Any] = {name: getattr(row, name) for name in BATCH_FIELDS}
    # (not below 0: a batch opened at a clock ahead of the wall clock, by an event dated
    # up to clock_max_ahead in the future, is new, not of negative age)
    if row.state == "open":
        data["age"] = max(0.0, now - row.first_activity)
        data["deadline_in"] = None if row.deadline is None else row.deadline - now
    else:
        data["age"] = max(0.0, (row.fired_at or now) - row.first_activity)
        data["deadline_in"] = None
    data["count_threshold"] = rules.threshold_event_count
    data["threshold_duration"] = rules.threshold_duration
    data["max_batch_age"] = rules.max_batch_age
    return data


def object_dict(record: ObjectRecord) -> dict[str, Any]:
    """One object of a batch."""
    return {name: getattr(record, name) for name in OBJECT_FIELDS}


def event_dict(entry: OutboxEntry) -> dict[str, Any]:
    """One emitted event: its envelope's time and detail, and when it entered the outbox."""
    try:
        payload = orjson.loads(entry.payload)
    except orjson.JSONDecodeError:
        payload = {}
    detail = payload.get("detail") if isinstance(payload, dict) else None
    return {
        "seq": entry.seq,
        "event_id": entry.event_id,
        "kind": entry.kind,
        "created_at": entry.created_at,
        "time": payload.get("time") if isinstance(payload, dict) else None,
        "detail": detail if isinstance(detail, dict) else {},
    }


def dead_letter_dict(letter: DeadLetter, *, body_chars: int = 300) -> dict[str, Any]:
    """One dead letter, its body cut to ``body_chars``."""
    return {
        "id": letter.id,
        "source": letter.source,
        "location": letter.location,
        "reason": letter.reason,
        "received_at": letter.received_at,
        "body": letter.body[:body_chars],
    }


def batches(
    store: Store, settings: Settings, now: float, *, state: str | None = None, limit: int = 50
) -> list[dict[str, Any]]:
    """Open batches (earliest deadline first), then recently closed ones."""
    return [batch_dict(row, settings, now) for row in store.list_batches(state=state, limit=limit)]


def batch_detail(store: Store, settings: Settings, batch_id: str, now: float) -> dict[str, Any]:
    """One batch and its files; raises :class:`~edp.errors.NotFound`."""
    row = store.get_batch(batch_id)
    return {
        "batch": batch_dict(row, settings, now),
        "objects": [object_dict(o) for o in store.batch_objects(row.batch_id)],
    }


def events(store: Store, *, limit: int = 50) -> list[dict[str, Any]]:
    """The most recent emitted events, newest first."""
    return [event_dict(e) for e in store.outbox_events(limit=limit)]


@dataclass(frozen=True, slots=True)
class Sample:
    """The figures at one moment: ``events_in``/``events_out``/``errors`` since the last one."""

    t: float
    events_in: int
    events_out: int
    errors: int
    backlog: int
    dead_letters: int
    open_batches: int


class Series:
    """Samples of the store's counters over time, kept in memory (thread-safe)."""

    def __init__(self, *, keep: int = 720) -> None:
        self._samples: deque[Sample] = deque(maxlen=keep)
        self._last: tuple[int, int, int] | None = None
        self._lock = threading.Lock()

    def add(self, now: float, counters: Mapping[str, int], stats: Mapping[str, int],
            extra_errors: int = 0) -> Sample:
        """Record the figures at ``now``; ``extra_errors`` counts failed steps of this process."""
        totals = (events_in(counters), events_out(counters),
                  counters.get("dead_letters", 0) + extra_errors)
        with self._lock:
            last = self._last or totals
            sample = Sample(
                t=now,
                events_in=max(0, totals[0] - last[0]),
                events_out=max(0, totals[1] - last[1]),
                errors=max(0, totals[2] - last[2]),
                backlog=stats.get("pending_deliveries", 0) + stats.get("parked_deliveries", 0),
                dead_letters=stats.get("dead_letters", 0),
                open_batches=stats.get("open_batches", 0),
            )
            self._last = totals
            self._samples.append(sample)
        return sample

    def as_list(self) -> list[dict[str, Any]]:
        """The samples, oldest first."""
        with self._lock:
            return [asdict(s) for s in self._samples]


def overview(store: Store, now: float) -> dict[str, Any]:
    """The store's figures: stats, counters, and totals in and out."""
    counters = store.counters()
    return {
        "now": now,
        "store": store.url.split("@")[-1],
        "stats": store.stats(),
        "counters": counters,
        "totals": {
            "events_in": events_in(counters),
            "events_out": events_out(counters),
            "dead_letters": counters.get("dead_letters", 0),
            "fired": {k.removeprefix(OUT_PREFIX): v for k, v in counters.items()
                      if k.startswith(OUT_PREFIX)},
        },
    }


__all__ = [
    "Sample", "Series", "batch_detail", "batch_dict", "batches", "dead_letter_dict",
    "event_dict", "events", "events_in", "events_out", "object_dict", "overview",
]
