"""The "in-memory batcher" peer: how fast pure Python can batch this stream at best.

Usage: ``python bench/peer_ceiling.py FILE``

Not a product, a yardstick. One loop, no functions called per event beyond
orjson and dict/heap operations, everything in memory: it parses each line,
keeps the highest sequencer per key (duplicates and stale re-deliveries are
dropped), groups keys by their depth-2 prefix, and closes a group at 20 files
(count) or after 300 s without a new file (quiet period), on the clock of SPEC
section 4 (the newest event time so far; due groups close before the next event
is applied). At the end every open group closes. No persistence, no batch ids,
no output events, no validation beyond what it needs, no dead letters, no
metrics: everything edp does beyond the batching itself is left out.

Its group count must equal edp's batch count on the generated stream (same
rules, default settings); its speed is an upper bound for any design whose
per-event work runs in CPython, such as edp's engine today.

    {"peer": "in-memory batcher", "events": N, "groups": G, "seconds": S, ...}
"""

from __future__ import annotations

import heapq
from datetime import datetime
from pathlib import Path

import orjson
from peer_common import PREFIX_DEPTH, run_peer

COUNT = 20
QUIET = 300.0


def batch(path: Path) -> tuple[int, int]:
    """Return the number of events in ``path`` and of groups closed."""
    times: dict[str, float] = {}
    newest: dict[tuple[str, str], str] = {}  # (bucket, key) -> highest sequencer
    # (bucket, prefix) -> [files, last activity]
    open_groups: dict[tuple[str, str], list[float]] = {}
    heap: list[tuple[float, tuple[str, str]]] = []  # (deadline, group), lazily stale
    clock = float("-inf")
    events = groups = 0
    with path.open("rb") as f:
        for line in f:
            message = orjson.loads(line)
            events += 1
            if message.get("detail-type") != "Object Created":
                continue
            detail = message["detail"]
            obj = detail["object"]
            bucket, key = detail["bucket"]["name"], obj["key"]
            stamp = message["time"]
            t = times.get(stamp)
            if t is None:
                t = times[stamp] = datetime.fromisoformat(stamp).timestamp()
            if t > clock:
                clock = t
                while heap and heap[0][0] <= clock:
                    deadline, group = heapq.heappop(heap)
                    state = open_groups.get(group)
                    if state is None:
                        continue
                    if state[1] + QUIET > deadline:  # extended since: look again later
                        heapq.heappush(heap, (state[1] + QUIET, group))
                        continue
                    del open_groups[group]
                    groups += 1
            parts = key.split("/", PREFIX_DEPTH)
            if len(parts) <= PREFIX_DEPTH or key.endswith("/"):
                continue
            sequencer = obj.get("sequencer") or ""
            memory = (bucket, key)
            seen = newest.get(memory)
            if seen is not None and seen >= sequencer:
                continue
            newest[memory] = sequencer
            group = (bucket, parts[0] + "/" + parts[1] + "/")
            state = open_groups.get(group)
            if state is None:
                state = open_groups[group] = [0.0, clock]
                heapq.heappush(heap, (clock + QUIET, group))
            state[0] += 1
            state[1] = clock
            if state[0] >= COUNT:
                del open_groups[group]
                groups += 1
    return events, groups + len(open_groups)


def main() -> None:
    """Batch the file named on the command line."""

    def work(path: Path) -> tuple[int, dict[str, int]]:
        events, groups = batch(path)
        return events, {"groups": groups}

    run_peer("in-memory batcher", __doc__, work)


if __name__ == "__main__":
    main()
