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

from integration.postgres.streams import ARGS, batches, deal, make_stream, write_lines

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
    tmp_path: Path, url: str, index: int, workers: int, *, run: int = 0
) -> subprocess.Popen[bytes]:
    """Start replay worker ``index`` of ``workers`` on part ``index``."""
    part = tmp_path / f"part{index}.jsonl"
    named = f"{url}?application_name=edp-w{index}"
    env = clean_env(EDP_REPLAY_WORKERS=str(workers), EDP_WORKER_ID=f"w{index}",
                    EDP_WORKER_TIMEOUT="60")
    with (tmp_path / f"out{index}-{run}").open("wb") as out, \
            (tmp_path / f"err{index}-{run}").open("wb") as err:
        return subprocess.Popen(replay_command(part, named), stdout=out, stderr=err,
                                cwd=tmp_path, env=env)


def emitted(tmp_path: Path) -> bytes:
    """Everything every worker wrote on stdout, killed runs included."""
    return b"".join(p.read_bytes() for p in sorted(tmp_path.glob("out*")))


def wait_all(procs: list[subprocess.Popen[bytes]], tmp_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for proc in procs:
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        errors = b"".join(p.read_bytes() for p in tmp_path.glob("err*")).decode()
        assert code == 0, errors


def run_parts(tmp_path: Path, url: str, lines: list[bytes], workers: int) -> None:
    for index, part in enumerate(deal(lines, workers)):
        write_lines(tmp_path / f"part{index}.jsonl", part)


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


@pytest.mark.timeout(600)
def test_a_worker_killed_mid_transaction_and_restarted_changes_nothing(
    tmp_path: Path, pg_url: str
) -> None:
    # Given three workers replaying parts of one stream
    lines = make_stream(30_000, seed=3)
    expected = single_replay(tmp_path, lines)
    run_parts(tmp_path, pg_url, lines, 3)
    procs = [start_worker(tmp_path, pg_url, i, 3) for i in range(3)]
    # When worker 1 is killed with SIGKILL while inside a transaction, after a while
    victim = procs[1]
    time.sleep(0.5)
    deadline = time.monotonic() + 60
    while True:
        assert victim.poll() is None, "worker 1 ended before it could be killed"
        assert time.monotonic() < deadline, "worker 1 was never caught inside a transaction"
        if not in_transaction(pg_url, "edp-w1"):
            continue
        victim.send_signal(signal.SIGSTOP)  # frozen: its transaction stays open
        if in_transaction(pg_url, "edp-w1"):
            break
        victim.send_signal(signal.SIGCONT)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=30) == -signal.SIGKILL
    # ... and restarted with the same worker id
    procs[1] = start_worker(tmp_path, pg_url, 1, 3, run=1)
    wait_all(procs, tmp_path, timeout=500)
    # Then the batches emitted (re-deliveries of one event aside) are an uninterrupted run's
    got = batches(emitted(tmp_path))
    assert sorted(set(got)) == expected
    assert len({row[-1] for row in got}) == len(expected)


@pytest.mark.timeout(600)
def test_a_second_run_under_the_same_worker_ids_replays_its_own_stream_whole(
    tmp_path: Path, pg_url: str
) -> None:
    # Given two workers that replayed a stream into a database
    first = make_stream(2000, seed=5)
    run_parts(tmp_path, pg_url, first, 2)
    wait_all([start_worker(tmp_path, pg_url, i, 2) for i in range(2)], tmp_path, timeout=300)
    for out in tmp_path.glob("out*"):
        out.unlink()
    # When two workers with the same ids replay another stream (another bucket) into it
    second = [line.replace(b'"lab"', b'"lab-2"') for line in make_stream(2000, seed=6)]
    expected = single_replay(tmp_path, second)
    run_parts(tmp_path, pg_url, second, 2)
    wait_all([start_worker(tmp_path, pg_url, i, 2, run=1) for i in range(2)], tmp_path,
             timeout=300)
    # Then they emit every batch of the second stream: none of its events was taken
    # for one of the first run's, already applied
    check_union(tmp_path, expected)
