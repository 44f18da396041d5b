"""The "floor" peer: the least work any consumer of the stream must do.

Usage: ``python bench/peer_floor.py FILE``

Reads FILE line by line, parses each line with orjson, takes the bucket name
and object key, computes the depth-2 prefix and counts files per prefix in a
dict.  No batching, no timers, no output besides the summary line::

    {"peer": "floor", "events": N, "prefixes": P, "seconds": S, "events_per_s": R}

``seconds`` covers reading and counting only, not interpreter start-up.
"""

from __future__ import annotations

from pathlib import Path

import orjson
from peer_common import group_key, run_peer


def count_prefixes(path: Path) -> tuple[int, dict[str, int]]:
    """Return the number of events in ``path`` and the file count per prefix."""
    counts: dict[str, int] = {}
    events = 0
    with path.open("rb") as f:
        for line in f:
            key = group_key(orjson.loads(line))
            counts[key] = counts.get(key, 0) + 1
            events += 1
    return events, counts


def main() -> None:
    """Count the prefixes of the file named on the command line."""

    def work(path: Path) -> tuple[int, dict[str, int]]:
        events, counts = count_prefixes(path)
        return events, {"prefixes": len(counts)}

    run_peer("floor", __doc__, work)


if __name__ == "__main__":
    main()
