"""Sending outbox entries in API calls of bounded count and size (EventBridge, SNS).

Both services take at most 10 entries and 256 KB per call and report failures per
entry. :func:`send_in_calls` prepares each entry, refuses those too large for good,
cuts the rest into calls, and turns a call that fails as a whole into retryable
failures for what was not sent (or re-raises when nothing was sent at all, so the
relay backs off the whole page).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from edp.errors import SinkError
from edp.sinks.base import Failure
from edp.store.base import OutboxEntry

Prepared = tuple[OutboxEntry, dict[str, Any], int]
"""(outbox entry, API request entry, its size in bytes)"""


def send_in_calls(
    entries: Sequence[OutboxEntry],
    *,
    prepare: Callable[[OutboxEntry], dict[str, Any]],
    size_of: Callable[[dict[str, Any]], int],
    call: Callable[[list[Prepared]], list[Failure]],
    service: str,
    max_entries: int = 10,
    max_size: int = 256 * 1024,
) -> list[Failure]:
    """Prepare, size-check and send ``entries``; return the failures."""
    failures: list[Failure] = []
    ready: list[Prepared] = []
    for outbox in entries:
        try:
            request = prepare(outbox)
        except (ValueError, KeyError, TypeError) as exc:
            failures.append(Failure(outbox.event_id, f"not an event envelope: {exc}",
                                    permanent=True))
            continue
        size = size_of(request)
        if size >= max_size:
            failures.append(Failure(
                outbox.event_id, f"entry of {size} bytes exceeds {service}'s 256 KB",
                permanent=True,
            ))
            continue
        ready.append((outbox, request, size))
    sent = 0
    for batch in _cut(ready, max_entries, max_size):
        try:
            failures += call(batch)
        except SinkError as exc:
            if not sent and not failures:
                raise
            failures += [Failure(o.event_id, str(exc)) for o, _, _ in ready[sent:]]
            break
        sent += len(batch)
    return failures


def _cut(ready: list[Prepared], max_entries: int, max_size: int) -> Iterator[list[Prepared]]:
    """Cut prepared entries into calls of at most ``max_entries`` and ``max_size`` bytes."""
    batch: list[Prepared] = []
    total = 0
    for item in ready:
        if batch and (len(batch) >= max_entries or total + item[2] >= max_size):
            yield batch
            batch, total = [], 0
        batch.append(item)
        total += item[2]
    if batch:
        yield batch
