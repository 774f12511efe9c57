"""Bitmaps over a volume's byte range: the DRL and the FastResync maps.

A `RegionMap` has one bit per `region` bytes of a volume of `size` bytes.
1 TiB at 64 KiB is 16 Mi bits = 2 MiB of memory, at 1 MiB it is 128 KiB.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator

from bitarray import bitarray


class RegionMap:
    __slots__ = ("region", "size", "bits")

    def __init__(self, size: int, region: int, *, fill: bool = False):
        if region <= 0 or size < 0:
            raise ValueError("region must be > 0 and size >= 0")
        self.region = region
        self.size = size
        self.bits = bitarray(-(-size // region) if size else 0)
        self.bits.setall(fill)

    @property
    def nbits(self) -> int:
        return len(self.bits)

    def span(self, off: int, length: int) -> range:
        """Indices of the regions that bytes [off, off+length) touch."""
        if length <= 0:
            return range(0)
        return range(off // self.region, (off + length - 1) // self.region + 1)

    def mark(self, off: int, length: int) -> None:
        r = self.span(off, length)
        if len(r):
            self.bits[r.start:r.stop] = 1

    def mark_regions_of(self, other: "RegionMap", indices: Iterable[int]) -> None:
        """Mark the bytes covered by `other`'s regions `indices` (any granularity)."""
        for i in indices:
            self.mark(i * other.region, min(other.region, other.size - i * other.region))

    def any_in(self, off: int, length: int) -> bool:
        r = self.span(off, length)
        return bool(len(r)) and self.bits.any() and self.bits[r.start:r.stop].any()

    def count(self) -> int:
        return self.bits.count()

    def bytes_covered(self) -> int:
        """Bytes of the volume the set bits cover (the last region may be short)."""
        n = self.bits.count()
        if n and self.nbits and self.bits[-1]:
            return (n - 1) * self.region + (self.size - (self.nbits - 1) * self.region)
        return n * self.region

    def region_bytes(self, i: int) -> tuple[int, int]:
        off = i * self.region
        return off, min(self.region, self.size - off)

    def set_indices(self) -> Iterator[int]:
        return self.bits.search(1)

    def runs(self, max_bits: int) -> Iterator[tuple[int, int]]:
        """(first, count) of runs of set bits, each at most max_bits long."""
        i = 0
        n = self.nbits
        bits = self.bits
        while i < n:
            try:
                start = bits.index(1, i)
            except ValueError:
                return
            try:
                end = bits.index(0, start, min(n, start + max_bits))
            except ValueError:
                end = min(n, start + max_bits)
            yield start, end - start
            i = end

    def resize(self, size: int) -> None:
        """Cover a volume of `size` bytes: bits added are clear (a grown
        volume's new bytes are zeros on every copy), bits past a smaller size
        are dropped (only to undo a grow that was never recorded). A region
        that was the short last one keeps its bit, now for more bytes: a
        superset, as a map may always be."""
        n = -(-size // self.region) if size else 0
        old = self.nbits
        if n > old:
            self.bits.extend(bitarray(n - old, endian=self.bits.endian))
            self.bits[old:] = 0
        else:
            del self.bits[n:]
        self.size = size

    def union(self, other: "RegionMap") -> None:
        if other.region != self.region or other.size != self.size:
            raise ValueError("maps of different geometry")
        self.bits |= other.bits

    def clear(self) -> None:
        self.bits.setall(0)

    def fill(self) -> None:
        self.bits.setall(1)

    def copy(self) -> "RegionMap":
        m = RegionMap.__new__(RegionMap)
        m.region, m.size, m.bits = self.region, self.size, self.bits.copy()
        return m

    def to_bytes(self) -> bytes:
        return zlib.compress(self.bits.tobytes(), 1)

    @classmethod
    def from_bytes(cls, size: int, region: int, data: bytes) -> "RegionMap":
        m = cls(size, region)
        raw = zlib.decompress(data)
        b = bitarray()
        b.frombytes(raw)
        if len(b) < m.nbits:
            raise ValueError("map too short for the volume")
        m.bits = b[: m.nbits]
        return m

    def __repr__(self) -> str:
        return f"RegionMap({self.count()}/{self.nbits} × {self.region})"
