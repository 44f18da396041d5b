"""``edp replay`` end to end, as a user runs it (SPEC section 6)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from edp_testing import eventbridge, interruptible, jsonl

REPLAY_DIR = Path(__file__).parents[1] / "replay"
SCENARIOS = sorted(p.stem for p in REPLAY_DIR.glob("*.jsonl") if not p.stem.endswith(".expected"))


def edp(*args: str, stdin: bytes | None = None, env: dict[str, str] | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "edp", *args], input=stdin, capture_output=True, timeout=120,
        env={**os.environ, **(env or {})}, cwd=cwd, check=False,
    )


@pytest.mark.parametrize("name", SCENARIOS)
def test_replay_scenarios_match_their_expected_output(name: str) -> None:
    # Given a fixed stream and its hand-checked expected events
    args = (REPLAY_DIR / f"{name}.args").read_text().split()
    expected = (REPLAY_DIR / f"{name}.expected.jsonl").read_bytes()
    # When it is replayed
    result = edp("replay", str(REPLAY_DIR / f"{name}.jsonl"), *args)
    # Then stdout holds exactly the expected events, in firing order
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == expected


def test_replay_reads_stdin_and_reports_rejected_lines_on_stderr() -> None:
    stream = (REPLAY_DIR / "lifecycle.jsonl").read_bytes()
    result = edp("replay", "-", "--threshold-event-count", "3", "--threshold-duration", "60",
                 "--max-batch-age", "200", "--complete-markers", "_DONE", stdin=stream)
    assert result.returncode == 0
    assert result.stdout == (REPLAY_DIR / "lifecycle.expected.jsonl").read_bytes()
    lines = result.stderr.decode().splitlines()
    assert lines[0].startswith("line 6: not JSON")
    assert lines[-1].startswith("edp replay: 22 lines, 20 object events, 7 batches")
    assert "1 rejected" in lines[-1]
    for line in result.stdout.splitlines():  # stdout holds events and nothing else
        assert orjson.loads(line)["detail-type"] == "package-objects-ready"


def test_strict_fails_on_a_rejected_line_but_still_emits() -> None:
    stream = jsonl([eventbridge("a/b/c", 0)]) + b"{broken\n"
    result = edp("replay", "-", "--strict", stdin=stream)
    assert result.returncode == 1
    assert len(result.stdout.splitlines()) == 1
    assert "line 2: not JSON" in result.stderr.decode()


def test_usage_errors_exit_non_zero_with_a_clear_message() -> None:
    result = edp("replay", "-", "--prefix-depth", "two", stdin=b"")
    assert result.returncode == 2
    assert ("bucket_prefix_depth must be an integer >= 0, got 'two' (from option --prefix-depth)"
            in result.stderr.decode())
    assert edp("replay", "/no/such/file.jsonl").returncode == 2


@pytest.mark.parametrize(("args", "names"), [
    (("replay", "-", "--workers", "x"), "replay_workers must be an integer >= 1, got 'x' "
     "(from option --workers)"),
    (("replay", "-", "--threshold-duration", "soon"), "(from option --threshold-duration)"),
    (("watch", ".", "--settle", "x"), "(from option --settle)"),
])
def test_a_bad_option_value_names_the_option_as_spelled(args: tuple[str, ...],
                                                        names: str) -> None:
    # The setting's name and the command's option differ (replay_workers, --workers)
    result = edp(*args, stdin=b"")
    assert result.returncode == 2
    assert names in result.stderr.decode()


def test_empty_input_is_fine() -> None:
    result = edp("replay", "-", stdin=b"\n\n")
    assert result.returncode == 0
    assert result.stdout == b""


def test_flags_override_environment_and_config_file(tmp_path: Path) -> None:
    config = tmp_path / "edp.toml"
    config.write_text("bucket_threshold_event_count = 2\nbucket_prefix_depth = 1\n")
    stream = jsonl([eventbridge(f"i/e/{n}", n) for n in range(4)])
    result = edp("replay", "-", "--config", str(config), stdin=stream,
                 env={"EDP_BUCKET_PREFIX_DEPTH": "2"})
    events = [orjson.loads(line)["detail"] for line in result.stdout.splitlines()]
    assert [(d["prefix"], d["object-count"]) for d in events] == [("i/e/", 2), ("i/e/", 2)]
    result = edp("replay", "-", "--config", str(config), "--threshold-event-count", "3",
                 stdin=stream, env={"EDP_BUCKET_PREFIX_DEPTH": "2"})
    events = [orjson.loads(line)["detail"] for line in result.stdout.splitlines()]
    assert [(d["object-count"], d["trigger"]) for d in events] == [(3, "count"), (1, "duration")]


def test_replay_never_touches_the_configured_database(tmp_path: Path) -> None:
    production = tmp_path / "prod.db"
    stream = jsonl([eventbridge("i/e/a", 0)])
    result = edp("replay", "-", stdin=stream,
                 env={"EDP_DATABASE_URL": f"sqlite:///{production}"}, cwd=tmp_path)
    assert result.returncode == 0
    assert len(result.stdout.splitlines()) == 1
    assert not production.exists()


def test_replay_into_a_named_database_keeps_the_batches(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'replay.db'}"
    stream = jsonl([eventbridge("i/e/a", 0), eventbridge("i/e/b", 1)])
    edp("replay", "-", "--database-url", url, stdin=stream)
    listing = edp("batches", "--state", "closed", "--database-url", url)
    assert listing.returncode == 0
    assert "i/e/" in listing.stdout.decode()


def test_same_stream_same_output() -> None:
    path = str(REPLAY_DIR / "formats.jsonl")
    assert edp("replay", path).stdout == edp("replay", path).stdout


def test_one_stderr_line_per_rejected_input_line() -> None:
    # Given a line whose Records hold two bad records and one good one
    record = {"eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
              "eventTime": "2024-01-01T00:00:00Z",
              "s3": {"bucket": {"name": "b"}, "object": {"key": "i/e/a", "size": 1}}}
    line = orjson.dumps({"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put"},
                                     record, {**record, "eventTime": "soon"}]}) + b"\n"
    result = edp("replay", "-", stdin=line)
    lines = result.stderr.decode().splitlines()
    assert lines[0].startswith("line 1: record 0: ")
    assert "record 2: " in lines[0]
    assert len(lines) == 2  # the line, then the summary
    assert "1 rejected" in lines[1]
    assert len(result.stdout.splitlines()) == 1  # the good record still made its batch


def test_a_byte_order_mark_before_the_first_line_is_not_part_of_it() -> None:
    # Given a stream saved by a tool that writes a UTF-8 byte-order mark first
    stream = b"\xef\xbb\xbf" + jsonl([eventbridge("a/b/1", 0), eventbridge("a/b/2", 1)])
    # When it is replayed, Then its first line is an event like the others
    result = edp("replay", "-", "--strict", stdin=stream)
    assert result.returncode == 0, result.stderr.decode()
    [event] = [orjson.loads(line) for line in result.stdout.splitlines()]
    assert event["detail"]["object-count"] == 2


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_events_that_cannot_be_written_make_replay_fail() -> None:
    # Given standard output that refuses every write
    with open("/dev/full", "wb") as full:
        result = subprocess.run(
            [sys.executable, "-m", "edp", "replay", str(REPLAY_DIR / "formats.jsonl")],
            stdout=full, stderr=subprocess.PIPE, timeout=120, check=False,
        )
    # Then the replay says so and exits non-zero instead of losing the events quietly
    assert result.returncode == 1
    assert b"4 batch event(s) could not be written to standard output" in result.stderr


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_an_event_that_failed_before_the_end_makes_replay_fail_too(tmp_path: Path) -> None:
    # Given a stream whose first batch fires in the middle (its write fails and waits for a
    # retry) and whose last batch fires at the end, when nothing is due for a retry
    stream = tmp_path / "two.jsonl"
    stream.write_bytes(jsonl([eventbridge("a/b/1", 0), eventbridge("c/d/1", 100)]))
    with open("/dev/full", "wb") as full:
        result = subprocess.run(
            [sys.executable, "-m", "edp", "replay", str(stream), "--threshold-duration", "60"],
            stdout=full, stderr=subprocess.PIPE, timeout=120, check=False,
        )
    # Then both events are reported as not written, and the replay fails
    assert result.returncode == 1, result.stderr.decode()
    assert b"2 batch event(s) could not be written to standard output" in result.stderr
    # And the relay logs the failed page once, not once per event
    assert result.stderr.count(b"WARNING edp.relay") == 1


def test_a_replay_into_a_database_with_live_workers_warns(tmp_path: Path) -> None:
    # Given a database where another worker is live
    import time

    from edp.store import open_store

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    store = open_store(url)
    store.heartbeat("someone-else", clock=0.0, now=time.time())
    store.close()
    # When a plain replay (no --workers) writes into it, it says they do not coordinate
    result = edp("replay", "-", "--database-url", url, stdin=jsonl([eventbridge("a/b/c", 0)]))
    assert result.returncode == 0
    assert b"other workers are live on this database" in result.stderr
    # and a replay into its own database says nothing of the kind
    assert b"other workers" not in edp("replay", "-", stdin=jsonl([eventbridge("a/b/c", 0)])).stderr


def test_a_replay_fires_its_batches_at_the_end_unless_a_worker_is_live(tmp_path: Path) -> None:
    # Given a database where a worker is unfinished but silent for longer than the
    # worker timeout (a daemon that crashed), and another with a live one
    import time

    from edp.store import open_store

    urls = {}
    for name, seen in (("crashed", time.time() - 3600), ("live", time.time())):
        urls[name] = f"sqlite:///{tmp_path / name}.db"
        store = open_store(urls[name])
        store.heartbeat(f"{name}-daemon", clock=0.0, now=seen)
        store.close()
    stream = jsonl([eventbridge("a/b/c", 0)])
    # When a plain replay of one event ends on each
    crashed = edp("replay", "-", "--database-url", urls["crashed"], stdin=stream)
    live = edp("replay", "-", "--database-url", urls["live"], stdin=stream)
    # Then the silent worker does not keep the replay's batch from firing at the end,
    # while the live one does (its batches are not the replay's to close)
    assert len(crashed.stdout.splitlines()) == 1
    assert live.stdout == b""


def test_a_replay_into_a_database_of_an_earlier_run_warns(tmp_path: Path) -> None:
    # Given a database that one replay of a stream has filled
    url = f"sqlite:///{tmp_path / 'kept.db'}"
    stream = jsonl([eventbridge(f"lab/run/{n}.csv", n, sequencer=f"0{n}") for n in range(3)])
    first = edp("replay", "-", "--database-url", url, stdin=stream)
    assert len(first.stdout.splitlines()) == 1 and b"warning" not in first.stderr

    # When the same stream is replayed into it again
    again = edp("replay", "-", "--database-url", url, stdin=stream)

    # Then it still runs (the events are duplicates now: no batch), and says why
    assert again.returncode == 0
    assert again.stdout == b""
    assert b"already holds 1 batch(es) of an earlier run" in again.stderr


def test_a_replay_into_a_database_whose_history_was_pruned_still_warns(tmp_path: Path) -> None:
    import sqlite3

    # Given a database that one replay of a stream filled, whose history (the batch and
    # its event, recorded over an hour ago) was pruned since; its key memories stay
    path = tmp_path / "kept.db"
    url = f"sqlite:///{path}"
    stream = jsonl([eventbridge(f"lab/run/{n}.csv", n, sequencer=f"0{n}") for n in range(3)])
    assert len(edp("replay", "-", "--database-url", url, stdin=stream).stdout.splitlines()) == 1
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE outbox SET created_at = created_at - 7200")
    pruned = edp("db", "prune", "--database-url", url, "--older-than", "3600")
    assert b"1 events, 1 batches" in pruned.stdout, pruned.stderr

    # When the same stream is replayed into it again
    again = edp("replay", "-", "--database-url", url, stdin=stream)

    # Then it still says that an earlier run's memories make its events duplicates
    assert again.returncode == 0
    assert again.stdout == b""
    assert b"of an earlier run" in again.stderr, again.stderr


def test_the_summary_says_why_events_were_not_batched() -> None:
    # Given one event of an unwatched bucket and one shallow key, with only bucket b watched
    stream = jsonl([eventbridge("a/b/c.txt", 0, bucket="other"),
                    eventbridge("top.txt", 0, bucket="b")])
    result = edp("replay", "-", stdin=stream, env={"EDP_BUCKETS": "b"})
    # Then the summary counts both, by reason
    summary = result.stderr.decode().splitlines()[-1]
    assert "0 batches (none)" in summary
    assert "2 not batched (shallow-key 1, unwatched-bucket 1)" in summary


def test_a_pretty_printed_file_gets_a_hint_about_json_lines() -> None:
    # Given one message pretty-printed over many lines instead of one per line
    pretty = orjson.dumps(eventbridge("a/b/c.txt", 0), option=orjson.OPT_INDENT_2)
    result = edp("replay", "-", stdin=pretty)
    # Then every line is rejected, and the summary says what the input must be
    assert result.returncode == 0
    assert "the input must be JSON Lines" in result.stderr.decode().splitlines()[-1]
    # while a stream with a few bad lines among good ones gets no such hint
    mixed = edp("replay", "-", stdin=jsonl([eventbridge("a/b/c.txt", 0)]) + b"{oops\n")
    assert "JSON Lines" not in mixed.stderr.decode().splitlines()[-1]


def test_a_rejected_line_is_kept_without_its_line_break(tmp_path: Path) -> None:
    # Given a stream with a bad line (Unix and Windows line breaks), replayed into a store
    url = f"sqlite:///{tmp_path / 'kept.db'}"
    stream = jsonl([eventbridge("a/b/c", 0)]) + b"[1, 2]\n" + b"{oops\r\n"
    assert edp("replay", "-", "--database-url", url, stdin=stream).returncode == 0
    # Then each dead letter's body is the line as written, without the break that ended it
    from edp.store import open_store

    store = open_store(url)
    try:
        letters = store.dead_letters()
    finally:
        store.close()
    assert sorted((d.location, d.body) for d in letters) == [
        ("line 2", "[1, 2]"), ("line 3", "{oops")]


def test_a_bad_database_url_option_says_where_it_came_from() -> None:
    result = edp("replay", "-", "--database-url", "foo", stdin=b"")
    assert result.returncode == 2
    assert result.stderr.decode().strip() == (
        "edp: configuration error: database_url must start with sqlite:///, postgresql:// or "
        "postgres://, got 'foo' (from option --database-url)")


@pytest.mark.timeout(60)
def test_ctrl_c_stops_a_replay_with_the_usual_status_and_no_traceback() -> None:
    import signal
    import time

    # Given a replay reading a stream that has not ended (stdin kept open)
    proc = subprocess.Popen([sys.executable, "-m", "edp", "replay", "-"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=interruptible)
    assert proc.stdin is not None
    proc.stdin.write(jsonl([eventbridge("a/b/c", 0)]))
    proc.stdin.flush()
    time.sleep(2.0)  # (past start-up: the command runs)
    # When Ctrl-C reaches it, Then it stops with 130, one line, no traceback
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err.decode()
    assert err.decode().strip().splitlines()[-1] == "edp: interrupted"
    assert "Traceback" not in err.decode()
