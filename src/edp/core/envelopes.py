"""The EventBridge envelopes of edp's output events (SPEC section 5)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from edp.core.events import BatchReady, PackageReady

DETAIL_VERSION = "0.1"


@dataclass(frozen=True, slots=True)
class Origin:
    """Envelope fields that come from the deployment, not from the batch."""

    source: str = "com.quiltdata.edp"
    account: str = "000000000000"
    region: str = "us-east-1"


def format_time(epoch: float) -> str:
    """Epoch seconds -> ``YYYY-MM-DDTHH:MM:SSZ`` (UTC, whole seconds, truncated)."""
    return datetime.fromtimestamp(int(epoch // 1), tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def batch_event(ready: BatchReady, origin: Origin) -> dict[str, Any]:
    """The ``package-objects-ready`` event of a fired batch."""
    return {
        "version": "0",
        "id": ready.event_id,
        "detail-type": "package-objects-ready",
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
