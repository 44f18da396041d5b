# bytewax is installed only in bench/.venv; the project's mypy, which may not
# see it, types it as Any, and the sink classes below must subclass it.
# mypy: disallow-subclassing-any=False
"""The bytewax peer: per-prefix batching with bytewax's ``collect`` operator.

Usage: ``python bench/peer_bytewax.py FILE`` (needs ``bytewax==0.21.1`` and
``orjson``; see bench/README.md).

Dataflow: ``FileSource`` lines -> ``map`` (orjson parse to a small tuple)
-> ``key_on`` ``bucket/prefix`` -> ``collect`` (timeout 300 s, max_size 20)
-> a sink that counts the groups.  It is run in this process with
``bytewax.testing.run_main`` (one worker, one thread), like the other peers.
Prints::

    {"peer": "bytewax", "events": N, "groups": G, "prefixes": P,
     "seconds": S, "events_per_s": R}

``events`` is the number of files that reached the sink inside a group, so it
equals the number of input lines when nothing was lost.

Semantics, and why the group count differs from an event-time grouper:
``op.collect`` computes its timeout from system time
(``datetime.now(timezone.utc)``, see ``bytewax.operators.collect`` in 0.21.1),
not from the events' ``time`` field; bytewax's event-time support lives in
``bytewax.operators.windowing`` and has no size trigger.  A replay of days of
events finishes in seconds of wall-clock time, so the 300 s timeout never
fires here: each prefix emits one group per 20 files and its remainder is
held until end of input, where ``collect`` flushes every open group.  The
group count therefore equals the generator's ``batches_without_timeouts``, not
its event-time ``batches_event_time`` total, and all open remainders (tens of
thousands of prefixes for 1M events) stay in memory until the end.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import cast

import bytewax.operators as op
import orjson
from bytewax.connectors.files import FileSource
from bytewax.dataflow import Dataflow
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from bytewax.testing import run_main
from peer_common import group_key, print_summary
from typing_extensions import override

# bytewax 0.21.1 ships run_main in a stub without annotations; this is its
# actual signature for the way it is called here.
run_flow = cast(Callable[[Dataflow], None], run_main)

COLLECT_TIMEOUT = timedelta(seconds=300)
COLLECT_MAX_SIZE = 20

# What the dataflow carries per file: (bucket/prefix, object key, size).
FileRef = tuple[str, str, int]
Group = tuple[str, list[FileRef]]


@dataclass
class Tally:
    """What the sink has seen."""

    groups: int = 0
    files: int = 0
    prefixes: set[str] = field(default_factory=set)


class _CountingPartition(StatelessSinkPartition[Group]):
    """Sink partition that adds each batch of groups to a shared tally."""

    def __init__(self, tally: Tally) -> None:
        self._tally = tally

    @override
    def write_batch(self, items: list[Group]) -> None:
        tally = self._tally
        tally.groups += len(items)
        for key, files in items:
            tally.files += len(files)
            tally.prefixes.add(key)


class CountingSink(DynamicSink[Group]):
    """Sink that counts emitted groups; safe with ``run_main`` (one worker)."""

    def __init__(self, tally: Tally) -> None:
        """Count into ``tally``."""
        self.tally = tally

    @override
    def build(self, step_id: str, worker_index: int, worker_count: int) -> _CountingPartition:
        return _CountingPartition(self.tally)


def parse_line(line: str) -> FileRef:
    """Parse one event line into the small tuple the dataflow carries."""
    event = orjson.loads(line)
    obj = event["detail"]["object"]
    return (group_key(event), obj["key"], obj["size"])


def file_group_key(ref: FileRef) -> str:
    """Return the ``bucket/prefix`` a file is grouped by."""
    return ref[0]


def build_flow(path: Path, sink: CountingSink) -> Dataflow:
    """Build the read -> parse -> key -> collect -> count dataflow."""
    flow = Dataflow("edp_bench_collect")
    lines = op.input("read", flow, FileSource(path))
    files = op.map("parse", lines, parse_line)
    keyed = op.key_on("by_prefix", files, file_group_key)
    groups = op.collect("group", keyed, timeout=COLLECT_TIMEOUT, max_size=COLLECT_MAX_SIZE)
    op.output("count", groups, sink)
    return flow


def main() -> None:
    """Run the dataflow over the file named on the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path, help="JSON Lines stream of S3 events")
    args = parser.parse_args()
    if not args.file.is_file():
        parser.error(f"no such file: {args.file}")
    tally = Tally()
    started = time.perf_counter()
    run_flow(build_flow(args.file, CountingSink(tally)))
    print_summary(
        "bytewax",
        tally.files,
        time.perf_counter() - started,
        groups=tally.groups,
        prefixes=len(tally.prefixes),
    )


if __name__ == "__main__":
    main()
