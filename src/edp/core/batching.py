"""The batch lifecycle of SPEC section 3, as a pure in-memory state machine.

:class:`Batcher` holds a *working set*: the open batches, key memories and
fingerprints that the events at hand can touch, seeded by the engine from a
store. It applies events and advances the clock, records every change, and
never does I/O or reads a clock. The engine writes the recorded changes back
in one transaction.
"""

from __future__ import annotations

import hashlib
import heapq
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial
from typing import NamedTuple

from edp.core.events import BatchReady, EventKind, ObjectEvent, Trigger
from edp.core.rules import GroupingRules, RuleBook, Skip, sequencer_is_newer

#: Namespace of the deterministic batch and event ids.
ID_NAMESPACE = uuid.UUID("4b1d2f0e-8c7a-5e3b-9d61-0ed9a1c2b3f4")
_NAMESPACE_BYTES = ID_NAMESPACE.bytes


def _uuid5(name: str) -> str:
    """``str(uuid.uuid5(ID_NAMESPACE, name))`` without building a UUID object (per batch)."""
    digest = bytearray(
        hashlib.sha1(_NAMESPACE_BYTES + name.encode(), usedforsecurity=False).digest()[:16]
    )
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


BatchKey = tuple[str, str]
"""(bucket, prefix)"""
ObjectKey = tuple[str, str]
"""(bucket, key)"""


class Outcome(StrEnum):
    """What applying one event did."""

    COUNTED = "counted"
    OVERWRITE = "overwrite"
    DUPLICATE = "duplicate"
    DELETE = "delete"


@dataclass(slots=True)
class OpenBatch:
    """The mutable state of one open batch."""

    batch_id: str
    bucket: str
    prefix: str
    generation: int
    object_count: int
    first_activity: float
    last_activity: float
    first_event_time: float
    last_event_time: float


@dataclass(slots=True)
class KeyMemory:
    """What is remembered of one object key: its highest sequencer, its batch, and the
    (event time, etag, size) of its last created event applied, against which an event
    without a sequencer is checked (SPEC 3.1: a re-delivery of it without its sequencer,
    or a backfill's listing of the same object, is a duplicate)."""

    sequencer: str | None
    seen_at: float
    batch_id: str | None = None
    event_time: float | None = None
    etag: str | None = None
    size: int | None = None


class ObjectRecord(NamedTuple):
    """One object of a batch, as kept for inspection."""

    batch_id: str
    key: str
    size: int | None
    etag: str | None
    sequencer: str | None
    event_time: float


# Enum members are slow to look up on their class (~0.1 us): the per-event paths use these.
_DELETED, _CREATED = EventKind.DELETED, EventKind.CREATED
_COUNTED, _OVERWRITE, _DUPLICATE = Outcome.COUNTED, Outcome.OVERWRITE, Outcome.DUPLICATE


def _is_last_write(memory: KeyMemory, time: float, etag: str | None, size: int | None) -> bool:
    """Whether (time, etag, size) is the key's last created write that was applied."""
    return memory.event_time == time and memory.etag == etag and memory.size == size


_record = partial(tuple.__new__, ObjectRecord)
"""``ObjectRecord`` from one tuple, without the keyword handling of its constructor."""


@dataclass(slots=True)
class Changes:
    """Everything a :class:`Batcher` changed since the last :meth:`Batcher.take_changes`."""

    open_batches: list[OpenBatch] = field(default_factory=list)
    closed: list[tuple[OpenBatch, BatchReady]] = field(default_factory=list)
    keys: dict[ObjectKey, KeyMemory] = field(default_factory=dict)
    fingerprints: dict[str, float] = field(default_factory=dict)
    objects: dict[tuple[str, str], ObjectRecord] = field(default_factory=dict)

    def is_empty(self) -> bool:
        """Whether nothing changed."""
        return not (self.open_batches or self.closed or self.keys or self.fingerprints)


def batch_id_for(bucket: str, prefix: str, generation: int, opener: ObjectEvent) -> str:
    """A batch id that is the same whenever the same event opens the same generation.

    Deterministic ids make a replay's output reproducible; the opening event's key
    and time keep ids unique even if a store is wiped and generations restart.
    """
    name = f"{bucket}\x00{prefix}\x00{generation}\x00{opener.key}\x00{opener.time!r}"
    return _uuid5(name)


def event_id_for(batch_id: str) -> str:
    """The stable EventBridge ``id`` of a batch's ``package-objects-ready`` event."""
    return _uuid5(f"package-objects-ready\x00{batch_id}")


class Batcher:
    """Applies object events to open batches and fires them (SPEC section 3).

    Only batches that were seeded or opened here are known; the caller must seed
    every open batch that the events can touch or that may fall due before the
    clock it passes to :meth:`advance`.
    """

    def __init__(self, rules: RuleBook, *, record_objects: bool = True) -> None:
        self.rules = rules
        # Whether Changes.objects records each counted object (a store that does not
        # keep them, such as a replay's throw-away one, needs no record).
        self.record_objects = record_objects
        self._batches: dict[BatchKey, OpenBatch] = {}
        self._generations: dict[BatchKey, int] = {}
        self._keys: dict[ObjectKey, KeyMemory] = {}
        self._fingerprints: set[str] = set()
        self._heap: list[tuple[float, str, str, str, Trigger]] = []
        self._changes = Changes()
        self._dirty: set[BatchKey] = set()
        self._rules_of: dict[str, GroupingRules | None] = {}

    # -- seeding ------------------------------------------------------------------
    def seed(
        self,
        *,
        batches: Iterable[OpenBatch] = (),
        generations: Mapping[BatchKey, int] | None = None,
        keys: Mapping[ObjectKey, KeyMemory] | None = None,
        fingerprints: Iterable[str] = (),
    ) -> None:
        """Add state loaded from a store to the working set (not recorded as changes)."""
        for batch in batches:
            key = (batch.bucket, batch.prefix)
            if key in self._batches:
                continue
            self._batches[key] = batch
            self._generations[key] = max(self._generations.get(key, 0), batch.generation)
            self._schedule(batch)
        for key, generation in (generations or {}).items():
            self._generations[key] = max(self._generations.get(key, 0), generation)
        for okey, memory in (keys or {}).items():
            self._keys.setdefault(okey, memory)
        self._fingerprints.update(fingerprints)

    def knows_batch(self, bucket: str, prefix: str) -> bool:
        """Whether the open batch of (bucket, prefix), if any, is in the working set."""
        return (bucket, prefix) in self._batches

    def open_batch(self, bucket: str, prefix: str) -> OpenBatch | None:
        """The open batch of (bucket, prefix) in the working set, if any."""
        return self._batches.get((bucket, prefix))

    # -- time ---------------------------------------------------------------------
    # The heap holds at most one entry per open batch, keyed by a deadline that may
    # be stale: deadlines only move later (activity extends the quiet period), so a
    # stale entry surfaces too early, is re-pushed with the batch's real deadline,
    # and the firing order stays the deadline order.
    def _settle_top(self) -> tuple[float, str, str, str, Trigger] | None:
        heap = self._heap
        while heap:
            deadline, bucket, prefix, batch_id, trigger = heap[0]
            batch = self._batches.get((bucket, prefix))
            if batch is None or batch.batch_id != batch_id:
                heapq.heappop(heap)
                continue
            actual = self._deadline(batch)
            if actual == (deadline, trigger):
                return heap[0]
            heapq.heapreplace(heap, (actual[0], bucket, prefix, batch_id, actual[1]))
        return None

    def next_deadline(self) -> float | None:
        """The earliest deadline of a known open batch."""
        top = self._settle_top()
        return None if top is None else top[0]

    def fire_overdue(self, bucket: str, prefix: str, clock: float) -> BatchReady | None:
        """Fire the open batch of (bucket, prefix) at its deadline if that has passed at
        ``clock`` (a batch :meth:`advance` was not let fire yet); None otherwise."""
        batch = self._batches.get((bucket, prefix))
        if batch is None:
            return None
        deadline, trigger = self._deadline(batch)
        return self._fire(batch, trigger, deadline) if deadline <= clock else None

    def advance(self, clock: float) -> list[BatchReady]:
        """Fire, in deadline order, every known batch whose deadline is <= ``clock``."""
        fired: list[BatchReady] = []
        heap = self._heap
        while heap and heap[0][0] <= clock:
            top = self._settle_top()
            if top is None or top[0] > clock:
                break
            deadline, bucket, prefix, _, trigger = heapq.heappop(heap)
            fired.append(self._fire(self._batches[(bucket, prefix)], trigger, deadline))
        return fired

    # -- events -------------------------------------------------------------------
    def classify(self, event: ObjectEvent) -> str | Skip:
        """The batch prefix of an event, or why it is not batched (SPEC section 2)."""
        rules = self._bucket_rules(event.bucket)
        if rules is None:
            return Skip.UNWATCHED
        return rules.prefix_of(event.key)

    def _bucket_rules(self, bucket: str) -> GroupingRules | None:
        """The bucket's rules (``None``: not watched), looked up once per bucket."""
        try:
            return self._rules_of[bucket]
        except KeyError:
            rules = self.rules.for_bucket(bucket) if self.rules.is_watched(bucket) else None
            self._rules_of[bucket] = rules
            return rules

    def apply(
        self, event: ObjectEvent, clock: float, prefix: str | Skip | None = None,
        activity: float | None = None,
    ) -> Outcome | Skip | BatchReady:
        """Apply one event at ``clock`` (which the caller has already advanced to).

        ``prefix`` is :meth:`classify`'s answer when the caller already has it.
        ``activity``: the batch activity the event counts as (default ``clock``, SPEC
        3.4; a worker that holds gives an old event its own time, see
        :meth:`edp.engine.Engine.hold`). Returns why the event was skipped, what it
        did, or the batch it fired.
        """
        if prefix is None:
            prefix = self.classify(event)
        if type(prefix) is Skip:  # (isinstance on an enum class is slow; Skip has no subclass)
            return prefix
        bucket, key, kind, time, etag, size, sequencer = event
        okey = (bucket, key)
        memory = self._keys.get(okey)
        # SPEC 3.1: an event without a sequencer is a duplicate if equal to any created
        # event seen before. Those are: events without a sequencer (a fingerprint each),
        # the key's last created write (kept in its memory), and the writes a memory no
        # longer holds: those replaced by a newer write, and those that came with a
        # sequencer not higher (fingerprints, recorded only then: a key written once
        # costs no fingerprint).
        if sequencer is not None:
            if (
                memory is not None
                and memory.sequencer is not None
                and not sequencer_is_newer(sequencer, memory.sequencer)
            ):
                if kind is not _DELETED and not _is_last_write(memory, time, etag, size):
                    self._remember(event.fingerprint(), clock)
                self._seen_again(okey, memory, clock)
                return _DUPLICATE
        else:
            fingerprint = event.fingerprint()
            seen = fingerprint in self._fingerprints
            self._remember(fingerprint, clock)  # (seen again: remembered from now)
            if seen:
                return _DUPLICATE
            if (
                kind is not _DELETED
                and memory is not None
                and _is_last_write(memory, time, etag, size)
            ):
                self._seen_again(okey, memory, clock)
                return _DUPLICATE
        if memory is None:
            memory = KeyMemory(sequencer, clock)
            self._keys[okey] = memory
        else:
            if sequencer is not None:
                memory.sequencer = sequencer
            memory.seen_at = clock
        self._changes.keys[okey] = memory
        if kind is _DELETED:
            return Outcome.DELETE
        if memory.event_time is not None and not _is_last_write(memory, time, etag, size):
            # the write this one replaces stays "seen" (its copy without a sequencer,
            # arriving later, is a duplicate)
            self._remember(ObjectEvent(bucket, key, _CREATED, memory.event_time, memory.etag,
                                       memory.size).fingerprint(), clock)
        memory.event_time, memory.etag, memory.size = time, etag, size
        return self._count(event, prefix, memory, clock,
                           clock if activity is None else activity)

    def _remember(self, fingerprint: str, clock: float) -> None:
        self._fingerprints.add(fingerprint)
        self._changes.fingerprints[fingerprint] = clock

    def _seen_again(self, okey: ObjectKey, memory: KeyMemory, clock: float) -> None:
        """A duplicate: the key's retention runs from now."""
        if clock > memory.seen_at:
            memory.seen_at = clock
            self._changes.keys[okey] = memory

    def close(self, bucket: str, prefix: str, clock: float,
              batch_id: str | None = None) -> BatchReady | None:
        """Close the open batch of (bucket, prefix) by hand (trigger ``manual``); with
        ``batch_id``, only if that is the one open (None otherwise: it closed, and the
        prefix may have opened its successor, which nobody asked to close)."""
        batch = self._batches.get((bucket, prefix))
        if batch is None or (batch_id is not None and batch.batch_id != batch_id):
            return None
        return self._fire(batch, Trigger.MANUAL, clock)

    def take_changes(self) -> Changes:
        """Hand over the changes recorded so far and start recording anew."""
        changes = self._changes
        changes.open_batches = [self._batches[k] for k in self._dirty if k in self._batches]
        self._changes = Changes()
        self._dirty = set()
        return changes

    # -- internals ----------------------------------------------------------------
    def _count(
        self, event: ObjectEvent, prefix: str, memory: KeyMemory, clock: float,
        activity: float,
    ) -> Outcome | BatchReady:
        bucket, key, _, time, etag, size, sequencer = event
        bkey = (bucket, prefix)
        batch = self._batches.get(bkey)
        if batch is None:
            generation = self._generations.get(bkey, 0) + 1
            self._generations[bkey] = generation
            batch = OpenBatch(
                batch_id=batch_id_for(bucket, prefix, generation, event),
                bucket=bucket,
                prefix=prefix,
                generation=generation,
                object_count=0,
                first_activity=activity,
                last_activity=activity,
                first_event_time=time,
                last_event_time=time,
            )
            self._batches[bkey] = batch
            self._schedule(batch)
        batch_id = batch.batch_id
        counted = memory.batch_id != batch_id
        if counted:
            batch.object_count += 1
            memory.batch_id = batch_id
        if activity > batch.last_activity:  # (a worker whose clock is behind another's
            batch.last_activity = activity  # must not move a shared batch's deadline back)
        batch.last_event_time = time
        self._dirty.add(bkey)
        if self.record_objects:
            self._changes.objects[(batch_id, key)] = _record(
                (batch_id, key, size, etag, sequencer, time)
            )
        # (looked up once per bucket, also when the prefixes were classified elsewhere)
        rules = (self._rules_of.get(bucket) or self._bucket_rules(bucket)
                 or self.rules.for_bucket(bucket))
        if rules.complete_markers and rules.is_marker(key):
            return self._fire(batch, Trigger.MARKER, clock)
        if 0 < rules.threshold_event_count <= batch.object_count:
            return self._fire(batch, Trigger.COUNT, clock)
        return _COUNTED if counted else _OVERWRITE

    def _deadline(self, batch: OpenBatch) -> tuple[float, Trigger]:
        """When an open batch fires by time, and by which trigger (its bucket's rules)."""
        return self.rules.for_bucket(batch.bucket).deadline(
            batch.first_activity, batch.last_activity
        )

    def _schedule(self, batch: OpenBatch) -> None:
        deadline, trigger = self._deadline(batch)
        heapq.heappush(
            self._heap, (deadline, batch.bucket, batch.prefix, batch.batch_id, trigger)
        )

    def _fire(self, batch: OpenBatch, trigger: Trigger, fired_at: float) -> BatchReady:
        bkey = (batch.bucket, batch.prefix)
        del self._batches[bkey]
        self._dirty.discard(bkey)
        ready = BatchReady(
            batch_id=batch.batch_id,
            event_id=event_id_for(batch.batch_id),
            bucket=batch.bucket,
            prefix=batch.prefix,
            generation=batch.generation,
            object_count=batch.object_count,
            trigger=trigger,
            fired_at=fired_at,
            first_event_time=batch.first_event_time,
            last_event_time=batch.last_event_time,
        )
        self._changes.closed.append((batch, ready))
        return ready
