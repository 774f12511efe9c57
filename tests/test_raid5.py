"""RAID-5 engine without FUSE: placement, write methods, degraded service, rebuild."""

from __future__ import annotations

import errno
import os
import random

import pytest
import trio
from trio.testing import wait_all_tasks_blocked

from vmd.config import KiB, MiB
from vmd.errors import VmdError
from vmd.sidecar import ACTIVE, DETACHED, IOFAIL, SYNCING
from vmd.uring import Ring

from enginekit import evict_page_cache, in_page_cache, running_volume
from raid5kit import (FailingColumn, assert_columns_hold, column_bytes, decode, raid5_config,
                      xor_all)

SU = 64 * KiB


async def random_io(vol, ref: bytearray, n: int, seed: int, max_len: int = 300 * KiB) -> None:
    rnd = random.Random(seed)
    for _ in range(n):
        length = rnd.choice([rnd.randint(1, 9000), rnd.randint(1, max_len), 4096])
        off = rnd.randrange(0, vol.size - length)
        data = rnd.randbytes(length)
        assert await vol.pwrite(off, data) == length
        ref[off:off + length] = data


@pytest.mark.parametrize("ncol", [3, 4, 5])
async def test_placement_matches_an_independent_left_symmetric_decoder(tmp_path, ncol):
    cfg = raid5_config(tmp_path, ncol=ncol, size=(ncol - 1) * 24 * SU)
    ref = bytearray(cfg.size)
    async with running_volume(cfg) as vol:
        await random_io(vol, ref, 60, seed=ncol)
        # Aligned full stripes, and one write covering everything.
        whole = os.urandom(cfg.size)
        assert await vol.pwrite(0, whole[:3 * vol.width]) == 3 * vol.width
        ref[:3 * vol.width] = whole[:3 * vol.width]
        assert await vol.pread(0, cfg.size) == bytes(ref)
        methods = dict(vol.method_counts)
    cols = column_bytes(cfg)
    assert all(len(c) == cfg.size // (ncol - 1) for c in cols)
    assert decode(cols, SU) == bytes(ref)
    assert not any(xor_all(cols)), "the XOR of all columns is not zero after a clean stop"
    assert methods["full"] and methods["rmw"] and methods["rcw"], methods


async def test_full_stripe_write_reads_nothing(tmp_path):
    cfg = raid5_config(tmp_path)
    async with running_volume(cfg) as vol:
        before = [p.reads for p in vol.columns]
        await vol.pwrite(vol.width, os.urandom(4 * vol.width))
        assert [p.reads for p in vol.columns] == before
        assert vol.method_counts == {"full": 4, "rmw": 0, "rcw": 0, "degraded": 0}


async def test_small_write_is_read_modify_write_of_two_columns(tmp_path):
    cfg = raid5_config(tmp_path, ncol=5)
    async with running_volume(cfg) as vol:
        before = [p.reads for p in vol.columns]
        await vol.pwrite(5 * vol.width + 4096, os.urandom(4096))
        got = [p.reads - b for p, b in zip(vol.columns, before)]
        assert sum(got) == 2, got  # old data and old parity, not the other 3 units
        assert vol.method_counts["rmw"] == 1


@pytest.mark.parametrize("ncol, su", [(3, SU), (5, SU), (3, 1 * MiB)])
async def test_a_small_write_on_a_cold_stripe_reads_its_unit_ahead(tmp_path, ncol, su):
    """A small write reads what it needs of the other columns (reconstruct-
    or read-modify-write). In a stripe that had a small write lately, where
    the page cache lacks it, the unit around it is read ahead (64 KiB of it
    at most), so that the stripe's next small writes read from the cache; a
    stripe's first small write reads only what it needs."""
    cfg = raid5_config(tmp_path, ncol=ncol, size=(ncol - 1) * 16 * su, stripe_unit=su)
    ref = bytearray(os.urandom(cfg.size))
    async with running_volume(cfg) as vol:
        ring = Ring.get()
        await vol.pwrite(0, bytes(ref))
        await vol.flush()
        paths = [p.record.path for p in vol.columns]
        evict_page_cache(paths)
        s = 5
        read = ([vol.data_col(s, 1)] if ncol == 3  # reconstruct-write: the other unit
                else [vol.data_col(s, 0), vol.parity_col(s)])  # the old data and parity
        window = 64 * KiB
        assert not any(in_page_cache(paths[c], s * su, window) for c in read), \
            "the columns are still in the page cache: the test would say nothing"
        for i, at in enumerate((8 * KiB, 20 * KiB, 0, window - 4 * KiB)):
            waited = ring.reads_waited if ring is not None else 0
            off = s * vol.width + at
            data = os.urandom(4096)
            await vol.pwrite(off, data)
            ref[off:off + 4096] = data
            if i == 0:
                assert not any(in_page_cache(paths[c], s * su + 32 * KiB, 32 * KiB)
                               for c in read), "a stripe's first small write read ahead"
            elif i == 1:
                with trio.fail_after(30):  # the read ahead is the kernel's, asynchronous
                    while not all(in_page_cache(paths[c], s * su, window) for c in read):
                        await trio.sleep(0.01)
            elif ring is not None:
                assert ring.reads_waited == waited, "a write in the stripe waited for a disk read"
        if su > window:
            assert not any(in_page_cache(paths[c], s * su + su // 2, window) for c in read), \
                "read ahead more than its window of a big unit"
        assert vol.method_counts["rcw" if ncol == 3 else "rmw"] == 4
        assert await vol.pread(0, cfg.size) == bytes(ref)
    assert_columns_hold(cfg, ref)


async def test_a_failing_read_ahead_of_the_edges_fails_no_write(tmp_path, monkeypatch):
    """ReadAhead._prefetch (vmd/raid5_ahead.py) is a hint: whatever goes wrong in it, the
    write it was for is made as without it."""
    cfg = raid5_config(tmp_path, size=2 * 16 * SU)
    ref = bytearray(os.urandom(cfg.size))
    async with running_volume(cfg) as vol:
        await vol.pwrite(0, bytes(ref))

        def broken(*a: object) -> None:
            raise RuntimeError("a bug in the read-ahead")

        monkeypatch.setattr(vol.columns[0], "will_read", broken)
        monkeypatch.setattr(vol.columns[1], "will_read", broken)
        monkeypatch.setattr(vol.columns[2], "will_read", broken)
        w = vol.width
        off, n = 3 * w + 96 * KiB, 4 * w
        data = os.urandom(n)
        held = await vol.ranges.acquire(3 * w, 4 * w)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(vol.pwrite, off, data)
            await wait_all_tasks_blocked()
            vol.ranges.release(held)
        ref[off:off + n] = data
        assert await vol.pread(0, cfg.size) == bytes(ref)
        assert all(p.state == ACTIVE for p in vol.columns)
    assert_columns_hold(cfg, ref)


async def test_a_write_waiting_for_its_stripes_reads_its_partial_edges_ahead(tmp_path):
    """A write over several stripes that starts and ends inside one, and
    must wait for the range lock (the write before it holds its first
    stripe): what its edge stripes will read is in the page cache by the
    time it may go on (ReadAhead._prefetch), and the write is right."""
    cfg = raid5_config(tmp_path, size=2 * 16 * SU)
    ref = bytearray(os.urandom(cfg.size))
    async with running_volume(cfg) as vol:
        await vol.pwrite(0, bytes(ref))
        await vol.flush()
        paths = [p.record.path for p in vol.columns]
        evict_page_cache(paths)
        w = vol.width
        off, n = 3 * w + 96 * KiB, 4 * w  # stripes 3 (its last 32 KiB) to 7 (its first 96 KiB)
        # Reconstruct-write of the edges: stripe 3's unit 0 over [32, 64) KiB,
        # stripe 7's unit 1 over [32, 64) KiB.
        ahead = [(vol.data_col(3, 0), 3 * SU + 32 * KiB), (vol.data_col(7, 1), 7 * SU + 32 * KiB)]
        assert not any(in_page_cache(paths[c], at, 32 * KiB) for c, at in ahead)
        data = os.urandom(n)
        held = await vol.ranges.acquire(3 * w, 4 * w)  # "the write before it"
        async with trio.open_nursery() as nursery:
            nursery.start_soon(vol.pwrite, off, data)
            await wait_all_tasks_blocked()
            assert vol.ranges.busy(3 * w, 4 * w) and vol.method_counts["rcw"] == 0
            with trio.fail_after(30):
                while not all(in_page_cache(paths[c], at, 32 * KiB) for c, at in ahead):
                    await trio.sleep(0.01)
            vol.ranges.release(held)
        ref[off:off + n] = data
        assert vol.method_counts["rcw"] == 2
        assert await vol.pread(0, cfg.size) == bytes(ref)
    assert_columns_hold(cfg, ref)


@pytest.mark.parametrize("ncol", [3, 4, 5])
async def test_writes_inside_one_unit_read_the_fewer_pieces_and_write_two(tmp_path, ncol):
    # The small-write fast path: reconstruct-write reads the other data units
    # (one piece with 3 columns), read-modify-write the old data and parity.
    cfg = raid5_config(tmp_path, ncol=ncol, size=(ncol - 1) * 16 * SU)
    ref = bytearray(os.urandom(cfg.size))
    rnd = random.Random(ncol)
    async with running_volume(cfg) as vol:
        await vol.pwrite(0, bytes(ref))
        for i in range(40):
            off = rnd.randrange(0, cfg.size // 4096) * 4096 + rnd.choice([0, 0, 17])
            n = min(rnd.choice([4096, 512, 1]), SU - off % SU)
            reads = [p.reads for p in vol.columns]
            writes = [p.writes for p in vol.columns]
            data = rnd.randbytes(n)
            await vol.pwrite(off, data)
            ref[off:off + n] = data
            if i <= 20:
                assert sum(p.reads for p in vol.columns) - sum(reads) == min(ncol - 2, 2)
                assert sum(p.writes for p in vol.columns) - sum(writes) == 2
            if i == 20:
                await vol.detach_plex("c1")  # degraded: the general path, same bytes
        assert vol.method_counts["rcw" if ncol <= 4 else "rmw"] >= 20
        assert vol.method_counts["degraded"]
        assert await vol.pread(0, cfg.size) == bytes(ref)
        await vol.attach_plex("c1")
        await vol.resync.wait_idle()
    assert_columns_hold(cfg, ref)


async def test_degraded_reads_and_writes_then_rebuild_of_missed_stripes(tmp_path):
    cfg = raid5_config(tmp_path, size=2 * 32 * SU)
    ref = bytearray(os.urandom(cfg.size))
    async with running_volume(cfg) as vol:
        await vol.pwrite(0, bytes(ref))
        await vol.detach_plex("c1")
        assert vol.columns[1].state == DETACHED
        assert vol.status()["degraded"]
        assert await vol.pread(0, cfg.size) == bytes(ref)  # c1's units reconstructed
        assert vol.degraded_reads
        # Writes to two stripes while c1 is away, partial and whole units.
        for off, n in ((3 * vol.width + 100, 5000), (7 * vol.width, vol.width + 3)):
            data = os.urandom(n)
            await vol.pwrite(off, data)
            ref[off:off + n] = data
        assert await vol.pread(0, cfg.size) == bytes(ref)
        with pytest.raises(VmdError, match="already degraded"):
            await vol.detach_plex("c0")
        missing = vol.columns[1].record.missing
        assert missing.bytes_covered() == 3 * vol.width  # stripes 3, 7 and 8 only
        reply = await vol.attach_plex("c1")
        assert not reply["full_resync"]
        await vol.resync.wait_idle()
        assert vol.columns[1].state == ACTIVE
        assert vol.resync.status()["copied_bytes"] == 3 * vol.width
        assert await vol.pread(0, cfg.size) == bytes(ref)
    assert_columns_hold(cfg, ref)


async def test_replaced_column_is_rebuilt_whole(tmp_path):
    cfg = raid5_config(tmp_path, ncol=4, size=3 * 16 * SU)
    ref = bytearray(cfg.size)
    async with running_volume(cfg) as vol:
        await random_io(vol, ref, 30, seed=5)
        await vol.detach_plex("c2")
        await random_io(vol, ref, 10, seed=6)
        new = tmp_path / "new-c2.img"
        reply = await vol.attach_plex("c2", path=str(new))
        assert reply["full_resync"] and "new image" in reply["why"]
        await random_io(vol, ref, 10, seed=7)  # writes during the rebuild
        await vol.resync.wait_idle()
        assert vol.columns[2].state == ACTIVE
    cfg2 = cfg.__class__(**{**cfg.__dict__, "plexes": (*cfg.plexes[:2], new, cfg.plexes[3])})
    cols = column_bytes(cfg2)
    assert decode(cols, SU) == bytes(ref)
    assert not any(xor_all(cols))


async def test_rebuild_keeps_runs_in_flight_with_sequential_read_ahead_on_the_sources(
        tmp_path, monkeypatch):
    """The rebuild rebuilds Rebuild.copies runs at once and reads its sources
    with the kernel's sequential read-ahead for the pass only (the volume's
    own reads get the default window back after); the target gets no hint."""
    from vmd import raid5_rebuild
    from vmd.raid5_rebuild import Rebuild

    cfg = raid5_config(tmp_path, size=2 * 64 * MiB)  # 32 runs of 4 MiB
    advice: list[tuple[int, int]] = []  # (inode, advice)
    real_fadvise = os.posix_fadvise

    def spy(fd, off, n, how):
        advice.append((os.fstat(fd).st_ino, how))
        real_fadvise(fd, off, n, how)

    now = most = 0
    real_run = Rebuild._rebuild_run

    async def counted(self, target, sources, at, n):
        nonlocal now, most
        now += 1
        most = max(most, now)
        try:
            return await real_run(self, target, sources, at, n)
        finally:
            now -= 1

    monkeypatch.setattr(raid5_rebuild.os, "posix_fadvise", spy)
    monkeypatch.setattr(Rebuild, "_rebuild_run", counted)
    ref = bytearray(os.urandom(cfg.size))
    async with running_volume(cfg) as vol:
        await vol.pwrite(0, bytes(ref))
        await vol.detach_plex("c1")
        new = tmp_path / "new-c1.img"
        await vol.attach_plex("c1", path=str(new))
        await vol.resync.wait_idle()
        assert vol.columns[1].state == ACTIVE
        assert most == Rebuild.copies == 8, most
        sources = [os.stat(p).st_ino for p in (cfg.plexes[0], cfg.plexes[2])]
        assert sorted(advice) == sorted(
            [(i, os.POSIX_FADV_SEQUENTIAL) for i in sources]
            + [(i, os.POSIX_FADV_NORMAL) for i in sources]), advice
        assert [how for _, how in advice[-2:]] == [os.POSIX_FADV_NORMAL] * 2, advice
        assert await vol.pread(0, cfg.size) == ref
    cols = column_bytes(cfg.__class__(**{**cfg.__dict__, "plexes": (cfg.plexes[0], new,
                                                                        cfg.plexes[2])}))
    assert decode(cols, SU) == bytes(ref)
    assert not any(xor_all(cols))


@pytest.mark.parametrize("failing", ["target", "source"])
async def test_a_column_failing_during_a_rebuild_is_failed_and_the_rebuild_stops(
        tmp_path, failing, monkeypatch):
    # The rebuild reads the others and writes the target off the event loop:
    # an error there names its column, which goes IOFAIL.
    monkeypatch.setattr(FailingColumn, "fail", None)
    cfg = raid5_config(tmp_path, size=2 * 32 * SU)
    ref = os.urandom(cfg.size)
    async with running_volume(cfg, plex_factory=FailingColumn) as vol:
        await vol.pwrite(0, ref)
        await vol.detach_plex("c1")
        await vol.pwrite(0, ref)  # c1 misses stripes: its rebuild has work
        FailingColumn.fail = ("c1", "write") if failing == "target" else ("c2", "read")
        await vol.attach_plex("c1")
        failed = vol.columns[1 if failing == "target" else 2]
        # A stuck rebuild (no second copy of c2's stripes) is never idle: wait
        # for the failure and the end of the pass instead.
        with trio.fail_after(20):
            while failed.state != IOFAIL or vol.resync.running:
                await trio.sleep(0.01)
        assert "injected" in failed.record.reason
        FailingColumn.fail = None
        if failing == "target":
            assert vol.columns[2].state == ACTIVE
            assert await vol.pread(0, cfg.size) == ref  # degraded, c1 rebuilt from c0, c2
        else:
            assert vol.columns[1].state == SYNCING  # not rebuilt: stripes lack c2 too
            with pytest.raises(OSError) as ei:
                await vol.pread(0, cfg.size)
            assert ei.value.errno == errno.EIO


async def test_two_columns_out_is_eio_and_nothing_is_written(tmp_path):
    cfg = raid5_config(tmp_path)
    async with running_volume(cfg) as vol:
        await vol.pwrite(0, os.urandom(vol.width))
        await vol.detach_plex("c0")
        vol.columns[1].record.state = IOFAIL  # as if it failed
        vol.columns[1].close()
        before = column_bytes(cfg)[2]
        with pytest.raises(OSError) as ei:
            await vol.pwrite(10, b"x" * 100)
        assert ei.value.errno == 5 and "lacks columns" in str(ei.value)
        assert column_bytes(cfg)[2] == before


async def test_mirror_verbs_are_refused_with_a_clear_message(tmp_path):
    cfg = raid5_config(tmp_path)
    async with running_volume(cfg) as vol:
        with pytest.raises(VmdError, match="RAID-5: it has columns, not plexes"):
            await vol.add_plex(str(tmp_path / "x.img"))
        with pytest.raises(VmdError, match="snapshots break off a third mirror and need a mirror"):
            await vol.add_plex(str(tmp_path / "x.img"), role="snapshot")
        with pytest.raises(VmdError, match="no column 'p1'"):
            await vol.detach_plex("p1")


async def test_log_entries_replay_in_order_and_a_torn_last_entry_is_ignored(tmp_path):
    from vmd.raid5log_format import HEADER, encode_entry, read_entries

    cfg = raid5_config(tmp_path, raid5_log=tmp_path / "r5.r5log")
    async with running_volume(cfg) as vol:
        await vol.pwrite(100, os.urandom(5000))
        await vol.sync()  # answered before its entry is committed: an fsync waits for it
        assert vol.r5log.commits >= 1
        assert vol.status()["raid5_log"]["used_bytes"] > 0 or vol.r5log.retires
    # Two entries by hand after the clean stop's empty log: the second torn
    # at every byte offset replays as the first alone.
    from vmd.raid5log_format import _header

    e1 = encode_entry(1, [(0, 0, b"a" * 100), (2, 0, b"b" * 100)])
    e2 = encode_entry(2, [(1, 4096, b"c" * 300)])
    head = _header(0)
    assert len(head) == HEADER
    assert read_entries(head + e1 + e2)[1] == [(1, [(0, 0, b"a" * 100), (2, 0, b"b" * 100)]),
                                               (2, [(1, 4096, b"c" * 300)])]
    for cut in range(len(e2)):
        torn = head + e1 + e2[:cut] + os.urandom(7) * (cut % 2)
        assert [s for s, _ in read_entries(torn)[1]] == [1], cut
    # An entry left from before a rewind (an older sequence) ends the replay.
    assert read_entries(_header(1) + e1 + e2)[1] == []


def test_log_entries_of_an_older_vmd_with_zlibs_crc32_replay_too():
    # vmd wrote magic R5LE and zlib's crc32 before the entries' crc became
    # crc32c (R5LC): a log a crash left across an upgrade still replays.
    # The old entry is encoded here by hand, from the format's table.
    import struct
    import zlib

    from vmd.raid5log_format import _header, encode_entry, read_entries

    def old_entry(seq: int, pieces: list[tuple[int, int, bytes]]) -> bytes:
        payload = b"".join(struct.pack("<HQI", c, off, len(d)) + d for c, off, d in pieces)
        crc = zlib.crc32(payload, zlib.crc32(struct.pack("<IQ", len(payload), seq)))
        return struct.pack("<4sIQI", b"R5LE", len(payload), seq, crc) + payload

    def old_header(retired: int) -> bytes:
        h = b"VMDR5LOG" + struct.pack("<Q", retired)
        return (h + struct.pack("<I", zlib.crc32(h))).ljust(4096, b"\0")

    p1, p2 = [(0, 8192, b"old" * 50)], [(2, 0, b"new" * 70)]
    new2 = encode_entry(2, p2)
    assert new2[:4] == b"R5LC"
    assert read_entries(old_header(0) + old_entry(1, p1))[1] == [(1, p1)]
    assert read_entries(_header(0) + old_entry(1, p1) + new2)[1] == [(1, p1), (2, p2)]
    # The header's magic changed too: a vmd from before refuses such a log
    # ("bad magic"), where it would have replayed none of its R5LC entries.
    assert _header(0)[:8] == b"VMDR5LG2"
    # Each magic with its own crc only: an R5LC entry checked by zlib's
    # crc32 (or the reverse) is damaged, and ends the replay there.
    damaged = b"R5LC" + old_entry(2, p2)[4:]
    assert read_entries(_header(0) + old_entry(1, p1) + damaged)[1] == [(1, p1)]
    assert read_entries(_header(0) + b"R5LE" + new2[4:])[1] == []


async def test_crash_with_log_replays_before_serving_and_parity_matches(tmp_path, monkeypatch):
    # No idle retire: the columns are emptied below, so every write must be in the log.
    monkeypatch.setattr("vmd.raid5log.RETIRE_SECONDS", 3600)
    cfg = raid5_config(tmp_path, raid5_log=tmp_path / "r5.r5log")
    ref = bytearray(cfg.size)
    async with running_volume(cfg, shutdown=False) as vol:
        await random_io(vol, ref, 40, seed=11)
        await vol.drain()  # committed and on the columns (a crash before loses them)
        entries = vol.r5log.seq - vol.r5log.retired
        # Undo the column writes behind the log's back: only a replay brings them back.
        for p in vol.columns:
            os.ftruncate(p.fd, 0)
            os.ftruncate(p.fd, vol.column_size)
    async with running_volume(cfg) as vol:
        assert vol.replayed_entries == entries > 0
        assert await vol.pread(0, cfg.size) == bytes(ref)
        assert not vol.columns[0].record.missing.bits.any()  # no parity regeneration needed
    assert_columns_hold(cfg, ref)


async def test_crash_without_log_regenerates_parity_and_dirty_degraded_is_refused(tmp_path):
    cfg = raid5_config(tmp_path)
    ref = bytearray(cfg.size)
    async with running_volume(cfg, shutdown=False) as vol:
        await random_io(vol, ref, 20, seed=12)
        # Spoil the parity of one written stripe: regeneration must fix it.
        s = 0
        pcol = vol.parity_col(s)
        os.pwrite(vol.columns[pcol].fd, b"\xff" * 4096, 0)
    async with running_volume(cfg) as vol:
        assert vol.recovered_regions > 0
        await vol.resync.wait_idle()
        assert await vol.pread(0, cfg.size) == bytes(ref)
    cols = column_bytes(cfg)
    assert not any(xor_all(cols))
    # Now a crash, and a column missing at the restart: refused, then forced.
    from vmd.manager import open_volume

    async with running_volume(cfg, shutdown=False) as vol:
        await vol.pwrite(0, b"z" * 10)
    os.unlink(cfg.plexes[1])
    with pytest.raises(VmdError, match="write hole"):
        open_volume(cfg, tmp_path / "test.yaml")
    vol = open_volume(cfg, tmp_path / "test.yaml", force_degraded=True)
    assert vol.columns[1].state == IOFAIL
    for p in vol.columns:
        p.close()
    vol.sidecar.close()


async def test_torn_last_log_entry_at_every_byte_offset_through_a_restart(tmp_path):
    """The log of a crash, its last entry cut at every byte offset (and
    followed by garbage at odd cuts), opened as a restart does: the entries
    before it are replayed, the torn one is not, and parity matches."""
    from vmd.manager import open_volume
    from vmd.raid5log_format import HEADER, read_entries

    cfg = raid5_config(tmp_path, size=2 * 8 * SU, raid5_log=tmp_path / "r5.r5log")
    before = bytearray(cfg.size)
    async with running_volume(cfg, shutdown=False) as vol:
        await random_io(vol, before, 4, seed=31, max_len=9000)
        # The last write: one byte, so its entry is short (data and parity pieces).
        at = 5 * vol.width + SU + 7
        after = bytearray(before)
        after[at] = before[at] ^ 0x5A
        await vol.pwrite(at, bytes(after[at:at + 1]))
        await vol.sync()
        assert vol.r5log.retired == 0 and vol.r5log.seq == 5, "a retire ran: the test was slow"
        vol.r5log.close()
    log = (tmp_path / "r5.r5log").read_bytes()
    retired, entries = read_entries(log)
    assert [s for s, _ in entries] == [1, 2, 3, 4, 5]
    last = len(log) - HEADER - sum(20 + sum(14 + len(d) for _, _, d in p) for _, p in entries[:4])
    start = len(log) - last
    assert last == 20 + 2 * (14 + 1), last
    for cut in range(last + 1):
        # Garbage whose first byte differs from the entry's next one: random
        # bytes completed the entry cut one byte short once in 256 runs.
        garbage = bytes([log[start + cut] ^ 0xFF]) + os.urandom(12) if cut < last else b""
        torn = log[:start + cut] + (garbage if cut % 2 else b"")
        (tmp_path / "r5.r5log").write_bytes(torn)
        for p in cfg.plexes:  # the columns never got the writes: only a replay brings them
            os.truncate(p, 0)
            os.truncate(p, cfg.size // 2)
        vol = open_volume(cfg, tmp_path / "test.yaml")
        try:
            assert vol.replayed_entries == (5 if cut == last else 4), cut
        finally:
            for p in vol.columns:
                p.close()
            vol.sidecar.close()
            vol.r5log.close()
        cols = column_bytes(cfg)
        assert decode(cols, SU) == bytes(after if cut == last else before), cut
        assert not any(xor_all(cols)), cut


async def test_data_ranges_are_the_stripes_that_hold_data_also_degraded(tmp_path):
    cfg = raid5_config(tmp_path, size=2 * 32 * SU)
    async with running_volume(cfg) as vol:
        w = vol.width
        assert await vol.data_ranges(0, cfg.size) == []
        await vol.pwrite(3 * w + 10, b"x" * 100)  # stripe 3 only
        await vol.pwrite(10 * w - 1, b"yy")  # stripes 9 and 10
        want = [(3 * w, w), (9 * w, 2 * w)]
        assert await vol.data_ranges(0, cfg.size) == want
        assert await vol.data_ranges(3 * w + 5, 7 * w) == [(3 * w + 5, w - 5), (9 * w, w + 5)]
        await vol.detach_plex("c0")  # the others still say which stripes hold data
        assert await vol.data_ranges(0, cfg.size) == want
        # With a second column out no stripe can be read: none is called a hole.
        vol.columns[1].record.state = IOFAIL
        vol.columns[1].close()
        assert await vol.data_ranges(0, 2 * w) == [(0, 2 * w)]


async def test_a_refused_raid5_volume_leaves_no_file_open(tmp_path):
    from vmd.manager import open_volume

    cfg = raid5_config(tmp_path, raid5_log=tmp_path / "r5.r5log")
    async with running_volume(cfg, shutdown=False) as vol:
        await vol.pwrite(0, b"x" * 5000)
        vol.r5log.close()
    with open(cfg.raid5_log, "r+b") as f:
        f.write(b"garbage!")  # the header's magic: the log cannot say what was in flight

    def open_fds() -> list[str]:
        fds = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                fds.append(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                pass
        return [t for t in fds if t.startswith(str(tmp_path))]

    assert open_fds() == []
    with pytest.raises(VmdError, match=r"RAID-5 log .*r5\.r5log: bad header"):
        open_volume(cfg, tmp_path / "test.yaml")
    assert open_fds() == [], "a refused volume left files open"


async def test_whole_stripe_writes_with_a_column_out_take_the_degraded_path(tmp_path):
    """The whole-stripe fast path (no plan, no reads) is for every column in:
    with one detached, whole stripes are written degraded (its map marked)
    and come back right after the attach's rebuild."""
    cfg = raid5_config(tmp_path, size=2 * 16 * SU)
    ref = bytearray(cfg.size)
    async with running_volume(cfg) as vol:
        await vol.detach_plex("c1")
        data = os.urandom(4 * vol.width)
        full_before = vol.method_counts["full"]
        assert await vol.pwrite(2 * vol.width, data) == len(data)
        ref[2 * vol.width:6 * vol.width] = data
        assert vol.method_counts["full"] == full_before, "the fast path wrote a degraded stripe"
        assert await vol.pread(0, cfg.size) == bytes(ref)
        await vol.attach_plex("c1")
        await vol.resync.wait_idle()
        assert await vol.pread(0, cfg.size) == bytes(ref)
    assert_columns_hold(cfg, ref)
