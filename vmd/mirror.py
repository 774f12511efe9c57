"""The mirror layout: a `Volume` over two or more plexes, each a full copy.

Writes fan out to every plex that takes them, in parallel; reads go round
robin over the in-sync plexes (read-writeback while a crash is recovered);
a plex that misses writes keeps a FastResync map, and the membership verbs
(detach, attach, add, remove) move plexes in and out. The front
(`vmd/volume.py`) does everything that is not layout.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import trio

from . import events
from .config import VolumeConfig, format_size
from .errors import VmdError
from .nbdlink import Request
from .nbdplex import NbdPlex
from .plex import PARALLEL_BYTES, Alone, Plex, PlexIOError
from .resync import Resync
from .sidecar import (ACTIVE, DETACHED, IOFAIL, SNAPATT, SNAPDONE, SNAPLINK, STALE, SYNCING,
                      WRITABLE, PlexRecord, SidecarLog, VolumeState)
from .volume import Volume, VolumeIOError, Zeros, delete_if_created

log = logging.getLogger(__name__)


def _is_remote(p: Plex) -> bool:
    return p.remote


# The fan-out's scope when nothing in it waits (see MirrorVolume._write).
_NO_WAIT = contextlib.nullcontext()


class MirrorVolume(Volume):
    def __init__(self, cfg: VolumeConfig, state: VolumeState, sidecar: SidecarLog,
                 plexes: Iterable[Plex], *, clean_delay: float = 5.0, rate_limit: int = 0,
                 plex_factory: Callable[[PlexRecord, int], Plex] = Plex):
        super().__init__(cfg, state, sidecar, plexes, clean_delay=clean_delay,
                         plex_factory=plex_factory)
        self.resync = Resync(self, rate_limit=rate_limit)
        self._rr = itertools.count()
        self._recovering = False  # some ACTIVE plex lacks regions (crash recovery)
        self._update_recovering()
        # One attach at a time (an admin's and RemoteWatch's may meet): each
        # prepares the plex's connection, which the next must not replace.
        self._attaching = trio.Lock()

    def _update_recovering(self) -> None:
        self._recovering = any(p.state == ACTIVE and p.record.missing is not None
                               and p.record.missing.bits.any() for p in self.plexes)

    def _mark_missed(self, rec: PlexRecord, off: int, length: int) -> None:
        rec.missing.mark(off, length)  # type: ignore[union-attr]

    def _can_serve(self) -> bool:
        return any(p.state == ACTIVE for p in self.plexes)

    def _is_last(self, p: Plex) -> bool:
        return not any(q is not p and q.state == ACTIVE for q in self.plexes)

    # -- writes --------------------------------------------------------------

    async def _write(self, off: int, data: bytes | memoryview | Zeros) -> None:
        """The fan-out: every plex that takes writes, in parallel."""
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
        inline = [] if zero else [p for p in targets if not p.remote and p.write_inline()]
        if n >= PARALLEL_BYTES and len(inline) > 1:
            inline = inline[:1]  # big: copy into the page caches in parallel
        # Shielded from the first send until every failure is recorded: a
        # writer cancelled in between (a Remote Copy apply or a repair being
        # stopped) would leave sent writes unawaited, their plexes counted in
        # flight for good and their errors unread, and the failures of the
        # others never recorded. Every wait inside is bounded (the remote
        # watchdog; local writes are not cancellable anyway). Only where
        # there is a wait: a shield costs 7 µs, the inline write about 2.
        waits = len(inline) < len(targets)
        with trio.CancelScope(shield=True) if waits else _NO_WAIT:
            # Remote plexes first: the write goes out on the wire now, and its
            # reply is awaited once the local plexes are written (no task each).
            sent: list[tuple[NbdPlex, Request]] = []
            if not zero:
                for p in targets:
                    if isinstance(p, NbdPlex):
                        try:
                            sent.append((p, p.write_begin(off, data)))  # type: ignore[arg-type]
                        except PlexIOError as e:
                            failed.append(e)
            if len(inline) + len(sent) < len(targets):
                # The others through io_uring (or worker threads), all at once, so
                # that none waits for another (a slow plex never delays the rest).
                async with trio.open_nursery() as nursery:
                    for p in targets:
                        if p not in inline and (zero or not p.remote):
                            nursery.start_soon(threaded, p)
                    self._write_inline(inline, off, data, failed)
            else:
                # No schedule point here on purpose: a page-cache write is done,
                # and the FUSE loop yields before every request anyway. An extra
                # trip through the scheduler cost 20 % of 4 KiB random-write IOPS.
                self._write_inline(inline, off, data, failed)  # type: ignore[arg-type]
            for p, req in sent:
                try:
                    await p.write_end(req, off, data)  # type: ignore[arg-type]
                except PlexIOError as e:
                    failed.append(e)
        kept: list[PlexIOError] = []
        if failed:
            with trio.CancelScope(shield=True):
                kept = [e for e in failed if not await self.fail_plex(e.plex, e, off, n)]
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
        if kept:
            raise VolumeIOError(errno.EIO, f"volume {self.name}: the write at {off} failed on "
                                f"plex {kept[0].plex.name}, its last in-sync plex: {kept[0]}")
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

    # -- reads ---------------------------------------------------------------

    async def _read(self, off: int, size: int, alone: Alone = None) -> bytes:
        if self._recovering:
            lacking = [p for p in self.plexes if p.state == ACTIVE
                       and p.record.missing is not None and p.record.missing.any_in(off, size)]
            if lacking:
                return await self._read_writeback(off, size)
        return await self._read_any(off, size, alone)

    def _readable(self, off: int, size: int, *, rotate: bool = True) -> list[Plex]:
        """ACTIVE plexes holding [off, off+size) in sync, in round-robin order
        (or in plex order: resync reads one source, which it reads ahead)."""
        ps = [p for p in self.plexes if p.state == ACTIVE and not (
            self._recovering and p.record.missing is not None and p.record.missing.any_in(off, size))]
        if rotate and len(ps) > 1:
            k = next(self._rr) % len(ps)
            ps = ps[k:] + ps[:k]
        if len(ps) > 1 and ps[0].remote:
            # Local plexes first: a remote one is a network trip away. Only
            # when the rotation put a remote one first: no per-read sort on a
            # volume of local plexes.
            ps.sort(key=_is_remote)
        return ps

    async def _read_any(self, off: int, size: int, alone: Alone = None) -> bytes:
        for p in self._readable(off, size):
            if p.state != ACTIVE:  # failed while we tried another
                continue
            try:
                return await p.pread(off, size, alone=alone)
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

    async def flush_plex(self, p: Plex) -> None:
        """fdatasync one plex before it leaves; an error makes it IOFAIL (its
        data cannot be trusted) and refuses the operation."""
        try:
            await p.flush()
        except PlexIOError as e:
            await self.fail_plex(p, e, 0, 0)
            raise VmdError(f"plex {p.name} of volume {self.name} failed to flush and is "
                           f"IOFAIL now: {e}") from None

    # -- status --------------------------------------------------------------

    def _layout_status(self) -> dict[str, Any]:
        return {"plexes": [self._plex_status(p) for p in self.plexes if p.state != SNAPLINK]}

    # -- membership (admin) --------------------------------------------------

    def _in_sync(self, exclude: Plex | None = None) -> list[Plex]:
        return [p for p in self.plexes if p is not exclude and p.state == ACTIVE
                and (p.record.missing is None or not p.record.missing.bits.any())]

    def _check_detachable(self, name: str) -> Plex:
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
        return p

    async def detach_plex(self, name: str) -> dict[str, Any]:
        # Checked before the resync is paused too: a refused command must not
        # cut a resync pass short, which then starts over (trial 10, T-D).
        self._check_detachable(name)
        async with self.gate.hold(), self.resync.paused():
            p = self._check_detachable(name)  # again: it may have changed meanwhile
            rec = p.record
            was, was_writable = rec.state, rec.state in WRITABLE
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
        events.emit(events.PLEX_STATE, self.name, name, state=DETACHED, was=was, reason=rec.reason)
        return self._plex_status(p)

    async def attach_plex(self, name: str) -> dict[str, Any]:
        p = self.plex(name)
        self._check_attachable(p)
        async with self._attaching:
            # Before the gate: a remote plex's connection may take
            # remote_timeout, and writes (every volume's: the event loop) go
            # on meanwhile.
            await p.prepare_attach()
            try:
                return await self._attach_prepared(p)
            finally:
                p.drop_prepared()

    def _check_attachable(self, p: Plex) -> None:
        if p.record.state not in (DETACHED, IOFAIL, STALE):
            raise VmdError(f"plex {p.name} of volume {self.name} is {p.record.state}, "
                           f"not detached")
        if not self._in_sync():
            raise VmdError(f"volume {self.name} has no in-sync plex to copy from")

    async def _attach_prepared(self, p: Plex) -> dict[str, Any]:
        name = p.name
        async with self.gate.hold(), self.resync.paused():
            rec = p.record
            # Again: it may have changed meanwhile, or been removed.
            if self.plex(name) is not p:
                raise VmdError(f"plex {name} of volume {self.name} was replaced while the "
                               f"attach connected to it; try again")
            self._check_attachable(p)
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
            was = rec.state
            rec.state = SYNCING if rec.missing.bits.any() else ACTIVE  # type: ignore[union-attr]
            rec.reason, rec.identity = "", None
            await self.checkpoint()
        events.emit(events.PLEX_STATE, self.name, name, state=rec.state, was=was,
                    reason=f"attached, full resync: {why}" if why else "attached with FastResync")
        self.resync.wake()
        return {**self._plex_status(p), "full_resync": bool(why), "why": why}


    def _resized_meanwhile(self, p: Plex) -> None:
        """Under the gate: a plex built before it (its size taken then) gets
        the size the volume has now. A `vmd resize` that held the gate first
        grew the volume, and only the plexes already in it; a plex opened
        at the old size would become ACTIVE short (reads past the old end
        fail). A remote export's size was checked at its connection."""
        if p.size == self.size:
            return
        if p.remote:
            raise VmdError(f"volume {self.name} was resized to {self.size} bytes while the add "
                           f"connected to {p.path} ({p.size} bytes): the export must be the "
                           f"volume's size")
        p.size = self.size

    async def add_plex(self, path: str, *, state: str = SYNCING, role: str = "",
                       named: bool = False) -> Plex:
        """`named`: the administrator chose `path`, so the image is theirs even
        if vmd creates the file (never deleted, see `delete_if_created`)."""
        rec = PlexRecord(name=f"p{self.state.next_plex}", path=path, state=state,
                         missing=None, role=role)
        if not self._in_sync():  # before anything: a refusal leaves the resync alone (T-D)
            raise VmdError(f"volume {self.name} has no in-sync plex to copy from")
        p = self.plex_factory(rec, self.size)
        # Before the gate: a remote export's connection may take remote_timeout.
        try:
            await p.prepare_attach()
        except OSError as e:
            raise VmdError(f"cannot open plex image {path}: {e.strerror or e}") from None
        try:
            async with self.gate.hold(), self.resync.paused():
                if not self._in_sync():
                    raise VmdError(f"volume {self.name} has no in-sync plex to copy from")
                existed = os.path.exists(path)
                rec.name = f"p{self.state.next_plex}"  # another add may have come first
                self._resized_meanwhile(p)
                rec.missing = self.state.new_map(fill=True)
                rec.created = not existed and not named
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
        finally:
            p.drop_prepared()
        log.info("volume %s: plex %s added (%s), full resync", self.name, rec.name, path)
        self.resync.wake()
        self.remote_watch.wake()  # a remote plex: watched from now on
        return p

    async def remove_plex(self, name: str, *, snapshot_ok: bool = False,
                          delete_created: bool = False) -> tuple[PlexRecord, str]:
        """Returns the plex's record and what became of its image."""
        def check() -> Plex:
            p = self.plex(name)
            if p.state in (SNAPATT, SNAPDONE) and not snapshot_ok:
                raise VmdError(f"plex {name} of volume {self.name} is a snapshot mirror: "
                               f"use `vmd snap abort {self.name}`")
            if p.state == ACTIVE and not self._in_sync(exclude=p):
                raise VmdError(f"plex {name} is the last in-sync plex of volume {self.name}; "
                               f"removing it would leave no complete copy")
            return p

        check()  # before the pause too, as detach_plex
        async with self.gate.hold(), self.resync.paused():
            p = check()
            p.close()
            self.plexes.remove(p)
            self.state.plexes.remove(p.record)
            self._update_recovering()
            await self.checkpoint()
        fate = delete_if_created(p.record) if delete_created else f"image {p.path} left in place"
        log.info("volume %s: plex %s removed (%s)", self.name, name, fate)
        return p.record, fate
