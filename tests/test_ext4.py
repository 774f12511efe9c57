"""A real filesystem on a volume: losetup, mkfs.ext4, mount, fsck, restart."""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import SysResources, VmdDaemon, run, volume_spec

pytestmark = pytest.mark.mount


def _write_tree(root: Path, rng: random.Random) -> dict[str, str]:
    """Files of assorted sizes in a few directories; returns {relpath: sha256}."""
    sums = {}
    for i in range(40):
        d = root / f"dir{i % 4}"
        d.mkdir(exist_ok=True)
        size = rng.choice([0, 1, 511, 4096, 10_000, 100_000, 1 << 20, 3 * (1 << 20) + 17])
        data = rng.randbytes(size)
        p = d / f"file{i}.bin"
        p.write_bytes(data)
        sums[str(p.relative_to(root))] = hashlib.sha256(data).hexdigest()
    return sums


def _check_tree(root: Path, sums: dict[str, str]) -> None:
    for rel, want in sums.items():
        assert hashlib.sha256((root / rel).read_bytes()).hexdigest() == want, rel


def test_ext4_on_volume_survives_restart(vmd_factory: Callable[..., VmdDaemon],
                                         sysres: SysResources, tmp_path: Path) -> None:
    vmd = vmd_factory(volumes={"vol0": volume_spec("vol0", size="128MiB")}).start()
    dev = vmd.losetup()
    run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", dev])
    mnt = sysres.mount(dev, tmp_path / "fs")
    sums = _write_tree(Path(mnt), random.Random(42))
    run(["sync"])
    # The loop device holds the volume file open; status says so.
    assert vmd.status("vol0")["open"] >= 1
    sysres.umount(mnt)
    fsck = run(["fsck.ext4", "-fn", dev], check=False)
    assert fsck.returncode == 0, f"fsck.ext4 -fn found problems:\n{fsck.stdout}\n{fsck.stderr}"
    sysres.detach_loop(dev)

    vmd.stop()
    # Both plexes hold the same filesystem.
    p0, p1 = vmd.plex_paths()
    assert _sha(p0) == _sha(p1)
    fsck = run(["fsck.ext4", "-fn", str(p1)], check=False)
    assert fsck.returncode == 0, f"plex p1 alone is not a clean ext4:\n{fsck.stdout}"

    vmd.start()
    st = vmd.status("vol0")
    assert st["clean"] and [p["state"] for p in st["plexes"]] == ["ACTIVE", "ACTIVE"]
    dev = vmd.losetup()
    mnt = sysres.mount(dev, tmp_path / "fs", "-o", "ro")
    _check_tree(Path(mnt), sums)
    sysres.umount(mnt)
    sysres.detach_loop(dev)
    vmd.stop()


def _sha(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def test_teardown_with_fs_still_mounted(vmd_factory: Callable[..., VmdDaemon],
                                        sysres: SysResources, tmp_path: Path) -> None:
    """The fixtures clean up an ext4 mount and loop device left on a live
    volume (what a failing test leaves behind); the next test checks nothing
    leaked via the sysres teardown assertions."""
    vmd = vmd_factory().start()
    dev = vmd.losetup()
    run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", dev])
    mnt = sysres.mount(dev, tmp_path / "fs")
    (Path(mnt) / "f").write_bytes(b"x" * 10000)
    fd = os.open(Path(mnt) / "f", os.O_RDONLY)
    os.close(fd)
    # left mounted and attached on purpose


@pytest.mark.allow_log(r"volume vol0 was not stopped cleanly")
def test_daemon_killed_under_mounted_fs(vmd_factory: Callable[..., VmdDaemon],
                                        sysres: SysResources, tmp_path: Path) -> None:
    """A crash (SIGKILL) with ext4 mounted on a loop device on the volume: the
    mount is gone from the daemon's side and the fixtures still clean up (crash
    tests rely on it); after a restart, fsck of the synced filesystem is clean."""
    vmd = vmd_factory().start()
    dev = vmd.losetup()
    run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", dev])
    mnt = sysres.mount(dev, tmp_path / "fs")
    (Path(mnt) / "f").write_bytes(b"y" * 100_000)
    run(["sync"])
    vmd.kill()
    assert not vmd.running
    assert not os.path.ismount(vmd.mountpoint)
    sysres.release()  # lazy umount of the ext4, detach of the dead loop device
    assert not sysres.verify_released()
    vmd.start()
    dev = vmd.losetup()
    mnt = sysres.mount(dev, tmp_path / "fs")  # replays the ext4 journal
    assert (Path(mnt) / "f").read_bytes() == b"y" * 100_000
    sysres.umount(mnt)
    fsck = run(["fsck.ext4", "-fn", dev], check=False)
    assert fsck.returncode == 0, fsck.stdout
