"""The EventBridge envelopes of edp's output events (SPEC section 5)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from edp.core.events import BatchReady, PackageReady

DETAIL_VERSION = "0.1"
BATCH_EVENT = "package-objects-ready"
"""The ``detail-type`` of a batch's event."""


@dataclass(frozen=True, slots=True)
class Origin:
    """Envelope fields that come from the deployment, not from the batch."""

    source: str = "com.quiltdata.edp"
    account: str = "000000000000"
    region: str = "us-east-1"


LAST_TIME = 253_402_300_799.0
"""9999-12-31T23:59:59Z: the last time the output format can hold (four-digit years)."""


def format_time(epoch: float) -> str:
    """Epoch seconds -> ``YYYY-MM-DDTHH:MM:SSZ`` (UTC, whole seconds, truncated).

    A time past :data:`LAST_TIME` (the deadline of a batch whose files are dated at the
    very end of year 9999) is written as ``9999-12-31T23:59:59Z``: a fifth digit of
    year would break every consumer of the format.
    """
    # (time.strftime of gmtime: a pure conversion, no clock read; 2.5x faster than
    # datetime's, and each fired batch formats three times)
    moment = time.gmtime(min(epoch, LAST_TIME) // 1)
    if moment.tm_year < 1000:  # (strftime would not pad the year to four digits)
        year, month, day, hour, minute, second = moment[:6]
        return f"{year:04d}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}Z"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", moment)


def batch_event(ready: BatchReady, origin: Origin) -> dict[str, Any]:
    """The ``package-objects-ready`` event of a fired batch."""
    return {
        "version": "0",
        "id": ready.event_id,
        "detail-type": BATCH_EVENT,
        "source": origin.source,
        "account": origin.account,
        "time": format_time(ready.fired_at),
        "region": origin.region,
        "resources": [f"arn:aws:s3:::{ready.bucket}"],
        "detail": {
            "version": DETAIL_VERSION,
            "bucket": ready.bucket,
            "prefix": ready.prefix,
            "object-count": ready.object_count,
            "trigger": ready.trigger.value,
            "batch-id": ready.batch_id,
            "first-event-time": format_time(ready.first_event_time),
            "last-event-time": format_time(ready.last_event_time),
            "generation": ready.generation,
        },
    }


def package_event(ready: PackageReady, origin: Origin) -> dict[str, Any]:
    """The ``package-ready`` event of a settled package revision."""
    return {
        "version": "0",
        "id": ready.event_id,
        "detail-type": "package-ready",
        "source": origin.source,
        "account": origin.account,
        "time": format_time(ready.fired_at),
        "region": origin.region,
        "resources": [f"arn:aws:s3:::{ready.bucket}"],
        "detail": {
            "version": DETAIL_VERSION,
            "package-name": ready.package_name,
            "bucket": ready.bucket,
            "top-hash": ready.top_hash,
        },
    }
