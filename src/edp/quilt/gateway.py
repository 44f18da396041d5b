"""File Gateway warm-up: ``RefreshCache`` on the shares that expose a new package.

An S3 File Gateway lists its bucket only now and then; clients (Windows
workstations) see a new package's files only after a refresh. When a package
revision appears (:mod:`edp.quilt.ready`), the folder ``/<package name>/`` of every
configured share (``file_gateway_shares``, ARNs) whose location covers it is
refreshed, recursively, before the ``package-ready`` delay runs. Within the
gateway's limits:

- **at most 2 in flight** per share: AWS accepts no more than two refreshes per
  share at a time. A refresh counts as in flight for ``hold`` seconds after it was
  accepted (the API is asynchronous and reports completion only through CloudWatch);
- **folders coalesced**: requests queue as durable timers keyed by (share, folder),
  so a folder waits at most once; one call carries up to 50 folders, and a folder
  below another queued folder is dropped (the refresh is recursive);
- **backoff when refused**: ``InvalidGatewayRequestException`` or throttling re-arms
  the share's folders with exponential backoff (capped), durable across restarts;
- **no call inside a transaction**: a step's transaction plans the calls and leases
  them (durable timers due ``lease`` seconds ahead); the calls are made after it
  committed (``after_commit``), then the leases are cleared. A worker that dies in
  between leaves its leases, which fall due again: the folders are refreshed again
  (a refresh is idempotent). A request that arrives while its folder's refresh is
  leased queues anew, so files written after a refresh was planned are refreshed too.

The :class:`GatewayApi` port has a boto3 adapter (:func:`boto3_gateway`).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from edp.errors import EdpError
from edp.store.base import Store, Transaction

log = logging.getLogger(__name__)

TIMER_KIND = "gateway-refresh"
"""Timers of folders waiting for a refresh, keyed ``<share>|<folder>``."""
LEASE_KIND = "gateway-refresh-lease"
"""Timers of planned calls (a kind of their own, so that a version that knows no
leases ignores them), keyed ``<share>|<random>``."""
DESCRIBE_RETRY = 60.0
"""Seconds before a share whose location could not be looked up is tried again."""
MAX_FOLDERS = 50
"""RefreshCache takes at most 50 folders per call."""


class GatewayBusy(EdpError):
    """The gateway refused a refresh for now (too many in progress, throttled)."""


class GatewayApi(Protocol):
    """What the warmer needs from Storage Gateway."""

    def share_location(self, share_arn: str) -> tuple[str, str] | None:
        """(bucket, key prefix) a share exposes, or None when unknown."""
        ...

    def refresh(self, share_arn: str, folders: Sequence[str]) -> None:
        """Start a recursive refresh of ``folders``; :class:`GatewayBusy` when refused."""
        ...


def coalesce(folders: Sequence[str]) -> list[str]:
    """Distinct folders, without those below another one in the list (sorted)."""
    result: list[str] = []
    for folder in sorted({f if f.endswith("/") else f + "/" for f in folders}):
        if not any(folder.startswith(kept) for kept in result):
            result.append(folder)
    return result


class GatewayWarmer:
    """Queues and sends RefreshCache calls (see the module docstring)."""

    def __init__(
        self,
        api: GatewayApi,
        shares: Sequence[str],
        *,
        max_in_flight: int = 2,
        hold: float = 60.0,
        base_backoff: float = 5.0,
        max_backoff: float = 300.0,
        lease: float = 120.0,
    ) -> None:
        self.api = api
        self.shares = list(shares)
        self.max_in_flight = max_in_flight
        self.hold = hold
        self.base_backoff = base_backoff
        self.max_backoff = max_backoff
        self.lease = lease
        self._locations: dict[str, tuple[str, str] | None] = {}
        self._unknown_until: dict[str, float] = {}
        self._in_flight: dict[str, list[float]] = defaultdict(list)
        self._planned: list[_Call] = []
        self.calls = 0

    # -- queueing -------------------------------------------------------------------
    def request(self, tx: Transaction, bucket: str, folder: str, *, now: float) -> int:
        """Queue a refresh of ``folder`` (an S3 key prefix of ``bucket``) on every share
        that exposes it; returns how many shares were asked."""
        asked = 0
        for share in self.shares:
            relative = self._relative(share, bucket, folder, now)
            if relative is None:
                continue
            payload = json.dumps({"share": share, "folder": relative, "attempts": 0})
            tx.set_timer(TIMER_KIND, f"{share}|{relative}", due_at=now, payload=payload)
            asked += 1
        return asked

    def locate(self, *, now: float) -> None:
        """Look up the location of every share not known yet (and not failed lately).

        :meth:`after_commit` calls it, outside any transaction, so that a step's
        :meth:`request` rarely has to (only before a worker's first step ended).
        """
        for share in self.shares:
            self._location(share, now)

    def _location(self, share: str, now: float) -> tuple[str, str] | None:
        if share in self._locations:
            return self._locations[share]
        if self._unknown_until.get(share, -float("inf")) > now:
            return None
        try:
            self._locations[share] = self.api.share_location(share)
        except Exception as exc:  # a boundary: an unknown share is skipped  # noqa: BLE001
            log.warning("cannot describe file share %s (next try in %gs): %s", share,
                        DESCRIBE_RETRY, exc)
            self._unknown_until[share] = now + DESCRIBE_RETRY
            return None
        return self._locations[share]

    def _relative(self, share: str, bucket: str, folder: str, now: float) -> str | None:
        location = self._location(share, now)
        if location is None or location[0] != bucket:
            return None
        root = location[1]
        if folder.startswith(root):
            return "/" + folder[len(root):]
        if root.startswith(folder):
            return "/"
        return None

    # -- sending --------------------------------------------------------------------
    # ``tick`` runs in a step's transaction: it takes the due requests, plans the calls
    # that fit the in-flight limit and *leases* them (a timer per call, due ``lease``
    # seconds ahead, under a key of its own so that a new request for the same folder
    # queues again instead of being absorbed). ``after_commit`` makes the calls with no
    # transaction open, then clears the leases (or re-arms refused folders) in a
    # transaction of its own. A worker that dies in between leaves the lease, which
    # falls due again and is planned anew.
    def tick(self, tx: Transaction, *, now: float) -> int:
        """Plan and lease the due refreshes within the limits; returns how many calls were
        planned (:meth:`after_commit` makes them)."""
        # A plan still here was made in a step whose transaction rolled back (every
        # committed step is followed by after_commit): its leases do not exist and
        # its requests are queued again, so it is dropped.
        for call in self._planned:
            self._release(call)
        self._planned = []
        due = tx.take_due_timers(LEASE_KIND, until=now, limit=1000)  # their workers died
        due += tx.take_due_timers(TIMER_KIND, until=now, limit=1000)
        by_share: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for timer in due:
            data = json.loads(timer.payload)
            by_share[data["share"]].append(data)
        planned = 0
        for share, items in by_share.items():
            planned += self._plan(tx, share, items, now)
        return planned

    def _plan(self, tx: Transaction, share: str, items: list[dict[str, Any]], now: float) -> int:
        flights = [t for t in self._in_flight[share] if t > now]
        self._in_flight[share] = flights
        attempts = max(int(item.get("attempts", 0)) for item in items)
        folders = coalesce([f for item in items for f in item.get("folders", [item.get("folder")])
                            if isinstance(f, str)])
        planned = 0
        while folders:
            if len(flights) >= self.max_in_flight:
                self._rearm(tx, share, folders, attempts, min(flights))
                break
            chunk, folders = folders[:MAX_FOLDERS], folders[MAX_FOLDERS:]
            key = f"lease|{share}|{uuid.uuid4().hex}"
            payload = json.dumps({"share": share, "folders": chunk, "attempts": attempts})
            tx.set_timer(LEASE_KIND, key, due_at=now + self.lease, payload=payload)
            slot = now + self.hold
            flights.append(slot)
            self._planned.append(_Call(key, share, chunk, attempts, slot))
            planned += 1
        return planned

    def after_commit(self, store: Store, *, now: float) -> int:
        """Make the calls :meth:`tick` leased (no transaction open); returns how many the
        gateway accepted."""
        self.locate(now=now)
        calls, self._planned = self._planned, []
        if not calls:
            return 0
        refused: dict[str, tuple[list[str], int, float]] = {}
        accepted = 0
        for call in calls:
            if call.share in refused:  # the share said no: the rest of its calls wait too
                refused[call.share][0].extend(call.folders)
                self._release(call)
                continue
            try:
                self.api.refresh(call.share, call.folders)
            except GatewayBusy as exc:
                delay = min(self.base_backoff * 2 ** call.attempts, self.max_backoff)
                log.info("file share %s refused a refresh (%s); retrying in %gs", call.share,
                         exc, delay)
                refused[call.share] = (list(call.folders), call.attempts + 1, now + delay)
                self._release(call)
                continue
            except Exception as exc:  # a boundary: warming is best effort  # noqa: BLE001
                log.warning("RefreshCache on %s failed for %s: %s", call.share, call.folders, exc)
                self._release(call)
                continue
            self.calls += 1
            accepted += 1
            log.info("RefreshCache on %s: %s", call.share, ", ".join(call.folders))
        try:
            with store.transaction() as tx:
                for call in calls:
                    tx.clear_timer(LEASE_KIND, call.key)
                for share, (folders, attempts, due_at) in refused.items():
                    self._rearm(tx, share, folders, attempts, due_at)
        except Exception as exc:  # a boundary: warming is best effort  # noqa: BLE001
            # The leases stay and fall due again: those folders are refreshed once more.
            log.warning("cannot record %d RefreshCache calls: %s", len(calls), exc)
        return accepted

    def _release(self, call: _Call) -> None:
        """A call that was not accepted does not hold an in-flight slot."""
        flights = self._in_flight[call.share]
        if call.slot in flights:
            flights.remove(call.slot)

    @staticmethod
    def _rearm(tx: Transaction, share: str, folders: Sequence[str], attempts: int,
               due_at: float) -> None:
        # Insert-if-absent: a newer request for a folder that is already queued keeps its
        # own (earlier) due time.
        for folder in folders:
            payload = json.dumps({"share": share, "folder": folder, "attempts": attempts})
            tx.set_timer(TIMER_KIND, f"{share}|{folder}", due_at=due_at, payload=payload)


@dataclass(frozen=True, slots=True)
class _Call:
    """A RefreshCache call planned (and leased) in a step, made after its commit."""

    key: str
    share: str
    folders: list[str]
    attempts: int
    slot: float


class Boto3Gateway:
    """:class:`GatewayApi` over a boto3 ``storagegateway`` client."""

    REFUSED = frozenset({"InvalidGatewayRequestException", "ThrottlingException",
                         "ServiceUnavailable", "TooManyRequestsException"})

    def __init__(self, client: Any) -> None:
        self.client = client

    def share_location(self, share_arn: str) -> tuple[str, str] | None:
        """Bucket and prefix from the share's LocationARN (NFS or SMB share)."""
        for describe, key in ((self.client.describe_nfs_file_shares, "NFSFileShareInfoList"),
                              (self.client.describe_smb_file_shares, "SMBFileShareInfoList")):
            try:
                infos = describe(FileShareARNList=[share_arn]).get(key, [])
            except self.client.exceptions.InvalidGatewayRequestException:
                continue
            for info in infos:
                return parse_location(str(info.get("LocationARN", "")))
        return None

    def refresh(self, share_arn: str, folders: Sequence[str]) -> None:
        """RefreshCache(Recursive=True); a refusal becomes :class:`GatewayBusy`."""
        from botocore.exceptions import ClientError

        try:
            self.client.refresh_cache(FileShareARN=share_arn, FolderList=list(folders),
                                      Recursive=True)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in self.REFUSED:
                raise GatewayBusy(f"{code}: {exc}") from None
            raise


def parse_location(location_arn: str) -> tuple[str, str] | None:
    """``arn:aws:s3:::bucket/prefix/`` -> (bucket, ``prefix/``); None for other ARNs."""
    head = "arn:aws:s3:::"
    if not location_arn.startswith(head):
        return None
    bucket, _, prefix = location_arn[len(head):].partition("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return (bucket, prefix) if bucket else None


def boto3_gateway(region: str) -> Boto3Gateway:
    """The boto3 adapter, with a client for ``region``."""
    from edp.aws.clients import client

    # Short timeouts: a lookup may run inside a step's transaction (see locate).
    return Boto3Gateway(client("storagegateway", region=region, read_timeout=10,
                               max_attempts=2))


__all__ = ["LEASE_KIND", "MAX_FOLDERS", "TIMER_KIND", "Boto3Gateway", "GatewayApi", "GatewayBusy",
           "GatewayWarmer", "boto3_gateway", "coalesce", "parse_location"]
