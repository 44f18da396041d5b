"""Sinks that need no network: standard output, a JSON Lines file, the log."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from edp.errors import SinkError
from edp.sinks.base import Failure
from edp.store.base import OutboxEntry

log = logging.getLogger(__name__)


class StdoutSink:
    """Writes each event as one JSON line to standard output (or another binary stream)."""

    name = "stdout"

    def __init__(self, stream: BinaryIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdout.buffer

    def send(self, entries: Sequence[OutboxEntry]) -> Sequence[Failure]:
        """Write and flush."""
        try:
            self.stream.write(b"".join(e.payload.encode() + b"\n" for e in entries))
            self.stream.flush()
        except OSError as exc:
            raise SinkError(f"cannot write to standard output: {exc}") from exc
        return ()


class JsonlSink:
    """Appends each event as one JSON line to a file, flushed to disk per call."""

    name = "jsonl"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def send(self, entries: Sequence[OutboxEntry]) -> Sequence[Failure]:
        """Append, flush and fsync."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("ab") as handle:
                handle.write(b"".join(e.payload.encode() + b"\n" for e in entries))
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            raise SinkError(f"cannot append to {self.path}: {exc}") from exc
        return ()


class LogSink:
    """Logs each event at INFO level (the original's "log" target, handy for debugging)."""

    name = "log"

    def send(self, entries: Sequence[OutboxEntry]) -> Sequence[Failure]:
        """Log every event."""
        for entry in entries:
            log.info("event %s %s: %s", entry.kind, entry.event_id, entry.payload)
        return ()
