"""FastResync through a real daemon and a real mount (issue 4): detach and attach.

A detached (or IOFAIL) plex's `missing` map records every 64 KiB region
written while it is away; `vmd plex attach` copies only those regions —
also with writes racing the copy — unless the image changed while it was
away or FastResync is off, in which case the whole plex is copied and the
log says why. Restarts and crashes: test_fastresync_crash.py.

Volumes are 1 GiB of sparse image files: comparisons walk only the data
extents of the plexes (SEEK_DATA/SEEK_HOLE), so the size costs nothing.
"""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import MiB, KiB, SysResources, VmdDaemon, wait_for
from fastresynckit import (BIG, NREG, ONE_PCT, R, Ref, assert_plexes_identical, attach_and_wait,
                           big_daemon, plex_st, seed_both, write_regions)

pytestmark = pytest.mark.mount


# -- the tests ------------------------------------------------------------------------

def test_reattach_copies_only_the_regions_written_while_detached(
        vmd_factory: Callable[..., VmdDaemon]) -> None:
    vmd = big_daemon(vmd_factory).start()
    rng = random.Random(4001)
    ref = Ref(BIG)
    seed_both(vmd, ref, rng)

    vmd.cli("plex", "detach", "vol0", "p1")
    st = vmd.status("vol0")
    assert st["fastresync"] is True
    p1 = plex_st(st, "p1")
    assert p1["state"] == "DETACHED" and p1["map"] and p1["missing_bytes"] == 0, p1

    missed = sorted(rng.sample(range(NREG), ONE_PCT))
    write_regions(vmd.volume_file(), missed, ref, rng)
    assert plex_st(vmd.status("vol0"), "p1")["missing_bytes"] == len(missed) * R

    st = attach_and_wait(vmd)
    copied = st["resync"]["copied_bytes"]
    print(f"1 % of 1 GiB: copied {copied} bytes of {BIG} ({100 * copied / BIG:.2f} %)")
    assert copied == len(missed) * R, (copied, len(missed) * R)
    vmd.stop()
    assert_plexes_identical(vmd.plex_paths(), ref)


def test_reattach_with_nothing_missed_is_in_sync_at_once(
        vmd_factory: Callable[..., VmdDaemon]) -> None:
    """An empty FastResync map (issue 16, item 3): reattached at once, or after a clean
    restart, the plex is ACTIVE without a copy and `vmd wait` returns."""
    size = 64 * MiB
    vmd = big_daemon(vmd_factory, size=size).start()
    rng = random.Random(4011)
    ref = Ref(size)
    seed_both(vmd, ref, rng, count=16)
    for restart in (False, True):
        vmd.cli("plex", "detach", "vol0", "p1")
        assert plex_st(vmd.status("vol0"), "p1")["missing_bytes"] == 0
        if restart:
            vmd.restart()
        st = attach_and_wait(vmd)
        assert st["resync"]["copied_bytes"] == 0, st["resync"]
    vmd.stop()
    assert_plexes_identical(vmd.plex_paths(), ref)


@pytest.mark.allow_log(r"plex p1 gets a full resync: .*changed while it was away")
def test_replaced_image_gets_full_resync_and_log_says_why(
        vmd_factory: Callable[..., VmdDaemon]) -> None:
    size = 64 * MiB
    vmd = big_daemon(vmd_factory, size=size).start()
    rng = random.Random(4006)
    ref = Ref(size)
    seed_both(vmd, ref, rng, count=32)
    vmd.cli("plex", "detach", "vol0", "p1")
    write_regions(vmd.volume_file(), rng.sample(range(size // R), 8), ref, rng)
    assert plex_st(vmd.status("vol0"), "p1")["missing_bytes"] == 8 * R

    # Someone puts another image of the same size in its place.
    p1_path = vmd.plex_paths()[1]
    other = p1_path.with_name("other.img")
    with open(other, "wb") as f:
        f.truncate(size)
        for r in rng.sample(range(size // R), 40):
            f.seek(r * R)
            f.write(rng.randbytes(R))
    os.replace(other, p1_path)

    out = vmd.cli("plex", "attach", "vol0", "p1")
    st = vmd.wait_resync("vol0")
    assert st["resync"]["synced_bytes"] == size, st["resync"]
    log_lines = [ln for ln in vmd.stderr().splitlines() if "full resync" in ln]
    assert any("changed while it was away" in ln for ln in log_lines), \
        f"daemon log does not say why p1 got a full resync:\n{vmd.stderr()}\n{out.stdout}"
    # ... and so does the answer to the admin who asked for the attach.
    assert "full resync: " in out.stdout and "changed while it was away" in out.stdout, out.stdout
    vmd.stop()
    assert_plexes_identical(vmd.plex_paths(), ref)


def test_random_writes_during_fastresync_copy(vmd_factory: Callable[..., VmdDaemon]) -> None:
    # ~10 MiB to copy at 1 MiB/s: about 10 s of copy for the writes to race.
    vmd = big_daemon(vmd_factory, rate_limit="1MiB").start()
    rng = random.Random(4007)
    ref = Ref(BIG)
    seed_both(vmd, ref, rng)
    vmd.cli("plex", "detach", "vol0", "p1")
    # Runs of 1..4 regions, so that copy chunks span several regions.
    missed: set[int] = set()
    while len(missed) < ONE_PCT:
        r = rng.randrange(NREG - 4)
        missed.update(range(r, r + rng.randint(1, 4)))
    write_regions(vmd.volume_file(), sorted(missed), ref, rng)
    hot = sorted(missed)

    vmd.cli("plex", "attach", "vol0", "p1")
    fd = os.open(vmd.volume_file(), os.O_RDWR)
    writes = during = 0
    try:
        while True:
            for _ in range(20):
                if rng.random() < 0.7:  # mostly onto and across regions being copied
                    off = rng.choice(hot) * R + rng.randrange(-R // 2, R)
                else:
                    off = rng.randrange(BIG - 300 * KiB)
                off = max(0, off)
                data = rng.randbytes(rng.choice((512, 4 * KiB, 33 * KiB, 100 * KiB, 200 * KiB)))
                assert os.pwrite(fd, data, off) == len(data)
                ref.write(off, data)
                writes += 1
            # Straight to the socket: a CLI's start-up per check would eat the
            # copy's time on a busy machine.
            rs = vmd.request({"cmd": "status", "volume": "vol0"})["volumes"][0]["resync"]
            if not rs["running"]:
                break
            during += 20
        os.fsync(fd)
    finally:
        os.close(fd)
    print(f"{writes} random writes, {during} while the copy ran")
    assert during >= 100, f"only {during} writes landed while the copy ran: too fast to race"
    st = vmd.wait_resync("vol0")
    assert {p["name"]: p["state"] for p in st["plexes"]} == {"p0": "ACTIVE", "p1": "ACTIVE"}
    assert len(missed) * R <= st["resync"]["copied_bytes"] < BIG // 10, st["resync"]
    with open(vmd.volume_file(), "rb") as f:  # read back through the mount too
        for r in rng.sample(hot, 20):
            f.seek(r * R)
            want, _ = ref.expected(r * R, R)
            assert f.read(R) == want, f"region {r} reads back wrong through the mount"
    vmd.stop()
    assert_plexes_identical(vmd.plex_paths(), ref)


@pytest.mark.allow_log(r"plex p1 .* is now IOFAIL", r"No space left on device")
def test_iofail_plex_comes_back_with_partial_copy_after_space_is_freed(
        vmd_factory: Callable[..., VmdDaemon], sysres: SysResources, tmp_path: Path) -> None:
    size = 64 * MiB
    small = tmp_path / "small"
    sysres.make_ext4_image(tmp_path / "small.img", 64 * MiB, small)
    p1_path = small / "vol0-p1.img"
    # Small DRL regions: at the failure, every region not yet cleaned joins
    # p1's map (its unsynced writes may be lost with the disk), so the map
    # stays partial only if those regions are small.
    vmd = vmd_factory(volumes={"vol0": {"size": size, "plexes": ["vol0-p0.img", str(p1_path)],
                                        "log": "vol0.log", "region_size": "256KiB"}},
                      clean_delay=0.3).start()
    rng = random.Random(4008)
    ref = Ref(size)
    seed_both(vmd, ref, rng, count=16)  # 1 MiB on both plexes
    # The seed's regions cleaned: synced on both plexes.
    wait_for(lambda: vmd.status("vol0")["dirty_regions"] == 0, 30, "the DRL to be cleaned")

    # Ballast leaves p1's filesystem about 1 MiB of room.
    ballast = small / "ballast"
    sv = os.statvfs(small)
    free = sv.f_bavail * sv.f_frsize
    fd = os.open(ballast, os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        os.posix_fallocate(fd, 0, free - 1 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)

    # 12 MiB more than fits: p1 fails, the volume keeps serving from p0.
    used = set(ref.regions)
    more = rng.sample([r for r in range(size // R) if r not in used], 192)
    write_regions(vmd.volume_file(), more, ref, rng)
    st = vmd.status("vol0")
    p1 = plex_st(st, "p1")
    assert p1["state"] == "IOFAIL", p1
    assert "No space left" in p1["reason"] or str(errno.ENOSPC) in p1["reason"], p1
    assert p1["map"] and 0 < p1["missing_bytes"] < size // 2, p1
    # Writes while IOFAIL are tracked too.
    later = rng.sample([r for r in range(size // R) if r not in used and r not in more], 16)
    write_regions(vmd.volume_file(), later, ref, rng)
    p1 = plex_st(vmd.status("vol0"), "p1")
    assert p1["state"] == "IOFAIL"
    assert p1["missing_bytes"] >= len(later) * R + R, p1

    os.unlink(ballast)
    os.sync()
    st = attach_and_wait(vmd)
    copied = st["resync"]["synced_bytes"]
    print(f"IOFAIL reattach: map {p1['missing_bytes']}, copied {copied} of {size}")
    assert copied == p1["missing_bytes"], (copied, p1)
    assert copied < size // 2  # a partial copy
    vmd.stop()
    assert_plexes_identical(vmd.plex_paths(), ref)


@pytest.mark.allow_log(r"plex p1 gets a full resync: .*(FastResync|map)")
def test_fastresync_off_while_detached_makes_next_attach_full(
        vmd_factory: Callable[..., VmdDaemon]) -> None:
    size = 64 * MiB
    vmd = big_daemon(vmd_factory, size=size).start()
    rng = random.Random(4009)
    ref = Ref(size)
    seed_both(vmd, ref, rng, count=16)
    vmd.cli("plex", "detach", "vol0", "p1")
    write_regions(vmd.volume_file(), rng.sample(range(size // R), 10), ref, rng)
    st = vmd.status("vol0")
    assert st["fastresync"] is True
    p1 = plex_st(st, "p1")
    assert p1["map"] and p1["missing_bytes"] == 10 * R, p1
    assert "fastresync on" in vmd.cli("status", "vol0").stdout

    vmd.cli("fastresync", "vol0", "off")
    st = vmd.status("vol0")
    assert st["fastresync"] is False
    p1 = plex_st(st, "p1")
    assert not p1["map"] and p1["missing_bytes"] == size, p1  # no map: all of it
    assert "fastresync off" in vmd.cli("status", "vol0").stdout
    # Off survives a restart (the config still says on, but was not changed).
    write_regions(vmd.volume_file(), rng.sample(range(size // R), 4), ref, rng)
    vmd.restart()
    st = vmd.status("vol0")
    assert st["fastresync"] is False and not plex_st(st, "p1")["map"], st

    st = attach_and_wait(vmd)
    assert st["resync"]["synced_bytes"] == size, st["resync"]
    assert "gets a full resync" in vmd.stderr()
    assert_plexes_identical(vmd.plex_paths(), ref)

    # On again: tracking starts now, the next reattach is partial.
    vmd.cli("fastresync", "vol0", "on")
    assert vmd.status("vol0")["fastresync"] is True
    vmd.cli("plex", "detach", "vol0", "p1")
    write_regions(vmd.volume_file(), rng.sample(range(size // R), 3), ref, rng)
    assert plex_st(vmd.status("vol0"), "p1")["missing_bytes"] == 3 * R
    st = attach_and_wait(vmd)
    assert st["resync"]["copied_bytes"] == 3 * R, st["resync"]
    vmd.stop()
    assert_plexes_identical(vmd.plex_paths(), ref)
