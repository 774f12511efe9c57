"""The RAID-5 log: each write's column pieces (new data and new parity, with
their addresses) made durable before any column is written.

It closes the RAID-5 write hole: after an unclean stop the entries not yet
retired are replayed, in order, before the volume is served, so every stripe
a crash cut in the middle ends with data and parity that match (the new
data, or the old where the entry never became durable and the write was
never acknowledged), also when a column is missing at the restart.

The file's format (header, entries, checksums) is vmd/raid5log_format.py's.

A write's entry goes into the next batch and its pieces into the write-back
cache (vmd/raid5cache.py), and the write is answered. One committer task
writes and fdatasyncs a batch (group commit: every writer of the last few
ms); only then does a second task write the batch's pieces to the columns
(batch after batch, while the next one is committed) and drop them from
the cache: no column sees a piece whose entry is not durable. `sync` (an fsync) waits
for the commit, `drain` for the column writes. Entries retire once their
column writes are done and the columns flushed: the header's `retired` is
rewritten, and when nothing is in flight the next entry starts at 4096
again. A writer that finds the log full waits for a retire; no entry is
ever dropped. Replay reads entries from 4096 while each is whole, its crc
matches and its sequence number is the next one after `retired`: a torn or
partial entry (a write never acknowledged), or an older one left from
before a rewind, ends it.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import trio

from . import events
from .config import MiB
from .exclusive import InUseError, close_locked, open_locked
from .faults import raid5_hold
from .plex import IOV_MAX
from .raid5cache import StripeCache, owned
from .raid5log_format import (HEADER, MAGIC, MAGICS, Piece, _header, crc_unavailable,
                              entry_buffers, entry_size, read_entries, read_owner)
from .sidecar import VolumeState

log = logging.getLogger(__name__)

CAPACITY = 64 * MiB  # the log file's size: writes beyond wait for a retire
RETIRE_AT = CAPACITY // 2  # a retire starts once this much is used
RETIRE_SECONDS = 2.0  # and after this long, so that a quiet volume's log is empty
# The sidecar log's record (state.extra) of the RAID-5 log that holds every
# write since its last retire: only that one is replayed after a crash.
IN_USE = "raid5_log"
# The write-back cache: a committer waits this long for more writers to
# share a batch's sync, and writers wait while this much is not yet on the
# columns (memory, and what a crash can lose, stay bounded).
COMMIT_DELAY = 0.002
CACHE_BOUND = 16 * MiB
# The columns' flush after the log failed goes on through a stop this long
# (below the daemon's SHUTDOWN_SECONDS).
FAILED_FLUSH_SECONDS = 30

Entry = tuple[int, list[Piece], bool]  # sequence number, pieces, the test's cut here


class Owner(Protocol):
    """What the log needs of its volume (a Raid5Volume, which owns the log:
    not imported, no cycle)."""

    name: str
    error: str | None
    state: VolumeState
    su: int

    async def flush_columns(self) -> None: ...

    async def write_back(self, entries: list[Entry]) -> None: ...

    async def checkpoint(self) -> None: ...


class Raid5Log:
    def __init__(self, path: Path, vol: Owner):
        self.path = path
        self.vol = vol
        why = crc_unavailable()
        if why is not None:
            raise OSError(errno.ENOTSUP, f"RAID-5 log {path}: its entries' checksum (crc32c) "
                          f"cannot be computed here ({why}); with CRC32C_SW_MODE=none a CPU "
                          f"without SSE 4.2 has none: unset it for the software crc32c")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)  # a first start, as for plexes
            self.created = not path.exists()  # removed again if the start is refused for it
            # Held like every sidecar log and image: a second daemon (another
            # config naming this file) must not replay or rewind it under us.
            self.fd = open_locked(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, "RAID-5 log")
        except InUseError:
            raise
        except OSError as e:
            raise OSError(e.errno, f"cannot open RAID-5 log {path}: {e.strerror}") from None
        # Missing or new: it cannot hold the writes of a run that crashed.
        self.was_empty = os.fstat(self.fd).st_size == 0
        self.retired = 0
        self.seq = 0  # last sequence number handed out
        self.end = HEADER  # where the next entry goes
        self._inflight: set[int] = set()  # appended, columns not yet written
        # The write-back cache: pieces acknowledged, not yet on their columns.
        self.cache = StripeCache(vol.su)
        self._pending: list[Entry] = []  # the next batch
        self._pending_bytes = 0
        self._since = 0.0  # when the first entry of the next batch came
        # Committed batches (and failed ones, to drop) for the write-back, in order.
        self._queue: collections.deque[tuple[list[Entry], OSError | None]] = collections.deque()
        self._queued = trio.Event()
        self._failure_recorded = False
        self.synced = 0  # every entry up to this one is durable in the log
        self.done = 0  # and up to this one on the columns (or dropped: the log failed)
        self.lost = 0  # acknowledged entries dropped because the log failed
        # Set by a failure (not by a stop's end of the committer): every
        # entry not yet durable then, which the write-back drops.
        self._losing: int | None = None
        self._ended = False  # the committer is gone: nothing more is synced
        self._wake = trio.Event()  # the batch has entries
        self._hurry = trio.Event()  # someone waits for the batch: no grouping delay
        self._progress = trio.Event()  # set (and replaced) after each commit and write-back
        self._drained = trio.Event()  # set when no entry is in flight
        self._retired = trio.Event()  # set at the end of each retire
        self._retiring = False
        self._holding = False  # a retire waits for the entries in flight: new ones wait
        # A batch's placement and write, and a rewind, one at a time: an
        # entry placed at the old end while the header says "rewound" would
        # be skipped by a replay, and so would every entry after it.
        self._io = trio.Lock()
        self._retire_due = trio.Event()  # the committer found the log half full
        self._retirer: trio.CancelScope | None = None
        self._retirer_done = trio.Event()
        self._tasks: trio.CancelScope | None = None  # all of them (`run`)
        self._tasks_done = trio.Event()
        self.failed: str | None = None  # a write or rewind failed: no more entries
        self.commits = 0  # log flushes (each one group of writers)
        self.retires = 0
        self.waits = 0  # writers that found the log full
        self.cache_waits = 0  # writers that found the cache full
        self._hold = raid5_hold(vol.name)  # test fault: vmd/faults.py

    # -- start-up --------------------------------------------------------------

    def trusted(self) -> bool:
        """The log holds every write since its last retire: the sidecar log
        records it in use by this volume (and not failed since), and it was
        there. Otherwise parity after a crash must come from regeneration."""
        return self.vol.state.extra.get(IN_USE) == str(self.path) and not self.was_empty

    def owner(self) -> str | None:
        """The uuid of the volume its header names (None: a new file, or a
        log from before vmd recorded it); ValueError: not a RAID-5 log."""
        return None if self.was_empty else read_owner(os.pread(self.fd, 40, 0))

    def replay(self, write: Callable[[int, int, bytes], None]) -> int:
        """Call `write(column, offset, bytes)` for every piece of every entry
        not retired, in order; returns how many entries. The caller flushes
        the columns, then `reset`s the log."""
        if os.fstat(self.fd).st_size == 0:
            return 0
        with open(self.path, "rb") as f:
            data = f.read()
        retired, entries = read_entries(data)
        for _, pieces in entries:
            for c, off, d in pieces:
                write(c, off, d)
        self.seq = self.retired = entries[-1][0] if entries else retired
        return len(entries)

    def discard(self) -> None:
        """Start a log that is not trusted empty, without replaying it. A
        file that is not a RAID-5 log is left alone (ValueError): the config
        may name the wrong file."""
        if not self.was_empty:
            with open(self.path, "rb") as f:
                if f.read(len(MAGIC)) not in MAGICS:
                    raise ValueError("not a RAID-5 log (bad magic); vmd will not overwrite it")
            # Truncated: its old entries must not follow the new header.
            os.ftruncate(self.fd, 0)
        self.seq = 0
        self.reset()

    def reset(self) -> None:
        """Everything so far is on the (flushed) columns: start the log empty."""
        os.pwrite(self.fd, _header(self.seq, self.vol.state.uuid), 0)
        os.fdatasync(self.fd)
        self.retired, self.end = self.seq, HEADER
        self.synced = self.done = self.seq

    # -- write path ------------------------------------------------------------

    def _refuse_if_failed(self) -> None:
        if self.failed is not None:
            raise OSError(errno.EIO, f"RAID-5 log {self.path} failed: {self.failed}")

    async def append(self, pieces: list[Piece], *, cut: bool = False) -> int:
        """Put a write's pieces into the cache and its entry into the next
        batch; returns its sequence number without waiting for the log (the
        write is answered now: `sync` waits). Waits only while the log is
        full (for a retire) or the cache is (for a write-back). `cut`: the
        test fault kills the daemon while this entry is written back."""
        self._refuse_if_failed()
        size = entry_size(pieces)
        if size > CAPACITY - HEADER:
            raise OSError(27, f"RAID-5 log {self.path}: an entry of {size} bytes does not fit")
        while True:
            if self._holding:
                await self._retired.wait()
            elif self.end + self._pending_bytes + size > CAPACITY:
                self.waits += 1
                await self._retire_wait()
            elif self.cache.bytes >= CACHE_BOUND:
                self.cache_waits += 1
                await self._progress_wait()
            else:
                break
            self._refuse_if_failed()  # a failed log is never rewound
        self.seq += 1
        seq = self.seq
        self._inflight.add(seq)
        kept = [(c, off, owned(d)) for c, off, d in pieces]
        if not self._pending:
            self._since = trio.current_time()
        self._pending.append((seq, kept, cut))
        self._pending_bytes += size
        self.cache.add(seq, kept)
        self._wake.set()
        return seq

    async def sync(self) -> None:
        """Until every entry appended so far is durable in the log (an
        fsync of the volume: replay brings the columns' part back)."""
        target = self.seq
        while self.synced < target:
            if self.failed is not None or self._ended:
                raise OSError(errno.EIO, f"RAID-5 log {self.path} failed: {self.failed}")
            await self._progress_wait()

    async def drain(self) -> None:
        """Until every entry appended so far is on its columns (or dropped,
        the log having failed): the cache holds none of them."""
        target = self.seq
        while self.done < target and not self._ended:
            await self._progress_wait()

    async def _progress_wait(self) -> None:
        ev = self._progress
        self._hurry.set()
        self._wake.set()
        await ev.wait()

    def _progressed(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    def written(self, seq: int) -> None:
        self._inflight.discard(seq)
        if not self._inflight:
            self._drained.set()

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """The committer, and the retires in the background (`stop` ends
        those; the committer ends with the volume's tasks, or `halt`)."""
        self._tasks = trio.CancelScope()
        try:
            with self._tasks:
                async with trio.open_nursery() as nursery:
                    await nursery.start(self._retire_in_background)
                    task_status.started()
                    await self._commit()
        finally:
            self._tasks_done.set()

    async def halt(self) -> None:
        """Cancel every task of the log and wait until they ended: their
        worker threads (column writes, the log's own) are done with the fds."""
        if self._tasks is not None:
            self._tasks.cancel()
            await self._tasks_done.wait()

    def halted(self) -> bool:
        return self._tasks is None or self._tasks_done.is_set()

    async def _commit(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write_back_batches)
                await self._commit_batches()
        finally:
            # Cancelled (the volume's tasks end): whoever waits in sync or
            # drain must hear that nothing more will be committed, and what
            # is left will never be written.
            self.failed = self.failed or "the volume's background tasks stopped"
            self._ended = True
            self.lost += len(self._inflight)
            self._inflight.clear()
            self._drained.set()
            self.cache.clear()
            self._pending, self._queue = [], collections.deque()
            self._progressed()

    async def _commit_batches(self) -> None:
        while True:
            await self._wake.wait()
            wait = self._since + COMMIT_DELAY - trio.current_time()
            if self._hold == "commit":
                await self._hurry.wait()
            elif self._pending and wait > 0 and not self._hurry.is_set() \
                    and self.cache.bytes < CACHE_BOUND:
                # Writers arriving meanwhile share this batch's sync.
                with trio.move_on_after(wait):
                    await self._hurry.wait()
            self._wake = trio.Event()
            self._hurry = trio.Event()
            if not self._pending:
                continue
            entries, self._pending, self._pending_bytes = self._pending, [], 0
            error: OSError | None = None
            async with self._io:
                at = self.end
                try:
                    self._refuse_if_failed()
                    n = await trio.to_thread.run_sync(self._encode_and_write, entries, at)
                except OSError as e:
                    error = e
                except Exception as e:  # noqa: BLE001 - a bug here must fail the log, not the task
                    # Failed as for a disk error (the entries written back as
                    # lost, loudly): a dead committer would drop the cache,
                    # and every answered write in it, without a word.
                    log.exception("volume %s: RAID-5 log %s: encoding a batch failed",
                                  self.vol.name, self.path)
                    error = OSError(errno.EIO, f"encoding failed: {e!r}")
                else:
                    # Moved only past a durable blob: no gap a replay stops at.
                    self.end = at + n
                    self.commits += 1
                    self.synced = entries[-1][0]
            if error is not None and self.failed is None:
                # At once: no later batch may be committed (and its fsync
                # answered) past the entries this one loses.
                self._mark_failed(f"write of {len(entries)} entries at {at} failed: {error}")
            # Written back by the other task, in order, while the next batch
            # is committed: the log's sync and the column writes overlap.
            self._queue.append((entries, error))
            self._queued.set()
            self._progressed()  # fsyncs are answered before the columns are written

    async def _write_back_batches(self) -> None:
        if self._hold is not None:
            await trio.sleep_forever()
        while True:
            while not self._queue:
                self._queued = trio.Event()
                await self._queued.wait()
            entries, error = self._queue[0]
            if error is None:
                # Only now may the pieces reach the columns (the write hole).
                await self.vol.write_back(entries)
            else:
                self.lost += len(entries)
                log.critical("volume %s: %d acknowledged write(s) lost: RAID-5 log %s cannot "
                             "hold them (%s)", self.vol.name, len(entries), self.path, error)
                await self._record_failed()  # every batch before it is on the columns
            self._queue.popleft()
            for seq, pieces, _ in entries:
                self.cache.drop(seq, pieces)
                self.written(seq)
            self.done = entries[-1][0]
            self._progressed()
            if self.end >= RETIRE_AT:
                self._retire_due.set()

    def _encode_and_write(self, entries: list[Entry], at: int) -> int:
        # In the thread: the crc32 of a batch of 1 MiB writes costs
        # milliseconds the event loop need not spend.
        bufs: list[Any] = []
        for seq, pieces, _ in entries:
            bufs += entry_buffers(seq, pieces)
        self._write_sync(bufs, at)
        return sum(map(len, bufs))

    def _write_sync(self, bufs: list[Any], at: int) -> None:
        pos = at
        for i in range(0, len(bufs), IOV_MAX):
            chunk = bufs[i:i + IOV_MAX]
            want = sum(map(len, chunk))
            done = os.pwritev(self.fd, chunk, pos)
            if done < want:  # short: the rest as one buffer
                rest = memoryview(b"".join(chunk))[done:]
                while rest:
                    n = os.pwrite(self.fd, rest, pos + done)
                    rest, done = rest[n:], done + n
            pos += want
        os.fdatasync(self.fd)

    async def _retire_in_background(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Retire once the log is half full, and while the volume is quiet
        (so that a restart has little to replay); until `stop`."""
        try:
            with trio.CancelScope() as self._retirer:
                task_status.started()
                while True:
                    if self._hold is not None:  # it would wait for the write-back
                        await trio.sleep_forever()
                    with trio.move_on_after(RETIRE_SECONDS):
                        await self._retire_due.wait()
                    self._retire_due = trio.Event()
                    await self._retire_wait()
        finally:
            self._retirer_done.set()

    async def stop(self) -> None:
        """End the background retires (before the volume closes its columns)."""
        if self._retirer is not None:
            self._retirer.cancel()
            await self._retirer_done.wait()

    async def _retire_wait(self) -> None:
        """Retire what is written; rewind when nothing is in flight."""
        if self._retiring:
            await self._retired.wait()
            return
        self._retiring = True
        done = self._retired = trio.Event()
        try:
            if self._inflight:
                # Writers never stop for long enough to leave nothing in
                # flight: first the columns' flush of what they hold, while
                # writers go on; then new entries wait for this retire, the
                # ones in flight are written back, and the retire's own
                # flush has only those to write.
                try:
                    await self.vol.flush_columns()
                except OSError:
                    pass  # the retire's flush meets it again and fails the log
                self._holding = True
                while self._inflight:
                    self._drained = trio.Event()
                    await self._drained.wait()
            await self.retire()
        finally:
            self._retiring = self._holding = False
            done.set()

    async def retire(self) -> None:
        """Flush the columns, then record every entry written so far retired.
        With the volume's gate held (no write in flight), this empties the
        log: a column that comes back (attach, replace) must not get an
        entry from before it left replayed onto what its rebuild wrote."""
        if self._inflight or self.end == HEADER or self.failed is not None:
            return
        seq = self.seq
        try:
            await self.vol.flush_columns()
            async with self._io:
                if self._inflight or self.seq != seq or self._pending or self.failed:
                    return  # writers came in meanwhile: their entries stay
                await trio.to_thread.run_sync(self._rewind_sync, seq)
        except OSError as e:
            await self._fail(f"retire failed: {e}")
            return
        self.retires += 1

    def _rewind_sync(self, seq: int) -> None:
        os.pwrite(self.fd, _header(seq, self.vol.state.uuid), 0)
        os.fdatasync(self.fd)
        self.retired, self.end = seq, HEADER

    async def _fail(self, why: str) -> None:
        """The log cannot be trusted to hold the next writes: the volume
        refuses writes, and the sidecar log stops naming it in use, so that a
        restart regenerates the dirty stripes' parity instead of replaying it."""
        if self.failed is not None:
            return
        self._mark_failed(why)
        await self._record_failed()

    def _mark_failed(self, why: str) -> None:
        self.failed = why
        # Appends are refused from now on: every entry past the last durable
        # one is dropped by the write-back (counted in `lost` as it goes).
        self._losing = self.seq - self.synced
        vol = self.vol
        vol.error = vol.error or f"RAID-5 log {self.path} failed: {why}"
        log.critical("volume %s: RAID-5 log %s failed: %s; refusing writes (a restart "
                     "regenerates the parity of the dirty stripes)", vol.name, self.path, why)
        events.emit(events.RAID5_LOG_FAILED, vol.name, path=str(self.path), error=why,
                    lost_entries=self._losing)

    def lost_entries(self) -> int:
        return max(self.lost, self._losing or 0)

    def problem(self) -> str | None:
        """The volume's status `problem` once the log failed."""
        if self._losing is None:
            return None
        return (f"RAID-5 log {self.path} failed: {self.failed}; writes refused; "
                f"{self.lost_entries()} acknowledged write(s) lost; see `When the RAID-5 log "
                f"fails` in docs/operations.md")

    async def _record_failed(self) -> None:
        if self._failure_recorded:
            return
        self._failure_recorded = True
        vol = self.vol
        # Shielded (bounded): a stop cancels the retirer that may be here,
        # and a flush cut short would leave the failed log named in use.
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + FAILED_FLUSH_SECONDS
            try:
                # What this log made durable is on the columns (written back
                # already): flushed there before the restart stops replaying it.
                await vol.flush_columns()
            except OSError as e:
                log.critical("volume %s: flushing the columns after RAID-5 log %s failed: %s",
                             vol.name, self.path, e)
        if scope.cancelled_caught:
            # Its entries may not be durable on the columns: the log stays
            # named, and a restart replays what it can read of it.
            log.critical("volume %s: the columns' flush after RAID-5 log %s failed took over "
                         "%d s; the log is still recorded in use", vol.name, self.path,
                         FAILED_FLUSH_SECONDS)
            return
        vol.state.extra.pop(IN_USE, None)
        try:
            with trio.CancelScope(shield=True):
                await vol.checkpoint()
        except OSError as e:
            log.critical("volume %s: cannot record that RAID-5 log %s failed: %s",
                         vol.name, self.path, e)

    def status(self) -> dict[str, Any]:
        return {"path": str(self.path), "capacity": CAPACITY, "used_bytes": self.end - HEADER,
                "in_flight": len(self._inflight), "commits": self.commits,
                "retires": self.retires, "full_waits": self.waits, "failed": self.failed,
                "cached_bytes": self.cache.bytes, "cache_waits": self.cache_waits,
                "lost_entries": self.lost_entries()}

    def close(self) -> None:
        if self.fd >= 0:
            close_locked(self.fd)
            self.fd = -1
