"""Property: the engine (on a real SQLite store) equals a reference model of SPEC 3 and 6.

The model below is written from the SPEC text alone, as simply as possible (where the
SPEC leaves a reading open, edp's documented one: docs/batching.md section 2); the
engine's working sets, chunking, store round-trips and heap must not change the
outcome for any stream: duplicates, stale sequencers, overwrites, deletes,
shuffled arrival, events without sequencer, markers, several buckets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from edp_testing import eventbridge, iso, run_engine, settings


@dataclass
class ModelBatch:
    first: float
    last: float
    first_time: float
    last_time: float
    keys: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class Ev:
    bucket: str
    key: str
    created: bool
    t: float
    seq: str | None
    etag: str = "e"  # (a created event's; a delete has none)


def padded_newer(a: str, b: str) -> bool:
    n = max(len(a), len(b))
    return a.ljust(n, "0") > b.ljust(n, "0")


def model(events: list[Ev], *, duration: float, count: int, max_age: float,
          markers: tuple[str, ...]) -> list[tuple[Any, ...]]:
    """SPEC 3 + 6, depth 2, no ignores, as a reader of the SPEC would write it."""
    clock = -math.inf
    open_: dict[tuple[str, str], ModelBatch] = {}
    seqs: dict[tuple[str, str], str] = {}
    seen: set[tuple[Any, ...]] = set()
    out: list[tuple[Any, ...]] = []

    def deadline(b: ModelBatch) -> tuple[float, str]:
        d, trig = b.last + duration, "duration"
        if max_age > 0 and b.first + max_age < d:
            d, trig = b.first + max_age, "max-age"
        return d, trig

    def fire(bucket: str, prefix: str, trig: str, at: float) -> None:
        b = open_.pop((bucket, prefix))
        out.append((bucket, prefix, len(b.keys), trig, at, b.first_time, b.last_time))

    def fire_due(until: float) -> None:
        due = sorted((deadline(b)[0], k) for k, b in open_.items() if deadline(b)[0] <= until)
        for d, (bucket, prefix) in due:
            fire(bucket, prefix, deadline(open_[(bucket, prefix)])[1], d)

    for ev in events:
        clock = max(clock, ev.t)
        fire_due(clock)
        parts = ev.key.split("/")
        if len(parts) - 1 < 2:
            continue
        prefix = "/".join(parts[:2]) + "/"
        okey = (ev.bucket, ev.key)
        # SPEC 3.1 to the letter: without a sequencer, a duplicate is an event equal in
        # (bucket, key, type, time, etag, size) to any event already seen
        ident = (ev.bucket, ev.key, ev.created, ev.t, ev.etag if ev.created else None)
        copy = ident in seen
        seen.add(ident)
        if ev.seq is not None:
            if okey in seqs and not padded_newer(ev.seq, seqs[okey]):
                continue
            seqs[okey] = ev.seq
        elif copy:
            continue
        if not ev.created:
            continue
        batch = open_.get((ev.bucket, prefix))
        if batch is None:
            batch = open_[(ev.bucket, prefix)] = ModelBatch(clock, clock, ev.t, ev.t)
        batch.keys.add(ev.key)
        batch.last, batch.last_time = clock, ev.t
        name = parts[-1]
        if any(fnmatchcase(name, m) for m in markers):
            fire(ev.bucket, prefix, "marker", clock)
        elif 0 < count <= len(batch.keys):
            fire(ev.bucket, prefix, "count", clock)
    fire_due(math.inf)
    return out


KEYS = ["i/e1/a", "i/e1/b", "i/e1/c", "i/e2/a", "i/e2/_DONE", "j/e1/x", "shallow.tif"]


@st.composite
def streams(draw: st.DrawFn) -> list[Ev]:
    n = draw(st.integers(1, 60))
    t = 1_700_000_000.0
    seq = 0x100
    events: list[Ev] = []
    for _ in range(n):
        action = draw(st.sampled_from(["new", "new", "new", "dup", "delete", "noseq",
                                       "stripped", "altered"]))
        t += draw(st.sampled_from([0, 1, 5, 30, 120, 400]))
        if action == "dup" and events:
            events.append(draw(st.sampled_from(events)))
            continue
        if action in ("stripped", "altered") and events:
            # an earlier event again without its sequencer (altered: another etag)
            again = draw(st.sampled_from(events))
            etag = again.etag if action == "stripped" else {"e": "f", "f": "e"}[again.etag]
            events.append(Ev(again.bucket, again.key, again.created, again.t, None, etag))
            continue
        seq += draw(st.integers(1, 3))
        text = f"{seq:06X}"
        events.append(Ev(
            bucket=draw(st.sampled_from(["b1", "b2"])),
            key=draw(st.sampled_from(KEYS)),
            created=action != "delete",
            t=t,
            seq=None if action == "noseq" else text,
            etag=draw(st.sampled_from(["e", "f"])),
        ))
    # shuffled arrival: swap some neighbours
    for _ in range(draw(st.integers(0, 5))):
        if len(events) > 1:
            i = draw(st.integers(0, len(events) - 2))
            events[i], events[i + 1] = events[i + 1], events[i]
    return events


@hsettings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    events=streams(),
    duration=st.sampled_from([10.0, 60.0, 300.0]),
    count=st.sampled_from([0, 2, 3]),
    max_age=st.sampled_from([0.0, 100.0, 450.0]),
    markers=st.sampled_from([(), ("_DONE",)]),
    chunk=st.integers(1, 7),
)
def test_engine_matches_the_reference_model(
    events: list[Ev], duration: float, count: int, max_age: float,
    markers: tuple[str, ...], chunk: int,
) -> None:
    raw = [
        eventbridge(e.key, e.t, bucket=e.bucket, sequencer=e.seq,
                    kind="Object Created" if e.created else "Object Deleted",
                    etag=None if not e.created else e.etag, size=None if not e.created else 1)
        for e in events
    ]
    cfg = settings(bucket_threshold_duration=duration, bucket_threshold_event_count=count,
                   bucket_max_batch_age=max_age, bucket_complete_markers=markers)
    got = [
        (o["detail"]["bucket"], o["detail"]["prefix"], o["detail"]["object-count"],
         o["detail"]["trigger"], o["time"], o["detail"]["first-event-time"],
         o["detail"]["last-event-time"])
        for o in run_engine(raw, cfg, chunk=chunk)
    ]
    want = [(b, p, n, trig, iso(at), iso(ft), iso(lt))
            for b, p, n, trig, at, ft, lt in model(events, duration=duration, count=count,
                                                    max_age=max_age, markers=markers)]
    assert got == want
