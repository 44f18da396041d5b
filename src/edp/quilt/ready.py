"""``package-ready`` (SPEC section 5): a new package revision settled in a watched registry.

:class:`PackageReadyObserver` rides on the engine's steps (``edp.engine.StepObserver``),
so it sees the same S3 events the batcher does, from the same sources:

- ``observe``: a *created* event for ``.quilt/named_packages/<user>/<pkg>/<unix-seconds>``
  in a bucket of ``package_ready_registries`` starts a durable timer (kind
  ``package-ready``, key ``<bucket>/<user>/<pkg>/<seconds>``) due ``package_ready_delay``
  seconds after the observation, by the **wall clock**: the delay lets a File Gateway
  (and other caches) settle, which happens in real time, also while edp works
  through a backlog. With file shares configured, a RefreshCache of the package's
  folder is queued first (:mod:`edp.quilt.gateway`; planned in ``tick``, called in
  ``after_commit``).
- ``tick``: takes the due timers and leases them (re-armed ``lease`` seconds ahead),
  in the step's transaction;
- ``after_commit``: once that transaction committed (its locks released), reads each
  leased revision's pointer object (its content *is* the top hash), with no
  transaction open, then, in a transaction of its own, records one ``package-ready``
  event in the outbox and clears the lease. The read happens after the delay, when
  the object surely exists; a failed read re-arms the timer with backoff. A worker
  that dies between the two leaves the lease, which falls due again: the revision is
  read again later (its event id is stable, so it is never emitted twice).

Timers live in the store, so a pending ``package-ready`` survives a restart. The
event id is a UUIDv5 of (bucket, package, pointer, top hash): a re-delivered S3
event never emits twice (the outbox ignores a known id).
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from edp.core.envelopes import Origin, package_event
from edp.core.events import EventKind, ObjectEvent, PackageReady
from edp.store.base import Store, Timer, Transaction

if TYPE_CHECKING:
    from edp.config import Settings
    from edp.quilt.gateway import GatewayWarmer

log = logging.getLogger(__name__)

TIMER_KIND = "package-ready"
POINTER = re.compile(r"\.quilt/named_packages/([\w-]+)/([\w-]+)/(\d+)")
TOP_HASH = re.compile(r"[0-9a-f]{64}")
NAMESPACE = uuid.UUID("5b0c7f5e-2f1e-4f43-9a39-7f0e8e1d6a51")
"""UUIDv5 namespace of package-ready event ids (fixed forever)."""

PointerReader = Callable[[str, str], str | None]
"""(bucket, key) -> the object's text, or None when it does not exist."""


def event_id(bucket: str, package: str, pointer: str, top_hash: str) -> str:
    """The stable id of a package-ready event."""
    return str(uuid.uuid5(NAMESPACE, "\x1f".join((bucket, package, pointer, top_hash))))


class PackageReadyObserver:
    """Detects new package revisions and emits ``package-ready`` after a settle delay."""

    def __init__(
        self,
        *,
        registries: Iterable[str],
        delay: float,
        origin: Origin,
        reader: PointerReader,
        warmer: GatewayWarmer | None = None,
        page: int = 200,
        retry_delay: float = 15.0,
        max_attempts: int = 8,
        lease: float = 120.0,
    ) -> None:
        self.registries = frozenset(registries)
        self.delay = delay
        self.origin = origin
        self.reader = reader
        self.warmer = warmer
        self.page = page
        self.retry_delay = retry_delay
        self.max_attempts = max_attempts
        self.lease = lease
        self._leased: list[Timer] = []

    def observe(
        self, tx: Transaction, events: Sequence[ObjectEvent], *, clock: float, now: float,
        sinks: Sequence[str],
    ) -> None:
        """Start a timer for each new revision pointer in a watched registry."""
        for event in events:
            if event.kind is not EventKind.CREATED or event.bucket not in self.registries:
                continue
            match = POINTER.fullmatch(event.key)
            if match is None:
                continue
            user, pkg, seconds = match.groups()
            name = f"{user}/{pkg}"
            payload = {"bucket": event.bucket, "package": name, "pointer": event.key,
                       "attempts": 0}
            started = tx.set_timer(
                TIMER_KIND, f"{event.bucket}/{name}/{seconds}", due_at=now + self.delay,
                payload=json.dumps(payload),
            )
            if started:
                log.info("new revision: registry=%s package=%s pointer=%s; package-ready in %gs",
                         event.bucket, name, seconds, self.delay)
                if self.warmer is not None:
                    self.warmer.request(tx, event.bucket, f"{name}/", now=now)

    def tick(self, tx: Transaction, *, clock: float, now: float, sinks: Sequence[str]) -> int:
        """Lease every timer due by the wall clock (or ``clock``); :meth:`after_commit` reads."""
        if self.warmer is not None:
            self.warmer.tick(tx, now=now)
        # Leases still here were taken in a step that rolled back: they do not exist.
        self._leased = []
        until = max(clock, now)
        while True:
            timers = tx.take_due_timers(TIMER_KIND, until=until, limit=self.page)
            for timer in timers:
                tx.set_timer(TIMER_KIND, timer.key, due_at=now + self.lease,
                             payload=timer.payload)
            self._leased += timers
            if len(timers) < self.page:
                return 0

    def after_commit(self, store: Store, *, now: float, sinks: Sequence[str]) -> int:
        """Read the leased revisions' pointers (no transaction open), then emit and clear."""
        if self.warmer is not None:
            self.warmer.after_commit(store, now=now)
        leased, self._leased = self._leased, []
        if not leased:
            return 0
        reads = []
        for timer in leased:
            data = json.loads(timer.payload)
            reads.append((timer, data, self._read(data["bucket"], data["pointer"])))
        emitted = 0
        with store.transaction() as tx:
            for timer, data, text in reads:
                tx.clear_timer(TIMER_KIND, timer.key)
                emitted += self._fire(tx, timer, data, text, now=now, sinks=sinks)
            tx.add_counters({"observer.emitted": emitted})
        return emitted

    def _read(self, bucket: str, pointer: str) -> str | Exception | None:
        try:
            return self.reader(bucket, pointer)
        except Exception as exc:  # a boundary: S3 errors re-arm the timer  # noqa: BLE001
            return exc

    def _fire(
        self, tx: Transaction, timer: Timer, data: dict[str, Any], text: str | Exception | None,
        *, now: float, sinks: Sequence[str],
    ) -> int:
        bucket, name, pointer = data["bucket"], data["package"], data["pointer"]
        if isinstance(text, Exception):
            self._retry(tx, timer, data, now, f"{type(text).__name__}: {text}")
            return 0
        top_hash = (text or "").strip()
        if text is None or not TOP_HASH.fullmatch(top_hash):
            log.warning("package-ready dropped: registry=%s package=%s pointer=%s %s", bucket,
                        name, pointer, "is gone" if text is None else "holds no top hash")
            tx.add_counters({"package_ready.dropped": 1})
            return 0
        ready = PackageReady(
            event_id=event_id(bucket, name, pointer, top_hash), bucket=bucket,
            package_name=name, top_hash=top_hash, fired_at=timer.due_at,
        )
        added = tx.add_outbox(
            event_id=ready.event_id, kind=TIMER_KIND,
            payload=orjson.dumps(package_event(ready, self.origin)).decode(), sinks=sinks, now=now,
        )
        if added:
            log.info("package-ready: registry=%s package=%s top_hash=%s", bucket, name, top_hash)
        return int(added)

    def _retry(self, tx: Transaction, timer: Timer, data: dict[str, Any], now: float,
               error: str) -> None:
        attempts = int(data.get("attempts", 0)) + 1
        if attempts >= self.max_attempts:
            log.error("package-ready given up after %d attempts: registry=%s package=%s: %s",
                      attempts, data["bucket"], data["package"], error)
            tx.add_counters({"package_ready.failed": 1})
            return
        delay = min(self.retry_delay * 2 ** (attempts - 1), 3600.0)
        log.warning("cannot read %s/%s (%s); retrying in %gs", data["bucket"], data["pointer"],
                    error, delay)
        tx.set_timer(TIMER_KIND, timer.key, due_at=now + delay,
                     payload=json.dumps({**data, "attempts": attempts}))
        tx.add_counters({"package_ready.retried": 1})


# -- pointer readers ------------------------------------------------------------------
def s3_pointer_reader(client_factory: Callable[[], Any]) -> PointerReader:
    """Read pointers with a boto3 S3 client (built on first use)."""
    clients: list[Any] = []

    def read(bucket: str, key: str) -> str | None:
        if not clients:
            clients.append(client_factory())
        try:
            body = clients[0].get_object(Bucket=bucket, Key=key)["Body"].read()
        except clients[0].exceptions.NoSuchKey:
            return None
        return str(body.decode("utf-8", "replace"))

    return read


def local_pointer_reader(root: str | Path) -> PointerReader:
    """Read pointers of local registries laid out as ``<root>/<bucket>/<key>``."""
    base = Path(root).expanduser().resolve()

    def read(bucket: str, key: str) -> str | None:
        path = (base / bucket / key).resolve()
        if base not in path.parents:
            return None
        try:
            return path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None

    return read


def build_package_ready_observer(
    settings: Settings,
    *,
    reader: PointerReader | None = None,
    warmer: GatewayWarmer | None = None,
) -> PackageReadyObserver:
    """The observer for ``package_ready_registries``, reading pointers from S3 (or, with
    ``package_local_root``, from local folders), warming ``file_gateway_shares`` if any."""
    if reader is None:
        if settings.package_local_root:
            reader = local_pointer_reader(settings.package_local_root)
        else:
            region = settings.region

            def client() -> Any:
                from edp.aws.clients import client as aws_client

                return aws_client("s3", region=region, read_timeout=10, max_attempts=2)

            reader = s3_pointer_reader(client)
    if warmer is None and settings.file_gateway_shares:
        from edp.quilt.gateway import GatewayWarmer, boto3_gateway

        warmer = GatewayWarmer(boto3_gateway(settings.region), settings.file_gateway_shares)
    return PackageReadyObserver(
        registries=settings.package_ready_registries,
        delay=settings.package_ready_delay,
        origin=Origin(settings.event_source, settings.account, settings.region),
        reader=reader,
        warmer=warmer,
    )


__all__ = ["NAMESPACE", "POINTER", "TIMER_KIND", "PackageReadyObserver", "PointerReader",
           "build_package_ready_observer", "event_id", "local_pointer_reader",
           "s3_pointer_reader"]
