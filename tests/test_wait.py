"""`vmd wait` says what is true: a resync or rebuild whose target failed
(ENOSPC on a real, too small filesystem) is reported as failed, with a
non-zero exit, and stops once it has no live target; a wait that saw no pass
does not repeat the last one's figures. Plus two refusals that name the
real reason (`start --force-degraded` of a mirror, `plex replace` onto a URI)."""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import MiB, SysResources, VmdDaemon
from daemonkit import volume_spec
from raid5kit import raid5_spec
from vmd.errors import EXIT_ERROR, EXIT_NOT_REDUNDANT

pytestmark = pytest.mark.mount

ENOSPC_LOG = (r"plex \w+ .* is now IOFAIL", r"gets a full rebuild", r"No space left on device", r"rebuild of column",
              r"resync of .* failed")


def _fill(volume_file: Path, size: int, seed: int) -> None:
    """Random bytes over the first `size` bytes of a volume, fsynced."""
    fd = os.open(volume_file, os.O_RDWR)
    try:
        rng = random.Random(seed)
        for off in range(0, size, 4 * MiB):
            os.pwrite(fd, rng.randbytes(4 * MiB), off)
        os.fsync(fd)
    finally:
        os.close(fd)


def _small_fs(sysres: SysResources, tmp_path: Path, size: int = 16 * MiB) -> Path:
    small = tmp_path / "small"
    sysres.make_ext4_image(tmp_path / "small.img", size, small)
    return small


@pytest.mark.allow_log(*ENOSPC_LOG)
def test_raid5_replace_onto_a_full_fs_fails_wait_and_the_rebuild_stops(
        vmd_factory: Callable[..., VmdDaemon], sysres: SysResources, tmp_path: Path) -> None:
    # 96 MiB columns; the new one's filesystem holds 16 MiB of them.
    size = 192 * MiB
    vmd = vmd_factory(volumes={"r5": raid5_spec(size="192MiB", stripe_unit="64KiB")}).start()
    # Data to rebuild: where the other columns hold none, the rebuild punches
    # holes and needs no room.
    _fill(vmd.volume_file("r5"), 96 * MiB, seed=4)
    small = _small_fs(sysres, tmp_path)
    vmd.cli("plex", "detach", "r5", "c2")
    vmd.cli("plex", "replace", "r5", "c2", str(small / "new-c2.img"))
    p = vmd.cli("wait", "r5", check=False)
    assert p.returncode == EXIT_ERROR, (p.returncode, p.stdout, p.stderr)
    said = p.stdout + p.stderr
    assert "in sync" not in said, said
    assert "c2" in said and "No space left on device" in said, said
    st = vmd.status("r5")
    assert {c["name"]: c["state"] for c in st["plexes"]}["c2"] == "IOFAIL", st
    rs = st["resync"]
    assert list(rs["failed"]) == ["c2"], rs
    assert rs["copied_bytes"] == 0, rs  # nothing reached a column that is still there
    # It stopped soon after c2 failed (16 MiB of the column, a few runs in
    # flight), not after rebuilding every stripe onto nothing.
    assert rs["done_bytes"] < size // 2, rs


@pytest.mark.allow_log(*ENOSPC_LOG)
def test_mirror_add_onto_a_full_fs_fails_wait(
        vmd_factory: Callable[..., VmdDaemon], sysres: SysResources, tmp_path: Path) -> None:
    vmd = vmd_factory(volumes={"vol0": volume_spec(size="64MiB")}).start()
    _fill(vmd.volume_file(), 48 * MiB, seed=3)
    small = _small_fs(sysres, tmp_path)
    vmd.cli("plex", "add", "vol0", str(small / "vol0-p2.img"))
    p = vmd.cli("wait", "vol0", check=False)
    assert p.returncode == EXIT_ERROR, (p.returncode, p.stdout, p.stderr)
    said = p.stdout + p.stderr
    assert "in sync" not in said and "p2" in said and "No space left on device" in said, said
    rs = vmd.status("vol0")["resync"]
    assert list(rs["failed"]) == ["p2"] and rs["copied_bytes"] == 0, rs


def test_wait_that_saw_no_pass_does_not_repeat_the_last(
        vmd_factory: Callable[..., VmdDaemon]) -> None:
    vmd = vmd_factory(volumes={"vol0": volume_spec(size="16MiB")}).start()
    vmd.cli("plex", "detach", "vol0", "p1")
    fd = os.open(vmd.volume_file(), os.O_RDWR)
    try:
        os.pwrite(fd, b"x" * MiB, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    vmd.cli("plex", "attach", "vol0", "p1")
    vmd.wait_resync()
    out = vmd.cli("wait", "vol0").stdout
    assert out == "vol0: in sync\n", out


def test_wait_names_a_plex_that_is_out_instead_of_saying_in_sync(
        vmd_factory: Callable[..., VmdDaemon]) -> None:
    """A detached plex (an attach refused, or not tried yet): `vmd wait` said
    "in sync", which an administrator reads as redundant again."""
    vmd = vmd_factory(volumes={"vol0": volume_spec(size="16MiB")}).start()
    vmd.cli("plex", "detach", "vol0", "p1")
    # And exits 5 (not 1: no resync failed): `vmd plex replace … && vmd wait …`
    # goes on only once the volume is redundant again (trial 9, F3: it exited 0).
    p = vmd.cli("wait", "vol0", check=False)
    assert p.returncode == EXIT_NOT_REDUNDANT, (p.returncode, p.stdout, p.stderr)
    assert "in sync" not in p.stdout + p.stderr, (p.stdout, p.stderr)
    assert "not redundant in full: p1 is DETACHED" in p.stderr, p.stderr
    # And status says so to a monitor (it said health "ok").
    st = vmd.status("vol0")
    assert st["health"] == "degraded", st
    assert st["problem"].startswith("not redundant in full: plex p1 is DETACHED (detached by "
                                    "the administrator"), st["problem"]
    assert "DEGRADED" in vmd.cli("status").stdout.splitlines()[0]
    vmd.cli("plex", "attach", "vol0", "p1")
    vmd.wait_resync()
    assert vmd.cli("wait", "vol0").stdout == "vol0: in sync\n"
    assert vmd.status("vol0")["health"] == "ok"


def test_start_force_degraded_of_a_mirror_is_refused(vmd_factory: Callable[..., VmdDaemon]) -> None:
    vmd = vmd_factory(volumes={"vol0": volume_spec(size="16MiB")}).start()
    vmd.config["volumes"]["m1"] = volume_spec("m1", size="16MiB")  # added to the config since
    vmd.write_config()
    p = vmd.cli("start", "m1", "--force-degraded", check=False)
    assert p.returncode == EXIT_ERROR, (p.returncode, p.stdout, p.stderr)
    assert "--force-degraded applies to RAID-5 volumes only" in p.stderr, p.stderr
    assert "m1" not in {v["name"] for v in vmd.status()["volumes"]}  # nothing changed
    vmd.cli("start", "m1")
    vmd.stop()
    # The daemon's own option too (it was ignored there).
    vmd.daemon_args = ("--force-degraded", "vol0")
    p = vmd.cli("daemon", *vmd.daemon_args, check=False, timeout=30)
    assert p.returncode == EXIT_ERROR, (p.returncode, p.stdout, p.stderr)
    assert "--force-degraded applies to RAID-5 volumes only; volume vol0 is a mirror" in p.stderr


def test_raid5_replace_onto_a_uri_says_remote_columns_are_not_supported(
        vmd_factory: Callable[..., VmdDaemon]) -> None:
    vmd = vmd_factory(volumes={"r5": raid5_spec()}).start()
    vmd.cli("plex", "detach", "r5", "c2")
    p = vmd.cli("plex", "replace", "r5", "c2", "nbd://127.0.0.1:10963/m1r", check=False)
    assert p.returncode == EXIT_ERROR, (p.returncode, p.stdout, p.stderr)
    assert "remote" in p.stderr and "nbd:/127" not in p.stderr, p.stderr


@pytest.mark.allow_log(r"column c2 .* is now IOFAIL", r"gets a full rebuild", r"No space left")
async def test_a_rebuild_stops_once_its_only_target_failed(tmp_path: Path, monkeypatch) -> None:
    # Engine level: the new column's write fails at its second run; the
    # rebuild must not go on through the other 30 runs of the volume.
    from enginekit import running_volume
    from raid5kit import raid5_config
    from vmd.plex import PlexIOError
    from vmd.raid5_rebuild import Rebuild
    from vmd.sidecar import IOFAIL

    calls = {"copy": 0}
    copy_chunk, rebuild_run = Rebuild._copy_chunk, Rebuild._rebuild_run

    async def counted(self, off, length):  # type: ignore[no-untyped-def]
        calls["copy"] += 1
        return await copy_chunk(self, off, length)

    async def full(self, target, sources, at, n):  # type: ignore[no-untyped-def]
        if at >= 2 * MiB:
            raise PlexIOError(target, "write", at, OSError(errno.ENOSPC, "No space left on device"))
        await rebuild_run(self, target, sources, at, n)

    monkeypatch.setattr(Rebuild, "_copy_chunk", counted)
    monkeypatch.setattr(Rebuild, "_rebuild_run", full)
    cfg = raid5_config(tmp_path, size=128 * MiB)
    async with running_volume(cfg) as vol:
        await vol.detach_plex("c2")
        calls["copy"] = 0
        await vol.attach_plex("c2", path=str(tmp_path / "new-c2.img"))
        await vol.resync.wait_idle()
        assert vol.columns[2].state == IOFAIL
        rs = vol.resync.status()
    assert list(rs["failed"]) == ["c2"] and rs["copied_bytes"] == 0, rs
    # 32 runs of 4 MiB; the failure comes at the second, 8 are copied at once.
    assert calls["copy"] <= 2 + 2 * vol.resync.copies, calls
