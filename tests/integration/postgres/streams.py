"""Streams for the several-workers tests: one stream, dealt at random into parts.

The stream has strictly increasing event times (one second apart), so one
replay of it has one right answer that several workers must reproduce (ties in
time between parts are the documented limit of multi-worker replay). It
exercises every trigger (count, duration, max-age, marker), overwrites,
deletes, events without a sequencer, and re-deliveries: about ``dup_rate`` of
the lines are copies of an earlier line (same time, same sequencer) placed a
little later in the stream, so a copy often lands in another part than its
original.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import orjson

from edp_testing import eventbridge

T0 = 1_700_000_000
ARGS = [  # grouping settings of the stream: every trigger fires
    "--threshold-event-count", "25", "--threshold-duration", "120",
    "--max-batch-age", "900", "--complete-markers", "*.done",
]


def make_stream(
    events: int, *, seed: int = 7, dup_rate: float = 0.05, t0: int = T0
) -> list[bytes]:
    """JSON lines of ``events`` distinct events (from ``t0`` on) plus re-deliveries."""
    rng = random.Random(seed)
    prefixes = [f"inst-{i % 7}/exp-{i:04d}/" for i in range(60)]
    weights = [rng.choice([1, 1, 1, 3, 8]) for _ in prefixes]
    used: dict[str, list[str]] = {p: [] for p in prefixes}
    lines: list[bytes] = []
    later: list[tuple[int, bytes]] = []
    for n in range(events):
        t = t0 + n
        prefix = rng.choices(prefixes, weights)[0]
        roll = rng.random()
        kind = "Object Created"
        if roll < 0.05 and used[prefix]:
            key = rng.choice(used[prefix])  # an overwrite
        elif roll < 0.07 and used[prefix]:
            key, kind = rng.choice(used[prefix]), "Object Deleted"
        elif roll < 0.075:
            key = f"{prefix}raw/set-{n}.done"  # a marker
        else:
            key = f"{prefix}raw/file-{n:07d}.tif"
            used[prefix].append(key)
        sequencer = None if rng.random() < 0.01 else f"{0x60 << 40 | n:016X}"
        event: dict[str, Any] = eventbridge(key, t, bucket="lab", kind=kind, sequencer=sequencer)
        lines.append(orjson.dumps(event))
        if rng.random() < dup_rate / (1 - dup_rate):
            later.append((n + rng.randint(1, 40), lines[-1]))  # a re-delivery
        lines.extend(line for due, line in later if due == n)
        later = [(due, line) for due, line in later if due > n]
        # Some prefixes go quiet for a while: the duration trigger fires.
        if rng.random() < 0.02:
            weights[prefixes.index(prefix)] = rng.choice([0, 1, 8])
            weights[0] = max(weights[0], 1)
    return lines + [line for _, line in later]


def deal(lines: list[bytes], parts: int, *, seed: int = 11) -> list[list[bytes]]:
    """Each line to a part at random; every part keeps the stream's order."""
    rng = random.Random(seed)
    dealt: list[list[bytes]] = [[] for _ in range(parts)]
    for line in lines:
        dealt[rng.randrange(parts)].append(line)
    return dealt


def write_lines(path: Path, lines: list[bytes]) -> Path:
    """Write JSON lines to ``path``."""
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


def batches(output: bytes) -> list[tuple[Any, ...]]:
    """The emitted batches of replay stdout, as comparable tuples, sorted."""
    found = []
    for line in output.splitlines():
        event = orjson.loads(line)
        d = event["detail"]
        found.append((d["batch-id"], d["bucket"], d["prefix"], d["object-count"], d["trigger"],
                      d["first-event-time"], d["last-event-time"], event["time"], event["id"]))
    return sorted(found)
