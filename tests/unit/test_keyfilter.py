"""The throw-away store's filter of keys it certainly holds no memory for."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from edp.store.keyfilter import KeyFilter

keys = st.tuples(st.sampled_from(["a", "b"]), st.text(min_size=1, max_size=8))


@given(st.lists(st.sets(keys, max_size=20), max_size=10), st.lists(keys, max_size=10))
def test_a_key_asked_or_added_before_is_never_called_new(
    steps: list[set[tuple[str, str]]], added: list[tuple[str, str]]
) -> None:
    # Given keys asked about step by step, and others added without being asked
    flt = KeyFilter()
    flt.add(added)
    seen = set(added)
    for step in steps:
        maybe, new = flt.split(step)
        # Then no key seen before is called new; each key is in exactly one answer
        assert not new & seen
        assert set(maybe) | new == step
        assert not set(maybe) & new
        seen |= set(step)


def test_keys_never_asked_about_are_mostly_new() -> None:
    flt = KeyFilter()
    flt.split({("b", f"k{n}") for n in range(100_000)})
    _, new = flt.split({("b", f"other{n}") for n in range(10_000)})
    # (two bits of 32 Mi per key: about 0.004 % false positives at this fill)
    assert len(new) > 9_900
