"""Verify and repair: compare the in-sync plexes of a volume while it serves
(md's `check`/`repair`, `zpool scrub`).

The volume is walked in chunks. Each chunk is compared under the volume's
range lock, so no write can fall between the reads of two plexes: a write in
flight is never reported as a mismatch. A chunk that no plex has allocated
(SEEK_DATA/SEEK_HOLE) is equal without being read. Plexes are compared in
512-byte sectors (md counts them too): a mismatched range is a run of
sectors in which the plexes hold the same versions (which plexes agree,
which differ: `range_versions`). `repair` writes the source plex's sectors
over the others, still under the lock: over every plex that takes writes,
also a SYNCING or SNAPATT one not compared. The source is `--from`'s plex;
without it, per range, a plex of a strict majority of the compared plexes
where there is one, else the first ACTIVE plex (two plexes never have one).

A crash during a repair must not undo it the wrong way round: the repair
dirties its regions in the DRL before writing, and a crash recovery copies
one plex over the others there. So before its first write from a source the
repair names that source in the log (`extra.repair`), and recovery copies
from it (`repair_source`); before it writes from another source, everything
written so far is flushed (equal on every plex: any source recovers those
regions right). The name is dropped once the repairs are flushed.

A verify is a `Job` (vmd/tasks.py) of the daemon's verify task group
(`vmd/verify_verbs.py:Verifies`): the verb waits for it with `group.call`,
so a client that goes away takes its verify with it, and `vmd stop` stops
every running verify before the volumes close.

A verify is not resumed after a restart or a stop: it holds nothing that
must survive (the plexes hold the repairs, the log the last result), and a
new one starts over from offset 0. The last result is kept in the sidecar
log (`extra.verify`), so `vmd status` shows it after a restart.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from . import events
from .config import MiB, format_size
from .errors import VmdError
from .plex import Plex, PlexIOError
from .pace import Pace
from .sidecar import ACTIVE, SNAPDONE, WRITABLE
from .spread import DeviceSlots, Queued, devices_of
from .tasks import STOPPING, Job

if TYPE_CHECKING:
    from .volume import Volume

log = logging.getLogger(__name__)

CHUNK = 1 * MiB  # compared per range-lock hold: short enough not to stall writes
BLOCK = 64 * 1024  # a differing chunk is narrowed down in blocks, then sectors
SECTOR = 512
MAX_RANGES = 16  # mismatched ranges kept (reported, logged) per verify
REPAIR = "repair"  # key of the log's `extra`: the running repair's source
# The result's fields a `verify-finished` event carries (docs/operations.md#events).
EVENT_FIELDS = ("checked_bytes", "mismatched_bytes", "repaired_bytes", "ranges", "complete")
COMPARED = frozenset({ACTIVE, SNAPDONE})  # in-sync states (a snapshot mirror is a copy too)

T = TypeVar("T")


def previous_result(recorded: dict[str, Any] | None) -> dict[str, Any] | None:
    """The last verify's result in the log: while a verify runs (or after
    the daemon died during one) the log holds its start, which names the
    result before it."""
    if recorded is not None and recorded.get("unfinished"):
        return recorded.get("previous")
    return recorded


def last_complete(result: dict[str, Any] | None) -> dict[str, Any] | None:
    """The newest result of a verify that checked the whole volume."""
    if result is None:
        return None
    return result if result.get("complete") else result.get("last_complete")


async def _each(plexes: Sequence[Plex], fn: Callable[[Plex], Awaitable[T]]) -> list[T]:
    """fn(p) for every plex at once (two disks are read in parallel). A plex's
    error is raised as itself (the first), not wrapped in the nursery's
    ExceptionGroup: the caller fails that plex and compares the rest again."""
    out: list[Any] = [None] * len(plexes)
    errors: list[PlexIOError] = []

    async def one(i: int) -> None:
        try:
            out[i] = await fn(plexes[i])
        except PlexIOError as e:
            errors.append(e)

    async with trio.open_nursery() as nursery:
        for i in range(len(plexes)):
            nursery.start_soon(one, i)
    if errors:
        raise errors[0]
    return out


Versions = tuple[tuple[int, ...], ...]


def repair_source(vol: Volume, candidates: Sequence[Plex]) -> Plex | None:
    """At a start after a crash: the plex a repair the crash interrupted was
    copying from, if the log names one and it is among `candidates` (the
    plexes crash recovery may copy from). Where the repair had written, the
    plexes differ and only its source holds the bytes the administrator chose
    (or the majority held): the first plex may be the one being repaired. The
    name is dropped from the state: the checkpoint written at start clears it."""
    rec = vol.state.extra.pop(REPAIR, None)
    if not isinstance(rec, dict):
        return None
    source = next((p for p in candidates if p.record.path == rec.get("path")), None)
    if source is None:
        log.warning("volume %s: a repair from plex %s (%s) was running at the crash, but that "
                    "plex is no longer an ACTIVE plex in sync: the regions it repaired are "
                    "recovered from another; run `vmd verify %s` once the volume is in sync",
                    vol.name, rec.get("source"), rec.get("path"), vol.name)
    else:
        log.info("volume %s: a repair from plex %s was running at the crash: recovering from "
                 "plex %s (the source of the repair the crash interrupted)", vol.name,
                 source.name, source.name)
    return source


def _differing_sectors(ref: bytes | bytearray, others: Sequence[bytes | bytearray]
                       ) -> Iterator[tuple[int, int]]:
    """[start, end) of each sector where any of `others` differs from `ref`
    (whole blocks compared first: most of a differing chunk is equal)."""
    n = len(ref)
    for b in range(0, n, BLOCK):
        be = min(n, b + BLOCK)
        block = ref[b:be]
        if all(o[b:be] == block for o in others):
            continue
        for s in range(b, be, SECTOR):
            e = min(be, s + SECTOR)
            if any(o[s:e] != ref[s:e] for o in others):
                yield s, e


def version_runs(data: Sequence[bytes | bytearray], base: int) -> list[tuple[int, int, Versions]]:
    """(offset, length, versions) runs of the sectors where the plexes' `data`
    (all read at volume offset `base`) differ; `versions` are the indices of
    the plexes holding each version of the run's bytes, the version most plexes
    hold first (a tie: the one of the earliest plex). A run is cut where the
    versions change."""
    out: list[tuple[int, int, Versions]] = []
    for s, e in _differing_sectors(data[0], data[1:]):
        groups: dict[bytes, list[int]] = {}
        for i, d in enumerate(data):
            groups.setdefault(bytes(d[s:e]), []).append(i)
        versions = tuple(sorted((tuple(g) for g in groups.values()),
                                key=lambda g: (-len(g), g[0])))
        last = out[-1] if out else None
        if last is not None and last[0] + last[1] == base + s and last[2] == versions:
            out[-1] = (last[0], last[1] + e - s, versions)
        else:
            out.append((base + s, e - s, versions))
    return out


def mismatched_sectors(ref: bytes | bytearray, others: Sequence[bytes | bytearray],
                       base: int) -> list[tuple[int, int]]:
    """(offset, length) runs of the sectors where any of `others` differs from
    `ref` (all read at volume offset `base`)."""
    out: list[tuple[int, int]] = []
    for s, e in _differing_sectors(ref, others):
        if out and out[-1][0] + out[-1][1] == base + s:
            out[-1] = (out[-1][0], out[-1][1] + e - s)
        else:
            out.append((base + s, e - s))
    return out


class Verify(Job[dict[str, Any]]):
    """One verify (with `repair`: and repair) of `volume`, as a job: its result
    is what `vmd status` shows as `verify`. Stopped early (`stop`, or its
    caller cancelled), it records a result that says `complete: false`.

    This class compares a mirror's plexes; a layout with another check
    (vmd/raid5_verify.py) overrides `_choose` (what is compared), `_check`
    (one chunk, under the range lock) and `_layout_result`."""

    chunk = CHUNK  # volume bytes per range-lock hold
    images = "plexes"  # what `plex_names` names, for the log

    def __init__(self, volume: Volume, *, repair: bool = False, source: str | None = None,
                 slots: DeviceSlots | None = None):
        super().__init__()
        self.name = f"verify-{volume.name}"
        self.volume = volume
        self.repair = repair
        self.slots = slots
        self.source: Plex | None = None  # the repair's source, if there is one
        self.chosen = source is not None  # --from: the source of every range
        self.plex_names = self._choose(source)
        self.queue = Queued()
        self.running = False
        self.done_bytes = 0  # of the volume walked
        self.checked_bytes = 0  # checked (compared on two plexes or more, or against parity)
        # Read from each image (holes skipped): what the rate limit counts. Not
        # summed over the images: they are meant to sit on separate disks, each
        # read at the limit, as a resync reads its source and writes each target.
        self.read_bytes = 0
        self.mismatched_bytes = 0
        self.repaired_bytes = 0
        self.range_count = 0
        self.ranges: list[list[int]] = []  # the first MAX_RANGES [offset, length]
        self.range_versions: list[list[list[str]]] = []  # per range of `ranges` (a mirror's)
        self.range_sources: list[str] = []  # per range of `ranges`: what a repair wrote
        self.repaired_from: dict[str, int] = {}  # bytes repaired from each source plex
        self.no_majority_bytes = 0  # mismatched where no strict majority chose the source
        self._last_end = -1  # of the last mismatched range seen
        self._last_key: tuple[Any, Any] = (None, None)  # its versions and source
        self._logged: Plex | None = None  # the source the log names (`REPAIR`)

    def _choose(self, source: str | None) -> list[str]:
        """Check that there is something to compare, set the repair's source;
        the names of the images compared."""
        volume = self.volume
        in_sync = [p for p in volume.plexes if self._holds(p, 0, volume.size)]
        if len(in_sync) < 2:
            raise VmdError(f"volume {volume.name} has {len(in_sync) or 'no'} in-sync plex"
                           f"{'' if len(in_sync) == 1 else 'es'} "
                           f"({', '.join(p.name for p in in_sync) or 'none'}): nothing to compare")
        if source is None:
            self.source = next((p for p in in_sync if p.state == ACTIVE), in_sync[0])
        else:
            self.source = volume.plex(source)
            if self.source.state != ACTIVE or self.source not in in_sync:
                raise VmdError(f"--from {source}: plex {source} of volume {volume.name} is "
                               f"{self.source.state}"
                               f"{'' if self.source.state != ACTIVE else ' but not in sync'}; "
                               f"the source must be an ACTIVE plex in sync")
        return [p.name for p in in_sync]

    def _holds(self, p: Plex, off: int, n: int) -> bool:
        m = p.record.missing
        return p.state in COMPARED and p.fd >= 0 and not (m is not None and m.any_in(off, n))

    def status(self) -> dict[str, Any]:
        """Progress, in the shape of a resync's (`vmd verify` shows it on a terminal)."""
        return {"running": self.running, "queued": bool(self.queue.behind),
                "queued_behind": self.queue.behind, "repair": self.repair,
                "done_bytes": self.done_bytes, "total_bytes": self.volume.size,
                "mismatched_bytes": self.mismatched_bytes}

    def _turn(self) -> AbstractAsyncContextManager[None]:
        if self.slots is None:
            return nullcontext()
        return self.slots.turn(devices_of(p for p in self.volume.plexes if p.state in COMPARED),
                               f"verify of volume {self.volume.name}", self.queue)

    def result(self) -> dict[str, Any]:
        if self.cancelled and not self.complete:
            raise VmdError(f"the verify of volume {self.volume.name} was stopped at offset "
                           f"{self.done_bytes} of {self.volume.size}: {STOPPING}")
        return super().result()

    @property
    def complete(self) -> bool:
        return self.done_bytes >= self.volume.size

    async def work(self) -> dict[str, Any]:
        vol = self.volume
        started = time.monotonic()
        error: str | None = None
        try:
            async with self._turn():
                self.running = True
                started = time.monotonic()
                pace = Pace(started, vol.resync.rate_limit)
                log.info("volume %s: verify%s of %s %s started%s", vol.name,
                         " and repair" if self.repair else "", self.images,
                         ", ".join(self.plex_names),
                         f" (repair {self._repaired_from()})" if self.repair else "")
                await self._record_start()
                while self.done_bytes < vol.size:
                    n = min(self.chunk, vol.size - self.done_bytes)
                    await self._chunk(self.done_bytes, n)
                    self.done_bytes += n
                    await self._throttle(pace)
        except VmdError as e:
            error = str(e)
            raise
        finally:
            self.running = False
            with trio.CancelScope(shield=True):
                if self.repaired_bytes or self._logged is not None:
                    # The repairs are durable before they are reported, also
                    # those of a verify that was stopped or failed midway.
                    try:
                        await vol.flush()
                        # Every plex holds them: a crash may recover from any
                        # (the checkpoint of the result makes this durable).
                        if self._logged is not None:
                            vol.state.extra.pop(REPAIR, None)
                    except OSError as e:
                        error = error or f"flushing the repaired plexes failed: {e}"
                result = self._result(time.monotonic() - started, error)
                await self._record(result)
        return result

    def _result(self, seconds: float, error: str | None) -> dict[str, Any]:
        complete = self.complete and error is None
        return {
            "time": time.strftime("%Y-%m-%d %H:%M:%S"), "checked_bytes": self.checked_bytes,
            "mismatched_bytes": self.mismatched_bytes, "ranges": self.ranges,
            "range_count": self.range_count, "repaired_bytes": self.repaired_bytes,
            "repair": self.repair, "plexes": self.plex_names,
            "seconds": round(seconds, 3), "complete": complete, **self._layout_result(),
            **({"error": error} if error else {}),
            **({} if complete or error else {"stopped_at": self.done_bytes}),
        }

    def _layout_result(self) -> dict[str, Any]:
        assert self.source is not None
        # `source` only for a repair: a verify alone takes no side (trial 8).
        return {"range_versions": self.range_versions,
                **({"source": self.source.name, "range_sources": self.range_sources,
                    "repaired_from": self.repaired_from,
                    "no_majority_bytes": self.no_majority_bytes, "from_given": self.chosen}
                   if self.repair else {})}

    def _repaired_from(self) -> str:
        """Where a repair's bytes come from, for the daemon's log."""
        assert self.source is not None
        if self.chosen or not self.repaired_from:
            return f"from plex {self.source.name}"
        return "from " + ", ".join(f"plex {p} ({format_size(n)})"
                                   for p, n in self.repaired_from.items())

    async def _record_start(self) -> None:
        """Say in the log that a verify runs, before it reads or repairs:
        killed with the daemon, it leaves no result of its own, and status
        must not go on showing the result before it (trial 10, T-F: a
        `--repair` killed midway left "no mismatches" from the day before,
        though it had found and repaired some)."""
        vol = self.volume
        before = previous_result(vol.state.extra.get("verify"))
        vol.state.extra["verify"] = {
            **self._result(0.0, None), "unfinished": True,
            **({"previous": before} if before is not None else {}),
            **({"last_complete": kept} if (kept := last_complete(before)) is not None else {})}
        try:
            await vol.checkpoint()
        except OSError as e:
            log.error("volume %s: cannot record the verify's start in %s: %s", vol.name,
                      vol.sidecar.path, e)

    async def _record(self, result: dict[str, Any]) -> None:
        """The result into the log (kept across restarts) and the daemon's log."""
        vol = self.volume
        what = (f"volume {vol.name}: verify{' and repair' if self.repair else ''} "
                f"{'finished' if result['complete'] else 'stopped'}: "
                f"{format_size(self.checked_bytes)} checked in {result['seconds']} s, "
                f"{format_size(self.mismatched_bytes)} mismatched")
        if self.mismatched_bytes:
            first = ", ".join(f"{off}+{n}" for off, n in self.ranges[:4])
            log.warning("%s in %d range%s (first: %s), %s repaired %s", what,
                        self.range_count, "" if self.range_count == 1 else "s", first,
                        format_size(self.repaired_bytes), self._repaired_from())
        else:
            log.info("%s", what)
        events.emit(events.VERIFY_FINISHED, vol.name, **{k: result[k] for k in EVENT_FIELDS})
        if vol.stopped:
            return  # the log is closed: the result is in the daemon's log only
        if not result["complete"]:
            # A verify stopped early (Ctrl-C) does not hide what the last
            # whole one found: a mismatch it reported would vanish from status.
            kept = last_complete(previous_result(vol.state.extra.get("verify")))
            if kept is not None:
                result["last_complete"] = kept
        vol.state.extra["verify"] = result
        try:
            await vol.checkpoint()
        except OSError as e:
            log.error("volume %s: cannot record the verify result in %s: %s", vol.name,
                      vol.sidecar.path, e)

    async def _throttle(self, pace: Pace) -> None:
        await pace.wait(lambda: self.volume.resync.rate_limit, lambda: self.read_bytes)

    async def _chunk(self, off: int, n: int) -> None:
        vol = self.volume
        await vol.gate.enter()  # plexes are not reconfigured (closed) under us
        try:
            if vol.stopped:
                raise VmdError(f"volume {vol.name} was stopped during the verify "
                               f"(at offset {off} of {vol.size})")
            async with vol.ranges.hold(off, off + n):
                await self._check(off, n)
        finally:
            vol.gate.exit()

    async def _check(self, off: int, n: int) -> None:
        """Check (and repair) [off, off+n) of the volume, its range held."""
        vol = self.volume
        assert self.source is not None
        while True:
            plexes = [p for p in vol.plexes if self._holds(p, off, n)]
            if self.repair and self.source not in plexes:
                raise VmdError(f"plex {self.source.name}, the repair's source, is no "
                               f"longer in sync ({self.source.state}) at offset {off}: "
                               f"repair stopped")
            if len(plexes) < 2:
                return  # recovering here, or a plex failed: nothing to compare
            try:
                await self._compare(plexes, off, n)
                return
            except PlexIOError as e:
                if not await vol.fail_plex(e.plex, e, off, n):  # else compare the rest again
                    raise VmdError(f"plex {e.plex.name}, the last in-sync plex of volume "
                                   f"{vol.name}, cannot be read at offset {off}: {e}") from None

    async def _compare(self, plexes: list[Plex], off: int, n: int) -> None:
        allocated = await _each(plexes, lambda p: p.allocated(off, n))
        if not any(allocated):
            self.checked_bytes += n  # holes on every plex: zeros everywhere
            return
        data = await _each(plexes, lambda p: p.pread(off, n))
        self.read_bytes += n
        self.checked_bytes += n
        if all(d == data[0] for d in data[1:]):
            return
        by_source: dict[Plex, list[tuple[int, int]]] = {}
        for start, length, versions in version_runs(data, off):
            groups = [[plexes[i] for i in g] for g in versions]
            source = None
            if self.repair:
                source, majority = self._source_of(groups, len(plexes))
                if not majority and not self.chosen:
                    self.no_majority_bytes += length
            self._note(start, length, versions=[[p.name for p in g] for g in groups],
                       source=source.name if source is not None else None)
            if source is not None:
                by_source.setdefault(source, []).append((start, length))
        for source, bad in by_source.items():
            await self._repair(source, data[plexes.index(source)], off, bad)

    def _source_of(self, groups: list[list[Plex]], compared: int) -> tuple[Plex, bool]:
        """A range's repair source, and whether a majority chose it: --from's
        plex; else an ACTIVE plex of a strict majority of the `compared`
        plexes (`groups` holds the plexes of each version, the most held
        first); else the first ACTIVE plex (the documented default)."""
        assert self.source is not None
        if self.chosen:
            return self.source, False
        if len(groups[0]) * 2 > compared:
            active = [p for p in groups[0] if p.state == ACTIVE]
            if active:
                return active[0], True
        return self.source, False

    def _note(self, start: int, length: int, *, joins: bool = True,
              versions: list[list[str]] | None = None, source: str | None = None) -> None:
        """Count a mismatched range; one that `joins` the last (with the same
        `versions` and repair `source`) continues it."""
        self.mismatched_bytes += length
        key = (versions, source)
        if joins and start == self._last_end and key == self._last_key:  # across chunks
            last = self.ranges[-1] if self.ranges else None
            if last is not None and last[0] + last[1] == start:
                last[1] += length
        else:
            self.range_count += 1
            if len(self.ranges) < MAX_RANGES:
                self.ranges.append([start, length])
                if versions is not None:
                    self.range_versions.append(versions)
                if source is not None:
                    self.range_sources.append(source)
        self._last_end = start + length
        self._last_key = key

    async def _repair(self, source: Plex, ref: bytes | bytearray, off: int,
                      bad: list[tuple[int, int]]) -> None:
        """Write the source's sectors (`ref`, read at `off`) over the others.
        What the volume returns there may change, so first every map of a
        plex or link that misses writes gets the ranges, durably (invariant
        3), and Remote Copy saves what it must (`before_write`), as for a
        user's write. The log names the source first (a crash recovers from
        it)."""
        vol = self.volume
        # Every plex that takes writes, not only those compared: a SYNCING or
        # SNAPATT plex whose copy already passed here holds the old bytes and
        # its map says so no more. Written as a user's write is (invariant 6:
        # under the range lock this chunk holds). Not by marking its map
        # instead: a copy of this range that returned before the lock was
        # taken and is not yet committed would clear the mark when its
        # `copied` record is written.
        targets = [p for p in vol.plexes if p.state in WRITABLE and p is not source]
        marked = False
        # Without --from each range keeps its own majority, and a DRL region
        # may hold ranges whose majorities differ, some not repaired yet: a
        # crash recovering the region from any one plex would overwrite the
        # majority of those (found by a trial). So no DRL mark and no source
        # in the log: a crash leaves the repair partial, never undoes a
        # majority (its plexes are rewritten with the bytes they hold), and
        # the next verify finds and repairs what remains.
        if self.chosen and self._logged is not source:  # (its only source: --from's)
            vol.state.extra[REPAIR] = {"source": source.name, "path": source.record.path}
            self._logged = source
            marked = True
        for p in vol.plexes:
            m = p.record.missing
            if p.state not in WRITABLE and m is not None:
                for start, length in bad:
                    m.mark(start, length)
                marked = True
        if marked:
            await vol.checkpoint()
        for start, length in bad:
            if vol.before_write is not None:
                await vol.before_write(start, length)
            piece = ref[start - off:start - off + length]
            # With --from, dirty in the DRL first, as a user's write: a crash
            # before the repair is flushed leaves plexes that disagree where
            # reads were already answered from the source, and a dirty region
            # is recovered from the source the log names (one copy wins).
            regions = await vol.drl.begin_write(start, length) if self.chosen else range(0)
            try:
                for t in targets:
                    if t.state not in WRITABLE:
                        continue  # failed on an earlier range
                    try:
                        await t.pwrite(start, piece)
                    except PlexIOError as e:
                        await vol.fail_plex(t, e, start, length)
            finally:
                vol.drl.end_write(regions)
            self.repaired_bytes += length
            self.repaired_from[source.name] = self.repaired_from.get(source.name, 0) + length
