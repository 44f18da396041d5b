"""Operator commands: `edp batches` (show, close, reemit), `edp db`, `edp dead-letters`."""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import closing
from pathlib import Path
from typing import Any

import orjson

from edp.bootstrap import Runtime
from edp.store.migrations import latest_version
from edp_testing import eventbridge

LATEST = latest_version("sqlite")


def edp(*args: str, home: Path, stdin: bytes | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {**os.environ, "HOME": str(home), "XDG_DATA_HOME": str(home / "data"),
            "EDP_JSONL_PATH": str(home / "events.jsonl"), "COLUMNS": "200"}
    base.pop("EDP_DATABASE_URL", None)
    env = {**base, **(env or {})}
    return subprocess.run([sys.executable, "-m", "edp", *args], input=stdin,
                          capture_output=True, timeout=60, env=env, check=False,
                          text=stdin is None)


def jsonl_worker(tmp_path: Path, url: str, jsonl: str, **flags: object) -> Runtime:
    """The runtime of a worker on the store ``url`` relaying to the JSON Lines file
    ``tmp_path / jsonl`` (``flags``: more settings)."""
    from edp.bootstrap import build_runtime
    from edp.config import load_settings

    return build_runtime(load_settings(env={"EDP_JSONL_PATH": str(tmp_path / jsonl)},
                                       flags={"database_url": url, **flags}))


def events(home: Path) -> list[dict[str, object]]:
    path = home / "events.jsonl"
    return [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


def test_operator_workflow(tmp_path: Path) -> None:
    # Given a configured store with one open batch (a replay into it leaves none open,
    # so feed it through the engine API the way a daemon would)
    from edp.engine import Message

    url = f"sqlite:///{tmp_path / 'data' / 'edp' / 'edp.db'}"
    runtime = jsonl_worker(tmp_path, url, "events.jsonl")
    runtime.engine.process([Message(eventbridge("lab/exp 1/a.tif", 100), "line 1"),
                            Message(eventbridge("lab/exp 1/b.tif", 101), "line 2"),
                            Message(b"garbage", "line 3")], now=200)
    runtime.close()

    # When an operator lists batches
    listing = edp("batches", home=tmp_path)
    assert listing.returncode == 0, listing.stderr
    assert "lab/exp 1/" in listing.stdout and "open" in listing.stdout
    assert "duration" in listing.stdout
    # (its deadline, in 1970, is long past: no worker ran since to fire it)
    assert "ago, not fired" in " ".join(listing.stdout.split()), listing.stdout
    # and so does edp status, instead of a negative time to wait
    status = edp("status", home=tmp_path)
    assert status.returncode == 0, status.stderr
    row = next(line for line in status.stdout.splitlines() if "lab/exp 1/" in line)
    assert "passed" in row and "ago" in row and "-" not in row.split("│")[6], row
    listed = orjson.loads(edp("batches", "--json", home=tmp_path).stdout)["batches"]
    assert [(b["prefix"], b["state"], b["object_count"]) for b in listed] == [
        ("lab/exp 1/", "open", 2)]

    # and shows the batch by an id prefix
    from edp.store import open_store

    store = open_store(url)
    [row] = store.list_batches(state="open")
    store.close()
    shown = edp("batches", "show", row.batch_id[:8], "--json", home=tmp_path)
    assert shown.returncode == 0, shown.stderr
    # (the store can be named after the subcommand too, as with every other command)
    elsewhere = edp("batches", "show", row.batch_id[:8], "--json", "--database-url", url,
                    home=tmp_path / "elsewhere")
    assert elsewhere.returncode == 0, elsewhere.stderr
    assert orjson.loads(elsewhere.stdout) == orjson.loads(shown.stdout)
    # (and --json before the subcommand, as `edp batches --json` lists)
    before = edp("batches", "--json", "show", row.batch_id[:8], home=tmp_path)
    assert orjson.loads(before.stdout) == orjson.loads(shown.stdout)
    data = orjson.loads(shown.stdout)
    assert [o["key"] for o in data["objects"]] == ["lab/exp 1/a.tif", "lab/exp 1/b.tif"]
    assert data["batch"]["object_count"] == 2

    # and closes it by hand
    closed = edp("batches", "close", row.batch_id, home=tmp_path)
    assert closed.returncode == 0, closed.stderr
    [event] = events(tmp_path)
    assert event["detail"]["trigger"] == "manual"  # type: ignore[index]
    assert event["detail"]["object-count"] == 2  # type: ignore[index]

    # closing again is a clear error
    again = edp("batches", "close", row.batch_id, home=tmp_path)
    assert again.returncode == 1
    assert "already closed" in again.stderr

    # and re-emits it: the same event, same id, goes out again
    reemit = edp("batches", "reemit", row.batch_id[:10], home=tmp_path)
    assert reemit.returncode == 0, reemit.stderr
    first, second = events(tmp_path)
    assert first == second

    # the bad input was kept with its reason
    letters = edp("dead-letters", home=tmp_path)
    assert "line 3: not JSON" in letters.stdout

    status = edp("db", "status", home=tmp_path)
    assert f"schema version {LATEST} (latest {LATEST})" in status.stdout
    assert "dead_letters: 1" in status.stdout


def test_unknown_batch_id_is_a_clear_error(tmp_path: Path) -> None:
    assert edp("db", "upgrade", home=tmp_path).returncode == 0  # creates the store
    result = edp("batches", "show", "deadbeef", home=tmp_path)
    assert result.returncode == 1
    assert "no batch with id 'deadbeef'" in result.stderr


def test_config_shows_settings_without_secrets(tmp_path: Path) -> None:
    env = {**os.environ, "EDP_DATABASE_URL": "postgresql://edp:s3cret@db.example:5432/edp",
           "EDP_WEBHOOK_SECRET": "hush", "EDP_BUCKET_PREFIX_DEPTH": "3"}
    result = subprocess.run([sys.executable, "-m", "edp", "config"], capture_output=True,
                            text=True, env=env, timeout=60, check=False, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "bucket_prefix_depth = 3" in result.stdout
    assert "postgresql://edp:***@db.example:5432/edp" in result.stdout
    assert "s3cret" not in result.stdout
    assert "hush" not in result.stdout


def test_config_prints_toml_that_says_where_each_value_came_from(tmp_path: Path) -> None:
    import tomllib

    # Given a value from each place: a config file, the environment, a flag
    (tmp_path / "edp.toml").write_text(
        'bucket_threshold_duration = 60\nbucket_ignore_prefixes = ["tmp/"]\n'
        '[bucket_overrides."lab-raw"]\nbucket_threshold_event_count = 5\n')
    env = {**os.environ, "EDP_BUCKET_PREFIX_DEPTH": "3", "EDP_SERVE_TOKEN": "hush"}
    env.pop("EDP_CONFIG", None)
    result = subprocess.run(
        [sys.executable, "-m", "edp", "config", "--threshold-event-count", "7"],
        capture_output=True, text=True, env=env, timeout=60, check=False, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # Then the output is TOML that reads back as the same settings (unset and secret
    # values commented out)
    parsed = tomllib.loads(result.stdout)
    assert parsed["bucket_prefix_depth"] == 3
    assert parsed["bucket_threshold_duration"] == 60.0
    assert parsed["bucket_threshold_event_count"] == 7
    assert parsed["bucket_ignore_prefixes"] == ["tmp/"]
    assert parsed["bucket_overrides"] == {"lab-raw": {"bucket_threshold_event_count": 5}}
    assert "jsonl_path" not in parsed and "serve_token" not in parsed
    assert "hush" not in result.stdout
    # And each line says where its value came from
    lines = result.stdout.splitlines()
    assert "bucket_prefix_depth = 3  # environment variable EDP_BUCKET_PREFIX_DEPTH" in lines
    assert "bucket_threshold_duration = 60.0  # config file edp.toml" in lines
    assert ("bucket_threshold_event_count = 7  # option --threshold-event-count" in lines)
    assert "event_source = \"com.quiltdata.edp\"  # default" in lines
    assert ("# serve_token = (set, not shown: a secret), environment variable "
            "EDP_SERVE_TOKEN") in lines


def test_an_operator_close_without_sink_settings_reaches_the_workers_sinks(
    tmp_path: Path,
) -> None:
    # Given a store whose workers relay to a JSONL sink, with one open batch
    from edp.engine import Message

    url = f"sqlite:///{tmp_path / 'data' / 'edp' / 'edp.db'}"
    runtime = jsonl_worker(tmp_path, url, "events.jsonl")
    runtime.engine.process([Message(eventbridge("lab/e/a", 1), "line 1"),
                            Message(eventbridge("lab/e2/a", 1), "line 2")], now=5)
    [first_id, _] = [r.batch_id for r in runtime.store.list_batches(state="open")]
    runtime.engine.close_batch(first_id, now=6)
    runtime.relay.deliver()
    [second] = runtime.store.list_batches(state="open")
    runtime.close()

    # When an operator closes the other batch from a shell with no sink configured
    env = {**os.environ, "HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path / "data")}
    env.pop("EDP_JSONL_PATH", None)
    closed = subprocess.run([sys.executable, "-m", "edp", "batches", "close", second.batch_id],
                            capture_output=True, text=True, env=env, timeout=60, check=False)
    assert closed.returncode == 0, closed.stderr

    # Then the workers' relay delivers its event to their sink
    runtime = jsonl_worker(tmp_path, url, "events.jsonl")
    assert runtime.relay.deliver().delivered == 1
    runtime.close()
    assert [e["detail"]["trigger"] for e in events(tmp_path)] == ["manual", "manual"]  # type: ignore[index]


def test_an_operator_close_with_no_sink_anywhere_is_refused(tmp_path: Path) -> None:
    from edp.bootstrap import build_runtime
    from edp.config import load_settings
    from edp.engine import Message

    url = f"sqlite:///{tmp_path / 'data' / 'edp' / 'edp.db'}"
    runtime = build_runtime(load_settings(env={}, flags={"database_url": url}))
    runtime.engine.process([Message(eventbridge("lab/e/a", 1), "line 1")], now=5)
    [row] = runtime.store.list_batches(state="open")
    runtime.close()
    env = {**os.environ, "HOME": str(tmp_path), "XDG_DATA_HOME": str(tmp_path / "data")}
    env.pop("EDP_JSONL_PATH", None)
    closed = subprocess.run([sys.executable, "-m", "edp", "batches", "close", row.batch_id],
                            capture_output=True, text=True, env=env, timeout=60, check=False)
    assert closed.returncode == 1
    assert "no sink is configured" in closed.stderr


def test_database_passwords_are_never_shown(tmp_path: Path) -> None:
    # A keyword connection string, and a URL whose password libpq cannot decode
    # (libpq quotes the bad part in its own message)
    keyword = edp("status", "--database-url", "host=db password=s3cret-kw", home=tmp_path)
    assert keyword.returncode == 2 and "s3cret-kw" not in keyword.stderr
    assert "password=***" in keyword.stderr
    # (edp config checks the setting too: such a value is refused, shown redacted)
    shown = edp("config", home=tmp_path, env={"EDP_DATABASE_URL": "host=db password=s3cret-kw"})
    assert shown.returncode == 2 and "s3cret-kw" not in shown.stdout + shown.stderr
    assert "password=***" in shown.stderr
    bad = edp("status", "--database-url", "postgresql://u:s3cr%zzet@127.0.0.1:9/x",
              home=tmp_path)
    assert bad.returncode == 1 and "zzet" not in bad.stderr


def test_config_shows_the_buckets_that_per_bucket_tables_add_to_the_watch_list(
    tmp_path: Path,
) -> None:
    config = tmp_path / "edp.toml"
    config.write_text('buckets = ["a"]\n[bucket_overrides."b"]\nbucket_prefix_depth = 1\n')
    shown = edp("config", "--config", str(config), home=tmp_path)
    assert 'buckets = ["a"]  # config file ' in shown.stdout
    assert "# watched buckets (with the per-bucket tables'): [\"a\", \"b\"]" in shown.stdout


def test_config_shows_only_the_host_of_webhook_urls(tmp_path: Path) -> None:
    shown = edp("config", home=tmp_path,
                env={"EDP_WEBHOOK_URL": "https://hooks.example.com/services/T0/B0/t0k3n"})
    assert 'webhook_url = "https://hooks.example.com/..."  # environment variable' in shown.stdout
    assert "t0k3n" not in shown.stdout


def test_outside_text_cannot_drive_the_terminal(tmp_path: Path) -> None:
    # Given a batch whose key holds an escape sequence (URL-encoded in the event, as S3
    # sends it) and a dead letter whose body holds one raw
    from edp.bootstrap import build_runtime
    from edp.config import load_settings
    from edp.engine import Message

    url = f"sqlite:///{tmp_path / 'data' / 'edp' / 'edp.db'}"
    runtime = build_runtime(load_settings(env={}, flags={"database_url": url}))
    runtime.engine.process([
        Message(eventbridge("lab/exp/\x1b]0;pwned\x07.txt", 100), "line 1"),
        Message(b"\x1b[2Jgarbage", "line 2"),
    ], now=200)
    [row] = runtime.store.list_batches(state="open")
    runtime.close()

    # Then the operator commands print it escaped, never raw
    for args in (("batches",), ("batches", "show", row.batch_id), ("dead-letters",),
                 ("status",)):
        result = edp(*args, home=tmp_path)
        assert result.returncode == 0, result.stderr
        assert "\x1b" not in result.stdout and "\x07" not in result.stdout, args
    shown = edp("batches", "show", row.batch_id, home=tmp_path).stdout
    assert "\\x1b" in shown and "pwned" in shown  # escaped (the table may wrap the key)
    assert "\\x1b[2Jgarbage" in edp("dead-letters", home=tmp_path).stdout


def test_no_dead_letters_is_said(tmp_path: Path) -> None:
    assert edp("db", "upgrade", home=tmp_path).returncode == 0
    assert edp("dead-letters", home=tmp_path).stdout.strip() == "no dead letters"


def test_a_mistyped_store_path_is_an_error_not_a_new_empty_store(tmp_path: Path) -> None:
    # Given a path where no store exists
    missing = tmp_path / "no" / "such" / "edp.db"
    url = f"sqlite:///{missing}"
    # Then read-only commands say so, and create nothing
    for args in (("status",), ("db", "status"), ("batches",), ("dead-letters",)):
        result = edp(*args, "--database-url", url, home=tmp_path)
        assert result.returncode == 1, args
        assert f"no edp database at {missing}" in result.stderr
    assert not missing.parent.parent.exists()
    # while `edp db upgrade` creates it
    assert edp("db", "upgrade", "--database-url", url, home=tmp_path).returncode == 0
    assert edp("db", "status", "--database-url", url, home=tmp_path).returncode == 0


def test_a_file_that_is_not_an_edp_store_is_refused_and_left_as_it_was(
    tmp_path: Path,
) -> None:
    import sqlite3

    # Given another application's SQLite database, and a text file
    other, text = tmp_path / "other.db", tmp_path / "notes.txt"
    with closing(sqlite3.connect(other)) as conn:
        conn.execute("CREATE TABLE foo (x)")
    conn.close()
    text.write_text("not a database\n" * 100)
    for path, message in ((other, "is an SQLite database but not an edp store"),
                          (text, "is not an SQLite database")):
        for args in (("status",), ("batches",), ("dead-letters",), ("db", "status")):
            result = edp(*args, "--database-url", f"sqlite:///{path}", home=tmp_path)
            # Then each read-only command says what the file is, with no traceback
            assert result.returncode == 1, (args, result.stderr)
            assert message in result.stderr and "Traceback" not in result.stderr
    # and no edp table was added to the other application's database
    with closing(sqlite3.connect(other)) as conn:
        tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master")]
    conn.close()
    assert tables == ["foo"]


def test_limits_and_empty_ids_are_refused(tmp_path: Path) -> None:
    assert edp("db", "upgrade", home=tmp_path).returncode == 0
    for args in (("batches", "--limit", "-1"), ("status", "--limit", "0"),
                 ("dead-letters", "--limit", "-5")):
        result = edp(*args, home=tmp_path)
        assert result.returncode == 2 and "Invalid value for '--limit'" in result.stderr
    result = edp("batches", "show", "", home=tmp_path)
    assert result.returncode == 1 and "no batch id given" in result.stderr
    # and list options before a subcommand are an error, not ignored
    for args in (("--limit", "5", "show", "x"), ("--state", "open", "close", "x"),
                 ("--json", "close", "x")):
        result = edp("batches", *args, home=tmp_path)
        assert result.returncode == 2, (args, result.stderr)


def test_a_reemit_with_no_sink_anywhere_is_a_clear_error(tmp_path: Path) -> None:
    # Given a store filled by a replay (its only sink was the replay's own stdout, which
    # no worker relays to)
    url = f"sqlite:///{tmp_path / 'replayed.db'}"
    stream = b"".join(orjson.dumps(eventbridge(f"lab/run/{n}.csv", n)) + b"\n" for n in range(2))
    replayed = edp("replay", "-", "--database-url", url, home=tmp_path, stdin=stream)
    assert replayed.returncode == 0
    batch_id = orjson.loads(replayed.stdout.splitlines()[0])["detail"]["batch-id"]

    # When an operator with no sink configured re-emits its event
    result = edp("batches", "reemit", batch_id, "--database-url", url, home=tmp_path,
                 env={"EDP_JSONL_PATH": ""})

    # Then nothing is queued for nobody: the command says to configure a sink
    assert result.returncode == 1
    assert "the store knows no shared one (stdout and log belong to the process" in result.stderr


def test_a_reemit_without_a_sink_here_waits_for_the_workers_sinks(tmp_path: Path) -> None:
    # Given a store where a worker delivers to a JSON Lines file
    from edp.engine import Message

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    runtime = jsonl_worker(tmp_path, url, "worker.jsonl", bucket_threshold_event_count=1)
    [ready] = runtime.engine.process([Message(eventbridge("lab/run/a.csv", 0), "m1")],
                                     now=10).fired
    runtime.relay.deliver()
    runtime.close()

    # When an operator with no sink configured re-emits its event
    result = edp("batches", "reemit", ready.batch_id, "--database-url", url, home=tmp_path,
                 env={"EDP_JSONL_PATH": ""})

    # Then the command says the event waits in the outbox, and for which sink
    assert result.returncode == 0, result.stderr
    assert "0 deliveries made" in result.stdout
    assert "no sink is configured for this command" in result.stdout
    assert "(jsonl)" in result.stdout


def test_a_reemit_beside_a_watcher_names_the_watchers_stdout(tmp_path: Path) -> None:
    # Given a store with a fired batch, and a watcher's stdout as its only sink
    from edp.engine import Message
    from edp.store import open_store

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    runtime = jsonl_worker(tmp_path, url, "worker.jsonl", bucket_threshold_event_count=1)
    [ready] = runtime.engine.process([Message(eventbridge("lab/run/a.csv", 0), "m1")],
                                     now=10).fired
    runtime.close()
    store = open_store(url)
    try:
        store.forget_sink("jsonl")
        store.register_sinks(["stdout@watch-host-1234/bucket", "stdout@watch-host-99/lab"],
                             now=10)
    finally:
        store.close()

    # When an operator with no sink configured re-emits its event
    result = edp("batches", "reemit", ready.batch_id, "--database-url", url, home=tmp_path,
                 env={"EDP_JSONL_PATH": ""})

    # Then it says the event waits for the stdout of its bucket's watcher (not that no
    # sink is known)
    assert result.returncode == 0, result.stderr
    assert "(stdout@watch-host-1234/bucket)" in result.stdout, result.stdout
    assert "knows none" not in result.stderr, result.stderr


def test_a_replay_into_a_shared_store_sends_nothing_to_the_workers_sinks(
    tmp_path: Path,
) -> None:
    # Given a store where a worker relaying to a JSON Lines file started
    from edp.store import open_store

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    runtime = jsonl_worker(tmp_path, url, "worker.jsonl")
    runtime.engine.register(now=10)
    runtime.close()
    # When a replay (whose only sink is its stdout) fires a batch on that store
    stream = orjson.dumps(eventbridge("lab/run/a.csv", 0)) + b"\n"
    replayed = edp("replay", "-", "--database-url", url, home=tmp_path, stdin=stream)
    assert replayed.returncode == 0, replayed.stderr
    assert len(replayed.stdout.splitlines()) == 1
    # Then nothing of it waits for the worker's sink: a replay is a simulation
    store = open_store(url)
    try:
        assert store.pending("jsonl", limit=10, now=10**10) == []
    finally:
        store.close()

def test_a_closed_batchs_age_is_how_long_it_was_open(tmp_path: Path) -> None:
    # Given the worked example replayed into a store (its batches fired in 2024)
    replay = Path(__file__).parents[1] / "replay"
    url = f"sqlite:///{tmp_path / 'kept.db'}"
    args = (replay / "lifecycle.args").read_text().split()
    assert edp("replay", str(replay / "lifecycle.jsonl"), *args, "--database-url", url,
               home=tmp_path).returncode == 0
    # Then lab/e1/ (opened at 00:00:00, fired by count at 00:00:20) is 20 s old, not years
    listing = edp("batches", "--database-url", url, home=tmp_path).stdout
    [line] = [line for line in listing.splitlines() if "lab/e1/" in line]
    assert "│ 20s " in line, line


def test_db_sinks_lists_known_sinks_and_forget_sink_drops_one(tmp_path: Path) -> None:
    from edp.config import Settings
    from edp.engine import Engine, Message
    from edp.store import open_store
    from edp_testing import eventbridge

    # Given a store where a worker relaying to a webhook started, and a backfill with no
    # sink of its own fired a batch for it that was never delivered
    url = f"sqlite:///{tmp_path / 'edp.db'}"
    store = open_store(url)
    cfg = Settings(database_url=url, bucket_threshold_event_count=1)
    Engine(store, cfg, sinks=["webhook"], worker_id="worker").register(now=1.7e9)
    Engine(store, cfg, sinks=[], worker_id="backfill").process(
        [Message(eventbridge("i/e/a", 1.7e9), "m1")], now=1.7e9)
    store.close()
    # When the sinks are listed
    listed = edp("db", "sinks", "--database-url", url, home=tmp_path)
    # Then the webhook shows with its pending event
    assert listed.returncode == 0, listed.stderr
    assert "webhook: registered 2023-11-14 22:13:20Z, 1 pending, 0 parked, 0 delivered" in (
        listed.stdout)
    # And forgetting an unknown sink is a usage error naming the known ones
    unknown = edp("db", "forget-sink", "sns", "--database-url", url, home=tmp_path)
    assert unknown.returncode == 2 and "known: webhook" in unknown.stderr
    # And a forget that is not confirmed changes nothing
    asked = edp("db", "forget-sink", "webhook", "--database-url", url, home=tmp_path,
                stdin=b"n\n")
    assert asked.returncode == 1 and b"1 pending" in asked.stderr
    assert "webhook" in edp("db", "sinks", "--database-url", url, home=tmp_path).stdout
    # When it is forgotten for good
    done = edp("db", "forget-sink", "webhook", "--yes", "--database-url", url, home=tmp_path)
    # Then its undelivered event is dropped and the store knows no sink
    assert done.returncode == 0, done.stderr
    assert "1 undelivered event(s) dropped" in done.stdout
    assert edp("db", "sinks", "--database-url", url, home=tmp_path).stdout.strip() == (
        "no sinks known")
    status = edp("db", "status", "--database-url", url, home=tmp_path)
    assert "pending_deliveries: 0" in status.stdout


def test_db_sinks_names_the_parked_events_and_their_batches(tmp_path: Path) -> None:
    from edp.config import Settings
    from edp.engine import Engine, Message
    from edp.relay import Relay
    from edp.sinks.base import Failure
    from edp.store import open_store
    from edp_testing import eventbridge

    class Refusing:
        name = "webhook"

        def send(self, entries: Any) -> list[Failure]:
            return [Failure(e.event_id, "HTTP 400: bad request", permanent=True)
                    for e in entries]

    # Given a webhook that refused a batch's event for good (parked)
    url = f"sqlite:///{tmp_path / 'edp.db'}"
    store = open_store(url)
    cfg = Settings(database_url=url, bucket_threshold_event_count=1)
    [ready] = Engine(store, cfg, sinks=["webhook"], worker_id="worker").process(
        [Message(eventbridge("i/e/a", 1.7e9), "m1")], now=1.7e9).fired
    Relay(store, [Refusing()]).deliver()
    store.close()
    # When the sinks are listed, Then the parked event is named, with its batch and why
    listed = edp("db", "sinks", "--database-url", url, home=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "1 parked" in listed.stdout
    assert (f"  webhook: event {ready.event_id} of batch {ready.batch_id} (bucket/i/e/) "
            "after 1 attempt(s): HTTP 400: bad request") in listed.stdout, listed.stdout


def test_db_sinks_says_which_sinks_no_worker_registered(tmp_path: Path) -> None:
    from edp.config import Settings
    from edp.engine import Engine, Message
    from edp.store import open_store
    from edp_testing import eventbridge

    # Given a store a replay printed an event from, on its own stdout (which no worker
    # registers), that was not delivered
    url = f"sqlite:///{tmp_path / 'edp.db'}"
    store = open_store(url)
    cfg = Settings(database_url=url, bucket_threshold_event_count=1)
    Engine(store, cfg, sinks=["stdout"], worker_id="replay").process(
        [Message(eventbridge("i/f/a", 1.7e9), "m1")], now=1.7e9)
    store.close()
    # When the sinks are listed, Then that one says it is known by its deliveries only
    listed = edp("db", "sinks", "--database-url", url, home=tmp_path)
    assert listed.stdout.strip() == ("stdout: not registered (known by its deliveries only), "
                                     "1 pending, 0 parked, 0 delivered")


def test_db_status_reports_pending_migrations_without_applying_them(tmp_path: Path) -> None:
    # Given a store made by the first three migrations only (an older edp's)
    import sqlite3

    from edp.store.migrations import load_migrations

    path = tmp_path / "data" / "edp" / "edp.db"
    path.parent.mkdir(parents=True)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY,"
                 " name TEXT NOT NULL, applied_at REAL NOT NULL)")
    for migration in load_migrations("sqlite")[:3]:
        conn.executescript(migration.sql)
        conn.execute("INSERT INTO schema_migrations VALUES (?, ?, 0)",
                     (migration.version, migration.name))
    conn.close()
    before = path.read_bytes()
    # When `edp db status` runs on it
    status = edp("db", "status", "--database-url", f"sqlite:///{path}", home=tmp_path)
    # Then it reports the version applied and the migrations pending, and changed nothing
    assert status.returncode == 0, status.stderr
    assert f"schema version 3 (latest {LATEST})" in status.stdout
    pending = ", ".join(m.name for m in load_migrations("sqlite")[3:])
    assert pending.startswith("0004_worker_hold.sql, 0005_worker_hold_until.sql, ")
    assert f"pending migrations: {pending} (`edp db upgrade` applies them)" in status.stdout
    assert path.read_bytes() == before
    # And once `edp db upgrade` applied them, status shows none pending, and the figures
    assert edp("db", "upgrade", "--database-url", f"sqlite:///{path}",
               home=tmp_path).returncode == 0
    status = edp("db", "status", "--database-url", f"sqlite:///{path}", home=tmp_path)
    assert f"schema version {LATEST} (latest {LATEST})" in status.stdout
    assert "pending migrations" not in status.stdout
    assert "open_batches: 0" in status.stdout


def test_a_store_newer_than_this_edp_is_refused_and_shown_as_newer(tmp_path: Path) -> None:
    # Given a store that a newer edp migrated (a version this edp does not know)
    import sqlite3

    path = tmp_path / "data" / "edp" / "edp.db"
    url = f"sqlite:///{path}"
    assert edp("db", "upgrade", "--database-url", url, home=tmp_path).returncode == 0
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("INSERT INTO schema_migrations VALUES (99, '0099_future.sql', 0)")
    conn.close()
    # When a worker opens it, Then it refuses, naming both versions
    sample = Path(__file__).parents[2] / "examples" / "sample-stream.jsonl"
    replay = edp("replay", "--database-url", url, str(sample), home=tmp_path)
    assert replay.returncode == 1
    assert "schema version 99, newer than this edp" in replay.stderr
    assert f"up to {LATEST}" in replay.stderr
    # And `edp db status` says it is newer instead of showing figures
    status = edp("db", "status", "--database-url", url, home=tmp_path)
    assert status.returncode == 0, status.stderr
    assert f"schema version 99 (latest {LATEST})" in status.stdout
    assert "newer than this edp" in status.stdout


def test_another_applications_schema_migrations_is_not_taken_for_edps(tmp_path: Path) -> None:
    # Given an SQLite file of another application with its own schema_migrations (Rails')
    import sqlite3

    path = tmp_path / "app.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE schema_migrations (version TEXT PRIMARY KEY)")
    conn.execute("INSERT INTO schema_migrations VALUES ('20240101120000')")
    conn.close()
    before = path.read_bytes()
    url = f"sqlite:///{path}"
    # When an operator's command or a worker is pointed at it
    listed = edp("batches", "--database-url", url, home=tmp_path)
    sample = Path(__file__).parents[2] / "examples" / "sample-stream.jsonl"
    replay = edp("replay", "--database-url", url, str(sample), home=tmp_path)
    # Then both refuse it, saying why, and leave it as it was
    assert listed.returncode == 1
    assert "not an edp store" in listed.stderr
    assert replay.returncode == 1
    assert "has a schema_migrations table but no edp tables" in replay.stderr
    assert path.read_bytes() == before


def test_a_worker_on_a_file_that_is_not_a_database_says_so_in_one_line(tmp_path: Path) -> None:
    # Given a text file where the store should be
    path = tmp_path / "notes.txt"
    path.write_text("not a database\n" * 100)
    sample = Path(__file__).parents[2] / "examples" / "sample-stream.jsonl"
    # When a replay is pointed at it
    replay = edp("replay", "--database-url", f"sqlite:///{path}", str(sample), home=tmp_path)
    # Then it stops with one line naming the file and why, not a traceback
    assert replay.returncode == 1
    assert replay.stderr.strip() == (
        f"edp: error: cannot open SQLite database {path}: file is not a database")
    assert replay.stdout == ""


def test_db_prune_deletes_the_history_older_than_asked(tmp_path: Path) -> None:
    # Given a store with a batch fired, recorded and delivered two hours ago, a dead
    # letter of then, and an open batch
    import time

    from edp.engine import Message

    url = f"sqlite:///{tmp_path / 'data' / 'edp' / 'edp.db'}"
    then = time.time() - 7200
    runtime = jsonl_worker(tmp_path, url, "events.jsonl", bucket_threshold_event_count=2)
    runtime.engine.process([Message(eventbridge("lab/run-1/a", then), "line 1"),
                            Message(eventbridge("lab/run-1/b", then), "line 2"),
                            Message(eventbridge("lab/run-2/a", then), "line 3"),
                            Message(b"garbage", "line 4")], now=then)
    assert runtime.relay.deliver().delivered == 1
    runtime.close()
    # When an operator prunes without saying how old (history_retention is 0 by default)
    refused = edp("db", "prune", home=tmp_path)
    # Then nothing is pruned, and edp says what to give
    assert refused.returncode == 2, refused.stderr
    assert "--older-than" in refused.stderr
    bad = edp("db", "prune", "--older-than", "60", home=tmp_path)
    assert bad.returncode == 2 and "history_retention must be 0 (keep all history) or a " \
        "number of seconds >= 3600, got '60' (from option --older-than)" in bad.stderr, \
        bad.stderr
    # When the history older than an hour is pruned
    done = edp("db", "prune", "--older-than", "3600", home=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ("pruned history older than 3600 s: 1 events, 1 batches, "
                                   "1 dead letters")
    # Then only the open batch is left
    listed = orjson.loads(edp("batches", "--json", home=tmp_path).stdout)["batches"]
    assert [(b["prefix"], b["state"]) for b in listed] == [("lab/run-2/", "open")]
    # and edp status still counts the batch fired (its counters are not history)
    status = edp("status", home=tmp_path).stdout
    assert "batches fired" in status
    assert "1 (count 1)" in next(line for line in status.splitlines() if "batches fired" in line)
    # and the setting does the same (nothing older is left)
    again = edp("db", "prune", home=tmp_path, env={"EDP_HISTORY_RETENTION": "3600"})
    assert again.returncode == 0 and ": 0 events, 0 batches, 0 dead letters" in again.stdout
