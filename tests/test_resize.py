"""Online grow (`vmd resize`): ext4 grown under a mount, a SIGKILL at every
step, shrink and the cases vmd does not handle refused, detached plexes."""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import SysResources, VmdDaemon, run, volume_spec
from enginekit import running_volume, volume_config
from vmd.config import MiB
from vmd.errors import VmdError
from vmd.faults import RESIZE_STEPS
from vmd.resize import grow

OLD, NEW = 64 * MiB, 96 * MiB
CONFIG_WINS = r"volumes\.vol0\.size is 64MiB but the sidecar log .* says 96MiB"


def _files(root: Path, tag: str, rng: random.Random) -> dict[str, str]:
    sums = {}
    for i in range(12):
        data = rng.randbytes(rng.choice([1, 4096, 100_000, 2 * MiB + 3]))
        p = root / f"{tag}{i}.bin"
        p.write_bytes(data)
        sums[p.name] = hashlib.sha256(data).hexdigest()
    return sums


def _check(root: Path, sums: dict[str, str]) -> None:
    for name, want in sums.items():
        assert hashlib.sha256((root / name).read_bytes()).hexdigest() == want, name


def _fsck(dev: str) -> None:
    fsck = run(["fsck.ext4", "-fn", dev], check=False)
    assert fsck.returncode == 0, f"fsck.ext4 -fn found problems:\n{fsck.stdout}\n{fsck.stderr}"


def _can_resize_online() -> bool:
    """ext4's online resize (EXT4_IOC_RESIZE_FS) wants CAP_SYS_RESOURCE."""
    cap_sys_resource = 24
    with open("/proc/self/status") as f:
        eff = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    return bool(eff >> cap_sys_resource & 1)


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.mount
@pytest.mark.allow_log(CONFIG_WINS)
@pytest.mark.parametrize("writeback", [False, True], ids=["direct_io", "writeback_cache"])
def test_grow_ext4_online(vmd_factory: Callable[..., VmdDaemon], sysres: SysResources,
                          tmp_path: Path, writeback: bool) -> None:
    """ext4 on a loop device on the volume, mounted and written while the
    volume grows; the kernel sees the size at once; everything intact. Also
    on a writeback_cache mount, where the kernel keeps its own size of a
    volume file (resize_verbs.py moves it with a truncate)."""
    vmd = vmd_factory(volumes={"vol0": volume_spec("vol0", direct_io=not writeback)},
                      extra={"writeback_cache": writeback}).start()
    dev = vmd.losetup()
    run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", dev])
    mnt = Path(sysres.mount(dev, tmp_path / "fs"))
    rng = random.Random(7)
    before = _files(mnt, "before", rng)
    run(["sync"])

    out = vmd.cli("resize", "vol0", "96MiB").stdout
    assert "grown from 64MiB (67108864 bytes) to 96MiB (100663296 bytes)" in out, out
    # No attribute timeout to wait out: the file's size is new at once.
    assert os.stat(vmd.volume_file()).st_size == NEW
    run(["losetup", "-c", dev])
    assert int(run(["blockdev", "--getsize64", dev]).stdout) == NEW
    if _can_resize_online():
        run(["resize2fs", dev])
    else:
        # ext4's online resize needs CAP_SYS_RESOURCE, which this container
        # lacks: grow the filesystem offline (vmd served throughout).
        sysres.umount(mnt)
        _fsck(dev)
        run(["e2fsck", "-fp", dev])  # resize2fs asks for a fresh check first
        run(["resize2fs", dev])
        mnt = Path(sysres.mount(dev, tmp_path / "fs"))
    assert os.statvfs(mnt).f_blocks * os.statvfs(mnt).f_frsize > 80 * MiB
    after = _files(mnt, "after", rng)
    # More than the old filesystem could hold: the new blocks are in use.
    (mnt / "big.bin").write_bytes(rng.randbytes(40 * MiB))
    run(["sync"])
    _check(mnt, before)
    _check(mnt, after)
    sysres.umount(mnt)
    _fsck(dev)
    sysres.detach_loop(dev)

    st = vmd.status("vol0")
    assert st["size"] == NEW and [p["state"] for p in st["plexes"]] == ["ACTIVE", "ACTIVE"]
    vmd.stop()
    p0, p1 = vmd.plex_paths()
    assert os.path.getsize(p0) == os.path.getsize(p1) == NEW
    assert _sha(p0) == _sha(p1)
    # The config still says 64MiB: the log's larger size wins, with a warning.
    vmd.start()
    assert vmd.status("vol0")["size"] == NEW
    assert "update the config" in vmd.stderr()
    dev = vmd.losetup()
    _fsck(dev)
    mnt = Path(sysres.mount(dev, tmp_path / "fs", "-o", "ro"))
    _check(mnt, before)
    _check(mnt, after)
    sysres.umount(mnt)
    sysres.detach_loop(dev)
    vmd.stop()


def _pattern(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.mark.mount
@pytest.mark.allow_log(CONFIG_WINS, r"finishing an interrupted resize",
                       r"was not stopped cleanly")
@pytest.mark.parametrize("step", RESIZE_STEPS)
def test_sigkill_at_each_step_of_a_resize(vmd_factory: Callable[..., VmdDaemon],
                                          step: str) -> None:
    """Killed after the log took the new size (before, between and after the
    image extensions): the restart opens the new size, every image extended,
    the plexes in sync, the data as written and the new bytes zeros."""
    vmd = vmd_factory(env={"VMD_TEST_FAULT": f"resize:vol0:{step}"}).start()
    data = _pattern(OLD, 1)
    with open(vmd.volume_file(), "r+b") as f:
        f.write(data)
        os.fsync(f.fileno())
    r = vmd.cli("resize", "vol0", "96MiB", check=False)
    assert r.returncode != 0
    assert vmd.wait_exit() < 0  # SIGKILLed by the fault hook
    vmd.kill()
    logged = vmd.logged_state()
    assert logged.size == NEW and logged.extra["grow"] == {"from": OLD, "to": NEW}
    sizes = [os.path.getsize(p) for p in vmd.plex_paths()]
    assert sizes == {"logged": [OLD, OLD], "one-extended": [NEW, OLD],
                     "extended": [NEW, NEW]}[step]

    vmd.env.clear()
    vmd.start()
    assert [os.path.getsize(p) for p in vmd.plex_paths()] == [NEW, NEW]
    assert "grow" not in vmd.logged_state().extra
    st = vmd.wait_resync()
    assert st["size"] == NEW and all(p["state"] == "ACTIVE" for p in st["plexes"])
    with open(vmd.volume_file(), "rb") as f:
        assert f.read(OLD) == data
        assert f.read() == bytes(NEW - OLD)
    vmd.stop()
    p0, p1 = vmd.plex_paths()
    assert _sha(p0) == _sha(p1)


@pytest.mark.mount
@pytest.mark.allow_log(CONFIG_WINS, r"finishing an interrupted resize",
                       r"was not stopped cleanly")
@pytest.mark.parametrize("crash", [False, True], ids=["online", "killed-after-log"])
def test_detached_plex_grows_and_keeps_its_fastresync_map(
        vmd_factory: Callable[..., VmdDaemon], crash: bool) -> None:
    """A detached plex's image grows with the volume and its map stays
    trusted: the reattach copies only what it missed, also after a crash
    between the log record and the extension of its image."""
    env = {"VMD_TEST_FAULT": "resize:vol0:logged"} if crash else {}
    vmd = vmd_factory(env=env).start()
    vmd.cli("plex", "detach", "vol0", "p1")
    with open(vmd.volume_file(), "r+b") as f:
        f.seek(5 * MiB)
        f.write(_pattern(MiB, 2))
    r = vmd.cli("resize", "vol0", "96MiB", check=not crash)
    if crash:
        assert r.returncode != 0
        vmd.wait_exit()
        vmd.kill()
        assert os.path.getsize(vmd.plex_paths()[1]) == OLD
        vmd.env.clear()
        vmd.start()
    assert [os.path.getsize(p) for p in vmd.plex_paths()] == [NEW, NEW]
    with open(vmd.volume_file(), "r+b") as f:
        f.seek(OLD + 3 * MiB)
        f.write(_pattern(MiB, 3))
    plex = vmd.request({"cmd": "plex.attach", "volume": "vol0", "plex": "p1"})["plex"]
    assert not plex["full_resync"], plex["why"]
    # What it missed: the write before the grow (its DRL region after a
    # crash) and the one after; not the whole volume.
    assert plex["missing_bytes"] <= 5 * MiB, plex
    vmd.wait_resync()
    vmd.stop()
    p0, p1 = vmd.plex_paths()
    assert _sha(p0) == _sha(p1)


@pytest.mark.mount
def test_shrink_and_bad_sizes_refused(vmd: VmdDaemon) -> None:
    for size, words in (("32MiB", "vmd does not shrink a volume"),
                        ("100MB", "100MB is 100000000 bytes, not a multiple of 512"),
                        ("lots", "not a size: 'lots'")):
        r = vmd.cli("resize", "vol0", size, check=False)
        assert r.returncode == 1 and words in r.stderr, r.stderr
    assert vmd.cli("resize", "vol0", "64MiB").stdout.startswith("vol0: already 64MiB")
    assert os.stat(vmd.volume_file()).st_size == OLD
    assert vmd.logged_state().size == OLD
    r = vmd.cli("resize", "nope", "1GiB", check=False)
    assert r.returncode == 1 and "no volume named 'nope'" in r.stderr


@pytest.mark.mount
@pytest.mark.allow_log(CONFIG_WINS)
def test_volume_with_a_snapshot_refused(vmd: VmdDaemon) -> None:
    vmd.cli("snap", "start", "vol0")
    vmd.cli("snap", "wait", "vol0")
    vmd.cli("snap", "take", "vol0", "snap1")
    r = vmd.cli("resize", "vol0", "96MiB", check=False)
    assert r.returncode == 1 and "has snapshot snap1" in r.stderr, r.stderr
    r = vmd.cli("resize", "snap1", "96MiB", check=False)
    assert r.returncode == 1 and "snapshot of vol0" in r.stderr, r.stderr
    assert vmd.logged_state().size == OLD
    # Cleared, the snapshot is a volume of its own, and each grows alone.
    vmd.cli("snap", "clear", "snap1")
    vmd.cli("resize", "snap1", "80MiB")
    vmd.cli("resize", "vol0", "96MiB")
    sizes = {"snap1": 80 * MiB, "vol0": NEW}
    for _ in range(2):  # now, and after a restart (snap1's config is made from vol0's)
        for name, size in sizes.items():
            assert os.stat(vmd.volume_file(name)).st_size == size
            assert vmd.status(name)["size"] == size
        vmd.restart()
    assert not vmd.status()["refused"]


@pytest.mark.parametrize("role", ["rcopy", "rcopy_target"])
async def test_remote_copy_volumes_refused(tmp_path: Path, role: str) -> None:
    vc = volume_config(tmp_path, size=OLD)
    async with running_volume(vc) as vol:
        vol.state.extra[role] = {}
        with pytest.raises(VmdError, match="Remote Copy source or target"):
            await grow(vol, NEW)
        assert vol.size == OLD and vol.state.drl.nbits == OLD // vc.region_size


async def test_engine_grow_grows_every_map(tmp_path: Path) -> None:
    """Without a mount: the maps, the plexes and the log after a grow."""
    vc = volume_config(tmp_path, size=OLD + 512)  # a short last region
    async with running_volume(vc) as vol:
        await vol.pwrite(OLD, b"x" * 512)
        await vol.detach_plex("p1")
        await vol.pwrite(0, b"y" * 4096)
        reply = await grow(vol, NEW)
        assert reply["extended"] == ["p0", "p1"] and not reply["not_extended"]
        p1 = vol.state.plex("p1")
        assert p1 is not None and p1.missing is not None
        assert p1.missing.nbits == NEW // vc.fastresync_region
        assert list(p1.missing.set_indices()) == [0]
        assert vol.state.drl.nbits == NEW // vc.region_size
        await vol.pwrite(NEW - 4096, b"z" * 4096)
        assert await vol.pread(NEW - 4096, 4096) == b"z" * 4096
        assert list(p1.missing.set_indices()) == [0, p1.missing.nbits - 1]
        assert await vol.pread(OLD, 1024) == b"x" * 512 + bytes(512)
    from vmd.sidecar import read_log

    st = read_log(vc.log)[0].state
    assert st.size == NEW and "grow" not in st.extra


async def test_plex_added_during_a_grow_has_the_new_size(tmp_path: Path) -> None:
    """`plex add` overlapping a grow waits at the write gate behind it; the
    plex it adds must be of the size the volume has once it gets through,
    or it becomes ACTIVE short and fails the reads past the old end
    (reviewer 4, F4)."""
    import trio
    import trio.testing

    from vmd.sidecar import ACTIVE

    vc = volume_config(tmp_path, size=OLD)
    async with running_volume(vc) as vol:
        await vol.pwrite(0, b"a" * 4096)
        await vol.gate.enter()  # an I/O in flight: the grow waits at the gate
        async with trio.open_nursery() as n:
            n.start_soon(grow, vol, NEW)
            await trio.testing.wait_all_tasks_blocked()
            n.start_soon(vol.add_plex, str(tmp_path / "added.img"))  # arrives meanwhile
            await trio.testing.wait_all_tasks_blocked()
            vol.gate.exit()
        assert vol.size == NEW
        with trio.fail_after(30):
            await vol.resync.wait_idle()
        added = vol.plexes[-1]
        assert added.state == ACTIVE, added.record
        assert (added.size, os.stat(added.path).st_size) == (NEW, NEW)
        assert await added.pread(NEW - 4096, 4096) == bytes(4096)


async def test_grow_no_in_sync_image_can_take_is_taken_back(
        tmp_path: Path, sysres: SysResources) -> None:
    """A real EFBIG: both in-sync images are on a filesystem without extents
    (1 KiB blocks: no file beyond 16 GiB). The grow is refused naming the
    images and the error, the old size stays in the log, the SYNCING plex it
    had extended is shrunk back, and the volume starts again (reviewer 4, F5:
    it kept the new size, and then would not start)."""
    import dataclasses

    from vmd.sidecar import ACTIVE, SYNCING, read_log

    small = tmp_path / "small"
    small.mkdir()
    sysres.make_ext4_image(tmp_path / "small.img", 32 * MiB, small,
                           "-b", "1024", "-O", "^extent,^64bit,^huge_file")
    size, huge = 4 * MiB, 17 * 1024 * MiB
    vc = dataclasses.replace(volume_config(tmp_path, size=size),
                             plexes=(small / "p0.img", small / "p1.img"))
    async with running_volume(vc) as vol:
        await vol.pwrite(0, b"a" * 4096)
        async with vol.resync.paused():  # the added plex stays SYNCING through the grow
            p2 = await vol.add_plex(str(tmp_path / "p2.img"))
            with pytest.raises(VmdError) as refused:
                await grow(vol, huge)
            assert p2.state == SYNCING
        assert "File too large" in str(refused.value), refused.value
        assert str(small / "p0.img") in str(refused.value), refused.value
        assert vol.size == size and {p.state for p in vol.plexes} == {ACTIVE, SYNCING}
        assert [os.stat(p.path).st_size for p in vol.plexes] == [size] * 3
        assert read_log(vc.log)[0].state.size == size
        await vol.resync.wait_idle()
    async with running_volume(vc) as vol:  # starts again, whole
        assert vol.size == size and await vol.pread(0, 4096) == b"a" * 4096
        assert {p.state for p in vol.plexes} == {ACTIVE}, [p.record for p in vol.plexes]
