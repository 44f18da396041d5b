"""A local folder tree as a bucket: file-system changes become S3 object events.

:class:`FolderSource` is a daemon :class:`~edp.daemon.Source`. A background thread
follows the tree with ``watchfiles`` (inotify, FSEvents, ... or polling); the
source turns what it saw into S3 Event Notification ``Records`` (``eventSource``
``edp:local``) that the engine decodes like any other input:

* a file is *created* once it is complete: its size and modification time have not
  changed for ``settle`` seconds (a file last modified longer ago than that, such as
  one found by the start-up scan or renamed into the tree, is complete at once);
* names matching ``ignore`` (``*.part``, ``*.tmp``, ``~$*`` ...) are never reported,
  so "write a temporary name, then rename" uploads count once, under the final name;
* a rename is a delete of the old key and a create of the new one;
* a delete is a delete (of every known file under a deleted or moved-away folder).

The sequencer of a created event is the file's modification time in nanoseconds,
as fixed-width hex; a delete's is one more than the deleted version's. At start
the whole tree is scanned: files that appeared while edp was down become created
events, and files already counted are duplicates by sequencer, so a restart
neither loses nor repeats batches. Keys are POSIX paths relative to the root;
symbolic links that lead out of the root are never followed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote_plus

from edp.core.rules import RuleBook, watch_ignored
from edp.daemon import Received
from edp.engine import Message
from edp.errors import ConfigError, is_unicode, plural

if TYPE_CHECKING:
    from edp.config import Settings

log = logging.getLogger(__name__)

DEFAULT_IGNORE = ("*.part", "*.tmp", "~$*", ".*.swp")
MD5_LIMIT = 64 * 1024 * 1024
"""Files up to this size get the MD5 of their content as eTag; bigger ones mtime-size."""
SEQUENCER_WIDTH = 20
"""Hex digits of a sequencer: enough for any nanosecond time, so strings compare as numbers."""


@dataclass(slots=True)
class _Candidate:
    """A file that changed and is waiting to be complete."""

    size: int
    mtime_ns: int
    stable_since: float
    check_at: float


@dataclass(frozen=True, slots=True)
class _Ready:
    """A complete file or a delete, ready to become an event."""

    key: str
    deleted: bool
    mtime_ns: int
    size: int = 0


def sequencer(mtime_ns: int) -> str:
    """The sequencer of a file version: its modification time in ns as fixed-width hex."""
    return f"{mtime_ns:0{SEQUENCER_WIDTH}X}"


def _iso(epoch_ns: int) -> str:
    moment = datetime.fromtimestamp(epoch_ns / 1e9, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def notification(
    bucket: str, key: str, *, deleted: bool, mtime_ns: int, size: int | None = None,
    etag: str | None = None,
) -> dict[str, Any]:
    """An S3 Event Notification (``Records``) for one local file, as the decoder reads it."""
    obj: dict[str, Any] = {"key": quote_plus(key, safe="/"), "sequencer": sequencer(mtime_ns)}
    if size is not None:
        obj["size"] = size
    if etag is not None:
        obj["eTag"] = etag
    return {"Records": [{
        "eventVersion": "2.1",
        "eventSource": "edp:local",
        "awsRegion": "local",
        "eventTime": _iso(mtime_ns),
        "eventName": "ObjectRemoved:Delete" if deleted else "ObjectCreated:Put",
        "s3": {"s3SchemaVersion": "1.0", "bucket": {"name": bucket}, "object": obj},
    }]}


def file_etag(path: Path, size: int, mtime_ns: int) -> str:
    """MD5 of the content (as S3 gives for single-part uploads), or ``mtime-size`` for big files."""
    if size > MD5_LIMIT:
        return f"{mtime_ns:x}-{size:x}"
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class FolderSource:
    """A local folder tree watched as a bucket (see the module docstring).

    ``settle`` is ``watch_settle_seconds``; ``ignore`` the ``watch_ignore`` patterns,
    matched with ``fnmatchcase`` against the file name and against the whole key.
    ``clock`` (wall clock, seconds) and ``force_polling`` are for tests and network
    file systems. Raises :class:`ConfigError` when ``root`` is not a folder.
    """

    @classmethod
    def from_settings(cls, root: str | os.PathLike[str], settings: Settings, *,
                      bucket: str | None = None, chunk: int | None = None) -> FolderSource:
        """The folder source of ``edp watch``, ``edp serve --watch`` and the demo:
        settle time, ignore patterns, step size and grouping rules from ``settings``."""
        return cls(root, bucket=bucket, settle=settings.watch_settle_seconds,
                   ignore=settings.watch_ignore,
                   chunk=settings.chunk_size if chunk is None else chunk,
                   rules=settings.rule_book())

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        bucket: str | None = None,
        settle: float = 1.0,
        ignore: Sequence[str] = DEFAULT_IGNORE,
        chunk: int = 1000,
        force_polling: bool | None = None,
        clock: Callable[[], float] = time.time,
        rules: RuleBook | None = None,
    ) -> None:
        path = Path(root)
        if not path.is_dir():
            raise ConfigError(f"edp watch: {root} is not a folder")
        self.root = path.resolve()
        self.bucket = bucket or self.root.name
        if not self.bucket:
            raise ConfigError(f"edp watch: cannot name a bucket after {root}; give --bucket")
        if "/" in self.bucket:
            raise ConfigError(f"edp watch: --bucket {self.bucket!r} holds a '/', which no "
                              "bucket name does")
        self.name = f"watch:{self.root}"
        # Its keys are never pruned from the store (the daemon asks): every start
        # reports every file again, which must then be a duplicate, however old.
        self.remembered_buckets = (self.bucket,)
        # Files that complete at the same instant (one clock tick of the file system)
        # are reported marker files last: a marker written just after its data files
        # must not close the batch before them.
        # Files of one batch settle one by one (a file seen empty, then written, settles
        # a settle period after its last change): a settled marker also waits for the
        # files of its batch prefix modified no later than it that are still settling.
        grouping = (rules or RuleBook()).for_bucket(self.bucket)
        self.is_marker, self.prefix_of = grouping.is_marker, grouping.prefix_of
        self.settle = settle
        self.ignore = tuple(ignore)
        self.chunk = chunk
        self.force_polling = force_polling
        self.clock = clock
        self._changes: list[tuple[str, str]] = []
        self._rescan = False
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._watching = threading.Event()
        self._candidates: dict[str, _Candidate] = {}
        self._known: dict[str, tuple[int, int]] = {}  # key -> (mtime_ns, size) last emitted
        self._deletes: dict[str, int] = {}
        self._backlog: list[_Ready] = []
        self._inflight: Received | None = None
        self._inflight_ready: list[_Ready] = []

    # -- the Source protocol ---------------------------------------------------------
    def start(self) -> None:
        """Start following the tree, then scan it (changes during the scan are not lost)."""
        if self._thread is not None or self._stop.is_set():  # running, or closed for good
            return
        self._thread = threading.Thread(target=self._follow, name=self.name, daemon=True)
        self._thread.start()
        self._watching.wait(timeout=5.0)
        for key, stat in self._walk(self.root):
            self._consider(key, stat)
        log.info("watching %s as bucket %s: %s found", self.root, self.bucket,
                 plural(len(self._candidates), "file"))

    def receive(self, *, wait: float) -> Received:
        """Events of the files that became complete (or were deleted), waiting up to ``wait``."""
        self.start()
        if self._inflight is not None:  # not acknowledged: it must come again
            return self._inflight
        deadline = time.monotonic() + wait
        while not self._backlog:
            self._wake.clear()
            self._apply_changes()
            ready, next_check = self._collect()
            if ready:
                # oldest first, so that a backlog moves the engine's clock forward only
                marker = self.is_marker
                self._backlog = sorted(ready, key=lambda r: (r.mtime_ns, marker(r.key), r.key))
                break
            now = time.monotonic()
            if now >= deadline or self._stop.is_set():
                break
            self._wake.wait(max(0.0, min(deadline, next_check) - now))
        batch, self._backlog = self._backlog[: self.chunk], self._backlog[self.chunk :]
        # Only what became a message is reported once acknowledged: a file that could
        # not be read stays unknown, so that its next change (a chmod) reports it.
        made = [(item, self._message(item)) for item in batch]
        reported = [item for item, message in made if message is not None]
        messages = [message for _, message in made if message is not None]
        received = Received(messages, caught_up=not self._backlog, receipts=reported)
        if messages:
            self._inflight, self._inflight_ready = received, reported
        return received

    def ack(self, received: Received) -> None:
        """The engine committed these events: remember them as reported."""
        if received is not self._inflight:
            return
        for item in self._inflight_ready:
            if item.deleted:
                self._known.pop(item.key, None)
            else:
                self._known[item.key] = (item.mtime_ns, item.size)
        self._inflight, self._inflight_ready = None, []

    def close(self) -> None:
        """Stop following the tree."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None

    # -- following the tree ----------------------------------------------------------
    def _follow(self) -> None:
        import watchfiles

        polling = self.force_polling
        while not self._stop.is_set():
            try:
                for changes in watchfiles.watch(
                    self.root, watch_filter=None, debounce=100, step=20,
                    stop_event=self._stop, rust_timeout=200, yield_on_timeout=True,
                    force_polling=polling, poll_delay_ms=100,
                ):
                    self._watching.set()
                    if changes:
                        with self._lock:
                            self._changes.extend((c.name, p) for c, p in changes)
                        self._wake.set()
            except Exception as exc:  # a boundary: keep following, by polling if need be
                if not polling and "Unable to decode path" in str(exc):
                    # A file name that is not UTF-8 (skipped anyway, see _key): the
                    # native watcher stops on it; start it again rather than poll.
                    log.warning("watching %s: %s; such names are skipped, watching goes on",
                                self.root, exc)
                else:
                    log.exception("watching %s failed; falling back to polling", self.root)
                    polling = True
                with self._lock:
                    self._rescan = True  # what changed meanwhile is found by a new scan
                self._stop.wait(1.0)
            finally:
                self._watching.set()

    def _apply_changes(self) -> None:
        with self._lock:
            changes, self._changes = self._changes, []
            rescan, self._rescan = self._rescan, False
        if rescan:
            self._rescan_tree()
        for kind, raw in changes:
            key = self._key(Path(raw))
            if key is None:
                continue
            path = self.root / key
            if not os.path.lexists(path):
                self._gone(key)
            elif path.is_dir() and not path.is_symlink():
                if kind != "modified":  # a folder created or moved in: its files are new
                    for sub, stat in self._walk(path):
                        self._consider(sub, stat)
            elif (found := self._stat(path)) is None:  # a link out of the root, a fifo...
                self._gone(key)
            else:
                self._consider(key, found)

    def _rescan_tree(self) -> None:
        """Find every file again (after the watcher failed and events may be missing)."""
        present = dict(self._walk(self.root))
        for gone in [k for k in self._known if k not in present]:
            self._gone(gone)
        for key, stat in present.items():
            self._consider(key, stat)

    def _gone(self, key: str) -> None:
        """``key`` (a file or a folder) no longer exists: delete what was reported under it."""
        self._candidates.pop(key, None)
        below = key + "/"
        for sub in [k for k in self._candidates if k.startswith(below)]:
            del self._candidates[sub]
        for sub, (mtime_ns, _size) in self._known.items():
            if sub == key or sub.startswith(below):
                self._deletes[sub] = mtime_ns + 1

    def _consider(self, key: str, stat: os.stat_result) -> None:
        if self._ignored(key):
            return
        self._deletes.pop(key, None)
        old = self._candidates.get(key)
        if old is None or (old.size, old.mtime_ns) != (stat.st_size, stat.st_mtime_ns):
            mono = time.monotonic()
            due = mono if self._old(stat.st_mtime_ns, int(self.clock() * 1e9)) else (
                mono + self.settle)
            self._candidates[key] = _Candidate(stat.st_size, stat.st_mtime_ns, mono, due)

    def _collect(self) -> tuple[list[_Ready], float]:
        """Complete candidates and pending deletes; and when to look again.

        Only candidates due for a check are stat'ed: a change reported by the watcher
        resets a candidate through :meth:`_consider`, so between reports one stat per
        settle period confirms that a file stayed the same.
        """
        ready = [_Ready(key, True, seq) for key, seq in self._deletes.items()]
        self._deletes.clear()
        mono, wall_ns = time.monotonic(), int(self.clock() * 1e9)
        next_check = mono + 3600.0
        for key, cand in list(self._candidates.items()):
            if cand.check_at > mono:
                next_check = min(next_check, cand.check_at)
                continue
            stat = self._stat(self.root / key)
            if stat is None:
                del self._candidates[key]
            elif (stat.st_size, stat.st_mtime_ns) != (cand.size, cand.mtime_ns):
                self._candidates[key] = _Candidate(stat.st_size, stat.st_mtime_ns, mono,
                                                   mono + self.settle)
                next_check = min(next_check, mono + self.settle)
            elif mono - cand.stable_since >= self.settle or self._old(cand.mtime_ns, wall_ns):
                del self._candidates[key]
                if self._known.get(key) != (cand.mtime_ns, cand.size):
                    ready.append(_Ready(key, False, cand.mtime_ns, cand.size))
            else:
                cand.check_at = cand.stable_since + self.settle
                next_check = min(next_check, cand.check_at)
        if self._candidates and any(not r.deleted and self.is_marker(r.key) for r in ready):
            ready = self._hold_markers(ready, mono)
        return ready, next_check

    def _hold_markers(self, ready: list[_Ready], mono: float) -> list[_Ready]:
        """``ready`` without the markers that must wait for files of their batch prefix
        still settling (modified no later than the marker: written before it, or in
        its clock tick), which become candidates again, checked with those files."""
        waiting: dict[str, tuple[int, float]] = {}  # prefix -> (oldest mtime, first check)
        for key, cand in self._candidates.items():
            prefix = self.prefix_of(key)
            if type(prefix) is str:
                oldest, check = waiting.get(prefix, (cand.mtime_ns, cand.check_at))
                waiting[prefix] = (min(oldest, cand.mtime_ns), min(check, cand.check_at))
        kept = []
        for item in ready:
            mark = not item.deleted and self.is_marker(item.key)
            batch = self.prefix_of(item.key) if mark else None
            held = waiting.get(batch) if type(batch) is str else None
            if held is None or held[0] > item.mtime_ns:
                kept.append(item)
                continue
            # (settled already: the next check reports it unless it changed meanwhile)
            self._candidates[item.key] = _Candidate(item.size, item.mtime_ns,
                                                    mono - self.settle, held[1])
        return kept

    def _old(self, mtime_ns: int, wall_ns: int) -> bool:
        """Whether a file was last modified longer ago than the settle time."""
        return wall_ns - mtime_ns >= self.settle * 1e9

    def _message(self, item: _Ready) -> Message | None:
        location = f"file {item.key}"
        if item.deleted:
            body = notification(self.bucket, item.key, deleted=True, mtime_ns=item.mtime_ns)
            return Message(body=body, location=location, source=self.name)
        try:
            etag = file_etag(self.root / item.key, item.size, item.mtime_ns)
        except OSError as exc:  # vanished or unreadable meanwhile: a later change retries
            log.warning("cannot read %s: %s", self.root / item.key, exc)
            return None
        body = notification(self.bucket, item.key, deleted=False, mtime_ns=item.mtime_ns,
                            size=item.size, etag=etag)
        return Message(body=body, location=location, source=self.name)

    # -- the file system -------------------------------------------------------------
    def _key(self, path: Path) -> str | None:
        """The key of ``path`` (relative POSIX path), or None when it is not under the root."""
        try:
            relative = path.relative_to(self.root)
        except ValueError:
            return None
        key = relative.as_posix()
        if not is_unicode(key):
            log.warning("skipping %r: its name is not valid UTF-8, so it cannot be a key", path)
            return None
        return None if key in ("", ".") else key

    def _inside(self, path: Path) -> bool:
        return Path(os.path.realpath(path)).is_relative_to(self.root)

    def _stat(self, path: Path) -> os.stat_result | None:
        """Stat of a regular file under the root (through links that stay inside), or None.

        The whole path is resolved, not only its last part: a watcher may report a file
        under a linked folder that leads out of the root.
        """
        try:
            if not self._inside(path):
                return None
            stat = path.stat()
        except OSError:
            return None
        return stat if path.is_file() else None

    def _walk(self, top: Path) -> Iterable[tuple[str, os.stat_result]]:
        """Every regular file under ``top``; linked folders are not entered."""
        for folder, _dirs, files in os.walk(top, followlinks=False):
            for name in files:
                path = Path(folder, name)
                key = self._key(path)
                stat = self._stat(path)
                if key is not None and stat is not None:
                    yield key, stat

    def _ignored(self, key: str) -> bool:
        return watch_ignored(key, self.ignore)


__all__ = ["DEFAULT_IGNORE", "FolderSource", "file_etag", "notification", "sequencer"]
