"""The last in-sync plex is never failed (as Linux md keeps its last raid1
member): an I/O error on it is answered EIO and it keeps serving what it
holds; and a volume none of whose in-sync images open at start is refused,
nothing recorded, until they are back."""

from __future__ import annotations

import errno
import hashlib
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import MiB, SysResources, VmdDaemon, is_mounted
from daemonkit import volume_spec
from test_events import EventStream
from vmd import events

pytestmark = pytest.mark.mount

SIZE = 64 * MiB


@pytest.fixture
def streams() -> Iterator[list[EventStream]]:
    out: list[EventStream] = []
    yield out
    for s in out:
        s.close()


def _sha(path: Path) -> bytes:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).digest()


@pytest.mark.allow_log(r"plex p\d .* is now IOFAIL", r"No space left on device",
                       r"is the last in-sync plex: kept ACTIVE", r"lazy clean failed")
def test_enospc_on_both_plexes_keeps_one_active_and_attach_recovers(
        vmd_factory: Callable[..., VmdDaemon], sysres: SysResources, tmp_path: Path,
        streams: list[EventStream]) -> None:
    small = tmp_path / "small"
    sysres.make_ext4_image(tmp_path / "small.img", 40 * MiB, small)
    assert is_mounted(small)
    filler = small / "filler"
    with open(filler, "wb") as f:  # what the administrator frees later
        f.write(b"\xa5" * (8 * MiB))
        os.fsync(f.fileno())
    plexes = [str(small / "vol0-p0.img"), str(small / "vol0-p1.img")]
    vmd = vmd_factory(volumes={"vol0": {"size": "64MiB", "plexes": plexes,
                                        "log": "vol0.log"}}).start()
    es = EventStream(vmd)
    streams.append(es)

    rng = random.Random(7)
    ref = bytearray(SIZE)
    path = vmd.volume_file()
    fd = os.open(path, os.O_RDWR)
    try:
        early = rng.randbytes(6 * MiB)
        assert os.pwrite(fd, early, 0) == len(early)
        ref[:len(early)] = early
        os.fsync(fd)
        # Fill both plexes' filesystem: both fail on the same write.
        failed_at = None
        for off in range(8 * MiB, SIZE, MiB):
            data = rng.randbytes(MiB)
            try:
                n = os.pwrite(fd, data, off)
            except OSError as e:
                assert e.errno == errno.EIO, e
                failed_at = off
                break
            # The kernel splits a request: the parts before the failed one
            # are acknowledged as a short write.
            ref[off:off + n] = data[:n]
            if n < MiB:
                failed_at = off + n
                break
        assert failed_at is not None, "the small filesystem never filled up"
        states = vmd.plex_states()
        assert sorted(states.values()) == ["ACTIVE", "IOFAIL"], states
        (kept,) = [n for n, s in states.items() if s == "ACTIVE"]
        (other,) = [n for n, s in states.items() if s == "IOFAIL"]
        st = vmd.status("vol0")
        assert st["health"] == "errors" and f"plex {kept}" in st["problem"], st
        assert [p["errors"] for p in st["plexes"] if p["name"] == kept] != [0], st
        assert es.wait(events.PLEX_ERRORS, kept)["details"]["state"] == "ACTIVE"
        assert "ERRORS" in vmd.cli("status").stdout
        # Another write into the full filesystem: EIO again, still one ACTIVE plex.
        with pytest.raises(OSError) as ei:
            os.pwrite(fd, rng.randbytes(MiB), failed_at + MiB)
        assert ei.value.errno == errno.EIO
        assert vmd.plex_states()[kept] == "ACTIVE"
        # What was written before the error still reads (direct_io: from vmd).
        assert os.pread(fd, failed_at, 0) == bytes(ref[:failed_at])
    finally:
        os.close(fd)

    # Free space; bring the failed plex back from the kept one.
    filler.unlink()
    vmd.cli("plex", "attach", "vol0", other)
    st = vmd.wait_resync()
    assert {p["state"] for p in st["plexes"]} == {"ACTIVE"}, st
    assert st["health"] == "ok" and st["problem"] is None, st
    fd = os.open(path, os.O_RDWR)
    try:
        assert os.pread(fd, failed_at, 0) == bytes(ref[:failed_at])
        # Writable again, on both plexes.
        data = rng.randbytes(MiB)
        assert os.pwrite(fd, data, failed_at) == MiB
        os.fsync(fd)
    finally:
        os.close(fd)
    vmd.stop()
    # The failed writes left undefined bytes: the same undefined bytes on both.
    p0, p1 = vmd.plex_paths()
    assert _sha(p0) == _sha(p1), "the plexes disagree after the resync"


@pytest.mark.allow_log(r"volume vol0 refused: none of its in-sync images can be opened")
def test_no_image_opens_at_start_refuses_the_volume_and_records_nothing(
        vmd_factory: Callable[..., VmdDaemon], tmp_path: Path,
        streams: list[EventStream]) -> None:
    spec = volume_spec("vol0", plexes=["disk/vol0-p0.img", "disk/vol0-p1.img"])
    vmd = vmd_factory(volumes={"vol0": spec, "vol1": volume_spec("vol1")}).start()
    data = random.Random(3).randbytes(3 * MiB)
    with open(vmd.volume_file(), "r+b") as f:
        f.seek(5 * MiB)
        f.write(data)
    vmd.stop()

    # Their disk is not mounted yet at boot.
    disk = vmd.plex_paths()[0].parent
    os.rename(disk, tmp_path / "disk.away")
    vmd.start()
    st = vmd.status()
    (refused,) = [r for r in st["refused"] if r["name"] == "vol0"]
    for p in vmd.plex_paths():
        assert str(p) in refused["error"], refused
    assert [v["name"] for v in st["volumes"]] == ["vol1"], st  # the other volume serves
    es = EventStream(vmd)
    streams.append(es)
    assert "can be opened" in es.wait(events.VOLUME_REFUSED)["details"]["error"]
    vmd.stop()
    assert {p.state for p in vmd.logged_state().plexes} == {"ACTIVE"}

    os.rename(tmp_path / "disk.away", disk)
    vmd.start()
    assert vmd.plex_states() == {"p0": "ACTIVE", "p1": "ACTIVE"}
    assert vmd.status("vol0")["health"] == "ok"
    with open(vmd.volume_file(), "rb") as f:
        f.seek(5 * MiB)
        assert f.read(len(data)) == data
    vmd.stop()


@pytest.mark.allow_log(r"is now IOFAIL", r"kept ACTIVE")
async def test_failed_write_on_the_last_plex_is_eio_and_a_syncing_plex_will_copy_it(
        tmp_path: Path) -> None:
    """Engine: the failed write's range goes, durably, into the map of a plex
    that took it (SYNCING here), so that the resync makes both agree on the
    bytes the write left undefined; a failed flush of the last plex is EIO."""
    from enginekit import running_volume, volume_config  # noqa: PLC0415
    from test_engine import FaultyPlex  # noqa: PLC0415
    from vmd.sidecar import read_log  # noqa: PLC0415

    vc = volume_config(tmp_path, nplex=2)
    async with running_volume(vc, plex_factory=FaultyPlex, shutdown=False) as vol:
        await vol.detach_plex("p0")
        await vol.pwrite(0, b"d" * 4096)  # p0 misses it: SYNCING once attached
        async with vol.resync.paused():
            await vol.attach_plex("p0")  # everything it lacks is copied from p1 later
            p0 = vol.plex("p0")
            p0.record.missing.bits.setall(0)  # as if copied: what follows must mark it again
            FaultyPlex.fail_writes = True
            try:
                with pytest.raises(OSError) as e:
                    await vol.pwrite(3 * MiB, b"x" * 8192)
            finally:
                FaultyPlex.fail_writes = False
            assert e.value.errno == errno.EIO and "last in-sync plex" in str(e.value)
            assert vol.plex("p1").state == "ACTIVE" and p0.state == "SYNCING"
            assert p0.record.missing.any_in(3 * MiB, 8192)
            logged = {p.name: p for p in read_log(vc.log)[0].state.plexes}
            assert logged["p0"].missing.any_in(3 * MiB, 8192), "not durable"
            assert logged["p1"].reason.startswith("I/O errors as the last in-sync plex")
            assert vol.status()["health"] == "errors"
            FaultyPlex.fail_flush = True
            try:
                with pytest.raises(OSError) as e:
                    await vol.flush()
            finally:
                FaultyPlex.fail_flush = False
            assert e.value.errno == errno.EIO and vol.plex("p1").state == "ACTIVE"
        await vol.resync.wait_idle()
        assert p0.state == "ACTIVE" and vol.status()["health"] == "ok"


async def test_a_volume_with_no_in_sync_plex_does_not_look_clean(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """As a log written by an older vmd may hold it: every plex IOFAIL."""
    from enginekit import running_volume, volume_config  # noqa: PLC0415
    from vmd.cli import _print_status  # noqa: PLC0415

    async with running_volume(volume_config(tmp_path, nplex=2), shutdown=False) as vol:
        for p in vol.plexes:
            p.record.state = "IOFAIL"
        st = vol.status()
        assert st["clean"] and st["health"] == "failed", st
        assert "p0 IOFAIL, p1 IOFAIL" in st["problem"], st
        _print_status({"volumes": [st]})
        first, problem = capsys.readouterr().out.splitlines()[:2]
        assert "FAILED" in first and problem.startswith("  problem: too few images"), first


@pytest.mark.allow_log(r"writing the dirty-region log failed", r"No space left on device",
                       r"lazy clean failed")
def test_a_sidecar_log_that_cannot_be_written_shows_in_status(
        vmd_factory: Callable[..., VmdDaemon], sysres: SysResources, tmp_path: Path) -> None:
    """The sidecar log's filesystem full: writes to regions not yet dirty fail
    (EIO) and status said `ok`. It says why now, and `ok` again once the log
    can be written."""
    small = tmp_path / "small"
    sysres.mount("tmpfs", small, "-t", "tmpfs", "-o", "size=256k")
    vmd = vmd_factory(volumes={"vol0": {"size": "256MiB",
                                        "plexes": ["vol0-p0.img", "vol0-p1.img"],
                                        "log": str(small / "vol0.log"),
                                        "region_size": "1MiB"}}).start()
    filler = small / "filler"
    free = os.statvfs(small).f_bavail * os.statvfs(small).f_frsize
    filler.write_bytes(b"\xa5" * free)
    fd = os.open(vmd.volume_file(), os.O_RDWR)
    try:
        with pytest.raises(OSError) as ei:
            # A record per region (shuffled: no sequential look-ahead); the
            # log's last page fills up somewhere in here.
            for r in random.Random(5).sample(range(256), 256):
                failed_at = r * MiB
                os.pwrite(fd, b"x" * 4096, failed_at)
                os.fsync(fd)  # (through the kernel's cache, the write reaches vmd here)
        assert ei.value.errno == errno.EIO
        st = vmd.status("vol0")
        assert st["health"] == "errors" and "dirty-region log cannot be written" in st["problem"], st
        assert str(small / "vol0.log") in st["problem"], st
        assert "problem: the dirty-region log" in vmd.cli("status", "vol0").stdout
        filler.unlink()
        os.pwrite(fd, b"y" * 4096, failed_at)  # its region is still to be marked dirty
        os.fsync(fd)
        assert vmd.status("vol0")["health"] == "ok"
    finally:
        os.close(fd)
    vmd.stop()


@pytest.mark.allow_log(r"volume vol0 refused: .*not mounted")
def test_a_volume_on_a_disk_fstab_lists_but_not_mounted_is_refused_not_created(
        vmd_factory: Callable[..., VmdDaemon], sysres: SysResources, tmp_path: Path) -> None:
    """The disk holding a volume's log and images, listed in fstab, is not
    mounted: with no log and no image there it looked like a first start,
    and vmd served a new, empty volume in the empty mount-point directory.
    It is refused, nothing created; mounted, `vmd start` serves the data."""
    disk = tmp_path / "disk"
    dev = sysres.make_ext4_image(tmp_path / "disk.img", 40 * MiB, disk)
    fstab = tmp_path / "fstab"
    fstab.write_text(f"# test fstab\n{dev} {disk} ext4 defaults,nofail 0 2\n"
                     f"tmpfs /tmp tmpfs defaults 0 0\n")
    spec = {"size": "16MiB", "plexes": [str(disk / "p0.img"), str(disk / "p1.img")],
            "log": str(disk / "vol0.log")}
    vmd = vmd_factory(volumes={"vol0": spec}, env={"VMD_FSTAB": str(fstab)}).start()
    data = os.urandom(MiB)
    with open(vmd.volume_file(), "r+b") as f:
        f.write(data)
        os.fsync(f.fileno())
    vmd.stop()
    sysres.umount(disk)
    assert list(disk.iterdir()) == []  # the empty mount-point directory

    vmd.start()
    err = {r["name"]: r["error"] for r in vmd.status().get("refused", [])}["vol0"]
    assert f"lies under {disk}, which /etc/fstab lists but is not mounted" in err, err
    assert list(disk.iterdir()) == [], "files were created in the mount-point directory"
    sysres.mount(dev, disk)
    vmd.cli("start", "vol0")
    with open(vmd.volume_file(), "rb") as f:
        assert f.read(len(data)) == data
    vmd.stop()


def test_fstab_mount_points_are_compared_as_the_kernel_lists_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fstab's mount points as written: `/proc/` (a trailing slash) looked
    unmounted while mounted, so new volumes under it were refused with "mount
    it"; a mount point written through a symlink was never matched, so an
    unmounted disk there went unnoticed."""
    from vmd.mountpath import FSTAB_ENV, unmounted_fstab_point  # noqa: PLC0415

    fstab = tmp_path / "fstab"
    monkeypatch.setenv(FSTAB_ENV, str(fstab))
    fstab.write_text("proc /proc/ proc defaults 0 0\n")
    assert unmounted_fstab_point("/proc/vol0.log") is None
    disk = tmp_path / "disk"  # a mount point with nothing mounted on it
    disk.mkdir()
    link = tmp_path / "data"
    link.symlink_to(disk)
    fstab.write_text(f"/dev/vmd-test-none {link} ext4 defaults,nofail 0 2\n")
    assert unmounted_fstab_point(disk / "vol0.log") == str(disk)
    assert unmounted_fstab_point(link / "vol0.log") == str(disk)
    fstab.write_text(f"/dev/vmd-test-none {disk}/ ext4 defaults,nofail 0 2\n")
    assert unmounted_fstab_point(disk / "vol0.log") == str(disk)


@pytest.mark.allow_log(r"plex p1 is IOFAIL: cannot open image .*Read-only file system",
                       r"plex p1 gets a full resync: its image could not be opened")
def test_a_plex_on_a_filesystem_gone_read_only_fails_alone_at_start(
        vmd_factory: Callable[..., VmdDaemon], sysres: SysResources, tmp_path: Path) -> None:
    """One plex's filesystem remounted read-only (ext4 errors=remount-ro)
    while the daemon was stopped: the start exited 3 ("not readable and
    writable"), every volume down. It is what a mirror is for: that plex
    opens IOFAIL, its volume and the others serve; writable again, attached."""
    disk = tmp_path / "disk2"
    sysres.make_ext4_image(tmp_path / "disk2.img", 40 * MiB, disk)
    spec = {"size": "16MiB", "plexes": ["vol0-p0.img", str(disk / "vol0-p1.img")],
            "log": "vol0.log"}
    vmd = vmd_factory(volumes={"vol0": spec, "other": volume_spec("other", size="16MiB")})
    vmd.start()
    data = os.urandom(MiB)
    with open(vmd.volume_file(), "r+b") as f:
        f.write(data)
        os.fsync(f.fileno())
    vmd.stop()
    sysres.mount("none", disk, "-o", "remount,ro")
    vmd.start()
    st = vmd.status("vol0")
    assert [p["state"] for p in st["plexes"]] == ["ACTIVE", "IOFAIL"], st
    assert "Read-only file system" in st["plexes"][1]["reason"], st
    with open(vmd.volume_file(), "rb") as f:
        assert f.read(len(data)) == data
    assert vmd.status("other")["plexes"][0]["state"] == "ACTIVE"
    sysres.mount("none", disk, "-o", "remount,rw")
    vmd.cli("plex", "attach", "vol0", "p1")
    vmd.wait_resync()
    vmd.stop()
    assert (disk / "vol0-p1.img").read_bytes()[:len(data)] == data
