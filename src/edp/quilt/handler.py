"""The Lambda handler of the rule on ``package-objects-ready``.

Deploy with the ``quilt`` extra; configure with ``EDP_*`` environment variables
(``EDP_REGISTRY``, ``EDP_WORKFLOW``, ``EDP_QUARANTINE_REGISTRY``, ``EDP_CATALOG_URL``,
``EDP_NOTIFY_SNS_TOPIC``, ...). Lambda's home is read-only: quilt3's data directory
goes to ``/tmp`` unless ``XDG_DATA_HOME`` says otherwise.

- Invoked by an EventBridge rule (the event is the envelope): packages the batch.
  A retryable failure raises, so Lambda's asynchronous retries (and its on-failure
  destination) take over; any other outcome returns the result.
- Invoked by SQS (``{"Records": [...]}``): packages each record and returns
  ``{"batchItemFailures": [...]}`` with the records to retry (enable
  ``ReportBatchItemFailures`` on the event source mapping).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from edp.quilt.errors import PublishError
from edp.quilt.packager import Packager

log = logging.getLogger(__name__)

_packager: list[Packager] = []


def _get_packager() -> Packager:
    if not _packager:
        from edp.config import load_settings

        os.environ.setdefault("XDG_DATA_HOME", "/tmp")  # noqa: S108 (Lambda's only writable dir)
        _packager.append(Packager(load_settings()))
    return _packager[0]


def package_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Package the batch of an EventBridge event, or of each record of an SQS batch."""
    packager = _get_packager()
    records = event.get("Records")
    if isinstance(records, list) and records and records[0].get("eventSource") == "aws:sqs":
        failures = []
        for record in records:
            result = packager.package(record)
            if not result.ok and result.retryable:
                failures.append({"itemIdentifier": record.get("messageId", "")})
        return {"batchItemFailures": failures}
    result = packager.package(event)
    if not result.ok and result.retryable:
        raise PublishError(f"packaging {result.bucket}/{result.prefix} failed, "
                           f"will be retried: {result.error}")
    return result.as_dict()


__all__ = ["package_handler"]
