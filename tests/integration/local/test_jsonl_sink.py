"""The JSONL sink never glues an event to a torn line (a full disk, a killed relay)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edp.sinks.local import JsonlSink
from edp.store.base import OutboxEntry


def entry(seq: int) -> OutboxEntry:
    payload = json.dumps({"id": f"e{seq}", "detail": {"pad": "x" * 100}})
    return OutboxEntry(seq, f"e{seq}", "package-objects-ready", payload, 0.0)


def ids(path: Path) -> list[str]:
    """The event ids of the file's lines (each line must be JSON)."""
    return [json.loads(line)["id"] for line in path.read_bytes().splitlines()]


FULL_DISK = """
import json, resource, signal, sys
from edp.errors import SinkError
from edp.sinks.local import JsonlSink
from edp.store.base import OutboxEntry
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
path, limit = sys.argv[1], int(sys.argv[2])
# the file may grow to ``limit`` bytes: the kernel writes what fits, then fails (EFBIG;
# a full disk does the same with ENOSPC)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
entries = [OutboxEntry(n, f"e{n}", "package-objects-ready",
                       json.dumps({"id": f"e{n}", "detail": {"pad": "x" * 100}}), 0.0)
           for n in (2, 3)]
try:
    JsonlSink(path).send(entries)
except SinkError as exc:
    print(exc)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="needs RLIMIT_FSIZE (POSIX)")
def test_an_append_that_fills_the_disk_is_taken_back(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    sink = JsonlSink(path)
    sink.send([entry(1)])
    limit = path.stat().st_size + 50  # room for half a line
    done = subprocess.run([sys.executable, "-c", FULL_DISK, str(path), str(limit)],
                          capture_output=True, text=True, check=True)
    assert "cannot append" in done.stdout, done.stderr
    assert ids(path) == ["e1"]  # (the half line is gone)
    sink.send([entry(2), entry(3)])  # the relay's retry, space freed meanwhile
    assert ids(path) == ["e1", "e2", "e3"]


def test_a_torn_last_line_is_ended_before_the_next_event(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    # a relay killed in the middle of its append (its events are sent again)
    path.write_bytes(entry(1).payload.encode() + b"\n" + entry(2).payload.encode()[:30])
    JsonlSink(path).send([entry(2)])
    lines = path.read_bytes().splitlines()
    assert len(lines) == 3
    assert json.loads(lines[2])["id"] == "e2"  # whole, on a line of its own
