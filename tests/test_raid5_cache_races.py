"""The RAID-5 write-back cache against the paths that look at the columns on
their own (data_ranges), and faults during write-back: a sidecar that fails,
a stop that cancels the recording of a failed log, a rebuild after a log
failure."""

from __future__ import annotations

import errno
import os

import pytest
import trio

from vmd.config import KiB

from enginekit import running_volume
from raid5kit import column_bytes, decode, raid5_config, xor_all

SU = 64 * KiB


async def test_data_ranges_reports_a_stripe_written_back_while_the_columns_are_asked(tmp_path):
    cfg = raid5_config(tmp_path, size=2 * 16 * SU, raid5_log=tmp_path / "r5.r5log")
    async with running_volume(cfg) as vol:
        release, held = trio.Event(), trio.Event()

        async def holder() -> None:
            async with vol.r5log._io:  # the committer cannot sync: the write stays cached
                held.set()
                await release.wait()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(holder)
            await held.wait()
            s = 5
            await vol.pwrite(s * vol.width + 100, b"D" * 4096)  # acknowledged, cached
            assert vol.r5log.cache.holds_stripes(s, s + 1)
            last = vol.columns[-1]
            allocated = last.allocated

            async def allocated_then_write_back(off: int, size: int):
                got = await allocated(off, size)
                # The write-back completes between the columns' answers and
                # anything data_ranges looks at after them.
                release.set()
                await vol.r5log.drain()
                return got

            last.allocated = allocated_then_write_back
            try:
                ranges = await vol.data_ranges(0, vol.size)
            finally:
                del last.allocated
        assert not vol.r5log.cache
        assert await vol.pread(s * vol.width + 100, 4096) == b"D" * 4096
        assert any(a <= s * vol.width < a + n for a, n in ranges), \
            f"stripe {s} holds an acknowledged write but data_ranges said {ranges}"


@pytest.mark.allow_log("cannot record", "is now IOFAIL")
async def test_a_sidecar_failure_during_write_back_fails_the_volume_not_the_daemon(tmp_path):
    cfg = raid5_config(tmp_path, size=2 * 16 * SU, raid5_log=tmp_path / "r5.r5log")
    ref = os.urandom(cfg.size)
    async with running_volume(cfg, shutdown=False) as vol:
        await vol.pwrite(0, ref)
        await vol.flush()
        async with vol.r5log._io:  # the committer cannot sync: the write stays cached
            await vol.pwrite(3 * vol.width, b"w" * 4096)
            c = vol.data_col(3, 0)
            # Out before its piece is written back: the write-back records
            # the stripe in its map, with a checkpoint the sidecar refuses.
            await vol.fail_plex(vol.columns[c], OSError(errno.EIO, "injected"), 0, 0)

            async def failing_checkpoint() -> None:
                raise OSError(errno.EIO, "injected: the sidecar disk failed")

            vol.checkpoint = failing_checkpoint
        with trio.fail_after(30):
            await vol.r5log.drain()
        assert vol.error is not None and "sidecar disk failed" in vol.error, vol.error
        with pytest.raises(OSError) as e:
            await vol.pwrite(0, b"x")
        assert e.value.errno == errno.EIO
        assert await vol.pread(3 * vol.width, 4096) == b"w" * 4096  # reads still served


@pytest.mark.allow_log("RAID-5 log", "retire failed")
async def test_a_stop_during_the_flush_after_the_log_failed_still_stops_naming_it_in_use(
        tmp_path):
    from trio.testing import wait_all_tasks_blocked

    from vmd.raid5log import IN_USE

    cfg = raid5_config(tmp_path, size=2 * 16 * SU, raid5_log=tmp_path / "r5.r5log")
    async with running_volume(cfg) as vol:
        r5log = vol.r5log
        await vol.pwrite(0, b"a" * 4096)
        await vol.drain()
        assert vol.state.extra.get(IN_USE) == str(r5log.path)

        def failing_rewind(seq: int) -> None:
            raise OSError(errno.EIO, "injected: the log disk failed")

        r5log._rewind_sync = failing_rewind
        flush_columns = vol.flush_columns
        entered, release = trio.Event(), trio.Event()

        async def slow_flush_after_the_failure() -> None:
            if r5log.failed is not None:
                entered.set()
                await release.wait()
            await flush_columns()

        vol.flush_columns = slow_flush_after_the_failure
        r5log._retire_due.set()  # the retirer's rewind fails; it flushes the columns
        with trio.fail_after(30):
            await entered.wait()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(r5log.stop)  # `vmd stop` ends the retirer
                await wait_all_tasks_blocked()
                release.set()
        assert IN_USE not in vol.state.extra, "a failed RAID-5 log is still named in use"
    # Durably: the next start does not trust (replay) the failed log.
    async with running_volume(cfg) as vol:
        assert vol.replayed_entries == 0
        assert await vol.pread(0, 4096) == b"a" * 4096


@pytest.mark.allow_log("RAID-5 log", "lost", "is now IOFAIL", "full rebuild")
async def test_a_rebuild_finishes_after_the_log_lost_a_batch_and_an_fsync_still_reports_it(
        tmp_path):
    from vmd.sidecar import ACTIVE

    cfg = raid5_config(tmp_path, size=2 * 16 * SU, raid5_log=tmp_path / "r5.r5log")
    ref = os.urandom(cfg.size)
    async with running_volume(cfg) as vol:
        await vol.pwrite(0, ref)
        await vol.sync()
        r5log = vol.r5log
        write = r5log._write_sync

        def failing_disk(bufs: list, at: int) -> None:
            raise OSError(errno.EIO, "injected: the log disk failed")

        r5log._write_sync = failing_disk
        await vol.pwrite(vol.width + 100, b"lost" * 1000)  # answered from the cache
        with trio.fail_after(30):
            await r5log.drain()
        r5log._write_sync = write
        assert r5log.lost == 1
        # A column is replaced: its rebuild's commits flush the columns.
        await vol.detach_plex("c1")
        await vol.attach_plex("c1", path=str(tmp_path / "new-c1.img"))
        with trio.fail_after(20):
            while vol.columns[1].state != ACTIVE:
                await vol.resync.wait_idle()
        assert await vol.pread(0, cfg.size) == ref  # the lost write is nowhere
        with pytest.raises(OSError, match="RAID-5 log .* failed"):  # an fsync reports it
            await vol.sync()
    cols = [(tmp_path / "new-c1.img").read_bytes() if i == 1 else b
            for i, b in enumerate(column_bytes(cfg))]
    assert decode(cols, SU) == ref
    assert not any(xor_all(cols))


@pytest.mark.allow_log("RAID-5 log")
async def test_a_stop_cut_short_closes_no_column_while_the_write_back_writes_to_it(tmp_path):
    import threading

    from trio.testing import wait_all_tasks_blocked

    cfg = raid5_config(tmp_path, size=2 * 16 * SU, raid5_log=tmp_path / "r5.r5log")
    async with running_volume(cfg, shutdown=False) as vol:
        col = vol.columns[vol.data_col(2, 0)]
        entered, release = threading.Event(), threading.Event()
        pwrite = col._pwrite_sync

        def slow_pwrite(off: int, data) -> None:
            entered.set()
            release.wait(60)
            pwrite(off, data)

        col._pwrite_sync = slow_pwrite
        col.inline = False  # a slow disk's: written back in its thread, not from the loop
        await vol.pwrite(2 * vol.width, b"w" * 4096)
        with trio.fail_after(30):
            await trio.to_thread.run_sync(entered.wait)  # the write-back is in its thread
            async with trio.open_nursery() as nursery:
                stopped = trio.CancelScope()

                async def stop() -> None:
                    with stopped:
                        await vol.shutdown()

                nursery.start_soon(stop)
                await wait_all_tasks_blocked()
                stopped.cancel()  # the daemon's SHUTDOWN_SECONDS ran out
                await wait_all_tasks_blocked()
                try:
                    assert col.fd >= 0, "a column was closed while a write-back thread wrote to it"
                finally:
                    release.set()
        assert col.fd < 0 and vol.r5log.fd < 0  # closed once the thread was done
        with open(col.record.path, "rb") as f:
            assert os.pread(f.fileno(), 4096, 2 * SU) == b"w" * 4096
