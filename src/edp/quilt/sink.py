"""The packager as a sink: batch events become packages in process (local mode).

Add a :class:`PackagerSink` to a runtime's sinks and the relay hands it every
``package-objects-ready`` event from the outbox, at least once: an event whose
packaging failed for a reason that may pass is retried by the relay with backoff;
one that cannot succeed is parked (``edp batches reemit`` sends it again). Other
event kinds (``package-ready``) are accepted and ignored.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Literal

from edp.quilt.errors import InvalidRequest
from edp.quilt.packager import Packager, PackageResult
from edp.quilt.request import DETAIL_TYPE, parse_request
from edp.sinks.base import Failure
from edp.store.base import OutboxEntry

log = logging.getLogger(__name__)


class PackagerSink:
    """A :class:`~edp.sinks.base.Sink` that packages each batch it is sent.

    ``others``: what becomes of a batch of a bucket the packager does not serve (see
    ``Packager(buckets=...)``): ``refuse``, a failure for good (the delivery is parked
    with the reason); ``ignore``, accepted and left alone, for a sink of one worker's
    own batches (``quilt-packager@<worker id>``), which only an operator's command
    hands another bucket's batch (to every such sink on the store).
    """

    def __init__(
        self,
        packager: Packager,
        *,
        name: str = "quilt-packager",
        on_result: Callable[[PackageResult], None] | None = None,
        others: Literal["refuse", "ignore"] = "refuse",
    ) -> None:
        self.packager = packager
        self.name = name
        self.on_result = on_result
        self.others = others

    def send(self, entries: Sequence[OutboxEntry]) -> Sequence[Failure]:
        """Package every batch event; return the ones that failed."""
        failures: list[Failure] = []
        for entry in entries:
            if entry.kind != DETAIL_TYPE or self._not_ours(entry):
                continue
            result = self.packager.package(entry.payload)
            if self.on_result is not None:
                self.on_result(result)
            if not result.ok:
                failures.append(Failure(entry.event_id, result.error or "packaging failed",
                                        permanent=not result.retryable))
        return failures

    def _not_ours(self, entry: OutboxEntry) -> bool:
        """Whether ``entry`` is a batch of another bucket, to be ignored here."""
        served = self.packager.buckets
        if self.others != "ignore" or served is None:
            return False
        try:
            bucket = parse_request(entry.payload).bucket
        except InvalidRequest:
            return False  # (the packager reports why)
        if bucket in served:
            return False
        log.info("%s: event %s is a batch of bucket %r, not packaged here (this sink "
                 "serves %s)", self.name, entry.event_id, bucket, ", ".join(sorted(served)))
        return True


__all__ = ["PackagerSink"]
