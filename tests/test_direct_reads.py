"""Mirror plexes read page-aligned ranges with O_DIRECT through io_uring
(Plex.direct_reads): real image files on ext4 (the test's tmp dir), a ramfs
that refuses O_DIRECT, real dirty page-cache pages."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from vmd.config import KiB, MiB
from vmd import plex as plex_mod
from vmd.plex import Plex, PlexIOError
from vmd.sidecar import ACTIVE, PlexRecord

from enginekit import running_volume, volume_config
from raid5kit import raid5_config
from test_uring import ring_or_skip

SIZE = 4 * MiB
O_DIRECT_FLAG = 0o40000  # as /proc/self/fdinfo shows it (octal), x86-64


def direct_plex(path: Path) -> Plex:
    p = Plex(PlexRecord(name="p0", path=str(path), state=ACTIVE, missing=None), SIZE)
    p.direct_reads = True
    p.open(create=True)
    return p


def reads_direct(p: Plex) -> bool:
    """Is the plex's O_DIRECT file open (it read direct at least once)?"""
    if p._direct_fd < 0:
        return False
    with open(f"/proc/self/fdinfo/{p._direct_fd}") as f:
        flags = int(next(line for line in f if line.startswith("flags:")).split()[1], 8)
    return bool(flags & O_DIRECT_FLAG)


@pytest.mark.parametrize("check_cache", [True, False])
async def test_a_read_returns_data_still_dirty_in_the_page_cache(tmp_path, monkeypatch,
                                                                check_cache):
    """A range with cached pages is read through the page cache; read direct
    anyway (check_cache False: a write racing the check), the kernel writes
    the range's dirty pages back first: the new bytes, never the disk's old ones."""
    await ring_or_skip()
    if not check_cache:
        monkeypatch.setattr(plex_mod, "cached_pages", lambda fd, off, size: 0)
    p = direct_plex(tmp_path / "p0.img")
    try:
        old, new = b"o" * (64 * KiB), b"n" * (64 * KiB)
        os.pwrite(p.fd, old, 1 * MiB)
        os.fsync(p.fd)
        os.posix_fadvise(p.fd, 0, 0, os.POSIX_FADV_DONTNEED)  # the disk alone has `old`
        assert await p.pread(1 * MiB, 64 * KiB) == old
        assert reads_direct(p)
        p.pwrite_inline(1 * MiB + 4 * KiB, new[:8 * KiB])  # buffered: dirty in the cache
        got = await p.pread(1 * MiB, 64 * KiB)
        assert got == old[:4 * KiB] + new[:8 * KiB] + old[12 * KiB:]
        # A read that is not page-aligned reads through the page cache.
        assert await p.pread(1 * MiB + 4 * KiB + 10, 100) == new[:100]
        assert reads_direct(p)
    finally:
        p.close()


async def test_holes_read_as_zeros_and_a_cut_image_is_eio(tmp_path):
    await ring_or_skip()
    p = direct_plex(tmp_path / "p0.img")
    try:
        assert await p.pread(0, 1 * MiB) == bytes(1 * MiB)  # all a hole
        assert reads_direct(p)
        # Cut short (not even at a sector boundary): the direct read comes
        # back short, the buffered one names the end of the image.
        os.truncate(p.path, 2 * MiB + 100)
        with pytest.raises(PlexIOError) as ei:
            await p.pread(2 * MiB, 64 * KiB)
        assert ei.value.errno == errno.EIO
        assert "the image ends at offset" in str(ei.value) and str(p.path) in str(ei.value)
        assert reads_direct(p)  # still direct for the rest
    finally:
        p.close()


async def test_a_filesystem_without_o_direct_reads_through_the_page_cache(tmp_path, sysres):
    await ring_or_skip()
    mnt = sysres.mount("ramfs", tmp_path / "ramfs", "-t", "ramfs")  # refuses O_DIRECT
    p = direct_plex(Path(mnt) / "p0.img")
    try:
        os.pwrite(p.fd, b"r" * (8 * KiB), 64 * KiB)
        assert await p.pread(64 * KiB, 8 * KiB) == b"r" * (8 * KiB)
        assert p._direct_fd == -2 and not reads_direct(p)  # tried once, then never again
        assert await p.pread(0, 4 * KiB) == bytes(4 * KiB)
    finally:
        p.close()


@pytest.mark.parametrize("direct_io", [False, True])
async def test_mirror_plexes_read_direct_without_direct_io_raid5_columns_never(
        tmp_path, direct_io):
    """Only where the volume file's page cache keeps what users read."""
    await ring_or_skip()
    vc = volume_config(tmp_path, size=8 * MiB, direct_io=direct_io)
    async with running_volume(vc) as vol:
        await vol.pwrite(0, b"m" * (1 * MiB))
        for off in range(0, 1 * MiB, 64 * KiB):  # the round robin reaches both plexes
            assert await vol.pread(off, 64 * KiB) == b"m" * (64 * KiB)
        assert [reads_direct(p) for p in vol.plexes] == [not direct_io] * 2
    r5 = raid5_config(tmp_path)
    async with running_volume(r5) as vol:
        await vol.pwrite(0, b"c" * (1 * MiB))
        assert await vol.pread(0, 1 * MiB) == b"c" * (1 * MiB)
        assert not any(p.direct_reads or reads_direct(p) for p in vol.plexes)
