"""Verify and repair of a RAID-5 volume: each stripe's parity unit against
the XOR of its data units (md's `check`/`repair` on RAID-5).

The volume is walked in runs of whole stripes, each under the range lock of
its stripes' volume bytes, so no write (which takes the range it writes, and
changes parity only inside its stripes) is between the reads of the columns.
A stripe's units sit at the same offset on every column, so a run of stripes
is one read of the same column range on every column, and the XOR of all of
them is zero exactly where parity matches data. Where it is not, the
mismatched 512-byte sectors are counted, as for a mirror.

Ranges are in **column** terms: `[offset, length]` at the same offset on every
column, inside one stripe unit (a range never spans two stripes); the stripe
is `offset // stripe_unit` and its parity is on `parity_columns[i]`. A
volume offset would not do: the parity unit's bytes stand for the same unit
offset of every data unit of the stripe, which are not contiguous in the
volume.

`--repair` rewrites the mismatched parity sectors from the data units. When a
data unit was damaged (not the parity), this makes parity agree with the
damaged data: parity cannot say which unit is wrong, and md's `repair` does
the same. The data the volume returns does not change, so no map (DRL,
FastResync, Remote Copy) is touched; with a RAID-5 log the new parity goes
through it like any column write, so a replay after a crash cannot put the
old parity back. A stripe that lacks a column (degraded, being rebuilt) has
no parity to check and is skipped; a degraded volume is refused at start.
"""

from __future__ import annotations

from typing import Any

from .errors import VmdError
from .plex import PlexIOError
from .raid5 import Raid5Volume
from .raid5_rebuild import _runs, xor_into
from .sidecar import ACTIVE
from .verify import CHUNK, Verify, _each, mismatched_sectors


class Raid5Verify(Verify):
    """Parity check (and with `repair`, regeneration) of a RAID-5 volume."""

    images = "columns"
    volume: Raid5Volume

    def __init__(self, volume: Raid5Volume, **kw: Any):
        self.parity_columns: list[str] = []  # per range of `ranges`
        super().__init__(volume, **kw)
        self.chunk = volume.width * max(1, CHUNK // volume.width)

    def _choose(self, source: str | None) -> list[str]:
        vol = self.volume
        if source is not None:
            raise VmdError(f"--from {source}: volume {vol.name} is RAID-5: --repair rewrites "
                           f"each stripe's parity from its data units, there is no copy to "
                           f"choose (leave --from out)")
        out = [p for p in vol.columns if p.state != ACTIVE or p.fd < 0]
        if out:
            raise VmdError(f"volume {vol.name} is degraded (column "
                           f"{', '.join(f'{p.name} {p.state}' for p in out)}): its parity "
                           f"cannot be checked until the column is back and rebuilt")
        return [p.name for p in vol.columns]

    def _layout_result(self) -> dict[str, Any]:
        return {"layout": "raid5", "ranges_in": "column",
                "stripe_unit": self.volume.su, "parity_columns": self.parity_columns}

    def _repaired_from(self) -> str:
        return "into parity from the data units"

    async def _check(self, off: int, n: int) -> None:
        vol = self.volume
        stripes = vol._stripes(off, n)
        # The columns are read as they are (holes, the same range of each):
        # what the write-back cache holds for these stripes goes there first.
        await vol.drain(stripes)
        while True:
            # A stripe lacking a column has nothing to check its parity against.
            good = [s for s in stripes if not vol._bad(s)]
            try:
                for first, last in _runs(good):
                    await self._stripes(first, last + 1)
                return
            except PlexIOError as e:
                await vol._fail_columns([e], stripes)  # and check what is left

    async def _stripes(self, first: int, stop: int) -> None:
        """Check stripes [first, stop), all of whose columns are in."""
        vol = self.volume
        at, length = first * vol.su, (stop - first) * vol.su
        checked = (stop - first) * vol.width
        allocated = await _each(vol.columns, lambda p: p.allocated(at, length))
        if not any(allocated):
            self.checked_bytes += checked  # holes on every column: zeros everywhere
            return
        got = await vol._read_pieces([(c, at, length) for c in range(vol.ncol)])
        self.read_bytes += length  # from each column
        self.checked_bytes += checked
        acc = bytearray(got[0])
        for b in got[1:]:
            xor_into(acc, b)
        if acc.count(0) == length:
            return
        zero = bytes(vol.su)
        repairs: list[tuple[int, int, bytearray]] = []
        for s in range(first, stop):
            rel = (s - first) * vol.su
            unit = memoryview(acc)[rel:rel + vol.su]
            if unit == zero:
                continue
            pcol = vol.parity_col(s)
            for start, size in mismatched_sectors(unit, [zero], s * vol.su):
                self._note(start, size, joins=start % vol.su != 0)
                if len(self.parity_columns) < len(self.ranges):
                    self.parity_columns.append(vol.columns[pcol].name)
                if self.repair:
                    # parity ^ (parity ^ XOR of the data) = XOR of the data
                    piece = bytearray(got[pcol][start - at:start - at + size])
                    xor_into(piece, acc[start - at:start - at + size])
                    repairs.append((pcol, start, piece))
        if repairs:
            await self._repair_parity(repairs, range(first, stop))

    async def _repair_parity(self, writes: list[tuple[int, int, bytearray]],
                             stripes: range) -> None:
        vol = self.volume
        # As a user's write: logged first if there is a log (a replay must
        # not put an older logged parity back), then written back.
        failed = await vol.put_pieces(writes, stripes)
        self.repaired_bytes += sum(len(piece) for c, _, piece in writes
                                   if not any(e.plex is vol.columns[c] for e in failed))
