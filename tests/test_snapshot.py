"""Third-mirror break-off snapshots (issue 5) with real daemons, real loop
devices and real ext4: snap start/wait/take under fsfreeze, FastResync snap
back (both directions), restore, crashes during snap start and snap back,
clean restarts, refresh/clear. The refusals are in test_snapshot_refusals.py."""

from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import MiB, KiB, SysResources, VmdDaemon, pwrite_file, run, sha, wait_for
from snapkit import (FMR, read_direct, read_buffered, h, region_writes, write_tree, tree,
                     fsck_clean, plex_states, plex_by_role, snapshot_cycle, set_rate,
                     ext4_with_snapshot)

pytestmark = pytest.mark.mount


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
    # The snapshot's link is no plex that is out (it said "not redundant").
    assert vmd.cli("wait", "vol0").stdout == "vol0: in sync\n"
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

def test_snap_back_from_snapshot_onto_plexes_created_at_this_start(
        vmd_factory: Callable[..., VmdDaemon]) -> None:
    """Plex images created empty by this run of the daemon and written since:
    where the snapshot has a hole (the volume was written there after the
    break-off), the restore must make them read zeros too. It kept the newer
    data (the images counted as unwritten, so holes were not punched into
    them), and verify then found the plexes differing from the snapshot's."""
    vmd = vmd_factory().start()  # the images are created now
    rng = random.Random(30)
    pwrite_file(vmd.volume_file(), [(0, rng.randbytes(4 * MiB))])
    snapshot_cycle(vmd)
    pwrite_file(vmd.volume_file(), [(20 * MiB, rng.randbytes(4 * MiB))])  # after it
    snap_data = read_direct(vmd.volume_file("nightly"))
    assert h(read_direct(vmd.volume_file())) != h(snap_data)
    vmd.cli("snap", "back", "nightly", "--from-snapshot")
    st = vmd.wait_resync("vol0")
    assert h(read_direct(vmd.volume_file())) == h(snap_data)
    for p in st["plexes"]:
        assert sha(p["path"]) == h(snap_data), f"plex {p['name']} is not the snapshot's content"
    assert "no mismatches" in vmd.cli("verify", "vol0").stdout
    vmd.stop()


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


@pytest.mark.allow_log(r"volume weekly refused: snapshot weekly of volume vol0: its sidecar "
                       r"log .* is missing")
def test_remove_retires_a_snapshot_cleared_or_not(vmd_factory: Callable[..., VmdDaemon]) -> None:
    """A snapshot volume could not be retired: its origin's log named it, so
    each start brought it back, and with its files moved away a new, empty
    volume of that name (new-user trial 10, T-K)."""
    vmd = vmd_factory().start()
    snapshot_cycle(vmd)
    image = vmd.status("nightly")["plexes"][0]["path"]
    with open(vmd.volume_file("nightly"), "rb"):
        p = vmd.cli("snap", "remove", "nightly", check=False)
        assert p.returncode != 0 and "snapshot nightly is open" in p.stderr, p.stderr
    p = vmd.cli("snap", "remove", "vol0", check=False)
    assert p.returncode != 0 and "volume vol0 is a volume of the config" in p.stderr, p.stderr
    out = vmd.cli("snap", "remove", "nightly").stdout
    assert f"its image {image} and sidecar log" in out, out
    assert not os.path.exists(vmd.volume_file("nightly"))
    assert "snapshots" not in vmd.status("vol0")
    assert not any(p["name"] == "snap:nightly" for p in vmd.status("vol0")["plexes"])
    assert os.path.exists(image)  # left for the administrator
    vmd.restart()
    assert [v["name"] for v in vmd.status()["volumes"]] == ["vol0"]

    # Cleared first, then its files moved away: refused at the start (not
    # made anew), and removed from there. (Another name: nightly's log is
    # still there, and a take does not write over it.)
    snapshot_cycle(vmd, "weekly")
    vmd.cli("snap", "clear", "weekly")
    st = vmd.status("weekly")
    log_path = st["log"]
    vmd.stop()
    for f in (st["plexes"][0]["path"], log_path):
        os.rename(f, f + ".moved")
    vmd.start()
    refused = {r["name"]: r["error"] for r in vmd.status()["refused"]}
    assert "vmd snap remove weekly" in refused["weekly"], refused
    assert not os.path.exists(st["plexes"][0]["path"]), "a new image was made"
    p = vmd.cli("start", "weekly", check=False)
    assert p.returncode != 0 and "is missing" in p.stderr, p.stderr
    vmd.cli("snap", "remove", "weekly")
    vmd.restart()
    assert [v["name"] for v in vmd.status()["volumes"]] == ["vol0"]
    assert vmd.status()["refused"] == []
    vmd.stop()
