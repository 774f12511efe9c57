"""RAID-5 rebuild: recompute the units a column lacks from the other columns.

The mirror's resync (`vmd/resync.py`) drives it: the same targets (columns
whose map has bits), the same range lock per run, COPIES runs at once,
throttle, `copied` records after a flush (so that a rebuild interrupted by
SIGKILL resumes), and the same end (SYNCING → ACTIVE). Only the copy of one
run differs: a column's unit of stripe `s` is the XOR of the other columns'
units of `s`, whether it holds data or parity, so a run of stripes is rebuilt
by reading the same column range of every other column and XOR-ing.
Parity regeneration after an unclean stop without a RAID-5 log is the same
thing: the parity columns lack the dirty stripes.

A run's other columns are read at once, each in a worker thread, into
page-aligned buffers reused from run to run, then XOR-ed and written with
O_DIRECT (`_write_direct`) in one more thread. Before, through the event
loop (io_uring reads into new 2 MiB buffers, a copy to XOR into, a buffered
write through io_uring), a 256 MiB column used 0.75 s of CPU (median of 8;
perf: 42 % the kernel's copy out of the page cache, 9 % the copy into it,
6 % zero-filling new buffers); now about 0.25 s. The reads stay buffered:
with O_DIRECT they cost less CPU still, but the kernel's readahead keeps
the disk busier (a 128 MiB column in 0.38–0.43 s against 0.44–0.60 s,
alternating). What is left is the disk: a rebuild reads N−1 columns for
each it writes (docs/performance.md).

So the disk is kept fed: COPIES_RAID5 runs at once (twice the mirror's),
and the sources are read with the kernel's sequential read-ahead (a doubled
window, `POSIX_FADV_SEQUENTIAL`) for the pass. A run holds 4 MiB of volume
bytes, so the buffers of the runs in flight are COPIES_RAID5 × 4 MiB whatever
the number of columns. A 128 MiB column, engine alone, caches dropped,
alternating with 4 runs and the default window, load 4–9: 0.37 s against
0.41 s (median of 34 pairs), 0.40 s against 0.70 s (12 more); 16 or 32
runs, 8 MiB runs, O_DIRECT reads and fallocate before the direct writes
were no faster, `POSIX_FADV_WILLNEED` on the runs ahead slower
(docs/performance.md).
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
from contextlib import ExitStack
from typing import Any

import trio
from bitarray import bitarray

from .plex import Plex, PlexIOError
from .resync import CHUNK, Resync

log = logging.getLogger(__name__)

COPIES_RAID5 = 8  # runs rebuilt at once: each waits on N−1 reads, then a write


def xor_into(acc: bytearray | memoryview, other: bytes | bytearray | memoryview) -> None:
    """acc ^= other, in C (bitarray over both buffers, no copy): about 75 µs
    per MiB on this machine, where a Python loop over bytes takes ~50 ms."""
    a = bitarray(buffer=acc)
    a ^= bitarray(buffer=other)


class Rebuild(Resync):
    # A Raid5Volume, which owns and drives its rebuild (not imported: no cycle).
    volume: Any
    copies = COPIES_RAID5

    def __init__(self, volume: Any, *, rate_limit: int = 0):
        super().__init__(volume, rate_limit=rate_limit)
        # Per run in flight: one buffer to rebuild into, one to read each
        # further column into; reused.
        self._sets: list[list[mmap.mmap]] = []
        self._writing = trio.Lock()

    async def _pass(self) -> bool:
        with ExitStack() as stack:
            targets = self.targets()
            for col in self.volume.columns:
                if col not in targets:
                    stack.enter_context(_sequential(col))
            return await super()._pass()

    def _copies(self, targets: list[Plex]) -> int:
        return self.copies  # each run holds buffers: no kernel copy here

    async def _allocated(self, runs: list[tuple[int, int]]) -> int:
        fmr = self.volume.state.fmr_region
        return sum(min(count * fmr, self.volume.size - first * fmr) for first, count in runs)

    async def _copy_chunk(self, off: int, length: int) -> tuple[list[str], int] | None:
        vol = self.volume
        stripes = vol._stripes(off, length)
        async with vol.ranges.hold(stripes.start * vol.width, stripes.stop * vol.width):
            # The runs read the columns directly: what the write-back cache
            # holds for these stripes goes there first.
            await vol.drain(stripes)
            done: list[str] = []
            for x, col in enumerate(vol.columns):
                if col not in self.targets() or col.fd < 0:
                    continue
                todo = [s for s in stripes if vol.lacks(x, s)]
                for first, last in _runs(todo):
                    others = [c for c in range(vol.ncol) if c != x]
                    lost = [c for c in others if any(vol.lacks(c, s)
                                                     for s in range(first, last + 1))]
                    if lost:
                        log.error("volume %s: rebuild of column %s stopped: stripes %d-%d also "
                                  "lack column %s", vol.name, col.name, first, last,
                                  ", ".join(vol.columns[c].name for c in lost))
                        return None
                    at, n = first * vol.su, (last + 1 - first) * vol.su
                    try:
                        await self._rebuild_run(col, [vol.columns[c] for c in others], at, n)
                    except PlexIOError as e:
                        await vol._fail_columns([e], stripes)
                        if e.plex is not col:
                            return None  # a source failed: the stripe has no second copy
                        break  # the target failed: it keeps its map
                else:
                    done.append(col.name)
            # A run whose every target failed rebuilt nothing.
            return done, length if done else 0

    async def _rebuild_run(self, target: Plex, sources: list[Plex], at: int, n: int) -> None:
        """[at, at+n) of `target` := the XOR of that range of every source.
        Raises PlexIOError naming the column that failed."""
        if self.sparse and await trio.to_thread.run_sync(_all_holes, sources, at, n):
            # No source holds data here: the XOR is zeros. Punched, not
            # written: a new image stays as sparse as the others (a rebuild
            # filled a replaced column's holes, trial 9 F7), an old one drops
            # what it held there.
            await target.punch(at, n)  # (a PlexIOError naming it on failure)
            return
        bufs = self._sets.pop() if self._sets else []
        if bufs and len(bufs[0]) < n:
            bufs = []
        # Page-aligned (mmap) for O_DIRECT; a run is at most a resync chunk.
        bufs += [mmap.mmap(-1, max(n, CHUNK)) for _ in range(len(sources) - len(bufs))]

        views = [memoryview(b)[:n] for b in bufs]
        errors: list[PlexIOError] = []

        def read(i: int) -> None:
            src = sources[i]
            try:
                src._pread_sync(at, n, views[i])
            except OSError as e:
                errors.append(PlexIOError(src, "read", at, e))

        def xor_and_write_direct() -> bool:
            for v in views[1:]:
                xor_into(views[0], v)
            try:
                return _write_direct(target, at, views[0])
            except OSError as e:
                raise PlexIOError(target, "write", at, e) from e

        def write_buffered() -> None:
            try:
                target._pwrite_sync(at, views[0])
            except OSError as e:
                raise PlexIOError(target, "write", at, e) from e

        try:
            # The columns are read at once: the disk gets COPIES × (N−1) reads.
            async with trio.open_nursery() as nursery:
                for i in range(len(sources)):
                    nursery.start_soon(trio.to_thread.run_sync, read, i)
            if errors:
                raise errors[0]
            if not await trio.to_thread.run_sync(xor_and_write_direct):
                # Buffered, one at a time: writers of one file queue on its
                # inode lock, and the kernel spins for it (system time)
                # while the holder copies 2 MiB into the page cache.
                async with self._writing:
                    await trio.to_thread.run_sync(write_buffered)
        finally:
            self._sets.append(bufs)
        for src in sources:
            src.reads += 1
        target.writes += 1
        target.bytes_written += n


def _all_holes(sources: list[Plex], at: int, n: int) -> bool:
    """No source holds data in [at, at+n) (SEEK_DATA; blocking). False
    wherever an image cannot say: then the run is read and XOR-ed."""
    for src in sources:
        if not src._real_io or src.fd < 0:
            return False
        try:
            if src.data_ranges(at, n):
                return False
        except OSError:
            return False
    return True


def _write_direct(p: Plex, at: int, view: memoryview) -> bool:
    """Write `view` at `at` of a column with O_DIRECT, through a second open
    file of the same image (/proc/self/fd: the very file, whatever its path
    is now): from the buffer to the disk, without a copy into the page cache
    and its writeback later. The kernel writes back and drops cached pages
    of the range around such a write, so the volume's buffered I/O and this
    agree (the run's range lock keeps other writes to these stripes out).
    False where O_DIRECT cannot be used (a filesystem without it, a test's
    plex that fakes its writes): the caller writes buffered."""
    if not p._real_io or p.fd < 0:
        return False
    try:
        fd = os.open(f"/proc/self/fd/{p.fd}", os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return False
    done = 0
    try:
        while done < len(view):
            got = os.pwritev(fd, [view[done:]], at + done)
            if got <= 0:
                raise OSError(errno.EIO, "short write")
            done += got
    except OSError as e:
        if e.errno == errno.EINVAL and not done:
            return False  # alignment, or no O_DIRECT after all: buffered
        raise
    finally:
        os.close(fd)
    return True


class _sequential:
    """The kernel's sequential read-ahead (a doubled window) on a column for
    as long as this is entered, then the default again for the volume's
    reads. Through a duplicate of its fd: the hint belongs to the open file,
    which a column that fails and closes meanwhile keeps alive until then."""

    def __init__(self, p: Plex):
        self.fd = -1
        if p.fd >= 0 and p._real_io:
            try:
                self.fd = os.dup(p.fd)
            except OSError:
                pass  # out of fds: no hint

    def _advise(self, advice: int) -> None:
        try:
            os.posix_fadvise(self.fd, 0, 0, advice)
        except OSError:
            pass  # a hint only

    def __enter__(self) -> None:
        if self.fd >= 0:
            self._advise(os.POSIX_FADV_SEQUENTIAL)

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            self._advise(os.POSIX_FADV_NORMAL)
            os.close(self.fd)


def _runs(stripes: list[int]) -> list[tuple[int, int]]:
    """Consecutive stripes as (first, last) pairs."""
    out: list[tuple[int, int]] = []
    for s in stripes:
        if out and out[-1][1] == s - 1:
            out[-1] = (out[-1][0], s)
        else:
            out.append((s, s))
    return out
