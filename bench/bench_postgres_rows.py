"""The cost of writing a step's new per-event rows into PostgreSQL, three ways.

Usage (from the repository root, PostgreSQL at 127.0.0.1:5432, user postgres)::

    .venv/bin/python bench/bench_postgres_rows.py [--rows 2000] [--rounds 40]

A step writes one key memory and one object row per new object. On a fresh database
migrated by edp, rounds of ``--rows`` new ``key_memory`` rows (keys, sequencers and
times shaped like the generated stream's) are written, each round one statement and a
COMMIT, the three ways in turn so that each meets the same table sizes:

- ``upsert (JSON rows)``: ``INSERT ... SELECT FROM jsonb_array_elements(...)
  ON CONFLICT (bucket, key) DO UPDATE``, what edp sent for every row before;
- ``insert (JSON rows)``: the same without ``ON CONFLICT``;
- ``COPY``: ``COPY key_memory (...) FROM STDIN``, rows written by psycopg, what edp
  sends for rows its load shows cannot exist yet.

Client and server time together (wall time of the statement and its COMMIT), per row:
the median and the minimum over the rounds. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
import psycopg

from edp.store import open_store

ADMIN_URL = os.environ.get("EDP_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
COLUMNS = "bucket, key, sequencer, seen_at, batch_id, event_time, etag, size"
FROM_JSON = (
    f"INSERT INTO key_memory ({COLUMNS}) SELECT (r->>0)::text, (r->>1)::text, (r->>2)::text,"
    " (r->>3)::float8, (r->>4)::text, (r->>5)::float8, (r->>6)::text, (r->>7)::bigint"
    " FROM jsonb_array_elements(%s::jsonb) WITH ORDINALITY AS j(r, n) ORDER BY n"
)
UPSERT = FROM_JSON + (
    " ON CONFLICT (bucket, key) DO UPDATE SET sequencer = excluded.sequencer,"
    " seen_at = excluded.seen_at, batch_id = excluded.batch_id,"
    " event_time = excluded.event_time, etag = excluded.etag, size = excluded.size"
)
COPY = f"COPY key_memory ({COLUMNS}) FROM STDIN"

Row = tuple[Any, ...]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000, help="rows per statement")
    parser.add_argument("--rounds", type=int, default=40, help="statements per way")
    args = parser.parse_args()
    name = f"edp_bench_rows_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = urlunsplit(urlsplit(ADMIN_URL)._replace(path=f"/{name}"))
    try:
        open_store(url).close()  # edp's schema, migrated
        results = measure(url, args.rows, args.rounds)
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    print(f"- Machine: {platform.machine()}, {os.cpu_count()} cores; Python "
          f"{platform.python_version()}")
    command = " ".join([".venv/bin/python", *sys.argv])
    print(f"- Command: `{command}`")
    print()
    print("| way | us per new row, median | minimum |")
    print("| --- | --- | --- |")
    for way, seconds in results.items():
        per_row = [s / args.rows * 1e6 for s in seconds]
        print(f"| {way} | {statistics.median(per_row):.2f} | {min(per_row):.2f} |")


def measure(url: str, rows: int, rounds: int) -> dict[str, list[float]]:
    counter = iter(range(10**9))

    def new_rows() -> list[Row]:
        out = []
        for _ in range(rows):
            n = next(counter)
            batch_id = str(uuid.uuid5(uuid.NAMESPACE_URL, str(n // 37)))
            out.append(("bucket-a", f"instrument-{n % 97}/exp-{n // 37:07d}/file {n} (x).dat",
                        f"{n:016X}", 1.7e9 + n / 3, batch_id, 1.7e9 + n / 3,
                        f"{n * 7919:032x}", n * 13))
        return out

    with psycopg.connect(url) as conn:

        def json_rows(sql: str) -> Callable[[list[Row]], None]:
            def write(batch: list[Row]) -> None:
                conn.execute(sql, (orjson.dumps(batch).decode(),))
                conn.commit()
            return write

        def copy_rows(batch: list[Row]) -> None:
            with conn.cursor() as cur, cur.copy(COPY) as copy:
                for row in batch:
                    copy.write_row(row)
            conn.commit()

        ways = {"upsert (JSON rows)": json_rows(UPSERT), "insert (JSON rows)": json_rows(FROM_JSON),
                "COPY": copy_rows}
        results: dict[str, list[float]] = {way: [] for way in ways}
        for _ in range(rounds):
            for way, write in ways.items():
                batch = new_rows()
                started = time.perf_counter()
                write(batch)
                results[way].append(time.perf_counter() - started)
    return results


if __name__ == "__main__":
    main()
