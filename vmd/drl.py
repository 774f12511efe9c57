"""Dirty-region logging: the write-side bookkeeping of the sidecar log.

Invariant 1: a plex write to region r is issued only after the log durably says
r is dirty. Writers that dirty new regions at the same moment share one log
flush (group commit); writes to regions already dirty cost no log I/O.
Invariant 2: regions are cleaned lazily, once idle for `clean_delay` seconds,
and only after an fdatasync of every plex that took writes.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from bitarray import bitarray

from .sidecar import SidecarLog, VolumeState

log = logging.getLogger(__name__)


# Regions dirtied ahead of a sequential writer (see begin_write): at most this
# many more regions to recover after a crash, per stream.
LOOKAHEAD = 8
# A lazy clean that keeps failing (a failed RAID-5 log fails every flush
# until a restart) is logged once, then once per this many seconds.
CLEAN_FAILURE_LOG_SECONDS = 600.0


class _Batch:
    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: BaseException | None = None


class DirtyRegionLog:
    def __init__(self, state: VolumeState, sidecar: SidecarLog, *, enabled: bool,
                 clean_delay: float, flush_plexes: Callable[[], Awaitable[None]],
                 fmr_bits: Callable[[list[int]], dict[str, list[int]]],
                 checkpoint: Callable[[], Awaitable[None]] | None = None):
        self.state = state
        self.sidecar = sidecar
        self.enabled = enabled
        self.clean_delay = clean_delay
        self._flush_plexes = flush_plexes
        self._fmr_bits = fmr_bits
        self._checkpoint = checkpoint
        self._cleaning = bitarray(state.drl.nbits)
        self._cleaning.setall(0)
        self._inflight: dict[int, int] = {}
        self._last_write: dict[int, float] = {}
        self._pending: set[int] = set()
        self._need_commit = False
        self._batch = _Batch()
        self._wake = trio.Event()
        self.commits = 0  # dirty records written (each one log flush)
        # The last `dirty` record could not be written: writes to regions not
        # yet dirty fail (EIO) until one can.
        self.failing: OSError | None = None
        self.writes = 0  # writes begun (mark_clean checks none began meanwhile)

    # -- write path ----------------------------------------------------------

    async def begin_write(self, off: int, length: int) -> range:
        """Make the regions of [off, off+length) durably dirty; returns them
        for end_write. Cancels any pending lazy clean of those regions."""
        self.writes += 1
        regions = self.state.drl.span(off, length) if self.enabled else range(0)
        bits = self.state.drl.bits
        need: list[int] = []
        for r in regions:
            self._inflight[r] = self._inflight.get(r, 0) + 1
            self._cleaning[r] = 0
            if not bits[r]:
                need.append(r)
        if need and need[0] > 0 and bits[need[0] - 1]:
            # A sequential stream: dirty the next regions in the same record,
            # so that it pays one log flush per LOOKAHEAD regions, not each.
            last = min(need[-1] + LOOKAHEAD, len(bits) - 1)
            need.extend(r for r in range(need[-1] + 1, last + 1) if not bits[r])
        if need or self.state.clean:
            try:
                await self._commit(need)
            except BaseException:
                self.end_write(regions)
                raise
        return regions

    def end_write(self, regions: range) -> None:
        now = trio.current_time()
        for r in regions:
            n = self._inflight[r] - 1
            if n:
                self._inflight[r] = n
            else:
                del self._inflight[r]
            self._last_write[r] = now

    async def _commit(self, regions: list[int]) -> None:
        self._pending.update(regions)
        self._need_commit = True
        batch = self._batch
        self._wake.set()
        await batch.done.wait()
        if batch.error is not None:
            raise OSError(5, f"cannot record dirty regions in sidecar log {self.sidecar.path}: "
                             f"{batch.error}")

    async def run_committer(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """The one task that writes `dirty` records, one per group of writers."""
        task_status.started()
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            if not self._need_commit:
                continue
            batch, self._batch = self._batch, _Batch()
            regs = sorted(self._pending)
            self._pending = set()
            self._need_commit = False
            try:
                await self.sidecar.append(lambda: {"t": "dirty", "r": regs}, sync=True)
            except OSError as e:
                log.error("volume %s: writing the dirty-region log failed: %s", self.state.name, e)
                batch.error = e
                self.failing = e  # status says so until a commit works again
            else:
                self.failing = None
                # Only now may writers skip the log for these regions.
                bits = self.state.drl.bits
                for r in regs:
                    bits[r] = 1
                self.state.clean = False
                self.commits += 1
            batch.done.set()

    def map_resized(self) -> None:
        """The DRL map was resized in place (`vmd resize`): the marks of
        regions being cleaned cover the same regions."""
        n, old = self.state.drl.nbits, len(self._cleaning)
        if n > old:
            self._cleaning.extend(bitarray(n - old))
            self._cleaning[old:] = 0
        del self._cleaning[n:]

    # -- lazy cleaning -------------------------------------------------------

    @property
    def idle(self) -> bool:
        return not self._inflight and not self._need_commit

    async def clean_idle(self, *, everything: bool = False) -> int:
        """Clean dirty regions idle for clean_delay (or all idle ones). Returns
        how many were cleaned."""
        bits = self.state.drl.bits
        if not bits.any():
            return 0
        now = trio.current_time()
        cand = [r for r in bits.search(1) if r not in self._inflight and
                (everything or now - self._last_write.get(r, 0.0) >= self.clean_delay)]
        if not cand:
            return 0
        for r in cand:
            self._cleaning[r] = 1
        await self._flush_plexes()  # invariant 2: data durable before "clean"
        cleaned: list[int] = []

        def build() -> dict[str, Any] | None:
            # A write that started since cancelled its region's cleaning.
            regs = [r for r in cand if self._cleaning[r] and bits[r]]
            for r in regs:
                self._cleaning[r] = 0
                bits[r] = 0
                self._last_write.pop(r, None)
            if not regs:
                return None
            cleaned.extend(regs)
            return {"t": "clean", "r": regs, "fmr": self._fmr_bits(regs)}

        await self.sidecar.append(build, sync=False)
        return len(cleaned)

    async def mark_clean(self) -> bool:
        """Record the whole volume clean. The caller has stopped I/O (or
        checked that none is in flight). Returns False if I/O raced in."""
        if self.state.clean:
            return True
        writes = self.writes
        await self._flush_plexes()
        bits = self.state.drl.bits

        def build() -> dict[str, Any] | None:
            # A write that started (and maybe ended) during the flush may not
            # be on disk yet: not clean then (invariant 2).
            if not self.idle or self.writes != writes:
                return None
            regs = list(bits.search(1))
            bits.setall(0)
            self._cleaning.setall(0)
            self._last_write.clear()
            self.state.clean = True
            return {"t": "clean", "r": regs, "fmr": self._fmr_bits(regs), "volume": True}

        return await self.sidecar.append(build, sync=True)

    async def run_cleaner(self, is_closed: Callable[[], bool],
                          task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        period = max(0.2, min(self.clean_delay / 2, 2.0))
        failures = 0  # in a row
        logged = 0.0  # when the last of them was logged
        while True:
            await trio.sleep(period)
            try:
                cleaned = await self.clean_idle()
                if self._checkpoint is not None and self.sidecar.needs_compaction():
                    await self._checkpoint()  # keeps the log bounded
                if is_closed() and not self.state.clean and self.idle:
                    quiet = trio.current_time() - max(self._last_write.values(), default=0.0)
                    if quiet >= min(self.clean_delay, 1.0):
                        await self.mark_clean()
                        cleaned += 1
            except OSError as e:
                # Leaving regions dirty is always safe; try again next period.
                failures += 1
                now = trio.current_time()
                if failures == 1 or now - logged >= CLEAN_FAILURE_LOG_SECONDS:
                    logged = now
                    log.warning("volume %s: lazy clean failed: %s (%d time(s) in a row; retried "
                                "every %g s, logged again every %d s while it fails)",
                                self.state.name, e, failures, period, CLEAN_FAILURE_LOG_SECONDS)
            else:
                if failures and cleaned:  # (a period with nothing to clean proves nothing)
                    log.info("volume %s: lazy clean works again after %d failure(s)",
                             self.state.name, failures)
                    failures = 0
