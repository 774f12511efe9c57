"""Third-mirror break-off snapshots (issue 5) with real daemons, real loop
devices and real ext4: snap start/wait/take under fsfreeze, FastResync snap
back (both directions), crashes during snap start and snap back, clean
restarts, refresh/clear, and the error cases."""

from __future__ import annotations

import hashlib
import mmap
import os
import random
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import (MiB, KiB, SysResources, VmdDaemon, pwrite_file, run, sha, volume_spec,
                      wait_for)

pytestmark = pytest.mark.mount

FMR = 64 * KiB  # default fastresync_region: the unit SNAPLINK maps track


# -- helpers ---------------------------------------------------------------------

def read_direct(path: str | os.PathLike[str]) -> bytes:
    """The whole file read with O_DIRECT: what vmd returns now, not what the
    kernel's page cache remembers."""
    size = os.stat(path).st_size
    out = bytearray()
    buf = mmap.mmap(-1, 4 * MiB)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        off = 0
        while off < size:
            n = os.preadv(fd, [buf], off)
            assert n > 0, f"short read of {path} at {off}"
            out += buf[:n]
            off += n
    finally:
        os.close(fd)
        buf.close()
    return bytes(out)


def read_buffered(path: str | os.PathLike[str]) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def h(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def region_writes(regions: list[int], rng: random.Random) -> list[tuple[int, bytes]]:
    """One 4 KiB write of random bytes somewhere inside each 64 KiB region."""
    return [(r * FMR + rng.randrange(0, FMR // 4096) * 4096, rng.randbytes(4096))
            for r in regions]


def write_tree(root: Path, prefix: str, rng: random.Random, n: int,
               sizes: tuple[int, ...] = (0, 1, 4095, 10_000, 100_000, 1 << 20)) -> dict[str, str]:
    sums = {}
    for i in range(n):
        d = root / f"{prefix}{i % 3}"
        d.mkdir(exist_ok=True)
        data = rng.randbytes(rng.choice(sizes))
        p = d / f"{prefix}-file{i}.bin"
        p.write_bytes(data)
        sums[str(p.relative_to(root))] = h(data)
    return sums


def tree(root: Path) -> dict[str, str]:
    """{relpath: sha256} of every regular file (lost+found aside)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "lost+found"]
        for f in filenames:
            p = Path(dirpath) / f
            out[str(p.relative_to(root))] = h(p.read_bytes())
    return out


def fsck_clean(dev: str) -> None:
    p = run(["fsck.ext4", "-fn", dev], check=False)
    assert p.returncode == 0, f"fsck.ext4 -fn {dev} exited {p.returncode}:\n{p.stdout}\n{p.stderr}"


def plex_states(vmd: VmdDaemon, volume: str = "vol0") -> dict[str, str]:
    return {p["name"]: p["state"] for p in vmd.status(volume)["plexes"]}


def plex_by_role(st: dict[str, Any], *roles: str) -> dict[str, Any]:
    ps = [p for p in st["plexes"] if p["role"] in roles]
    assert len(ps) == 1, st["plexes"]
    return ps[0]


def snapshot_cycle(vmd: VmdDaemon, name: str = "nightly") -> float:
    """snap start + wait + take; returns the writes-held time vmd reports (s)."""
    vmd.cli("snap", "start", "vol0")
    vmd.cli("snap", "wait", "vol0", timeout=120)
    assert "SNAPDONE" in plex_states(vmd).values()
    out = vmd.cli("snap", "take", "vol0", name).stdout
    m = re.search(r"writes held (\d+) ms", out)
    assert m, out
    return int(m.group(1)) / 1000


def set_rate(vmd: VmdDaemon, rate: str | None) -> None:
    vmd.set_rate_limit(rate)


# -- break-off under fsfreeze: the snapshot is the frozen filesystem --------------

def test_take_frozen_ext4_snapshot_shows_snapshot_moment(
        vmd_factory: Callable[..., VmdDaemon], sysres: SysResources, tmp_path: Path) -> None:
    vmd = vmd_factory().start()
    dev = vmd.losetup()
    run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", dev])
    fs = Path(sysres.mount(dev, tmp_path / "fs"))
    rng = random.Random(5)
    before = write_tree(fs, "a", rng, 24)
    run(["sync"])

    vmd.cli("snap", "start", "vol0")
    vmd.cli("snap", "wait", "vol0", timeout=120)
    states = plex_states(vmd)
    assert sorted(states.values()) == ["ACTIVE", "ACTIVE", "SNAPDONE"], states

    run(["fsfreeze", "-f", str(fs)])
    try:
        t0 = time.monotonic()
        out = vmd.cli("snap", "take", "vol0", "nightly").stdout
        took = time.monotonic() - t0
    finally:
        run(["fsfreeze", "-u", str(fs)])
    held = int(re.search(r"writes held (\d+) ms", out).group(1)) / 1000  # type: ignore[union-attr]
    print(f"snap take: writes held {held * 1000:.1f} ms, CLI round trip {took * 1000:.0f} ms")
    assert held < 1.0, out

    # After the break-off vol0 goes on: new files, one changed, one deleted.
    after = write_tree(fs, "b", rng, 10)
    changed = sorted(before)[3]
    (fs / changed).write_bytes(b"changed after the snapshot")
    gone = sorted(before)[5]
    (fs / gone).unlink()
    run(["sync"])

    st = vmd.status("vol0")
    assert sorted(p["state"] for p in st["plexes"]) == ["ACTIVE", "ACTIVE"], st["plexes"]
    (rel,) = st["snapshots"]
    assert rel["name"] == "nightly" and rel["changed_bytes"] > 0, rel
    snap = vmd.status("nightly")
    assert snap["snapshot"]["of"] == "vol0" and snap["snapshot"]["changed_bytes"] == 0, snap
    assert [p["state"] for p in snap["plexes"]] == ["ACTIVE"]
    assert (vmd.mountpoint / "nightly").stat().st_size == vmd.volume_size()

    sdev = sysres.losetup(vmd.volume_file("nightly"), "-r")
    fsck_clean(sdev)
    smnt = Path(sysres.mount(sdev, tmp_path / "snap", "-o", "ro,noload"))
    assert tree(smnt) == before, "the snapshot does not show exactly the files of its moment"
    sysres.umount(smnt)
    sysres.detach_loop(sdev)

    sysres.umount(fs)
    fsck_clean(dev)
    now = tree(Path(sysres.mount(dev, tmp_path / "fs", "-o", "ro")))
    want = {**before, **after, changed: h(b"changed after the snapshot")}
    del want[gone]
    assert now == want
    sysres.umount(tmp_path / "fs")
    sysres.detach_loop(dev)
    vmd.stop()


# -- FastResync snap back: only the union of the regions changed on both sides -----

def test_snap_back_copies_union_of_changed_regions(vmd_factory: Callable[..., VmdDaemon]) -> None:
    vmd = vmd_factory().start()
    size = vmd.volume_size()
    nreg = size // FMR
    rng = random.Random(1)
    base = rng.randbytes(8 * MiB)
    pwrite_file(vmd.volume_file(), [(0, base), (size - 8 * MiB, base)])
    snapshot_cycle(vmd)

    # 1 % of the 64 KiB regions: 6 on vol0, 5 on the snapshot, one of them on both.
    picks = rng.sample(range(nreg), 10)
    o_regions, s_regions = picks[:6], picks[5:]
    union = set(o_regions) | set(s_regions)
    assert len(union) == 10 == round(nreg * 0.01)
    pwrite_file(vmd.volume_file(), region_writes(o_regions, rng))
    pwrite_file(vmd.volume_file("nightly"), region_writes(s_regions, rng))
    # A second write to a changed region counts once.
    r = o_regions[0]
    pwrite_file(vmd.volume_file(), [(r * FMR + 8192, rng.randbytes(512))])

    assert vmd.status("vol0")["snapshots"][0]["changed_bytes"] == len(o_regions) * FMR
    assert vmd.status("nightly")["snapshot"]["changed_bytes"] == len(s_regions) * FMR

    out = vmd.cli("snap", "back", "nightly").stdout
    assert "nightly" in out and "(full)" not in out, out
    st = vmd.wait_resync("vol0")
    copied = st["resync"]["synced_bytes"]
    print(f"snap back: copied {copied} bytes; changed regions: {len(o_regions)} on vol0, "
          f"{len(s_regions)} on the snapshot, union {len(union)} x 64 KiB = {len(union) * FMR}")
    assert copied == len(union) * FMR, (copied, len(union) * FMR)

    assert "nightly" not in [v["name"] for v in vmd.status()["volumes"]]
    assert not (vmd.mountpoint / "nightly").exists()
    assert "snapshots" not in st
    sp = plex_by_role(st, "snapshot")
    assert sp["state"] == "SNAPDONE" and sp["missing_bytes"] == 0, sp
    vol = read_direct(vmd.volume_file())
    for p in st["plexes"]:
        assert sha(p["path"]) == h(vol), f"plex {p['name']} differs from the volume"

    # The mirror is ready for the next break-off at once.
    out = vmd.cli("snap", "take", "vol0", "nightly").stdout
    assert "taken" in out
    assert h(read_direct(vmd.volume_file("nightly"))) == h(vol)
    assert vmd.status("vol0")["snapshots"][0]["changed_bytes"] == 0
    vmd.stop()


def test_snap_back_with_nothing_to_copy_completes(vmd_factory: Callable[..., VmdDaemon]) -> None:
    """An empty merge finishes like any other (issue 16, item 3): snap back, refresh and
    --from-snapshot right after the take leave a SNAPDONE mirror that `snap wait`, `vmd
    wait` and the next take accept, also after a restart."""
    vmd = vmd_factory().start()
    pwrite_file(vmd.volume_file(), [(0, random.Random(29).randbytes(4 * MiB))])
    snapshot_cycle(vmd)
    out = vmd.cli("snap", "back", "nightly").stdout
    assert "0B to copy" in out, out
    # A short timeout: before the fix these waited for ever.
    vmd.cli("snap", "wait", "vol0", timeout=20)
    st = vmd.wait_resync("vol0", timeout=20)
    assert plex_by_role(st, "snapshot")["state"] == "SNAPDONE", st["plexes"]

    vmd.cli("snap", "take", "vol0", "nightly")
    assert "taken" in vmd.cli("snap", "refresh", "nightly", timeout=20).stdout
    out = vmd.cli("snap", "back", "nightly", "--from-snapshot").stdout
    assert "0B to copy" in out, out
    vmd.cli("snap", "wait", "vol0", timeout=20)

    vmd.restart()
    st = vmd.wait_resync("vol0", timeout=20)
    assert plex_by_role(st, "snapshot")["state"] == "SNAPDONE", st["plexes"]
    vmd.cli("snap", "take", "vol0", "nightly")
    vol = h(read_direct(vmd.volume_file()))
    assert h(read_direct(vmd.volume_file("nightly"))) == vol
    vmd.stop()


def test_snap_start_on_empty_volume_completes(vmd_factory: Callable[..., VmdDaemon]) -> None:
    """Nothing ever written: the mirror still synchronizes (a full copy of holes) and the
    take works."""
    vmd = vmd_factory().start()
    vmd.cli("snap", "start", "vol0")
    vmd.cli("snap", "wait", "vol0", timeout=30)
    vmd.cli("snap", "take", "vol0", "nightly")
    assert read_direct(vmd.volume_file("nightly")) == bytes(vmd.volume_size())
    vmd.stop()


# -- restore: snap back --from-snapshot ----------------------------------------------

def ext4_with_snapshot(vmd_factory: Callable[..., VmdDaemon], sysres: SysResources,
                       tmp_path: Path, seed: int, nfiles: int
                       ) -> tuple[VmdDaemon, str, Path, random.Random, dict[str, str]]:
    """ext4 on a loop device over vol0 holding `nfiles` files, and snapshot
    `nightly` taken of it frozen: (daemon, loop device, mount, rng, tree)."""
    vmd = vmd_factory().start()
    dev = vmd.losetup()
    run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", dev])
    fs = Path(sysres.mount(dev, tmp_path / "fs"))
    rng = random.Random(seed)
    before = write_tree(fs, "a", rng, nfiles)
    run(["sync"])
    vmd.cli("snap", "start", "vol0")
    vmd.cli("snap", "wait", "vol0", timeout=120)
    run(["fsfreeze", "-f", str(fs)])
    try:
        vmd.cli("snap", "take", "vol0", "nightly")
    finally:
        run(["fsfreeze", "-u", str(fs)])
    return vmd, dev, fs, rng, before


def test_snap_back_from_snapshot_restores_ext4(vmd_factory: Callable[..., VmdDaemon],
                                               sysres: SysResources, tmp_path: Path) -> None:
    vmd, dev, fs, rng, before = ext4_with_snapshot(vmd_factory, sysres, tmp_path, 3, 12)
    # Enough changes afterwards that a slow restore takes a few seconds.
    write_tree(fs, "b", rng, 14, sizes=(1 << 20,))
    (fs / sorted(before)[0]).unlink()
    sysres.umount(fs)
    sysres.detach_loop(dev)

    snap_data = read_direct(vmd.volume_file("nightly"))
    assert h(read_direct(vmd.volume_file())) != h(snap_data)

    # A clean restart with a slow resync: the snapshot survives it.
    vmd.stop()
    # Slow: the restore copies only the snapshot's allocated blocks (~200 KiB), and
    # must outlast a 64 MiB read of the volume on a busy machine.
    set_rate(vmd, "8KiB")
    vmd.start()
    assert h(read_direct(vmd.volume_file("nightly"))) == h(snap_data)
    # vol0's pages in the kernel's cache from before the restore.
    assert h(read_buffered(vmd.volume_file())) != h(snap_data)

    out = vmd.cli("snap", "back", "nightly", "--from-snapshot").stdout
    assert "nightly" in out and "(full)" not in out, out
    st = vmd.status("vol0")
    assert st["resync"]["running"] or st["resync"]["total_bytes"] == 0, st["resync"]
    total = st["resync"]["total_bytes"]
    assert 8 * MiB < st["resync"]["span_bytes"] < 32 * MiB, st["resync"]
    # Reads during the restore return the snapshot's data, regions restored or not.
    during = read_direct(vmd.volume_file())
    st = vmd.status("vol0")
    assert st["resync"]["running"], "the restore finished before the read: make it slower"
    # (Its few allocated blocks may all be copied, the throttle still holding it.)
    assert st["resync"]["done_bytes"] <= total
    assert h(during) == h(snap_data), "a read during the restore returned pre-restore data"
    buffered = read_buffered(vmd.volume_file())
    assert h(buffered) == h(snap_data), \
        "a buffered read of vol0 after snap back --from-snapshot returned stale page-cache data"

    st = vmd.wait_resync("vol0")
    # The reads above restored what they read (read-writeback): not copied again.
    assert st["resync"]["copied_bytes"] <= total, st["resync"]
    states = {p["role"]: p["state"] for p in st["plexes"]}
    assert states == {"": "ACTIVE", "snapshot": "SNAPDONE"} and len(st["plexes"]) == 3, st
    for p in st["plexes"]:
        assert sha(p["path"]) == h(snap_data), f"plex {p['name']} is not the snapshot's content"
    assert "snapshots" not in st
    assert "nightly" not in [v["name"] for v in vmd.status()["volumes"]]

    dev = vmd.losetup()
    fsck_clean(dev)
    mnt = Path(sysres.mount(dev, tmp_path / "fs", "-o", "ro"))
    assert tree(mnt) == before
    sysres.umount(mnt)
    sysres.detach_loop(dev)
    vmd.stop()


def test_restore_refused_while_volume_in_use(vmd_factory: Callable[..., VmdDaemon],
                                            sysres: SysResources, tmp_path: Path) -> None:
    """snap back --from-snapshot under a mounted filesystem would change its blocks behind
    its back (issue 16, item 4): refused while vol0 is open, naming it; done after umount;
    --force proceeds anyway."""
    vmd, dev, fs, rng, before = ext4_with_snapshot(vmd_factory, sysres, tmp_path, 31, 8)
    write_tree(fs, "b", rng, 8)
    run(["sync"])

    run(["fsfreeze", "-f", str(fs)])  # still mounted; frozen so that "nothing changed" holds
    try:
        err = _refused(vmd, "snap", "back", "nightly", "--from-snapshot", names="vol0",
                       says="--force")
    finally:
        run(["fsfreeze", "-u", str(fs)])
    assert "umount" in err, err
    assert "nightly" in [v["name"] for v in vmd.status()["volumes"]]

    sysres.umount(fs)
    sysres.detach_loop(dev)
    wait_for(lambda: vmd.status("vol0")["open"] == 0, what="the loop device to let go")
    vmd.cli("snap", "back", "nightly", "--from-snapshot")
    vmd.cli("snap", "wait", "vol0", timeout=120)
    dev = vmd.losetup()
    fsck_clean(dev)
    fs = Path(sysres.mount(dev, tmp_path / "fs"))
    assert tree(fs) == before

    # --force: the administrator's call; the restore runs under the mount.
    vmd.cli("snap", "take", "vol0", "nightly")
    write_tree(fs, "c", rng, 4)
    run(["sync"])
    out = vmd.cli("snap", "back", "nightly", "--from-snapshot", "--force").stdout
    assert "merging back" in out, out
    vmd.cli("snap", "wait", "vol0", timeout=120)
    assert "nightly" not in [v["name"] for v in vmd.status()["volumes"]]
    sysres.umount(fs)
    sysres.detach_loop(dev)
    vmd.stop()


# -- crashes ---------------------------------------------------------------------------

@pytest.mark.allow_log(r"was not stopped cleanly", r"was still synchronizing when the daemon")
def test_crash_during_snap_start_removes_mirror(vmd_factory: Callable[..., VmdDaemon],
                                                tmp_path: Path) -> None:
    vmd = vmd_factory(rate_limit="4MiB").start()
    rng = random.Random(7)
    pwrite_file(vmd.volume_file(), [(i * 4 * MiB, rng.randbytes(MiB)) for i in range(16)])

    # 1: an image vmd creates is deleted.
    vmd.cli("snap", "start", "vol0")
    st = vmd.status("vol0")
    sp = plex_by_role(st, "snapshot")
    assert sp["state"] == "SNAPATT" and st["resync"]["running"], st
    created = Path(sp["path"])
    assert created.exists()
    time.sleep(0.3)
    pwrite_file(vmd.volume_file(), [(5 * MiB, rng.randbytes(64 * KiB))])
    assert plex_by_role(vmd.status("vol0"), "snapshot")["state"] == "SNAPATT"
    vmd.kill()
    vmd.start()
    st = vmd.wait_resync("vol0")
    assert [(p["name"], p["state"]) for p in st["plexes"]] == [("p0", "ACTIVE"), ("p1", "ACTIVE")]
    assert not created.exists(), "vmd created the snapshot mirror's image and left it behind"
    p0, p1 = vmd.plex_paths()
    assert sha(p0) == sha(p1) == h(read_direct(vmd.volume_file()))

    # 2: an image the administrator named is kept, although vmd made the file.
    given = tmp_path / "given-snap.img"
    vmd.cli("snap", "start", "vol0", "--path", str(given))
    assert plex_by_role(vmd.status("vol0"), "snapshot")["state"] == "SNAPATT"
    vmd.kill()
    vmd.start()
    st = vmd.wait_resync("vol0")
    assert [p["state"] for p in st["plexes"]] == ["ACTIVE", "ACTIVE"]
    assert given.exists(), "vmd deleted an image named with --path"
    assert f"image {given} left in place" in vmd.stderr()
    assert sha(p0) == sha(p1)
    # And a new snapshot mirror can be started afterwards.
    vmd.cli("snap", "start", "vol0")
    assert plex_by_role(vmd.status("vol0"), "snapshot")["state"] == "SNAPATT"
    vmd.cli("snap", "abort", "vol0")
    vmd.stop()


@pytest.mark.allow_log(r"was not stopped cleanly")
def test_crash_during_snap_back_completes_after_restart(
        vmd_factory: Callable[..., VmdDaemon]) -> None:
    vmd = vmd_factory().start()
    rng = random.Random(11)
    snapshot_cycle(vmd)
    # 16 MiB changed on vol0 in 1 MiB pieces, 1 MiB on the snapshot.
    pwrite_file(vmd.volume_file(), [(i * 4 * MiB, rng.randbytes(MiB)) for i in range(16)])
    pwrite_file(vmd.volume_file("nightly"), [(2 * MiB, rng.randbytes(MiB))])
    union = 17 * MiB
    vmd.stop()
    set_rate(vmd, "512KiB")  # 34 s for the union: the kill below lands well before its end
    vmd.start()

    out = vmd.cli("snap", "back", "nightly").stdout
    assert "(full)" not in out, out
    st = vmd.status("vol0")
    assert st["resync"]["span_bytes"] == union, st["resync"]
    # Past the first progress commit: the log (what the restart replays) has
    # some of the copy.
    wait_for(lambda: next(p.missing.bytes_covered() for p in vmd.logged_state().plexes
                          if p.role == "snapback") < union, 30, "a durable progress record")
    st = vmd.status("vol0")
    assert st["resync"]["running"] and st["resync"]["done_bytes"] < union, st["resync"]
    assert plex_by_role(st, "snapback")["state"] == "SNAPATT"
    vmd.kill()

    set_rate(vmd, None)
    vmd.start()
    st = vmd.status("vol0")
    assert "nightly" not in [v["name"] for v in vmd.status()["volumes"]]
    sp = [p for p in st["plexes"] if p["role"] in ("snapback", "snapshot")]
    assert len(sp) == 1, st["plexes"]
    # Resumed, not restarted from scratch: it lacks at most the union.
    assert sp[0]["missing_bytes"] <= union, sp
    st = vmd.wait_resync("vol0")
    print(f"snap back after SIGKILL: {st['resync']['copied_bytes']} of {union} bytes copied "
          f"after the restart")
    assert st["resync"]["synced_bytes"] < union, "the snap back started over after the crash"
    sp = plex_by_role(st, "snapshot")
    assert sp["state"] == "SNAPDONE" and sp["missing_bytes"] == 0, sp
    vol = h(read_direct(vmd.volume_file()))
    for p in st["plexes"]:
        assert sha(p["path"]) == vol, f"plex {p['name']} differs after the resumed snap back"
    vmd.stop()


# -- clean restart -----------------------------------------------------------------------

def test_snapshot_survives_clean_restart(vmd_factory: Callable[..., VmdDaemon]) -> None:
    vmd = vmd_factory().start()
    rng = random.Random(13)
    pwrite_file(vmd.volume_file(), [(0, rng.randbytes(4 * MiB))])
    snapshot_cycle(vmd)
    pwrite_file(vmd.volume_file(), region_writes([3, 100, 700], rng))
    pwrite_file(vmd.volume_file("nightly"), region_writes([100, 900], rng))
    snap_before = h(read_direct(vmd.volume_file("nightly")))
    vol_before = h(read_direct(vmd.volume_file()))
    rel_before = vmd.status("vol0")["snapshots"]
    info_before = vmd.status("nightly")["snapshot"]
    assert rel_before[0]["changed_bytes"] == 3 * FMR and info_before["changed_bytes"] == 2 * FMR

    vmd.restart()
    assert (vmd.mountpoint / "nightly").exists()
    assert h(read_direct(vmd.volume_file("nightly"))) == snap_before
    assert h(read_direct(vmd.volume_file())) == vol_before
    assert vmd.status("vol0")["snapshots"] == rel_before
    assert vmd.status("nightly")["snapshot"] == info_before
    assert vmd.status("nightly")["clean"] is True

    # The maps survived too: snap back copies exactly the union.
    vmd.cli("snap", "back", "nightly")
    st = vmd.wait_resync("vol0")
    assert st["resync"]["synced_bytes"] == 4 * FMR  # {3, 100, 700, 900}
    assert plex_by_role(st, "snapshot")["state"] == "SNAPDONE"
    vmd.stop()


# -- refresh and clear -------------------------------------------------------------------

def test_refresh_then_clear(vmd_factory: Callable[..., VmdDaemon]) -> None:
    vmd = vmd_factory().start()
    rng = random.Random(17)
    snapshot_cycle(vmd)
    pwrite_file(vmd.volume_file(), region_writes([10, 20, 30], rng))
    pwrite_file(vmd.volume_file("nightly"), region_writes([30, 40], rng))

    out = vmd.cli("snap", "refresh", "nightly", timeout=120).stdout
    assert "snapshot nightly taken" in out, out
    vol = h(read_direct(vmd.volume_file()))
    assert h(read_direct(vmd.volume_file("nightly"))) == vol
    st = vmd.status("vol0")
    assert st["resync"]["synced_bytes"] == 4 * FMR
    assert [(s["name"], s["changed_bytes"]) for s in st["snapshots"]] == [("nightly", 0)]
    assert sorted(p["state"] for p in st["plexes"]) == ["ACTIVE", "ACTIVE"]
    assert vmd.status("nightly")["snapshot"]["of"] == "vol0"

    pwrite_file(vmd.volume_file("nightly"), region_writes([50], rng))
    snap = h(read_direct(vmd.volume_file("nightly")))
    out = vmd.cli("snap", "clear", "nightly").stdout
    assert "no longer a snapshot" in out
    assert "snapshots" not in vmd.status("vol0")
    assert "snapshot" not in vmd.status("nightly")
    assert h(read_direct(vmd.volume_file("nightly"))) == snap
    p = vmd.cli("snap", "back", "nightly", check=False)
    assert p.returncode != 0 and "nightly" in p.stderr and "not a snapshot" in p.stderr, p

    # Still an ordinary, unrelated volume after a restart.
    vmd.restart()
    assert "snapshots" not in vmd.status("vol0")
    st = vmd.status("nightly")
    assert "snapshot" not in st and [p["state"] for p in st["plexes"]] == ["ACTIVE"]
    assert h(read_direct(vmd.volume_file("nightly"))) == snap
    assert h(read_direct(vmd.volume_file())) == vol
    vmd.stop()


# -- error cases: a clear error, nothing changed ----------------------------------------

def _snapshot_of_state(vmd: VmdDaemon) -> Any:
    """What a refused command must not change. A plex being copied to loses
    missing bytes as the background copy runs, refusal or not: for those,
    that they still miss some is what counts."""
    st = vmd.status()
    return [(v["name"], [(p["name"], p["state"], p["path"],
                          (p["missing_bytes"] or 0) > 0 if p["state"] in ("SNAPATT", "SYNCING")
                          else p["missing_bytes"])
                         for p in v["plexes"]], v.get("snapshots"), v.get("snapshot"))
            for v in st["volumes"]]


def _same_but_copy_progress(before: Any, after: Any) -> bool:
    """Equal, but for plexes being copied (SNAPATT, SYNCING), whose missing bytes
    shrink on their own as the copy runs; never grow (a restarted copy)."""
    def copying(state: Any) -> list[tuple[str, int]]:
        return [(p[0], p[3]) for v in state for p in v[1] if p[1] in ("SNAPATT", "SYNCING")]

    def rest(state: Any) -> Any:
        return [(v[0], [p[:3] if p[1] in ("SNAPATT", "SYNCING") else p for p in v[1]], *v[2:])
                for v in state]

    return rest(before) == rest(after) and all(
        b[0] == a[0] and a[1] <= b[1] for b, a in zip(copying(before), copying(after)))


def _refused(vmd: VmdDaemon, *args: str, names: str = "vol0", says: str = "") -> str:
    before = _snapshot_of_state(vmd)
    p = vmd.cli(*args, check=False)
    assert p.returncode != 0, f"vmd {' '.join(args)} succeeded:\n{p.stdout}"
    assert "Traceback" not in p.stderr
    err = p.stderr.strip()
    assert err.startswith("vmd: ") and len(err.splitlines()) == 1, p.stderr
    assert names in err, f"the error does not name {names}: {err}"
    assert says.lower() in err.lower(), f"expected {says!r} in: {err}"
    after = _snapshot_of_state(vmd)
    assert _same_but_copy_progress(before, after), (f"vmd {' '.join(args)} changed something: "
                                                    f"{before} -> {after}")
    return err


def test_errors_without_snapshot_mirror_and_while_snapatt(
        vmd_factory: Callable[..., VmdDaemon]) -> None:
    vmd = vmd_factory(rate_limit="1MiB").start()
    _refused(vmd, "snap", "take", "vol0", "nightly", says="snap start")
    _refused(vmd, "snap", "abort", "vol0", says="no snapshot mirror")
    _refused(vmd, "snap", "wait", "vol0", says="no snapshot mirror")
    _refused(vmd, "snap", "back", "vol0", says="not a snapshot")
    _refused(vmd, "snap", "clear", "vol0", says="not a snapshot")
    _refused(vmd, "snap", "back", "nosuch", names="nosuch")
    _refused(vmd, "snap", "take", "nosuch", "nightly", names="nosuch")
    assert not list(Path(vmd.base).glob("*snap*.img"))

    # Data to copy (holes cost no time): 16 s at 1 MiB/s keep the mirror SNAPATT.
    pwrite_file(vmd.volume_file(), [(0, os.urandom(16 * MiB))])
    vmd.cli("snap", "start", "vol0")
    sp = plex_by_role(vmd.status("vol0"), "snapshot")
    assert sp["state"] == "SNAPATT"
    _refused(vmd, "snap", "take", "vol0", "nightly", says="still synchronizing")
    _refused(vmd, "snap", "start", "vol0", says="already has a snapshot mirror")
    assert "nightly" not in [v["name"] for v in vmd.status()["volumes"]]
    assert not (vmd.mountpoint / "nightly").exists()

    out = vmd.cli("snap", "abort", "vol0").stdout
    assert "deleted" in out, out
    assert not Path(sp["path"]).exists()
    assert plex_states(vmd) == {"p0": "ACTIVE", "p1": "ACTIVE"}
    _refused(vmd, "snap", "abort", "vol0", says="no snapshot mirror")
    vmd.stop()


def test_abort_deletes_only_images_vmd_named(vmd_factory: Callable[..., VmdDaemon],
                                            tmp_path: Path) -> None:
    """The rule (issue 16, item 5): `snap abort` deletes the mirror's image only if vmd
    named and created it; an image named with --path is left in place, whether vmd made
    the file or it was there. The CLI and the daemon log say the same."""
    vmd = vmd_factory().start()
    given_new, given_old = tmp_path / "given-new.img", tmp_path / "given-old.img"
    with open(given_old, "wb") as f:
        f.truncate(vmd.volume_size())
    for args, deleted in (((), True), (("--path", str(given_new)), False),
                          (("--path", str(given_old)), False)):
        vmd.cli("snap", "start", "vol0", *args)
        vmd.cli("snap", "wait", "vol0", timeout=60)
        path = plex_by_role(vmd.status("vol0"), "snapshot")["path"]
        assert Path(path).exists()
        out = vmd.cli("snap", "abort", "vol0").stdout
        fate = f"image {path} deleted" if deleted else f"image {path} left in place"
        assert fate in out, out
        logged = [ln for ln in vmd.stderr().splitlines() if f"image {path}" in ln]
        assert logged and all(fate in ln for ln in logged), logged
        assert Path(path).exists() != deleted, f"{path}: {out}"
        assert plex_states(vmd) == {"p0": "ACTIVE", "p1": "ACTIVE"}
    vmd.stop()


def test_take_refuses_bad_or_clashing_names(vmd_factory: Callable[..., VmdDaemon]) -> None:
    vmd = vmd_factory(volumes={"vol0": volume_spec("vol0"),
                               "vol1": volume_spec("vol1", size="16MiB")}).start()
    vmd.cli("snap", "start", "vol0")
    vmd.cli("snap", "wait", "vol0")
    for bad in ["vol0", "vol1", "a/b", ".hidden", "x" * 65, "sp ace", "../up"]:
        err = _refused(vmd, "snap", "take", "vol0", bad, names=bad)
        assert "vol0" in err, err
        assert "SNAPDONE" in plex_states(vmd).values()
    assert sorted(v["name"] for v in vmd.status()["volumes"]) == ["vol0", "vol1"]
    assert sorted(os.listdir(vmd.mountpoint)) == ["vol0", "vol1"]
    assert sorted(p.name for p in Path(vmd.base).glob("*.log")) == ["vol0.log", "vol1.log"]
    # The mirror is still good for a proper name.
    vmd.cli("snap", "take", "vol0", "ok-name.1")
    assert vmd.status("ok-name.1")["snapshot"]["of"] == "vol0"
    vmd.stop()


def test_back_refused_while_snapshot_busy(vmd_factory: Callable[..., VmdDaemon],
                                          sysres: SysResources) -> None:
    vmd = vmd_factory().start()
    rng = random.Random(19)
    snapshot_cycle(vmd)
    pwrite_file(vmd.volume_file(), region_writes([1, 2], rng))
    sdev = sysres.losetup(vmd.volume_file("nightly"))
    assert vmd.status("nightly")["open"] >= 1
    _refused(vmd, "snap", "back", "nightly", names="nightly", says="--force")
    _refused(vmd, "snap", "refresh", "nightly", names="nightly", says="--force")
    _refused(vmd, "snap", "take", "vol0", "other", says="snap start")
    assert vmd.status("nightly")["snapshot"]["of"] == "vol0"

    sysres.detach_loop(sdev)
    wait_for(lambda: vmd.status("nightly")["open"] == 0, what="the loop device to let go")
    vmd.cli("snap", "back", "nightly")
    st = vmd.wait_resync("vol0")
    assert st["resync"]["synced_bytes"] == 2 * FMR
    assert plex_by_role(st, "snapshot")["state"] == "SNAPDONE"
    vmd.stop()


def test_back_force_on_busy_snapshot(vmd_factory: Callable[..., VmdDaemon],
                                     sysres: SysResources) -> None:
    vmd = vmd_factory().start()
    rng = random.Random(23)
    snapshot_cycle(vmd)
    pwrite_file(vmd.volume_file("nightly"), region_writes([7], rng))
    fd = os.open(vmd.volume_file("nightly"), os.O_RDONLY)
    try:
        vmd.cli("snap", "back", "nightly", "--force")
        st = vmd.wait_resync("vol0")
        assert st["resync"]["synced_bytes"] == FMR
        assert plex_by_role(st, "snapshot")["state"] == "SNAPDONE"
        assert "nightly" not in [v["name"] for v in vmd.status()["volumes"]]
    finally:
        os.close(fd)
    vol = h(read_direct(vmd.volume_file()))
    for p in st["plexes"]:
        assert sha(p["path"]) == vol
    vmd.stop()
