"""Several `edp replay` processes on parts of one stream, against one replay of it.

Usage (from the repository root, PostgreSQL at 127.0.0.1:5432, user postgres)::

    .venv/bin/python bench/bench_replay_workers.py [--events 200000] [--workers 4]
        [--repeat 3] [--file STREAM.jsonl] [--seed 11]

The first ``--events`` lines of the stream are dealt at random into ``--workers``
parts (each part in the stream's order), then, in one run, each as a CLI process
whose stdout is kept:

- ``1 process, SQLite``: ``edp replay WHOLE`` (its temporary store);
- ``1 process, PostgreSQL``: ``edp replay WHOLE --database-url ...``;
- ``N processes, PostgreSQL``: ``edp replay PART-i --workers N --worker-id w-i
  --database-url ...``, all at once, on a fresh database.

Each figure is the median of ``--repeat`` runs (wall time from start to the last
process's exit). The batches every variant emitted (bucket, prefix, object count,
trigger, first and last event time, id) must be the same: the script fails if not.
Prints a Markdown report (stdout) for docs/benchmarks.md; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import orjson
import psycopg

ADMIN_URL = os.environ.get("EDP_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
HERE = Path(__file__).parent
EDP = [sys.executable, "-m", "edp", "replay"]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextmanager
def database() -> Iterator[str]:
    """A fresh database, dropped after."""
    name = f"edp_bench_workers_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(urlsplit(ADMIN_URL)._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def batches(output: bytes) -> list[tuple[object, ...]]:
    """The emitted batches, comparable and sorted."""
    found = []
    for line in output.splitlines():
        event = orjson.loads(line)
        d = event["detail"]
        found.append((d["bucket"], d["prefix"], d["object-count"], d["trigger"],
                      d["first-event-time"], d["last-event-time"], d["batch-id"],
                      event["id"]))
    return sorted(found)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDP_")}
    env.update(extra)
    return env


def run(commands: list[tuple[list[str], dict[str, str]]], tmp: Path) -> tuple[float, bytes]:
    """Start every command at once; (seconds until the last ended, all stdout)."""
    outs = [tmp / f"out-{i}" for i in range(len(commands))]
    started = time.perf_counter()
    procs = []
    for (command, env), out in zip(commands, outs, strict=True):
        with out.open("wb") as handle:
            procs.append(subprocess.Popen(command, stdout=handle, stderr=subprocess.PIPE,
                                          env=env))
    for proc in procs:
        _, err = proc.communicate(timeout=3600)
        if proc.returncode != 0:
            raise SystemExit(f"{proc.args} failed: {err.decode()[-2000:]}")
    seconds = time.perf_counter() - started
    return seconds, b"".join(out.read_bytes() for out in outs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=11, help="of the dealing")
    parser.add_argument("--file", type=Path, default=HERE / "stream-1000000-seed1.jsonl")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edp-bench-workers-") as name:
        tmp = Path(name)
        lines: list[bytes] = []
        with args.file.open("rb") as handle:
            for line in handle:
                lines.append(line)
                if len(lines) >= args.events:
                    break
        whole = tmp / "whole.jsonl"
        whole.write_bytes(b"".join(lines))
        rng = random.Random(args.seed)
        dealt: list[list[bytes]] = [[] for _ in range(args.workers)]
        for line in lines:
            dealt[rng.randrange(args.workers)].append(line)
        parts = []
        for i, part in enumerate(dealt):
            parts.append(tmp / f"part-{i}.jsonl")
            parts[-1].write_bytes(b"".join(part))

        def single_sqlite(_: str) -> list[tuple[list[str], dict[str, str]]]:
            return [([*EDP, str(whole)], clean_env())]

        def single_pg(url: str) -> list[tuple[list[str], dict[str, str]]]:
            return [([*EDP, str(whole), "--database-url", url], clean_env())]

        def several(url: str) -> list[tuple[list[str], dict[str, str]]]:
            return [([*EDP, str(part), "--workers", str(args.workers), "--worker-id",
                      f"w-{i}", "--database-url", url], clean_env(EDP_WORKER_TIMEOUT="120"))
                    for i, part in enumerate(parts)]

        variants = [("1 process, SQLite (temporary store)", single_sqlite),
                    ("1 process, PostgreSQL", single_pg),
                    (f"{args.workers} processes, PostgreSQL", several)]
        times: dict[str, list[float]] = {label: [] for label, _ in variants}
        outputs: dict[str, list[tuple[object, ...]]] = {}
        for round_ in range(args.repeat):
            for label, commands in variants:
                with database() as url:
                    seconds, out = run(commands(url), tmp)
                times[label].append(seconds)
                got = batches(out)
                if label in outputs and outputs[label] != got:
                    raise SystemExit(f"{label}: round {round_ + 1} emitted other batches")
                outputs[label] = got
                log(f"round {round_ + 1}: {label}: {seconds:.2f} s, {len(got)} batches")
        reference = outputs[variants[0][0]]
        for label, got in outputs.items():
            if got != reference:
                missing, extra = set(reference) - set(got), set(got) - set(reference)
                raise SystemExit(f"{label}: {len(missing)} batches missing, {len(extra)} extra")
    print(f"- Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores;"
          f" Python {platform.python_version()}; PostgreSQL on the same machine")
    print(f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"- Command: `.venv/bin/python bench/bench_replay_workers.py --events {args.events}"
          f" --workers {args.workers} --repeat {args.repeat}` (first {len(lines):,} lines of"
          f" `{args.file.name}`, dealt at random, seed {args.seed}; medians of"
          f" {args.repeat})")
    print()
    print("| run | lines | seconds | lines/s | batches |")
    print("| --- | --- | --- | --- | --- |")
    for label, _ in variants:
        median = statistics.median(times[label])
        print(f"| {label} | {len(lines):,} | {median:.2f} | {len(lines) / median:,.0f} |"
              f" {len(outputs[label]):,} |")
    print()
    print(f"Every run emitted the same {len(reference):,} batches (ids included).")


if __name__ == "__main__":
    main()
