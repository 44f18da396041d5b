"""Counts in command output: "1 file", "2 files", never "1 files"."""

from __future__ import annotations

from collections import Counter

from edp.aws.backfill import BackfillSummary
from edp.errors import plural


def test_a_count_of_one_is_singular_and_any_other_plural() -> None:
    assert plural(1, "file") == "1 file"
    assert plural(2, "file") == "2 files"
    assert plural(0, "batch", "batches") == "0 batches"
    assert plural(1, "batch", "batches") == "1 batch"


def test_a_backfill_of_one_object_says_so_in_the_singular() -> None:
    summary = BackfillSummary(listed=1, fired=Counter({"count": 1}), delivered=1)
    line = summary.describe()
    assert "1 object listed" in line
    assert "1 batch fired (count 1)" in line
    assert "1 event delivered" in line
