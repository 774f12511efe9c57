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

import errno
import logging
from typing import TYPE_CHECKING, Any

import trio

from .plex import INLINE_BYTES, PARALLEL_BYTES, Alone, Plex, PlexIOError
from .volume import Volume, VolumeIOError

log = logging.getLogger(__name__)

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


class WriteBackCache(Volume):
    """Raid5Volume's side of the cache: the reads laid over, the write-back
    its log's committer calls, and what flush, fsync and drain mean."""

    r5log: Any  # the volume's Raid5Log, or None: no log, no cache
    columns: list[Plex]
    su: int
    width: int

    if TYPE_CHECKING:  # Raid5Volume's
        def _writable(self, c: int) -> bool: ...

        def _cut(self, writes: list[Piece]) -> None: ...

        async def _read_columns(self, pieces: list[tuple[int, int, int]], alone: Alone = None,
                                read_ahead: bool = False) -> list[bytes | bytearray]: ...

    async def _read_pieces(self, pieces: list[tuple[int, int, int]], alone: Alone = None,
                           read_ahead: bool = False) -> list[bytes | bytearray]:
        """Read the pieces in parallel, contiguous ones of a column as one read,
        with the write-back cache's newer bytes laid over them. Raises
        PlexIOError (naming the column) on the first failure. `alone`: a
        single piece may be read on the event loop (Volume.pread).
        `read_ahead`: around a piece the page cache lacks, start reading its
        stripe unit too (ReadAhead._ahead)."""
        cache = self.r5log.cache if self.r5log is not None else None
        if not cache:
            return await self._read_columns(pieces, alone, read_ahead)
        # Before the reads: a piece written back and dropped meanwhile applies.
        over = [cache.over(c, off, n) for c, off, n in pieces]  # type: ignore[union-attr]
        got = await self._read_columns(pieces, alone, read_ahead)
        return [lay_over(b, p[1], o) if o else b for b, p, o in zip(got, pieces, over)]

    async def flush(self) -> None:
        """Every write acknowledged so far on the columns (or dropped: the
        log failed), and the columns flushed: what the DRL, a retire, Remote
        Copy, the rebuild, verify and a stop need (a user's fsync needs less:
        `sync`). Lost writes are not its failure: they never reached a
        column, so the columns agree with their parity and a clean record,
        a rebuild's progress or a verify stays true. The loss is reported
        by `sync`, and by the writes the volume refuses from then on."""
        if self.r5log is not None:
            await self.r5log.drain()
        await super().flush()

    async def flush_columns(self) -> None:
        """fdatasync the columns, the write-back cache left as it is."""
        await super().flush()

    async def sync(self) -> None:
        """An fsync (invariant 9): with a RAID-5 log, every acknowledged write
        durable in the log, which a restart replays before serving; the
        columns follow from the cache, and their flush from the retires."""
        if self.r5log is None:
            await self.flush()
            return
        await self.r5log.sync()
        if self.r5log.lost:
            raise VolumeIOError(errno.EIO, f"volume {self.name}: {self.r5log.lost} acknowledged "
                                f"write(s) were lost: RAID-5 log {self.r5log.path} failed "
                                f"({self.r5log.failed})")
        if not self._can_serve():
            raise VolumeIOError(errno.EIO, f"volume {self.name}: too few columns are in to "
                                f"hold its data")

    async def drain(self, stripes: range | None = None) -> None:
        """Before the columns are read or changed behind `_read_pieces` (the
        rebuild, verify, membership): the cached pieces of `stripes` (all,
        by default) written back. Under the stripes' range lock or the gate
        held, so that no new piece comes in there meanwhile."""
        if self.r5log is None or not self.r5log.cache:
            return
        if stripes is None or self.r5log.cache.holds_stripes(stripes.start, stripes.stop):
            await self.r5log.drain()

    async def write_back(self, entries: list[tuple[int, list[Any], bool]]) -> None:
        """The RAID-5 log's committer, once `entries` are durable in the log:
        write their pieces to the columns, in entry order (the newest bytes
        win), and record any column that fails (its stripes in its map)."""
        writes: list[tuple[int, int, Any]] = []
        gone: dict[int, set[int]] = {}  # column → stripes it missed
        for _, pieces, cut in entries:
            if cut:
                await self._write_batch(writes)  # the entries before it, then the fault
                self._cut(pieces)
            for c, at, data in pieces:
                if self._writable(c):
                    writes.append((c, at, data))
                else:  # failed or detached since: its map must say so
                    gone.setdefault(c, set()).add(at // self.su)
        failed = await self._write_batch(writes)
        for e in failed:
            c = self.columns.index(e.plex)
            gone.setdefault(c, set()).update(at // self.su for cc, at, _ in writes if cc == c)
        for c, stripes in gone.items():
            p = self.columns[c]
            if p.record.missing is not None:
                for s in stripes:
                    self._mark_missed(p.record, s * self.width, self.width)
        for e in failed:
            s = min(gone[self.columns.index(e.plex)])
            await self.fail_plex(e.plex, e, s * self.width, self.width)
        if gone:
            try:
                await self.checkpoint()  # the maps, also of a column already out
            except OSError as e:
                # The volume's failure, not the daemon's (this runs in the
                # log's committer): writes are refused from now on, as when
                # a plex failure cannot be recorded (Volume._record_failure).
                names = ", ".join(self.columns[c].name for c in sorted(gone))
                self.error = self.error or (f"cannot record in {self.sidecar.path} the "
                                            f"stripes column {names} missed: {e}")
                log.critical("volume %s: %s; refusing writes", self.name, self.error)
        if self._failures_pending:
            await self.failures_durable()

    async def _write_batch(self, writes: list[tuple[int, int, Any]]) -> list[PlexIOError]:
        """Write a batch's pieces, per column one after the other in entry
        order, so that of two that overlap the newer lands last: from the
        event loop where the column is fast and every piece small, else in
        one of its worker threads (one hop per column, not per piece)."""
        percol: dict[int, list[tuple[int, Any]]] = {}
        for c, at, data in writes:
            percol.setdefault(c, []).append((at, data))
        failed: list[PlexIOError] = []

        async def one(p: Plex, items: list[tuple[int, Any]]) -> None:
            def run() -> None:
                for at, data in items:
                    try:
                        p._pwrite_sync(at, data)
                    except OSError as e:
                        raise PlexIOError(p, "write", at, e) from e

            try:
                with p._in_flight("write", items[0][0]):
                    await p._pool.run(run)
            except PlexIOError as e:
                failed.append(e)
            p.writes += len(items)
            p.bytes_written += sum(len(d) for _, d in items)

        async def inline(p: Plex, items: list[tuple[int, Any]]) -> None:
            # Small pieces into the page cache, right here: with 4 KiB random
            # writes the hop to the column's thread and back (and the GIL
            # passed between them) cost the daemon more CPU than the writes.
            # A batch holds what arrived during the log's last sync: other
            # requests get the loop after every INLINE_BYTES of it. Cancelled
            # (the volume's tasks end), it starts no write, as a thread's
            # would not: the columns may be closing.
            await trio.lowlevel.checkpoint_if_cancelled()
            done = 0
            for i, (at, data) in enumerate(items):
                if done >= INLINE_BYTES:
                    await trio.lowlevel.checkpoint()
                    done = 0
                if not p.write_inline():  # it stalled: the rest in its thread, at once
                    await one(p, items[i:])
                    return
                try:
                    p.pwrite_inline(at, data)
                except PlexIOError as e:
                    failed.append(e)  # its later pieces: in its map
                    return
                done += len(data)

        async with trio.open_nursery() as nursery:
            for c, items in percol.items():
                p = self.columns[c]
                if p.write_inline() and all(len(d) < PARALLEL_BYTES for _, d in items):
                    nursery.start_soon(inline, p, items)
                else:
                    nursery.start_soon(one, p, items)
        return failed

