"""Several `edp replay` processes on parts of one stream emit what one replay emits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from edp.store.postgres_tx import APPLY_LOCK
from integration.postgres.streams import ARGS, T0, batches, deal, make_stream, write_lines

pytestmark = pytest.mark.postgres


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without the caller's EDP_* settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDP_")}
    env.update(extra)
    return env


def replay_command(path: Path, url: str | None = None) -> list[str]:
    command = [sys.executable, "-m", "edp", "replay", str(path), *ARGS]
    return command + (["--database-url", url] if url else [])


def single_replay(tmp_path: Path, lines: list[bytes]) -> list[tuple[Any, ...]]:
    """What one process replaying the whole stream emits."""
    whole = write_lines(tmp_path / "whole.jsonl", lines)
    done = subprocess.run(replay_command(whole), capture_output=True, cwd=tmp_path,
                          env=clean_env(), timeout=300, check=True)
    return batches(done.stdout)


def start_worker(
    tmp_path: Path, url: str, index: int, workers: int, *, run: int = 0, timeout: int = 60,
    **settings: str,
) -> subprocess.Popen[bytes]:
    """Start replay worker ``index`` of ``workers`` on part ``index`` (``settings``: more
    EDP_* variables)."""
    part = tmp_path / f"part{index}.jsonl"
    named = f"{url}?application_name=edp-w{index}"
    env = clean_env(EDP_REPLAY_WORKERS=str(workers), EDP_WORKER_ID=f"w{index}",
                    EDP_WORKER_TIMEOUT=str(timeout), **settings)
    with (tmp_path / f"out{index}-{run}").open("wb") as out, \
            (tmp_path / f"err{index}-{run}").open("wb") as err:
        return subprocess.Popen(replay_command(part, named), stdout=out, stderr=err,
                                cwd=tmp_path, env=env)


def emitted(tmp_path: Path) -> bytes:
    """Everything every worker wrote on stdout, killed runs included."""
    return b"".join(p.read_bytes() for p in sorted(tmp_path.glob("out*")))


def wait_all(procs: list[subprocess.Popen[bytes]], tmp_path: Path, timeout: float) -> None:
    """Wait for every worker to exit 0; on a failure none is left running (a worker
    outliving its test would fail a later one)."""
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            errors = b"".join(p.read_bytes() for p in tmp_path.glob("err*")).decode()
            assert code == 0, errors
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)


def run_parts(tmp_path: Path, url: str, lines: list[bytes], workers: int) -> None:
    for index, part in enumerate(deal(lines, workers)):
        write_lines(tmp_path / f"part{index}.jsonl", part)


def replay_in_parts(tmp_path: Path, url: str, lines: list[bytes], workers: int) -> None:
    """``workers`` workers replay their parts of ``lines`` to the end, each exiting 0."""
    run_parts(tmp_path, url, lines, workers)
    wait_all([start_worker(tmp_path, url, i, workers) for i in range(workers)], tmp_path,
             timeout=300)


def single_duplicates(tmp_path: Path, lines: list[bytes]) -> int:
    """How many events one replay of the whole stream finds to be duplicates."""
    whole = write_lines(tmp_path / "whole.jsonl", lines)
    done = subprocess.run(replay_command(whole), capture_output=True, cwd=tmp_path,
                          env=clean_env(), timeout=300, check=True)
    summary = done.stderr.decode().splitlines()[-1]
    return int(summary.split(" duplicates")[0].rsplit(" ", 1)[-1])


def counter(pg_url: str, name: str) -> int:
    """A counter of the shared database, summed over its shards."""
    with psycopg.connect(pg_url) as conn:
        row = conn.execute("SELECT coalesce(sum(value), 0) FROM counters WHERE name = %s",
                           (name,)).fetchone()
    return int(row[0]) if row else 0


def heartbeat_at(pg_url: str, worker: str) -> float:
    """When a worker last published its clock (0 before it did)."""
    with psycopg.connect(pg_url) as conn:
        try:
            row = conn.execute("SELECT heartbeat_at FROM workers WHERE worker_id = %s",
                               (worker,)).fetchone()
        except psycopg.errors.UndefinedTable:  # (no worker has opened the store yet)
            return 0.0
    return float(row[0]) if row else 0.0


def applied_any(pg_url: str) -> bool:
    """Whether the run in progress has applied events (not: nothing queued yet)."""
    with psycopg.connect(pg_url) as conn:
        try:
            row = conn.execute("SELECT max(applied_clock) FROM replay_progress").fetchone()
        except psycopg.errors.UndefinedTable:  # (no worker has opened the store yet)
            return False
    return row is not None and row[0] is not None and row[0] > -1e18


def queued(pg_url: str, worker: str) -> int:
    """How many of a worker's events wait in the replay queue (0 before the workers
    created it)."""
    with psycopg.connect(pg_url) as conn:
        try:
            row = conn.execute("SELECT count(*) FROM replay_queue WHERE worker_id = %s",
                               (worker,)).fetchone()
        except psycopg.errors.UndefinedTable:
            return 0
    return int(row[0]) if row else 0


def check_union(tmp_path: Path, expected: list[tuple[Any, ...]]) -> None:
    got = batches(emitted(tmp_path))
    ids = [row[-1] for row in got]
    assert len(ids) == len(set(ids)), "an event was emitted twice"
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    assert (missing[:5], extra[:5]) == ([], [])
    assert got == expected


def four_workers(tmp_path: Path, pg_url: str, events: int) -> None:
    # Given a stream with 5% re-deliveries, dealt at random into 4 parts
    lines = make_stream(events)
    expected = single_replay(tmp_path, lines)
    run_parts(tmp_path, pg_url, lines, 4)
    # When 4 processes replay the parts into one database at once
    started = time.monotonic()
    procs = [start_worker(tmp_path, pg_url, i, 4) for i in range(4)]
    wait_all(procs, tmp_path, timeout=600)
    print(f"{len(lines)} lines, 4 workers: {time.monotonic() - started:.1f}s")
    # Then together they emitted exactly what one replay of the whole stream emits
    check_union(tmp_path, expected)
    assert {row[4] for row in expected} == {"count", "duration", "max-age", "marker"}


@pytest.mark.timeout(600)
def test_four_workers_emit_what_one_replay_emits(tmp_path: Path, pg_url: str) -> None:
    four_workers(tmp_path, pg_url, 3000)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_four_workers_on_200k_events_emit_what_one_replay_emits(
    tmp_path: Path, pg_url: str
) -> None:
    four_workers(tmp_path, pg_url, 200_000)


def in_transaction(pg_url: str, application: str) -> bool:
    """Whether the worker's connection is inside a step's transaction right now."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
            " AND state = 'idle in transaction' AND xact_start IS NOT NULL", (application,)
        ).fetchone()
    return row is not None and row[0] > 0


def finished(pg_url: str, worker: str) -> bool:
    """Whether a worker has marked itself finished."""
    with psycopg.connect(pg_url) as conn:
        row = conn.execute("SELECT finished FROM workers WHERE worker_id = %s",
                           (worker,)).fetchone()
    return bool(row and row[0])


@pytest.mark.timeout(600)
def test_a_worker_killed_mid_transaction_and_restarted_changes_nothing(
    tmp_path: Path, pg_url: str
) -> None:
    # Given three workers replaying parts of one stream
    lines = make_stream(30_000, seed=3)
    expected = single_replay(tmp_path, lines)
    run_parts(tmp_path, pg_url, lines, 3)
    # (small steps: many transactions, and a part that takes a while)
    procs = [start_worker(tmp_path, pg_url, i, 3, EDP_CHUNK_SIZE="250") for i in range(3)]
    # When worker 1 is killed with SIGKILL while inside a transaction, after a while,
    # before it finished its part (a worker killed after that is one that was done)
    victim = procs[1]
    try:
        # (once it joined the run: the schema's migration is a transaction too)
        deadline = time.monotonic() + 60
        while "w1" not in members(pg_url):
            assert time.monotonic() < deadline, "worker 1 never joined the run"
            time.sleep(0.01)
        while True:
            assert victim.poll() is None, "worker 1 ended before it could be killed"
            assert time.monotonic() < deadline, "worker 1 was never caught inside a transaction"
            if not in_transaction(pg_url, "edp-w1"):
                continue
            victim.send_signal(signal.SIGSTOP)  # frozen: its transaction stays open
            assert not finished(pg_url, "w1"), "worker 1 finished its part before it was caught"
            if in_transaction(pg_url, "edp-w1"):
                break
            victim.send_signal(signal.SIGCONT)
        victim.send_signal(signal.SIGKILL)
        assert victim.wait(timeout=30) == -signal.SIGKILL
    except BaseException:
        for proc in procs:  # (none may outlive the test: it would fail a later one)
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        raise
    # ... and restarted with the same worker id
    procs[1] = start_worker(tmp_path, pg_url, 1, 3, run=1, EDP_CHUNK_SIZE="250")
    wait_all(procs, tmp_path, timeout=500)
    # Then the batches emitted (re-deliveries of one event aside) are an uninterrupted run's
    got = batches(emitted(tmp_path))
    assert sorted(set(got)) == expected
    assert len({row[-1] for row in got}) == len(expected)


@pytest.mark.timeout(300)
def test_a_worker_restarted_after_its_run_completed_says_so_and_changes_nothing(
    tmp_path: Path, pg_url: str
) -> None:
    # Given three workers that replayed a stream to the end
    replay_in_parts(tmp_path, pg_url, make_stream(2000, seed=7), 3)
    before = batches(emitted(tmp_path))
    # When one of them is started again on its part (as if killed before it exited)
    again = start_worker(tmp_path, pg_url, 1, 3, run=1, timeout=2)
    # Then it waits for partners, gives up saying that the run it belonged to may be
    # complete, emits nothing and leaves no member behind
    assert again.wait(timeout=60) == 1
    error = (tmp_path / "err1-1").read_text()
    assert "fewer than 3 workers joined" in error
    assert "began a new run" in error
    assert (tmp_path / "out1-1").read_bytes() == b""
    assert batches(emitted(tmp_path)) == before
    assert members(pg_url) == []


@pytest.mark.timeout(600)
def test_a_second_run_under_the_same_worker_ids_replays_its_own_stream_whole(
    tmp_path: Path, pg_url: str
) -> None:
    # Given three workers that replayed a stream into a database
    replay_in_parts(tmp_path, pg_url, make_stream(2000, seed=5), 3)
    for out in tmp_path.glob("out*"):
        out.unlink()
    # When two of the same ids replay another stream (another bucket), of earlier times
    second = [line.replace(b'"lab"', b'"lab-2"')
              for line in make_stream(2000, seed=6, t0=T0 - 1_000_000)]
    expected = single_replay(tmp_path, second)
    run_parts(tmp_path, pg_url, second, 2)
    wait_all([start_worker(tmp_path, pg_url, i, 2, run=1) for i in range(2)], tmp_path,
             timeout=300)
    # Then they emit every batch of the second stream, fired on its own clock: none of
    # its events was taken for one of the first run's, nor the first run's clock for its
    check_union(tmp_path, expected)


def start_piped(
    tmp_path: Path, url: str, worker: str, workers: int, *, run: int = 0, timeout: int = 60
) -> subprocess.Popen[bytes]:
    """Start a replay worker reading its part from a pipe (the test feeds it)."""
    env = clean_env(EDP_REPLAY_WORKERS=str(workers), EDP_WORKER_ID=worker,
                    EDP_WORKER_TIMEOUT=str(timeout))
    with (tmp_path / f"out-{worker}-{run}").open("wb") as out, \
            (tmp_path / f"err-{worker}-{run}").open("wb") as err:
        return subprocess.Popen(replay_command(Path("-"), url), stdin=subprocess.PIPE,
                                stdout=out, stderr=err, cwd=tmp_path, env=env)


def feed(proc: subprocess.Popen[bytes], lines: list[bytes], *, close: bool = True) -> None:
    assert proc.stdin is not None
    proc.stdin.write(b"".join(line + b"\n" for line in lines))
    proc.stdin.flush()
    if close:
        proc.stdin.close()


def kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a worker (its pipe too)."""
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    if proc.stdin is not None:
        proc.stdin.close()


def wait_for(what: str, ready: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.mark.timeout(600)
def test_a_restarted_worker_queues_nothing_twice(tmp_path: Path, pg_url: str) -> None:
    # Given two workers, w1 with the first half of a stream (and three lines that are
    # not JSON) and w0 with the second
    lines = make_stream(10_000, seed=8)
    expected = single_replay(tmp_path, lines)
    duplicates = single_duplicates(tmp_path, lines)
    # (10,000 lines: whole chunks, all queued before the kill)
    events, second = lines[:9_997], lines[9_997:]
    first = [*events[:100], b"not JSON 1", *events[100:5000], b"not JSON 2", *events[5000:9000],
             b"not JSON 3", *events[9000:]]
    w0, w1 = (start_piped(tmp_path, pg_url, f"w{i}", 2) for i in range(2))
    # ... w1 has queued its part (w0 nothing yet, so nothing is applied)
    feed(w1, first, close=False)
    wait_for("w1's events", lambda: queued(pg_url, "w1") == len(events))
    # When w1 is killed and restarted, and w0's part lets w1's queued events be applied
    # before the restarted w1 reads its part again
    kill(w1)
    killed = time.time()
    again = start_piped(tmp_path, pg_url, "w1", 2, run=1)
    wait_for("w1 to rejoin", lambda: heartbeat_at(pg_url, "w1") > killed)
    feed(w0, second)
    assert w0.wait(timeout=120) == 0
    assert queued(pg_url, "w1") < len(events)  # w0 applied some of them
    feed(again, first)
    assert again.wait(timeout=120) == 0
    # Then every event was applied once (one queued again would count as one more
    # duplicate), every bad line kept once, and the batches are one replay's
    assert counter(pg_url, "events.duplicate") == duplicates
    assert counter(pg_url, "dead_letters") == 3
    with psycopg.connect(pg_url) as conn:
        kept = conn.execute("SELECT source, location FROM dead_letters ORDER BY id").fetchall()
    # (named by the worker whose part holds them: line numbers are the part's)
    assert kept == [("replay:w1", "line 101"), ("replay:w1", "line 5002"),
                    ("replay:w1", "line 9003")]
    assert b"its part resumes after its event 9997" in (tmp_path / "err-w1-1").read_bytes()
    check_union(tmp_path, expected)


@pytest.mark.timeout(600)
def test_a_worker_restarted_long_after_another_finished_completes_the_run(
    tmp_path: Path, pg_url: str
) -> None:
    # Given two workers with a 2 s worker_timeout, each with half a stream
    lines = make_stream(6000, seed=9)
    expected = single_replay(tmp_path, lines)
    parts = deal(lines, 2)
    w0, w1 = (start_piped(tmp_path, pg_url, f"w{i}", 2, timeout=2) for i in range(2))
    # When w0 finishes its part, w1 is killed halfway through its own, and restarted
    # after more than the timeout
    feed(w1, parts[1][: len(parts[1]) // 2], close=False)
    feed(w0, parts[0])
    assert w0.wait(timeout=120) == 0
    kill(w1)
    time.sleep(2.5)
    again = start_piped(tmp_path, pg_url, "w1", 2, run=1, timeout=2)
    feed(again, parts[1])
    # Then the restarted worker rejoined the run (w0 still counts as a member) and
    # completed it: the batches are one replay's
    assert again.wait(timeout=120) == 0, (tmp_path / "err-w1-1").read_text()
    assert b"rejoins the run in progress" in (tmp_path / "err-w1-1").read_bytes()
    check_union(tmp_path, expected)


def members(pg_url: str) -> list[str]:
    """The workers of the replay run in progress."""
    with psycopg.connect(pg_url) as conn:
        try:
            rows = conn.execute("SELECT worker_id FROM replay_progress ORDER BY 1").fetchall()
        except psycopg.errors.UndefinedTable:
            return []
    return [str(row[0]) for row in rows]


@pytest.mark.timeout(600)
def test_the_next_run_waits_until_the_last_one_has_ended(tmp_path: Path, pg_url: str) -> None:
    # Given a run of two workers whose last one is ending it (nothing applied yet: the
    # test holds the apply lock)
    first = make_stream(4000, seed=12)
    second = [line.replace(b'"lab"', b'"lab-2"') for line in make_stream(3000, seed=13)]
    expected_first = single_replay(tmp_path, first)
    (tmp_path / "next").mkdir()
    expected_second = single_replay(tmp_path / "next", second)
    w0, w1 = (start_piped(tmp_path, pg_url, f"w{i}", 2) for i in range(2))
    wait_for("both to join", lambda: members(pg_url) == ["w0", "w1"])
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute("SELECT pg_advisory_lock(%s)", (APPLY_LOCK,))
        parts = deal(first, 2)
        feed(w0, parts[0])
        assert w0.wait(timeout=120) == 0
        feed(w1, parts[1])
        wait_for("w1 to finish its part", lambda: finished(pg_url, "w1"))
        # When the next run's workers start meanwhile
        x0, x1 = (start_piped(tmp_path / "next", pg_url, f"x{i}", 2) for i in range(2))
        time.sleep(2.0)
        # Then they wait: they joined no run yet
        assert members(pg_url) == ["w0", "w1"]
        assert x0.poll() is None and x1.poll() is None
        admin.execute("SELECT pg_advisory_unlock(%s)", (APPLY_LOCK,))
    # ... the ending run applies everything and ends; then the next one runs on its own
    assert w1.wait(timeout=120) == 0
    check_union(tmp_path, expected_first)
    next_parts = deal(second, 2)
    feed(x0, next_parts[0])
    feed(x1, next_parts[1])
    assert x0.wait(timeout=120) == 0 and x1.wait(timeout=120) == 0
    check_union(tmp_path / "next", expected_second)
    assert members(pg_url) == []


@pytest.mark.timeout(600)
def test_a_run_whose_last_worker_died_refuses_strangers_and_a_member_completes_it(
    tmp_path: Path, pg_url: str
) -> None:
    # Given a run of two workers whose last one is killed while ending it
    lines = make_stream(4000, seed=14)
    expected = single_replay(tmp_path, lines)
    parts = deal(lines, 2)
    w0, w1 = (start_piped(tmp_path, pg_url, f"w{i}", 2) for i in range(2))
    wait_for("both to join", lambda: members(pg_url) == ["w0", "w1"])
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute("SELECT pg_advisory_lock(%s)", (APPLY_LOCK,))
        feed(w0, parts[0])
        assert w0.wait(timeout=120) == 0
        feed(w1, parts[1])
        wait_for("w1 to finish its part", lambda: finished(pg_url, "w1"))
        kill(w1)
        admin.execute("SELECT pg_advisory_unlock(%s)", (APPLY_LOCK,))
    # When a worker of another run starts on the database
    (tmp_path / "other").mkdir()
    stranger = start_piped(tmp_path / "other", pg_url, "x0", 2)
    feed(stranger, [])
    # Then it is refused, with the members to restart
    assert stranger.wait(timeout=60) == 1
    error = (tmp_path / "other" / "err-x0-0").read_text()
    assert "did not end" in error and "w0, w1" in error
    # ... and a member restarted with its part completes the run: one replay's batches
    again = start_piped(tmp_path, pg_url, "w0", 2, run=1)
    feed(again, parts[0])
    assert again.wait(timeout=120) == 0, (tmp_path / "err-w0-1").read_text()
    check_union(tmp_path, expected)
    assert members(pg_url) == [] and queued(pg_url, "w1") == 0


@pytest.mark.timeout(600)
def test_workers_that_give_up_waiting_for_a_partner_leave_no_trace(
    tmp_path: Path, pg_url: str
) -> None:
    # Given three workers of which only two start (a 2 s worker_timeout)
    lines = make_stream(3000, seed=21)
    expected = single_replay(tmp_path, lines)
    parts = deal(lines, 3)
    w0, w1 = (start_piped(tmp_path, pg_url, f"w{i}", 3, timeout=2) for i in range(2))
    # Then both give up, saying why, and leave the run (no partner for a later start)
    assert w0.wait(timeout=60) == 1 and w1.wait(timeout=60) == 1
    assert "fewer than 3 workers joined" in (tmp_path / "err-w0-0").read_text()
    assert members(pg_url) == []
    for proc in (w0, w1):
        assert proc.stdin is not None
        proc.stdin.close()
    # ... and when all three start again, they emit one replay's batches
    procs = [start_piped(tmp_path, pg_url, f"w{i}", 3, run=1, timeout=2) for i in range(3)]
    for proc, part in zip(procs, parts, strict=True):
        feed(proc, part)
    assert [proc.wait(timeout=120) for proc in procs] == [0, 0, 0]
    check_union(tmp_path, expected)


@pytest.mark.timeout(600)
def test_a_worker_arriving_after_the_run_applied_events_is_refused(
    tmp_path: Path, pg_url: str
) -> None:
    # Given two workers (--workers 2) that have applied events already: w1 has queued
    # a chunk, w0 its whole part (a step applies only after a chunk is queued, and only
    # what is below both clocks: w0's last chunk, once w1's clock is out)
    lines = make_stream(4000, seed=22)
    parts = deal(lines, 2)
    w0, w1 = (start_piped(tmp_path, pg_url, f"w{i}", 2) for i in range(2))
    feed(w1, parts[1][:2500], close=False)
    wait_for("w1's first chunk", lambda: queued(pg_url, "w1") >= 2000)
    feed(w0, parts[0])
    wait_for("events to be applied", lambda: applied_any(pg_url))
    # When a third starts with --workers 3
    late = start_piped(tmp_path, pg_url, "w2", 3)
    # Then it is refused, saying why; it did not join
    assert late.wait(timeout=60) == 1
    assert "has applied events already" in (tmp_path / "err-w2-0").read_text()
    assert members(pg_url) == ["w0", "w1"]
    assert late.stdin is not None
    late.stdin.close()
    feed(w1, parts[1][2500:])
    assert w0.wait(timeout=120) == 0 and w1.wait(timeout=120) == 0


def test_several_workers_need_a_worker_id(tmp_path: Path, pg_url: str) -> None:
    # Given a part and no worker id
    part = write_lines(tmp_path / "part.jsonl", make_stream(10))
    # When a replay worker starts without one
    done = subprocess.run(replay_command(part, pg_url), capture_output=True, cwd=tmp_path,
                          env=clean_env(EDP_REPLAY_WORKERS="2"), timeout=60, check=False)
    # Then it refuses at once, saying why (a restart could never rejoin its run)
    assert done.returncode != 0
    assert b"needs a worker_id for each worker (--worker-id)" in done.stderr
    assert members(pg_url) == []


@pytest.mark.timeout(600)
def test_a_lost_connection_while_applying_changes_nothing(tmp_path: Path, pg_url: str) -> None:
    # Given three workers replaying parts of one stream
    lines = make_stream(60_000, seed=4)
    expected = single_replay(tmp_path, lines)
    run_parts(tmp_path, pg_url, lines, 3)
    procs = [start_worker(tmp_path, pg_url, i, 3) for i in range(3)]
    # When the connection of whoever holds the apply lock is cut, mid-step, five times
    cuts, deadline = 0, time.monotonic() + 60
    with psycopg.connect(pg_url, autocommit=True) as admin:
        while cuts < 5 and any(p.poll() is None for p in procs):
            assert time.monotonic() < deadline, "nobody was caught holding the apply lock"
            row = admin.execute(
                "SELECT l.pid FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
                " WHERE l.locktype = 'advisory' AND l.objid = %s AND l.granted"
                " AND a.application_name LIKE 'edp-w%%'", (APPLY_LOCK,)
            ).fetchone()
            if row is not None and admin.execute(
                "SELECT pg_terminate_backend(%s)", (row[0],)
            ).fetchone() == (True,):
                cuts += 1
                time.sleep(0.2)
            time.sleep(0.005)
    assert cuts >= 1
    # Then every worker ends well (the step was retried) and the batches are one replay's
    wait_all(procs, tmp_path, timeout=500)
    check_union(tmp_path, expected)


@pytest.mark.timeout(120)
def test_a_second_live_process_under_a_worker_id_is_refused(tmp_path: Path,
                                                            pg_url: str) -> None:
    # Given a replay worker w0 of a run of two, waiting for its partner
    w0 = start_piped(tmp_path, pg_url, "w0", 2)
    try:
        wait_for("w0 to join", lambda: heartbeat_at(pg_url, "w0") > 0)
        # When a second process starts under the same worker id (a copy-paste slip)
        # (its worker_timeout short: it would take the id from a worker silent that long;
        # w0 heartbeats every 0.1 s while it waits for its partner)
        twin = start_piped(tmp_path, pg_url, "w0", 2, run=1, timeout=2)
        feed(twin, [])
        # Then it is refused at once, saying why (it was taken for w0 restarted, and
        # the two queued their parts as one: events were lost)
        assert twin.wait(timeout=60) == 1
        err = (tmp_path / "err-w0-1").read_text()
        assert "worker id 'w0' is in use by another live process" in err, err
        assert w0.poll() is None
    finally:
        kill(w0)
