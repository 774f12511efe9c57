"""The RAID-5 write-back stripe cache: column pieces that are acknowledged but
not yet on their columns, to overlay on every column read.

With a RAID-5 log, a write puts its computed pieces (new data and new
parity, each inside one stripe unit of one column) here and its entry in
the log's batch, and is answered; the log's committer makes the batch
durable, writes the pieces to the columns, then drops them from here
(vmd/raid5log.py). Until then, the columns hold older bytes: whatever reads
a column through `Raid5Volume._read_pieces` gets these pieces laid over
what it read. Readers that go to the columns on their own (the rebuild,
verify, `data_ranges`, membership changes) drain the cache first.

Pieces are indexed by (column, stripe): a piece never crosses a stripe
unit, so a read looks at the few units it spans, not at the whole cache.
Within a unit they are kept in sequence order; laid over a read in that
order, the newest bytes win.
"""

from __future__ import annotations

from typing import Any

Piece = tuple[int, int, Any]  # column, offset in the column, bytes


def owned(data: Any) -> Any:
    """Bytes nobody will change under the cache: a read-only view (of the
    bytes FUSE handed in) or a buffer the engine made is kept as it is;
    a view of a caller's writable buffer is copied."""
    if isinstance(data, (bytes, bytearray)) or (isinstance(data, memoryview) and data.readonly):
        return data
    return bytes(data)


class StripeCache:
    def __init__(self, stripe_unit: int):
        self.su = stripe_unit
        # (column, stripe) → [(seq, column offset, bytes)], oldest first
        self.units: dict[tuple[int, int], list[tuple[int, int, Any]]] = {}
        self.bytes = 0

    def __bool__(self) -> bool:
        return bool(self.units)

    def add(self, seq: int, pieces: list[Piece]) -> None:
        for c, off, data in pieces:
            self.units.setdefault((c, off // self.su), []).append((seq, off, data))
            self.bytes += len(data)

    def drop(self, seq: int, pieces: list[Piece]) -> None:
        """Forget an entry's pieces (written to their columns, or never to be)."""
        for c, off, data in pieces:
            key = (c, off // self.su)
            kept = [p for p in self.units.get(key, ()) if not (p[0] == seq and p[1] == off)]
            if kept:
                self.units[key] = kept
            else:
                self.units.pop(key, None)
            self.bytes -= len(data)

    def clear(self) -> None:
        self.units.clear()
        self.bytes = 0

    def holds_stripes(self, first: int, stop: int) -> bool:
        """Some piece lies in stripes [first, stop)."""
        return any(first <= s < stop for _, s in self.units)

    def over(self, c: int, off: int, n: int) -> list[tuple[int, Any]]:
        """The cached pieces of column c that overlap [off, off+n), oldest
        first, as (column offset, bytes). Taken before the column is read:
        a piece written back and dropped during the read still applies."""
        out: list[tuple[int, Any]] = []
        if not self.units:
            return out
        for s in range(off // self.su, -(-(off + n) // self.su)):
            for _, at, data in self.units.get((c, s), ()):
                if at < off + n and at + len(data) > off:
                    out.append((at, data))
        return out


def lay_over(buf: Any, off: int, pieces: list[tuple[int, Any]]) -> bytearray:
    """`buf` (read at column offset `off`) with the pieces written over it."""
    out = bytearray(buf)
    end = off + len(out)
    for at, data in pieces:
        a, b = max(at, off), min(at + len(data), end)
        out[a - off:b - off] = memoryview(data)[a - at:b - at]
    return out
