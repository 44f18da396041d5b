"""Typed values that flow through the core: object events in, batch events out."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple


class EventKind(StrEnum):
    """What happened to an object."""

    CREATED = "created"
    DELETED = "deleted"


class Trigger(StrEnum):
    """Why a batch fired (closed)."""

    MARKER = "marker"
    COUNT = "count"
    DURATION = "duration"
    MAX_AGE = "max-age"
    MANUAL = "manual"


class ObjectEvent(NamedTuple):
    """One S3 object event, decoded (immutable; a NamedTuple because it is built per event).

    ``time`` is the S3 event time in seconds since the epoch (UTC); ``key`` is
    already URL-decoded; ``sequencer`` is the hex string S3 gives (or ``None``).
    """

    bucket: str
    key: str
    kind: EventKind
    time: float
    etag: str | None = None
    size: int | None = None
    sequencer: str | None = None

    def fingerprint(self) -> str:
        """Identity of the event for producers that send no sequencer (SPEC 3.1)."""
        raw = "\x1f".join(
            (self.bucket, self.key, self.kind.value, repr(self.time),
             self.etag or "", "" if self.size is None else str(self.size))
        )
        return hashlib.blake2b(raw.encode(), digest_size=16).hexdigest()


@dataclass(frozen=True, slots=True)
class BatchReady:
    """A batch fired: the facts of one ``package-objects-ready`` event."""

    batch_id: str
    event_id: str
    bucket: str
    prefix: str
    generation: int
    object_count: int
    trigger: Trigger
    fired_at: float
    first_event_time: float
    last_event_time: float


@dataclass(frozen=True, slots=True)
class PackageReady:
    """A Quilt package revision settled in a registry: one ``package-ready`` event."""

    event_id: str
    bucket: str
    package_name: str
    top_hash: str
    fired_at: float
