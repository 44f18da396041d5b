"""``edp replay``: the deterministic simulation of SPEC section 6.

Lines of a JSON Lines file are fed to the engine in file order, in chunks; the
clock is the newest event time (the wall clock is only used for bookkeeping:
heartbeats, dead-letter and outbox timestamps); at the end every open
batch fires at its deadline. Events go to stdout through the outbox, rejected
lines and a summary to stderr.
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TextIO

from edp.bootstrap import build_runtime
from edp.config import Settings
from edp.engine import Message, default_worker_id
from edp.sinks import StdoutSink


@dataclass(slots=True)
class ReplaySummary:
    """Totals of one replay."""

    lines: int = 0
    events: int = 0
    rejected: int = 0
    fired: Counter[str] = field(default_factory=Counter)
    counts: Counter[str] = field(default_factory=Counter)

    def describe(self) -> str:
        """One line for stderr."""
        batches = sum(self.fired.values())
        by_trigger = ", ".join(f"{k} {v}" for k, v in sorted(self.fired.items()))
        skipped = sum(v for k, v in self.counts.items() if k.startswith("skipped."))
        ignored = sum(v for k, v in self.counts.items() if k.startswith("ignored."))
        return (
            f"edp replay: {self.lines} lines, {self.events} object events, "
            f"{batches} batches ({by_trigger or 'none'}), {self.rejected} rejected, "
            f"{self.counts['events.duplicate']} duplicates, {skipped} not batched, "
            f"{ignored} ignored by type"
        )


def read_chunks(stream: BinaryIO, size: int) -> Iterator[list[Message]]:
    """Non-blank lines of ``stream`` as messages located by line number, ``size`` at a time."""
    chunk: list[Message] = []
    for number, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        chunk.append(Message(line, f"line {number}", source="replay"))
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def run_replay(
    stream: BinaryIO,
    settings: Settings,
    *,
    stdout: BinaryIO,
    stderr: TextIO,
    database_url: str | None = None,
) -> ReplaySummary:
    """Replay ``stream`` and return its summary (the CLI chooses the exit status)."""
    with tempfile.TemporaryDirectory(prefix="edp-replay-") as tmp:
        url = database_url or f"sqlite:///{Path(tmp) / 'replay.db'}"
        runtime = build_runtime(
            settings,
            database_url=url,
            sinks=[StdoutSink(stdout)],
            worker_id=default_worker_id("replay-"),
            fast_unsafe=database_url is None,
        )
        summary = ReplaySummary()
        try:
            for chunk in read_chunks(stream, settings.chunk_size):
                summary.lines += len(chunk)
                report = runtime.engine.process(chunk, now=time.time())
                summary.events += report.events
                summary.counts.update(report.counts)
                for letter in report.rejected:
                    summary.rejected += 1
                    stderr.write(f"{letter.location}: {letter.reason}\n")
                summary.fired.update(r.trigger.value for r in report.fired)
                runtime.relay.deliver()
            for ready in runtime.engine.finish(now=time.time()):
                summary.fired[ready.trigger.value] += 1
            runtime.relay.deliver()
        finally:
            runtime.close()
        return summary
