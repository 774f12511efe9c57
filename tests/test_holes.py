"""Holes stay holes (issue 17): a full resync copies only what the source plex
has allocated (SEEK_DATA / SEEK_HOLE) and punches the source's holes into a
target that may hold old data; where the filesystem cannot report holes
(ramfs), it copies everything as before; where it cannot punch, it writes
zeros. All on real files: ext4 under the test directory, tmpfs and ramfs
mounts, and a real daemon killed with SIGKILL in the middle of the copy.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import KiB, MiB, SysResources, VmdDaemon, volume_spec, wait_for
from enginekit import running_volume, volume_config
from fastresynckit import Ref, assert_plexes_identical, data_extents, plex_st
from vmd.sidecar import ACTIVE, SNAPDONE

UNCLEAN = r"was not stopped cleanly"


def allocated(path: Path) -> int:
    """Disk space, metadata (extent tree blocks) included."""
    return os.stat(path).st_blocks * 512


def data_bytes(path: Path) -> int:
    """Bytes in data extents: what a hole-skipping copy reads."""
    return sum(end - start for start, end in data_extents(path))


def write_scattered(path: Path, size: int, rng: random.Random, count: int) -> Ref:
    """`count` random writes (1 byte to 256 KiB, at any offset, not aligned)
    into a sparse image of `size` bytes; what the volume should hold."""
    ref = Ref(size)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, size)
        for _ in range(count):
            n = rng.randint(1, 256 * KiB)
            off = rng.randrange(0, size - n)
            data = rng.randbytes(n)
            os.pwrite(fd, data, off)
            ref.write(off, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return ref


def garbage(path: Path, size: int) -> None:
    """A plex image full of old data: every byte allocated, none zero."""
    with open(path, "wb") as f:
        for _ in range(0, size, 4 * MiB):
            f.write(os.urandom(min(4 * MiB, size)))
        f.truncate(size)


def assert_sparse_copy(src: Path, dst: Path, ref: Ref) -> None:
    """Same bytes, and the copy takes as much disk as the source (±5 %)."""
    assert_plexes_identical([src, dst], ref)
    a, b = allocated(src), allocated(dst)
    assert abs(b - a) <= a * 0.05, f"{dst} has {b} bytes allocated, its source {src} {a}"


def tmpfs(sysres: SysResources, where: Path, size: str = "96m") -> Path:
    return Path(sysres.mount("tmpfs", where, "-t", "tmpfs", "-o", f"size={size}"))


# -- engine tests (a volume in the test's trio loop, real image files) ------------

async def resync_onto(vc: Any, target: Path) -> dict[str, Any]:
    """Start vc's volume (its log rebuilt from plex p0), add `target` as a plex,
    wait for the copy; the resync status of that copy."""
    async with running_volume(vc, recover_all=True, recover_from="p0") as vol:
        await vol.add_plex(str(target))
        await vol.resync.wait_idle()
        return vol.resync.status()


async def test_new_plex_gets_only_the_allocated_ranges(tmp_path: Path) -> None:
    size = 256 * MiB
    vc = volume_config(tmp_path, size=size, nplex=1)
    ref = write_scattered(vc.plexes[0], size, random.Random(1701), 40)
    async with running_volume(vc, recover_all=True, recover_from="p0") as vol:
        new = tmp_path / "new.img"
        await vol.add_plex(str(new))
        await vol.resync.wait_idle()
        assert [p.state for p in vol.plexes] == [ACTIVE, ACTIVE]
        rs = vol.resync.status()
        assert rs["synced_bytes"] == size, rs
        # Only the allocated blocks were read and written.
        assert rs["copied_bytes"] == data_bytes(vc.plexes[0]), rs
        assert rs["copied_bytes"] < size // 10, rs
    assert_sparse_copy(vc.plexes[0], new, ref)


async def test_snapshot_mirror_first_sync_skips_holes(tmp_path: Path) -> None:
    from vmd.snapshot import snap_start  # noqa: PLC0415

    size = 64 * MiB
    vc = volume_config(tmp_path, size=size, nplex=1)
    ref = write_scattered(vc.plexes[0], size, random.Random(1702), 20)
    async with running_volume(vc, recover_all=True, recover_from="p0") as vol:
        await snap_start(vol, str(tmp_path / "snap.img"))
        await vol.resync.wait_idle()
        assert vol.plexes[1].state == SNAPDONE
        assert vol.resync.copied_bytes == data_bytes(vc.plexes[0])
    assert_sparse_copy(vc.plexes[0], tmp_path / "snap.img", ref)


async def test_recover_all_punches_the_sources_holes_into_old_data(tmp_path: Path) -> None:
    size = 64 * MiB
    vc = volume_config(tmp_path, size=size, nplex=2)
    ref = write_scattered(vc.plexes[0], size, random.Random(1703), 20)
    garbage(vc.plexes[1], size)
    async with running_volume(vc, recover_all=True, recover_from="p0") as vol:
        await vol.resync.wait_idle()
        assert vol.resync.copied_bytes == data_bytes(vc.plexes[0])
    # Every hole of p0 reads as zeros on p1 (no garbage left), and is a hole.
    assert_sparse_copy(vc.plexes[0], vc.plexes[1], ref)


async def test_changed_image_at_reattach_gets_holes_punched(tmp_path: Path) -> None:
    size = 32 * MiB
    vc = volume_config(tmp_path, size=size, nplex=2)
    rng = random.Random(1704)
    async with running_volume(vc) as vol:
        ref = Ref(size)
        for _ in range(12):
            n = rng.randint(1, 128 * KiB)
            off = rng.randrange(0, size - n)
            data = rng.randbytes(n)
            await vol.pwrite(off, data)
            ref.write(off, data)
        await vol.detach_plex("p1")
        garbage(vc.plexes[1], size)  # another image in its place: full resync
        reply = await vol.attach_plex("p1")
        assert reply["full_resync"]
        await vol.resync.wait_idle()
        assert vol.plexes[1].state == ACTIVE
    assert_sparse_copy(vc.plexes[0], vc.plexes[1], ref)


@pytest.mark.mount
async def test_tmpfs_source_skips_holes(tmp_path: Path, sysres: SysResources) -> None:
    fs = tmpfs(sysres, tmp_path / "tmpfs")
    size = 32 * MiB
    vc = volume_config(fs, size=size, nplex=1)
    ref = write_scattered(vc.plexes[0], size, random.Random(1705), 10)
    garbage(fs / "old.img", size)
    copied = (await resync_onto(vc, fs / "old.img"))["copied_bytes"]  # existing: punched
    assert copied == data_bytes(vc.plexes[0]) < size // 4
    assert_sparse_copy(vc.plexes[0], fs / "old.img", ref)


@pytest.mark.mount
async def test_no_seek_hole_filesystem_copies_everything(
        tmp_path: Path, sysres: SysResources) -> None:
    """ramfs reports every byte as data (no SEEK_HOLE) and cannot punch."""
    ram = Path(sysres.mount("ramfs", tmp_path / "ramfs", "-t", "ramfs"))
    size = 16 * MiB
    # Source on ramfs: all of it is copied.
    vc = volume_config(ram, size=size, nplex=1)
    ref = write_scattered(vc.plexes[0], size, random.Random(1706), 8)
    assert (await resync_onto(vc, tmp_path / "copy.img"))["copied_bytes"] == size
    assert_plexes_identical([vc.plexes[0], tmp_path / "copy.img"], ref)

    # Source with holes, target on ramfs holding old data: zeros are written
    # where the holes cannot be punched.
    vc2 = volume_config(tmp_path, name="vol1", size=size, nplex=1)
    ref2 = write_scattered(vc2.plexes[0], size, random.Random(1707), 8)
    garbage(ram / "old.img", size)
    copied = (await resync_onto(vc2, ram / "old.img"))["copied_bytes"]
    assert copied == data_bytes(vc2.plexes[0])
    assert_plexes_identical([vc2.plexes[0], ram / "old.img"], ref2)


async def test_dense_switch_copies_everything(tmp_path: Path, monkeypatch) -> None:
    """VMD_RESYNC_DENSE=1: the copy of every byte (benchmarks compare it)."""
    monkeypatch.setenv("VMD_RESYNC_DENSE", "1")
    size = 16 * MiB
    vc = volume_config(tmp_path, size=size, nplex=1)
    ref = write_scattered(vc.plexes[0], size, random.Random(1708), 4)
    st = await resync_onto(vc, tmp_path / "new.img")
    assert st["copied_bytes"] == size
    assert st["total_bytes"] == size
    assert_plexes_identical([vc.plexes[0], tmp_path / "new.img"], ref)
    assert allocated(tmp_path / "new.img") >= size


# -- through a real daemon ---------------------------------------------------------

@pytest.mark.mount
def test_sigkill_mid_sparse_resync_resumes_and_ends_identical(
        vmd_factory: Callable[..., VmdDaemon], allow_log: Callable[..., None]) -> None:
    allow_log(UNCLEAN, r"plex p1 gets a full resync: .*changed while it was away")
    size = 256 * MiB
    # ~16 MiB allocated at 2 MiB/s: the kill lands well inside the copy.
    vmd = vmd_factory(volumes={"vol0": volume_spec("vol0", size=size)}, clean_delay=0.3,
                      rate_limit="2MiB").start()
    rng = random.Random(1709)
    ref = Ref(size)
    fd = os.open(vmd.volume_file(), os.O_RDWR)
    try:
        for _ in range(64):
            off = rng.randrange(0, size - 256 * KiB)
            data = rng.randbytes(256 * KiB)
            os.pwrite(fd, data, off)
            ref.write(off, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    # p1 holds all of it; turn it into garbage-holding old plex: detach, fill
    # its holes with garbage (a changed image: full resync with punching).
    vmd.cli("plex", "detach", "vol0", "p1")
    p0, p1 = vmd.plex_paths()
    garbage(p1, size)
    vmd.cli("plex", "attach", "vol0", "p1")
    alloc = allocated(p0)

    def copying() -> dict[str, Any] | None:
        r = vmd.status("vol0")["resync"]
        return r if r["running"] and r["done_bytes"] > 0 else None

    rs = wait_for(copying, 30, "the resync to start copying")
    assert rs["total_bytes"] <= alloc * 1.05 < size // 8, (rs, alloc)
    # Past the first durable progress record (every 2 s).
    wait_for(lambda: vmd.logged_state().plex("p1").missing.bytes_covered() < size, 30,
             "a durable progress record")
    rs = vmd.status("vol0")["resync"]
    assert rs["running"] and 0 < rs["done_bytes"] < rs["total_bytes"], rs
    vmd.kill()
    print(f"SIGKILL after {rs['done_bytes']} of {rs['total_bytes']} allocated bytes "
          f"(volume {size})")

    vmd.set_rate_limit(None)
    vmd.start()
    st = vmd.wait_resync("vol0")
    assert plex_st(st, "p1")["state"] == "ACTIVE", st
    assert 0 < st["resync"]["synced_bytes"] < size, \
        f"the resync started over after the kill: {st['resync']}"
    vmd.stop()
    assert_plexes_identical([p0, p1], ref)
    assert abs(allocated(p1) - allocated(p0)) <= allocated(p0) * 0.05, \
        (allocated(p0), allocated(p1), data_extents(p1)[:5])
