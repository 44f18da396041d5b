"""Which object keys a store certainly holds no key memory for (a Bloom filter).

A replay's temporary SQLite store is written by one process only, from empty. Most
keys of a stream are new, and asking the database about each (a B-tree search per
key, most of them misses) is a good part of a replay's time. The store keeps this
filter of every (bucket, key) a step asked about, a superset of the keys it holds
memories for: a key whose bits are not all set was never asked about, so it has no
memory, and needs neither a lookup nor an upsert (a plain INSERT will do).

A wrong "maybe" (a false positive) only costs the lookup it would have cost anyway;
a wrong "certainly not" cannot happen while every key memory written went through
:meth:`KeyFilter.split` or :meth:`KeyFilter.add` first. Its size is fixed (4 MiB):
after some tens of millions of keys most answers become "maybe", and the store is
as fast as without it, no slower. The bits come from Python's ``hash``, which differs
from process to process: the filter is never stored.
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Set as AbstractSet

from edp.core.batching import ObjectKey

_BITS = 1 << 25  # 4 MiB: ~0.4 % false positives at a million keys, ~2 % at two
_MASK = _BITS - 1
_SHIFT = 25


class KeyFilter:
    """A Bloom filter (two bits per key) of the object keys asked about so far."""

    __slots__ = ("_bits",)

    def __init__(self) -> None:
        self._bits = bytearray(_BITS >> 3)

    def split(self, keys: AbstractSet[ObjectKey]) -> tuple[list[ObjectKey], set[ObjectKey]]:
        """Of distinct ``keys``, those that may have a memory (to look up), and those that
        certainly have none; every key counts as asked about from now on."""
        bits = self._bits
        maybe: list[ObjectKey] = []
        new: set[ObjectKey] = set()
        for okey in keys:
            h = hash(okey)
            x = h & _MASK
            y = (h >> _SHIFT) & _MASK
            bx, mx = x >> 3, 1 << (x & 7)
            by, my = y >> 3, 1 << (y & 7)
            if bits[bx] & mx and bits[by] & my:
                maybe.append(okey)
            else:
                new.add(okey)
                bits[bx] |= mx
                bits[by] |= my
        return maybe, new

    def add(self, keys: Iterable[ObjectKey]) -> None:
        """Count ``keys`` as asked about (keys written without having been asked)."""
        bits = self._bits
        for okey in keys:
            h = hash(okey)
            x = h & _MASK
            y = (h >> _SHIFT) & _MASK
            bits[x >> 3] |= 1 << (x & 7)
            bits[y >> 3] |= 1 << (y & 7)


__all__ = ["KeyFilter"]
