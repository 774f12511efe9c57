"""The sidecar log: replay, torn tails, damage, compaction, group commit."""

from __future__ import annotations

import os
import time

import pytest
import trio

from vmd import sidecar as sc
from vmd.config import KiB, MiB
from vmd.errors import SidecarError
from vmd.manager import open_volume
from vmd.regionmap import RegionMap
from vmd.sidecar import PlexRecord, SidecarLog, new_state, read_log

from enginekit import plex_bytes, random_writes, running_volume, volume_config


def _state():
    st = new_state("v", 8 * MiB, 1 * MiB, 64 * KiB)
    st.plexes = [PlexRecord("p0", "/x/p0", sc.ACTIVE, st.new_map()),
                 PlexRecord("p1", "/x/p1", sc.DETACHED, st.new_map(), identity=[1, 2, 3, 4])]
    st.config_plexes = ["/x/p0", "/x/p1"]
    return st


async def _log_with_records(path, n=6):
    log = SidecarLog.create(path, _state())
    for r in range(n):
        await log.append(lambda r=r: {"t": "dirty", "r": [r]}, sync=True)
    await log.append(lambda: {"t": "clean", "r": [0, 1], "fmr": {"p1": [0, 17]}}, sync=False)
    log.close()
    return path.read_bytes()


async def test_replay_applies_records(tmp_path):
    await _log_with_records(tmp_path / "v.log")
    replay, _, seq = read_log(tmp_path / "v.log")
    st = replay.state
    assert seq == 8 and replay.records == 9  # the checkpoint is written twice
    assert list(st.drl.set_indices()) == [2, 3, 4, 5]
    assert not st.clean
    assert list(st.plex("p1").missing.set_indices()) == [0, 17]
    assert st.plex("p1").identity == [1, 2, 3, 4]


async def test_torn_last_record_at_every_byte_offset(tmp_path):
    path = tmp_path / "v.log"
    full = await _log_with_records(path)
    replay_full, end_full, _ = read_log(path)
    # Where the last record starts: replay without it.
    last_start = len(full) - len(sc._frame(8, {"t": "clean", "r": [0, 1], "fmr": {"p1": [0, 17]}}))
    for cut in range(last_start, len(full)):
        path.write_bytes(full[:cut])
        replay, end, seq = read_log(path)
        assert seq == 7 and end == last_start, cut
        assert list(replay.state.drl.set_indices()) == [0, 1, 2, 3, 4, 5]
        assert replay.torn_bytes == cut - last_start
    # Opening for append drops the tail, and appends then replay fine.
    path.write_bytes(full[:last_start + 5])
    log, replay = SidecarLog.open(path)
    assert os.path.getsize(path) == last_start
    await log.append(lambda: {"t": "dirty", "r": [7]}, sync=True)
    log.close()
    assert list(read_log(path)[0].state.drl.set_indices()) == [0, 1, 2, 3, 4, 5, 7]


async def test_torn_tail_of_garbage_is_a_tail(tmp_path):
    path = tmp_path / "v.log"
    full = await _log_with_records(path)
    path.write_bytes(full + b"\0" * 3000)  # preallocated zeros after a crash
    assert read_log(path)[2] == 8
    path.write_bytes(full + os.urandom(100))
    assert read_log(path)[2] == 8


async def test_bad_checksum_mid_log_is_refused(tmp_path):
    path = tmp_path / "v.log"
    full = bytearray(await _log_with_records(path))
    # Flip a byte inside the third record's payload.
    off = sc.HEADER_SIZE
    for _ in range(3):
        _, length, _, _ = sc._REC.unpack_from(full, off)
        off += sc._REC.size + length
    full[off + sc._REC.size + 6] ^= 0xFF
    path.write_bytes(full)
    with pytest.raises(SidecarError, match=f"offset {off}.*valid records follow"):
        read_log(path)


def _summary(st):
    """What start-up needs from a state: plexes, their states and maps, the DRL."""
    return (st.clean, list(st.drl.set_indices()), st.next_plex, st.config_plexes,
            [(p.name, p.path, p.state, None if p.missing is None else list(p.missing.set_indices()),
              p.identity) for p in st.plexes])


@pytest.mark.parametrize("deltas", [False, True], ids=["compacted", "with-records-after"])
async def test_one_damaged_byte_in_the_checkpoint_loses_nothing(tmp_path, deltas):
    """A byte flipped at any offset of the checkpoint (the whole state of a
    compacted log): start-up still reads the plex list, states and maps."""
    path = tmp_path / "v.log"
    st = _state()
    st.plexes[1].missing.mark(3 * MiB, 1)
    st.next_plex = 5
    SidecarLog.create(path, st).close()
    if deltas:
        log, _ = SidecarLog.open(path)
        await log.append(lambda: {"t": "dirty", "r": [4]}, sync=True)
        log.close()
    good = path.read_bytes()
    want = _summary(read_log(path)[0].state)
    c1 = sc.HEADER_SIZE
    c2 = e1 = sc._unframe(good, c1)[1]
    e2 = sc._unframe(good, c2)[1]
    assert e2 - c2 == e1 - c1, "the two copies must be of one length"
    for off in range(c1, e2):
        bad = bytearray(good)
        bad[off] ^= 0x5A
        path.write_bytes(bad)
        replay, _, seq = read_log(path)
        assert _summary(replay.state) == want, off
        assert replay.repairs and seq == (2 if deltas else 1), off
        if off % 61 == 0:  # open rewrites it whole (slower: a sample of offsets)
            log, again = SidecarLog.open(path)
            log.close()
            assert _summary(again.state) == want
            fresh, _, _ = read_log(path)
            assert not fresh.repairs and _summary(fresh.state) == want, off
            kept = list(tmp_path.glob("v.log.damaged-*"))
            assert len(kept) == 1 and kept[0].read_bytes() == bytes(bad), off
            kept[0].unlink()
    # Both copies damaged: refused, as before (never taken for clean).
    bad = bytearray(good)
    bad[c1 + 25] ^= 1
    bad[c2 + 25] ^= 1
    path.write_bytes(bad)
    with pytest.raises(SidecarError, match="valid records follow" if deltas else "no checkpoint"):
        read_log(path)


async def test_one_damaged_byte_in_the_header_loses_nothing(tmp_path):
    """The header (volume identity and geometry) is written twice: a byte
    flipped anywhere in its first copy is read around, and the log rewritten;
    both copies damaged is refused, naming the file."""
    path = tmp_path / "v.log"
    st = _state()
    st.plexes[1].missing.mark(3 * MiB, 1)
    SidecarLog.create(path, st).close()
    good = path.read_bytes()
    want = _summary(read_log(path)[0].state)
    _, n, _ = sc._HDR.unpack_from(good, 0)
    used = sc._HDR.size + n
    assert good[sc.HEADER_COPY:sc.HEADER_COPY + used] == good[:used]
    for off in range(used):
        bad = bytearray(good)
        bad[off] ^= 0x5A
        path.write_bytes(bad)
        replay, _, _ = read_log(path)
        assert _summary(replay.state) == want, off
        assert replay.state.uuid == st.uuid and replay.state.size == st.size, off
        assert replay.repairs == [f"the header is damaged; its copy at offset "
                                  f"{sc.HEADER_COPY} was read"], off
        if off % 13 == 0:  # open rewrites it whole, the damaged file kept aside
            log, again = SidecarLog.open(path)
            log.close()
            assert _summary(again.state) == want
            assert path.read_bytes()[:sc.HEADER_SIZE] == good[:sc.HEADER_SIZE], off
            kept = list(tmp_path.glob("v.log.damaged-*"))
            assert len(kept) == 1 and kept[0].read_bytes() == bytes(bad), off
            kept[0].unlink()
    # Damage in the second copy alone: the first is read, and the log is
    # rewritten so that both copies are whole again.
    bad = bytearray(good)
    bad[sc.HEADER_COPY + 20] ^= 1
    path.write_bytes(bad)
    replay, _, _ = read_log(path)
    assert _summary(replay.state) == want
    assert replay.repairs == [f"the header's copy at offset {sc.HEADER_COPY} is damaged"]
    log, _ = SidecarLog.open(path)
    log.close()
    assert path.read_bytes()[:sc.HEADER_SIZE] == good[:sc.HEADER_SIZE]
    for kept in tmp_path.glob("v.log.damaged-*"):
        kept.unlink()
    path.write_bytes(bad)
    bad[20] ^= 1
    path.write_bytes(bad)
    with pytest.raises(SidecarError, match=f"{path}: bad sidecar header"):
        read_log(path)


async def test_log_with_one_header_copy_still_replays(tmp_path):
    """Logs written before the header was doubled: zeros where the copy is."""
    path = tmp_path / "v.log"
    st = _state()
    SidecarLog.create(path, st).close()
    old = bytearray(path.read_bytes())
    old[sc.HEADER_COPY:sc.HEADER_SIZE] = bytes(sc.HEADER_SIZE - sc.HEADER_COPY)
    path.write_bytes(old)
    replay, _, _ = read_log(path)
    assert not replay.repairs and _summary(replay.state) == _summary(st)


async def test_old_log_with_one_checkpoint_still_replays(tmp_path):
    """Logs written before the checkpoint was doubled: one `ckpt`, no `copy`."""
    path = tmp_path / "v.log"
    st = _state()
    rec, blobs = st.encode()
    path.write_bytes(sc._header_bytes(st) + sc._frame(0, rec, blobs)
                     + sc._frame(1, {"t": "dirty", "r": [2]}))
    log, replay = SidecarLog.open(path)
    assert replay.records == 2 and not replay.repairs
    assert list(replay.state.drl.set_indices()) == [2] and replay.state.plex("p1").state == sc.DETACHED
    await log.append(lambda: {"t": "dirty", "r": [6]}, sync=True)
    await log.checkpoint(lambda: replay.state)
    log.close()
    assert read_log(path)[2] == 4 and read_log(path)[0].records == 2


async def test_bad_header_is_refused(tmp_path):
    path = tmp_path / "v.log"
    full = bytearray(await _log_with_records(path))
    full[10] ^= 1
    full[sc.HEADER_COPY + 10] ^= 1  # both copies (one alone: the test above)
    path.write_bytes(full)
    with pytest.raises(SidecarError, match="bad sidecar header"):
        read_log(path)
    path.write_bytes(b"volumes:\n  v: {size: 1GiB}\n".ljust(8192, b"\n"))  # not a log
    with pytest.raises(SidecarError, match="not a vmd log"):
        read_log(path)
    path.write_bytes(b"")
    with pytest.raises(SidecarError, match="truncated"):
        read_log(path)


@pytest.mark.parametrize("step", ["write", "fsync", "rename", "fsync_dir"])
async def test_compaction_interrupted_at_each_step(tmp_path, monkeypatch, step):
    """A crash at any step of compaction leaves the old log or the new one."""
    path = tmp_path / "v.log"
    await _log_with_records(path)
    before = read_log(path)[0].state
    log, _ = SidecarLog.open(path)

    class Crash(Exception):
        pass

    def crash(*a, **k):
        raise Crash(step)

    target = {"write": (os, "write"), "fsync": (os, "fsync"), "rename": (os, "rename"),
              "fsync_dir": (sc, "fsync_dir")}[step]
    new = read_log(path)[0].state
    new.drl.clear()
    new.plex("p1").missing.fill()
    monkeypatch.setattr(*target, crash)
    with pytest.raises(Crash):
        await log.checkpoint(lambda: new)
    monkeypatch.undo()
    log.close()
    # "Reboot": the log opens, and holds either the old or the new state.
    log2, replay = SidecarLog.open(path)
    st = replay.state
    old_like = list(st.drl.set_indices()) == list(before.drl.set_indices())
    new_like = st.drl.count() == 0 and st.plex("p1").missing.count() == new.plex("p1").missing.nbits
    assert old_like != new_like, step
    if step in ("write", "fsync", "rename"):
        assert old_like
    else:
        assert new_like  # renamed: only the directory fsync was missing
    assert not (tmp_path / "v.log.new").exists()
    log2.close()


async def test_group_commit_shares_log_flushes(tmp_path):
    vc = volume_config(tmp_path, size=64 * MiB, region_size=64 * KiB)
    async with running_volume(vc) as vol:
        await vol.pwrite(0, b"warm")
        syncs0, commits0 = vol.sidecar.syncs, vol.drl.commits
        n = 64
        async with trio.open_nursery() as nursery:
            for i in range(1, n + 1):  # n writers, n new regions, at once
                nursery.start_soon(vol.pwrite, i * 64 * KiB + 100, b"g" * 512)
        flushes = vol.sidecar.syncs - syncs0
        assert vol.drl.commits - commits0 == flushes
        assert 1 <= flushes <= n // 4, f"{flushes} log flushes for {n} writers"
        assert vol.state.drl.count() == n + 1
        # Writing regions already dirty costs no log I/O at all.
        appends = vol.sidecar.appends
        for i in range(1, n + 1):
            await vol.pwrite(i * 64 * KiB, b"h" * 512)
        assert vol.sidecar.appends == appends


async def test_regions_cleaned_lazily_after_data_is_durable(tmp_path):
    vc = volume_config(tmp_path, size=16 * MiB)
    async with running_volume(vc, clean_delay=0.3) as vol:
        flushes = [0]
        real = type(vol.plexes[0])._flush_sync

        def counting(self, *args):
            flushes[0] += 1
            real(self, *args)

        for p in vol.plexes:
            p._flush_sync = counting.__get__(p)
        await vol.pwrite(3 * MiB, b"d" * 4096)
        assert vol.state.drl.count() == 1
        vol.opened()  # held open: only idle regions are cleaned, not the volume
        with trio.fail_after(5):
            while vol.state.drl.count():
                await trio.sleep(0.05)
        assert flushes[0] >= 2  # both plexes fdatasynced before the clean record
        assert not vol.state.clean
        vol.released()
        with trio.fail_after(5):  # closed and idle: the volume becomes clean
            while not vol.state.clean:
                await trio.sleep(0.05)
    assert read_log(vc.log)[0].state.clean


async def test_crash_recovers_only_dirty_regions(tmp_path):
    vc = volume_config(tmp_path, size=64 * MiB)
    ref = bytearray(vc.size)
    async with running_volume(vc, clean_delay=60, shutdown=False) as vol:
        for r in (2, 9, 30):
            data = os.urandom(100 * KiB)
            await vol.pwrite(r * MiB, data)
            ref[r * MiB:r * MiB + len(data)] = data
    dirty = read_log(vc.log)[0].state.drl.count()
    assert dirty == 3 and not read_log(vc.log)[0].state.clean
    # Make the mirrors disagree inside a dirty region, as a torn write would.
    with open(vc.plexes[1], "r+b") as f:
        f.seek(9 * MiB + 5)
        f.write(b"TORN")
    async with running_volume(vc) as vol:
        assert vol.recovered_regions == 3
        await vol.resync.wait_idle()
        assert vol.resync.copied_bytes <= 3 * MiB
    assert plex_bytes(vol) == [bytes(ref)] * 2


async def test_read_writeback_gives_the_same_bytes_twice(tmp_path):
    vc = volume_config(tmp_path, size=16 * MiB)
    async with running_volume(vc, clean_delay=60, shutdown=False) as vol:
        await vol.pwrite(4 * MiB, b"A" * 8192)
    with open(vc.plexes[1], "r+b") as f:
        f.seek(4 * MiB)
        f.write(b"B" * 8192)
    async with running_volume(vc) as vol:
        async with vol.resync.paused():  # reads come before recovery copies
            assert vol.plex("p1").record.missing.any_in(4 * MiB, 8192)
            first = await vol.pread(4 * MiB, 8192)
            for _ in range(5):
                assert await vol.pread(4 * MiB, 8192) == first
            assert first in (b"A" * 8192, b"B" * 8192)
            # The read wrote the region back: the plexes already agree there.
            assert not vol.plex("p1").record.missing.any_in(4 * MiB, 8192)
            a, b = plex_bytes(vol)
            assert a[4 * MiB:4 * MiB + 8192] == b[4 * MiB:4 * MiB + 8192] == first
        await vol.resync.wait_idle()
    a, b = plex_bytes(vol)
    assert a == b


async def test_clean_stop_needs_no_recovery(tmp_path):
    vc = volume_config(tmp_path)
    async with running_volume(vc) as vol:
        await vol.pwrite(0, b"x" * 5000)
    assert read_log(vc.log)[0].state.clean
    async with running_volume(vc) as vol:
        assert vol.recovered_regions == 0 and not vol.resync.targets()


async def test_missing_sidecar_with_data_is_refused_and_recover_all_resyncs(tmp_path):
    vc = volume_config(tmp_path)
    ref = bytearray(vc.size)
    async with running_volume(vc) as vol:
        await random_writes(vol, ref, 5)
    os.unlink(vc.log)
    with pytest.raises(SidecarError, match=f"sidecar log {vc.log} is missing.*--recover-all vol0"):
        open_volume(vc, tmp_path / "x.yaml")
    # Both plexes took the same writes, either may be newer: named, not guessed.
    async with running_volume(vc, recover_all=True, recover_from="p0") as vol:
        await vol.resync.wait_idle()
        assert vol.resync.synced_bytes == vc.size  # a full resync (holes skipped)
    assert plex_bytes(vol) == [bytes(ref)] * 2


async def test_damaged_sidecar_is_refused_and_recover_all_keeps_it(tmp_path):
    vc = volume_config(tmp_path)
    async with running_volume(vc, shutdown=False) as vol:
        for i in range(4):
            await vol.pwrite(i * MiB, b"z" * 100)
    data = bytearray(vc.log.read_bytes())
    # Inside both copies of the checkpoint (one alone is read around), records follow.
    _, length, _, _ = sc._REC.unpack_from(data, sc.HEADER_SIZE)
    for off in (sc.HEADER_SIZE + 30, sc.HEADER_SIZE + sc._REC.size + length + 30):
        data[off] ^= 0x55
    vc.log.write_bytes(data)
    with pytest.raises(SidecarError, match="cannot be trusted"):
        open_volume(vc, tmp_path / "x.yaml")
    async with running_volume(vc, recover_all=True, recover_from="p0") as vol:
        await vol.resync.wait_idle()
        assert vol.resync.synced_bytes == vc.size  # a full resync (holes skipped)
    kept = [p for p in tmp_path.iterdir() if ".damaged-" in p.name]
    assert len(kept) == 1 and kept[0].read_bytes() == bytes(data)


def test_map_arithmetic_for_one_tebibyte():
    # 1 TiB at the default 64 KiB FastResync region: 16 Mi bits = 2 MiB per map;
    # the DRL at 1 MiB regions: 1 Mi bits = 128 KiB. Computed, not allocated.
    tib = 1 << 40
    assert -(-tib // (64 * KiB)) // 8 == 2 * MiB
    assert -(-tib // MiB) // 8 == 128 * KiB
    m = RegionMap(64 * MiB, 64 * KiB)
    assert len(m.bits) == 1024 and m.bits.nbytes == 128
    # A sparse map stores small in the log.
    m.mark(5 * MiB, 1)
    assert len(m.to_bytes()) < 64


async def test_log_is_compacted_while_running(tmp_path):
    vc = volume_config(tmp_path, size=64 * MiB, region_size=64 * KiB)
    async with running_volume(vc, clean_delay=0.2) as vol:
        vol.sidecar.compact_bytes = 8 * KiB
        vol.opened()  # held open: cleaning only, no clean-volume record
        before = vol.sidecar.checkpoints
        for i in range(300):  # dirty records, then clean records: well over 8 KiB of log
            await vol.pwrite(i * 128 * KiB, b"c" * 512)
        # Compaction may run during the writes or after them; it must have run.
        with trio.fail_after(30):
            while (vol.sidecar.size >= 8 * KiB or vol.state.drl.count()
                   or vol.sidecar.checkpoints == before):
                await trio.sleep(0.05)
        vol.released()
    assert os.path.getsize(vc.log) < 8 * KiB
    assert read_log(vc.log)[0].records <= 4  # the checkpoint's two copies, and up to 2 more


async def test_volume_not_recorded_clean_when_a_write_races_the_flush(tmp_path):
    from vmd.plex import Plex

    class SlowFlush(Plex):
        def _flush_sync(self, fd=None):
            time.sleep(0.2)
            super()._flush_sync(fd)

    vc = volume_config(tmp_path, size=16 * MiB)
    async with running_volume(vc, clean_delay=60, plex_factory=SlowFlush, shutdown=False) as vol:
        await vol.pwrite(0, b"a" * 4096)
        async with trio.open_nursery() as nursery:
            result = []

            async def clean():
                result.append(await vol.drl.mark_clean())

            nursery.start_soon(clean)
            await trio.sleep(0.05)  # mark_clean is flushing the plexes
            await vol.pwrite(0, b"b" * 4096)  # a region already dirty: no log I/O
        assert result == [False]
        assert not vol.state.clean and vol.state.drl.count() == 1
    assert not read_log(vc.log)[0].state.clean


async def test_io_on_a_stopped_volume_fails_at_once(tmp_path):
    import errno

    vc = volume_config(tmp_path)
    async with running_volume(vc, shutdown=False) as vol:
        await vol.shutdown()
        with trio.fail_after(2):
            for op in (vol.pwrite(0, b"x"), vol.pread(0, 10)):
                with pytest.raises(OSError) as e:
                    await op
                assert e.value.errno == errno.EIO


def test_damaged_logs_kept_aside_twice_in_one_second_do_not_refuse(tmp_path, monkeypatch):
    """The damaged copy's name has a seconds stamp: a second repair within
    the same second (a retry after a failed rewrite) failed with EEXIST and
    refused a volume whose log had replayed fine."""
    path = tmp_path / "v.log"
    path.write_bytes(b"damaged log")
    monkeypatch.setattr(sc.time, "strftime", lambda fmt, *a: "20261130-120000")
    first = sc._keep_aside(path)
    second = sc._keep_aside(path)
    assert first != second and first.read_bytes() == second.read_bytes() == b"damaged log"
