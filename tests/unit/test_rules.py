"""Grouping rules of SPEC section 2 and sequencer order of SPEC 3.1."""

from __future__ import annotations

import pytest

from edp.core.events import Trigger
from edp.core.rules import GroupingRules, RuleBook, Skip, sequencer_is_newer


@pytest.mark.parametrize(
    ("depth", "key", "expected"),
    [
        (2, "instrument/exp-1/raw/a.tif", "instrument/exp-1/"),
        (2, "instrument/exp-1/a.tif", "instrument/exp-1/"),
        (1, "instrument/exp-1/a.tif", "instrument/"),
        (3, "instrument/exp-1/raw/a.tif", "instrument/exp-1/raw/"),
        (0, "a.tif", ""),
        (0, "deep/down/a.tif", ""),
        (2, "instrument/a.tif", Skip.SHALLOW),
        (2, "a.tif", Skip.SHALLOW),
        (1, "a.tif", Skip.SHALLOW),
        (2, "instrument/exp-1/", Skip.FOLDER),
        (0, "folder/", Skip.FOLDER),
        (2, ".quilt/named_packages/u/p/1700000000", Skip.QUILT),
        (0, ".quilt/packages/abc", Skip.QUILT),
        (2, "a b/c+d/é.tif", "a b/c+d/"),
    ],
)
def test_prefix_of(depth: int, key: str, expected: str | Skip) -> None:
    assert GroupingRules(prefix_depth=depth).prefix_of(key) == expected


def test_quilt_prefix_only_at_the_root_is_internal() -> None:
    rules = GroupingRules(prefix_depth=2)
    assert rules.prefix_of("data/.quilt/x/a.tif") == "data/.quilt/"


@pytest.mark.parametrize(
    ("patterns", "key", "ignored"),
    [
        (("raw/*",), "raw/exp/a.tif", True),  # '*' crosses '/'
        (("raw/*",), "raw/a.tif", True),
        (("raw/*",), "other/raw/a.tif", False),
        (("raw",), "raw/a.tif", True),  # literal prefix
        (("raw",), "rawdata/a.tif", True),
        (("raw/",), "rawdata/a.tif", False),
        (("*.tmp",), "x/y/file.tmp", True),
        (("*/scratch/*",), "inst/scratch/a", True),
        (("exp-?/",), "exp-1/a", False),  # a glob matches the whole key
        (("exp-?/*",), "exp-1/a/b", True),
        (("[ab]*",), "b/x/y", True),
        (("[ab]*",), "c/x/y", False),
        (("Raw/*",), "raw/a/b", False),  # case-sensitive
    ],
)
def test_ignore_patterns(patterns: tuple[str, ...], key: str, ignored: bool) -> None:
    rules = GroupingRules(ignore_prefixes=patterns, prefix_depth=1)
    assert rules.is_ignored(key) is ignored
    assert (rules.prefix_of(key) == Skip.IGNORED) is ignored


@pytest.mark.parametrize(
    ("markers", "key", "expected"),
    [
        (("_DONE",), "inst/exp/_DONE", True),
        (("_DONE",), "inst/exp/sub/_DONE", True),
        (("_DONE",), "inst/_DONE/a.tif", False),  # file name only
        (("*.done", "COMPLETE"), "inst/exp/run.done", True),
        (("*.done",), "inst/exp/run.done.tmp", False),
        ((), "inst/exp/_DONE", False),
    ],
)
def test_markers_match_the_file_name(markers: tuple[str, ...], key: str, expected: bool) -> None:
    assert GroupingRules(complete_markers=markers).is_marker(key) is expected


@pytest.mark.parametrize(
    ("candidate", "remembered", "newer"),
    [
        ("0062E99A88DC407461", "0062E99A88DC407460", True),
        ("0062E99A88DC407460", "0062E99A88DC407460", False),
        ("0062E99A88DC407459", "0062E99A88DC407460", False),
        ("0062E99A88DC4074", "0062E99A88DC407400", False),  # padded: equal
        ("0062E99A88DC4075", "0062E99A88DC407400", True),
        ("0062E99A88DC407401", "0062E99A88DC4074", True),
        ("0a", "0B", True),  # compared as strings, as given (SPEC 3.1): "a" > "B"
        ("0A", "0a", False),
        ("1", "0F", True),
    ],
)
def test_sequencer_order(candidate: str, remembered: str, newer: bool) -> None:
    assert sequencer_is_newer(candidate, remembered) is newer


def test_deadline_duration_wins_a_tie_with_max_age() -> None:
    rules = GroupingRules(threshold_duration=10, max_batch_age=20)
    assert rules.deadline(first_activity=0, last_activity=10) == (20, Trigger.DURATION)
    assert rules.deadline(first_activity=0, last_activity=11) == (20, Trigger.MAX_AGE)
    assert rules.deadline(first_activity=0, last_activity=5) == (15, Trigger.DURATION)


@pytest.mark.parametrize(
    ("duration", "max_age", "first", "last", "instant"),
    [(0.7, 0.0, 0.0, "2024-01-01T00:00:00.002Z", "2024-01-01T00:00:00.702Z"),
     (300.0, 0.1, "2024-01-01T00:00:00.001Z", "2024-01-01T00:00:00.001Z",
      "2024-01-01T00:00:00.101Z")],
)
def test_a_fractional_deadline_is_the_instant_an_event_time_of_it_reads_as(
    duration: float, max_age: float, first: float | str, last: str, instant: str
) -> None:
    # Given times read as edp reads event times, and a quiet period or maximum age in
    # fractions of a second whose float sum lands just off that instant
    from edp.decode import parse_time

    def read(t: float | str) -> float:
        return parse_time(t, what="time") if isinstance(t, str) else t

    rules = GroupingRules(threshold_duration=duration, max_batch_age=max_age)
    deadline, _ = rules.deadline(first_activity=read(first), last_activity=read(last))
    # Then the deadline is exactly the time an event at that instant has (SPEC 3: it
    # fires when clock - last activity >= duration, before that event joins the batch)
    assert deadline == parse_time(instant, what="time")


def test_max_age_zero_is_off() -> None:
    rules = GroupingRules(threshold_duration=10, max_batch_age=0)
    assert rules.deadline(first_activity=0, last_activity=1000) == (1010, Trigger.DURATION)


def test_rule_book_overrides_and_watch_list() -> None:
    special = GroupingRules(prefix_depth=0)
    book = RuleBook(default=GroupingRules(), overrides={"b2": special}, watched=frozenset({"b1"}))
    assert book.for_bucket("b2") is special
    assert book.for_bucket("b1") == GroupingRules()
    assert book.is_watched("b1") and book.is_watched("b2")
    assert not book.is_watched("b3")
    assert RuleBook().is_watched("anything")
