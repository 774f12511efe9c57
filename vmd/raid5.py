"""The RAID-5 layout: a `Volume` over N ≥ 3 columns of data and parity.

Placement is Linux md's default, left-symmetric, with no header: data unit
`i` is in stripe `s = i // (N-1)`; the parity of stripe `s` is on column
`N-1 - s mod N`; the data units of the stripe follow it in column order,
wrapping around; every unit of stripe `s` sits at offset `s × stripe_unit` of
its column.

A column's FastResync map is kept in volume offsets at stripe-unit
granularity (the config sets `fastresync_region` to the stripe unit): any bit
inside stripe `s`'s volume range means "this column's unit of stripe `s` is
not to be trusted; rebuild it from the others". One rule thus covers a
column that was away (its missed stripes), a new column (every stripe) and
parity to regenerate after an unclean stop (the parity column's stripes).
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import trio

from .config import VolumeConfig
from .errors import VmdError
from .plex import INLINE_BYTES, Alone, Plex, PlexIOError
from .raid5_ahead import ReadAhead
from . import imageid
from . import raid5_double as double
from .raid5_plan import Piece, WritePlan, edge_plan, full_stripes
from .raid5_rebuild import Rebuild, xor_into
from .raid5cache import WriteBackCache
from .raid5log import Raid5Log
from .sidecar import (ACTIVE, DETACHED, IOFAIL, SNAPLINK, STALE, SYNCING, WRITABLE,
                      PlexRecord, SidecarLog, VolumeState)
from .volume import Volume, VolumeIOError, Zeros

log = logging.getLogger(__name__)

HALT_SECONDS = 20  # a stop waits this long for the RAID-5 log's column writes to end


class Raid5Volume(ReadAhead, WriteBackCache, Volume):
    IMAGE = "column"
    REPLACE_DOC = "RAID-5: replace a failed column, a dirty degraded volume"

    def __init__(self, cfg: VolumeConfig, state: VolumeState, sidecar: SidecarLog,
                 plexes: Iterable[Plex], *, clean_delay: float = 5.0, rate_limit: int = 0,
                 plex_factory: Callable[[PlexRecord, int], Plex] = Plex):
        super().__init__(cfg, state, sidecar, plexes, clean_delay=clean_delay,
                         plex_factory=plex_factory)
        self.columns: list[Plex] = [p for p in self.plexes if p.state != SNAPLINK]
        self.ncol = len(self.columns)
        self.su = cfg.stripe_unit
        self.width = self.su * (self.ncol - 1)  # volume bytes per stripe
        self.column_size = self.size // (self.ncol - 1)
        self.resync = Rebuild(self, rate_limit=rate_limit)
        self.method_counts = {"full": 0, "rmw": 0, "rcw": 0, "degraded": 0}
        self.r5log = None if cfg.raid5_log is None else Raid5Log(cfg.raid5_log, self)
        self.degraded_reads = 0
        self.replayed_entries = 0  # RAID-5 log entries replayed at start

    # -- geometry ------------------------------------------------------------

    def parity_col(self, s: int) -> int:
        return self.ncol - 1 - s % self.ncol

    def data_col(self, s: int, k: int) -> int:
        return (self.parity_col(s) + 1 + k) % self.ncol

    def _stripes(self, off: int, n: int) -> range:
        return range(off // self.width, -(-(off + n) // self.width))

    def _lock_span(self, off: int, n: int) -> tuple[int, int]:
        # Whole stripes: a write reads and rewrites its stripes' parity.
        return off // self.width * self.width, -(-(off + n) // self.width) * self.width

    def _mark_missed(self, rec: PlexRecord, off: int, length: int) -> None:
        if rec.missing is None or not length:
            return
        if rec.state == SNAPLINK:  # a link (Remote Copy) tracks volume bytes
            rec.missing.mark(off, length)
            return
        first = off // self.width * self.width
        rec.missing.mark(first, -(-(off + length) // self.width) * self.width - first)

    def lacks(self, c: int, s: int) -> bool:
        """Column c cannot be read for stripe s (away, failed, or not rebuilt there)."""
        p = self.columns[c]
        if p.fd < 0 or p.state not in (ACTIVE, SYNCING):
            return True
        m = p.record.missing
        if m is None:
            return p.state != ACTIVE
        return m.any_in(s * self.width, self.width)

    def _all_in(self) -> bool:
        return all(p.fd >= 0 and p.record.state == ACTIVE for p in self.columns)

    def _bad(self, s: int) -> list[int]:
        return [c for c in range(self.ncol) if self.lacks(c, s)]

    def _whole(self, stripes: range) -> bool:
        """Every column in, and none lacks any of `stripes`: one look at
        each column's map over them all, not one per stripe and column
        (27 of `lacks` for a 1 MiB write cost the event loop ~40 µs)."""
        if not self._all_in():
            return False
        at, n = stripes.start * self.width, len(stripes) * self.width
        return not any(p.record.missing is not None and p.record.missing.any_in(at, n)
                       for p in self.columns)

    def _writable(self, c: int) -> bool:
        p = self.columns[c]
        return p.fd >= 0 and p.state in WRITABLE

    def _can_serve(self) -> bool:
        # Two columns out serve when no stripe lacks both (vmd/raid5_double.py).
        return double.can_serve(self, [c for c in range(self.ncol)
                                       if self.columns[c].state != ACTIVE])

    # -- column I/O ----------------------------------------------------------

    async def _read_columns(self, pieces: list[Piece], alone: Alone = None,
                            read_ahead: bool = False) -> list[bytes | bytearray]:
        if len(pieces) == 1:  # `alone`: it may be read on the event loop (Plex.pread)
            c, off, n = pieces[0]
            return [await self.columns[c].pread(
                off, n, alone=alone, ahead=self._ahead(off, off + n) if read_ahead else None)]
        runs: list[list[Any]] = []  # [column, off, end, [piece indices]]
        for i in sorted(range(len(pieces)), key=lambda i: pieces[i][:2]):
            c, off, n = pieces[i]
            if runs and runs[-1][0] == c and runs[-1][2] == off:
                runs[-1][2] = off + n
                runs[-1][3].append(i)
            else:
                runs.append([c, off, off + n, [i]])
        out: list[Any] = [b""] * len(pieces)
        errors: list[PlexIOError] = []

        async def one(run: list[Any]) -> None:
            c, start, end, idx = run
            try:
                buf = memoryview(await self.columns[c].pread(
                    start, end - start, ahead=self._ahead(start, end) if read_ahead else None))
            except PlexIOError as e:
                errors.append(e)
                return
            for i in idx:
                _, off, n = pieces[i]
                out[i] = buf[off - start:off - start + n]

        async with trio.open_nursery() as nursery:
            for run in runs:
                nursery.start_soon(one, run)
        if errors:
            raise errors[0]
        return out

    async def _write_pieces(self, writes: list[tuple[int, int, bytes | bytearray | memoryview]]
                            ) -> list[PlexIOError]:
        """Write every piece, all columns in parallel; contiguous pieces of a
        column as one write. Returns the failures (the caller fails columns)."""
        percol: dict[int, list[tuple[int, Any]]] = {}
        for c, off, data in writes:
            percol.setdefault(c, []).append((off, data))
        # Per column, runs of contiguous pieces: (plex, offset, the pieces).
        merged: list[tuple[Plex, int, list[Any]]] = []
        if len(percol) == len(writes):  # one piece per column (a small write): as it is
            merged = [(self.columns[c], off, [data]) for c, off, data in writes]
            percol = {}
        for c, items in percol.items():
            items.sort(key=lambda t: t[0])
            start, parts = items[0][0], [items[0][1]]
            end = start + len(items[0][1])
            for off, data in items[1:]:
                if off == end:
                    parts.append(data)
                else:
                    merged.append((self.columns[c], start, parts))
                    start, parts = off, [data]
                end = off + len(data)
            merged.append((self.columns[c], start, parts))
        failed: list[PlexIOError] = []

        async def one(p: Plex, off: int, parts: list[Any]) -> None:
            try:
                await p.pwritev_async(off, parts)  # no join: one writev of them all
            except PlexIOError as e:
                failed.append(e)

        inline = [m for m in merged if m[0].write_inline()]
        if len(inline) < len(merged) or \
                sum(len(d) for m in merged for d in m[2]) >= INLINE_BYTES:
            async with trio.open_nursery() as nursery:
                for p, off, parts in merged:
                    nursery.start_soon(one, p, off, parts)
        else:
            # Small writes into the page cache: done before a thread hop would be.
            for p, off, parts in merged:
                try:
                    p.pwrite_inline(off, _join(parts))
                except PlexIOError as e:
                    failed.append(e)
        return failed

    async def _fail_columns(self, errors: Iterable[PlexIOError], stripes: range) -> None:
        for e in errors:
            await self.fail_plex(e.plex, e, stripes.start * self.width, len(stripes) * self.width)
        if self._failures_pending:
            await self.failures_durable()

    # -- writes --------------------------------------------------------------

    async def _write(self, off: int, data: bytes | memoryview | Zeros) -> None:
        n = len(data)
        if isinstance(data, Zeros):
            data = memoryview(bytes(n))  # a hole costs parity like any write
        else:
            data = memoryview(data)
        stripes = self._stripes(off, n)
        for p in self.plexes:
            if p.state == SNAPLINK and p.record.missing is not None:
                p.record.missing.mark(off, n)
        if n <= self.su:
            writes = await self._unit_write(off, data)
            if writes is not None:
                await self._put(writes, off, n, stripes)
                return
        if n >= self.width and await self._write_whole_stripes(off, data, stripes):
            return
        for attempt in range(self.ncol + 1):
            plan = self._plan_writes(off, data, stripes)
            try:
                reads = await self._read_pieces(plan.reads) if plan.reads else []
            except PlexIOError as e:
                await self._fail_columns([e], stripes)
                continue
            writes = plan.compute(reads)
            for c in range(self.ncol):
                if not self._writable(c):
                    self._mark_missed(self.columns[c].record, off, n)
            await self._put(writes, off, n, stripes)
            return
        raise VolumeIOError(errno.EIO, f"volume {self.name}: columns kept failing at {off}")

    async def _write_whole_stripes(self, off: int, data: memoryview, stripes: range) -> bool:
        """A write over one whole stripe or more, every column in: the whole
        stripes without WritePlan (full_stripes), the partial ones at its
        edges with it. False, having written nothing, where the general path
        must plan every stripe. The kernel's writeback of a sequential writer
        cuts its 1 MiB writes off the stripes (docs/performance.md): the
        plan's per-stripe bookkeeping of the middle was the event loop's
        most costly Python after the FUSE request itself."""
        n, width = len(data), self.width
        a, b = -(-off // width) * width, (off + n) // width * width
        if a >= b or not self._whole(stripes):
            return False
        plan = edge_plan(self, off, data, count=False)  # counted once written, not retried
        try:
            reads = await self._read_pieces(plan.reads) if plan.reads else []
        except PlexIOError as e:
            await self._fail_columns([e], stripes)
            return False  # planned again, the failed column lacking
        if not self._all_in():  # a column failed meanwhile: the plan must know
            return False
        writes = full_stripes(self, a, data[a - off:b - off]) + plan.compute(reads)
        for st in plan.stripes:
            self.method_counts[st["method"]] += 1
        await self._put(writes, off, n, stripes)
        return True

    async def _unit_write(self, off: int, data: memoryview
                          ) -> list[tuple[int, int, Any]] | None:
        """The column writes of a write inside one data unit of a stripe no
        column lacks (a 4 KiB random write), or None for the general path.
        Without WritePlan's per-stripe bookkeeping: at ~150 µs of CPU per
        request through FUSE, its dicts, sorts and nurseries were a third of
        a small write's cost. Reads what the plan would (the fewer bytes):
        the other data units' span (reconstruct-write: one read with 3
        columns) or the old data and the old parity (read-modify-write), and
        writes the data and the parity span."""
        n = len(data)
        i, uoff = divmod(off, self.su)
        if uoff + n > self.su:
            return None
        s, k = divmod(i, self.ncol - 1)
        for c in range(self.ncol):
            if self.lacks(c, s):
                return None  # degraded: the plan rebuilds the lacking column's span
        at = s * self.su + uoff
        dc, pc = self.data_col(s, k), self.parity_col(s)
        if self.ncol - 2 <= 2:  # reconstruct-write reads no more than RMW's two pieces
            method = "rcw"
            pieces = [(c, at, n) for c in range(self.ncol) if c != dc and c != pc]
        else:
            method = "rmw"
            pieces = [(dc, at, n), (pc, at, n)]
        try:
            got = await self._read_pieces(pieces, read_ahead=self._small_write_again(s))
        except PlexIOError as e:
            await self._fail_columns([e], self._stripes(off, n))
            return None  # the general path writes it degraded
        parity = bytearray(got[0])
        for b in got[1:]:
            xor_into(parity, b)
        xor_into(parity, data)
        self.method_counts[method] += 1
        return [(dc, at, data), (pc, at, parity)]

    async def _put(self, writes: list[tuple[int, int, Any]], off: int, n: int,
                   stripes: range) -> None:
        """Write the computed pieces: with a RAID-5 log, into its write-back
        cache (answered before any column is written); without, to the
        columns, answered once any column failure it met is durable."""
        cut = self._fault is not None and self._fault.matches(self.name, off)
        failed = await self.put_pieces(writes, stripes, cut=cut)
        if self.error is not None:
            raise VolumeIOError(errno.EIO, f"volume {self.name}: {self.error}")
        # A second column lost while this write was under way fails some
        # column, which is then not ACTIVE: with all in, nothing to look at.
        if (failed or not self._all_in()) and any(len(self._bad(s)) > 1 for s in stripes):
            raise VolumeIOError(errno.EIO, f"volume {self.name}: a write at {off} lost a "
                                f"second column: the stripe cannot be recovered")

    async def put_pieces(self, writes: list[tuple[int, int, Any]], stripes: range, *,
                         cut: bool = False) -> list[PlexIOError]:
        """The pieces to the RAID-5 log's cache, or (no log) to the columns;
        returns the column failures (now durable) of the latter."""
        if self.r5log is not None:
            await self.r5log.append(writes, cut=cut)
            return []
        if cut:
            self._cut(writes)
        failed = await self._write_pieces(writes)
        await self._fail_columns(failed, stripes)
        return failed

    def _cut(self, writes: list[tuple[int, int, Any]]) -> None:
        """The test fault: only the data (or only the parity) reaches the columns."""
        want = self._fault.part == "parity"  # type: ignore[union-attr]
        for c, at, data in (writes if self._fault.part != "none" else []):  # type: ignore[union-attr]
            # A piece at column offset `at` is of stripe at // su.
            if (c == self.parity_col(at // self.su)) == want:
                self.columns[c].pwrite_inline(at, data)
        self._fault.die()  # type: ignore[union-attr]

    def _plan_writes(self, off: int, data: memoryview, stripes: range) -> WritePlan:
        plan = WritePlan(self)
        for s in stripes:
            bad = self._bad(s)
            if len(bad) > 1:
                raise VolumeIOError(errno.EIO, f"volume {self.name}: stripe {s} lacks columns "
                                    f"{', '.join(self.columns[c].name for c in bad)}: no write "
                                    f"to it can be made recoverable")
            plan.add_stripe(s, off, data, bad[0] if bad else None)
        return plan

    # -- reads ---------------------------------------------------------------

    async def _read(self, off: int, size: int, alone: Alone = None) -> bytes:
        try:
            return await self._read_any(off, size, held=False, alone=alone)
        except _Reconstruct:
            # Rebuilt from the other columns: no write may change them between
            # the reads (nor the stripe's parity), so hold the whole stripes.
            async with self.ranges.hold(*self._lock_span(off, size)):
                return await self._read_any(off, size)

    async def _read_any(self, off: int, size: int, held: bool = True,
                        alone: Alone = None) -> bytes:
        for attempt in range(self.ncol + 1):
            pieces: list[Piece] = []
            recipe: list[tuple[int, int]] = []  # per output piece: (first read, count)
            pos = off
            end = off + size
            while pos < end:
                s, k, uoff = self._locate(pos)
                n = min(self.su - uoff, end - pos)
                c = self.data_col(s, k)
                if not self.lacks(c, s):
                    recipe.append((len(pieces), 1))
                    pieces.append((c, s * self.su + uoff, n))
                else:
                    others = [o for o in range(self.ncol) if o != c]
                    lost = [o for o in others if self.lacks(o, s)]
                    if lost:
                        raise VolumeIOError(errno.EIO, (
                            f"volume {self.name}: offset {pos} is on column "
                            f"{self.columns[c].name}, which is out, and stripe {s} also lacks "
                            f"{', '.join(self.columns[o].name for o in lost)}"))
                    if not held:
                        raise _Reconstruct
                    recipe.append((len(pieces), len(others)))
                    pieces.extend((o, s * self.su + uoff, n) for o in others)
                    self.degraded_reads += 1
                pos += n
            try:
                got = await self._read_pieces(pieces, alone)
            except PlexIOError as e:
                await self._fail_columns([e], self._stripes(off, size))
                continue
            if len(recipe) == 1 and recipe[0][1] == 1:
                return bytes(got[0])
            out = bytearray()
            for first, count in recipe:
                if count == 1:
                    out += got[first]
                else:
                    acc = bytearray(got[first])
                    for b in got[first + 1:first + count]:
                        xor_into(acc, b)
                    out += acc
            return bytes(out)
        raise VolumeIOError(errno.EIO, f"volume {self.name}: columns kept failing at {off}")

    def _locate(self, pos: int) -> tuple[int, int, int]:
        """(stripe, data unit in it, offset in the unit) of a volume offset."""
        i, uoff = divmod(pos, self.su)
        s, k = divmod(i, self.ncol - 1)
        return s, k, uoff

    async def data_ranges(self, off: int, size: int) -> list[tuple[int, int]]:
        """Whole stripes of [off, off+size) that may hold data. A stripe reads
        as zeros if every column that can be read there has a hole there and
        at most one cannot (its unit is the XOR of the others': zero too).
        Counting a column's data where it lacks the stripe only adds stripes,
        which is always safe (they are read)."""
        stripes = self._stripes(off, size)
        await self.gate.enter()
        try:
            # Taken before the columns are asked (as `_read_pieces` takes its
            # overlay before the read): a stripe written back and dropped
            # from the cache meanwhile is on its columns by then, or here.
            data: set[int] = set()
            if self.r5log is not None:  # acknowledged, not yet on the columns
                data.update(s for _, s in self.r5log.cache.units)
            for p in self.columns:
                if p.fd < 0 or p.state not in (ACTIVE, SYNCING):
                    continue
                for a, n in await p.allocated(stripes.start * self.su, len(stripes) * self.su):
                    data.update(range(a // self.su, -(-(a + n) // self.su)))
            keep = [s for s in stripes if s in data or len(self._bad(s)) > 1]
        finally:
            self.gate.exit()
        out: list[tuple[int, int]] = []
        for s in keep:
            a, b = max(off, s * self.width), min(off + size, (s + 1) * self.width)
            if out and out[-1][0] + out[-1][1] == a:
                out[-1] = (out[-1][0], b - out[-1][0])
            else:
                out.append((a, b - a))
        return out

    # -- status --------------------------------------------------------------

    def _health(self) -> dict[str, str | None]:
        if not self._can_serve():  # said first: a failed log's writes are moot then
            return {"health": "failed", "problem": double.outage(self)}
        # A failed RAID-5 log refuses every write: as much an outage.
        problem = None if self.r5log is None else self.r5log.problem()
        if problem is None:
            return super()._health()
        return {"health": "failed", "problem": problem}  # (it also set `error`: said better)

    def _layout_status(self) -> dict[str, Any]:
        stripes = self.size // self.width
        bad = sum(1 for s in range(stripes) if self._bad(s)) if stripes <= 1 << 16 else None
        return {
            "layout": "raid5", "stripe_unit": self.su,
            "columns": [self._plex_status(p) for p in self.columns],
            "plexes": [self._plex_status(p) for p in self.columns],
            "degraded": any(p.state != ACTIVE for p in self.columns),
            "stripes_lacking": bad,
            "write_methods": dict(self.method_counts),
            "degraded_reads": self.degraded_reads, "replayed_entries": self.replayed_entries,
            "raid5_log": None if self.r5log is None else self.r5log.status(),
        }

    # -- background work and stop ----------------------------------------------

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            if self.r5log is not None:
                await nursery.start(self.r5log.run)
            await nursery.start(super().run)
            task_status.started()

    async def shutdown(self) -> None:
        try:
            if self.r5log is not None:
                await self.r5log.stop()  # no retire while the columns close
            await super().shutdown()
            if self.r5log is not None and self.r5log.fd >= 0:
                # The columns were flushed by the shutdown: nothing to replay.
                self.r5log.reset()
        finally:
            if self.r5log is not None and self.r5log.halted():
                self.r5log.close()

    async def _quiesced(self) -> bool:
        if self.r5log is None:
            return True
        # Shielded: reached also when the stop is cancelled (its timeout),
        # with the committer's column writes in their threads.
        with trio.CancelScope(shield=True), trio.move_on_after(HALT_SECONDS):
            await self.r5log.halt()
        if not self.r5log.halted():
            log.critical("volume %s: the RAID-5 log's column writes did not end within %d s; "
                         "its files are left open", self.name, HALT_SECONDS)
        return self.r5log.halted()

    # -- membership (admin) --------------------------------------------------

    def _column(self, name: str) -> tuple[int, Plex]:
        for i, p in enumerate(self.columns):
            if p.name == name:
                return i, p
        raise VmdError(f"volume {self.name} has no column {name!r} "
                       f"(columns: {', '.join(p.name for p in self.columns)})")

    def _check_detachable(self, name: str) -> Plex:
        _, p = self._column(name)
        if p.record.state == DETACHED:
            raise VmdError(f"column {name} of volume {self.name} is already DETACHED")
        if p.record.state == ACTIVE and not all(q.state == ACTIVE for q in self.columns):
            raise VmdError(f"volume {self.name} is already degraded; detaching column "
                           f"{name} would leave stripes that cannot be read")
        return p

    async def detach_plex(self, name: str) -> dict[str, Any]:
        # Checked before the rebuild is paused too: a refused command must
        # not cut a rebuild pass short, which then starts over (trial 10, T-D).
        self._check_detachable(name)
        async with self.gate.hold(), self.resync.paused():
            await self.drain()  # its cached pieces onto it before it closes
            p = self._check_detachable(name)  # again: the drain may have failed it
            rec = p.record
            if rec.state in WRITABLE and p.fd >= 0:
                try:
                    await p.flush()
                except PlexIOError as e:
                    await self.fail_plex(p, e, 0, 0)
                    raise VmdError(f"column {name} of volume {self.name} failed to flush and "
                                   f"is IOFAIL now: {e}") from None
                rec.identity = p.identity()
            p.close()
            if rec.missing is None and self.state.fastresync:
                rec.missing = self.state.new_map()
            if not self.state.fastresync:
                rec.missing = None
            rec.state = DETACHED
            rec.reason = "detached by the administrator at " + time.strftime("%Y-%m-%d %H:%M:%S")
            await self.checkpoint()
        log.info("volume %s: column %s detached; the volume is degraded", self.name, name)
        return self._plex_status(p)

    def _attach_plan(self, name: str, path: str | None, force: bool
                     ) -> tuple[Plex, str, double.Plan | None]:
        """The column, why it is rebuilt whole ("" if not), and the plan
        for a second column out; a VmdError if it cannot come back."""
        _, p = self._column(name)
        if p.record.state not in (DETACHED, IOFAIL, STALE):
            raise VmdError(f"column {name} of volume {self.name} is {p.record.state}, "
                           f"not detached or failed")
        why = f"it is a new image ({path})" if path is not None else self._why_full_resync(p)
        return p, why, double.plan(self, p, why, path is not None, force)

    async def attach_plex(self, name: str, *, path: str | None = None,
                          force: bool = False) -> dict[str, Any]:
        """Bring a column back (or, with `path`, a new image in its place)
        and rebuild what it lacks in the background. With a second column
        out, both come back if no stripe lacks both, or `force` trusts this
        one's image on the stripes that do (vmd/raid5_double.py)."""
        self._attach_plan(name, path, force)  # a refusal leaves the rebuild alone (T-D)
        async with self.gate.hold(), self.resync.paused():
            p, why, other = self._attach_plan(name, path, force)  # again: under the gate
            rec = p.record
            if self.r5log is not None:
                # No entry from before it left may be replayed onto what its
                # rebuild writes (a write while it was away changed parity only).
                await self.drain()
                await self.r5log.retire()
                # A column that failed in that write-back changed the picture.
                other = double.plan(self, p, why, path is not None, force)
            if other is not None:
                double.bring_back(self, p, other)
            p.close()
            if path is not None:
                if path != rec.path:
                    imageid.retire_mark(self.state, name, rec.path)
                rec.path, rec.created, rec.identity = path, False, None
            try:
                p.open(create=path is not None)
            except OSError as e:
                if other is not None and other.q.state != SYNCING:
                    other.q.close()  # opened by bring_back: out again
                    other.q.record.missing = other.q_map
                raise VmdError(f"cannot open column image {rec.path}: {e.strerror or e}") from None
            if why:
                rec.missing = self.state.new_map(fill=True)
                log.warning("volume %s: column %s gets a full rebuild: %s", self.name, name, why)
            if other is not None:
                self._came_back(p, other)
            for q in [p] + ([other.q] if other is not None else []):
                lacks = q.record.missing.bits.any()  # type: ignore[union-attr]
                q.record.state = SYNCING if lacks else ACTIVE
                q.record.reason, q.record.identity = "", None
            await self.checkpoint()
        self.resync.wake()
        reply = {**self._plex_status(p), "full_resync": bool(why), "why": why}
        if other is not None:
            reply["with"] = other.q.name
        return reply

    def _came_back(self, p: Plex, other: double.Plan) -> None:
        """Say how the second column came back with `p`, and trust `p` where
        both lack (`--force`)."""
        q = other.q
        log.warning("volume %s: column %s comes back with %s%s", self.name, q.name, p.name,
                    f", rebuilt whole ({other.q_whole})" if other.q_whole else
                    ": each is rebuilt from the others on the stripes it lacks")
        if other.trust.any():
            double.trust(p.record.missing, other.trust, self.width)  # type: ignore[arg-type]
            log.critical("volume %s: column %s trusted as it is on %d stripe(s) that column "
                         "%s lacks too (--force): check the filesystem on the volume",
                         self.name, p.name, other.trust.count(), q.name)

    async def add_plex(self, path: str, **kw: Any) -> Plex:
        if kw.get("role") == "snapshot":
            raise VmdError(f"volume {self.name} is RAID-5: snapshots break off a third mirror "
                           f"and need a mirror volume; a copy of a RAID-5 volume is made with "
                           f"Remote Copy (`vmd rcopy`), or by copying its file while it is quiet")
        raise VmdError(f"volume {self.name} is RAID-5: it has columns, not plexes; use "
                       f"`vmd plex replace {self.name} cN PATH` to put a new image in place "
                       f"of a failed column")

    async def remove_plex(self, name: str, **kw: Any) -> tuple[PlexRecord, str]:
        raise VmdError(f"volume {self.name} is RAID-5: a column cannot be removed; "
                       f"`vmd plex detach {self.name} {name}` takes it out")

    def _readable(self, off: int, size: int, *, rotate: bool = True) -> list[Plex]:
        return []  # no single source: a rebuild reads every other column


class _Reconstruct(Exception):
    """A read must rebuild a unit from the other columns: it needs its stripes' lock."""


def _join(parts: list[Any]) -> Any:
    return parts[0] if len(parts) == 1 else b"".join(parts)
