"""Background resync: copy regions from an in-sync plex to the plexes that lack them.

One job per volume. Targets are the plexes in RESYNC_TARGETS whose `missing`
map has bits: SYNCING plexes (added, attached), SNAPATT snapshot mirrors, and
ACTIVE plexes after a crash (DRL recovery); also SYNCING/SNAPATT plexes whose
map is empty, which a pass with nothing to copy promotes. Each chunk is copied
under a range lock, so a write can never land between the copy's read and its
write (invariant 6). Only what the source has allocated is copied (SEEK_DATA /
SEEK_HOLE): its holes are punched on the targets, under the same lock and with
the same `copied` records, or skipped on a target vmd just created sparse.
Progress is made durable in batches (`copied` records after an fdatasync of
the targets), so an interrupted resync resumes where it stopped.

A resync alone must keep its disk as busy as several at once (recoveries
run one at a time per disk, vmd/spread.py). So the copy is done in the kernel
where it can (Plex.copy_to: copy_file_range, half the CPU of a read and a
write) and into the targets with O_DIRECT (no dirty pages: writeback
throttling of one target file held a lone copy at a third of the speed of
four), and KERNEL_COPIES chunks are copied at once (COPIES through a
buffer), each under its own range lock in the resync's own threads (fewer
left the disk partly idle); a
commit records only the chunks whose copy had returned before its flush
began, while the others go on. And writeback of the targets is started every
WRITEBACK_BYTES copied (`sync_file_range(SYNC_FILE_RANGE_WRITE)`: start, do
not wait), so the commit's fdatasync finds little left to write: without
it the copy stood still while each commit wrote up to 256 MiB (about 12 %
of a lone 1 GiB resync here). That is a hint only: durability and errors
still come from the fdatasync. A rate-limited resync copies one chunk at a
time.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from collections import deque
from collections.abc import AsyncIterator, Iterator
from typing import Any, Protocol

import trio

from . import events
from .config import MiB, format_size
from .iopool import IOPool
from .pace import Pace
from .plex import Plex, PlexIOError
from .rangelock import RangeLock
from .regionmap import RegionMap
from .volume import KEPT_NOTE
from .sidecar import ACTIVE, RESYNC_TARGETS, SNAPATT, SNAPDONE, SYNCING, SidecarLog, VolumeState
from .spread import DeviceSlots, Queued, devices_of

log = logging.getLogger(__name__)

CHUNK = 4 * MiB  # bytes copied per step: large enough for sequential throughput
COMMIT_BYTES = 256 * MiB  # progress made durable at least this often
COMMIT_SECONDS = 2.0
READ_AHEAD = 16 * MiB  # source reads started ahead of the copy (scattered runs)
READ_AHEAD_RUNS = 64
RETRY_SECONDS = 10
UNFINISHED = frozenset({SYNCING, SNAPATT})  # states a finished copy leaves
# Copy every byte, holes included, as before hole-skipping (benchmarks compare).
DENSE_ENV = "VMD_RESYNC_DENSE"
# Chunks copied at once (each under its own range lock, in its own worker
# thread): one copy thread left the disk half idle. With the kernel copy the
# disk is busy 85-99 % of a lone resync; 8 at once, 16 MiB chunks or 64 MiB of
# read-ahead measured no faster (docs/performance.md).
COPIES = 4
# Chunks copied at once where every target takes the kernel copy (no buffer
# each), in the resync's own threads (the source plex's pool serves reads).
# With the targets written O_DIRECT (Plex.open_direct_for_copies), one file
# copied 16 chunks at a time took as long as four files at once with 4 each
# (4 x 1 GiB, bench/kernel_copy.py: 2.59 s against 2.61; 4 at a time 3.08,
# 8 at a time 2.79 s); through the daemon (bench spread, 6 paired rounds
# each) 32 made four volumes one at a time 4 % faster again (median 3.20 s
# against 3.35 s with 16).
KERNEL_COPIES = 32
WRITEBACK_BYTES = 16 * MiB  # copied between two starts of the targets' writeback
SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>; Python's os has no sync_file_range


def _libc_sync_file_range() -> Any:
    fn = getattr(ctypes.CDLL(None, use_errno=True), "sync_file_range", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


_sync_file_range = _libc_sync_file_range()


async def start_writeback(plexes: list[Plex]) -> None:
    """Start writing the plexes' dirty pages back, whole files, without
    waiting for it (a hint: errors are the next fdatasync's to report)."""
    if _sync_file_range is None or not plexes:
        return
    fds = []
    for p in plexes:
        try:
            if p.fd >= 0:  # a duplicate: a plex failed meanwhile may close its fd
                fds.append(os.dup(p.fd))
        except OSError:
            pass  # out of fds: no hint this time

    def start() -> None:
        for fd in fds:
            try:
                _sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE)
            finally:
                os.close(fd)

    await trio.to_thread.run_sync(start)


class Mirror(Protocol):
    """What a resync needs of the volume it copies: its plexes and maps, its
    range lock, and the volume's own reaction to a plex error. `Volume` is
    one; resync does not import it (the volume owns and drives its resync)."""

    name: str
    size: int
    plexes: list[Plex]
    state: VolumeState
    sidecar: SidecarLog
    ranges: RangeLock

    def _readable(self, off: int, size: int, *, rotate: bool = True) -> list[Plex]: ...

    def _update_recovering(self) -> None: ...

    async def fail_plex(self, p: Plex, err: OSError, off: int, length: int) -> bool: ...

    async def flush(self) -> None: ...

    async def checkpoint(self) -> None: ...


class Resync:
    copies = COPIES  # chunks copied at once (a layout's copy may want more)

    def __init__(self, volume: Mirror, *, rate_limit: int = 0):
        self.volume = volume
        self.rate_limit = rate_limit
        self._pace = Pace(0.0, rate_limit)  # the running pass's (_throttle)
        self._wake = trio.Event()
        self._cancel: trio.CancelScope | None = None
        self._paused = 0
        self._idle = trio.Event()
        self._idle.set()
        self.running = False
        # Progress counts the source's allocated bytes: holes cost no copy.
        self.done_bytes = 0
        self.total_bytes = 0
        self.copied_bytes = 0  # of the last finished resync
        self.synced_bytes = 0  # the regions it brought in sync, holes included
        self.span_bytes = 0  # the regions the running (or last) pass covers
        self.sparse = os.environ.get(DENSE_ENV, "") != "1"
        self.last_seconds = 0.0
        self.last_targets: list[str] = []
        # Targets of the last pass that failed during it (name → reason): its
        # copy into them is lost, and `vmd wait` must not call that in sync.
        self.failed: dict[str, str] = {}
        self.passes = 0  # finished passes: `vmd wait` tells whether one ran meanwhile
        # An unexpected error (a bug) that stopped this resync: the volume
        # serves on without it, its targets stay out of sync (status, health).
        self.error: str | None = None
        self._bufs: list[bytearray] = []  # copy buffers, one per chunk in flight, reused
        self._copy_pool: IOPool | None = None  # kernel copies' threads, made by the pass
        self._buffered = trio.Semaphore(COPIES)  # copies through a buffer at once
        # One job at a time per disk (the manager sets the daemon's slots).
        self.slots: DeviceSlots | None = None
        self.queue = Queued()

    def wake(self) -> None:
        self._wake.set()

    def targets(self) -> list[Plex]:
        """Plexes that lack regions, and SYNCING/SNAPATT plexes that lack none
        but are not yet ACTIVE/SNAPDONE: an empty copy (snap back with no
        change, a crash after the last copy record) must finish like any
        other, or the plex stays in its state for good."""
        return [p for p in self.volume.plexes if p.state in RESYNC_TARGETS
                and p.record.missing is not None
                and (p.state in UNFINISHED or p.record.missing.bits.any())]

    def status(self) -> dict[str, Any]:
        return {
            "running": self.running, "done_bytes": self.done_bytes,
            "total_bytes": self.total_bytes, "copied_bytes": self.copied_bytes,
            "synced_bytes": self.synced_bytes, "span_bytes": self.span_bytes,
            "skips_holes": self.sparse,
            "seconds": round(self.last_seconds, 3), "targets": self.last_targets,
            "failed": self.failed, "error": self.error,
            "rate_limit": self.rate_limit,
            "queued": bool(self.queue.behind), "queued_behind": self.queue.behind,
        }

    async def wait_idle(self) -> None:
        """Until no resync runs or is due."""
        while True:
            await self._idle.wait()
            if not self.targets() or self._paused or self.error is not None:
                return
            await trio.sleep(0.05)

    async def stop(self) -> None:
        """Stop for good (shutdown)."""
        self._paused += 1
        await self._halt()

    async def _halt(self) -> None:
        if self._cancel is not None:
            self._cancel.cancel()
        await self._idle.wait()

    @asynccontextmanager
    async def paused(self) -> AsyncIterator[None]:
        """Hold resync off while plexes are reconfigured (their fds may close)."""
        self._paused += 1
        try:
            await self._halt()
            yield
        finally:
            self._paused -= 1
            self.wake()

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            if self._paused or not self.targets():
                await self._wake.wait()
                self._wake = trio.Event()
                continue
            self._idle = trio.Event()
            stuck = False
            due = self.targets()
            # While queued for its turn, status shows this pass's size, not
            # the progress of the last one.
            self.done_bytes = 0
            self.total_bytes = self.span_bytes = self._missing(due).bytes_covered()
            try:
                with trio.CancelScope() as self._cancel:
                    async with self._turn():
                        # The turn may have been waited for (vmd/spread.py): the
                        # targets may have failed meanwhile (a failure, unlike a
                        # detach, does not cancel a queued turn). No await
                        # between this look and the pass's own.
                        if self.targets():
                            stuck = not await self._pass()
                        else:
                            self._lost_while_queued(due)
                        self.error = None
            except Exception as caught:
                e = _only_os_errors(caught)
                if e is not None:
                    # The log or a flush failed (raised in the pass's nursery,
                    # it comes wrapped in an ExceptionGroup): leave the maps as
                    # they are (copying again is always safe) and retry later.
                    log.error("volume %s: resync interrupted: %s; retrying in %d s",
                              self.volume.name, e, RETRY_SECONDS)
                    events.emit(events.RESYNC_INTERRUPTED, self.volume.name, error=str(e))
                    stuck = True
                else:
                    self._failed_unexpectedly(caught, due)
            finally:
                self._cancel = None
                self.running = False
                self._idle.set()
            if self.error is not None:
                # Retrying a bug would only repeat it: wait for a change.
                await self._wake.wait()
                self._wake = trio.Event()
            elif stuck:
                # No in-sync source (or an error): wait for a change (attach,
                # add, wake) or the retry period, never spin.
                with trio.move_on_after(RETRY_SECONDS):
                    await self._wake.wait()
                self._wake = trio.Event()

    def _failed_unexpectedly(self, e: Exception, due: list[Plex]) -> None:
        """A bug. This task runs in the volume's nursery, under the daemon's
        (manager.VolumeWork): let out, it takes every volume down uncleanly.
        Stopping only this resync is safe: the maps keep what is not yet
        copied (nothing is recorded copied before it is durable) and writes
        still reach every target."""
        self.error = f"{type(e).__name__}: {e}"
        log.critical("volume %s: resync failed unexpectedly (%s); the volume serves on "
                     "but its plexes %s stay out of sync until the daemon is restarted "
                     "(or a plex is added, attached or detached)", self.volume.name,
                     self.error, ", ".join(t.name for t in due), exc_info=e)
        events.emit(events.RESYNC_INTERRUPTED, self.volume.name, error=self.error)

    def _lost_while_queued(self, due: list[Plex]) -> None:
        """Every target failed or left while the resync waited for its turn:
        no pass. Those that failed are its failed targets (`vmd wait`)."""
        self.last_targets = [t.name for t in due]
        self.failed = {t.name: t.record.reason or t.state for t in due if not _live([t])}
        log.info("volume %s: resync skipped: its targets left or failed while it was queued "
                 "(%s)", self.volume.name, ", ".join(f"{n}: {why}" for n, why in
                                                     self.failed.items()) or "none failed")

    def _turn(self) -> AbstractAsyncContextManager[None]:
        """This volume's turn on the devices of its open plexes (vmd/spread.py)."""
        if self.slots is None:
            return nullcontext()
        return self.slots.turn(devices_of(self.volume.plexes),
                               f"resync of volume {self.volume.name}", self.queue)

    async def _pass(self) -> bool:
        """One copy of everything the targets lack. False if it could not finish."""
        vol = self.volume
        targets = self.targets()
        fmr = vol.state.fmr_region
        union = self._missing(targets)
        self.running = True
        span = self.span_bytes = union.bytes_covered()
        self.total_bytes = span
        self.done_bytes = 0
        self.last_targets = [t.name for t in targets]
        self.failed = {}
        started = time.monotonic()
        copies = 1 if self.rate_limit > 0 else self._copies(targets)
        step = CHUNK
        if copies == KERNEL_COPIES:
            # A small pass (a crash's few dirty regions) in smaller runs, so
            # that it keeps as many copies in flight as a big one: 8 dirty
            # 4 MiB regions would be 8 copies.
            step = max(fmr, min(CHUNK, span // copies))
        runs = list(union.runs(max(1, step // fmr)))
        self.total_bytes = await self._allocated(runs)
        log.info("volume %s: resync of %s (%s allocated) to plex %s started", vol.name,
                 format_size(span), format_size(self.total_bytes), ", ".join(self.last_targets))
        events.emit(events.RESYNC_STARTED, vol.name, targets=self.last_targets, span_bytes=span,
                    total_bytes=self.total_bytes)
        # Chunks whose copy has returned, not yet recorded: only these go into
        # a commit, taken before its flush (invariant 2: recorded once durable).
        pending: dict[str, list[list[int]]] = {}
        pending_bytes = 0
        # Bytes copied per set of targets reached: what went only into targets
        # that failed later is not reported as copied.
        reached: dict[tuple[str, ...], int] = {}
        unflushed = 0  # copied since writeback was last started
        no_source = False
        failure: OSError | None = None
        # A rate-limited copy needs no parallel chunks, and with them its first
        # ones would all start before the limit counted any.
        in_flight = trio.Semaphore(copies)
        if self._copy_pool is None:
            self._copy_pool = IOPool(f"resync-{vol.name}", KERNEL_COPIES)
        pool = self._copy_pool

        async def copy(first: int, count: int, off: int, length: int) -> None:
            nonlocal pending_bytes, unflushed, no_source, failure
            try:
                result = await self._copy_chunk(off, length)
            except OSError as e:  # reported by the pass, as a plain error
                failure = failure or e
                return
            finally:
                in_flight.release()
            if result is None:
                no_source = True
                return
            copied_to, copied = result
            for name in copied_to:
                pending.setdefault(name, []).append([first, count])
            if copied_to:
                key = tuple(copied_to)
                reached[key] = reached.get(key, 0) + copied
            pending_bytes += length
            unflushed += copied
            self.done_bytes += copied
            # Writes during the copy allocate more than was counted.
            self.total_bytes = max(self.total_bytes, self.done_bytes)

        last_commit = time.monotonic()
        try:
            for t in targets:
                if t._kernel_copy:  # off the event loop: an open may wait on a server
                    await pool.run(t.open_direct_for_copies)
            async with trio.open_nursery() as nursery:
                for first, count, off, length in self._read_ahead(iter(runs)):
                    await in_flight.acquire()
                    await self._throttle(started)  # counts the copies that have returned
                    if no_source or failure is not None or not _live(targets):
                        break  # nothing to copy from, or nothing left to copy into
                    nursery.start_soon(copy, first, count, off, length)
                    if unflushed >= WRITEBACK_BYTES:
                        # (Direct copies leave nothing dirty to start.)
                        await start_writeback([
                            p for p in vol.plexes if p.name in pending
                            and (p._direct_fd < 0 or not p._kernel_copy)])
                        unflushed = 0
                    if (pending_bytes >= COMMIT_BYTES
                            or time.monotonic() - last_commit > COMMIT_SECONDS):
                        batch, pending, pending_bytes, unflushed = pending, {}, 0, 0
                        await self._commit(batch)  # the copies in flight go on meanwhile
                        last_commit = time.monotonic()
            if failure is not None:
                raise failure
            await self._commit(pending)
            if no_source:
                return False  # the volume has no in-sync plex left
        finally:
            pool.stop()  # its threads end with the pass (made again by the next)
            for t in targets:
                t.close_direct_for_copies()  # every copy has returned
            self.last_seconds = time.monotonic() - started
            for t in targets:
                t.fresh = False  # this pass copied into it: a later one must punch
        self.failed = {t.name: t.record.reason or t.state for t in targets if not _live([t])}
        self.copied_bytes = sum(n for names, n in reached.items()
                                if any(name not in self.failed for name in names))
        self.synced_bytes = span if len(self.failed) < len(targets) else 0
        await self._finish(targets)
        return True

    @staticmethod
    def _missing(targets: list[Plex]) -> RegionMap:
        """What any of the targets lacks."""
        union = targets[0].record.missing.copy()  # type: ignore[union-attr]
        for t in targets[1:]:
            union.union(t.record.missing)  # type: ignore[arg-type]
        return union

    def _copies(self, targets: list[Plex]) -> int:
        """Chunks copied at once: more where each is a kernel copy between
        local images, which needs no buffer (a lone resync then keeps its
        disk as busy as several at once). Not from a remote source: 32 reads
        of 4 MiB in flight on one link would pass its request timeout."""
        sources = [p for p in self.volume.plexes if p.state == ACTIVE and p not in targets]
        kernel = all(p._kernel_copy for p in targets + sources)
        return KERNEL_COPIES if kernel else self.copies

    async def _allocated(self, runs: list[tuple[int, int]]) -> int:
        """Bytes of the runs their sources have allocated: what the copy will
        read and write, so that progress and its ETA are true."""
        vol = self.volume
        fmr = vol.state.fmr_region
        spans: list[tuple[Plex | None, int, int]] = []
        for first, count in runs:
            off = first * fmr
            length = min(count * fmr, vol.size - off)
            # The source the copy will read (snap back reads a snapshot plex).
            sources = vol._readable(off, length, rotate=False) if self.sparse else []
            spans.append((sources[0] if sources else None, off, length))

        def count() -> int:
            return sum(length if src is None else sum(n for _, n in src.data_ranges(off, length))
                       for src, off, length in spans)

        try:
            return await trio.to_thread.run_sync(count)
        except OSError as e:  # only an estimate: the copy reports real errors
            log.warning("volume %s: cannot find the allocated ranges of the resync source: %s",
                        vol.name, e)
            return sum(length for _, _, length in spans)

    def _read_ahead(self, runs: Iterator[tuple[int, int]]
                    ) -> Iterator[tuple[int, int, int, int]]:
        """(first, count, offset, length) of each run to copy, in order, while
        the source's reads of the next READ_AHEAD bytes of them are started:
        a FastResync map is scattered 64 KiB runs, and reading them one at a
        time waits a disk seek each."""
        vol = self.volume
        fmr = vol.state.fmr_region
        window: deque[tuple[int, int, int, int]] = deque()
        ahead = 0
        for first, count in runs:
            off = first * fmr
            length = min(count * fmr, vol.size - off)
            sources = vol._readable(off, length, rotate=False)
            if sources:
                sources[0].will_read(off, length)
            window.append((first, count, off, length))
            ahead += length
            while ahead > READ_AHEAD or len(window) > READ_AHEAD_RUNS:
                run = window.popleft()
                ahead -= run[3]
                yield run
        yield from window

    async def _copy_chunk(self, off: int, length: int) -> tuple[list[str], int] | None:
        """Copy one run to the targets that lack part of it, under the range
        lock. The names of the targets it reached and the bytes copied (holes
        excluded), or None if no plex can be read."""
        vol = self.volume
        async with vol.ranges.hold(off, off + length):
            targets = [t for t in self.targets()
                       if t.record.missing is not None and t.record.missing.any_in(off, length)]
            if not targets:
                # Recovered since the pass began (read-writeback): nothing to copy.
                return [], 0
            buf: bytearray | None = None
            try:
                while True:
                    sources = vol._readable(off, length, rotate=False)
                    if not sources:
                        log.error("volume %s: resync stopped: no in-sync plex to copy offset %d "
                                  "from", vol.name, off)
                        return None
                    # In the kernel: no buffer (one is made if it falls back),
                    # the pass's threads. Else through a buffer in the source's
                    # threads, COPIES at a time even in a pass sized for kernel
                    # copies (a target on another filesystem is found mid-pass).
                    kernel = sources[0]._kernel_copy and all(t._kernel_copy for t in targets)
                    if not kernel and buf is None:
                        buf = self._bufs.pop() if self._bufs else bytearray(CHUNK)
                    try:
                        async with nullcontext() if kernel else self._buffered:
                            errors, copied = await sources[0].copy_to(
                                targets, off, length, buf, sparse=self.sparse,
                                pool=self._copy_pool if kernel else None)
                        break
                    except PlexIOError as e:
                        if not await vol.fail_plex(sources[0], e, off, length):
                            log.error("volume %s: resync stopped: plex %s, the last in-sync "
                                      "plex, cannot read offset %d: %s", vol.name,
                                      sources[0].name, off, e)
                            return None
            finally:
                if buf is not None:
                    self._bufs.append(buf)
            for e in errors.values():
                await vol.fail_plex(e.plex, e, off, length)
            return [t.name for t in targets if t.name not in errors], copied

    async def _commit(self, pending: dict[str, list[list[int]]]) -> None:
        """Make copied chunks durable on the targets, then forget them."""
        if not pending:
            return
        vol = self.volume
        await vol.flush()

        def build() -> dict[str, Any] | None:
            rec: dict[str, list[list[int]]] = {}
            for name, runs in pending.items():
                p = next((p for p in vol.plexes if p.name == name), None)
                # A plex that failed or left since keeps its bits.
                if p is None or p.state not in RESYNC_TARGETS or p.record.missing is None:
                    continue
                for first, count in runs:
                    p.record.missing.bits[first:first + count] = 0
                rec[name] = runs
            return {"t": "copied", "p": rec} if rec else None

        await vol.sidecar.append(build, sync=False)
        vol._update_recovering()

    async def _throttle(self, started: float) -> None:
        if self._pace.since < started:  # a new pass
            self._pace = Pace(started, self.rate_limit)
        await self._pace.wait(lambda: self.rate_limit, lambda: self.done_bytes)

    async def _finish(self, targets: list[Plex]) -> None:
        vol = self.volume
        changed = False
        was = {p.name: p.state for p in vol.plexes}
        for t in targets:
            m = t.record.missing
            if m is None or m.bits.any():
                continue
            if t.state == SYNCING:
                t.record.state, t.record.reason = ACTIVE, ""
                changed = True
                for p in vol.plexes:
                    if p.state == ACTIVE and p.record.reason.startswith(KEPT_NOTE):
                        p.record.reason = ""  # redundant again: the errors are history
            elif t.state == SNAPATT:
                t.record.state, t.record.role = SNAPDONE, "snapshot"
                changed = True
        if not self.targets():
            # A snapshot plex that restored the volume (snap back
            # --from-snapshot) is a snapshot mirror again once all agree.
            for p in vol.plexes:
                if p.record.role == "restore" and p.state == ACTIVE:
                    p.record.state, p.record.role = SNAPDONE, "snapshot"
                    changed = True
        if changed:
            await vol.checkpoint()
        vol._update_recovering()
        self.passes += 1
        lost = "".join(f"; plex {n} failed: {why}" for n, why in self.failed.items())
        log.info("volume %s: resync finished: %s copied in %.2f s%s", vol.name,
                 format_size(self.copied_bytes), self.last_seconds, lost)
        for p in vol.plexes:
            if p.state != was.get(p.name, p.state):
                events.emit(events.PLEX_STATE, vol.name, p.name, state=p.state, was=was[p.name],
                            reason="resync finished")
        events.emit(events.RESYNC_FINISHED, vol.name, targets=[t.name for t in targets],
                    copied_bytes=self.copied_bytes, synced_bytes=self.synced_bytes,
                    seconds=round(self.last_seconds, 3), failed=self.failed)


def _only_os_errors(e: BaseException) -> OSError | None:
    """The first OSError if `e` is one, or a group of nothing else (a
    failure of the disk or the log); None if anything else is in it."""
    if isinstance(e, OSError):
        return e
    if isinstance(e, BaseExceptionGroup):
        leaves = [_only_os_errors(x) for x in e.exceptions]
        if leaves and all(x is not None for x in leaves):
            return leaves[0]
    return None


def _live(targets: list[Plex]) -> bool:
    """Some of a pass's targets can still take its copy (none has failed,
    been detached or gone stale since: those leave RESYNC_TARGETS)."""
    return any(t.state in RESYNC_TARGETS for t in targets)
