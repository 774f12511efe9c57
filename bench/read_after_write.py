"""Read right after a write of the same 4 KiB, at the engine (no FUSE): the
plexes' page cache still holds the write dirty. Buffered plex reads find it
there; direct ones (O_DIRECT, tried in docs/performance.md) write the range back
first. Then cold 4 KiB random reads (the images' cache dropped): median latency
and process CPU (io_uring's kernel workers included) per read.
Prints the median read latency in µs and the data check.
usage: PYTHONPATH=<tree>:<tree>/tests python bench/read_after_write.py DIR [N]"""

from __future__ import annotations

import os
import random
import statistics
import sys
import time
from pathlib import Path

import trio

from enginekit import running_volume, volume_config
from vmd.config import KiB, MiB


async def main(d: Path, n: int) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for f in d.glob("*"):
        f.unlink()
    vc = volume_config(d, size=64 * MiB, direct_io=False)
    rnd = random.Random(1)
    lat = []
    async with running_volume(vc) as vol:
        for off in range(0, vc.size, MiB):  # data everywhere: no hole is read
            await vol.pwrite(off, rnd.randbytes(MiB))
        for i in range(n):
            off = rnd.randrange(0, vc.size // (4 * KiB)) * 4 * KiB
            data = rnd.randbytes(4 * KiB)
            await vol.pwrite(off, data)
            t0 = time.perf_counter()
            got = await vol.pread(off, 4 * KiB)
            lat.append(time.perf_counter() - t0)
            assert got == data, f"stale data at {off}"
        await vol.flush()
        for p in vol.plexes:
            os.posix_fadvise(p.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        cold = []
        c0 = time.process_time()
        for i in range(n):
            off = rnd.randrange(0, vc.size // (4 * KiB)) * 4 * KiB
            t0 = time.perf_counter()
            await vol.pread(off, 4 * KiB)
            cold.append(time.perf_counter() - t0)
        cpu = (time.process_time() - c0) / n
    print(f"read-after-write median_us {statistics.median(lat) * 1e6:.0f} "
          f"p90_us {sorted(lat)[len(lat) * 9 // 10] * 1e6:.0f} n {n} ok; "
          f"cold read median_us {statistics.median(cold) * 1e6:.0f} cpu_us {cpu * 1e6:.0f}")


trio.run(main, Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 300)
