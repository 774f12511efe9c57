"""The RAID-5 write-back cache against the paths that look at the columns on
their own (data_ranges), and faults during write-back: a sidecar that fails,
a stop that cancels the recording of a failed log, a rebuild after a log
failure."""

from __future__ import annotations

import errno
import os

import pytest
import trio

from vmd.config import KiB

from enginekit import running_volume
from raid5kit import column_bytes, decode, raid5_config, xor_all

SU = 64 * KiB


async def test_data_ranges_reports_a_stripe_written_back_while_the_columns_are_asked(tmp_path):
    cfg = raid5_config(tmp_path, size=2 * 16 * SU, raid5_log=tmp_path / "r5.r5log")
    async with running_volume(cfg) as vol:
        release, held = trio.Event(), trio.Event()

        async def holder() -> None:
            async with vol.r5log._io:  # the committer cannot sync: the write stays cached
                held.set()
                await release.wait()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(holder)
            await held.wait()
            s = 5
            await vol.pwrite(s * vol.width + 100, b"D" * 4096)  # acknowledged, cached
            assert vol.r5log.cache.holds_stripes(s, s + 1)
            last = vol.columns[-1]
            allocated = last.allocated

            async def allocated_then_write_back(off: int, size: int):
                got = await allocated(off, size)
                # The write-back completes between the columns' answers and
                # anything data_ranges looks at after them.
                release.set()
                await vol.r5log.drain()
                return got

            last.allocated = allocated_then_write_back
            try:
                ranges = await vol.data_ranges(0, vol.size)
            finally:
                del last.allocated
        assert not vol.r5log.cache
        assert await vol.pread(s * vol.width + 100, 4096) == b"D" * 4096
        assert any(a <= s * vol.width < a + n for a, n in ranges), \
            f"stripe {s} holds an acknowledged write but data_ranges said {ranges}"
