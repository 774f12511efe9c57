"""RAID-5 engine races: writes and degraded reads of one stripe, and the RAID-5
log's retire against new writes, its write errors, and its background tasks."""

from __future__ import annotations

import os
import random

import trio

from vmd.config import KiB

from enginekit import running_volume
from raid5kit import column_bytes, decode, raid5_config, xor_all

SU = 64 * KiB


async def test_concurrent_writes_to_units_of_one_stripe_keep_parity(tmp_path):
    # Each small write reads old data or parity and rewrites the stripe's
    # parity: two of them on different units of one stripe must not both
    # start from the parity the other is replacing.
    cfg = raid5_config(tmp_path, ncol=4, size=3 * 8 * SU)
    ref = bytearray(os.urandom(cfg.size))
    rnd = random.Random(2)
    async with running_volume(cfg) as vol:
        await vol.pwrite(0, bytes(ref))
        s = 3
        base = s * vol.width
        for _ in range(20):
            async with trio.open_nursery() as nursery:
                for k in range(3):
                    for j in range(2):  # disjoint: the order of the writes does not matter
                        at = base + k * SU + j * SU // 2 + rnd.randrange(0, SU // 2 - 8192)
                        data = os.urandom(rnd.randint(1, 8192))
                        ref[at:at + len(data)] = data
                        nursery.start_soon(vol.pwrite, at, data)
        await vol.flush()
        assert await vol.pread(0, cfg.size) == bytes(ref)
        cols = column_bytes(cfg)
        assert decode(cols, SU) == bytes(ref)
        assert not any(xor_all(cols)), "parity of the stripe does not match its data"
        # Each unit of the stripe read back from the others (its column out).
        for k in range(3):
            c = vol.data_col(s, k)
            name = vol.columns[c].name
            await vol.detach_plex(name)
            assert await vol.pread(base + k * SU, SU) == bytes(ref[base + k * SU:
                                                                   base + (k + 1) * SU])
            await vol.attach_plex(name)
            await vol.resync.wait_idle()
