"""Helpers shared by the benchmark peers: the grouping key and the summary line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PREFIX_DEPTH = 2


def prefix_of(key: str, depth: int = PREFIX_DEPTH) -> str:
    """Return the first ``depth`` folder levels of an object key, with a trailing slash.

    ``instrument-3/exp-000123/raw/file-0007.tif`` gives
    ``instrument-3/exp-000123/``; a key with fewer folders gives all of them,
    and a key with none gives ``""``.
    """
    end = -1
    for _ in range(depth):
        slash = key.find("/", end + 1)
        if slash < 0:
            break
        end = slash
    return key[: end + 1]


def group_key(event: dict[str, Any]) -> str:
    """Return ``bucket/prefix`` for a parsed EventBridge S3 event.

    Bucket names cannot contain ``/``, so the result is unambiguous.
    """
    detail = event["detail"]
    return f"{detail['bucket']['name']}/{prefix_of(detail['object']['key'])}"


def print_summary(peer: str, events: int, seconds: float, **counts: int) -> None:
    """Print the one-line JSON summary every peer ends with."""
    summary: dict[str, object] = {"peer": peer, "events": events, **counts}
    summary["seconds"] = round(seconds, 3)
    summary["events_per_s"] = round(events / seconds) if seconds > 0 else 0
    sys.stdout.write(json.dumps(summary) + "\n")


def run_peer(
    peer: str, doc: str | None, work: Callable[[Path], tuple[int, dict[str, int]]]
) -> None:
    """A peer's command line: ``work`` on the file named there, timed (start-up excluded),
    then the summary line with the counts it returned."""
    parser = argparse.ArgumentParser(description=(doc or peer).splitlines()[0])
    parser.add_argument("file", type=Path, help="JSON Lines stream of S3 events")
    args = parser.parse_args()
    started = time.perf_counter()
    events, counts = work(args.file)
    print_summary(peer, events, time.perf_counter() - started, **counts)
