"""JSON Lines files (``edp replay``): chunks of messages, decoded ahead on another core.

Decoding is pure (:func:`~edp.engine.decode_messages`) and is about a third of a
replay's work, so while the engine applies one chunk a child process reads and
decodes the next: the two use the machine's two cores. The child hands each chunk
over as plain tuples (:mod:`marshal`), one chunk ahead at most (the pipe blocks it).
Where no child can be forked, or the stream has no file descriptor (a test's
``BytesIO``), the same chunks are decoded in this process. Either way the engine
gets the same events and reports, in the same order.
"""

from __future__ import annotations

import itertools
import marshal
import multiprocessing
import os
import signal
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from multiprocessing.connection import Connection
from typing import Any, BinaryIO

from edp.core.events import EventKind, ObjectEvent
from edp.core.rules import Skip
from edp.engine import LINE_SOURCE, Message, StepReport, decode_messages
from edp.errors import EdpError
from edp.store.base import DeadLetter

Decoded = tuple[int, list[ObjectEvent], StepReport, list[str | Skip] | None]
"""A chunk: how many lines it held, their object events, the report of decoding them,
and each event's batch prefix (or why it is not batched) when a ``classify`` was given."""
Classify = Callable[[ObjectEvent], "str | Skip"]

_message = partial(tuple.__new__, Message)
"""``Message`` from one tuple, without the keyword handling of its constructor (per line)."""
_event = partial(tuple.__new__, ObjectEvent)
_KINDS = (EventKind.CREATED, EventKind.DELETED)
_SKIPS = tuple(Skip)
_SKIP_INDEX = {skip: index for index, skip in enumerate(_SKIPS)}


def read_chunks(stream: BinaryIO, size: int) -> Iterator[list[Message]]:
    """Non-blank lines of ``stream`` as messages located by line number, ``size`` at a time."""
    chunk: list[Message] = []
    lines = iter(stream)
    first = next(lines, b"")
    # A byte-order mark (some Windows tools write one) is no part of the first line.
    lines = itertools.chain((first.removeprefix(b"\xef\xbb\xbf"),), lines)
    for number, line in enumerate(lines, start=1):
        if line.isspace() or not line:  # (strip() would copy every line)
            continue
        chunk.append(_message((line, f"line {number}", LINE_SOURCE)))
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@contextmanager
def decoding(
    stream: BinaryIO, *, size: int, encoded: bool, classify: Classify | None = None
) -> Iterator[Iterator[Decoded]]:
    """The lines of ``stream``, ``size`` at a time, decoded ahead by a child process
    (in this process where none can be forked, or the stream has no descriptor).
    ``encoded``: EventBridge keys are URL-encoded. ``classify`` (the core's pure
    ``Batcher.classify``) runs with the decoding, off the engine's core.

    The child is forked on entering the block: enter it before opening database
    connections or starting threads (a connection pool's), which a fork would copy
    into the child. It is stopped when the block ends.
    """
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        fd = -1
    if fd < 0 or "fork" not in multiprocessing.get_all_start_methods():
        yield _here(stream, size, encoded, classify)
        return
    ahead = _Ahead(fd, size, encoded, classify)
    try:
        yield ahead.chunks()
    finally:
        ahead.stop()


def _here(
    stream: BinaryIO, size: int, encoded: bool, classify: Classify | None
) -> Iterator[Decoded]:
    for chunk in read_chunks(stream, size):
        events, report = decode_messages(chunk, now=time.time(),
                                         eventbridge_keys_encoded=encoded)
        prefixes = None if classify is None else [classify(event) for event in events]
        yield len(chunk), events, report, prefixes


class _Ahead:
    """The decoding child, forked on creation, and the chunks it hands over."""

    def __init__(self, fd: int, size: int, encoded: bool, classify: Classify | None) -> None:
        context = multiprocessing.get_context("fork")
        self.done = False  # whether the child has sent the end of the input
        self.receiver, sender = context.Pipe(duplex=False)
        own = os.dup(fd)  # the child's own descriptor: it reads the stream from here on
        self.child = context.Process(
            target=_decode_into, args=(own, sender, size, encoded, classify),
            name="edp-replay-decode", daemon=True,
        )
        try:
            self.child.start()
        except BaseException:
            self.receiver.close()
            raise
        finally:
            os.close(own)
            sender.close()

    def chunks(self) -> Iterator[Decoded]:
        """The child's chunks, in order, until the end of the input."""
        while True:
            try:
                # (our own child's bytes, over a pipe no one else holds)
                item = marshal.loads(self.receiver.recv_bytes())  # noqa: S302
            except EOFError:
                raise EdpError(
                    f"the replay's decoding process ended unexpectedly (exit code "
                    f"{self.child.exitcode}): the rest of the input was not read"
                ) from None
            if item is None:
                self.done = True
                return
            if isinstance(item, str):
                raise EdpError(f"the replay's decoding process failed: {item}")
            lines, events, rejected, counts, messages, prefixes = item
            report = StepReport(messages=messages, events=len(events),
                                rejected=[DeadLetter(*letter) for letter in rejected])
            report.counts.update(counts)
            yield lines, [_event((b, k, _KINDS[kind], t, e, s, q))
                          for b, k, kind, t, e, s, q in events], report, (
                None if prefixes is None
                else [p if type(p) is str else _SKIPS[p] for p in prefixes]
            )

    def stop(self) -> None:
        """Close the pipe and wait for the child; one still at work (the engine stopped
        early, an error: the rest is not needed) is terminated, killed if it must be.

        (Not ``join(timeout)``: it waits on the child's sentinel pipe, which the child
        closed with every other descriptor it inherited, and then blocks in
        ``waitpid`` on a child that may be blocked reading an open pipe.)"""
        self.receiver.close()  # a child still sending gets EPIPE and ends
        if not self.done:
            self.child.terminate()
        deadline = time.monotonic() + 5
        while self.child.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if self.child.is_alive():
            self.child.kill()
        self.child.join()


def _decode_into(
    fd: int, sender: Connection, size: int, encoded: bool, classify: Classify | None
) -> None:
    """The child: decode chunk after chunk, hand each over; ``None`` at the end, or the
    error's traceback as text."""
    _close_inherited(keep={fd, sender.fileno()})
    # Nor the replay's output: a child blocked reading an input that stays open would
    # keep a killed replay's stdout (and stderr) open, and whoever reads them waiting.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.close(devnull)
    # Ctrl-C reaches the whole process group: the replay stops this child itself
    # (no second traceback from here).
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        with os.fdopen(fd, "rb") as stream:
            for lines, events, report, prefixes in _here(stream, size, encoded, classify):
                sender.send_bytes(marshal.dumps(_plain(lines, events, report, prefixes)))
        sender.send_bytes(marshal.dumps(None))
    except BrokenPipeError:
        pass  # the replay stopped reading (it failed): nothing to tell
    except Exception:  # noqa: BLE001 (a boundary: the parent raises it with this text)
        sender.send_bytes(marshal.dumps(traceback.format_exc(limit=5)))
    finally:
        sender.close()


def _close_inherited(keep: set[int]) -> None:
    """Close every descriptor the child inherited but does not use (standard streams
    aside). Above all the parent's database connections: if the parent is killed they
    must close with it, or its open transaction (and the locks it holds) would live on
    in the child; and the pipe's reading end, so that the child's next send fails
    (and it ends) once the parent is gone."""
    low = 3
    for fd in [*sorted(keep), os.sysconf("SC_OPEN_MAX")]:
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1


def _plain(
    lines: int, events: list[ObjectEvent], report: StepReport,
    prefixes: list[str | Skip] | None,
) -> Any:
    """A decoded chunk as marshal's types (a :class:`Skip` as its index: marshal takes
    no subclass of ``str``)."""
    return (
        lines,
        [(e.bucket, e.key, e.kind is EventKind.DELETED, e.time, e.etag, e.size, e.sequencer)
         for e in events],
        [(d.source, d.location, d.reason, d.body, d.received_at) for d in report.rejected],
        dict(report.counts),
        report.messages,
        None if prefixes is None else [
            _SKIP_INDEX[p] if type(p) is Skip else p for p in prefixes
        ],
    )


__all__ = ["decoding", "read_chunks"]
