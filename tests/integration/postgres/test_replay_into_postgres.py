"""`edp replay --database-url postgresql://...` in this process: the decoding child is
forked before the store's connection pool starts its threads, and the replay emits what
a replay on the temporary SQLite store emits."""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

import pytest

from edp.config import Settings
from edp.replay import run_replay
from integration.postgres.streams import make_stream, write_lines

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]

forks: list[int] = []
"""This process's thread count at each fork while a test records them."""
_recording = threading.Event()


def _before_fork() -> None:
    if _recording.is_set():
        forks.append(threading.active_count())


os.register_at_fork(before=_before_fork)  # (cannot be undone: it records only on demand)


def replay(path: Path, database_url: str | None) -> bytes:
    out = io.BytesIO()
    settings = Settings(bucket_threshold_event_count=25, bucket_threshold_duration=120)
    with path.open("rb") as stream:
        summary = run_replay(stream, settings, stdout=out, stderr=io.StringIO(),
                             database_url=database_url)
    assert summary.lines > 0 and not summary.output_error
    return out.getvalue()


def test_the_decoding_child_is_forked_before_the_pool_starts_its_threads(
    tmp_path: Path, pg_url: str
) -> None:
    # Given a stream in a file (a real descriptor: a child decodes it)
    path = write_lines(tmp_path / "stream.jsonl", make_stream(3000, seed=13))
    expected = replay(path, None)
    # When it is replayed into PostgreSQL by this process
    threads = threading.active_count()
    forks.clear()
    _recording.set()
    try:
        got = replay(path, pg_url)
    finally:
        _recording.clear()
    # Then the one fork (the decoding child) found no more threads than before the
    # replay: none of the pool's
    assert forks == [threads]
    # ... and the events are the temporary SQLite store's, line for line
    assert got == expected
    assert got.count(b"\n") > 10
