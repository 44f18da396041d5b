"""Replay input decoded ahead by a child process: the same chunks as in-process, and a
child that dies fails the replay instead of ending its output early."""

from __future__ import annotations

import io
import multiprocessing
import os
from pathlib import Path
from typing import Any

import pytest

from edp.errors import EdpError
from edp.sources.files import decoded_chunks

FORMATS = Path(__file__).parents[1] / "replay" / "formats.jsonl"


def comparable(chunks: Any) -> list[Any]:
    return [
        (lines, events, report.messages, report.events, dict(report.counts),
         [(d.source, d.location, d.reason, d.body) for d in report.rejected])
        for lines, events, report in chunks
    ]


def test_the_child_decodes_what_this_process_decodes() -> None:
    # Given the sample of every input format (bad lines, ignored types, blank lines)
    data = FORMATS.read_bytes()
    # When it is decoded by a child (a real file) and in this process (no descriptor)
    with FORMATS.open("rb") as stream:
        ahead = comparable(decoded_chunks(stream, size=4, encoded=True))
    here = comparable(decoded_chunks(io.BytesIO(data), size=4, encoded=True))
    # Then the chunks are the same, events, dead letters and counts included
    assert ahead == here
    assert any(rejected for *_, rejected in here)
    assert sum(lines for lines, *_ in here) == len([x for x in data.splitlines() if x.strip()])


@pytest.mark.timeout(30)
def test_a_decoding_process_that_dies_fails_the_replay() -> None:
    # Given a replay reading a pipe through its decoding child, one line decoded so far
    line = FORMATS.read_bytes().splitlines()[0] + b"\n"
    read_end, write_end = os.pipe()
    os.write(write_end, line)
    try:
        with os.fdopen(read_end, "rb") as stream:
            chunks = decoded_chunks(stream, size=1, encoded=True)
            lines, _, _ = next(chunks)
            assert lines == 1
            # When the child dies while waiting for more
            [child] = [p for p in multiprocessing.active_children()
                       if p.name == "edp-replay-decode"]
            child.kill()
            # Then the replay fails, saying so, instead of ending as if the input had
            with pytest.raises(EdpError, match="ended unexpectedly"):
                next(chunks)
    finally:
        os.close(write_end)
