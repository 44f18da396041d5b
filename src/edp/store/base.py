"""The store port: what the engine, the relay and the CLI need from a database.

A store keeps, per (bucket, prefix), the open batch and the last generation; per
(bucket, key), the highest sequencer seen and the batch the key was counted in;
every batch with its objects; the outbox of events to deliver, with one delivery
row per sink; the dead letters; counters; and the workers' clocks.

All writes of one engine step happen in one :class:`Transaction`, so closing a
batch and recording its event in the outbox commit together or not at all.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from edp.core.batching import BatchKey, Changes, KeyMemory, ObjectKey, ObjectRecord, OpenBatch
from edp.core.envelopes import BATCH_EVENT
from edp.core.events import ObjectEvent
from edp.errors import NotFound

WORKER_ID_HOW = ("EDP_WORKER_ID or worker_id in the config file, or the --worker-id option of "
                 "edp run, replay and backfill")
"""How a user gives a process its worker id (in the refusal of an id in use: `edp watch`
and `edp serve` have no --worker-id option)."""


@dataclass(slots=True)
class LoadRequest:
    """What the working set of one engine step must contain."""

    batch_keys: set[BatchKey] = field(default_factory=set)
    object_keys: set[ObjectKey] = field(default_factory=set)
    fingerprints: set[str] = field(default_factory=set)
    batch_ids: set[str] = field(default_factory=set)
    due_until: float | None = None
    due_limit: int | None = None


@dataclass(slots=True)
class WorkingState:
    """State loaded for one engine step."""

    batches: list[OpenBatch] = field(default_factory=list)
    generations: dict[BatchKey, int] = field(default_factory=dict)
    keys: dict[ObjectKey, KeyMemory] = field(default_factory=dict)
    fingerprints: set[str] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """One event to deliver, as stored: ``payload`` is its JSON text."""

    seq: int
    event_id: str
    kind: str
    payload: str
    created_at: float


@dataclass(frozen=True, slots=True)
class Timer:
    """A durable timer: ``payload`` is JSON text owned by whoever set it."""

    kind: str
    key: str
    due_at: float
    payload: str


@dataclass(frozen=True, slots=True)
class ParkedDelivery:
    """A delivery refused for good (parked): which sink, which event, and why."""

    sink: str
    event_id: str
    kind: str
    payload: str
    error: str | None
    attempts: int


@dataclass(frozen=True, slots=True)
class SinkSummary:
    """A sink the store knows (registered, or with delivery rows) and its deliveries."""

    name: str
    registered_at: float | None
    pending: int
    parked: int
    delivered: int


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An input that could not be decoded, kept with the reason."""

    source: str
    location: str
    reason: str
    body: str
    received_at: float
    id: int | None = None


@dataclass(frozen=True, slots=True)
class BatchRow:
    """A batch as stored, open or closed."""

    batch_id: str
    bucket: str
    prefix: str
    generation: int
    state: str
    object_count: int
    first_activity: float
    last_activity: float
    first_event_time: float
    last_event_time: float
    deadline: float | None
    deadline_trigger: str | None
    trigger: str | None
    fired_at: float | None
    event_id: str | None


@dataclass(frozen=True, slots=True)
class SavedBatch:
    """An open batch to write, with the deadline the engine computed for it."""

    batch: OpenBatch
    deadline: float
    deadline_trigger: str


@dataclass(frozen=True, slots=True)
class ClosedBatch:
    """A batch that fired in this step, with its outbox event."""

    batch: OpenBatch
    trigger: str
    fired_at: float
    event_id: str
    payload: str
    sinks: tuple[str, ...] | None = None
    """This event's sinks when they are not the step's: the step's, but for a worker's
    own sinks of other buckets, plus the workers' own sinks of its bucket (a watcher's,
    when another worker fires one of its batches by time)."""


@dataclass(slots=True)
class StepWrite:
    """Everything one engine step writes."""

    open_batches: list[SavedBatch] = field(default_factory=list)
    closed: list[ClosedBatch] = field(default_factory=list)
    keys: dict[ObjectKey, KeyMemory] = field(default_factory=dict)
    fingerprints: dict[str, float] = field(default_factory=dict)
    objects: Sequence[ObjectRecord] = ()
    outbox_kind: str = "package-objects-ready"

    def closed_rows(self) -> list[tuple[Any, ...]]:
        """The closed batches as ``batches`` rows: id, bucket, prefix, generation, count,
        first/last activity, first/last event time, trigger, fired_at, event_id."""
        return [
            (c.batch.batch_id, c.batch.bucket, c.batch.prefix, c.batch.generation,
             c.batch.object_count, c.batch.first_activity, c.batch.last_activity,
             c.batch.first_event_time, c.batch.last_event_time, c.trigger, c.fired_at,
             c.event_id)
            for c in self.closed
        ]

    def open_rows(self) -> list[tuple[Any, ...]]:
        """The open batches as ``batches`` rows: id, bucket, prefix, generation, count,
        first/last activity, first/last event time, deadline, deadline trigger."""
        return [
            (s.batch.batch_id, s.batch.bucket, s.batch.prefix, s.batch.generation,
             s.batch.object_count, s.batch.first_activity, s.batch.last_activity,
             s.batch.first_event_time, s.batch.last_event_time, s.deadline, s.deadline_trigger)
            for s in self.open_batches
        ]

    def generations(self) -> list[tuple[str, str, int]]:
        """(bucket, prefix, highest generation written) per prefix, sorted."""
        highest: dict[BatchKey, int] = {}
        for batch in [c.batch for c in self.closed] + [s.batch for s in self.open_batches]:
            key = (batch.bucket, batch.prefix)
            highest[key] = max(highest.get(key, 0), batch.generation)
        return [(bucket, prefix, gen) for (bucket, prefix), gen in sorted(highest.items())]

    @classmethod
    def from_changes(
        cls, changes: Changes, open_batches: list[SavedBatch], closed: list[ClosedBatch]
    ) -> StepWrite:
        """Wrap a batcher's changes with what the engine computed for them."""
        return cls(
            open_batches=open_batches,
            closed=closed,
            keys=changes.keys,
            fingerprints=changes.fingerprints,
            objects=list(changes.objects.values()),
        )


def pick_batch(batch_id: str, rows: Sequence[Sequence[Any]]) -> BatchRow:
    """The batch that ``batch_id`` names among rows whose id starts with it.

    An exact id wins; else a unique prefix; else :class:`~edp.errors.NotFound` says
    whether the prefix matched several batches or none.
    """
    if not batch_id.strip():
        raise NotFound("no batch id given (an empty id would name any batch)")
    exact = [row for row in rows if row[0] == batch_id]
    if exact:
        return BatchRow(*exact[0])
    if len(rows) == 1:
        return BatchRow(*rows[0])
    if rows:
        raise NotFound(f"batch id {batch_id!r} is ambiguous: give more characters")
    raise NotFound(f"no batch with id {batch_id!r}")


class Transaction(Protocol):
    """One atomic unit of work on a store."""

    def load(self, request: LoadRequest) -> WorkingState:
        """Load (and, where the backend can, lock) the state a step needs."""
        ...

    def save(self, write: StepWrite, *, sinks: Sequence[str], now: float) -> None:
        """Write a step's changes, its outbox events and one delivery row per sink."""
        ...

    def add_dead_letters(self, letters: Sequence[DeadLetter]) -> None:
        """Keep inputs that could not be decoded."""
        ...

    def add_counters(self, counts: Mapping[str, int]) -> None:
        """Add to named counters."""
        ...

    def add_outbox(
        self, *, event_id: str, kind: str, payload: str, sinks: Sequence[str], now: float
    ) -> bool:
        """Record one event to deliver (not a batch event); False if its id exists."""
        ...

    def set_timer(self, kind: str, key: str, *, due_at: float, payload: str) -> bool:
        """Start a durable timer unless (kind, key) already runs; True if started."""
        ...

    def take_due_timers(self, kind: str, *, until: float, limit: int) -> list[Timer]:
        """Remove and return the timers of ``kind`` due at or before ``until``, earliest first."""
        ...

    def clear_timer(self, kind: str, key: str) -> None:
        """Remove the timer (kind, key) if it exists."""
        ...

    def heartbeat(
        self, worker_id: str, *, clock: float, now: float, held: float | None = None,
        held_until: float | None = None, finished: bool = False,
    ) -> None:
        """Publish a worker's clock when this transaction commits (as :meth:`Store.heartbeat`).

        Other workers see the clock and the step's changes at the same moment, and
        the step costs no extra commit. ``finished``: the worker is marked finished
        (:meth:`Store.finish_worker`) with it, as one whose step ends all it holds.
        """
        ...


HISTORY_KIND = BATCH_EVENT
"""The only kind of outbox event :meth:`Store.prune_history` deletes: a batch's, whose
files are known again by their key memories. A ``package-ready`` event stays (one per
package revision): its id is all that tells a revision seen again (an ``edp watch`` of
the registry folder scans every pointer at its start, a redriven queue message) from a
new one (edp.quilt.ready)."""


@dataclass(frozen=True, slots=True)
class HistoryPruned:
    """What one page of :meth:`Store.prune_history` deleted; ``more``: a page was full
    (more may be due)."""

    events: int = 0
    batches: int = 0
    dead_letters: int = 0
    more: bool = False

    def __add__(self, other: HistoryPruned) -> HistoryPruned:
        return HistoryPruned(self.events + other.events, self.batches + other.batches,
                             self.dead_letters + other.dead_letters, other.more)


class Floors(NamedTuple):
    """What holds a worker's firing back (SPEC 4): the other live workers' lowest clock
    and the other workers' lowest hold that has not ended (see :meth:`Store.heartbeat`);
    None where there is none."""

    clock: float | None
    held: float | None


def lowest(*values: float | None) -> float | None:
    """The lowest of ``values`` that are set (None if none is)."""
    return min((value for value in values if value is not None), default=None)


class Queued(NamedTuple):
    """Events taken from a shared queue of replay workers (see :mod:`edp.replay`)."""

    events: list[ObjectEvent]
    floor: float
    """The lowest clock of the live, unfinished workers: nothing due after it may fire."""
    clock: float
    """The newest effective time applied before these events (by any worker)."""


class QueueTransaction(Transaction, Protocol):
    """A transaction of a store shared by replay workers (PostgreSQL)."""

    def queue_events(
        self, worker_id: str, events: Sequence[tuple[int, float, ObjectEvent]]
    ) -> None:
        """Queue a worker's events as (seq in its part, effective time, event); an event
        queued before (same worker and seq) is not queued again."""
        ...

    def take_queued(self, *, limit: int, now: float, timeout: float) -> Queued | None:
        """Take the apply lock (None when another transaction holds it), then remove and
        return up to ``limit`` queued events whose effective time is below the lowest
        clock of the workers with a heartbeat within ``timeout``, in queue order."""
        ...


class Store(Protocol):
    """The store port. Adapters: :mod:`edp.store.sqlite`, :mod:`edp.store.postgres`."""

    url: str
    keeps_objects: bool
    """Whether the store keeps each batch's objects (a throw-away store does not: the
    engine then does not even record them)."""
    shared: bool
    """Whether the store is made for several workers at once (PostgreSQL): a live
    worker then keeps its clock published while it waits (see :mod:`edp.daemon`)."""

    def transaction(self) -> AbstractContextManager[Transaction]:
        """A transaction that commits on success and rolls back on error."""
        ...

    # -- outbox -----------------------------------------------------------------
    def pending(self, sink: str, *, limit: int, now: float) -> list[OutboxEntry]:
        """Outbox events not yet delivered to ``sink`` and due for an attempt, oldest first;
        none past an undelivered, unparked one that is not due yet (order per sink)."""
        ...

    def mark_delivered(self, sink: str, event_ids: Sequence[str], *, now: float) -> None:
        """Record that ``sink`` accepted these events."""
        ...

    def mark_failed(
        self, sink: str, event_id: str, *, error: str, retry_at: float | None, now: float
    ) -> None:
        """Record a failed attempt; ``retry_at=None`` parks the event (permanent error)."""
        ...

    def next_timer_due(self) -> float | None:
        """The earliest ``due_at`` of any durable timer (None when there is none)."""
        ...

    def wall_clock(self) -> float:
        """The wall clock (epoch seconds) live workers on this store share: the local
        clock for a store of one process; the database server's for a shared one, so
        that workers whose own clocks disagree still agree on deadlines (SPEC 4)."""
        ...

    def known_sinks(self) -> list[str]:
        """Names of the sinks workers relay to: registered ones, and every sink that has
        delivery rows."""
        ...

    def register_sinks(self, names: Sequence[str], *, now: float) -> None:
        """Record that a long-running worker relays to ``names`` (see known_sinks)."""
        ...

    def registered_sinks(self) -> list[str]:
        """Names of the sinks workers registered at their start (a small table, unlike
        :meth:`known_sinks`, which also reads every delivery row)."""
        ...

    def claim_worker_id(self, worker_id: str, *, silent_for: float | None = None) -> None:
        """Make ``worker_id`` this process's for as long as the store is open: raise
        :class:`~edp.errors.EdpError` when another live process has it (two processes
        under one id would publish one clock for both, and the other workers would
        fire batches one of them may still extend). A holder whose worker published
        no heartbeat for ``silent_for`` seconds is taken for gone (where a holder can be
        cut off: a shared store's session)."""
        ...

    def requeue(self, event_id: str, sinks: Sequence[str]) -> bool:
        """Make ``event_id`` pending again for ``sinks`` (a re-emit); False if unknown."""
        ...

    def sink_summaries(self) -> list[SinkSummary]:
        """Every sink :meth:`known_sinks` names, with its delivery counts, by name."""
        ...

    def parked_deliveries(self, *, limit: int = 20) -> list[ParkedDelivery]:
        """The latest deliveries refused for good, newest first."""
        ...

    def forget_sink(self, name: str) -> SinkSummary | None:
        """Drop a sink: its registration and all its delivery rows (the events stay in
        the outbox for the other sinks). Returns what it held, None if unknown."""
        ...

    # -- inspection ---------------------------------------------------------------
    def get_batch(self, batch_id: str) -> BatchRow:
        """One batch by id, or a unique id prefix; raises :class:`~edp.errors.NotFound`."""
        ...

    def list_batches(self, *, state: str | None = None, limit: int = 50) -> list[BatchRow]:
        """Open batches by deadline, or recent closed batches, newest first."""
        ...

    def batch_objects(self, batch_id: str) -> list[ObjectRecord]:
        """The objects of one batch, by key."""
        ...

    def open_batches_by_deadline(self, *, limit: int) -> list[BatchRow]:
        """The open batches with the earliest deadlines."""
        ...

    def outbox_events(self, *, limit: int = 50) -> list[OutboxEntry]:
        """The most recent outbox events, newest first."""
        ...

    def dead_letters(self, *, limit: int = 50) -> list[DeadLetter]:
        """The most recent dead letters, newest first."""
        ...

    def counters(self) -> dict[str, int]:
        """Every counter."""
        ...

    def stats(self) -> dict[str, int]:
        """Open batches, closed batches, pending deliveries, dead letters."""
        ...

    # -- workers and housekeeping -----------------------------------------------
    def heartbeat(
        self, worker_id: str, *, clock: float, now: float, held: float | None = None,
        held_until: float | None = None, finished: bool = False,
    ) -> None:
        """Publish a worker's clock (SPEC section 4; it never goes back), and its hold:
        a time at which it holds every worker's firing by time (``None``: none), while
        messages it received may come again later (see :meth:`edp.engine.Engine.hold`).
        Each heartbeat sets the hold anew. A hold with an end (``held_until``) counts
        until then, even once its worker is silent or finished (what it holds for comes
        back then, to whoever receives it); one without, while its worker is live.
        ``finished``: as :meth:`finish_worker` right after, in the same write."""
        ...

    def retire_worker(
        self, worker_id: str, *, held: float | None = None, held_until: float | None = None
    ) -> None:
        """A worker that will not run again (a Lambda runtime replaced after a failure):
        it is finished, and its hold is replaced by ``held`` until ``held_until`` (None:
        none)."""
        ...

    def worker_clock(self, worker_id: str) -> float | None:
        """The last clock a worker published, to resume after a restart."""
        ...

    def worker_finished(self, worker_id: str) -> bool | None:
        """Whether a worker's last run ended with :meth:`finish_worker` (a clean stop);
        None when the worker never published a clock."""
        ...

    def worker_hold(self, worker_id: str) -> float | None:
        """The hold a worker published last (see :meth:`heartbeat`), None if none: a
        worker that crashed while it held holds again at least that low after a
        restart (what it held for may still be on its way back)."""
        ...

    def fire_floor(self, worker_id: str, *, now: float, timeout: float) -> float | None:
        """The lowest clock, or hold, of the *other* live workers (None when there are
        none): ``lowest(*floors(...))``."""
        ...

    def floors(self, worker_id: str, *, now: float, timeout: float) -> Floors:
        """The lowest clock of the *other* live workers, and the lowest hold of the
        other workers that has not ended (see :meth:`heartbeat`)."""
        ...

    def finish_worker(self, worker_id: str) -> bool:
        """Mark a replay worker done; True when every worker is done (the caller flushes)."""
        ...

    def prune(self, *, keys_before: float, keep_buckets: Sequence[str] = ()) -> int:
        """Forget key memories and fingerprints last seen before ``keys_before``, except
        the keys of batches still open (SPEC 3.3: an overwrite of one keeps the count)
        and the key memories of ``keep_buckets`` (watched folders: see FolderSource).
        A key memory goes only when its batch is closed (or it names none): one naming
        a batch the store does not hold (edp writes none) is kept, since a batch a
        concurrent step opens is not yet visible to the pruning statement."""
        ...

    def prune_history(self, *, before: float, limit: int) -> HistoryPruned:
        """Delete one page (up to ``limit`` rows of each kind) of history older than
        ``before`` (the workers' wall clock): batch events (outbox rows of
        :data:`HISTORY_KIND` and their deliveries) recorded before it whose every delivery
        was made (one a sink refused for good, parked, keeps its event: it was never
        delivered, and waits for an operator's reemit or forget-sink); closed batches
        fired before it whose event is gone from the outbox (a batch a backfill fired at
        an old event time stays as long as its event), with their objects (their keys'
        memories stay, naming no batch); dead letters received before it. Open batches,
        undelivered events, key memories, prefixes' generations, workers and counters are
        never touched."""
        ...

    def schema_version(self) -> tuple[int, int]:
        """(applied, latest) migration versions."""
        ...

    def stop_retrying_on(self, event: threading.Event | None) -> None:
        """Once ``event`` is set, try an operation that failed on a lost database once
        more at most, rather than for ``retry_seconds``: a worker told to stop during an
        outage exits within moments (what it could not store comes again). None: retry
        as usual again. (A store without retries ignores it.)"""
        ...

    def close(self) -> None:
        """Release connections."""
        ...

