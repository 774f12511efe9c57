"""The mirror engine: one `Volume` over two or more plexes.

Data flows one way: pread/pwrite → DRL bookkeeping → plex I/O fanned out in
parallel. FUSE and the admin socket are thin adapters over this class; it
imports neither.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

import trio

from .access import OPEN, AccessRules
from .config import VolumeConfig, format_size
from .drl import DirtyRegionLog
from .faults import split_write_fault
from .nbdplex import RemoteWatch
from .plex import PARALLEL_BYTES, Plex, PlexIOError
from .rangelock import Gate, RangeLock
from .resync import Resync
from .sidecar import (ACTIVE, DETACHED, IOFAIL, SNAPATT, SNAPDONE, SNAPLINK,
                      STALE, SYNCING, WRITABLE, PlexRecord, SidecarLog, VolumeState)
from .errors import VmdError

log = logging.getLogger(__name__)


class VolumeIOError(OSError):
    pass


def _is_remote(p: Plex) -> bool:
    return p.remote


class Zeros(int):
    """What `pwrite_unguarded` writes to make a range read as zeros: punched
    where the plexes' images can (`Plex.punch`), under the same range lock,
    DRL and maps as a write. Its length is its value."""

    def __len__(self) -> int:
        return int(self)


def delete_if_created(rec: PlexRecord) -> str:
    """Delete a removed snapshot mirror's image only if vmd named and created
    it: one the administrator named (`snap start --path`) may be the only
    copy of something. Returns what became of it, in the words that both
    the log and the CLI use."""
    if not rec.created:
        return f"image {rec.path} left in place: vmd deletes only images it named and created"
    try:
        os.unlink(rec.path)
    except OSError as e:
        return (f"image {rec.path} left in place (vmd created it but cannot delete it: "
                f"{e.strerror or e})")
    return f"image {rec.path} deleted (vmd created it)"


class Volume:
    # Called as `await before_write(off, n)` inside pwrite, with the range
    # held and before the DRL and the plex writes (Remote Copy's copy-on-write).
    before_write: Callable[[int, int], Any] | None = None

    def __init__(self, cfg: VolumeConfig, state: VolumeState, sidecar: SidecarLog,
                 plexes: Iterable[Plex], *, clean_delay: float = 5.0, rate_limit: int = 0,
                 plex_factory: Callable[[PlexRecord, int], Plex] = Plex):
        self.cfg = cfg
        self.name = cfg.name
        self.state = state
        self.size = state.size
        self.sidecar = sidecar
        self.plexes: list[Plex] = list(plexes)
        self.plex_factory = plex_factory
        self.ranges = RangeLock()
        self.access: AccessRules = OPEN  # asked by pread/pwrite (user I/O) first
        self.gate = Gate()
        self.drl = DirtyRegionLog(state, sidecar, enabled=cfg.drl, clean_delay=clean_delay,
                                  flush_plexes=self.flush, fmr_bits=self._fmr_bits,
                                  checkpoint=self.checkpoint)
        self.resync = Resync(self, rate_limit=rate_limit)
        self.openers = 0
        self.recovered_regions = 0  # DRL regions recovered after the last unclean stop
        # Records removed at open whose images go once the start checkpoint
        # no longer names them (a crash before it must not leave a plex
        # recorded whose image is gone).
        self.removed_at_open: list[PlexRecord] = []
        self._rr = itertools.count()
        self._recovering = False  # some ACTIVE plex lacks regions (crash recovery)
        self.max_write = 0  # largest write seen (the FUSE request size the kernel sends)
        self.writes = 0
        self.reads = 0
        self.error: str | None = None  # set when the log cannot be written: writes refused
        self.stopped = False
        self._failures_pending = 0
        self._failures_done = trio.Event()
        self._fault = split_write_fault()
        self._update_recovering()

    # -- helpers -------------------------------------------------------------

    def plex(self, name: str) -> Plex:
        for p in self.plexes:
            if p.name == name and p.state != SNAPLINK:
                return p
        raise VmdError(f"volume {self.name} has no plex {name!r} "
                       f"(plexes: {', '.join(p.name for p in self.plexes) or 'none'})")

    def _update_recovering(self) -> None:
        self._recovering = any(p.state == ACTIVE and p.record.missing is not None
                               and p.record.missing.bits.any() for p in self.plexes)

    def _check_range(self, off: int, length: int, write: bool) -> None:
        if off < 0 or length < 0:
            raise VolumeIOError(errno.EINVAL, "negative offset or length")
        if write and off + length > self.size:
            raise VolumeIOError(errno.ENOSPC, f"write past the end of volume {self.name}")

    def _fmr_bits(self, regions: list[int]) -> dict[str, list[int]]:
        """Per plex that misses writes, its map bits inside DRL `regions`."""
        out: dict[str, list[int]] = {}
        drl = self.state.drl
        for p in self.plexes:
            m = p.record.missing
            if p.state in WRITABLE or m is None or not m.bits.any():
                continue
            bits: list[int] = []
            for r in regions:
                off, n = drl.region_bytes(r)
                span = m.span(off, n)
                bits.extend(span.start + i for i in m.bits[span.start:span.stop].search(1))
            if bits:
                out[p.name] = bits
        return out

    async def checkpoint(self) -> None:
        """Make the whole in-memory state durable (membership and states)."""
        await self.sidecar.checkpoint(lambda: self.state)

    # -- I/O -----------------------------------------------------------------

    def pwrite(self, off: int, data: bytes | memoryview) -> Coroutine[Any, Any, int]:
        """A user's write (the FUSE adapter's): refused if the access rules say
        so. Not a coroutine of its own: it hands back the engine's, so the rules
        cost a user request one call, not a second coroutine frame."""
        refused = self.access.refuse_write()
        if refused is not None:
            raise VolumeIOError(*refused)
        return self.pwrite_unguarded(off, data)

    async def pwrite_unguarded(self, off: int, data: bytes | memoryview | Zeros) -> int:
        """The engine's write, past the access rules: for the feature that set them."""
        await trio.lowlevel.checkpoint_if_cancelled()
        n = len(data)
        if self.error is not None:
            raise VolumeIOError(errno.EIO, f"volume {self.name}: {self.error}")
        self._check_range(off, n, True)
        if n == 0:
            return 0
        await self.gate.enter()
        try:
            async with self.ranges.hold(off, off + n):
                if self.before_write is not None:
                    await self.before_write(off, n)
                regions = await self.drl.begin_write(off, n)
                try:
                    await self._fanout_write(off, data)
                finally:
                    self.drl.end_write(regions)
        finally:
            self.gate.exit()
        self.writes += 1
        if n > self.max_write and not isinstance(data, Zeros):
            self.max_write = n
        return n

    async def _fanout_write(self, off: int, data: bytes | memoryview | Zeros) -> None:
        n = len(data)
        targets: list[Plex] = []
        for p in self.plexes:
            if p.state in WRITABLE:
                targets.append(p)
            elif p.record.missing is not None:
                p.record.missing.mark(off, n)  # FastResync: this plex misses the write
        failed: list[PlexIOError] = []
        zero = isinstance(data, Zeros)
        if self._fault is not None and self._fault.matches(self.name, off) and targets \
                and not zero:
            await targets[0].pwrite(off, data)  # type: ignore[arg-type]
            self._fault.die()

        async def threaded(p: Plex) -> None:
            try:
                if zero:
                    await p.punch(off, n)
                else:
                    await p.pwrite_async(off, data)  # type: ignore[arg-type]
            except PlexIOError as e:
                failed.append(e)

        # A punch is a syscall that may take a while: never inline.
        inline = [] if zero else [p for p in targets if p.write_inline()]
        if n >= PARALLEL_BYTES and len(inline) > 1:
            inline = inline[:1]  # big: copy into the page caches in parallel
        if len(inline) < len(targets):
            # The others through io_uring (or worker threads), all at once, so
            # that none waits for another (a slow plex never delays the rest).
            async with trio.open_nursery() as nursery:
                for p in targets:
                    if p not in inline:
                        nursery.start_soon(threaded, p)
                self._write_inline(inline, off, data, failed)
        else:
            # No schedule point here on purpose: a page-cache write is done,
            # and the FUSE loop yields before every request anyway. An extra
            # trip through the scheduler cost 20 % of 4 KiB random-write IOPS.
            self._write_inline(inline, off, data, failed)  # type: ignore[arg-type]
        for e in failed:
            await self.fail_plex(e.plex, e, off, n)
        if failed:
            for p in targets:
                if p.state not in WRITABLE and p.inflight == 0:
                    # Writes in flight when it failed may have changed its
                    # mtime: the identity to trust at reattach is the last one.
                    p.record.identity = p.identity()
        if self._failures_pending:
            await self.failures_durable()
        if self.error is not None:
            raise VolumeIOError(errno.EIO, f"volume {self.name}: {self.error}")
        if not any(p.state == ACTIVE for p in targets):
            raise VolumeIOError(errno.EIO, f"volume {self.name}: no plex took the write at {off}")

    @staticmethod
    def _write_inline(plexes: list[Plex], off: int, data: bytes | memoryview,
                      failed: list[PlexIOError]) -> None:
        for p in plexes:
            try:
                p.pwrite_inline(off, data)
            except PlexIOError as e:
                failed.append(e)

    def pread(self, off: int, size: int) -> Coroutine[Any, Any, bytes]:
        """A user's read (the FUSE adapter's): refused if the access rules say
        so; hands back the engine's coroutine, as pwrite does."""
        refused = self.access.refuse_read()
        if refused is not None:
            raise VolumeIOError(*refused)
        return self.pread_unguarded(off, size)

    async def pread_unguarded(self, off: int, size: int) -> bytes:
        """The engine's read, past the access rules: for the feature that set them."""
        if self.stopped:
            raise VolumeIOError(errno.EIO, f"volume {self.name} is stopped")
        self._check_range(off, size, False)
        if off >= self.size or size == 0:
            return b""
        size = min(size, self.size - off)
        await self.gate.enter()
        try:
            if self._recovering:
                lacking = [p for p in self.plexes if p.state == ACTIVE
                           and p.record.missing is not None and p.record.missing.any_in(off, size)]
                if lacking:
                    return await self._read_writeback(off, size)
            return await self._read_any(off, size)
        finally:
            self.gate.exit()
            self.reads += 1

    def _readable(self, off: int, size: int, *, rotate: bool = True) -> list[Plex]:
        """ACTIVE plexes holding [off, off+size) in sync, in round-robin order
        (or in plex order: resync reads one source, which it reads ahead)."""
        ps = [p for p in self.plexes if p.state == ACTIVE and not (
            self._recovering and p.record.missing is not None and p.record.missing.any_in(off, size))]
        if rotate and len(ps) > 1:
            k = next(self._rr) % len(ps)
            ps = ps[k:] + ps[:k]
        if len(ps) > 1:
            ps.sort(key=_is_remote)  # local plexes first: a remote one is a network trip away
        return ps

    async def _read_any(self, off: int, size: int) -> bytes:
        for p in self._readable(off, size):
            if p.state != ACTIVE:  # failed while we tried another
                continue
            try:
                return await p.pread(off, size)
            except PlexIOError as e:
                await self.fail_plex(p, e, off, size)
        raise VolumeIOError(errno.EIO, f"volume {self.name}: no plex could read offset {off}")

    async def data_ranges(self, off: int, size: int) -> list[tuple[int, int]]:
        """The allocated ranges of [off, off+size) on a plex in sync there (the
        rest reads as zeros); all of it where no plex can say."""
        await self.gate.enter()
        try:
            for p in self._readable(off, size, rotate=False):
                return await p.allocated(off, size)
            return [(off, size)]
        finally:
            self.gate.exit()

    async def _read_writeback(self, off: int, size: int) -> bytes:
        """Read a region not yet recovered: read one plex, write the others,
        so that two reads return the same bytes (invariant 7)."""
        fmr = self.state.fmr_region
        start = off - off % fmr
        end = min(self.size, -(-(off + size) // fmr) * fmr)
        async with self.ranges.hold(start, end):
            regions = await self.drl.begin_write(start, end - start)
            try:
                data = await self._read_any(start, end - start)
                for p in self.plexes:
                    m = p.record.missing
                    if p.state == ACTIVE and m is not None and m.any_in(start, end - start):
                        try:
                            await p.pwrite(start, data)
                        except PlexIOError as e:
                            await self.fail_plex(p, e, start, end - start)
                            continue
                        # Safe to forget before fdatasync: the DRL region stays
                        # dirty until the plexes are flushed.
                        span = m.span(start, end - start)
                        m.bits[span.start:span.stop] = 0
            finally:
                self.drl.end_write(regions)
        self._update_recovering()
        return data[off - start: off - start + size]

    async def flush(self) -> None:
        """fdatasync every plex that takes writes, in parallel."""
        failed: list[PlexIOError] = []

        async def one(p: Plex) -> None:
            try:
                await p.flush()
            except PlexIOError as e:
                failed.append(e)

        async with trio.open_nursery() as nursery:
            for p in self.plexes:
                if p.state in WRITABLE and p.fd >= 0:
                    nursery.start_soon(one, p)
        for e in failed:
            await self.fail_plex(e.plex, e, 0, 0)
        if failed and not any(p.state == ACTIVE for p in self.plexes):
            raise VolumeIOError(errno.EIO, f"volume {self.name}: no plex could be flushed")

    async def flush_plex(self, p: Plex) -> None:
        """fdatasync one plex before it leaves; an error makes it IOFAIL (its
        data cannot be trusted) and refuses the operation."""
        try:
            await p.flush()
        except PlexIOError as e:
            await self.fail_plex(p, e, 0, 0)
            raise VmdError(f"plex {p.name} of volume {self.name} failed to flush and is "
                           f"IOFAIL now: {e}") from None

    async def fail_plex(self, p: Plex, err: OSError, off: int, length: int) -> None:
        """Detach a plex after an I/O error (state IOFAIL), durably, before the
        I/O that failed is answered."""
        rec = p.record
        if rec.missing is not None and length:
            rec.missing.mark(off, length)
        if rec.state in (IOFAIL, DETACHED, STALE):
            await self.failures_durable()  # another task is recording it
            return
        was = rec.state
        rec.state = IOFAIL
        rec.reason = str(err)
        rec.identity = p.identity()
        if not self.state.fastresync:
            rec.missing = None
        elif rec.missing is None:
            rec.missing = self.state.new_map()
        # An existing map (resync progress, crash recovery) is kept: it is
        # still what the plex lacks.
        if rec.missing is not None:
            if length:
                rec.missing.mark(off, length)
            # Its earlier writes may still sit unsynced in its page cache,
            # and a failing disk may drop them: every region not yet cleaned.
            if self.drl.enabled:
                rec.missing.mark_regions_of(self.state.drl, list(self.state.drl.set_indices()))
            else:
                rec.missing.fill()
        log.error("volume %s: plex %s (%s) is now IOFAIL after %s (was %s)",
                  self.name, p.name, p.path, err, was)
        self._update_recovering()
        if not self._failures_pending:
            self._failures_done = trio.Event()
        self._failures_pending += 1
        try:
            # Shielded: writes that skipped this plex wait for this record.
            with trio.CancelScope(shield=True):
                await self.checkpoint()
        except OSError as e:
            self.error = f"cannot record in {self.sidecar.path} that plex {p.name} failed: {e}"
            log.critical("volume %s: %s; refusing writes", self.name, self.error)
        finally:
            self._failures_pending -= 1
            if not self._failures_pending:
                self._failures_done.set()
        self.resync.wake()

    async def failures_durable(self) -> None:
        """Until every plex failure seen so far is in the sidecar log: a write
        that skipped a failed plex may be answered only then."""
        while self._failures_pending:
            await self._failures_done.wait()

    # -- open/close accounting (for `stop` and the volume clean flag) --------

    def opened(self) -> None:
        self.openers += 1

    def released(self) -> None:
        self.openers -= 1

    # -- background work -----------------------------------------------------

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.drl.run_committer)
            await nursery.start(self.drl.run_cleaner, lambda: self.openers == 0)
            await nursery.start(self.resync.run)
            await nursery.start(RemoteWatch(self).run)
            task_status.started()

    async def shutdown(self) -> None:
        """Drain I/O, flush plexes, record the volume clean, close files."""
        async with self.gate.hold():
            # A file handle still open (stop --force, snap back --force) gets
            # EIO from now on instead of waiting on stopped background tasks.
            self.stopped = True
            self.error = self.error or "the volume is stopped"
            await self.resync.stop()
            try:
                await self.flush()
                if not await self.drl.mark_clean():
                    log.warning("volume %s: could not record a clean stop", self.name)
                await self.checkpoint()
            finally:
                for p in self.plexes:
                    p.close()
                self.sidecar.close()
        log.info("volume %s: stopped cleanly", self.name)

    # -- status --------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        st = self.state
        return {
            "name": self.name,
            "uuid": st.uuid,
            "size": self.size,
            "clean": st.clean,
            "open": self.openers,
            "drl": self.drl.enabled,
            "region_size": st.region_size,
            "dirty_regions": st.drl.count(),
            "fastresync": st.fastresync,
            "fastresync_region": st.fmr_region,
            "recovered_regions": self.recovered_regions,
            "max_write": self.max_write,
            "log": str(self.sidecar.path),
            "log_bytes": self.sidecar.size,
            "plexes": [self._plex_status(p) for p in self.plexes if p.state != SNAPLINK],
            "resync": self.resync.status(),
            **self._snapshot_status(),
        }

    def _snapshot_status(self) -> dict[str, Any]:
        """Snapshot relationships: what was broken off this volume, or what
        this volume was broken off, and how much changed on this side since."""
        out: dict[str, Any] = {}
        links = {p.name: p.record for p in self.plexes if p.state == SNAPLINK}

        def changed(name: str) -> int | None:
            rec = links.get(f"snap:{name}")
            return None if rec is None or rec.missing is None else rec.missing.bytes_covered()

        info = self.state.extra.get("snapshot")
        if info and not info.get("cleared"):
            out["snapshot"] = {**info, "changed_bytes": changed(info["of"])}
        snaps = [{"name": n, "taken": s["taken"], "changed_bytes": changed(n)}
                 for n, s in self.state.extra.get("snapshots", {}).items() if not s.get("cleared")]
        if snaps:
            out["snapshots"] = snaps
        return out

    def _plex_status(self, p: Plex) -> dict[str, Any]:
        m = p.record.missing
        return {
            "name": p.name, "path": p.record.path, "state": p.state,
            "reason": p.record.reason,
            # Bytes this plex lacks: what a resync or reattach will copy.
            "missing_bytes": self.size if m is None else m.bytes_covered(),
            "map": m is not None,
            "role": p.record.role,
            # Writes that stalled the event loop (> 2 ms): each moves the plex
            # off it for a while. Many of them: a slow or throttled disk.
            "slow_writes": p.slow_writes,
            **p.status_extra(),
        }

    # -- membership (admin) --------------------------------------------------

    def _in_sync(self, exclude: Plex | None = None) -> list[Plex]:
        return [p for p in self.plexes if p is not exclude and p.state == ACTIVE
                and (p.record.missing is None or not p.record.missing.bits.any())]

    async def detach_plex(self, name: str) -> dict[str, Any]:
        async with self.gate.hold(), self.resync.paused():
            p = self.plex(name)
            rec = p.record
            if rec.state == DETACHED:
                raise VmdError(f"plex {name} of volume {self.name} is already DETACHED")
            if rec.state in (SNAPATT, SNAPDONE):
                raise VmdError(f"plex {name} of volume {self.name} is a snapshot mirror "
                               f"({rec.state}): use `vmd snap abort {self.name}`")
            if rec.state == ACTIVE and not self._in_sync(exclude=p):
                raise VmdError(f"plex {name} is the last in-sync plex of volume {self.name}; "
                               f"detaching it would leave no complete copy")
            was_writable = rec.state in WRITABLE
            if was_writable and p.fd >= 0:
                await self.flush_plex(p)
            p.close()
            if rec.missing is None and self.state.fastresync and rec.state == ACTIVE:
                rec.missing = self.state.new_map()
            if not self.state.fastresync:
                rec.missing = None
            rec.state = DETACHED
            rec.reason = "detached by the administrator at " + time.strftime("%Y-%m-%d %H:%M:%S")
            if was_writable:
                # An IOFAIL plex keeps the identity from its failure: changes
                # made to its image since must not become trusted.
                rec.identity = p.identity()
            self._update_recovering()
            await self.checkpoint()
        log.info("volume %s: plex %s detached%s", self.name, name,
                 " (FastResync tracks what it misses)" if rec.missing is not None else "")
        return self._plex_status(p)

    async def attach_plex(self, name: str) -> dict[str, Any]:
        async with self.gate.hold(), self.resync.paused():
            p = self.plex(name)
            rec = p.record
            if rec.state not in (DETACHED, IOFAIL, STALE):
                raise VmdError(f"plex {name} of volume {self.name} is {rec.state}, not detached")
            if not self._in_sync():
                raise VmdError(f"volume {self.name} has no in-sync plex to copy from")
            why = self._why_full_resync(p)
            p.close()
            p.open(create=True)
            if why:
                rec.missing = self.state.new_map(fill=True)
                log.warning("volume %s: plex %s gets a full resync: %s", self.name, name, why)
            else:
                log.info("volume %s: plex %s reattached with FastResync: %s to copy", self.name,
                         name, format_size(rec.missing.bytes_covered()))  # type: ignore[union-attr]
            # Nothing missed (reattached at once): in sync already.
            rec.state = SYNCING if rec.missing.bits.any() else ACTIVE  # type: ignore[union-attr]
            rec.reason, rec.identity = "", None
            await self.checkpoint()
        self.resync.wake()
        return {**self._plex_status(p), "full_resync": bool(why), "why": why}

    def _why_full_resync(self, p: Plex) -> str:
        rec = p.record
        if rec.missing is None:
            return "no FastResync map for it (FastResync was off, or it was never tracked)"
        if not self.state.fastresync:
            return "FastResync is off for this volume"
        return p.why_changed()

    async def add_plex(self, path: str, *, state: str = SYNCING, role: str = "",
                       named: bool = False) -> Plex:
        """`named`: the administrator chose `path`, so the image is theirs even
        if vmd creates the file (never deleted, see `delete_if_created`)."""
        async with self.gate.hold(), self.resync.paused():
            if not self._in_sync():
                raise VmdError(f"volume {self.name} has no in-sync plex to copy from")
            existed = os.path.exists(path)
            rec = PlexRecord(name=f"p{self.state.next_plex}", path=path, state=state,
                             missing=self.state.new_map(fill=True),
                             created=not existed and not named, role=role)
            p = self.plex_factory(rec, self.size)
            try:
                p.open(create=True)
            except OSError as e:
                if not existed:
                    with contextlib.suppress(OSError):
                        os.unlink(path)
                raise VmdError(f"cannot open plex image {path}: {e.strerror or e}") from None
            self.state.next_plex += 1
            self.state.plexes.append(rec)
            self.plexes.append(p)
            await self.checkpoint()
        log.info("volume %s: plex %s added (%s), full resync", self.name, rec.name, path)
        self.resync.wake()
        return p

    async def remove_plex(self, name: str, *, snapshot_ok: bool = False,
                          delete_created: bool = False) -> tuple[PlexRecord, str]:
        """Returns the plex's record and what became of its image."""
        async with self.gate.hold(), self.resync.paused():
            p = self.plex(name)
            if p.state in (SNAPATT, SNAPDONE) and not snapshot_ok:
                raise VmdError(f"plex {name} of volume {self.name} is a snapshot mirror: "
                               f"use `vmd snap abort {self.name}`")
            if p.state == ACTIVE and not self._in_sync(exclude=p):
                raise VmdError(f"plex {name} is the last in-sync plex of volume {self.name}; "
                               f"removing it would leave no complete copy")
            p.close()
            self.plexes.remove(p)
            self.state.plexes.remove(p.record)
            self._update_recovering()
            await self.checkpoint()
        fate = delete_if_created(p.record) if delete_created else f"image {p.path} left in place"
        log.info("volume %s: plex %s removed (%s)", self.name, name, fate)
        return p.record, fate

    async def set_fastresync(self, on: bool) -> None:
        async with self.gate.hold():
            self.state.fastresync = on
            if not on:
                # The next reattach of every away plex is full (the maps are dropped).
                for p in self.plexes:
                    if p.state not in WRITABLE:
                        p.record.missing = None
            await self.checkpoint()
        log.info("volume %s: FastResync %s", self.name, "on" if on else "off")
