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
    """Appends each event as one JSON line to a file, flushed to disk per call.

    An append that fails part-way (a full disk writes what fits, then fails) is cut
    off again, and a line left unfinished by a process killed while appending is
    ended before the next one: the retried events must not be glued to a torn line,
    where a reader of the lines could not find them.
    """

    name = "jsonl"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def send(self, entries: Sequence[OutboxEntry]) -> Sequence[Failure]:
        """Append, flush and fsync."""
        data = b"".join(e.payload.encode() + b"\n" for e in entries)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError as exc:
            raise SinkError(f"cannot append to {self.path}: {exc}") from exc
        try:
            start = os.fstat(fd).st_size
            if start and _last_byte(self.path, start) not in (b"\n", None):
                data = b"\n" + data  # (a torn line: keep it, apart from the events)
            written = 0
            try:
                while written < len(data):
                    written += os.write(fd, data[written:])
                os.fsync(fd)
            except OSError as exc:
                _cut_back(fd, start, start + written)
                raise SinkError(f"cannot append to {self.path}: {exc}") from exc
        except OSError as exc:  # (the size or the last byte could not be read)
            raise SinkError(f"cannot append to {self.path}: {exc}") from exc
        finally:
            os.close(fd)
        return ()


def _last_byte(path: Path, size: int) -> bytes | None:
    """The byte at ``size - 1`` of ``path`` (None if it cannot be read)."""
    try:
        with path.open("rb") as handle:
            handle.seek(size - 1)
            return handle.read(1)
    except OSError:
        return None


def _cut_back(fd: int, start: int, end: int) -> None:
    """Take a failed append's part back off the file (unless another writer appended
    after it meanwhile: then the torn line stays, ended by the next append)."""
    try:
        if os.fstat(fd).st_size == end and end > start:
            os.ftruncate(fd, start)
    except OSError as exc:
        log.warning("could not remove a partly appended line: %s", exc)


class LogSink:
    """Logs each event at INFO level (the original's "log" target, handy for debugging)."""

    name = "log"

    def send(self, entries: Sequence[OutboxEntry]) -> Sequence[Failure]:
        """Log every event."""
        for entry in entries:
            log.info("event %s %s: %s", entry.kind, entry.event_id, entry.payload)
        return ()
