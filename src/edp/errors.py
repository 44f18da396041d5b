"""The exceptions edp raises.

Every error edp raises on purpose derives from :class:`EdpError`, so a caller
can catch the whole family at a boundary::

    EdpError
    ├── ConfigError          a setting has a bad value, or a config file is broken
    ├── DecodeError          an input message is not JSON or of no known format
    ├── StoreError           the store cannot be opened or migrated
    │   ├── TransactionConflict  a step's retry found its reads changed (nothing committed)
    │   └── NotFound         a batch (or other record) asked for by id does not exist
    └── SinkError            a sink refused or failed to deliver an event
        └── PermanentSinkError  retrying will not help (bad request, too large)

Errors carry the context needed to act on them (setting name, line number,
batch id) in their message.
"""

from __future__ import annotations

_CONTROL = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0))}
_CONTROL.update({0x2028: "\\u2028", 0x2029: "\\u2029"})


def one_line(text: str) -> str:
    """``text`` with its line breaks and other control characters escaped (``\\x0a``),
    so that a reason built from an input's own names stays one line of a report."""
    return text.translate(_CONTROL)


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``count`` and ``noun``, in the plural (``nouns``, else ``noun`` + s) unless the
    count is 1: "1 file", "2 files", "0 batches fired" (``plural(0, "batch", "batches")
    + " fired"``)."""
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"


def is_unicode(text: str) -> bool:
    """Whether ``text`` is valid Unicode, i.e. encodes as UTF-8: no lone surrogate (a
    JSON escape such as ``\\udc80``, or a file name that was not UTF-8)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


MAX_LISTED = 10
"""Reasons listed one by one when a message has several bad parts; then a count."""
MAX_REASON = 4000
"""Characters of a reason kept (a dead letter, an answer): a small body with many bad
records must not make a megabyte of text."""


def list_reasons(reasons: list[str]) -> list[str]:
    """The first ``MAX_LISTED`` reasons of a message's bad parts, then how many more."""
    more = len(reasons) - MAX_LISTED
    return reasons[:MAX_LISTED] + ([f"and {more} more"] if more > 0 else [])


def join_reasons(reasons: list[str]) -> str:
    """The reasons of a message's bad parts as one (see :func:`list_reasons`)."""
    return shorten("; ".join(list_reasons(reasons)))


def shorten(reason: str) -> str:
    """``reason``, cut to ``MAX_REASON`` characters (saying so)."""
    if len(reason) <= MAX_REASON:
        return reason
    return f"{reason[:MAX_REASON]}... ({len(reason):,} characters in all)"


class EdpError(Exception):
    """Root of every error edp raises on purpose."""


class ConfigError(EdpError):
    """A setting has a value that is not allowed, or a config file cannot be read."""


class DecodeError(EdpError):
    """An input message could not be decoded into S3 object events.

    ``location`` names where the message came from (``line 12``, ``message id 1f3...``).
    """

    def __init__(self, reason: str, *, location: str = "") -> None:
        # Reasons and locations quote the input's own names (keys, message ids): one line
        # each, whatever they hold (SPEC 6: one stderr line per rejected input line).
        reason, location = one_line(reason), one_line(location)
        self.reason = reason
        self.location = location
        super().__init__(f"{location}: {reason}" if location else reason)


class StoreError(EdpError):
    """The store cannot be opened, migrated or used."""


class TransactionConflict(StoreError):
    """A step could not be retried after a lost connection: what it read had changed
    meanwhile. The retry committed nothing, and running the step again is safe; if
    the connection was lost during COMMIT, the first attempt may have committed (its
    own writes are then what changed the reads): running it again then finds its
    work done."""


class NotFound(StoreError):
    """A record asked for by id does not exist."""


class SinkError(EdpError):
    """A sink failed to deliver an event; the outbox will retry it."""


class PermanentSinkError(SinkError):
    """A sink refused an event for a reason that retrying will not fix."""
