"""The sink port."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

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
