"""The batch lifecycle of SPEC section 3, on the pure Batcher (no store, no sleeping)."""

from __future__ import annotations

import uuid

from hypothesis import given
from hypothesis import strategies as st

from edp.core.batching import ID_NAMESPACE, Batcher, Outcome, _uuid5
from edp.core.events import BatchReady, EventKind, ObjectEvent, Trigger
from edp.core.rules import GroupingRules, RuleBook, Skip


def created(key: str, t: float, seq: str | None = None, bucket: str = "b") -> ObjectEvent:
    return ObjectEvent(bucket, key, EventKind.CREATED, t, "etag", 1, seq)


def deleted(key: str, t: float, seq: str | None = None, bucket: str = "b") -> ObjectEvent:
    return ObjectEvent(bucket, key, EventKind.DELETED, t, None, None, seq)


def batcher(**rules: object) -> Batcher:
    return Batcher(RuleBook(default=GroupingRules(**rules)))  # type: ignore[arg-type]


def feed(b: Batcher, *events: ObjectEvent) -> list[BatchReady]:
    """Apply events as replay does: advance the clock, fire what is due, apply."""
    fired: list[BatchReady] = []
    clock = float("-inf")
    for event in events:
        clock = max(clock, event.time)
        fired += b.advance(clock)
        result = b.apply(event, clock)
        if isinstance(result, BatchReady):
            fired.append(result)
    return fired


def test_count_trigger_fires_on_the_nth_file_at_its_clock() -> None:
    b = batcher(threshold_event_count=3)
    fired = feed(b, created("i/e/1", 10), created("i/e/2", 11), created("i/e/3", 12))
    [ready] = fired
    assert (ready.prefix, ready.object_count, ready.trigger, ready.fired_at) == (
        "i/e/", 3, Trigger.COUNT, 12)
    assert (ready.first_event_time, ready.last_event_time) == (10, 12)


def test_duration_fires_at_last_activity_plus_duration() -> None:
    b = batcher(threshold_duration=300)
    feed(b, created("i/e/1", 0), created("i/e/2", 100))
    assert b.advance(399.9) == []
    [ready] = b.advance(400)
    assert (ready.trigger, ready.fired_at, ready.object_count) == (Trigger.DURATION, 400, 2)


def test_max_age_fires_even_while_files_keep_coming() -> None:
    b = batcher(threshold_duration=100, max_batch_age=250, threshold_event_count=0)
    fired = feed(b, *(created(f"i/e/{n}", n * 50) for n in range(8)))
    [ready] = fired
    # the file at 250 comes after the deadline: it opens the next batch
    assert (ready.trigger, ready.fired_at, ready.object_count) == (Trigger.MAX_AGE, 250, 5)


def test_duration_wins_a_tie_with_max_age() -> None:
    b = batcher(threshold_duration=100, max_batch_age=150)
    feed(b, created("i/e/1", 0), created("i/e/2", 50))
    [ready] = b.advance(1000)
    assert (ready.trigger, ready.fired_at) == (Trigger.DURATION, 150)


def test_marker_closes_at_once_and_wins_over_count() -> None:
    b = batcher(threshold_event_count=2, complete_markers=("_DONE",))
    fired = feed(b, created("i/e/a", 1), created("i/e/_DONE", 2))
    [ready] = fired
    assert (ready.trigger, ready.object_count, ready.fired_at) == (Trigger.MARKER, 2, 2)


def test_marker_in_a_subfolder_of_the_prefix_counts() -> None:
    b = batcher(complete_markers=("*.done",))
    [ready] = feed(b, created("i/e/raw/x.tif", 1), created("i/e/raw/run.done", 2))
    assert ready.trigger is Trigger.MARKER and ready.object_count == 2


def test_next_created_event_opens_the_next_generation() -> None:
    b = batcher(threshold_event_count=2)
    fired = feed(b, *(created(f"i/e/{n}", n) for n in range(5)))
    assert [r.generation for r in fired] == [1, 2]
    assert len({r.batch_id for r in fired}) == 2
    assert b.open_batch("b", "i/e/") is not None
    assert b.open_batch("b", "i/e/").generation == 3  # type: ignore[union-attr]


def test_duplicate_sequencer_changes_nothing() -> None:
    b = batcher()
    feed(b, created("i/e/a", 1, "05"))
    assert b.apply(created("i/e/a", 2, "05"), 2) is Outcome.DUPLICATE
    assert b.apply(created("i/e/a", 2, "04"), 2) is Outcome.DUPLICATE  # stale
    batch = b.open_batch("b", "i/e/")
    assert batch is not None and batch.last_activity == 1 and batch.object_count == 1


def test_overwrite_keeps_the_count_but_extends_the_quiet_period() -> None:
    b = batcher(threshold_duration=10)
    feed(b, created("i/e/a", 0, "01"), created("i/e/a", 5, "02"))
    batch = b.open_batch("b", "i/e/")
    assert batch is not None and batch.object_count == 1 and batch.last_activity == 5
    [ready] = b.advance(15)
    assert ready.object_count == 1


def test_a_key_of_a_closed_batch_counts_again_in_the_next() -> None:
    b = batcher(threshold_event_count=1)
    fired = feed(b, created("i/e/a", 0, "01"), created("i/e/a", 5, "02"))
    assert [r.object_count for r in fired] == [1, 1]


def test_deletes_never_count_extend_or_open() -> None:
    b = batcher(threshold_duration=10)
    assert b.apply(deleted("i/e/x", 0, "01"), 0) is Outcome.DELETE
    assert b.open_batch("b", "i/e/") is None
    feed(b, created("i/e/a", 1, "01"))
    assert b.apply(deleted("i/e/a", 8, "02"), 8) is Outcome.DELETE
    batch = b.open_batch("b", "i/e/")
    assert batch is not None and batch.last_activity == 1 and batch.object_count == 1


def test_a_delete_makes_an_older_create_stale() -> None:
    b = batcher()
    b.apply(deleted("i/e/a", 5, "09"), 5)
    assert b.apply(created("i/e/a", 6, "08"), 6) is Outcome.DUPLICATE
    assert b.apply(created("i/e/a", 6, "0A"), 6) is Outcome.COUNTED


def test_without_sequencer_identical_events_are_duplicates() -> None:
    b = batcher()
    assert b.apply(created("i/e/a", 1), 1) is Outcome.COUNTED
    assert b.apply(created("i/e/a", 1), 1) is Outcome.DUPLICATE
    assert b.apply(created("i/e/a", 2), 2) is Outcome.OVERWRITE  # another time: a new write


def test_without_sequencer_a_copy_of_the_keys_last_write_is_a_duplicate() -> None:
    # Given a key written with a sequencer, in a batch that has fired since
    b = batcher(threshold_event_count=1)
    assert isinstance(b.apply(created("i/e/a", 1, "05"), 1), BatchReady)
    # When the same write comes again without its sequencer (a re-delivery that lost it,
    # a backfill listing the object), then it is a duplicate (SPEC 3.1): no new batch
    assert b.apply(created("i/e/a", 1), 2) is Outcome.DUPLICATE
    # but a write at another time, with another etag or size, is new
    other = ObjectEvent("b", "i/e/a", EventKind.CREATED, 1, "other-etag", 1, None)
    assert isinstance(b.apply(other, 3), BatchReady)
    # and a delete does not make the last write's copy new
    b.apply(deleted("i/e/a", 4, "09"), 4)
    assert b.apply(other, 5) is Outcome.DUPLICATE


def test_without_sequencer_a_copy_of_any_earlier_write_is_a_duplicate() -> None:
    # Given a key written twice with sequencers, and a write that came with a lower
    # (stale) sequencer after them
    b = batcher(threshold_event_count=0)
    assert b.apply(created("i/e/a", 1, "01"), 1) is Outcome.COUNTED
    assert b.apply(created("i/e/a", 10, "02"), 10) is Outcome.OVERWRITE
    assert b.apply(created("i/e/a", 5, "01F"), 11) is Outcome.DUPLICATE  # stale
    # When copies of the replaced write and of the stale one come without sequencers
    # Then both are duplicates (SPEC 3.1: equal to an event already seen)
    assert b.apply(created("i/e/a", 1), 12) is Outcome.DUPLICATE
    assert b.apply(created("i/e/a", 5), 13) is Outcome.DUPLICATE
    # And so they did not extend the quiet period: the batch's last activity is 10
    assert b.open_batch("b", "i/e/").last_activity == 10  # type: ignore[union-attr]
    # And the fingerprints to remember went into the recorded changes
    assert len(b.take_changes().fingerprints) == 2  # the replaced write, the stale one


def test_a_key_written_once_records_no_fingerprint() -> None:
    # (the common case costs no fingerprint row: a key's one write lives in its memory)
    b = batcher()
    b.apply(created("i/e/a", 1, "01"), 1)
    assert b.take_changes().fingerprints == {}


def test_skipped_keys() -> None:
    b = Batcher(RuleBook(default=GroupingRules(ignore_prefixes=("tmp/",)),
                         watched=frozenset({"b"})))
    assert b.apply(created("a.tif", 0), 0) is Skip.SHALLOW
    assert b.apply(created("i/e/", 0), 0) is Skip.FOLDER
    assert b.apply(created(".quilt/named_packages/u/p/1", 0), 0) is Skip.QUILT
    assert b.apply(created("tmp/e/x", 0), 0) is Skip.IGNORED
    assert b.apply(created("i/e/x", 0, bucket="other"), 0) is Skip.UNWATCHED


def test_buckets_are_separate_and_overrides_apply_per_bucket() -> None:
    book = RuleBook(
        default=GroupingRules(threshold_event_count=2),
        overrides={"fast": GroupingRules(threshold_event_count=1, prefix_depth=1)},
    )
    b = Batcher(book)
    fired = feed(b, created("i/e/1", 0, bucket="slow"), created("i/e/1", 0, bucket="fast"),
                 created("i/e/2", 1, bucket="slow"))
    assert [(r.bucket, r.prefix, r.object_count) for r in fired] == [
        ("fast", "i/", 1), ("slow", "i/e/", 2)]


def test_advance_fires_in_deadline_order() -> None:
    b = batcher(threshold_duration=10)
    feed(b, created("p/2/a", 1), created("p/1/a", 2), created("p/3/a", 3))
    assert [r.prefix for r in b.advance(100)] == ["p/2/", "p/1/", "p/3/"]


def test_a_late_event_takes_the_clock_not_its_own_time() -> None:
    b = batcher(threshold_duration=10)
    feed(b, created("p/1/a", 5), created("p/2/a", 1))
    batch = b.open_batch("b", "p/2/")
    assert batch is not None and batch.last_activity == 5 and batch.first_event_time == 1
    assert [r.prefix for r in b.advance(100)] == ["p/1/", "p/2/"]  # tie: by prefix


def test_manual_close() -> None:
    b = batcher()
    feed(b, created("i/e/a", 1))
    ready = b.close("b", "i/e/", 50)
    assert ready is not None and (ready.trigger, ready.fired_at) == (Trigger.MANUAL, 50)
    assert b.close("b", "i/e/", 51) is None


def test_manual_close_of_a_named_batch_leaves_its_successor_open() -> None:
    # Given a prefix whose first batch closed and whose second is open
    b = batcher(threshold_event_count=2)
    [first] = feed(b, created("i/e/a", 1), created("i/e/b", 2), created("i/e/c", 3))
    opened = b.open_batch("b", "i/e/")
    assert opened is not None and opened.batch_id != first.batch_id
    # When an operator's close names the first batch, then the open one
    # Then only the open one closes
    assert b.close("b", "i/e/", 50, first.batch_id) is None
    assert b.open_batch("b", "i/e/") is opened
    ready = b.close("b", "i/e/", 50, opened.batch_id)
    assert ready is not None and ready.batch_id == opened.batch_id


def test_ids_are_deterministic_and_distinct() -> None:
    events = [created(f"i/e/{n}", n, f"{n:04X}") for n in range(4)]
    first = feed(batcher(threshold_event_count=2), *events)
    again = feed(batcher(threshold_event_count=2), *events)
    assert [r.batch_id for r in first] == [r.batch_id for r in again]
    assert [r.event_id for r in first] == [r.event_id for r in again]
    assert len({r.event_id for r in first} | {r.batch_id for r in first}) == 4


def test_changes_record_what_to_write() -> None:
    b = batcher(threshold_event_count=2)
    feed(b, created("i/e/1", 0, "01"), created("i/e/2", 1, "02"), created("x/y/1", 1, "03"))
    changes = b.take_changes()
    assert [batch.prefix for batch in changes.open_batches] == ["x/y/"]
    assert [ready.prefix for _, ready in changes.closed] == ["i/e/"]
    assert set(changes.keys) == {("b", "i/e/1"), ("b", "i/e/2"), ("b", "x/y/1")}
    assert len(changes.objects) == 3
    assert b.take_changes().is_empty()


def test_a_batcher_for_a_store_without_objects_records_none_and_batches_the_same() -> None:
    events = [created("i/e/1", 0, "01"), created("i/e/2", 1, "02"), created("x/y/1", 1, "03")]
    keeping, bare = batcher(threshold_event_count=2), batcher(threshold_event_count=2)
    bare.record_objects = False
    assert feed(keeping, *events) == feed(bare, *events)
    changes = bare.take_changes()
    assert changes.objects == {}
    assert set(changes.keys) == set(keeping.take_changes().keys)


@given(st.text())
def test_ids_are_rfc_4122_uuid5_of_the_namespace(name: str) -> None:
    # The fast id function must give what uuid.uuid5 gives, for any name: ids of batches
    # fired before it existed, and other tools computing them, stay the same.
    try:
        expected = str(uuid.uuid5(ID_NAMESPACE, name))
    except UnicodeEncodeError:  # a lone surrogate: decoding refuses such keys
        return
    assert _uuid5(name) == expected
