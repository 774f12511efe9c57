"""The RAID-5 log's write-back stripe cache: reads served from it (healthy and
degraded), the rebuild and verify racing cached writes (engine level), and
SIGKILL of a real daemon with acknowledged writes still in the cache."""

from __future__ import annotations

import errno
import mmap
import os
import random
import threading
import time

import pytest
import trio

from vmd.config import KiB, MiB
from vmd.plex import PARALLEL_BYTES, Plex
from vmd.sidecar import ACTIVE, IOFAIL

from enginekit import running_volume
from raid5kit import (assert_columns_hold, column_bytes, decode, raid5_config, raid5_spec,
                      xor_all, xor_is_zero)

SU = 64 * KiB
DEAD = {errno.ENOTCONN, errno.EIO, errno.ECONNABORTED, errno.ENODEV}


async def _write(vol, ref: bytearray, rnd: random.Random, n: int, max_len: int = 200 * KiB
                 ) -> None:
    """n random writes (inside a unit, across units and stripes), mirrored in ref."""
    for _ in range(n):
        length = rnd.choice([4096, rnd.randint(1, 9000), rnd.randint(1, max_len)])
        off = rnd.randrange(0, vol.size - length)
        data = rnd.randbytes(length)
        await vol.pwrite(off, data)
        ref[off:off + length] = data


async def test_reads_are_served_from_the_cache_also_with_a_column_failed_before_write_back(
        tmp_path):
    cfg = raid5_config(tmp_path, size=2 * 16 * SU, raid5_log=tmp_path / "r5.r5log")
    ref = bytearray(os.urandom(cfg.size))
    rnd = random.Random(5)
    async with running_volume(cfg) as vol:
        await vol.pwrite(0, bytes(ref))
        await vol.flush()
        before = bytes(ref)
        async with vol.r5log._io:  # the committer cannot sync: nothing leaves the cache
            await _write(vol, ref, rnd, 30)
            s = 3
            await vol.pwrite(s * vol.width + 100, b"u" * 5000)  # inside unit 0 of stripe 3
            ref[s * vol.width + 100:s * vol.width + 5100] = b"u" * 5000
            assert vol.r5log.cache.bytes > 0 and vol.r5log.synced < vol.r5log.seq
            assert decode(column_bytes(cfg), SU) == before, "a column was written before the sync"
            assert await vol.pread(0, cfg.size) == bytes(ref)
            # The column of stripe 3's unit 0 fails before its pieces are
            # written back: its units are rebuilt from the others' columns
            # with their cached pieces laid over.
            c = vol.data_col(s, 0)
            await vol.fail_plex(vol.columns[c], OSError(errno.EIO, "injected"), 0, 0)
            assert vol.columns[c].state == IOFAIL
            assert await vol.pread(0, cfg.size) == bytes(ref)
            await _write(vol, ref, rnd, 10)  # degraded writes into the cache too
            assert await vol.pread(0, cfg.size) == bytes(ref)
            assert vol.degraded_reads > 0
        with trio.fail_after(30):
            await vol.drain()
        assert not vol.r5log.cache and await vol.pread(0, cfg.size) == bytes(ref)
        assert vol.columns[c].record.missing.any_in(s * vol.width, vol.width)
        await vol.attach_plex(vol.columns[c].name)  # rebuilt: what it missed from its map
        with trio.fail_after(30):
            await vol.resync.wait_idle()
        assert vol.columns[c].state == ACTIVE
        assert await vol.pread(0, cfg.size) == bytes(ref)
    assert_columns_hold(cfg, ref)


async def test_a_rebuild_and_a_verify_racing_cached_writes(tmp_path):
    from vmd.raid5_verify import Raid5Verify

    cfg = raid5_config(tmp_path, size=2 * 64 * SU, raid5_log=tmp_path / "r5.r5log")
    ref = bytearray(os.urandom(cfg.size))
    rnd = random.Random(9)
    async with running_volume(cfg, rate_limit=4 * MiB) as vol:
        await vol.pwrite(0, bytes(ref))
        await vol.detach_plex("c1")
        await vol.attach_plex("c1", path=str(tmp_path / "new-c1.img"))  # a whole rebuild
        rounds = 0
        while vol.columns[1].state != ACTIVE:
            await _write(vol, ref, rnd, 5)
            assert await vol.pread(0, cfg.size) == bytes(ref)
            rounds += 1
        assert rounds > 2, "the rebuild ended before the writes raced it"
        await vol.resync.wait_idle()
        result: dict = {}

        async def verify() -> None:
            result.update(await Raid5Verify(vol).work())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(verify)
            while not result:
                await _write(vol, ref, rnd, 3)
        assert result["complete"] and result["mismatched_bytes"] == 0, result
        assert await vol.pread(0, cfg.size) == bytes(ref)
    cols = [(tmp_path / "new-c1.img").read_bytes() if i == 1 else b
            for i, b in enumerate(column_bytes(cfg))]
    assert decode(cols, SU) == bytes(ref)
    assert not any(xor_all(cols))


def _odirect_write(path, off: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, len(data))
        buf[:] = data
        assert os.pwritev(fd, [buf], off) == len(data)
    finally:
        os.close(fd)


def _read(path, off: int = 0, n: int | None = None) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        n = n if n is not None else os.fstat(fd).st_size
        buf = mmap.mmap(-1, n)
        os.preadv(fd, [buf], off)
        return bytes(buf)
    finally:
        os.close(fd)


@pytest.mark.allow_log("not stopped cleanly", "RAID-5 log replayed")
def test_sigkill_loses_only_whole_unsynced_writes_and_nothing_an_fsync_covered(vmd_factory):
    size = 8 * MiB
    slot = 256 * KiB  # one write per slot: each is old or new on its own
    d = vmd_factory(volumes={"r5": raid5_spec(size="8MiB")})
    d.start()
    vol = d.volume_file("r5")
    cols = [d.path(f"r5-c{i}.img") for i in range(3)]
    old = os.urandom(size)
    _odirect_write(vol, 0, old)
    d.stop()
    # From here the log writes nothing back (test fault): every write
    # acknowledged since is in the cache at each kill, and comes back from
    # the log's replay or not at all.
    d.env["VMD_TEST_FAULT"] = "hold-write-back:r5"
    d.start()
    rnd = random.Random(3)
    # (offset, bytes) per slot: 4 KiB up to two stripes and more, aligned for O_DIRECT.
    writes = []
    for i in range(size // slot):
        n = rnd.choice([4, 16, 68, 132, 200]) * KiB
        at = i * slot + rnd.randrange(0, (slot - n) // 4096 + 1) * 4096
        writes.append((at, rnd.randbytes(n)))
    acked: list[int] = []
    kill_after = len(writes) // 2

    def writer() -> None:
        for i, (at, data) in enumerate(writes):
            try:
                _odirect_write(vol, at, data)
            except OSError as e:
                assert e.errno in DEAD, e
                return
            acked.append(i)
            if i == kill_after:
                d.proc.kill()  # SIGKILL, no fsync since the fill: the cache holds writes

    t = threading.Thread(target=writer)
    t.start()
    t.join(120)
    assert not t.is_alive()
    d.kill()
    assert decode([c.read_bytes() for c in cols], SU) == old, "a write reached the columns"
    d.start()
    st = d.status("r5")
    st = st["volumes"][0] if "volumes" in st else st
    got = _read(vol)
    new = 0
    for i, (at, data) in enumerate(writes):
        piece = got[at:at + len(data)]
        assert piece in (data, old[at:at + len(data)]), \
            f"write {i} ({len(data)} bytes at {at}) came back neither old nor new"
        new += piece == data
        if i > acked[-1]:
            assert piece != data or i == acked[-1] + 1, f"write {i} was never sent"
    assert new >= 1 and st["replayed_entries"] >= 1, (new, st)
    # What an fsync covered survives a SIGKILL right after it.
    after = bytearray(got)
    for at, data in writes[:8]:
        data = bytes(reversed(data))
        _odirect_write(vol, at, data)
        after[at:at + len(data)] = data
    fd = os.open(vol, os.O_RDWR)
    os.fsync(fd)
    os.close(fd)
    d.kill()
    assert decode([c.read_bytes() for c in cols], SU) == got, "a write reached the columns"
    d.env.pop("VMD_TEST_FAULT")
    d.start()
    assert _read(vol) == bytes(after)
    d.stop()
    assert xor_is_zero(cols), "parity does not match the data after the recoveries"
    assert decode([c.read_bytes() for c in cols], SU) == bytes(after)


async def test_a_stop_after_the_log_failed_is_clean_and_the_lost_write_is_nowhere(
        tmp_path, monkeypatch):
    from vmd.raid5log import Raid5Log

    fail = [False]
    write = Raid5Log._write_sync

    def failing_disk(self: Raid5Log, bufs: list, at: int) -> None:
        if fail[0]:
            raise OSError(errno.EIO, "injected: the log disk failed")
        write(self, bufs, at)

    monkeypatch.setattr(Raid5Log, "_write_sync", failing_disk)
    cfg = raid5_config(tmp_path, size=2 * 8 * SU, raid5_log=tmp_path / "r5.r5log")
    ref = os.urandom(cfg.size)
    async with running_volume(cfg) as vol:  # and a clean stop at the end
        await vol.pwrite(0, ref)
        await vol.sync()
        fail[0] = True
        await vol.pwrite(vol.width + 100, b"lost" * 1000)  # answered from the cache
        with pytest.raises(OSError, match="log disk failed"):
            await vol.sync()
        with trio.fail_after(30):
            await vol.r5log.drain()
        assert vol.status()["raid5_log"]["lost_entries"] == 1
        assert await vol.pread(0, cfg.size) == ref  # dropped: never on a column
    async with running_volume(cfg) as vol:
        assert vol.replayed_entries == 0 and vol.recovered_regions == 0
        assert await vol.pread(0, cfg.size) == ref
    assert not any(xor_all(column_bytes(cfg)))


class WhereWritten(Plex):
    """Records, per column write, whether it was made on the event loop's
    thread; column `fail_name` fails its writes with ENOSPC once told to."""

    fail_name: str | None = None

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.on_loop: list[bool] = []

    def _pwrite_sync(self, off, data):
        self.on_loop.append(threading.current_thread() is threading.main_thread())
        if WhereWritten.fail_name == self.name:
            raise OSError(errno.ENOSPC, "injected: no space left")
        super()._pwrite_sync(off, data)


async def _writes_back(vol, ref: bytearray, rnd: random.Random, n: int, length: int) -> None:
    """n writes of `length` at random offsets, then all of them written back."""
    for _ in range(n):
        off = rnd.randrange(0, vol.size - length) // 4096 * 4096
        data = rnd.randbytes(length)
        await vol.pwrite(off, data)
        ref[off:off + length] = data
    with trio.fail_after(30):
        await vol.drain()


@pytest.mark.parametrize("su", [SU, 256 * KiB])
async def test_the_write_back_writes_small_pieces_from_the_event_loop(tmp_path, monkeypatch, su):
    # A batch of small pieces (4 KiB random writes) goes into the columns'
    # page cache from the event loop: the hop to a column's thread and back
    # cost more CPU than the writes (docs/performance.md). A column held off
    # the loop (a slow disk) and big pieces still go to the threads.
    monkeypatch.setattr(WhereWritten, "fail_name", None)
    cfg = raid5_config(tmp_path, size=2 * 8 * su, stripe_unit=su, raid5_log=tmp_path / "r5.r5log")
    ref = bytearray(cfg.size)
    rnd = random.Random(7)
    async with running_volume(cfg, plex_factory=WhereWritten) as vol:
        cols = vol.columns

        def taken() -> list[tuple[int, int]]:  # per column: (on the loop, in a thread)
            got = [(sum(c.on_loop), len(c.on_loop) - sum(c.on_loop)) for c in cols]
            for c in cols:
                c.on_loop.clear()
            return got

        await _writes_back(vol, ref, rnd, 120, 4096)
        assert all(loop > 0 and thread == 0 for loop, thread in taken())
        cols[1].inline = False  # as a column held for slow writes
        await _writes_back(vol, ref, rnd, 120, 4096)
        got = taken()
        assert got[1][0] == 0 and got[1][1] > 0, got
        assert all(loop > 0 and thread == 0 for loop, thread in (got[0], got[2])), got
        cols[1].inline = True
        # Whole stripes: every piece is a unit; from 128 KiB a thread's copy
        # runs beside the event loop's work.
        await _writes_back(vol, ref, rnd, 6, 2 * vol.width)
        big = su >= PARALLEL_BYTES
        assert all((thread > 0) == big and (loop > 0) != big for loop, thread in taken())
        assert await vol.pread(0, cfg.size) == bytes(ref)
    assert_columns_hold(cfg, ref)


@pytest.mark.allow_log(r"plex c1 .* is now IOFAIL", r"injected: no space left")
async def test_a_column_failing_in_the_write_back_from_the_event_loop_is_failed_and_rebuilt(
        tmp_path, monkeypatch):
    # The pieces a failed column did not take are in its map (the write-back
    # marks every stripe of the batch it had pieces in), it goes IOFAIL, the
    # volume reads right from the others, and a reattach rebuilds it.
    monkeypatch.setattr(WhereWritten, "fail_name", None)
    cfg = raid5_config(tmp_path, size=2 * 16 * SU, raid5_log=tmp_path / "r5.r5log")
    ref = bytearray(os.urandom(cfg.size))
    rnd = random.Random(11)
    async with running_volume(cfg, plex_factory=WhereWritten) as vol:
        await vol.pwrite(0, bytes(ref))
        await _writes_back(vol, ref, rnd, 40, 4096)
        WhereWritten.fail_name = "c1"
        await _writes_back(vol, ref, rnd, 40, 4096)
        c1 = vol.columns[1]
        assert c1.state == IOFAIL and c1.on_loop[-1], "the failed write was not made on the loop"
        assert await vol.pread(0, cfg.size) == bytes(ref)
        WhereWritten.fail_name = None
        await _writes_back(vol, ref, rnd, 40, 4096)  # degraded, still through the log
        await vol.attach_plex("c1")
        with trio.fail_after(30):
            await vol.resync.wait_idle()
        assert c1.state == ACTIVE
        assert await vol.pread(0, cfg.size) == bytes(ref)
    assert_columns_hold(cfg, ref)


@pytest.mark.parametrize("inline", [True, False])
async def test_a_cancelled_write_back_starts_no_column_write(tmp_path, monkeypatch, inline):
    # When the volume's tasks end (a stop cut short), the columns are closed
    # after them: a write-back cancelled before it ran must not go on to
    # write (a closed column's EBADF would fail it, durably). Once seen as
    # all three columns IOFAIL after a test's simulated crash.
    monkeypatch.setattr(WhereWritten, "fail_name", None)
    cfg = raid5_config(tmp_path, size=2 * 8 * SU, raid5_log=tmp_path / "r5.r5log")
    async with running_volume(cfg, plex_factory=WhereWritten) as vol:
        for c in vol.columns:
            c.inline = inline
        with trio.CancelScope() as scope:
            scope.cancel()
            await vol._write_batch([(0, 0, b"x" * 4096), (1, 0, b"y" * 4096)])
        assert scope.cancelled_caught
        assert [c.on_loop for c in vol.columns] == [[], [], []]
        assert all(c.state == ACTIVE for c in vol.columns)


class StallingColumn(Plex):
    """Column `stall_name`'s writes sleep STALL (a disk or the dirty-page
    throttle making the writer wait: a voluntary sleep, as onloop.Hold
    counts it); counts those made on the event loop's thread."""

    stall_name: str | None = None

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.stalled_on_loop = 0

    def _pwrite_sync(self, off, data):
        if StallingColumn.stall_name == self.name:
            if threading.current_thread() is threading.main_thread():
                self.stalled_on_loop += 1
            time.sleep(0.02)
        super()._pwrite_sync(off, data)


async def test_a_column_that_stalls_in_the_write_back_leaves_the_event_loop_at_once(
        tmp_path, monkeypatch):
    # Its first slow write closes its hold (onloop.Hold): the batch's other
    # pieces of that column go to its thread, not one by one on the event
    # loop, which every volume and the admin socket share. From review 13:
    # checked only every 256 KiB, 64 writes of 20 ms held the loop 1.3 s.
    monkeypatch.setattr(StallingColumn, "stall_name", None)
    cfg = raid5_config(tmp_path, size=2 * 16 * SU, raid5_log=tmp_path / "r5.r5log")
    ref = bytearray(cfg.size)
    rnd = random.Random(3)
    async with running_volume(cfg, plex_factory=StallingColumn) as vol:
        c1 = vol.columns[1]
        async with vol.r5log._io:  # the committer waits: one batch of 100 writes
            for _ in range(100):
                off = rnd.randrange(0, vol.size - 4096) // 4096 * 4096
                data = rnd.randbytes(4096)
                await vol.pwrite(off, data)
                ref[off:off + 4096] = data
            StallingColumn.stall_name = c1.name
        with trio.fail_after(60):
            await vol.drain()
        StallingColumn.stall_name = None
        assert c1.stalled_on_loop == 1, c1.stalled_on_loop
        assert c1.slow_writes >= 1 and c1.state == ACTIVE
        assert await vol.pread(0, cfg.size) == bytes(ref)
    assert_columns_hold(cfg, ref)


@pytest.mark.allow_log(r"encoding a batch failed", r"acknowledged write\(s\) lost",
                       r"RAID-5 log .* failed")
async def test_a_bug_in_encoding_a_batch_fails_the_log_loudly_not_its_committer(
        tmp_path, monkeypatch):
    # Not an OSError (review 13: a crc32c without gil_release_mode raised
    # TypeError): the log fails as for a disk error, the fsync fails naming
    # it, the lost write is counted, and the volume goes on answering reads
    # and refusing writes, where a dead committer dropped the cache without
    # a word.
    from vmd import raid5log
    from vmd.volume import VolumeIOError

    cfg = raid5_config(tmp_path, size=2 * 8 * SU, raid5_log=tmp_path / "r5.r5log")
    ref = os.urandom(cfg.size)
    async with running_volume(cfg) as vol:
        await vol.pwrite(0, ref)
        await vol.flush()

        def broken(seq, pieces):
            raise TypeError("crc32c() takes no keyword arguments")

        monkeypatch.setattr(raid5log, "entry_buffers", broken)
        await vol.pwrite(4096, b"x" * 4096)  # answered from the cache
        with pytest.raises(OSError, match="encoding failed: TypeError"):
            await vol.sync()
        assert vol.r5log.failed and "encoding failed" in vol.r5log.failed
        assert vol.status()["raid5_log"]["lost_entries"] == 1
        with pytest.raises(VolumeIOError):
            await vol.pwrite(8192, b"y" * 4096)
        with trio.fail_after(30):
            await vol.drain()  # the failed batch dropped from the cache
        assert await vol.pread(0, cfg.size) == ref  # and it never reached a column
