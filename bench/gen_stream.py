"""Generate a deterministic stream of EventBridge S3 "Object Created" events.

Usage::

    python bench/gen_stream.py OUT.jsonl --events 1000000 --seed 1 \
        [--files-per-prefix 37] [--buckets 1] [--concurrent 8]

One event per line (JSON Lines), shaped like what EventBridge delivers for
an S3 ``PutObject``.  Object keys look like
``instrument-N/exp-XXXXXX/raw/file-NNNN.tif``, so the depth-2 prefix
``instrument-N/exp-XXXXXX/`` identifies one experiment.

The stream models ``--concurrent`` experiments being written at once.  Each
experiment writes a number of files drawn uniformly around
``--files-per-prefix`` (20..54 for the default 37), one every 1..6 seconds,
with an occasional pause of 360..1200 seconds in the middle.  When an
experiment finishes, a new one starts 0..120 seconds later in its slot.
Event times are whole seconds and never decrease.

With the default grouping settings (count threshold 20, quiet period 300 s,
event-time semantics) both triggers fire: full batches of 20 close on count,
remainders close once the prefix has been quiet for 300 s (after a pause or
after the experiment ends).  A summary of the batches to expect under those
settings is printed to stderr as one JSON line, so a consumer's output can be
checked against it.

The output depends only on the arguments: the same seed gives the same bytes.
"""

from __future__ import annotations

import argparse
import functools
import heapq
import json
import random
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

START_EPOCH = 1_704_067_200  # 2024-01-01T00:00:00Z
ACCOUNT = "123456789012"
REGION = "us-east-1"
INSTRUMENTS = 12
SEQUENCER_BASE = 0x60 << 56  # printed as 18 hex digits: 006000000000000001, ...

COUNT_THRESHOLD = 20  # edp's default batch size trigger
QUIET_SECONDS = 300  # edp's default quiet-period trigger

FILE_GAP_SECONDS = (1, 6)  # between two files of one experiment
PAUSE_SECONDS = (360, 1200)  # a mid-experiment pause, always > QUIET_SECONDS
PAUSE_PROBABILITY = 0.01  # chance that a file is preceded by a pause
NEXT_EXPERIMENT_DELAY_SECONDS = (0, 120)
INITIAL_START_SPREAD_SECONDS = 60


def encode_line_stdlib(obj: object) -> bytes:
    """Encode one object as a compact JSON line with the standard library."""
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


# orjson when it is installed, else the standard library; both produce the
# same compact form for the plain types used here.
try:
    from orjson import OPT_APPEND_NEWLINE
    from orjson import dumps as orjson_dumps
except ImportError:
    encode_line: Callable[[object], bytes] = encode_line_stdlib
else:
    encode_line = functools.partial(orjson_dumps, option=OPT_APPEND_NEWLINE)


def iso_utc(epoch: int) -> str:
    """Format epoch seconds the way EventBridge does: ``2024-01-01T00:00:07Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def bucket_names(count: int) -> list[str]:
    """Return the bucket names: ``bench-bucket``, or numbered ones if several."""
    if count == 1:
        return ["bench-bucket"]
    return [f"bench-bucket-{i}" for i in range(count)]


def file_count_range(mean: int) -> tuple[int, int]:
    """Return the inclusive range files per prefix are drawn from.

    The range is symmetric around ``mean`` and spans about +-46 %, which is
    20..54 for the default mean of 37.
    """
    low = max(1, round(mean * 20 / 37))
    return low, 2 * mean - low


@dataclass(frozen=True)
class StreamSpec:
    """What to generate; the same spec always gives the same bytes."""

    events: int
    seed: int = 1
    files_per_prefix: int = 37  # mean files per depth-2 prefix
    buckets: int = 1
    concurrent: int = 8  # experiments being written at the same time


@dataclass
class Experiment:
    """One prefix being written: its identity and its progress."""

    bucket: str
    prefix: str
    source_ip: str
    n_files: int
    next_index: int = 0
    last_time: int = 0
    open_files: int = 0  # files in the batch an event-time grouper holds open


@dataclass
class Tally:
    """Batches a grouper with the default settings would emit."""

    prefixes: int = 0
    by_count: int = 0
    by_quiet: int = 0
    open_at_end: int = 0
    without_timeouts: int = 0

    def finish_prefix(self, exp: Experiment) -> None:
        """Count the batches a grouper whose timeout never fires emits for ``exp``.

        That is one per ``COUNT_THRESHOLD`` files plus the remainder, flushed
        at end of input.
        """
        full, rest = divmod(exp.next_index, COUNT_THRESHOLD)
        self.without_timeouts += full + (1 if rest else 0)


class StreamGenerator:
    """Produce the events of one stream, in time order."""

    def __init__(self, spec: StreamSpec) -> None:
        """Set up ``spec.concurrent`` experiments starting in the first minute."""
        self.rng = random.Random(spec.seed)
        self.files_range = file_count_range(spec.files_per_prefix)
        self.buckets = bucket_names(spec.buckets)
        self.next_experiment_id = 1
        self.tally = Tally()
        self.sequence = 0
        self.now = START_EPOCH  # time of the latest event
        # (next event time, slot, experiment); the slot breaks ties so that
        # experiments are never compared.
        self.heap: list[tuple[int, int, Experiment]] = []
        # Quiet-period deadlines of finished experiments that left files in an
        # open batch, in non-decreasing order.
        self.deadlines: deque[int] = deque()
        for slot in range(spec.concurrent):
            start = START_EPOCH + self.rng.randint(0, INITIAL_START_SPREAD_SECONDS)
            self.heap.append((start, slot, self.new_experiment()))
        heapq.heapify(self.heap)
        self.resources = {b: [f"arn:aws:s3:::{b}"] for b in self.buckets}

    def new_experiment(self) -> Experiment:
        """Create the next experiment with a random instrument and size."""
        rng = self.rng
        instrument = rng.randint(1, INSTRUMENTS)
        exp_id = self.next_experiment_id
        self.next_experiment_id += 1
        return Experiment(
            bucket=rng.choice(self.buckets),
            prefix=f"instrument-{instrument}/exp-{exp_id:06d}/",
            source_ip=f"10.0.{instrument}.{rng.randint(1, 254)}",
            n_files=rng.randint(*self.files_range),
        )

    def next_event(self) -> dict[str, object]:
        """Return the next event of the stream and advance the simulation."""
        rng = self.rng
        now, slot, exp = heapq.heappop(self.heap)
        self.now = now
        while self.deadlines and self.deadlines[0] <= now:
            self.deadlines.popleft()
            self.tally.by_quiet += 1
        if exp.next_index == 0:
            self.tally.prefixes += 1
        elif exp.open_files and now - exp.last_time >= QUIET_SECONDS:
            exp.open_files = 0
            self.tally.by_quiet += 1

        self.sequence += 1
        event: dict[str, object] = {
            "version": "0",
            "id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            "detail-type": "Object Created",
            "source": "aws.s3",
            "account": ACCOUNT,
            "time": iso_utc(now),
            "region": REGION,
            "resources": self.resources[exp.bucket],
            "detail": {
                "version": "0",
                "bucket": {"name": exp.bucket},
                "object": {
                    "key": f"{exp.prefix}raw/file-{exp.next_index:04d}.tif",
                    "size": rng.randint(100_000, 60_000_000),
                    "etag": f"{rng.getrandbits(128):032x}",
                    "sequencer": f"{SEQUENCER_BASE + self.sequence:018X}",
                },
                "request-id": f"{rng.getrandbits(64):016X}",
                "requester": ACCOUNT,
                "source-ip-address": exp.source_ip,
                "reason": "PutObject",
            },
        }

        exp.last_time = now
        exp.next_index += 1
        exp.open_files += 1
        if exp.open_files == COUNT_THRESHOLD:
            exp.open_files = 0
            self.tally.by_count += 1

        if exp.next_index < exp.n_files:
            if rng.random() < PAUSE_PROBABILITY:
                gap = rng.randint(*PAUSE_SECONDS)
            else:
                gap = rng.randint(*FILE_GAP_SECONDS)
            heapq.heappush(self.heap, (now + gap, slot, exp))
        else:
            self.tally.finish_prefix(exp)
            if exp.open_files:
                self.deadlines.append(now + QUIET_SECONDS)
            start = now + rng.randint(*NEXT_EXPERIMENT_DELAY_SECONDS)
            heapq.heappush(self.heap, (start, slot, self.new_experiment()))
        return event

    def close(self) -> Tally:
        """Settle the batches still open after the last event and return the tally.

        A batch counts as closed by quiet period if the latest event is at
        least ``QUIET_SECONDS`` after the batch's last file; otherwise it is
        still open when the stream ends.
        """
        self.tally.open_at_end += len(self.deadlines)
        for _, _, exp in self.heap:
            if exp.next_index == 0:
                continue
            self.tally.finish_prefix(exp)
            if not exp.open_files:
                continue
            if exp.last_time + QUIET_SECONDS <= self.now:
                self.tally.by_quiet += 1
            else:
                self.tally.open_at_end += 1
        return self.tally


def generate(out: Path, spec: StreamSpec) -> dict[str, object]:
    """Write ``spec.events`` lines to ``out`` and return a summary of the stream."""
    started = time.perf_counter()
    gen = StreamGenerator(spec)
    with out.open("wb", buffering=1 << 20) as f:
        write = f.write
        write(encode_line(gen.next_event()))
        first_time = iso_utc(gen.now)
        for _ in range(spec.events - 1):
            write(encode_line(gen.next_event()))
    tally = gen.close()
    return {
        "file": str(out),
        "events": spec.events,
        "prefixes": tally.prefixes,
        "first_time": first_time,
        "last_time": iso_utc(gen.now),
        "batches_event_time": {
            "count_threshold": COUNT_THRESHOLD,
            "quiet_seconds": QUIET_SECONDS,
            "by_count": tally.by_count,
            "by_quiet": tally.by_quiet,
            "open_at_end": tally.open_at_end,
        },
        "batches_without_timeouts": tally.without_timeouts,
        "seconds": round(time.perf_counter() - started, 3),
    }


def positive_int(text: str) -> int:
    """Parse a command-line integer that must be at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, write the stream and print its summary to stderr."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="JSON Lines file to write")
    parser.add_argument("--events", type=positive_int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--files-per-prefix",
        type=positive_int,
        default=StreamSpec.files_per_prefix,
        help="mean number of files per depth-2 prefix (default 37)",
    )
    parser.add_argument("--buckets", type=positive_int, default=StreamSpec.buckets)
    parser.add_argument(
        "--concurrent",
        type=positive_int,
        default=StreamSpec.concurrent,
        help="experiments being written at the same time (default 8)",
    )
    args = parser.parse_args(argv)
    spec = StreamSpec(
        events=args.events,
        seed=args.seed,
        files_per_prefix=args.files_per_prefix,
        buckets=args.buckets,
        concurrent=args.concurrent,
    )
    summary = generate(args.out, spec)
    print(json.dumps(summary), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
