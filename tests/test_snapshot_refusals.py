"""Refused snapshot commands (issue 5, issue 16): a clear error that names what is
in the way, and nothing changed — restore under a mounted filesystem, commands
without a snapshot mirror or while it synchronizes, abort, bad names, snap back
of a busy snapshot and --force."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import MiB, SysResources, VmdDaemon, pwrite_file, run, sha, volume_spec, wait_for
from snapkit import (FMR, read_direct, h, region_writes, write_tree, tree, fsck_clean, plex_states,
                     plex_by_role, snapshot_cycle, ext4_with_snapshot)

pytestmark = pytest.mark.mount


# -- restore refused while the volume is in use ----------------------------------------

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
