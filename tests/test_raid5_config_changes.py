"""A RAID-5 volume started with a config that changed since its sidecar log was
written (engine level): its layout (stripe unit, columns, their order, mirror
or raid5) is refused, never served with the wrong placement; its RAID-5 log
moved, renamed or dropped after an unclean stop is replayed when it is
recognised as this volume's and refused otherwise, never emptied."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from vmd.config import KiB, MiB, VolumeConfig
from vmd.errors import VmdError
from vmd.manager import open_volume
from vmd.raid5log_format import read_owner
from vmd.sidecar import _header_bytes, read_log, read_log_header

from enginekit import running_volume, volume_config
from raid5kit import raid5_config


def _forget_layout(log: Path) -> None:
    """Make `log` look written by a vmd that recorded no layout (its header
    without layout, stripe_unit and columns)."""
    state = read_log(log)[0].state
    state.layout = state.stripe_unit = state.columns = None
    with open(log, "r+b") as f:
        f.write(_header_bytes(state))


def _refused(cfg: VolumeConfig, *match: str) -> str:
    with pytest.raises(VmdError) as e:
        open_volume(cfg, cfg.log.parent / "test.yaml")
    for m in match:
        assert m in str(e.value), str(e.value)
    return str(e.value)


async def _written(cfg: VolumeConfig, n: int = 1 * MiB) -> bytes:
    data = os.urandom(n)
    async with running_volume(cfg) as vol:
        await vol.pwrite(0, data)
    return data


async def _still_serves(cfg: VolumeConfig, data: bytes) -> None:
    async with running_volume(cfg) as vol:
        assert await vol.pread(0, len(data)) == data


# -- the layout --------------------------------------------------------------

async def test_stripe_unit_changed_in_the_config_is_refused(tmp_path):
    # The column size (size / (columns - 1)) is the same: nothing about the
    # images gives it away, and every unit past the first would be misread.
    cfg = raid5_config(tmp_path, stripe_unit=64 * KiB)
    data = await _written(cfg)
    changed = dataclasses.replace(cfg, stripe_unit=128 * KiB, fastresync_region=128 * KiB)
    _refused(changed, "volumes.r5.stripe_unit is 131072 (128KiB)", "records 65536 (64KiB)",
             "Put the recorded value back")
    await _still_serves(cfg, data)
    assert read_log_header(cfg.log).stripe_unit == 64 * KiB


async def test_column_count_changed_in_the_config_is_refused(tmp_path):
    # 3 MiB is a whole number of stripes of 3 columns and of 4.
    cfg = raid5_config(tmp_path, size=3 * MiB)
    data = await _written(cfg)
    more = dataclasses.replace(cfg, plexes=(*cfg.plexes, tmp_path / "r5-c3.img"))
    _refused(more, "volumes.r5.columns is 4 columns", "records 3 columns", "cannot reshape")
    await _still_serves(cfg, data)


async def test_mirror_turned_raid5_in_the_config_is_refused_naming_the_layout(tmp_path):
    mirror = volume_config(tmp_path, name="v", size=8 * MiB, nplex=3)
    await _written(mirror)
    # Size doubled so that the column size matches the images: only the
    # recorded layout tells.
    r5 = dataclasses.replace(mirror, layout="raid5", size=16 * MiB, stripe_unit=64 * KiB)
    _refused(r5, "volumes.v.layout is raid5", "records mirror")


async def test_raid5_columns_reordered_in_the_config_are_refused(tmp_path):
    cfg = raid5_config(tmp_path)
    data = await _written(cfg)
    swapped = dataclasses.replace(cfg, plexes=(cfg.plexes[1], cfg.plexes[0], cfg.plexes[2]))
    _refused(swapped, "volumes.r5.columns lists the recorded columns in another order",
             "list them as " + ", ".join(str(p) for p in cfg.plexes))
    await _still_serves(cfg, data)


async def test_mirror_plexes_reordered_in_the_config_are_still_accepted(tmp_path):
    cfg = volume_config(tmp_path, nplex=3)
    data = await _written(cfg)
    await _still_serves(dataclasses.replace(cfg, plexes=cfg.plexes[::-1]), data)


async def test_a_log_without_layout_takes_the_configs_once(tmp_path):
    cfg = raid5_config(tmp_path)
    data = await _written(cfg)
    _forget_layout(cfg.log)
    await _still_serves(cfg, data)
    h = read_log_header(cfg.log)
    assert (h.layout, h.stripe_unit, h.columns) == ("raid5", 64 * KiB, 3)
    # Recorded now: a later change is refused like any other.
    _refused(dataclasses.replace(cfg, stripe_unit=128 * KiB, fastresync_region=128 * KiB),
             "volumes.r5.stripe_unit")


async def test_a_log_without_layout_refuses_a_stripe_unit_other_than_its_fmr_region(tmp_path):
    # A RAID-5 volume's FastResync region is its stripe unit: an old log
    # whose region differs from the config's stripe unit proves it changed.
    cfg = raid5_config(tmp_path)
    data = await _written(cfg)
    _forget_layout(cfg.log)
    _refused(dataclasses.replace(cfg, stripe_unit=128 * KiB, fastresync_region=128 * KiB),
             "volumes.r5.stripe_unit is 131072 (128KiB)",
             "FastResync region of 65536 (64KiB)", "Put `stripe_unit: 64KiB` back")
    assert read_log_header(cfg.log).layout is None  # nothing recorded by a refusal
    await _still_serves(cfg, data)


async def test_a_mirror_log_without_layout_still_starts(tmp_path):
    cfg = volume_config(tmp_path)
    data = await _written(cfg)
    _forget_layout(cfg.log)
    await _still_serves(cfg, data)
    assert read_log_header(cfg.log).layout == "mirror"


# -- the RAID-5 log after an unclean stop ------------------------------------

async def _crash_with_writes_only_in_the_raid5_log(tmp_path: Path, monkeypatch
                                                   ) -> tuple[VolumeConfig, bytes]:
    """A crash whose fsynced writes are in the RAID-5 log only: the columns
    emptied, as in test_raid5.py::test_crash_with_log_replays_before_serving_and_parity_matches."""
    monkeypatch.setattr("vmd.raid5log.RETIRE_SECONDS", 3600)  # no idle retire
    cfg = raid5_config(tmp_path, raid5_log=tmp_path / "r5.r5log")
    data = os.urandom(256 * KiB)
    async with running_volume(cfg, shutdown=False) as vol:
        await vol.pwrite(0, data)
        await vol.user_sync()  # an fsync: acknowledged durable (invariant 9)
        await vol.drain()
        assert vol.r5log.seq > vol.r5log.retired
        for p in vol.columns:
            os.ftruncate(p.fd, 0)
            os.ftruncate(p.fd, vol.column_size)
    return cfg, data


async def test_raid5_log_moved_with_the_config_after_a_crash_is_replayed(tmp_path, monkeypatch):
    cfg, data = await _crash_with_writes_only_in_the_raid5_log(tmp_path, monkeypatch)
    moved = tmp_path / "elsewhere" / "moved.r5log"
    moved.parent.mkdir()
    os.rename(cfg.raid5_log, moved)
    changed = dataclasses.replace(cfg, raid5_log=moved)
    async with running_volume(changed) as vol:
        assert vol.replayed_entries > 0
        assert await vol.pread(0, len(data)) == data
        assert vol.state.extra["raid5_log"] == str(moved)


async def test_an_old_raid5_log_moved_after_a_crash_is_refused_and_kept(tmp_path, monkeypatch):
    # A log from before vmd wrote the volume's uuid into it cannot be told
    # from another file: refused, untouched.
    cfg, data = await _crash_with_writes_only_in_the_raid5_log(tmp_path, monkeypatch)
    with open(cfg.raid5_log, "r+b") as f:
        f.seek(20)
        f.write(bytes(20))
    moved = tmp_path / "moved.r5log"
    os.rename(cfg.raid5_log, moved)
    before = moved.read_bytes()
    _refused(dataclasses.replace(cfg, raid5_log=moved),
             f"its RAID-5 log {cfg.raid5_log} may hold acknowledged writes",
             f"the config names {moved}, whose header does not name this volume",
             f"Make volumes.r5.raid5_log name {cfg.raid5_log} again")
    assert moved.read_bytes() == before
    os.rename(moved, cfg.raid5_log)  # what the message says
    await _still_serves(cfg, data)


@pytest.mark.parametrize("how", ["removed", "renamed"])
async def test_raid5_log_dropped_from_the_config_after_a_crash_is_refused(tmp_path, monkeypatch,
                                                                          how):
    # removed: no raid5_log any more; renamed: the config names a new path,
    # the file stayed where it was.
    cfg, data = await _crash_with_writes_only_in_the_raid5_log(tmp_path, monkeypatch)
    before = cfg.raid5_log.read_bytes()
    new = None if how == "removed" else tmp_path / "new.r5log"
    _refused(dataclasses.replace(cfg, raid5_log=new),
             "was not stopped cleanly and its RAID-5 log",
             "the config has no raid5_log" if new is None else f"{new}, a new, empty file",
             "vmd will not discard them")
    assert cfg.raid5_log.read_bytes() == before
    await _still_serves(cfg, data)  # the config put back: replayed


async def test_another_volumes_raid5_log_is_refused_never_emptied(tmp_path, monkeypatch):
    cfg, data = await _crash_with_writes_only_in_the_raid5_log(tmp_path, monkeypatch)
    other = raid5_config(tmp_path, name="o", raid5_log=tmp_path / "o.r5log")
    async with running_volume(other) as vol:
        await vol.pwrite(0, b"o" * 4096)
        other_uuid = vol.state.uuid
    before = other.raid5_log.read_bytes()
    assert read_owner(before) == other_uuid
    msg = _refused(dataclasses.replace(cfg, raid5_log=other.raid5_log),
                   f"{other.raid5_log} (volumes.r5.raid5_log) is the RAID-5 log of another "
                   f"volume (uuid {other_uuid}")
    assert "neither replays nor empties it" in msg
    assert other.raid5_log.read_bytes() == before
    await _still_serves(cfg, data)


@pytest.mark.parametrize("how", ["moved", "removed"])
async def test_raid5_log_moved_or_removed_after_a_clean_stop_is_fine(tmp_path, how):
    cfg = raid5_config(tmp_path, raid5_log=tmp_path / "r5.r5log")
    data = await _written(cfg)
    moved = tmp_path / "moved.r5log"
    if how == "moved":
        os.rename(cfg.raid5_log, moved)
    changed = dataclasses.replace(cfg, raid5_log=moved if how == "moved" else None)
    await _still_serves(changed, data)


# -- the daemon --------------------------------------------------------------

def test_daemon_refuses_a_changed_stripe_unit_and_serves_once_it_is_put_back(
        vmd_factory, allow_log):
    import json

    from conftest import sha
    from raid5kit import raid5_spec

    allow_log(r"volume r5 refused: ")
    d = vmd_factory(volumes={"r5": raid5_spec("r5", size="4MiB")})
    d.start()
    with open(d.volume_file("r5"), "r+b") as f:
        f.write(os.urandom(1 * MiB))
    expect = sha(d.volume_file("r5"))
    d.stop()
    info = json.loads(d.cli("inspect-log", str(d.log_path("r5")), config=False).stdout)
    assert (info["layout"], info["stripe_unit"], info["columns"]) == ("raid5", 64 * KiB, 3)
    d.config["volumes"]["r5"]["stripe_unit"] = "128KiB"
    d.write_config()
    d.start()
    refused = {r["name"]: r["error"] for r in d.request({"cmd": "status"})["refused"]}
    assert "volumes.r5.stripe_unit is 131072 (128KiB)" in refused["r5"], refused
    d.config["volumes"]["r5"]["stripe_unit"] = "64KiB"
    d.write_config()
    d.cli("--timeout", "60", "start", "r5")
    assert sha(d.volume_file("r5")) == expect
    d.stop()


async def test_recover_all_without_a_checkpoint_keeps_its_raid5_log_as_its_own(tmp_path,
                                                                              monkeypatch):
    # The rebuilt sidecar log keeps the volume's uuid (its header is whole):
    # its RAID-5 log is not taken for another volume's.
    cfg, _ = await _crash_with_writes_only_in_the_raid5_log(tmp_path, monkeypatch)
    uuid = read_log_header(cfg.log).uuid
    os.truncate(cfg.log, 4096)  # the header only: no checkpoint to salvage
    async with running_volume(cfg, recover_all=True) as vol:
        assert vol.state.uuid == uuid
