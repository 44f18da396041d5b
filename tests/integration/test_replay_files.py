"""Replay input decoded ahead by a child process: the same chunks as in-process, and a
child that dies fails the replay instead of ending its output early."""

from __future__ import annotations

import io
import multiprocessing
import os
import select
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from edp.config import Settings
from edp.core.batching import Batcher
from edp.core.rules import Skip
from edp.errors import EdpError
from edp.sources.files import decoding

FORMATS = Path(__file__).parents[1] / "replay" / "formats.jsonl"


def comparable(chunks: Any) -> list[Any]:
    return [
        (lines, events, report.messages, report.events, dict(report.counts),
         [(d.source, d.location, d.reason, d.body) for d in report.rejected], prefixes)
        for lines, events, report, prefixes in chunks
    ]


def test_the_child_decodes_what_this_process_decodes() -> None:
    # Given the sample of every input format (bad lines, ignored types, blank lines)
    data = FORMATS.read_bytes()
    # When it is decoded and classified by a child (a real file) and in this process
    # (no descriptor)
    classify = Batcher(Settings(bucket_ignore_prefixes=("lab/",)).rule_book()).classify
    with FORMATS.open("rb") as stream, \
            decoding(stream, size=4, encoded=True, classify=classify) as chunks:
        ahead = comparable(chunks)
    with decoding(io.BytesIO(data), size=4, encoded=True, classify=classify) as chunks:
        here = comparable(chunks)
    # Then the chunks are the same, events, dead letters, counts and prefixes included
    # (the reasons not to batch an event too, as the same members of Skip)
    assert ahead == here
    assert any(rejected for *_, rejected, _ in here)
    prefixes = [p for *_, chunk in ahead for p in chunk]
    assert any(type(p) is Skip for p in prefixes)
    assert any(type(p) is str for p in prefixes)
    assert sum(lines for lines, *_ in here) == len([x for x in data.splitlines() if x.strip()])


@contextmanager
def pipe_holding_one_line() -> Iterator[BinaryIO]:
    """A pipe holding one input line, whose writer stays open: more may come."""
    read_end, write_end = os.pipe()
    os.write(write_end, FORMATS.read_bytes().splitlines()[0] + b"\n")
    try:
        with os.fdopen(read_end, "rb") as stream:
            yield stream
    finally:
        os.close(write_end)


def decoding_child() -> Any:
    """The replay's decoding process (there is one at a time)."""
    [child] = [p for p in multiprocessing.active_children() if p.name == "edp-replay-decode"]
    return child


@pytest.mark.timeout(30)
def test_a_decoding_process_that_dies_fails_the_replay() -> None:
    # Given a replay reading a pipe through its decoding child, one line decoded so far
    with pipe_holding_one_line() as stream, \
            decoding(stream, size=1, encoded=True) as chunks:
        lines, *_ = next(chunks)
        assert lines == 1
        # When the child dies while waiting for more
        decoding_child().kill()
        # Then the replay fails, saying so, instead of ending as if the input had
        with pytest.raises(EdpError, match="ended unexpectedly"):
            next(chunks)


@pytest.mark.timeout(30)
def test_stopping_early_ends_a_child_blocked_on_an_open_pipe() -> None:
    # Given a replay reading a pipe that its writer keeps open, one chunk taken
    with pipe_holding_one_line() as stream:
        # When the replay stops before the end of its input (an error, a worker that
        # gave up waiting for its partners)
        with decoding(stream, size=1, encoded=True) as chunks:
            assert next(chunks)[0] == 1
            child = decoding_child()
        # Then its decoding child, blocked reading more, is gone, and the block ended
        # (it used to wait forever on that child)
        assert not child.is_alive()


CHILD_OF_KILLED = """
import os, sys, time
from edp.sources.files import decoding
with open(sys.argv[1], "rb") as stream, decoding(stream, size=10, encoded=True) as chunks:
    next(chunks)
    print("ready", flush=True)
    time.sleep(60)
"""


@pytest.mark.timeout(60)
def test_the_child_of_a_killed_replay_keeps_none_of_its_descriptors(tmp_path: Path) -> None:
    # Given a replay holding a descriptor of its own (as its database connections are)
    # and a decoding child blocked ahead of it on a long input
    big = tmp_path / "big.jsonl"
    big.write_bytes(FORMATS.read_bytes() * 2000)
    read_end, write_end = os.pipe()
    replay = subprocess.Popen([sys.executable, "-c", CHILD_OF_KILLED, str(big)],
                              stdout=subprocess.PIPE, pass_fds=[write_end])
    os.close(write_end)
    try:
        assert replay.stdout is not None
        assert replay.stdout.readline() == b"ready\n"
        # When the replay is killed
        replay.kill()
        replay.wait(timeout=10)
        # Then nobody holds its descriptor any more: the child closed it (a database
        # connection would end with its transaction, instead of holding its locks)
        ready, _, _ = select.select([read_end], [], [], 10)
        assert ready and os.read(read_end, 1) == b"", "the decoding child kept the descriptor"
    finally:
        os.close(read_end)
        replay.kill()
        replay.wait(timeout=10)
        if replay.stdout is not None:
            replay.stdout.close()


CHILD_READING_STDIN = """
import sys, time
from edp.sources.files import decoding
with decoding(sys.stdin.buffer, size=1, encoded=True) as chunks:
    next(chunks)
    print("ready", flush=True)
    time.sleep(60)
"""


@pytest.mark.timeout(60)
def test_a_killed_replay_s_output_ends_even_while_its_child_waits_for_input() -> None:
    # Given a replay whose decoding child waits for more of an input that stays open
    replay = subprocess.Popen([sys.executable, "-c", CHILD_READING_STDIN],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert replay.stdin is not None and replay.stdout is not None
    try:
        replay.stdin.write(FORMATS.read_bytes().splitlines()[0] + b"\n")
        replay.stdin.flush()
        assert replay.stdout.readline() == b"ready\n"
        # When the replay is killed
        replay.kill()
        replay.wait(timeout=10)
        # Then its output ends (whoever reads it is not kept waiting by the child)
        ready, _, _ = select.select([replay.stdout], [], [], 10)
        assert ready and replay.stdout.read() == b"", "the decoding child kept stdout open"
    finally:
        replay.stdin.close()  # (the child, at the end of its input, ends too)
        replay.kill()
        replay.wait(timeout=10)
        replay.stdout.close()
