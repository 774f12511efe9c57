"""A resync keeps the disk busy alone (vmd/resync.py): it copies several
chunks at once (one at a time under a rate limit), and starts its targets'
writeback as it copies, so that a progress commit's fdatasync has little left
to write; the commit still makes the copy durable before it is recorded
(tests/test_crash.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from enginekit import plex_bytes, running_volume, volume_config
from vmd import resync
from vmd.config import MiB
from vmd.plex import Plex
from vmd.resync import Resync


def test_libc_has_sync_file_range() -> None:
    assert resync._sync_file_range is not None, "no early writeback on this system"


async def test_full_resync_starts_writeback_of_its_targets_as_it_copies(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vc = volume_config(tmp_path, size=64 * MiB)
    data = os.urandom(vc.size)
    vc.plexes[0].write_bytes(data)
    vc.plexes[1].write_bytes(bytes(vc.size))
    started: list[list[str]] = []
    real = resync.start_writeback

    async def spy(plexes: list[Plex]) -> Any:
        started.append([p.name for p in plexes])
        await real(plexes)

    monkeypatch.setattr(resync, "start_writeback", spy)
    async with running_volume(vc, recover_all=True, recover_from="p0") as vol:
        await vol.resync.wait_idle()
        assert vol.resync.copied_bytes == vc.size
    # Once per WRITEBACK_BYTES copied, less if a commit (every 2 s) came between.
    assert 1 <= len(started) <= vc.size // resync.WRITEBACK_BYTES, started
    assert all(names == ["p1"] for names in started), started
    p0, p1 = plex_bytes(vc.plexes)
    assert p0 == p1 == data


@pytest.mark.parametrize("rate_limit", [0, 64 * MiB])
async def test_chunks_are_copied_in_parallel_unless_rate_limited(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rate_limit: int) -> None:
    vc = volume_config(tmp_path, size=64 * MiB)
    data = os.urandom(vc.size)
    vc.plexes[0].write_bytes(data)
    vc.plexes[1].write_bytes(bytes(vc.size))
    now = most = 0
    real = Resync._copy_chunk

    async def counted(self: Resync, off: int, length: int) -> Any:
        nonlocal now, most
        now += 1
        most = max(most, now)
        try:
            return await real(self, off, length)
        finally:
            now -= 1

    monkeypatch.setattr(Resync, "_copy_chunk", counted)
    async with running_volume(vc, recover_all=True, recover_from="p0", rate_limit=rate_limit) as vol:
        await vol.resync.wait_idle()
    assert most == (1 if rate_limit else resync.COPIES), most
    p0, p1 = plex_bytes(vc.plexes)
    assert p0 == p1 == data
