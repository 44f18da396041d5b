"""The packager in local mode: files in DIR/<bucket>/<prefix>, local folder registries."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edp.bootstrap import build_observers, build_runtime
from edp.config import Settings
from edp.engine import Message
from edp.quilt import Packager, PackagerSink, PackageStatus
from edp_testing import T0, ListSink, RecordingEndpoint, eventbridge, http_server
from integration.quilt.quilt_support import (
    METADATA_ROWS,
    SCHEMA,
    batch_event,
    local_revisions,
    quilt_settings,
    workflow_config,
    xlsx,
)

pytestmark = pytest.mark.timeout(60)

PREFIX = "instrument/exp-1/"


def make_files(root: Path, bucket: str, files: dict[str, bytes]) -> None:
    """Write ``files`` (key -> bytes) under ``root/bucket``."""
    for key, body in files.items():
        path = root / bucket / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A local root with one batch: two files, a metadata.xlsx and Finder junk."""
    make_files(tmp_path, "lab", {
        f"{PREFIX}a.csv": b"x,y\n1,2\n", f"{PREFIX}sub/b.bin": b"\x00" * 64,
        f"{PREFIX}metadata.xlsx": xlsx(METADATA_ROWS), f"{PREFIX}.DS_Store": b"junk",
    })
    return tmp_path


def test_a_batch_delivered_twice_through_eventbridge_makes_one_revision(
    root: Path, quilt: Any
) -> None:
    import orjson

    from edp.sinks.eventbridge import to_entry

    # Given the same batch event delivered twice by EventBridge: each delivery gets an
    # envelope id of EventBridge's own; edp's stable id is the detail's event-id
    emitted = batch_event("lab", PREFIX, event_id="3f1c1d4e-0000-5000-8000-00000000abcd")
    entry = to_entry(orjson.dumps(emitted).decode(), "bus")

    def delivered(eventbridge_id: str) -> dict[str, Any]:
        return {**emitted, "id": eventbridge_id, "detail": orjson.loads(entry["Detail"])}

    registry = root / "registry"
    packager = Packager(quilt_settings(), local_root=root, registry=str(registry))
    first = packager.package(delivered("a1b2c3d4-0000-0000-0000-000000000001"))
    second = packager.package(delivered("a1b2c3d4-0000-0000-0000-000000000002"))

    # Then the second makes no revision, and the package names edp's id
    assert first.status is PackageStatus.PUSHED, first.error
    assert second.status is PackageStatus.UNCHANGED, second
    assert len(local_revisions(registry, "instrument/exp-1")) == 1
    pkg = quilt.Package.browse("instrument/exp-1", registry=registry.as_uri())
    assert pkg.meta["edp"]["event-id"] == emitted["id"]


def test_a_local_batch_is_built_into_a_local_registry_once(root: Path, quilt: Any) -> None:
    # Given local mode with a local registry folder
    registry = root / "registry"
    packager = Packager(quilt_settings(), local_root=root, registry=str(registry))

    # When the same batch is packaged twice
    first = packager.package(batch_event("lab", PREFIX))
    second = packager.package(batch_event("lab", PREFIX))

    # Then one revision holds every file and the xlsx metadata; the second run wrote nothing
    assert first.status is PackageStatus.PUSHED, first.error
    assert second.status is PackageStatus.UNCHANGED
    assert second.top_hash == first.top_hash
    assert len(local_revisions(registry, "instrument/exp-1")) == 1
    pkg = quilt.Package.browse("instrument/exp-1", registry=registry.as_uri())
    assert {k for k, _ in pkg.walk()} == {"a.csv", "sub/b.bin", "metadata.xlsx", "README.md",
                                          "quilt_summarize.json", ".quiltignore"}
    assert pkg.meta["ComputerName"] == "Genome Lab - 1234"
    assert pkg.meta["edp"]["metadata-file"] == "metadata.xlsx"
    # and the source folder holds only the user's files
    assert sorted(p.name for p in (root / "lab" / PREFIX.rstrip("/")).iterdir()) == [
        ".DS_Store", "a.csv", "metadata.xlsx", "sub"]


def test_without_a_registry_the_batch_goes_to_its_own_bucket_folder(root: Path, quilt: Any
                                                                  ) -> None:
    # Given local mode and no registry setting
    packager = Packager(quilt_settings(package_local_root=str(root)))

    # When a batch is packaged
    result = packager.package(batch_event("lab", PREFIX))

    # Then the bucket's folder is the registry, and its .quilt/ holds the helper files
    assert result.status is PackageStatus.PUSHED, result.error
    assert result.registry == (root / "lab").as_uri()
    assert len(local_revisions(root / "lab", "instrument/exp-1")) == 1
    assert list((root / "lab" / ".quilt" / "edp" / "instrument" / "exp-1").glob("*/README.md"))


def test_the_prefixs_quiltignore_is_honoured(tmp_path: Path, quilt: Any) -> None:
    # Given a prefix with its own .quiltignore
    make_files(tmp_path, "lab", {f"{PREFIX}keep.txt": b"k", f"{PREFIX}run.log": b"l",
                                 f"{PREFIX}tmp/x.txt": b"t", f"{PREFIX}.quiltignore":
                                 b"*.log\ntmp/\n"})
    packager = Packager(quilt_settings(), local_root=tmp_path, registry=str(tmp_path / "reg"))

    # When it is packaged
    result = packager.package(batch_event("lab", PREFIX))

    # Then ignored files are left out, and the prefix's .quiltignore is kept as is
    assert result.status is PackageStatus.PUSHED, result.error
    pkg = quilt.Package.browse("instrument/exp-1", registry=(tmp_path / "reg").as_uri())
    assert {k for k, _ in pkg.walk()} == {"keep.txt", ".quiltignore", "README.md",
                                          "quilt_summarize.json"}
    assert json.loads(pkg["quilt_summarize.json"].get_bytes()) == []


@pytest.fixture
def webhook() -> Iterator[tuple[str, type[RecordingEndpoint]]]:
    """A local HTTP endpoint that keeps what is POSTed to it."""
    handler = RecordingEndpoint.fresh()
    with http_server(handler) as base:
        yield f"{base}/hook?token=secret", handler


def test_a_failed_workflow_goes_to_a_local_quarantine_and_calls_the_webhook(
    root: Path, quilt: Any, webhook: tuple[str, type[RecordingEndpoint]]
) -> None:
    # Given a local registry with a strict workflow and a local quarantine registry
    registry, quarantine = root / "registry", root / "quarantine"
    schema = root / "schema.json"
    schema.write_text(SCHEMA)
    config = registry / ".quilt" / "workflows" / "config.yml"
    config.parent.mkdir(parents=True)
    config.write_text(workflow_config(schema.as_uri()))
    url, hook = webhook
    settings = quilt_settings(notify_webhook_url=url, catalog_url="http://catalog",
                              workflow="strict", quarantine_registry=str(quarantine))
    packager = Packager(settings, local_root=root, registry=str(registry))

    # When the batch is packaged
    result = packager.package(batch_event("lab", PREFIX))

    # Then it is quarantined with the error in its README, and the webhook was told
    assert result.status is PackageStatus.QUARANTINED, result.error
    assert local_revisions(registry, "instrument/exp-1") == []
    pkg = quilt.Package.browse("instrument/exp-1", registry=quarantine.as_uri())
    assert "ProjectID" in pkg["README.md"].get_bytes().decode()
    [notice] = hook.bodies()
    assert notice["kind"] == "package-quarantined"
    assert notice["package"] == "instrument/exp-1"
    assert notice["registry"] == registry.as_uri()
    assert notice["landed_in"] == quarantine.as_uri()
    # (no catalog shows a local folder: no link to one; the files' folder is named)
    assert notice["url"] is None
    assert notice["source"] == str(root / "lab" / PREFIX.rstrip("/"))
    assert "ProjectID" in notice["error"]
    assert result.notify_errors == []

    # When the same event is delivered again (at least once: the first attempt may have
    # died between the push and the notice)
    again = packager.package(batch_event("lab", PREFIX))
    # Then no new revision is made, and the notice goes out again with the same ids,
    # for its receivers to tell the two apart from a new quarantine
    assert again.status is PackageStatus.QUARANTINED, again.error
    assert len(local_revisions(quarantine, "instrument/exp-1")) == 1
    first, second = hook.bodies()
    assert (second["event_id"], second["batch_id"]) == (first["event_id"], first["batch_id"])


def test_a_required_but_missing_metadata_file_is_a_reported_failure(tmp_path: Path,
                                                                    quilt: Any) -> None:
    # Given a batch without metadata file while metadata is required
    make_files(tmp_path, "lab", {f"{PREFIX}a.txt": b"a"})
    packager = Packager(quilt_settings(metadata_required=True), local_root=tmp_path,
                        registry=str(tmp_path / "reg"))

    # When it is packaged
    result = packager.package(batch_event("lab", PREFIX))

    # Then it fails for good, saying what was looked for, and nothing was built
    assert result.status is PackageStatus.FAILED
    assert not result.retryable
    assert "metadata.xlsx, metadata.json, metadata.yaml, metadata.csv" in (result.error or "")
    assert local_revisions(tmp_path / "reg", "instrument/exp-1") == []


def test_an_empty_or_missing_prefix_is_skipped(tmp_path: Path, quilt: Any) -> None:
    (tmp_path / "lab").mkdir()
    packager = Packager(quilt_settings(), local_root=tmp_path, registry=str(tmp_path / "reg"))
    result = packager.package(batch_event("lab", "nothing/here/"))
    assert result.status is PackageStatus.SKIPPED
    assert "nothing/here" in (result.error or "")


def test_a_missing_bucket_folder_fails_to_be_retried(tmp_path: Path, quilt: Any) -> None:
    # Given a packager whose local root is wrong (or whose drive is not mounted)
    packager = Packager(quilt_settings(), local_root=tmp_path / "nosuch",
                        registry=str(tmp_path / "reg"))
    # When a batch comes, Then it is not skipped (its message would be deleted): it
    # fails, to be retried, saying what is missing
    result = packager.package(batch_event("lab", PREFIX))
    assert result.status is PackageStatus.FAILED and result.retryable, result
    assert f"no folder {tmp_path / 'nosuch' / 'lab'}" in (result.error or "")
    assert "package_local_root" in (result.error or "")
    # ... once, not wrapped in a listing error that names its own exception type
    assert (result.error or "").startswith("no folder "), result.error
    assert "PublishError" not in (result.error or "")


@pytest.mark.parametrize("bucket", ["..", "../etc"])
def test_a_bucket_that_escapes_the_local_root_is_refused(tmp_path: Path, quilt: Any,
                                                         bucket: str) -> None:
    packager = Packager(quilt_settings(), local_root=tmp_path / "root",
                        registry=str(tmp_path / "reg"))
    result = packager.package(batch_event(bucket, "a/b/"))
    assert result.status is PackageStatus.FAILED and not result.retryable
    assert f"detail.bucket {bucket!r} is not a bucket name" in (result.error or "")
    assert not (tmp_path / "reg").exists() or not any((tmp_path / "reg").iterdir())


def test_local_mode_end_to_end_batch_package_and_package_ready(tmp_path: Path,
                                                               quilt: Any) -> None:
    # Given local mode: bucket "lab" is the folder tmp/lab, also the registry and watched
    # for new revisions; the packager is a sink of the engine's outbox
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'edp.db'}", buckets=("lab",),
                        package_local_root=str(tmp_path), bucket_threshold_event_count=2,
                        package_ready_registries=("lab",), package_ready_delay=5)
    sink, results = ListSink(), []
    rt = build_runtime(settings, sinks=[sink, PackagerSink(Packager(settings),
                                                           on_result=results.append)],
                       observers=build_observers(settings))
    make_files(tmp_path, "lab", {f"{PREFIX}a.txt": b"a", f"{PREFIX}b.txt": b"b"})

    # When the files' events arrive, the batch fires and the relay delivers it
    rt.engine.process([Message(eventbridge(f"{PREFIX}{n}", T0, bucket="lab"), "watch")
                       for n in ("a.txt", "b.txt")], now=T0)
    rt.relay.deliver()
    [result] = results
    assert result.status is PackageStatus.PUSHED, result.error

    # and a watcher reports every file the build wrote under tmp/lab
    written = [p.relative_to(tmp_path / "lab").as_posix()
               for p in (tmp_path / "lab" / ".quilt").rglob("*") if p.is_file()]
    rt.engine.process([Message(eventbridge(key, T0 + 1, bucket="lab"), "watch")
                       for key in written], now=T0 + 1)
    rt.engine.fire_due(now=T0 + 10)
    rt.relay.deliver()

    # Then there was one batch, one package, and one package-ready with its top hash
    kinds = [e["detail-type"] for e in sink.sent]
    assert kinds == ["package-objects-ready", "package-ready"]
    assert sink.sent[1]["detail"]["top-hash"] == result.top_hash
    assert sink.sent[1]["detail"]["package-name"] == "instrument/exp-1"
    assert len(results) == 1
    rt.close()


def test_a_broken_metadata_file_sends_the_package_to_quarantine_and_notifies(
    tmp_path: Path, quilt: Any, webhook: tuple[str, type[RecordingEndpoint]]
) -> None:
    # Given a batch whose metadata.yaml is broken, a quarantine registry and a webhook
    make_files(tmp_path, "lab", {f"{PREFIX}a.txt": b"a", f"{PREFIX}metadata.yaml": b"a: [1,"})
    url, hook = webhook
    packager = Packager(quilt_settings(notify_webhook_url=url), local_root=tmp_path,
                        registry=str(tmp_path / "reg"),
                        quarantine_registry=str(tmp_path / "quarantine"))

    # When it is packaged
    result = packager.package(batch_event("lab", PREFIX))

    # Then it is quarantined (nothing in the target registry), and the webhook says why
    assert result.status is PackageStatus.QUARANTINED
    assert result.metadata_file == "metadata.yaml"
    assert "metadata.yaml cannot be read as yaml" in (result.error or "")
    assert local_revisions(tmp_path / "reg", "instrument/exp-1") == []
    assert len(local_revisions(tmp_path / "quarantine", "instrument/exp-1")) == 1
    [notice] = hook.bodies()
    assert notice["kind"] == "package-quarantined"
    assert "metadata.yaml" in notice["error"]


def test_files_linking_out_of_the_local_root_are_left_out(root: Path, quilt: Any) -> None:
    # Given a batch folder with a symlink to a file outside the local root
    secret = root.parent / f"{root.name}-outside.txt"
    secret.write_text("not for the package")
    (root / "lab" / PREFIX / "link.txt").symlink_to(secret)
    registry = root / "registry"
    # When it is packaged
    result = Packager(quilt_settings(), local_root=root, registry=str(registry)).package(
        batch_event("lab", PREFIX))
    # Then the package holds the batch's own files, not the linked one
    assert result.status is PackageStatus.PUSHED
    pkg = quilt.Package.browse(result.package, registry=f"file://{registry}")
    assert "link.txt" not in pkg
    assert "a.csv" in pkg



def test_files_the_watcher_ignores_are_left_out_of_a_local_package(root: Path,
                                                                   quilt: Any) -> None:
    # Given a batch folder with a file still being written under a temporary name, an
    # editor's lock file and, with watch_ignore set to those and one whole-key pattern,
    # a scratch folder's file
    folder = root / "lab" / PREFIX
    (folder / "big.dat.part").write_text("half")
    (folder / "~$notes.docx").write_text("lock")
    (folder / "scratch").mkdir()
    (folder / "scratch" / "x.csv").write_text("scratch")
    settings = quilt_settings(watch_ignore=("*.part", "~$*", f"{PREFIX}scratch/*"))
    registry = root / "registry"
    # When it is packaged
    result = Packager(settings, local_root=root, registry=str(registry)).package(
        batch_event("lab", PREFIX))
    # Then the package holds the batch's files only
    assert result.status is PackageStatus.PUSHED
    keys = {key for key, _ in quilt.Package.browse(
        result.package, registry=f"file://{registry}").walk()}
    assert "a.csv" in keys
    assert not keys & {"big.dat.part", "~$notes.docx", "scratch/x.csv"}

def test_a_bucket_folder_linked_out_of_the_local_root_is_refused(tmp_path: Path,
                                                                 quilt: Any) -> None:
    # Given a bucket folder of the local root that is a link to a folder elsewhere
    outside = tmp_path / "outside" / "a" / "b"
    outside.mkdir(parents=True)
    (outside / "secret.txt").write_text("x")
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "linked").symlink_to(tmp_path / "outside", target_is_directory=True)
    packager = Packager(quilt_settings(), local_root=tmp_path / "root",
                        registry=str(tmp_path / "reg"))
    # Then its batch is refused, not packaged from outside the root
    result = packager.package(batch_event("linked", "a/b/"))
    assert result.status is PackageStatus.FAILED
    assert "escapes the local root" in (result.error or "")



def test_a_prefix_folder_linked_out_of_its_bucket_folder_is_refused(tmp_path: Path,
                                                                   quilt: Any) -> None:
    # Given a prefix folder of bucket "lab" that links to a folder beside lab's, inside
    # the local root (another bucket's, or the one beside a watched folder)
    beside = tmp_path / "root" / "other" / "b"
    beside.mkdir(parents=True)
    (beside / "secret.txt").write_text("not lab's")
    (tmp_path / "root" / "lab" / "a").mkdir(parents=True)
    (tmp_path / "root" / "lab" / "a" / "b").symlink_to(beside, target_is_directory=True)
    packager = Packager(quilt_settings(), local_root=tmp_path / "root",
                        registry=str(tmp_path / "reg"))
    # When its batch is packaged
    result = packager.package(batch_event("lab", "a/b/"))
    # Then it is refused, and nothing of the other folder is packaged
    assert result.status is PackageStatus.FAILED and not result.retryable
    assert "escapes the folder of bucket" in (result.error or "")
    assert not (tmp_path / "reg").exists() or not any((tmp_path / "reg").iterdir())

def test_a_watchers_packager_packages_only_its_own_folder(tmp_path: Path, quilt: Any) -> None:
    # Given `edp watch lab/drop --registry reg`'s packager sink, and a folder beside the
    # watched one (other processes on a shared store may route any bucket's events to it)
    from edp.cli.watch import packager_sink
    from edp.sources.watch import FolderSource
    from edp.store.base import OutboxEntry

    make_files(tmp_path / "lab", "drop", {f"{PREFIX}a.txt": b"a"})
    make_files(tmp_path / "lab", "private", {f"{PREFIX}creds.txt": b"secret"})
    registry = tmp_path / "reg"
    sink = packager_sink(quilt_settings(), FolderSource(tmp_path / "lab" / "drop"),
                         str(registry))

    def entry(bucket: str, n: int) -> OutboxEntry:
        event = batch_event(bucket, PREFIX, batch_id=f"batch-{n}",
                            event_id=f"3f1c1d4e-0000-5000-8000-00000000000{n}")
        return OutboxEntry(n, event["id"], event["detail-type"], json.dumps(event), T0)

    # When it is sent a batch of the folder beside it, then one of its own
    assert sink.send([entry("private", 1)]) == []
    assert sink.send([entry("drop", 2)]) == []

    # Then the other folder's batch is left alone, unread, and only its own is packaged
    names = [p.relative_to(registry / ".quilt/named_packages").as_posix()
             for p in (registry / ".quilt/named_packages").glob("*/*")]
    assert names == ["instrument/exp-1"]
    manifests = b"".join(p.read_bytes() for p in (registry / ".quilt/packages").rglob("*")
                         if p.is_file())
    assert b"creds.txt" not in manifests and b"a.txt" in manifests


def test_two_watchers_on_one_store_package_their_own_batches(tmp_path: Path, quilt: Any) -> None:
    # Given two `edp watch --registry reg` on one store, each on its own folder
    from edp.cli.watch import watch_worker_id, watcher_sinks
    from edp.sources.watch import FolderSource

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    settings = quilt_settings(database_url=url, bucket_threshold_event_count=2)
    registry = tmp_path / "reg"
    watchers = {}
    for bucket in ("scope", "seq"):
        make_files(tmp_path / "lab", bucket, {f"{PREFIX}a.txt": b"a", f"{PREFIX}b.txt": b"b"})
        source = FolderSource(tmp_path / "lab" / bucket)
        worker = watch_worker_id(source.root)
        watchers[bucket] = build_runtime(settings, worker_id=worker, sinks=watcher_sinks(
            settings, source, worker, stdout=False, registry=str(registry)))
        watchers[bucket].engine.register_sinks(now=T0)  # (as its daemon does at start)
    try:
        # When "seq" fires a batch, and "scope"'s relay looks at the outbox first
        watchers["seq"].engine.process(
            [Message(eventbridge(f"{PREFIX}{name}", T0, bucket="seq"), name)
             for name in ("a.txt", "b.txt")], now=T0)
        watchers["scope"].relay.deliver()
        # Then "scope" leaves it alone, and "seq" packages it
        assert not (registry / ".quilt").exists()
        assert watchers["seq"].relay.deliver().delivered == 1
        assert len(local_revisions(registry, "instrument/exp-1")) == 1
        # When "scope" fires a batch of "seq" by time (both caught up, whoever wakes
        # first; or "seq" stopped)
        make_files(tmp_path / "lab", "seq", {"instrument/exp-2/c.txt": b"c"})
        watchers["seq"].engine.process([Message(eventbridge(
            "instrument/exp-2/c.txt", T0 + 1, bucket="seq"), "c.txt")], now=T0 + 1)
        watchers["seq"].store.finish_worker(watchers["seq"].engine.worker_id)
        fired = watchers["scope"].engine.fire_due(now=T0 + 10_000)
        assert [(r.bucket, r.prefix) for r in fired] == [("seq", "instrument/exp-2/")]
        for bucket in ("scope", "seq"):
            watchers[bucket].relay.deliver()
        # Then "seq" packages it all the same
        assert len(local_revisions(registry, "instrument/exp-2")) == 1
        # When an operator re-emits it (to every watcher's sinks on the store)
        [batch] = [b for b in watchers["seq"].store.list_batches(state="closed")
                   if b.prefix == PREFIX]
        operator = build_runtime(quilt_settings(database_url=url))
        try:
            operator.engine.reemit(batch.batch_id)
        finally:
            operator.close()
        for bucket in ("scope", "seq"):
            watchers[bucket].relay.deliver()
        # Then nothing is parked: "scope" ignores it, "seq" finds its package unchanged
        stats = watchers["seq"].store.stats()
        assert (stats["pending_deliveries"], stats["parked_deliveries"]) == (0, 0)
        assert len(local_revisions(registry, "instrument/exp-1")) == 1
    finally:
        for runtime in watchers.values():
            runtime.close()


def test_an_oversize_metadata_file_is_refused_unread(tmp_path: Path, quilt: Any) -> None:
    import tracemalloc

    # Given a batch whose metadata.json is 200 MiB (a sparse file: no disk used)
    make_files(tmp_path, "lab", {f"{PREFIX}a.txt": b"a"})
    with (tmp_path / "lab" / PREFIX / "metadata.json").open("wb") as big:
        big.truncate(200 * 1024 * 1024)
    packager = Packager(quilt_settings(), local_root=tmp_path, registry=str(tmp_path / "reg"))

    # When it is packaged
    tracemalloc.start()
    try:
        result = packager.package(batch_event("lab", PREFIX))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    # Then the file is refused for its size, without being read into memory
    assert result.status is not PackageStatus.PUSHED
    assert "is 209715200 bytes; the limit is 10485760" in (result.error or "")
    assert peak < 64 * 1024 * 1024


def test_a_package_name_the_file_system_cannot_hold_fails_for_good(tmp_path: Path,
                                                                   quilt: Any) -> None:
    # Given a batch whose package name has a 400-character segment (the template repeats
    # one), for a local registry: no file system holds such a name
    prefix = f"inst/{'x' * 200}/"
    make_files(tmp_path, "lab", {f"{prefix}a.txt": b"a"})
    packager = Packager(quilt_settings(package_name_template="{0}/{1}{1}"),
                        local_root=tmp_path, registry=str(tmp_path / "reg"))
    # When it is packaged
    result = packager.package(batch_event("lab", prefix))
    # Then it fails for good (a retry would fail again, and hold back the sink's later
    # events), saying why
    assert result.status is PackageStatus.FAILED and not result.retryable
    assert "File name too long" in (result.error or "")


def test_a_source_folder_name_the_file_system_cannot_hold_fails_for_good(
    tmp_path: Path, quilt: Any
) -> None:
    # Given a batch whose prefix has a 300-character segment under an existing folder
    make_files(tmp_path, "lab", {"inst/a.txt": b"a"})
    packager = Packager(quilt_settings(), local_root=tmp_path, registry=str(tmp_path / "reg"))
    # When it is packaged, then it fails for good, saying why
    result = packager.package(batch_event("lab", f"inst/{'x' * 300}/"))
    assert result.status is PackageStatus.FAILED and not result.retryable
    assert "File name too long" in (result.error or "")


def test_a_file_whose_name_is_not_utf8_is_left_out_of_the_package(tmp_path: Path,
                                                                   quilt: Any) -> None:
    # Given a batch folder holding a file whose name is not valid UTF-8 (the watcher
    # skips it, and it can be no package key)
    make_files(tmp_path, "lab", {f"{PREFIX}a.txt": b"a"})
    os.close(os.open(os.fsencode(tmp_path / "lab" / PREFIX) + b"/bad\xffname",
                     os.O_CREAT | os.O_WRONLY))
    packager = Packager(quilt_settings(), local_root=tmp_path, registry=str(tmp_path / "reg"))
    # When it is packaged, then the package holds the other files (it was retried for
    # ever before: quilt3 cannot write that name)
    result = packager.package(batch_event("lab", PREFIX))
    assert result.status is PackageStatus.PUSHED, result.error
    keys = [k for k, _ in quilt.Package.browse(
        "instrument/exp-1", registry=(tmp_path / "reg").as_uri()).walk()]
    assert "a.txt" in keys and not [k for k in keys if k.startswith("bad")]


@pytest.mark.parametrize("own_bucket", [False, True], ids=["other-folder", "own-bucket"])
def test_a_local_revision_never_changes_when_its_source_folder_does(
    root: Path, quilt: Any, own_bucket: bool
) -> None:
    # Given a batch packaged into a local registry (another folder, or its own bucket's)
    registry = root / "lab" if own_bucket else root / "registry"
    packager = Packager(quilt_settings(), local_root=root,
                        registry=None if own_bucket else str(registry))
    first = packager.package(batch_event("lab", PREFIX))
    assert first.status is PackageStatus.PUSHED, first.error
    # When the source files are overwritten in place and deleted afterwards
    source = root / "lab" / PREFIX
    (source / "a.csv").write_bytes(b"changed\n")
    (source / "sub" / "b.bin").unlink()
    # Then the revision still reads the files as they were packaged
    pkg = quilt.Package.browse("instrument/exp-1", registry=registry.as_uri(),
                               top_hash=first.top_hash)
    assert pkg["a.csv"].get_bytes() == b"x,y\n1,2\n"
    assert pkg["sub/b.bin"].get_bytes() == b"\x00" * 64
    # And its files are kept once, by content, inside the registry's .quilt folder
    physical = Path(pkg["a.csv"].physical_key.path)
    assert (registry / ".quilt" / "edp" / "objects") in physical.parents
    # And packaging the same content again makes no revision and no second copy
    (source / "a.csv").write_bytes(b"x,y\n1,2\n")
    (source / "sub" / "b.bin").write_bytes(b"\x00" * 64)
    again = packager.package(batch_event("lab", PREFIX))
    assert again.status is PackageStatus.UNCHANGED and again.top_hash == first.top_hash
    copies = [p for p in (registry / ".quilt" / "edp" / "objects").rglob("*") if p.is_file()]
    assert len(copies) == len({p.name for p in copies}) == 3  # a.csv, b.bin, metadata.xlsx


def test_revisions_of_one_package_written_within_a_second_each_keep_their_pointer(
    root: Path, quilt: Any
) -> None:
    # Given three batches of one prefix that fired together (a watcher's start-up scan)
    registry = root / "registry"
    packager = Packager(quilt_settings(), local_root=root, registry=str(registry))
    results = [packager.package(batch_event("lab", PREFIX, batch_id=f"batch-{n}",
                                            event_id=f"3f1c1d4e-0000-5000-8000-00000000000{n}"))
               for n in range(3)]
    # Then each is a revision of its own in the package's history
    assert [r.status for r in results] == [PackageStatus.PUSHED] * 3, results
    assert len({r.top_hash for r in results}) == 3
    pointers = local_revisions(registry, "instrument/exp-1")
    assert len(pointers) == 3
    hashes = {(registry / ".quilt/named_packages/instrument/exp-1" / p).read_text().strip()
              for p in pointers}
    assert hashes == {r.top_hash for r in results}


@pytest.mark.parametrize("prefix", ["instrument//", "/instrument/exp-1/", "instrument//exp-1/"])
def test_a_prefix_with_an_empty_segment_is_refused_in_local_mode(
    root: Path, quilt: Any, prefix: str
) -> None:
    # Given local mode, where a folder path collapses "a//" into "a/" (the parent folder)
    registry = root / "registry"
    packager = Packager(quilt_settings(), local_root=root, registry=str(registry))
    # When a batch event names a prefix with an empty segment
    result = packager.package(batch_event("lab", prefix))
    # Then it fails for good, saying why, and no package of other batches' files is built
    assert result.status is PackageStatus.FAILED and not result.retryable
    assert "empty segment" in (result.error or "")
    assert not (registry / ".quilt" / "named_packages").exists()


def test_a_failing_push_of_edp_watch_is_logged_once_per_try(tmp_path: Path, quilt: Any) -> None:
    # Given `edp watch --registry` whose registry cannot be written (its .quilt is a file)
    import signal
    import subprocess
    import sys
    import time

    folder = tmp_path / "lab"
    (folder / "exp" / "1").mkdir(parents=True)
    (folder / "exp" / "1" / "a.txt").write_bytes(b"a")
    registry = tmp_path / "registry"
    registry.mkdir()
    (registry / ".quilt").write_bytes(b"not a folder")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edp", "watch", str(folder), "--registry", str(registry),
         "--database-url", f"sqlite:///{tmp_path / 'edp.db'}", "--no-stdout",
         "--settle", "0.2", "--threshold-duration", "0.5"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path,
    )
    # When its batch fires and the push fails, and is tried again
    time.sleep(8)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    lines = err.decode().splitlines()
    # Then each try is one line, with its attempt and the reason
    failures = [line for line in lines if "NotADirectoryError" in line]
    tries = [line for line in failures if " attempt " in line]
    assert len(tries) >= 2, err.decode()
    assert failures == tries, err.decode()
    assert not [line for line in lines if "deliveries failed" in line], err.decode()
