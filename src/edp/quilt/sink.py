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

from edp.quilt.packager import Packager, PackageResult
from edp.quilt.request import DETAIL_TYPE
from edp.redact import redact_text
from edp.sinks.base import Failure
from edp.store.base import OutboxEntry

log = logging.getLogger(__name__)


class PackagerSink:
    """A :class:`~edp.sinks.base.Sink` that packages each batch it is sent."""

    def __init__(
        self,
        packager: Packager,
        *,
        name: str = "quilt-packager",
        on_result: Callable[[PackageResult], None] | None = None,
    ) -> None:
        self.packager = packager
        self.name = name
        self.on_result = on_result

    def send(self, entries: Sequence[OutboxEntry]) -> Sequence[Failure]:
        """Package every batch event; return the ones that failed."""
        failures: list[Failure] = []
        for entry in entries:
            if entry.kind != DETAIL_TYPE:
                continue
            # (a failure goes back to the relay, which logs it with its attempt)
            result = self.packager.package(entry.payload, report_failure=False)
            if self.on_result is not None:
                self.on_result(result)
            if not result.ok:
                retried_before = any(not f.permanent for f in failures)
                failures.append(Failure(entry.event_id, result.error or "packaging failed",
                                        permanent=not result.retryable))
                # The relay says a page's first retryable failure (and each permanent
                # one): a later batch of the page failing for its own reason is said
                # here, or nothing would name its package nor its reason.
                if result.retryable and retried_before:
                    log.warning("package %s for bucket=%s prefix=%s batch_id=%s failed "
                                "too (retried with the page's first): %s", result.package,
                                result.bucket, result.prefix, result.batch_id,
                                redact_text(result.error or "packaging failed"))
        return failures


__all__ = ["PackagerSink"]
