"""`edp watch`: a local folder as a bucket, through the real watcher, daemon, engine and store."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from edp.cli.watch import watch_worker_id
from edp.decode import decode_message
from edp.sources.watch import SEQUENCER_WIDTH, FolderSource, notification
from edp.store import Store, open_store
from edp.store.base import BatchRow
from edp_testing import interruptible

pytestmark = pytest.mark.timeout(60)
Wait = Callable[..., object]


def write_in_pieces(path: Path, *, pieces: int, pause: float, size: int = 4096) -> bytes:
    """Write ``pieces`` random blocks to ``path``, flushing and pausing after each."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = b""
    with path.open("wb") as handle:
        for _ in range(pieces):
            block = os.urandom(size)
            handle.write(block)
            handle.flush()
            data += block
            time.sleep(pause)
    return data


def open_batch(store: Store, prefix: str) -> BatchRow | None:
    return next((b for b in store.list_batches(state="open") if b.prefix == prefix), None)


def keys_of(store: Store, prefix: str) -> list[str]:
    batch = open_batch(store, prefix)
    return [] if batch is None else [o.key for o in store.batch_objects(batch.batch_id)]


def test_a_file_written_in_pieces_becomes_one_event_once_complete(
    watch: Callable[..., Any], root: Path, reader: Callable[[], Store], wait: Wait
) -> None:
    # Given a watcher that waits 1 s of stable size
    watch(watch_settle_seconds=1.0)
    store = reader()
    # When a file is written in five pieces under its final name, 0.1 s apart
    data = write_in_pieces(root / "scope/exp-1/a.bin", pieces=5, pause=0.1)
    # Then it is counted once, with its full size and the MD5 of its content as eTag
    wait(lambda: keys_of(store, "scope/exp-1/") == ["scope/exp-1/a.bin"], what="a.bin")
    [obj] = store.batch_objects(store.list_batches(state="open")[0].batch_id)
    assert obj.size == len(data)
    assert obj.etag == hashlib.md5(data).hexdigest()
    counters = store.counters()
    assert counters["events.counted"] == 1
    assert "events.overwrite" not in counters


def test_temporary_names_are_ignored_and_the_rename_counts_under_the_final_name(
    watch: Callable[..., Any], root: Path, reader: Callable[[], Store], wait: Wait
) -> None:
    # Given a watcher with the default ignore patterns
    watch()
    store = reader()
    # When an editor's lock file, a swap file and an upload under .part appear, and the
    # upload is renamed to its final name once complete
    (root / "scope/exp-1").mkdir(parents=True)
    (root / "scope/exp-1/~$notes.docx").write_bytes(b"lock")
    (root / "scope/exp-1/.notes.swp").write_bytes(b"swap")
    write_in_pieces(root / "scope/exp-1/image.tif.part", pieces=3, pause=0.05)
    os.rename(root / "scope/exp-1/image.tif.part", root / "scope/exp-1/image.tif")
    # Then only the final name is ever counted
    wait(lambda: keys_of(store, "scope/exp-1/"), what="image.tif")
    time.sleep(0.8)  # longer than the settle time: anything else would be counted by now
    assert keys_of(store, "scope/exp-1/") == ["scope/exp-1/image.tif"]
    assert store.counters()["events.counted"] == 1


def test_rename_delete_and_rewrite_follow_s3_semantics(
    watch: Callable[..., Any], root: Path, reader: Callable[[], Store], wait: Wait
) -> None:
    # Given a watcher (count threshold 3) and one counted file
    run = watch()
    store = reader()
    prefix = "scope/exp-2/"
    (root / prefix).mkdir(parents=True)
    (root / prefix / "a.txt").write_text("first")
    wait(lambda: keys_of(store, prefix) == [prefix + "a.txt"], what="a.txt")
    # When it is renamed: a delete of the old key and a create of the new one
    os.rename(root / prefix / "a.txt", root / prefix / "b.txt")
    wait(lambda: prefix + "b.txt" in keys_of(store, prefix), what="b.txt")
    wait(lambda: store.counters().get("events.delete") == 1, what="the delete of a.txt")
    assert open_batch(store, prefix).object_count == 2  # a delete never uncounts
    # When b.txt is deleted and written again with new content
    os.remove(root / prefix / "b.txt")
    wait(lambda: store.counters().get("events.delete") == 2, what="the delete of b.txt")
    time.sleep(0.05)
    (root / prefix / "b.txt").write_text("second version")
    # Then the rewrite is an overwrite in the open batch: the count stays
    wait(lambda: store.counters().get("events.overwrite") == 1, what="the overwrite")
    assert open_batch(store, prefix).object_count == 2
    # When a third file arrives, the batch fires by count, with exactly one event
    (root / prefix / "c.txt").write_text("third")
    wait(lambda: run.sink.sent, what="the batch event")
    assert run.triggers() == [(prefix, 3, "count")]


def test_a_restart_neither_loses_nor_repeats_batches(
    watch: Callable[..., Any], root: Path, reader: Callable[[], Store], wait: Wait
) -> None:
    # Given a first run: exp-1 holds 2 of 3 files, exp-2 fired by count
    first = watch()
    store = reader()
    for name in ("a", "b"):
        (root / "scope/exp-1").mkdir(parents=True, exist_ok=True)
        (root / f"scope/exp-1/{name}.dat").write_text(name)
    for name in ("x", "y", "z"):
        (root / "scope/exp-2").mkdir(parents=True, exist_ok=True)
        (root / f"scope/exp-2/{name}.dat").write_text(name)
    wait(lambda: first.sink.sent and len(keys_of(store, "scope/exp-1/")) == 2,
               what="the first run's batches")
    first.stop()
    assert first.triggers() == [("scope/exp-2/", 3, "count")]
    # When files arrive while edp is down, and it starts again on the same store
    (root / "scope/exp-1/c.dat").write_text("c")
    (root / "scope/exp-3").mkdir()
    (root / "scope/exp-3/f.dat").write_text("f")
    time.sleep(0.4)
    second = watch()
    # Then the new files are picked up: exp-1 completes and fires once, exp-3 opens
    wait(lambda: second.sink.sent, what="exp-1's event after the restart")
    wait(lambda: keys_of(store, "scope/exp-3/") == ["scope/exp-3/f.dat"], what="exp-3")
    time.sleep(0.5)
    assert second.triggers() == [("scope/exp-1/", 3, "count")]
    # and nothing counted before is counted again: five duplicates, two batches in all
    assert store.counters()["events.duplicate"] == 5
    assert store.stats()["closed_batches"] == 2


def test_files_counted_days_ago_are_not_counted_again_after_restarts(
    watch: Callable[..., Any], root: Path, reader: Callable[[], Store], wait: Wait
) -> None:
    # Given files written three days ago (an rsync -a of older data), counted by a run
    (root / "scope/old").mkdir(parents=True)
    days_ago = time.time() - 3 * 86400
    for name in ("a", "b", "c"):
        (root / f"scope/old/{name}.dat").write_text(name)
        os.utime(root / f"scope/old/{name}.dat", (days_ago, days_ago))
    first = watch()
    store = reader()
    wait(lambda: first.sink.sent, what="the first run's batch")
    first.stop()
    # When the watcher restarts twice (each start reports every file again; the daemon
    # prunes key memories older than the retention, a day, at its start)
    for _ in range(2):
        before = store.counters().get("events.duplicate", 0)
        again = watch()
        wait(lambda b=before: store.counters().get("events.duplicate", 0) == b + 3,
             what="the files reported again, as duplicates")
        time.sleep(0.3)
        again.stop()
        assert again.sink.sent == []
    # Then the files were counted once: one batch in all
    assert store.stats()["closed_batches"] == 1


def test_files_of_a_batch_whose_history_was_pruned_are_not_counted_again_after_a_restart(
    watch: Callable[..., Any], root: Path, reader: Callable[[], Store], wait: Wait
) -> None:
    # Given a batch fired and delivered by a first run, whose history is then pruned
    # (history_retention: the batch, its files' rows and its event are gone)
    (root / "scope/exp-1").mkdir(parents=True)
    for name in ("a", "b", "c"):
        (root / f"scope/exp-1/{name}.dat").write_text(name)
    first = watch()
    store = reader()
    wait(lambda: first.sink.sent, what="the first run's batch")
    first.stop()
    pruned = store.prune_history(before=time.time() + 1, limit=500)
    assert (pruned.events, pruned.batches) == (1, 1)
    # When the watcher starts again (it reports every file of the folder again)
    again = watch()
    wait(lambda: store.counters().get("events.duplicate", 0) == 3,
         what="the files reported again, as duplicates")
    time.sleep(0.3)
    again.stop()
    # Then they are duplicates still (their keys' memories stay): no second batch
    assert again.sink.sent == []
    assert store.list_batches() == []


def test_a_marker_completed_in_the_same_tick_as_its_data_is_reported_last(
    watch: Callable[..., Any], root: Path, wait: Wait
) -> None:
    # Given a run's data files and its marker with the same modification time (the file
    # system's clock tick), the marker's name sorting before the data's
    (root / "scope/run-1").mkdir(parents=True)
    stamp = time.time_ns() - 10**9
    for name in ("data1.bin", "data2.bin", "_DONE"):
        (root / f"scope/run-1/{name}").write_text(name)
        os.utime(root / f"scope/run-1/{name}", ns=(stamp, stamp))
    # When the watcher reports them
    run = watch(bucket_threshold_event_count=0, bucket_complete_markers=("_DONE",))
    wait(lambda: run.sink.sent, what="the marker's batch")
    time.sleep(0.5)
    # Then one batch holds the data and the marker
    assert run.triggers() == [("scope/run-1/", 3, "marker")]


def test_a_settled_marker_waits_for_its_batch_files_still_settling(root: Path) -> None:
    # Given a run's data file and its marker written in one tick, the data file written
    # again (same modification time) just before the marker settles, so the data file
    # settles a settle period after the marker; and a file of another prefix
    from edp.core.rules import GroupingRules, RuleBook

    rules = RuleBook(default=GroupingRules(complete_markers=("_DONE",)))
    source = FolderSource(root, bucket="lab", settle=0.6, rules=rules)
    source.start()
    folder = root / "scope/run-1"
    folder.mkdir(parents=True)
    stamp = time.time_ns()
    for name in ("data.bin", "_DONE"):
        (folder / name).write_text(name)
        os.utime(folder / name, ns=(stamp, stamp))
    order: list[str] = []
    try:
        early = source.receive(wait=0.4)  # (the source has seen both files meanwhile)
        order += [m.location for m in early.messages]
        source.ack(early)
    except BaseException:
        source.close()
        raise
    (root / "scope/run-2").mkdir()
    (root / "scope/run-2/slow.bin").write_text("slow")
    with (folder / "data.bin").open("a") as handle:
        handle.write("more")
    os.utime(folder / "data.bin", ns=(stamp, stamp))
    # When the source reports until it is quiet
    try:
        for _ in range(6):
            received = source.receive(wait=1.0)
            source.ack(received)
            order += [m.location for m in received.messages]
    finally:
        source.close()
    # Then the marker comes after its data file: it waited for it
    assert order.index("file scope/run-1/_DONE") > order.index("file scope/run-1/data.bin")
    assert sorted(order) == ["file scope/run-1/_DONE", "file scope/run-1/data.bin",
                             "file scope/run-2/slow.bin"]


def test_symbolic_links_out_of_the_root_are_not_followed(root: Path, tmp_path: Path) -> None:
    # Given a tree with a link to a file outside, a link to a folder outside, and a real file
    outside = tmp_path / "outside"
    (outside / "deep").mkdir(parents=True)
    (outside / "secret.txt").write_text("secret")
    (outside / "deep" / "more.txt").write_text("more")
    (root / "scope/exp").mkdir(parents=True)
    (root / "scope/exp/link.txt").symlink_to(outside / "secret.txt")
    (root / "scope/linked").symlink_to(outside / "deep", target_is_directory=True)
    (root / "scope/exp/real.txt").write_text("real")
    source = FolderSource(root, bucket="lab", settle=0.1)
    # When the source reports what it found
    # Then only the real file is an event
    assert reported(source) == ["file scope/exp/real.txt"]


def reported(source: FolderSource, before: Callable[[], object] = lambda: None) -> list[str]:
    """What ``source`` reports (after ``before`` ran), acknowledged, until it is quiet."""
    try:
        before()
        received = source.receive(wait=2.0)
        source.ack(received)
        later = source.receive(wait=0.5)
    finally:
        source.close()
    return [m.location for m in received.messages + later.messages]


def test_files_written_through_a_linked_folder_out_of_the_root_are_not_events(
    root: Path, tmp_path: Path
) -> None:
    # Given a watched tree with a link to a folder outside it
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "scope").mkdir()
    (root / "scope/linked").symlink_to(outside, target_is_directory=True)
    source = FolderSource(root, bucket="lab", settle=0.1)
    assert source.receive(wait=0.5).messages == []

    def write() -> None:
        # When files are written in the outside folder (a watcher may report them under
        # the link's path), and one in the tree
        (outside / "id_rsa").write_text("private")
        (outside / "sub").mkdir()
        (outside / "sub" / "more.txt").write_text("more")
        (root / "scope/real.txt").write_text("real")
        time.sleep(0.5)

    # Then only the file in the tree is an event
    assert reported(source, write) == ["file scope/real.txt"]


def test_unacknowledged_events_come_again(root: Path) -> None:
    # Given a complete file
    (root / "scope/exp").mkdir(parents=True)
    (root / "scope/exp/a.txt").write_text("a")
    source = FolderSource(root, bucket="lab", settle=0.1)
    try:
        first = source.receive(wait=2.0)
        assert len(first.messages) == 1
        # When the step is not acknowledged (it failed), the same events come again
        assert source.receive(wait=0.1) is first
        # When it is acknowledged, they do not
        source.ack(first)
        assert source.receive(wait=0.3).messages == []
    finally:
        source.close()


def test_a_file_unreadable_beside_readable_ones_is_reported_once_readable(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import edp.sources.watch as watch_module

    # Given two complete files, one of which cannot be read yet (written by another
    # user with mode 0600: faked, as the tests may run as root)
    (root / "scope/exp").mkdir(parents=True)
    (root / "scope/exp/a.txt").write_text("a")
    (root / "scope/exp/b.txt").write_text("b")
    readable = watch_module.file_etag
    locked = {"scope/exp/b.txt"}

    def etag(path: Path, size: int, mtime_ns: int) -> str:
        if path.relative_to(root).as_posix() in locked:
            raise PermissionError(13, "Permission denied", str(path))
        return readable(path, size, mtime_ns)

    monkeypatch.setattr(watch_module, "file_etag", etag)
    source = FolderSource(root, bucket="lab", settle=0.1)
    try:
        # When both are picked up together, the readable one is reported and committed
        first = source.receive(wait=2.0)
        assert [m.location for m in first.messages] == ["file scope/exp/a.txt"]
        source.ack(first)
        # When the other becomes readable (a chmod: its content and mtime unchanged)
        locked.clear()
        os.chmod(root / "scope/exp/b.txt", 0o644)
        # Then it is reported (it was not, as it had been taken for reported)
        later = source.receive(wait=3.0)
        assert [m.location for m in later.messages] == ["file scope/exp/b.txt"]
    finally:
        source.close()


def test_local_events_decode_like_s3_notifications() -> None:
    # Given a key with a space, a plus and non-ASCII characters
    body = notification("lab", "scope/run 1/a+b é.txt", deleted=False,
                        mtime_ns=1_700_000_000_123_456_789, size=3, etag="abc")
    # When the decoder reads the notification
    [event] = decode_message(orjson.dumps(body)).events
    # Then the key round-trips, and the sequencer is fixed-width hex of the mtime
    assert event.key == "scope/run 1/a+b é.txt"
    assert event.sequencer == f"{1_700_000_000_123_456_789:0{SEQUENCER_WIDTH}X}"
    assert (event.size, event.etag, event.bucket) == (3, "abc", "lab")
    assert body["Records"][0]["eventSource"] == "edp:local"


def test_edp_watch_cli_prints_events_packages_batches_and_stops_on_ctrl_c(
    root: Path, tmp_path: Path, wait: Wait
) -> None:
    # Given `edp watch` in a subprocess (count threshold 2, settle 0.2 s), packaging into a
    # local Quilt registry when the quilt extra is installed (it is under CI)
    packaging = bool(os.environ.get("CI")) or importlib.util.find_spec("quilt3") is not None
    registry = tmp_path / "registry"
    env = {**os.environ, "HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path / "data"),
           "QUILT_DISABLE_USAGE_METRICS": "true"}
    env.pop("EDP_CONFIG", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "edp", "watch", str(root),
         "--database-url", f"sqlite:///{tmp_path / 'cli.db'}", "--settle", "0.2",
         "--threshold-event-count", "2", *(["--registry", str(registry)] if packaging else [])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path,
        preexec_fn=interruptible,
    )
    lines: queue.Queue[bytes] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        time.sleep(1.0)
        # When two files land in one prefix
        (root / "scope/exp").mkdir(parents=True)
        (root / "scope/exp/1.txt").write_text("1")
        (root / "scope/exp/2.txt").write_text("2")
        # Then one package-objects-ready event is printed on stdout
        event = orjson.loads(lines.get(timeout=20))
        assert event["detail-type"] == "package-objects-ready"
        assert (event["detail"]["bucket"], event["detail"]["prefix"]) == ("lab", "scope/exp/")
        assert event["detail"]["trigger"] == "count"
        # And the batch becomes a package in the registry
        if packaging:
            latest = registry / ".quilt/named_packages/scope/exp/latest"
            wait(latest.is_file, timeout=40, what="the package in the local registry")
        # When a file lands in another prefix, and an operator closes its batch from
        # another shell (no sink of its own)
        (root / "scope/other").mkdir(parents=True)
        (root / "scope/other/1.txt").write_text("1")
        url = f"sqlite:///{tmp_path / 'cli.db'}"

        def open_batch() -> Any:
            store = open_store(url)
            try:
                return next(iter(store.list_batches(state="open")), None)
            finally:
                store.close()

        batch = wait(open_batch, timeout=20, what="the open batch")
        closed = subprocess.run(
            [sys.executable, "-m", "edp", "batches", "close", batch.batch_id,
             "--database-url", url], capture_output=True, env=env, cwd=tmp_path, timeout=60)
        assert closed.returncode == 0, closed.stderr.decode()
        # Then its event comes out of the watcher's stdout, as its own events do
        event = orjson.loads(lines.get(timeout=20))
        assert (event["detail"]["prefix"], event["detail"]["trigger"]) == ("scope/other/",
                                                                          "manual")
    finally:
        # And Ctrl-C stops it cleanly
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err.decode()
    assert b"stopped after 3 file events, 1 batch fired" in err, err.decode()  # (not "1 batches")
    if packaging:  # (and it said so, one line per package)
        assert b"edp watch: package scope/exp (2 files) pushed to " in err, err.decode()
        assert b"edp watch: package scope/other (1 file) pushed to " in err, err.decode()
    # And its worker is recorded as finished: it holds no other worker back, and a
    # replay on that store is not told of live workers
    store = open_store(f"sqlite:///{tmp_path / 'cli.db'}")
    try:
        assert store.worker_finished(watch_worker_id(root)) is True
    finally:
        store.close()


def test_edp_watch_on_a_registry_folder_emits_package_ready(root: Path, tmp_path: Path) -> None:
    # Given `edp watch` on a folder that is a Quilt registry ("lab"), watched for
    # package-ready with no settle delay (no package_local_root given)
    env = {**os.environ, "HOME": str(tmp_path), "EDP_PACKAGE_READY_REGISTRIES": "lab",
           "EDP_PACKAGE_READY_DELAY": "0"}
    for name in ("EDP_CONFIG", "EDP_PACKAGE_LOCAL_ROOT"):
        env.pop(name, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "edp", "watch", str(root), "--settle", "0.2",
         "--database-url", f"sqlite:///{tmp_path / 'ready.db'}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path,
        preexec_fn=interruptible,
    )
    lines: queue.Queue[bytes] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        time.sleep(1.0)
        # When a push writes a revision pointer into it
        pointer = root / ".quilt/named_packages/scope/exp/1700000000"
        pointer.parent.mkdir(parents=True)
        pointer.write_text("cd" * 32)
        # Then a package-ready event names the package and its top hash (its pointer
        # read from the folder itself)
        event = orjson.loads(lines.get(timeout=20))
        assert event["detail-type"] == "package-ready"
        assert (event["detail"]["package-name"], event["detail"]["top-hash"]) == (
            "scope/exp", "cd" * 32)
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err.decode()


def record_watch_starts(monkeypatch: pytest.MonkeyPatch, *,
                        fail_first: bool = False) -> list[bool | None]:
    """Record each start of watchfiles' watcher (its force_polling); the first one
    fails when asked (as inotify does when its watch limit is reached)."""
    import watchfiles

    real_watch, calls = watchfiles.watch, []

    def recorded(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs.get("force_polling"))
        if fail_first and len(calls) == 1:
            raise OSError("inotify watch limit reached")
        return real_watch(*args, **kwargs)

    monkeypatch.setattr(watchfiles, "watch", recorded)
    return calls


def found_within(source: FolderSource, seconds: float) -> list[str]:
    """The locations of the first messages the source gives within ``seconds``."""
    found: list[str] = []
    deadline = time.monotonic() + seconds
    while not found and time.monotonic() < deadline:
        received = source.receive(wait=0.5)
        source.ack(received)
        found = [m.location for m in received.messages]
    return found


def test_a_failing_watcher_falls_back_to_polling_and_rescans(
    root: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a watcher that fails once (as inotify does when its watch limit is reached)
    calls = record_watch_starts(monkeypatch, fail_first=True)
    (root / "scope/exp").mkdir(parents=True)
    source = FolderSource(root, bucket="lab", settle=0.1)
    try:
        source.start()
        # When a file appears
        (root / "scope/exp/late.txt").write_text("late")
        # Then it is still found, by polling after a rescan
        found = found_within(source, 15)
    finally:
        source.close()
    assert found == ["file scope/exp/late.txt"]
    assert calls[:2] == [None, True]
    assert "falling back to polling" in caplog.text


def test_a_file_name_that_is_not_utf8_does_not_switch_the_watcher_to_polling(
    root: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a watcher (the native one), whose starts are recorded
    calls = record_watch_starts(monkeypatch)
    (root / "scope/exp").mkdir(parents=True)
    source = FolderSource(root, bucket="lab", settle=0.1)

    try:
        source.start()
        # When a file whose name is not UTF-8 appears, then a good one
        (root / "scope/exp").joinpath(os.fsdecode(b"bad\xff.dat")).write_bytes(b"x")
        deadline = time.monotonic() + 10
        while len(calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        (root / "scope/exp/good.txt").write_text("good")
        found = found_within(source, 15)
    finally:
        source.close()
    # Then the bad name is skipped, the good file found, and the native watcher was
    # started again rather than replaced by polling
    assert found == ["file scope/exp/good.txt"]
    assert calls[:2] == [None, None], calls
    assert "falling back to polling" not in caplog.text


def test_a_file_dated_in_the_future_does_not_run_the_clock_ahead(
    watch: Callable[..., Any], root: Path, reader: Callable[[], Store], wait: Wait
) -> None:
    # Given a watcher with a 2 s quiet period whose clock may not run ahead of the wall
    # clock (clock_max_ahead 0), and an experiment with an open batch
    run = watch(bucket_threshold_duration=2.0, clock_max_ahead=0)
    store = reader()
    (root / "scope/exp-1").mkdir(parents=True)
    (root / "scope/exp-1/a.dat").write_text("a")
    wait(lambda: open_batch(store, "scope/exp-1/"), what="exp-1's batch to open")
    # When another experiment gets a file whose mtime is in 2100 (a wrong clock)
    future = root / "scope/exp-2/b.dat"
    future.parent.mkdir()
    future.write_text("b")
    os.utime(future, (4102444800, 4102444800))  # 2100-01-01T00:00:00Z
    started = time.time()
    # Then both batches fire by their quiet period, about 2 s after their files: the
    # first is not fired at once by a clock in 2100, the second does not wait for 2100
    wait(lambda: len(run.sink.sent) == 2, timeout=30, what="both batches")
    assert sorted(run.triggers()) == [("scope/exp-1/", 1, "duration"),
                                      ("scope/exp-2/", 1, "duration")]
    [late] = [e for e in run.sink.sent if e["detail"]["prefix"] == "scope/exp-2/"]
    assert late["detail"]["last-event-time"] == "2100-01-01T00:00:00Z"  # its own time, kept
    fired = datetime.fromisoformat(late["time"].replace("Z", "+00:00")).timestamp()
    assert started - 5 < fired < started + 30  # fired now, not in 2100
    assert store.counters()["events.clock_ahead"] >= 1
