"""The sink port."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import orjson

from edp.core.envelopes import BATCH_EVENT
from edp.store.base import OutboxEntry


@dataclass(frozen=True, slots=True)
class Failure:
    """One event a sink did not deliver, and whether retrying can help."""

    event_id: str
    error: str
    permanent: bool = False


class Sink(Protocol):
    """Delivers events. ``name`` is stable: the outbox tracks delivery per sink name.

    A sink may also set ``max_page`` (an int): the most events the relay hands it at
    once, for sinks whose sends take long per event (the webhook sink: one POST each),
    so that a page is sent within the store's delivery lease.
    """

    name: str

    def send(self, entries: Sequence[OutboxEntry]) -> Sequence[Failure]:
        """Deliver ``entries`` in order; return the ones that failed (empty: all delivered).

        Raising :class:`~edp.errors.SinkError` means none was delivered.
        """
        ...


class BucketScoped:
    """A sink of one worker's that serves one bucket (see edp.engine.WORKER_SINK): it
    passes on the batch events of ``bucket`` (and events of other kinds) and accepts
    other buckets' batch events without sending them (an operator's command hands
    them to every such sink of the store; a watcher's packager must not read the
    folder of that name beside its own)."""

    def __init__(self, sink: Sink, bucket: str) -> None:
        self.sink = sink
        self.bucket = bucket
        self.name = sink.name

    def send(self, entries: Sequence[OutboxEntry]) -> Sequence[Failure]:
        """Send ``bucket``'s events; the others count as delivered."""
        mine = [entry for entry in entries if self._serves(entry)]
        return self.sink.send(mine) if mine else []

    def _serves(self, entry: OutboxEntry) -> bool:
        if entry.kind != BATCH_EVENT:
            return True
        try:
            detail = orjson.loads(entry.payload).get("detail")
        except (orjson.JSONDecodeError, AttributeError):
            return True  # (the sink says what is wrong with it)
        return not isinstance(detail, dict) or detail.get("bucket") == self.bucket
