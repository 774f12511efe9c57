"""A small read with no other request in progress (`alone`, which the FUSE
adapter tells the engine) is made on the event loop, blocking, instead of
through io_uring or a worker thread; a slow one moves the plex's reads off the loop
for a while, as a slow inline write does; a failing one fails its plex as any
read error does. Real image files; the plexes record the thread of each read."""

from __future__ import annotations

import errno
import os
import threading
import time

import pytest
import trio

from vmd.config import KiB, MiB
from vmd.fusefs import LONE_STREAK
from vmd.onloop import WATCH
from vmd.plex import PARALLEL_BYTES, Plex
from vmd.sidecar import ACTIVE, IOFAIL
from vmd.uring import Ring

from conftest import pwrite_file
from enginekit import evict_page_cache, plex_bytes, running_volume, volume_config
from raid5kit import raid5_config

SU = 64 * KiB  # raid5_config's stripe unit


def always_alone() -> bool:  # what the FUSE adapter answers with nothing else in progress
    return True


class WatchedPlex(Plex):
    """Records whether each blocking read of this image ran on the event
    loop's thread; p1 can be told to sleep in its next reads or fail them."""

    on_loop: list[tuple[str, bool]] = []
    sleep = 0.0
    fail = False

    def _pread_sync(self, off: int, size: int, into=None):
        WatchedPlex.on_loop.append((self.name, threading.current_thread() is threading.main_thread()))
        if self.name == "p1" and WatchedPlex.sleep:
            time.sleep(WatchedPlex.sleep)
        if self.name == "p1" and WatchedPlex.fail:
            raise OSError(errno.EIO, "injected read error")
        return super()._pread_sync(off, size, into)


def _reset() -> None:
    WatchedPlex.on_loop = []
    WatchedPlex.sleep = 0.0
    WatchedPlex.fail = False


async def test_a_small_read_alone_is_made_on_the_event_loop(tmp_path):
    _reset()
    vc = volume_config(tmp_path, nplex=2, size=4 * MiB)
    async with running_volume(vc, plex_factory=WatchedPlex) as vol:
        data = bytes(range(256)) * (4 * MiB // 256)
        await vol.pwrite(0, data)
        WatchedPlex.on_loop.clear()
        for i in range(8):  # round-robin: both plexes
            assert await vol.pread(i * 4096, 4096, alone=always_alone) == data[i * 4096:(i + 1) * 4096]
        assert len(WatchedPlex.on_loop) == 8 and all(main for _, main in WatchedPlex.on_loop)
        assert {name for name, _ in WatchedPlex.on_loop} == {"p0", "p1"}
        # Not alone (no answer, or another request came while it waited), or
        # big: not this way (a plex that overrides _pread_sync, as this one,
        # is never read through io_uring: its reads go to its worker threads,
        # after a page-cache probe that this subclass does not record).
        WatchedPlex.on_loop.clear()
        assert await vol.pread(0, 4096) == data[:4096]
        assert await vol.pread(0, 4096, alone=lambda: False) == data[:4096]
        assert await vol.pread(0, PARALLEL_BYTES, alone=always_alone) == data[:PARALLEL_BYTES]
        assert not any(main for _, main in WatchedPlex.on_loop)
        assert [p["slow_reads"] for p in vol.status()["plexes"]] == [0, 0]


async def test_a_slow_read_alone_moves_its_plex_off_the_event_loop(tmp_path):
    _reset()
    vc = volume_config(tmp_path, nplex=2, size=4 * MiB)
    async with running_volume(vc, plex_factory=WatchedPlex) as vol:
        p0, p1 = vol.plexes
        await vol.pwrite(0, b"r" * (1 * MiB))
        WatchedPlex.sleep = 0.01  # five times INLINE_BUDGET: a disk that stalls
        for i in range(2):  # one of them lands on p1
            assert await vol.pread(i * 4096, 4096, alone=always_alone) == b"r" * 4096
        assert p1.slow_reads == 1 and p0.slow_reads == 0
        assert not p1.read_inline() and p0.read_inline()
        assert p1.write_inline()  # a disk slow to read still takes page-cache writes
        assert vol.status()["plexes"][1]["slow_reads"] == 1
        # Held off the loop: p1's reads go elsewhere even when alone; p0's
        # stay on the loop.
        WatchedPlex.on_loop.clear()
        for i in range(4):
            assert await vol.pread(i * 4096, 4096, alone=always_alone) == b"r" * 4096
        assert ("p1", True) not in WatchedPlex.on_loop and ("p0", True) in WatchedPlex.on_loop
        assert p1.slow_reads == 1  # off the loop it is no stall of the loop


async def test_a_failing_read_alone_fails_its_plex_and_is_served_by_another(tmp_path):
    _reset()
    vc = volume_config(tmp_path, nplex=2, size=4 * MiB)
    async with running_volume(vc, plex_factory=WatchedPlex) as vol:
        p0, p1 = vol.plexes
        await vol.pwrite(0, b"s" * (1 * MiB))
        WatchedPlex.fail = True
        for i in range(2):  # one of them is tried on p1 first
            assert await vol.pread(i * 4096, 4096, alone=always_alone) == b"s" * 4096
        assert ("p1", True) in WatchedPlex.on_loop
        assert p1.state == IOFAIL and p0.state == ACTIVE
        assert "injected read error" in (p1.record.reason or "")
        await vol.pwrite(0, b"t" * 4096)  # the volume goes on, on p0
        assert plex_bytes(vol)[0][:4096] == b"t" * 4096


async def test_a_raid5_read_of_one_column_alone_is_made_on_the_event_loop(tmp_path):
    """A read within one data unit is one column's read: alone, it is made on
    the loop; a degraded read of the same unit reads the other columns in
    parallel, off the loop."""
    _reset()
    cfg = raid5_config(tmp_path, size=2 * 16 * SU)
    ref = os.urandom(cfg.size)
    async with running_volume(cfg, plex_factory=WatchedPlex) as vol:
        await vol.pwrite(0, ref)
        WatchedPlex.on_loop.clear()
        assert await vol.pread(SU + 4096, 4096, alone=always_alone) == ref[SU + 4096:SU + 8192]
        assert len(WatchedPlex.on_loop) == 1 and WatchedPlex.on_loop[0][1]
        column = WatchedPlex.on_loop[0][0]
        await vol.detach_plex(column)
        WatchedPlex.on_loop.clear()
        assert await vol.pread(SU + 4096, 4096, alone=always_alone) == ref[SU + 4096:SU + 8192]
        assert vol.degraded_reads == 1
        assert not any(main for _, main in WatchedPlex.on_loop)


async def test_with_io_uring_only_cold_reads_not_alone_go_through_the_ring(tmp_path):
    """The real plex (no test subclass): an alone read never reaches the
    ring; another read does if the page cache lacks it (Plex._probe_cache
    answers the others with one system call)."""
    vc = volume_config(tmp_path, nplex=2, size=4 * MiB)
    async with running_volume(vc) as vol:
        ring = Ring.get()
        if ring is None:
            pytest.skip("io_uring is not available on this machine (Ring.get() said why "
                        "in the log)")
        data = os.urandom(4 * MiB)
        await vol.pwrite(0, data)
        before = ring.submitted
        for i in range(8):
            assert await vol.pread(i * 4096, 4096, alone=always_alone) == data[i * 4096:(i + 1) * 4096]
        assert ring.submitted == before
        for i in range(8):
            assert await vol.pread(i * 4096, 4096) == data[i * 4096:(i + 1) * 4096]
        assert ring.submitted == before, "reads the page cache holds went through the ring"
        await vol.flush()
        evict_page_cache(p.record.path for p in vol.plexes)
        # Far apart, so that the kernel's read-ahead of one brings no other.
        for i in range(8):
            off = (i * 64 + 3) * 4096 * 2
            assert await vol.pread(off, 4096) == data[off:off + 4096]
        assert ring.submitted == before + 8


async def test_a_plex_held_for_slow_reads_gets_nothing_of_its_reads_on_the_loop(
        tmp_path, monkeypatch):
    """While a plex is held for slow reads, neither the page-cache probe nor
    a read-ahead hint (both system calls on the event loop) is made on it;
    once the hold ends, both are again."""
    vc = volume_config(tmp_path, nplex=2, size=4 * MiB)
    async with running_volume(vc) as vol:
        data = os.urandom(1 * MiB)
        await vol.pwrite(0, data)
        p = vol.plexes[0]
        calls: list[str] = []
        real_probe, real_advise = p._pread_cached, os.posix_fadvise
        monkeypatch.setattr(p, "_pread_cached",
                            lambda *a: calls.append("probe") or real_probe(*a))
        monkeypatch.setattr(os, "posix_fadvise",
                            lambda *a: calls.append("hint") or real_advise(*a))
        p.read_hold.until = time.monotonic() + 3600  # as after a slow read
        assert await p.pread(8192, 4096, ahead=(0, 65536)) == data[8192:12288]
        p.will_read(0, 65536)
        assert calls == []
        p.read_hold.until = 0.0
        assert await p.pread(8192, 4096, ahead=(0, 65536)) == data[8192:12288]
        p.will_read(0, 65536)
        assert calls == ["probe", "hint"]


async def test_a_read_that_holds_the_event_loop_is_named_in_the_log(tmp_path, caplog, monkeypatch):
    """A disk that stops answering holds a lone read, and the event loop with
    it: the watch thread says which plex and what call, and again when it
    returned. A 2 s 'hang' against a watch of 0.2 s."""
    _reset()
    monkeypatch.setattr(WATCH, "after", 0.2)
    WATCH.start()
    try:
        vc = volume_config(tmp_path, nplex=2, size=4 * MiB)
        async with running_volume(vc, plex_factory=WatchedPlex) as vol:
            await vol.pwrite(0, b"h" * (1 * MiB))
            WatchedPlex.sleep = 2.0
            for i in range(2):  # one of them lands on p1
                assert await vol.pread(i * 4096, 4096, alone=always_alone) == b"h" * 4096
            WatchedPlex.sleep = 0.0
            deadline = time.monotonic() + 10
            while "returned after" not in caplog.text and time.monotonic() < deadline:
                await trio.sleep(0.05)
    finally:
        WATCH.stop()
    # p1's: p0's fast read, preempted for 0.2 s on a busy machine, may be named too.
    held = [r for r in caplog.records if "has held the event loop" in r.getMessage()
            and "plex p1" in r.getMessage()]
    assert len(held) == 1 and held[0].levelname == "ERROR"
    assert "a read at offset" in held[0].getMessage()
    assert str(vc.plexes[1]) in held[0].getMessage()
    assert "the read at offset" in caplog.text and "returned after" in caplog.text


@pytest.mark.mount
def test_through_a_mount_reads_one_at_a_time_are_made_on_the_event_loop(vmd_factory) -> None:
    """The FUSE adapter's count of requests in progress, through a real
    mount (direct_io: every read reaches vmd): reads one at a time are alone
    once LONE_STREAK requests in a row were, also after writes, an fsync and
    a write the volume refuses (the count comes back to zero whatever a
    handler ends in)."""
    d = vmd_factory().start()
    f = d.volume_file("vol0")
    data = os.urandom(1 * MiB)
    pwrite_file(f, [(0, data)])  # fsyncs
    fd = os.open(f, os.O_RDWR)
    try:
        os.pwrite(fd, data[:4096], 0)
        os.fsync(fd)
        with pytest.raises(OSError):
            os.pwrite(fd, b"x" * 4096, os.fstat(fd).st_size)  # past the end: refused
        for i in range(LONE_STREAK):
            assert os.pread(fd, 4096, i * 4096) == data[i * 4096:(i + 1) * 4096]
        before = counts(d)
        for i in range(32):
            assert os.pread(fd, 4096, i * 4096) == data[i * 4096:(i + 1) * 4096]
    finally:
        os.close(fd)
    after = counts(d)
    # Each read inline, unless one slept for over 2 ms (a busy machine) and
    # held that plex's reads off the loop for a while.
    assert after[0] - before[0] == 32 or (after[1] > before[1] and after[0] > before[0]), \
        (before, after)


def counts(d) -> tuple[int, int]:
    """(inline_reads, slow_reads) of vol0's plexes, summed."""
    plexes = d.status("vol0")["plexes"]
    return sum(p["inline_reads"] for p in plexes), sum(p["slow_reads"] for p in plexes)
