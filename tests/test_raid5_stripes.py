"""RAID-5 writes over whole stripes that start or end off them (as the
kernel's writeback cuts a sequential writer's 1 MiB writes): the whole
stripes written without reads, the partial edge stripes planned, writers
sharing an edge stripe, and a column failing during the edge reads or
before them (engine level, real image files)."""

from __future__ import annotations

import errno
import os
import random

import pytest
import trio

from vmd.config import KiB
from vmd.plex import Plex
from vmd.sidecar import ACTIVE, IOFAIL

from enginekit import running_volume
from raid5kit import FailingColumn, assert_columns_hold, raid5_config

SU = 64 * KiB


async def test_a_write_off_the_stripes_plans_only_its_partial_edge_stripes(tmp_path):
    # As the kernel's writeback cuts a sequential writer's 1 MiB writes: the
    # whole stripes between the edges are written as full stripes (no reads),
    # and each edge stripe reads only what its parity needs.
    cfg = raid5_config(tmp_path, size=2 * 32 * SU)
    ref = bytearray(os.urandom(cfg.size))
    async with running_volume(cfg) as vol:
        await vol.pwrite(0, bytes(ref))
        counts = dict(vol.method_counts)
        off, n = 3 * vol.width + 3 * SU // 2, 5 * vol.width
        data = os.urandom(n)
        await vol.pwrite(off, data)
        ref[off:off + n] = data
        got = {k: v - counts[k] for k, v in vol.method_counts.items()}
        assert got == {"full": 4, "rmw": 0, "rcw": 2, "degraded": 0}, got
        assert await vol.pread(0, cfg.size) == bytes(ref)
    assert_columns_hold(cfg, ref)


@pytest.mark.allow_log(r"plex c\d .* is now IOFAIL", r"injected read error")
async def test_an_edge_read_failing_under_a_write_of_whole_stripes_writes_it_degraded(
        tmp_path, monkeypatch):
    # The whole-stripe path reads the edge stripes first; a column failing
    # there is failed and the write planned again without it (degraded), so
    # nothing was half written and everything reads back after the rebuild.
    monkeypatch.setattr(FailingColumn, "fail", None)
    cfg = raid5_config(tmp_path, size=2 * 32 * SU)
    ref = bytearray(os.urandom(cfg.size))
    async with running_volume(cfg, plex_factory=FailingColumn) as vol:
        await vol.pwrite(0, bytes(ref))
        off, n = 2 * vol.width + SU // 2, 3 * vol.width
        # Reconstruct-write of the head stripe reads its other data unit.
        head = off // vol.width
        other = vol.data_col(head, 0)  # unit 1 is all new: unit 0's rest is read
        FailingColumn.fail = (vol.columns[other].name, "read")
        data = os.urandom(n)
        await vol.pwrite(off, data)
        ref[off:off + n] = data
        FailingColumn.fail = None
        assert vol.columns[other].state == IOFAIL
        assert vol.method_counts["degraded"] > 0
        assert await vol.pread(0, cfg.size) == bytes(ref)
        await vol.attach_plex(vol.columns[other].name)
        with trio.fail_after(30):
            await vol.resync.wait_idle()
        assert await vol.pread(0, cfg.size) == bytes(ref)
    assert_columns_hold(cfg, ref)


@pytest.mark.parametrize("ncol", [3, 4, 5])
@pytest.mark.parametrize("r5log", [False, True])
async def test_writes_sharing_edge_stripes_from_several_tasks(tmp_path, ncol, r5log):
    # Neighbouring tasks own ranges whose boundaries are off the stripes, so
    # their writes share edge stripes (the range lock orders them); reads in
    # between see every write before them. From review 13.
    su = 16 * KiB
    cfg = raid5_config(tmp_path, ncol=ncol, stripe_unit=su, size=(ncol - 1) * su * 96,
                       **({"raid5_log": tmp_path / "r5.r5log"} if r5log else {}))
    rnd = random.Random(ncol * 10 + r5log)
    ref = bytearray(rnd.randbytes(cfg.size))
    async with running_volume(cfg) as vol:
        await vol.pwrite(0, bytes(ref))
        width = vol.width
        bounds = [0] + sorted(rnd.sample(range(1, cfg.size // 512), 7)) + [cfg.size // 512]
        bounds = [b * 512 for b in bounds]

        async def writer(t: int) -> None:
            r = random.Random(t)
            lo, hi = bounds[t], bounds[t + 1]
            for _ in range(40):
                if hi - lo < 512:
                    return
                n = min(hi - lo, r.choice([width, width + 512, 2 * width + 4096, 3 * width - 512,
                                           r.randint(1, 4) * width + r.randrange(0, width, 512)]))
                off = r.randrange(lo, hi - n + 1) // 512 * 512
                n = min(n, hi - off)
                data = r.randbytes(n)
                await vol.pwrite(off, data)
                ref[off:off + n] = data
                if r.random() < 0.3:
                    assert await vol.pread(lo, hi - lo) == bytes(ref[lo:hi])
                await trio.sleep(0)

        async with trio.open_nursery() as nursery:
            for t in range(len(bounds) - 1):
                nursery.start_soon(writer, t)
        assert vol.method_counts["full"] > 0 and vol.method_counts["rcw"] > 0
        assert await vol.pread(0, cfg.size) == bytes(ref)
    assert_columns_hold(cfg, ref)


class GatedRead(Plex):
    """Reads wait for `gate` once `entered` is set (class-wide, per test)."""

    gate: trio.Event | None = None
    entered: trio.Event | None = None

    async def pread(self, off, size, **kw):
        if GatedRead.gate is not None and GatedRead.entered is not None:
            GatedRead.entered.set()
            await GatedRead.gate.wait()
        return await super().pread(off, size, **kw)


@pytest.mark.allow_log(r"plex c\d .* is now IOFAIL")
@pytest.mark.parametrize("r5log", [False, True])
async def test_a_column_failing_while_the_edges_are_read_sends_the_write_to_the_plan(
        tmp_path, monkeypatch, r5log):
    # Another request fails a column while this write waits for its edge
    # reads: the whole stripes must not be written as if every column were
    # in; the write is planned again, degraded, and counted once. From
    # review 13.
    su = 16 * KiB
    cfg = raid5_config(tmp_path, ncol=3, stripe_unit=su, size=2 * su * 32,
                       **({"raid5_log": tmp_path / "r5.r5log"} if r5log else {}))
    rnd = random.Random(1)
    ref = bytearray(rnd.randbytes(cfg.size))
    async with running_volume(cfg, plex_factory=GatedRead) as vol:
        await vol.pwrite(0, bytes(ref))
        await vol.flush()
        counts = dict(vol.method_counts)
        off, n = 3 * vol.width + 4096, 4 * vol.width
        data = rnd.randbytes(n)
        monkeypatch.setattr(GatedRead, "gate", trio.Event())
        monkeypatch.setattr(GatedRead, "entered", trio.Event())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(vol.pwrite, off, data)
            await GatedRead.entered.wait()
            victim = vol.columns[2]
            GatedRead.entered = None
            await vol.fail_plex(victim, OSError(errno.EIO, "injected"), 0, 0)
            GatedRead.gate.set()
        GatedRead.gate = None
        ref[off:off + n] = data
        assert victim.state == IOFAIL
        got = {k: v - counts[k] for k, v in vol.method_counts.items()}
        assert got["full"] == 0 and got["rcw"] == 0 and got["degraded"] > 0, got
        assert await vol.pread(0, cfg.size) == bytes(ref)
        await vol.attach_plex(victim.name)
        with trio.fail_after(30):
            await vol.resync.wait_idle()
        assert victim.state == ACTIVE
        assert await vol.pread(0, cfg.size) == bytes(ref)
    assert_columns_hold(cfg, ref)
