"""File Gateway warm-up and package-ready timing, on the real engine and SQLite store.

Storage Gateway is not in moto: the warmer talks to :class:`FakeGateway`, a stand-in
for the AWS API (not for edp code); the boto3 adapter is checked with botocore's Stubber.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from edp.config import Settings
from edp.engine import Engine, Message
from edp.quilt.gateway import (
    TIMER_KIND,
    Boto3Gateway,
    GatewayBusy,
    GatewayWarmer,
    coalesce,
)
from edp.quilt.ready import (
    PackageReadyObserver,
    PointerReader,
    build_package_ready_observer,
    local_pointer_reader,
)
from edp.store import open_store
from edp.store.base import Store, Transaction
from edp_testing import T0, eventbridge
from integration.quilt.conftest import need

pytestmark = pytest.mark.timeout(30)

SHARE = "arn:aws:storagegateway:us-east-1:111122223333:share/share-AAAA"
OTHER = "arn:aws:storagegateway:us-east-1:111122223333:share/share-BBBB"
TOP = "ab" * 32


class FakeGateway:
    """Storage Gateway as the warmer sees it: share locations, accepted refreshes."""

    def __init__(self, refuse: int = 0, during: Callable[[], None] | None = None,
                 unreachable: int = 0) -> None:
        self.locations = {SHARE: ("registry", ""), OTHER: ("other-bucket", "")}
        self.calls: list[tuple[str, list[str]]] = []
        self.refuse = refuse
        self.during = during
        self.unreachable = unreachable
        self.describes = 0

    def share_location(self, share_arn: str) -> tuple[str, str] | None:
        self.describes += 1
        if self.unreachable:
            self.unreachable -= 1
            raise OSError("connect timeout")
        return self.locations.get(share_arn)

    def refresh(self, share_arn: str, folders: Sequence[str]) -> None:
        if self.refuse:
            self.refuse -= 1
            raise GatewayBusy("InvalidGatewayRequestException: 2 refreshes in progress")
        if self.during is not None:
            self.during()
        self.calls.append((share_arn, list(folders)))


def test_folders_are_coalesced() -> None:
    assert coalesce(["/a/b/", "/a/", "/c", "/a/b/c/", "/c/"]) == ["/a/", "/c/"]


def step(store: Store, warmer: GatewayWarmer, now: float,
         requests: Sequence[str] = ()) -> None:
    """What an engine step does with the warmer: queue and plan in the step's
    transaction, call once it committed."""
    with store.transaction() as tx:
        for folder in requests:
            warmer.request(tx, "registry", folder, now=now)
        warmer.tick(tx, now=now)
    warmer.after_commit(store, now=now)


def failed_step(store: Store, work: Callable[[Transaction], object]) -> None:
    """A step that does ``work`` in its transaction, then fails (rolled back)."""
    with store.transaction() as tx:
        work(tx)
        raise RuntimeError("the step failed")


def test_refreshes_are_coalesced_per_share_and_limited_to_two_in_flight() -> None:
    # Given a warmer for two shares, one of which exposes the registry bucket
    store = open_store("sqlite:///:memory:")
    api = FakeGateway()
    warmer = GatewayWarmer(api, [SHARE, OTHER], hold=60)

    # When three folders are asked for at once
    step(store, warmer, T0, ["team/a/", "team/a/raw/", "team/b/"])
    # Then one call carries them, coalesced, on the share of that bucket only
    assert api.calls == [(SHARE, ["/team/a/", "/team/b/"])]

    # When two more requests come while the first refresh is still in flight
    for n, folder in enumerate(("team/c/", "team/d/"), start=1):
        step(store, warmer, T0 + n, [folder])
    # Then only one more is sent (two in flight), the other waits for a slot
    assert [folders for _, folders in api.calls] == [["/team/a/", "/team/b/"], ["/team/c/"]]
    step(store, warmer, T0 + 59)
    assert len(api.calls) == 2
    step(store, warmer, T0 + 61)
    assert api.calls[-1] == (SHARE, ["/team/d/"])
    # And no lease is left behind
    assert store.next_timer_due() is None
    store.close()


def test_a_refused_refresh_is_retried_with_backoff_even_after_a_restart(tmp_path: Path) -> None:
    # Given a gateway that refuses twice
    url = f"sqlite:///{tmp_path / 'edp.db'}"
    store = open_store(url)
    api = FakeGateway(refuse=2)
    warmer = GatewayWarmer(api, [SHARE], base_backoff=5)
    step(store, warmer, T0, ["team/a/"])
    store.close()

    # When a new worker takes over: nothing before the backoff, then a second refusal
    store = open_store(url)
    warmer = GatewayWarmer(api, [SHARE], base_backoff=5)
    step(store, warmer, T0 + 4)
    assert api.refuse == 1
    step(store, warmer, T0 + 5)
    assert api.refuse == 0
    # Then the next try waits twice as long, and succeeds (a refusal held no slot)
    step(store, warmer, T0 + 14)
    assert api.calls == []
    step(store, warmer, T0 + 15)
    assert api.calls == [(SHARE, ["/team/a/"])]
    store.close()


def test_the_call_is_made_after_the_step_committed_and_a_request_meanwhile_queues_again(
    tmp_path: Path,
) -> None:
    # Given a warmer on a file store, and a gateway that, during its call, looks at the
    # store through another connection and lets another worker ask for the same folder
    url = f"sqlite:///{tmp_path / 'edp.db'}"
    store, other = open_store(url), open_store(url)
    seen: list[float | None] = []

    def meanwhile() -> None:
        seen.append(other.next_timer_due())
        with other.transaction() as tx:  # "database is locked" if a step's tx were open
            GatewayWarmer(FakeGateway(), [SHARE]).request(tx, "registry", "team/a/",
                                                          now=T0 + 1)

    api = FakeGateway(during=meanwhile)
    warmer = GatewayWarmer(api, [SHARE], hold=60, lease=120)

    # When a step asks for the folder
    step(store, warmer, T0, ["team/a/"])

    # Then the call saw its lease committed (a crash during it would not lose the refresh)
    assert api.calls == [(SHARE, ["/team/a/"])]
    assert seen == [T0 + 120]
    # And the request made during the call was not absorbed by the lease: it is sent
    # once a slot is free, and then nothing is left
    api.during = None
    assert other.next_timer_due() == T0 + 1
    step(store, warmer, T0 + 2)
    assert api.calls == [(SHARE, ["/team/a/"])] * 2
    assert store.next_timer_due() is None
    store.close()
    other.close()


def test_a_plan_of_a_step_that_rolled_back_is_not_called() -> None:
    # Given a step that planned a refresh, then failed (its transaction rolled back)
    store = open_store("sqlite:///:memory:")
    api = FakeGateway()
    warmer = GatewayWarmer(api, [SHARE])

    def plan(tx: Transaction) -> None:
        warmer.request(tx, "registry", "team/a/", now=T0)
        warmer.tick(tx, now=T0)

    with pytest.raises(RuntimeError):
        failed_step(store, plan)

    # When the input comes again and the next step commits
    step(store, warmer, T0 + 1, ["team/a/"])

    # Then the folder is refreshed once, not once for each plan
    assert api.calls == [(SHARE, ["/team/a/"])]
    assert store.next_timer_due() is None
    store.close()


def test_a_worker_dying_between_commit_and_call_leaves_a_lease_that_falls_due(
    tmp_path: Path,
) -> None:
    # Given a step that planned a refresh and committed, and a worker that died before
    # making the call
    url = f"sqlite:///{tmp_path / 'edp.db'}"
    store = open_store(url)
    api = FakeGateway()
    with store.transaction() as tx:
        dead = GatewayWarmer(api, [SHARE], lease=120)
        dead.request(tx, "registry", "team/a/", now=T0)
        dead.tick(tx, now=T0)
    store.close()

    # When another worker ticks before and after the lease ran out
    store = open_store(url)
    with store.transaction() as tx:  # takes nothing, so changes nothing
        assert tx.take_due_timers(TIMER_KIND, until=T0 + 1000, limit=10) == []
    warmer = GatewayWarmer(api, [SHARE], lease=120)
    step(store, warmer, T0 + 119)
    assert api.calls == []
    step(store, warmer, T0 + 120)

    # Then the folder is refreshed, once, and nothing is left (the lease was a timer of
    # its own kind, which a version without leases would not take for a request)
    assert api.calls == [(SHARE, ["/team/a/"])]
    step(store, warmer, T0 + 500)
    assert len(api.calls) == 1
    assert store.next_timer_due() is None
    store.close()


def pointer_event(key: str, t: float) -> Message:
    return Message(eventbridge(key, t, bucket="registry"), "test")


def revision_seen(reader: PointerReader) -> tuple[PackageReadyObserver, Store, Engine]:
    """An engine with package-ready on registry ``registry`` (1 s delay) that has just
    seen one new revision pointer at T0."""
    settings = Settings(database_url="sqlite:///:memory:",
                        package_ready_registries=("registry",), package_ready_delay=1)
    observer = build_package_ready_observer(settings, reader=reader)
    store = open_store("sqlite:///:memory:")
    engine = Engine(store, settings, sinks=["list"], worker_id="w", observers=[observer])
    engine.process([pointer_event(".quilt/named_packages/a/b/1700000000", T0)], now=T0)
    return observer, store, engine


def test_a_new_revision_refreshes_the_share_at_once_and_is_ready_after_the_delay(
    tmp_path: Path,
) -> None:
    # Given an engine watching the registry, with a share to warm and a 30 s delay
    key = ".quilt/named_packages/team/exp/1700000000"
    pointer = tmp_path / "registry" / key
    pointer.parent.mkdir(parents=True)
    pointer.write_text(TOP)
    settings = Settings(database_url="sqlite:///:memory:", package_ready_registries=("registry",),
                        package_ready_delay=30, buckets=("data",))
    api = FakeGateway()
    observer = build_package_ready_observer(
        settings, reader=local_pointer_reader(tmp_path), warmer=GatewayWarmer(api, [SHARE]))
    store = open_store("sqlite:///:memory:")
    engine = Engine(store, settings, sinks=["list"], worker_id="w", observers=[observer])

    # When the pointer's S3 event (and the 'latest' one) arrive
    engine.process([pointer_event(key, T0), pointer_event(key.rsplit("/", 1)[0] + "/latest", T0)],
                   now=T0)

    # Then the share is refreshed in that same step, and package-ready waits for the delay
    assert api.calls == [(SHARE, ["/team/exp/"])]
    assert store.pending("list", limit=10, now=T0) == []
    engine.fire_due(now=T0 + 30)
    [entry] = store.pending("list", limit=10, now=T0 + 30)
    event = orjson.loads(entry.payload)
    assert event["detail"] == {"version": "0.1", "package-name": "team/exp",
                               "bucket": "registry", "top-hash": TOP}
    assert event["time"] == "2023-11-14T22:13:50Z"  # T0 + 30: when the delay ended
    store.close()


def test_an_unreadable_pointer_is_retried_and_a_vanished_one_dropped(tmp_path: Path) -> None:
    # Given a reader that fails once, then finds the pointer gone
    answers: list[Any] = [OSError("S3 is down"), None]

    def reader(bucket: str, key: str) -> str | None:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return str(answer) if answer else None

    observer, store, engine = revision_seen(reader)

    # When the timer fires: the read fails and is re-armed; later the pointer is gone
    engine.fire_due(now=T0 + 1)
    engine.fire_due(now=T0 + 1 + observer.retry_delay)

    # Then nothing was emitted, and the store counted both
    assert store.pending("list", limit=10, now=T0 + 100) == []
    counters = store.counters()
    assert counters["package_ready.retried"] == 1
    assert counters["package_ready.dropped"] == 1
    store.close()


def test_the_boto3_adapter_maps_locations_and_refusals() -> None:
    boto3 = need("boto3")
    from botocore.stub import Stubber

    client = boto3.client("storagegateway", region_name="us-east-1",
                          aws_access_key_id="x", aws_secret_access_key="x")
    gateway = Boto3Gateway(client)
    with Stubber(client) as stub:
        stub.add_response("describe_nfs_file_shares", {"NFSFileShareInfoList": [
            {"FileShareARN": SHARE, "LocationARN": "arn:aws:s3:::registry/shared"}]},
            {"FileShareARNList": [SHARE]})
        assert gateway.share_location(SHARE) == ("registry", "shared/")
        stub.add_client_error("refresh_cache", "InvalidGatewayRequestException", "busy")
        with pytest.raises(GatewayBusy):
            gateway.refresh(SHARE, ["/a/"])
        stub.add_response("refresh_cache", {"FileShareARN": SHARE, "NotificationId": "n"},
                          {"FileShareARN": SHARE, "FolderList": ["/a/"], "Recursive": True})
        gateway.refresh(SHARE, ["/a/"])


def test_package_ready_forgets_leases_of_a_step_that_rolled_back(tmp_path: Path) -> None:
    # Given a due revision whose lease was taken in a step that then failed
    reads: list[str] = []

    def reader(bucket: str, key: str) -> str | None:
        reads.append(key)
        return TOP

    observer, store, engine = revision_seen(reader)
    with pytest.raises(RuntimeError):
        failed_step(store, lambda tx: observer.tick(tx, clock=T0 + 1, now=T0 + 1,
                                                    sinks=["list"]))

    # When the next tick commits
    engine.fire_due(now=T0 + 2)

    # Then the pointer is read once and one event is out
    assert len(reads) == 1
    assert len(store.pending("list", limit=10, now=T0 + 2)) == 1
    store.close()


def test_a_share_that_cannot_be_described_is_tried_again_a_minute_later() -> None:
    # Given a gateway API that cannot be reached for the first lookup
    store = open_store("sqlite:///:memory:")
    api = FakeGateway(unreachable=1)
    warmer = GatewayWarmer(api, [SHARE])

    # When revisions come at once, half a minute later, and after a minute
    step(store, warmer, T0, ["team/a/"])
    step(store, warmer, T0 + 30, ["team/b/"])
    assert (api.describes, api.calls) == (1, [])  # no lookup under every step's locks
    step(store, warmer, T0 + 61)

    # Then the share was looked up again after the commit (not in a step), and later
    # requests are refreshed
    assert api.describes == 2
    step(store, warmer, T0 + 62, ["team/c/"])
    assert api.calls == [(SHARE, ["/team/c/"])]
    assert api.describes == 2
    store.close()
