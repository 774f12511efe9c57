"""Helpers for engine tests: volumes without FUSE, in the test's trio loop."""

from __future__ import annotations

import ctypes
import mmap
import os
import random
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from vmd.config import KiB, MiB, VolumeConfig
from vmd.manager import open_volume
from vmd.plex import Plex
from vmd.sidecar import PlexRecord
from vmd.volume import Volume


def volume_config(tmp: Path, *, name: str = "vol0", size: int = 16 * MiB, nplex: int = 2,
                  **kw: Any) -> VolumeConfig:
    kw.setdefault("region_size", 1 * MiB)
    kw.setdefault("fastresync_region", 64 * KiB)
    return VolumeConfig(name=name, size=size,
                        plexes=tuple(tmp / f"{name}-p{i}.img" for i in range(nplex)),
                        log=tmp / f"{name}.log", **kw)


@asynccontextmanager
async def running_volume(vc: VolumeConfig, *, clean_delay: float = 0.2, rate_limit: int = 0,
                         plex_factory: Callable[[PlexRecord, int], Plex] = Plex,
                         recover_all: bool = False, shutdown: bool = True,
                         recover_from: str | None = None,
                         force_degraded: bool = False) -> AsyncIterator[Volume]:
    vol = open_volume(vc, vc.log.parent / "test.yaml", clean_delay=clean_delay,
                      rate_limit=rate_limit, plex_factory=plex_factory, recover_all=recover_all,
                      recover_from=recover_from, force_degraded=force_degraded)
    await vol.checkpoint()
    async with trio.open_nursery() as nursery:
        await nursery.start(vol.run)
        try:
            yield vol
            if shutdown:
                await vol.shutdown()
        finally:
            nursery.cancel_scope.cancel()
            if not shutdown:
                # A "crash": drop everything without the clean-stop records.
                for p in vol.plexes:
                    p.close()
                vol.sidecar.close()


def evict_page_cache(paths: Iterable[Any]) -> None:
    """Drop the files' clean pages from the page cache (write them first)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def in_page_cache(path: Any, off: int, n: int) -> bool:
    """All of [off, off+n) of the file is in the page cache, by mincore(2)
    of a mapping of it: a probe that reads (RWF_NOWAIT) would start the
    read-ahead of what it misses, and change what it looks at."""
    page = mmap.PAGESIZE
    start = off // page * page
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), off + n - start, access=mmap.ACCESS_COPY, offset=start)
    try:
        pages = -(-len(mm) // page)
        vec = (ctypes.c_ubyte * pages)()
        addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        if _libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(len(mm)), vec) != 0:
            raise OSError(ctypes.get_errno(), f"mincore of {path}")
        return all(v & 1 for v in vec)
    finally:
        del addr
        mm.close()


_libc = ctypes.CDLL(None, use_errno=True)


def plex_bytes(vol_or_paths: Any) -> list[bytes]:
    paths = ([p.record.path for p in vol_or_paths.plexes] if isinstance(vol_or_paths, Volume)
             else vol_or_paths)
    return [Path(p).read_bytes() for p in paths]


async def random_writes(vol: Volume, ref: bytearray, n: int, *, seed: int = 1,
                        max_len: int = 256 * KiB) -> None:
    rnd = random.Random(seed)
    for _ in range(n):
        length = rnd.randint(1, max_len)
        off = rnd.randrange(0, vol.size - length)
        data = os.urandom(length)
        await vol.pwrite(off, data)
        ref[off:off + length] = data
        await trio.sleep(0)  # a page-cache write need not yield: let resyncs etc. interleave
