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

import marshal
import multiprocessing
import os
import time
import traceback
from collections.abc import Iterator
from functools import partial
from multiprocessing.connection import Connection
from typing import Any, BinaryIO

from edp.core.events import EventKind, ObjectEvent
from edp.engine import Message, StepReport, decode_messages
from edp.errors import EdpError
from edp.store.base import DeadLetter

Decoded = tuple[int, list[ObjectEvent], StepReport]
"""A chunk: how many lines it held, their object events, the report of decoding them."""

_message = partial(tuple.__new__, Message)
"""``Message`` from one tuple, without the keyword handling of its constructor (per line)."""
_event = partial(tuple.__new__, ObjectEvent)
_KINDS = (EventKind.CREATED, EventKind.DELETED)


def read_chunks(stream: BinaryIO, size: int) -> Iterator[list[Message]]:
    """Non-blank lines of ``stream`` as messages located by line number, ``size`` at a time."""
    chunk: list[Message] = []
    for number, line in enumerate(stream, start=1):
        if line.isspace() or not line:  # (strip() would copy every line)
            continue
        chunk.append(_message((line, f"line {number}", "replay")))
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def decoded_chunks(stream: BinaryIO, *, size: int, encoded: bool) -> Iterator[Decoded]:
    """The lines of ``stream``, ``size`` at a time, decoded (ahead, by a child process,
    when one can be forked). ``encoded``: EventBridge keys are URL-encoded."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        fd = -1
    if fd < 0 or "fork" not in multiprocessing.get_all_start_methods():
        yield from _here(stream, size, encoded)
        return
    yield from _ahead(fd, size, encoded)


def _here(stream: BinaryIO, size: int, encoded: bool) -> Iterator[Decoded]:
    for chunk in read_chunks(stream, size):
        events, report = decode_messages(chunk, now=time.time(),
                                         eventbridge_keys_encoded=encoded)
        yield len(chunk), events, report


def _ahead(fd: int, size: int, encoded: bool) -> Iterator[Decoded]:
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    own = os.dup(fd)  # the child's own descriptor: it reads the stream from here on
    child = context.Process(target=_decode_into, args=(own, sender, size, encoded),
                            name="edp-replay-decode", daemon=True)
    child.start()
    os.close(own)
    sender.close()
    try:
        while True:
            try:
                # (our own child's bytes, over a pipe no one else holds)
                item = marshal.loads(receiver.recv_bytes())  # noqa: S302
            except EOFError:
                raise EdpError(
                    f"the replay's decoding process ended unexpectedly (exit code "
                    f"{child.exitcode}): the rest of the input was not read"
                ) from None
            if item is None:
                return
            if isinstance(item, str):
                raise EdpError(f"the replay's decoding process failed: {item}")
            lines, events, rejected, counts, messages = item
            report = StepReport(messages=messages, events=len(events),
                                rejected=[DeadLetter(*letter) for letter in rejected])
            report.counts.update(counts)
            yield lines, [_event((b, k, _KINDS[kind], t, e, s, q))
                          for b, k, kind, t, e, s, q in events], report
    finally:
        receiver.close()
        child.join(timeout=5)
        if child.is_alive():  # the engine stopped early (an error): the rest is not needed
            child.terminate()
            child.join(timeout=5)


def _decode_into(fd: int, sender: Connection, size: int, encoded: bool) -> None:
    """The child: decode chunk after chunk, hand each over; ``None`` at the end, or the
    error's traceback as text."""
    _close_inherited(keep={fd, sender.fileno()})
    try:
        with os.fdopen(fd, "rb") as stream:
            for lines, events, report in _here(stream, size, encoded):
                sender.send_bytes(marshal.dumps(_plain(lines, events, report)))
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


def _plain(lines: int, events: list[ObjectEvent], report: StepReport) -> Any:
    """A decoded chunk as marshal's types."""
    return (
        lines,
        [(e.bucket, e.key, e.kind is EventKind.DELETED, e.time, e.etag, e.size, e.sequencer)
         for e in events],
        [(d.source, d.location, d.reason, d.body, d.received_at) for d in report.rejected],
        dict(report.counts),
        report.messages,
    )


__all__ = ["decoded_chunks", "read_chunks"]
