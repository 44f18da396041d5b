"""Grouping rules (SPEC section 2): which keys are batched, and under which prefix."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from fnmatch import fnmatchcase

from edp.core.events import Trigger

_GLOB_CHARS = frozenset("*?[")


class Skip(StrEnum):
    """Why a created event is not batched. Each reason is counted."""

    UNWATCHED = "unwatched-bucket"
    SHALLOW = "shallow-key"
    FOLDER = "folder-marker"
    QUILT = "quilt-internal"
    IGNORED = "ignored-prefix"


@dataclass(frozen=True, slots=True)
class GroupingRules:
    """The grouping settings of one bucket (SPEC section 2), already validated.

    Durations are in seconds; ``0`` switches ``threshold_event_count`` and
    ``max_batch_age`` off.
    """

    prefix_depth: int = 2
    ignore_prefixes: tuple[str, ...] = ()
    threshold_duration: float = 300.0
    threshold_event_count: int = 20
    max_batch_age: float = 0.0
    complete_markers: tuple[str, ...] = ()
    _literal_prefixes: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _globs: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _fractional: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        globs = tuple(p for p in self.ignore_prefixes if _GLOB_CHARS & set(p))
        literals = tuple(p for p in self.ignore_prefixes if not _GLOB_CHARS & set(p))
        object.__setattr__(self, "_globs", globs)
        object.__setattr__(self, "_literal_prefixes", literals)
        object.__setattr__(self, "_fractional", not (
            float(self.threshold_duration).is_integer() and float(self.max_batch_age).is_integer()
        ))

    def prefix_of(self, key: str) -> str | Skip:
        """The batch prefix of ``key``, or why the key is not batched.

        >>> GroupingRules().prefix_of("instrument/exp-1/raw/a.tif")
        'instrument/exp-1/'
        """
        if key.endswith("/"):
            return Skip.FOLDER
        if key.startswith(".quilt/"):
            return Skip.QUILT
        if self.ignore_prefixes and self.is_ignored(key):
            return Skip.IGNORED
        depth = self.prefix_depth
        if depth == 0:
            return ""
        parts = key.split("/", depth)
        # parts[:depth] are directory segments only if at least one more part follows.
        if len(parts) <= depth:
            return Skip.SHALLOW
        return "/".join(parts[:depth]) + "/"

    def is_ignored(self, key: str) -> bool:
        """Whether ``key`` matches one of ``ignore_prefixes``.

        A pattern with ``*``, ``?`` or ``[`` is matched against the whole key
        (``fnmatchcase``: ``*`` crosses ``/``); any other pattern is a literal
        key prefix.
        """
        if self._literal_prefixes and key.startswith(self._literal_prefixes):
            return True
        if not self._globs:
            return False
        return any(fnmatchcase(key, pattern) for pattern in self._globs)

    def is_marker(self, key: str) -> bool:
        """Whether the file name (last key segment) matches ``complete_markers``."""
        if not self.complete_markers:
            return False
        name = key.rsplit("/", 1)[-1]
        return any(fnmatchcase(name, pattern) for pattern in self.complete_markers)

    def deadline(self, first_activity: float, last_activity: float) -> tuple[float, Trigger]:
        """When an open batch fires by time, and by which trigger.

        ``duration`` wins a tie with ``max-age`` (SPEC section 3).
        """
        by_quiet = last_activity + self.threshold_duration
        if self._fractional:
            # Times are read to the microsecond: 0.002 + 0.7 must be the 0.702 an event
            # time of that instant parses to, not a float just above it (which would let
            # an event exactly at the deadline join the batch). Whole seconds add exactly.
            by_quiet = round(by_quiet, 6)
        if self.max_batch_age > 0:
            by_age = first_activity + self.max_batch_age
            if self._fractional:
                by_age = round(by_age, 6)
            if by_age < by_quiet:
                return by_age, Trigger.MAX_AGE
        return by_quiet, Trigger.DURATION


@dataclass(frozen=True, slots=True)
class RuleBook:
    """Grouping rules for every bucket: defaults, per-bucket overrides, and the watch list.

    An empty ``watched`` set means every bucket is watched.
    """

    default: GroupingRules = field(default_factory=GroupingRules)
    overrides: Mapping[str, GroupingRules] = field(default_factory=dict)
    watched: frozenset[str] = frozenset()

    def for_bucket(self, bucket: str) -> GroupingRules:
        """The rules that apply to ``bucket``."""
        return self.overrides.get(bucket, self.default)

    def is_watched(self, bucket: str) -> bool:
        """Whether events of ``bucket`` are batched at all."""
        return not self.watched or bucket in self.watched or bucket in self.overrides


def watch_ignored(key: str, patterns: Sequence[str]) -> bool:
    """Whether a local file's ``key`` matches a ``watch_ignore`` pattern, by its name or
    as a whole (``fnmatchcase``): the watcher reports no event for it, and the packager
    leaves it out of a local batch's package.

    >>> watch_ignored("run/1/raw.bin.part", ("*.part",))
    True
    """
    name = key.rsplit("/", 1)[-1]
    return any(fnmatchcase(name, p) or fnmatchcase(key, p) for p in patterns)


def sequencer_is_newer(candidate: str, remembered: str) -> bool:
    """Whether S3 sequencer ``candidate`` is higher than ``remembered``.

    Sequencers are hex strings of varying length: the shorter is right-padded
    with ``0`` and the two are compared as strings (SPEC 3.1), as given: one
    producer writes one case (S3 and MinIO upper, moto lower), so case is not folded.
    """
    width = max(len(candidate), len(remembered))
    return candidate.ljust(width, "0") > remembered.ljust(width, "0")
