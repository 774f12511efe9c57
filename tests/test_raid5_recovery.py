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
        ref[s * vol.width:s * vol.width + 4096] = d
        pcol = vol.parity_col(s)
    with open(cfg.plexes[pcol], "r+b") as f:
        f.seek(s * SU)
        f.write(os.urandom(4096))
    assert any(xor_all(column_bytes(cfg)))
    return bytes(ref)


@pytest.mark.parametrize("how", ["added", "missing", "empty"])
async def test_a_raid5_log_not_in_use_before_the_crash_is_not_trusted(tmp_path, how):
    # A log added to the config after the crash, or one deleted or emptied
    # since, holds nothing of the crashed run: an empty replay proves
    # nothing, so the dirty stripes' parity is regenerated as without a log.
    r5log = tmp_path / "r5.r5log"
    cfg = raid5_config(tmp_path, size=2 * 8 * SU, raid5_log=None if how == "added" else r5log)
    ref = await _crash_with_torn_parity(cfg)
    if how == "missing":
        r5log.unlink()
    elif how == "empty":
        os.truncate(r5log, 0)
    cfg = dataclasses.replace(cfg, raid5_log=r5log)
    async with running_volume(cfg) as vol:
        assert vol.replayed_entries == 0
        assert vol.recovered_regions == 1
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
