"""RAID-5 engine races: writes and degraded reads of one stripe, and the RAID-5
log's retire against new writes, its write errors, and its background tasks."""

from __future__ import annotations

import os
import random

import pytest
import trio
import trio.testing

from vmd.config import KiB

from enginekit import running_volume
from raid5kit import column_bytes, decode, raid5_config, xor_all

SU = 64 * KiB


async def test_concurrent_writes_to_units_of_one_stripe_keep_parity(tmp_path):
    # Each small write reads old data or parity and rewrites the stripe's
    # parity: two of them on different units of one stripe must not both
    # start from the parity the other is replacing.
    cfg = raid5_config(tmp_path, ncol=4, size=3 * 8 * SU)
    ref = bytearray(os.urandom(cfg.size))
    rnd = random.Random(2)
    async with running_volume(cfg) as vol:
        await vol.pwrite(0, bytes(ref))
        s = 3
        base = s * vol.width
        for _ in range(20):
            async with trio.open_nursery() as nursery:
                for k in range(3):
                    for j in range(2):  # disjoint: the order of the writes does not matter
                        at = base + k * SU + j * SU // 2 + rnd.randrange(0, SU // 2 - 8192)
                        data = os.urandom(rnd.randint(1, 8192))
                        ref[at:at + len(data)] = data
                        nursery.start_soon(vol.pwrite, at, data)
        await vol.flush()
        assert await vol.pread(0, cfg.size) == bytes(ref)
        cols = column_bytes(cfg)
        assert decode(cols, SU) == bytes(ref)
        assert not any(xor_all(cols)), "parity of the stripe does not match its data"
        # Each unit of the stripe read back from the others (its column out).
        for k in range(3):
            c = vol.data_col(s, k)
            name = vol.columns[c].name
            await vol.detach_plex(name)
            assert await vol.pread(base + k * SU, SU) == bytes(ref[base + k * SU:
                                                                   base + (k + 1) * SU])
            await vol.attach_plex(name)
            await vol.resync.wait_idle()


async def test_range_lock_serves_overlapping_ranges_in_arrival_order():
    # Whole-stripe locks make many writes overlap: a waiting range must not
    # be overtaken forever by later ones (a stream of writes starving a read).
    from vmd.rangelock import RangeLock

    lock = RangeLock()
    order: list[str] = []

    async def take(name: str, start: int, end: int) -> None:
        async with lock.hold(start, end):
            order.append(name)
            await trio.sleep(0.01)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(take, "first", 0, 10)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(take, "wide", 0, 100)  # waits for "first"
        await trio.testing.wait_all_tasks_blocked()
        async with trio.open_nursery() as gone:  # queued behind "wide", then cancelled
            gone.start_soon(take, "cancelled", 0, 100)
            await trio.testing.wait_all_tasks_blocked()
            gone.cancel_scope.cancel()
        nursery.start_soon(take, "late", 50, 60)  # free now, but "wide" asked first
    assert order == ["first", "wide", "late"]


async def test_degraded_reads_racing_writes_to_the_same_stripe(tmp_path):
    # A unit of the detached column is the XOR of the stripe's other units:
    # a write to one of them between the reconstruction's reads would make
    # it return bytes nobody wrote.
    cfg = raid5_config(tmp_path, ncol=4, size=3 * 8 * SU)
    ref = os.urandom(cfg.size)
    async with running_volume(cfg) as vol:
        await vol.pwrite(0, ref)
        s = 2
        base = s * vol.width
        lost = vol.data_col(s, 0)
        await vol.detach_plex(vol.columns[lost].name)
        for p in vol.columns:
            # Every read and write in a worker thread, as on a slow disk: the
            # reconstruction's reads run beside the writes.
            p.inline = p._nowait_reads = False
        want = ref[base:base + SU]
        done = trio.Event()
        bad: list[int] = []

        async def writer(k: int) -> None:
            rnd = random.Random(k)
            while not done.is_set():
                at = base + k * SU + rnd.randrange(0, SU // 2)
                await vol.pwrite(at, os.urandom(rnd.randint(1, SU // 2)))
                await trio.sleep(0)

        async def reader() -> None:
            for i in range(300):
                if await vol.pread(base, SU) != want:
                    bad.append(i)
                await trio.sleep(0)
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer, 1)
            nursery.start_soon(writer, 2)
            nursery.start_soon(reader)
        assert vol.degraded_reads >= 300
        assert not bad, f"{len(bad)} of 300 degraded reads returned bytes nobody wrote"


class _Blocked:
    """A worker-thread step the test holds until it says go: `entered` is
    set (thread side) when the step is reached."""

    def __init__(self) -> None:
        import threading

        self.entered = threading.Event()
        self.go = threading.Event()

    def wait_here(self) -> None:
        self.entered.set()
        assert self.go.wait(30), "the test never let the blocked step go"

    async def until_entered(self) -> None:
        assert await trio.to_thread.run_sync(self.entered.wait, 30)


async def test_log_retire_racing_new_writes_keeps_them_for_replay(tmp_path, monkeypatch):
    from vmd.raid5log import Raid5Log

    blocked = _Blocked()
    rewind = Raid5Log._rewind_sync

    def slow_rewind(self: Raid5Log, seq: int) -> None:
        blocked.wait_here()  # the header's fdatasync takes long
        rewind(self, seq)

    monkeypatch.setattr(Raid5Log, "_rewind_sync", slow_rewind)
    cfg = raid5_config(tmp_path, size=2 * 8 * SU, raid5_log=tmp_path / "r5.r5log")
    ref = bytearray(os.urandom(cfg.size))
    async with running_volume(cfg, shutdown=False) as vol:
        await vol.pwrite(0, bytes(ref))
        await vol.drain()  # out of the write-back cache: nothing in flight, a retire can run
        async with trio.open_nursery() as nursery:
            nursery.start_soon(vol.r5log.retire)
            await blocked.until_entered()
            # A write while the rewind is in its thread: its entry must not
            # be placed where the rewound header says nothing follows.
            d1 = os.urandom(4096)
            ref[vol.width:vol.width + 4096] = d1
            seq = vol.r5log.seq
            nursery.start_soon(vol.pwrite, vol.width, d1)
            with trio.fail_after(30):
                while vol.r5log.seq == seq:  # past the DRL: its entry is handed to the log
                    await trio.sleep(0.01)
            await trio.testing.wait_all_tasks_blocked(0.05)  # and the committer has it
            blocked.go.set()
        d2 = os.urandom(4096)
        await vol.pwrite(2 * vol.width, d2)
        await vol.drain()  # committed and written: the crash below cuts nothing more
        ref[2 * vol.width:2 * vol.width + 4096] = d2
        entries = vol.r5log.seq - vol.r5log.retired
        pcol = vol.parity_col(2)
    # The crash lost the parity write of the last (logged, acknowledged) write.
    with open(cfg.plexes[pcol], "r+b") as f:
        f.seek(2 * SU)
        f.write(os.urandom(4096))
    async with running_volume(cfg) as vol:
        assert vol.replayed_entries == entries == 2
        assert await vol.pread(0, cfg.size) == bytes(ref)
    cols = column_bytes(cfg)
    assert not any(xor_all(cols)), "a replay skipped acknowledged entries"


async def test_a_log_write_error_refuses_writes_without_a_hang_or_a_gap(tmp_path, monkeypatch):
    import errno

    from vmd.raid5log import Raid5Log

    fail = [False]
    write = Raid5Log._write_sync

    def failing_disk(self: Raid5Log, bufs: list, at: int) -> None:
        if fail[0]:
            blob = b"".join(bufs)
            os.pwrite(self.fd, blob[:len(blob) // 2], at)  # half of it reached the disk
            raise OSError(errno.EIO, "injected: the log disk failed")
        write(self, bufs, at)

    monkeypatch.setattr(Raid5Log, "_write_sync", failing_disk)
    monkeypatch.setattr("vmd.raid5log.RETIRE_SECONDS", 3600)
    cfg = raid5_config(tmp_path, size=2 * 8 * SU, raid5_log=tmp_path / "r5.r5log")
    ref = os.urandom(cfg.size)
    async with running_volume(cfg, shutdown=False) as vol:
        await vol.pwrite(0, ref)
        await vol.sync()
        fail[0] = True
        # Answered from the write-back cache; the fsync learns that its entry
        # never became durable, and it never reaches the columns.
        await vol.pwrite(vol.width, b"new" * 100)
        with pytest.raises(OSError, match="log disk failed") as ei:
            await vol.sync()
        assert ei.value.errno == errno.EIO
        # The columns' flush goes on (a rebuild, verify, the DRL need it):
        # reporting the loss is the fsync's job, every time.
        await vol.flush()
        with pytest.raises(OSError, match="log disk failed"):
            await vol.sync()
        fail[0] = False  # the disk is back: entries after a gap would still be lost
        st = vol.status()["raid5_log"]
        assert st["in_flight"] == 0 and st["failed"], st  # a retire can still run
        with pytest.raises(OSError, match="RAID-5 log .* failed") as ei:
            await vol.pwrite(2 * vol.width, b"later" * 100)
        assert ei.value.errno == errno.EIO
        assert await vol.pread(0, cfg.size) == ref  # reads go on
        assert "raid5_log" not in vol.state.extra  # durably: not trusted at a restart
    async with running_volume(cfg) as vol:
        assert vol.replayed_entries == 0 and vol.recovered_regions > 0
        with trio.fail_after(30):
            await vol.resync.wait_idle()
        assert await vol.pread(0, cfg.size) == ref
        await vol.pwrite(2 * vol.width, b"later" * 100)  # a new log, in use
    assert not any(xor_all(column_bytes(cfg)))


async def test_a_failing_background_retire_fails_the_volume_not_the_daemon(tmp_path, monkeypatch):
    from vmd.raid5log import Raid5Log

    def failing_rewind(self: Raid5Log, seq: int) -> None:
        raise OSError(5, "injected: the log header cannot be written")

    monkeypatch.setattr(Raid5Log, "_rewind_sync", failing_rewind)
    monkeypatch.setattr("vmd.raid5log.RETIRE_AT", 64 * KiB)  # a retire after the first write
    cfg = raid5_config(tmp_path, size=2 * 8 * SU, raid5_log=tmp_path / "r5.r5log")
    async with running_volume(cfg) as vol:
        await vol.pwrite(0, os.urandom(vol.width))
        with trio.fail_after(30):
            while vol.r5log.failed is None:
                await trio.sleep(0.01)
        assert "log header cannot be written" in vol.error
        with pytest.raises(OSError, match="refus|failed"):
            await vol.pwrite(0, b"x")


async def test_stop_waits_for_a_background_retire_before_closing(tmp_path, monkeypatch):
    from vmd.raid5log import Raid5Log

    blocked = _Blocked()
    rewind = Raid5Log._rewind_sync

    def slow_rewind(self: Raid5Log, seq: int) -> None:
        blocked.wait_here()
        rewind(self, seq)

    monkeypatch.setattr(Raid5Log, "_rewind_sync", slow_rewind)
    monkeypatch.setattr("vmd.raid5log.RETIRE_AT", 64 * KiB)
    cfg = raid5_config(tmp_path, size=2 * 8 * SU, raid5_log=tmp_path / "r5.r5log")
    ref = os.urandom(cfg.size)
    async with running_volume(cfg, shutdown=False) as vol:
        await vol.pwrite(0, ref)
        await blocked.until_entered()  # the background retire is in its rewind
        async with trio.open_nursery() as nursery:
            nursery.start_soon(vol.shutdown)
            await trio.testing.wait_all_tasks_blocked(0.05)
            assert vol.r5log.fd >= 0 and all(p.fd >= 0 for p in vol.columns), \
                "the volume closed its files under a running retire"
            blocked.go.set()
        assert vol.r5log.fd < 0 and vol.state.clean
    async with running_volume(cfg) as vol:
        assert vol.replayed_entries == 0 and vol.recovered_regions == 0
        assert await vol.pread(0, cfg.size) == ref


async def test_writers_waiting_on_the_log_are_answered_when_its_committer_ends(tmp_path):
    # A writer's fsync waits for its entry's commit: the committer's end must
    # answer it, not leave it hung.
    cfg = raid5_config(tmp_path, size=2 * 8 * SU, raid5_log=tmp_path / "r5.r5log")
    answer: list[BaseException] = []
    ended = trio.Event()
    vol_scope = trio.CancelScope()

    async def volume_tasks(task_status=trio.TASK_STATUS_IGNORED) -> None:
        with vol_scope:
            async with running_volume(cfg, shutdown=False) as vol:
                task_status.started(vol)
                await trio.sleep_forever()
        ended.set()

    async def writer(vol) -> None:
        try:
            await vol.pwrite(0, b"x" * 4096)
            await vol.sync()
        except OSError as e:
            answer.append(e)

    async with trio.open_nursery() as nursery:
        vol = await nursery.start(volume_tasks)
        try:
            async with vol.r5log._io:  # the committer cannot place the next batch
                nursery.start_soon(writer, vol)
                with trio.fail_after(30):
                    while not vol.r5log._inflight:  # past the DRL, its entry in the batch
                        await trio.sleep(0.01)
                await trio.testing.wait_all_tasks_blocked(0.05)  # and it waits in sync
                vol_scope.cancel()  # the volume's tasks end, the committer with them
                await ended.wait()
            await trio.testing.wait_all_tasks_blocked()
            assert answer, "a writer waits for a committer that is gone"
        finally:
            vol.r5log._ended = True  # never hang the test itself
            vol.r5log._progressed()
    assert "stopped" in str(answer[0]) and not vol.r5log._inflight
