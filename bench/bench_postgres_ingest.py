"""Ingest throughput into PostgreSQL, and the due-batch query with 1,000,000 open batches.

Usage (from the repository root, PostgreSQL at 127.0.0.1:5432, user postgres)::

    .venv/bin/python bench/bench_postgres_ingest.py [--events 200000] [--naive-events 5000]
        [--open-batches 1000000] [--chunk 2000] [--repeat 3] [--file STREAM.jsonl]

Measured in one run, each on a fresh database of its own:

- ``edp, 1 worker``: one process feeding the stream to ``Engine.process`` in steps
  of ``--chunk`` messages (one step = one transaction, as a worker does with the
  messages of its receives), the relay delivering after each step;
- ``edp, 2 workers``: two processes at once, each with half of the stream, dealt
  two ways: at random per event (every prefix is fed by both workers, so their
  steps queue on the same prefix locks) and by prefix (what SQS FIFO message
  groups or per-prefix partitions give);
- ``naive``: one transaction per S3 event, what one Lambda invocation per event
  does (``Engine.process`` on one message), on the first ``--naive-events``
  (each of these four is the median of ``--repeat`` runs);
- ``edp, 1 worker, N open batches``: the 1-worker ingest into a database that
  already holds ``--open-batches`` open batches (in another bucket);
- the due-batch query (``load`` of what is due, as ``Engine.fire_due`` does it)
  with ``--open-batches`` open batches, none due and a page of 5,000 due.

Prints a Markdown report (stdout) for docs/benchmarks.md; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import cProfile
import multiprocessing as mp
import os
import platform
import pstats
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg

from edp.config import Settings
from edp.engine import Engine
from edp.relay import Relay
from edp.sinks.base import Failure
from edp.sources.files import read_chunks
from edp.store import open_store
from edp.store.base import LoadRequest, OutboxEntry

ADMIN_URL = os.environ.get("EDP_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
HERE = Path(__file__).parent


class NullSink:
    """Accepts every event (the relay's work is measured, not a network's)."""

    name = "null"

    def send(self, entries: Sequence[OutboxEntry]) -> Sequence[Failure]:
        return ()


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextmanager
def database(label: str) -> Iterator[str]:
    """A fresh database, dropped after."""
    name = f"edp_bench_{label}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(urlsplit(ADMIN_URL)._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def stream_lines(path: Path, count: int) -> list[bytes]:
    lines = []
    with path.open("rb") as handle:
        for line in handle:
            if line.strip():
                lines.append(line)
                if len(lines) >= count:
                    break
    return lines


def prefix_of(line: bytes) -> bytes:
    """The depth-2 prefix of a generated event (cheap: the key's first two segments)."""
    start = line.index(b'"key":"') + 7
    return b"/".join(line[start : line.index(b'"', start)].split(b"/")[:2])


# -- workers ----------------------------------------------------------------------------
def ingest(url: str, path: Path, chunk: int, worker: str) -> dict[str, float]:
    """Feed the lines of ``path`` to an engine in steps of ``chunk``; the seconds it took."""
    store = open_store(url)
    engine = Engine(store, Settings(database_url=url), sinks=["null"], worker_id=worker)
    relay = Relay(store, [NullSink()])
    events = 0
    started = time.perf_counter()
    with path.open("rb") as stream:
        for messages in read_chunks(stream, chunk):  # replay's reader: streamed, not held
            engine.process(messages, now=time.time())
            relay.deliver()
            events += len(messages)
    seconds = time.perf_counter() - started
    store.close()
    return {"events": events, "seconds": seconds, "rss_mib": peak_rss_mib()}


def peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss, not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _worker(url: str, path: Path, chunk: int, worker: str, barrier: Barrier,
            results: Any) -> None:
    store = open_store(url)  # migrated and connected before the clock starts
    store.heartbeat(worker, clock=-1e18, now=time.time())
    store.close()
    barrier.wait()
    results.put((worker, ingest(url, path, chunk, worker)))


def run_workers(url: str, parts: list[Path], chunk: int) -> dict[str, float]:
    """Ingest each part in its own process, all at once; wall-clock seconds."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(len(parts) + 1)
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(url, part, chunk, f"w{i}", barrier, results))
             for i, part in enumerate(parts)]
    for proc in procs:
        proc.start()
    barrier.wait()
    started = time.perf_counter()
    got = [results.get() for _ in procs]
    seconds = time.perf_counter() - started
    for proc in procs:
        proc.join()
    events = sum(int(r["events"]) for _, r in got)
    return {"events": events, "seconds": seconds,
            "rss_mib": max(r["rss_mib"] for _, r in got)}


def profile_split(url: str, path: Path, chunk: int) -> dict[str, float]:
    """Where one worker's time goes (cProfile): waiting on PostgreSQL, or in Python."""
    profiler = cProfile.Profile()
    profiler.enable()
    total = ingest(url, path, chunk, "profiled")["seconds"]
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    split = {"total": total, "postgres": 0.0, "decode": 0.0, "store_client": 0.0}
    for (filename, _, name), (_, _, tottime, cumtime, _) in stats.items():
        if filename.endswith("psycopg/connection.py") and name == "wait":
            split["postgres"] += cumtime
        elif filename.endswith("edp/decode.py") and name == "decode_message":
            split["decode"] += cumtime
        elif "edp/store/postgres" in filename:
            split["store_client"] += tottime
    return split


# -- the due-batch query ------------------------------------------------------------------
def fill_open_batches(url: str, count: int) -> None:
    """``count`` open batches in bucket ``filler``, deadlines spread over a year."""
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO prefixes (bucket, prefix, last_generation)"
            " SELECT 'filler', 'p' || i || '/', 1 FROM generate_series(1, %s) AS i", (count,)
        )
        conn.execute(
            "INSERT INTO batches (batch_id, bucket, prefix, generation, state, object_count,"
            " first_activity, last_activity, first_event_time, last_event_time, deadline,"
            " deadline_trigger) SELECT md5(i::text), 'filler', 'p' || i || '/', 1, 'open', 1,"
            " t, t, t, t, t + 300, 'duration'"
            " FROM (SELECT i, 2e9 + (i * 31.0) AS t FROM generate_series(1, %s) AS i) s",
            (count,),
        )
        conn.commit()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")


def due_query_ms(url: str, until: float, limit: int, repeat: int = 15) -> tuple[float, int]:
    """Median milliseconds of loading (and locking) what is due, rolled back; how many."""
    store = open_store(url)
    times, found = [], 0
    for _ in range(repeat):
        started = time.perf_counter()
        try:
            with store.transaction() as tx:
                found = len(tx.load(LoadRequest(due_until=until, due_limit=limit)).batches)
                raise _Rollback
        except _Rollback:
            pass
        times.append((time.perf_counter() - started) * 1000)
    store.close()
    return statistics.median(times), found


def find_due_ms(url: str, until: float, limit: int, repeat: int = 15) -> float:
    """Median server time (EXPLAIN ANALYZE) of the indexed query that finds what is due."""
    times = []
    with psycopg.connect(url) as conn:
        for _ in range(repeat):
            plan = conn.execute(
                "EXPLAIN (ANALYZE, FORMAT JSON) SELECT batch_id FROM batches"
                " WHERE state = 'open' AND deadline <= %s ORDER BY deadline LIMIT %s",
                (until, limit),
            ).fetchone()
            assert plan is not None
            times.append(float(plan[0][0]["Execution Time"]))
            assert "batches_due" in str(plan[0][0]["Plan"])
    return statistics.median(times)


class _Rollback(Exception):
    pass


# -- report --------------------------------------------------------------------------------
def row(name: str, result: dict[str, float], base: float | None = None) -> str:
    rate = result["events"] / result["seconds"]
    versus = f"{rate / base:.2f}x" if base else "-"
    return (f"| {name} | {int(result['events']):,} | {result['seconds']:.2f} | {rate:,.0f} |"
            f" {versus} | {result['rss_mib']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--naive-events", type=int, default=5_000)
    parser.add_argument("--open-batches", type=int, default=1_000_000)
    parser.add_argument("--chunk", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--file", type=Path, default=HERE / "stream-1000000-seed1.jsonl")
    args = parser.parse_args()
    if not args.file.exists():
        log(f"generating {args.file}")
        subprocess.run([sys.executable, str(HERE / "gen_stream.py"), str(args.file),
                        "--events", str(max(args.events, 1_000_000)), "--seed", "1"], check=True)
    tmp = Path(tempfile.mkdtemp(prefix="edp-bench-"))
    lines = stream_lines(args.file, args.events)
    rng = random.Random(1)
    files = {name: tmp / f"{name}.jsonl" for name in
             ("all", "naive", "random0", "random1", "prefix0", "prefix1")}
    handles = {name: path.open("wb") for name, path in files.items()}
    for number, line in enumerate(lines):
        handles["all"].write(line)
        if number < args.naive_events:
            handles["naive"].write(line)
        handles[f"random{rng.randrange(2)}"].write(line)
        handles[f"prefix{zlib.crc32(prefix_of(line)) % 2}"].write(line)
    for handle in handles.values():
        handle.close()
    del lines

    def median_run(label: str, parts: list[Path], chunk: int) -> dict[str, float]:
        """The median (by seconds) of ``--repeat`` runs, each on a fresh database."""
        runs = []
        for attempt in range(args.repeat):
            log(f"{label} ({attempt + 1}/{args.repeat})")
            with database("run") as url:
                runs.append(run_workers(url, parts, chunk))
        return sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]

    results: dict[str, dict[str, float]] = {}
    results["naive"] = median_run("naive: one transaction per event", [files["naive"]], 1)
    results["one"] = median_run("edp, 1 worker", [files["all"]], args.chunk)
    results["two_random"] = median_run(
        "edp, 2 workers, dealt at random", [files["random0"], files["random1"]], args.chunk
    )
    results["two_prefix"] = median_run(
        "edp, 2 workers, dealt by prefix", [files["prefix0"], files["prefix1"]], args.chunk
    )
    with database("big") as url:
        open_store(url).close()
        log(f"filling {args.open_batches:,} open batches")
        fill_open_batches(url, args.open_batches)
        page_until = 2e9 + 31.0 * 20_000
        found = {"none": find_due_ms(url, 1e9, 5000), "100": find_due_ms(url, page_until, 100),
                 "5000": find_due_ms(url, page_until, 5000)}
        none_ms, none_found = due_query_ms(url, 1e9, 5000)
        page_ms, page_found = due_query_ms(url, page_until, 5000)
        log("edp, 1 worker, with the open batches")
        results["one_big"] = run_workers(url, [files["all"]], args.chunk)
    with database("prof") as url:
        log("edp, 1 worker, profiled")
        split = profile_split(url, files["all"], args.chunk)
    shutil.rmtree(tmp)

    naive = results["naive"]["events"] / results["naive"]["seconds"]
    one = results["one"]["events"] / results["one"]["seconds"]
    print(f"- Machine: {platform.machine()}, {os.cpu_count()} cores; Python "
          f"{platform.python_version()}; {psycopg_server_version()}")
    print(f"- Date: {time.strftime('%Y-%m-%d')}")
    print(f"- Command: `.venv/bin/python bench/bench_postgres_ingest.py --events {args.events}"
          f" --naive-events {args.naive_events} --open-batches {args.open_batches}"
          f" --chunk {args.chunk} --repeat {args.repeat}`")
    print()
    print("| run | events | seconds | events/s | vs naive | peak RSS per worker (MiB) |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(row("naive: one transaction per event", results["naive"], naive))
    print(row(f"edp, 1 worker, steps of {args.chunk}", results["one"], naive))
    print(row("edp, 2 workers, dealt at random", results["two_random"], naive))
    print(row("edp, 2 workers, dealt by prefix", results["two_prefix"], naive))
    print(row(f"edp, 1 worker, {args.open_batches:,} other open batches", results["one_big"],
              naive))
    print()
    two_r = results["two_random"]["events"] / results["two_random"]["seconds"]
    two_p = results["two_prefix"]["events"] / results["two_prefix"]["seconds"]
    print(f"2 workers vs 1: {two_r / one:.2f}x dealt at random, {two_p / one:.2f}x dealt by"
          " prefix.")
    print()
    print(f"Due batches with {args.open_batches:,} open batches (medians of 15): the indexed"
          f" query that finds them (server time, EXPLAIN ANALYZE) takes {found['none']:.3f} ms"
          f" when none is due, {found['100']:.2f} ms for the first 100 due and"
          f" {found['5000']:.2f} ms for the first 5,000; loading and locking a page as a"
          f" worker does (`Transaction.load`, round trips included) takes {none_ms:.2f} ms"
          f" ({none_found} due) and {page_ms:.2f} ms for a page of {page_found:,}.")
    print()
    rest = split["total"] - split["postgres"] - split["decode"] - split["store_client"]
    print(f"Profile of the 1-worker run (cProfile, {split['total']:.1f} s with its overhead):"
          f" waiting on PostgreSQL {split['postgres'] / split['total']:.0%}, decoding"
          f" {split['decode'] / split['total']:.0%}, the PostgreSQL store's own Python"
          f" {split['store_client'] / split['total']:.0%}, the rest (engine, batcher,"
          f" envelopes, relay) {rest / split['total']:.0%}.")


def psycopg_server_version() -> str:
    with psycopg.connect(ADMIN_URL) as conn:
        version = conn.info.server_version
    return f"PostgreSQL {version // 10000}.{version % 100}"


if __name__ == "__main__":
    main()
