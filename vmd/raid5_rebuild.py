"""RAID-5 rebuild: recompute the units a column lacks from the other columns.

The mirror's resync (`vmd/resync.py`) drives it: the same targets (columns
whose map has bits), the same range lock per run, throttle, `copied`
records after a flush (so that a rebuild interrupted by SIGKILL resumes), and
the same end (SYNCING → ACTIVE). Only the copy of one run differs: a
column's unit of stripe `s` is the XOR of the other columns' units of `s`,
whether it holds data or parity, so a run of stripes is rebuilt by reading
the same column range of every other column (in parallel) and XOR-ing.
Parity regeneration after an unclean stop without a RAID-5 log is the same
thing: the parity columns lack the dirty stripes.
"""

from __future__ import annotations

import logging
from typing import Any

from bitarray import bitarray

from .plex import PlexIOError
from .resync import Resync

log = logging.getLogger(__name__)


def xor_into(acc: bytearray | memoryview, other: bytes | bytearray | memoryview) -> None:
    """acc ^= other, in C (bitarray over both buffers, no copy): about 75 µs
    per MiB on this machine, where a Python loop over bytes takes ~50 ms."""
    a = bitarray(buffer=acc)
    a ^= bitarray(buffer=other)


class Rebuild(Resync):
    # A Raid5Volume, which owns and drives its rebuild (not imported: no cycle).
    volume: Any

    async def _allocated(self, runs: list[tuple[int, int]]) -> int:
        fmr = self.volume.state.fmr_region
        return sum(min(count * fmr, self.volume.size - first * fmr) for first, count in runs)

    async def _copy_chunk(self, off: int, length: int) -> tuple[list[str], int] | None:
        vol = self.volume
        stripes = vol._stripes(off, length)
        async with vol.ranges.hold(stripes.start * vol.width, stripes.stop * vol.width):
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
                        got = await vol._read_pieces([(c, at, n) for c in others])
                    except PlexIOError as e:
                        await vol._fail_columns([e], stripes)
                        return None
                    acc = bytearray(got[0])
                    for b in got[1:]:
                        xor_into(acc, b)
                    try:
                        await col.pwrite_async(at, acc)
                    except PlexIOError as e:
                        await vol._fail_columns([e], stripes)
                        break
                else:
                    done.append(col.name)
            return done, length


def _runs(stripes: list[int]) -> list[tuple[int, int]]:
    """Consecutive stripes as (first, last) pairs."""
    out: list[tuple[int, int]] = []
    for s in stripes:
        if out and out[-1][1] == s - 1:
            out[-1] = (out[-1][0], s)
        else:
            out.append((s, s))
    return out
