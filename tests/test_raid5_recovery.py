"""RAID-5 recovery after a crash, engine level: which RAID-5 log is trusted,
stale entries against a rebuilt column, --recover-all, refusals that leak nothing."""

from __future__ import annotations

import dataclasses
import os

import pytest

from vmd.config import KiB

from enginekit import running_volume
from raid5kit import column_bytes, raid5_config, xor_all

SU = 64 * KiB


async def _crash_with_torn_parity(cfg, s: int = 3) -> bytes:
    """Write the volume, then crash after a small write to stripe `s` whose
    parity never reached the disk (random bytes there). Returns the data."""
    ref = bytearray(os.urandom(cfg.size))
    async with running_volume(cfg) as vol:
        await vol.pwrite(0, bytes(ref))
    async with running_volume(cfg, shutdown=False) as vol:
        d = os.urandom(4096)
        await vol.pwrite(s * vol.width, d)  # its DRL region is dirty at the crash
        await vol.drain()  # on the columns, not retired (the write-back cache)
        ref[s * vol.width:s * vol.width + 4096] = d
        pcol = vol.parity_col(s)
    with open(cfg.plexes[pcol], "r+b") as f:
        f.seek(s * SU)
        f.write(os.urandom(4096))
    assert any(xor_all(column_bytes(cfg)))
    return bytes(ref)


@pytest.mark.parametrize("how", ["added", "missing", "empty"])
async def test_a_raid5_log_not_in_use_before_the_crash_is_not_trusted(tmp_path, how):
    # A log added to the config after the crash holds nothing of the crashed
    # run: an empty replay proves nothing, so the dirty stripes' parity is
    # regenerated as without a log. One deleted (its disk not mounted) or
    # emptied since may have held acknowledged writes: refused, never
    # started afresh in silence; --recover-all goes on without it.
    from vmd.errors import VmdError
    from vmd.manager import open_volume

    r5log = tmp_path / "r5.r5log"
    cfg = raid5_config(tmp_path, size=2 * 8 * SU, raid5_log=None if how == "added" else r5log)
    ref = await _crash_with_torn_parity(cfg)
    if how == "missing":
        r5log.unlink()
    elif how == "empty":
        os.truncate(r5log, 0)
    cfg = dataclasses.replace(cfg, raid5_log=r5log)
    if how != "added":
        with pytest.raises(VmdError, match=f"its RAID-5 log {r5log} is {how}"):
            open_volume(cfg, tmp_path / "test.yaml")
        assert r5log.exists() == (how == "empty"), "the refusal left a file it made"
    async with running_volume(cfg, recover_all=how != "added") as vol:
        assert vol.replayed_entries == 0
        assert vol.recovered_regions == (1 if how == "added" else cfg.size // cfg.region_size)
        await vol.resync.wait_idle()
        assert await vol.pread(0, cfg.size) == ref
        in_use = vol.state.extra.get("raid5_log")
    assert not any(xor_all(column_bytes(cfg))), "parity was not regenerated"
    assert in_use == str(r5log)  # the sidecar log names it: replayed after the next crash


async def test_a_file_that_is_not_a_raid5_log_is_refused_not_overwritten(tmp_path):
    from vmd.errors import VmdError
    from vmd.manager import open_volume

    cfg = raid5_config(tmp_path, size=2 * 8 * SU)
    async with running_volume(cfg) as vol:
        await vol.pwrite(0, b"x" * 100)
    other = tmp_path / "important.txt"
    other.write_bytes(b"not a log" * 1000)
    cfg = dataclasses.replace(cfg, raid5_log=other)
    with pytest.raises(VmdError, match="important.txt: not a RAID-5 log"):
        open_volume(cfg, tmp_path / "test.yaml")
    assert other.read_bytes() == b"not a log" * 1000


@pytest.mark.parametrize("back", ["attach", "replace"])
async def test_log_entries_from_before_a_column_left_are_not_replayed_onto_its_rebuild(
        tmp_path, monkeypatch, back):
    # Entry E writes unit X on column a; a leaves; a degraded write changes
    # X (parity only); a comes back and is rebuilt (X from the others);
    # a crash before any retire would replay E's old X onto a.
    monkeypatch.setattr("vmd.raid5log.RETIRE_SECONDS", 3600)  # only the retires under test
    cfg = raid5_config(tmp_path, size=2 * 8 * SU, raid5_log=tmp_path / "r5.r5log")
    ref = bytearray(os.urandom(cfg.size))
    s = 2
    async with running_volume(cfg, shutdown=False) as vol:
        await vol.pwrite(0, bytes(ref))  # entry E, X = unit 0 of stripe s
        base = s * vol.width
        a = vol.data_col(s, 0)
        name = vol.columns[a].name
        await vol.detach_plex(name)
        x = os.urandom(SU)
        await vol.pwrite(base, x)  # degraded: only the parity learns of it
        ref[base:base + SU] = x
        path = str(tmp_path / "new.img") if back == "replace" else None
        await vol.attach_plex(name, path=path)
        await vol.resync.wait_idle()
        assert await vol.pread(0, cfg.size) == bytes(ref)
    if back == "replace":
        cfg = dataclasses.replace(cfg, plexes=tuple(path if i == a else p
                                                    for i, p in enumerate(cfg.plexes)))
    async with running_volume(cfg) as vol:
        assert await vol.pread(base, SU) == x, "a stale entry was replayed onto the column"
        assert await vol.pread(0, cfg.size) == bytes(ref)
    assert not any(xor_all(column_bytes(cfg)))


@pytest.mark.parametrize("with_log", [False, True])
async def test_recover_all_regenerates_every_stripes_parity_and_finishes(tmp_path, with_log):
    import trio

    from vmd.sidecar import ACTIVE

    cfg = raid5_config(tmp_path, size=2 * 8 * SU,
                       raid5_log=tmp_path / "r5.r5log" if with_log else None)
    ref = await _crash_with_torn_parity(cfg)
    async with running_volume(cfg, recover_all=True) as vol:
        # Every column holds its data: none is rebuilt as if it were a lost plex.
        assert await vol.pread(0, cfg.size) == ref
        with trio.fail_after(30):  # what `vmd wait` waits for
            await vol.resync.wait_idle()
        assert [p.state for p in vol.columns] == [ACTIVE] * 3
        assert not any(p.record.missing.bits.any() for p in vol.columns)
        assert await vol.pread(0, cfg.size) == ref
    assert not any(xor_all(column_bytes(cfg))), "parity was not regenerated"


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("why", ["bad log header", "log cannot be opened"])
async def test_a_refused_raid5_volume_leaves_no_file_open(tmp_path, why):
    from vmd.errors import VmdError
    from vmd.manager import open_volume

    r5log = tmp_path / "r5.r5log"
    cfg = raid5_config(tmp_path, size=2 * 8 * SU, raid5_log=r5log)
    async with running_volume(cfg, shutdown=False) as vol:
        await vol.pwrite(0, b"x" * 100)
        await vol.drain()
    if why == "bad log header":
        with open(r5log, "r+b") as f:
            f.write(b"garbage!")
        bad, expect = cfg, "bad header"
    else:
        (tmp_path / "a-directory").mkdir()  # where the log should be: cannot be opened
        bad, expect = dataclasses.replace(cfg, raid5_log=tmp_path / "a-directory"), "a-directory"
    before = _open_fds()
    for _ in range(3):
        with pytest.raises((VmdError, OSError), match=expect):
            open_volume(bad, tmp_path / "test.yaml")
    assert _open_fds() == before, "a refused volume left files open"
    if why == "bad log header":
        r5log.unlink()  # the administrator's way out (the refusal says so):
    # --recover-all, which regenerates every stripe's parity
    async with running_volume(cfg, recover_all=why == "bad log header") as vol:  # no lock left
        await vol.resync.wait_idle()
        assert await vol.pread(0, 100) == b"x" * 100


async def test_a_raid5_log_another_process_holds_is_refused(tmp_path):
    """The RAID-5 log is held (flock) like the sidecar log and the images: a
    second daemon whose config names the same file must not replay or rewind
    it under the first. A process holding it here: util-linux `flock`."""
    import subprocess

    from vmd.exclusive import InUseError
    from vmd.manager import open_volume

    r5log = tmp_path / "logs" / "r5.r5log"  # its directory is created at the first start
    cfg = raid5_config(tmp_path, size=2 * 8 * SU, raid5_log=r5log)
    async with running_volume(cfg) as vol:
        await vol.pwrite(0, b"x" * 100)
    holder = subprocess.Popen(["flock", "--exclusive", str(r5log), "sh", "-c", "echo held; cat"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(InUseError, match="RAID-5 log"):
            open_volume(cfg, tmp_path / "test.yaml")
    finally:
        holder.communicate("")
    async with running_volume(cfg) as vol:  # free again: nothing was left open or locked
        assert await vol.pread(0, 100) == b"x" * 100
