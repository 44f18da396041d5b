"""Times in output events (SPEC section 5): UTC, whole seconds, truncated."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from edp.core.envelopes import format_time


def test_fractions_are_truncated_not_rounded() -> None:
    assert format_time(1704067201.999) == "2024-01-01T00:00:01Z"
    assert format_time(0) == "1970-01-01T00:00:00Z"
    assert format_time(-0.5) == "1969-12-31T23:59:59Z"


def test_times_past_year_9999_are_written_as_its_last_second() -> None:
    # (a batch of files dated 9999-12-31T23:59:59Z fires a quiet period later)
    assert format_time(253_402_300_799.0 + 300) == "9999-12-31T23:59:59Z"
    assert format_time(1e15) == "9999-12-31T23:59:59Z"


# Any time from year 1 to 9999, fractions included.
@given(st.floats(min_value=-62_135_596_800, max_value=253_402_300_799.0))
def test_format_time_is_the_utc_calendar_time_of_the_whole_second(epoch: float) -> None:
    whole = datetime.fromtimestamp(int(epoch // 1), tz=UTC)
    assert format_time(epoch) == (
        f"{whole.year:04d}-{whole.month:02d}-{whole.day:02d}"
        f"T{whole.hour:02d}:{whole.minute:02d}:{whole.second:02d}Z"
    )
