"""The mirror engine without FUSE: fan-out, round-robin, errors, resync."""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

from vmd.config import KiB, MiB
from vmd import onloop
from vmd.plex import Plex
from vmd.sidecar import ACTIVE, IOFAIL, SYNCING

from enginekit import plex_bytes, random_writes, running_volume, volume_config


class Rendezvous:
    """Plex writes wait here until `parties` of them with the same key have started.
    Writes issued one after another never meet: the first waits out the timeout
    (generous, for a busy machine) and the failure is recorded for the test to
    assert on; from then on no write waits, so a broken test ends quickly."""

    def __init__(self, parties: int, key: Callable[[int, bytes], Hashable],
                 timeout: float = 10.0):
        self.parties, self.key, self.timeout = parties, key, timeout
        self.failures: list[str] = []
        self._barriers: dict[Hashable, threading.Barrier] = {}
        self._lock = threading.Lock()

    def arrive(self, off: int, data: bytes) -> None:
        k = self.key(off, data)
        with self._lock:
            if self.failures:
                return
            b = self._barriers.setdefault(k, threading.Barrier(self.parties))
        try:
            if b.wait(self.timeout) == 0:
                # All parties have passed: a later write with the same key (issued
                # after this one completes) meets at a new barrier.
                with self._lock:
                    del self._barriers[k]
        except threading.BrokenBarrierError:
            with self._lock:
                self.failures.append(f"the write of {len(data)} bytes at {off} waited "
                                     f"{self.timeout} s for the other {self.parties - 1}")


class SlowPlex(Plex):
    """A plex whose writes block (like a slow disk's) until every write they must
    run in parallel with has started: see Rendezvous. No timing is measured."""

    rendezvous: Rendezvous | None = None

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.inline = False  # its writes block: never from the event loop

    def _pwrite_sync(self, off: int, data: bytes | memoryview) -> None:
        if SlowPlex.rendezvous is not None:
            SlowPlex.rendezvous.arrive(off, bytes(data))
        super()._pwrite_sync(off, data)


class FaultyPlex(Plex):
    """Plex p1 fails reads or writes with EIO once told to."""

    fail_writes = False
    fail_reads = False
    fail_flush = False

    def _pwrite_sync(self, off: int, data: bytes | memoryview) -> None:
        if self.name == "p1" and FaultyPlex.fail_writes:
            raise OSError(errno.EIO, "injected write error")
        super()._pwrite_sync(off, data)

    def _pread_sync(self, off: int, size: int, into=None):
        if self.name == "p1" and FaultyPlex.fail_reads:
            raise OSError(errno.EIO, "injected read error")
        return super()._pread_sync(off, size, into)

    def _flush_sync(self, fd=None):
        if self.name == "p1" and FaultyPlex.fail_flush:
            raise OSError(errno.EIO, "injected fdatasync error")
        super()._flush_sync(fd)

    def _pread_cached(self, off: int, size: int):
        if self.name == "p1" and FaultyPlex.fail_reads:
            raise OSError(errno.EIO, "injected read error")
        return super()._pread_cached(off, size)


@pytest.fixture
def rendezvous() -> Iterator[Callable[..., Rendezvous]]:
    def arm(parties: int, key: Callable[[int, bytes], Hashable]) -> Rendezvous:
        SlowPlex.rendezvous = Rendezvous(parties, key)
        return SlowPlex.rendezvous

    yield arm
    SlowPlex.rendezvous = None


async def test_slow_plexes_are_written_in_parallel(tmp_path, rendezvous):
    vc = volume_config(tmp_path, nplex=2)
    async with running_volume(vc, plex_factory=SlowPlex) as vol:
        # Each request's two plex writes (same offset, same data) must both have
        # started before either may finish: a serial fan-out never gets there.
        rv = rendezvous(2, lambda off, data: (off, data))
        for i in range(8):
            await vol.pwrite(4096 * i, os.urandom(4096))
    assert not rv.failures, f"plex writes of one request ran one after another: {rv.failures}"


async def test_three_slow_plexes_and_concurrent_writers_overlap(tmp_path, rendezvous):
    vc = volume_config(tmp_path, nplex=3)
    async with running_volume(vc, plex_factory=SlowPlex) as vol:
        # Concurrent writers to distinct ranges overlap too: all 4 x 3 plex writes
        # must be under way at once.
        rv = rendezvous(4 * 3, lambda off, data: "all")
        async with trio.open_nursery() as n:
            for i in range(4):
                n.start_soon(vol.pwrite, 8192 * i, b"y" * 4096)
    assert not rv.failures, f"plex writes did not all overlap: {rv.failures}"


async def test_writes_reach_every_plex_and_reads_round_robin(tmp_path):
    vc = volume_config(tmp_path, nplex=2)
    ref = bytearray(vc.size)
    async with running_volume(vc) as vol:
        await random_writes(vol, ref, 50)
        before = [p.reads for p in vol.plexes]
        for i in range(40):
            assert await vol.pread(i * 4096, 4096) == ref[i * 4096:(i + 1) * 4096]
        got = [p.reads - b for p, b in zip(vol.plexes, before)]
        assert got == [20, 20], got
        # Reads past the end are EOF, writes past the end are errors.
        assert await vol.pread(vc.size, 4096) == b""
        assert len(await vol.pread(vc.size - 100, 4096)) == 100
        with pytest.raises(OSError) as e:
            await vol.pwrite(vc.size - 10, b"z" * 20)
        assert e.value.errno == errno.ENOSPC
    assert plex_bytes(vol) == [bytes(ref)] * 2


async def test_write_error_detaches_plex_and_write_succeeds(tmp_path):
    vc = volume_config(tmp_path, nplex=2)
    ref = bytearray(vc.size)
    FaultyPlex.fail_writes = False
    async with running_volume(vc, plex_factory=FaultyPlex) as vol:
        await random_writes(vol, ref, 10)
        # Once the DRL has cleaned (data synced), the map after a failure holds
        # only what the plex missed; before, it holds every region not yet clean.
        with trio.fail_after(5):
            while vol.state.drl.count():
                await trio.sleep(0.05)
        FaultyPlex.fail_writes = True
        try:
            await vol.pwrite(5 * MiB, b"a" * 8192)
            ref[5 * MiB:5 * MiB + 8192] = b"a" * 8192
        finally:
            FaultyPlex.fail_writes = False
        p1 = vol.plex("p1")
        assert p1.state == IOFAIL
        assert "injected write error" in p1.record.reason
        # 5 MiB's region was dirtied by the failed write itself: 1 MiB at most.
        assert p1.record.missing.bytes_covered() <= MiB
        # It missed the write: its FastResync map says so.
        assert p1.record.missing.any_in(5 * MiB, 8192)
        for _ in range(4):  # reads now come from p0 only
            assert await vol.pread(5 * MiB, 8192) == ref[5 * MiB:5 * MiB + 8192]
        await random_writes(vol, ref, 10, seed=2)
        st = vol.status()
        assert [p["state"] for p in st["plexes"]] == [ACTIVE, IOFAIL]
        await vol.attach_plex("p1")
        await vol.resync.wait_idle()
        assert vol.plex("p1").state == ACTIVE
        # Only what it missed was copied, not the whole 16 MiB.
        assert 0 < vol.resync.copied_bytes < vc.size // 2
    assert plex_bytes(vol) == [bytes(ref)] * 2


async def test_read_error_retries_other_plex_and_detaches(tmp_path):
    vc = volume_config(tmp_path, nplex=2)
    ref = bytearray(vc.size)
    async with running_volume(vc, plex_factory=FaultyPlex) as vol:
        await random_writes(vol, ref, 10)
        FaultyPlex.fail_reads = True
        try:
            for i in range(4):
                assert await vol.pread(i * MiB, 64 * KiB) == ref[i * MiB:i * MiB + 64 * KiB]
        finally:
            FaultyPlex.fail_reads = False
        assert vol.plex("p1").state == IOFAIL
        assert vol.plex("p0").state == ACTIVE


async def test_no_plex_takes_write_is_eio(tmp_path):
    vc = volume_config(tmp_path, nplex=1)

    class AlwaysFails(Plex):
        def _pwrite_sync(self, off, data):
            raise OSError(errno.EIO, "dead disk")

    async with running_volume(vc, plex_factory=AlwaysFails, shutdown=False) as vol:
        with pytest.raises(OSError) as e:
            await vol.pwrite(0, b"q" * 512)
        assert e.value.errno == errno.EIO


async def test_full_resync_races_with_random_writes(tmp_path):
    vc = volume_config(tmp_path, size=32 * MiB, nplex=2)
    ref = bytearray(vc.size)
    # Slow resync (8 MiB/s) so that writes land before, inside and after chunks.
    async with running_volume(vc, rate_limit=8 * MiB) as vol:
        await random_writes(vol, ref, 40, seed=3)
        p = await vol.add_plex(str(tmp_path / "new.img"))
        assert p.state == SYNCING
        writes_during = 0
        while vol.resync.running or vol.resync.targets():
            await random_writes(vol, ref, 5, seed=100 + writes_during, max_len=600 * KiB)
            writes_during += 5
            # reads never come from the SYNCING plex
            assert await vol.pread(0, 4096) == ref[:4096]
            await trio.sleep(0.01)
        assert writes_during >= 20
        assert p.state == ACTIVE
        assert vol.resync.synced_bytes == vc.size  # a full resync (holes skipped)
    assert plex_bytes(vol) == [bytes(ref)] * 3


async def test_detach_attach_copies_only_what_changed(tmp_path):
    vc = volume_config(tmp_path, size=64 * MiB, nplex=2)
    ref = bytearray(vc.size)
    async with running_volume(vc) as vol:
        await random_writes(vol, ref, 20)
        await vol.detach_plex("p1")
        for i in (3, 17, 40):  # three 64 KiB regions
            data = os.urandom(64 * KiB)
            await vol.pwrite(i * 64 * KiB, data)
            ref[i * 64 * KiB:(i + 1) * 64 * KiB] = data
        st = vol.status()["plexes"][1]
        assert st["state"] == "DETACHED" and st["missing_bytes"] == 3 * 64 * KiB
        reply = await vol.attach_plex("p1")
        assert not reply["full_resync"]
        await vol.resync.wait_idle()
        assert vol.resync.copied_bytes == 3 * 64 * KiB
    assert plex_bytes(vol) == [bytes(ref)] * 2


class ReadAheadPlex(Plex):
    """Records resync's read-ahead hints and copies, in order."""

    events: list[tuple[str, str, int, int]] = []

    def will_read(self, off: int, size: int) -> None:
        ReadAheadPlex.events.append(("hint", self.name, off, size))
        super().will_read(off, size)

    async def copy_to(self, targets: list[Plex], off: int, size: int,
                      buf: bytearray, **kw: Any) -> tuple[dict[str, Any], int]:
        ReadAheadPlex.events.append(("copy", self.name, off, size))
        return await super().copy_to(targets, off, size, buf, **kw)


async def test_reattach_reads_scattered_regions_ahead_from_one_source(tmp_path):
    """A FastResync map is scattered 64 KiB runs: their reads are started
    ahead of the copy (one seek each otherwise), from the same source plex
    that then copies them."""
    vc = volume_config(tmp_path, size=64 * MiB, nplex=2)
    ref = bytearray(vc.size)
    async with running_volume(vc, plex_factory=ReadAheadPlex) as vol:
        await vol.detach_plex("p1")
        for i in range(5, 1000, 37):  # 27 scattered 64 KiB regions
            data = os.urandom(4 * KiB)
            await vol.pwrite(i * 64 * KiB + 8 * KiB, data)
            ref[i * 64 * KiB + 8 * KiB:i * 64 * KiB + 12 * KiB] = data
        ReadAheadPlex.events.clear()
        await vol.attach_plex("p1")
        await vol.resync.wait_idle()
        assert vol.resync.synced_bytes == 27 * 64 * KiB
        assert vol.resync.copied_bytes == 27 * 4 * KiB  # the rest are holes
    ev = ReadAheadPlex.events
    hints = [e[2:] for e in ev if e[0] == "hint"]
    copies = [e[2:] for e in ev if e[0] == "copy"]
    assert len(copies) == 27 and hints == copies  # every run hinted, in copy order
    assert {e[1] for e in ev} == {"p0"}  # one source, the one read ahead
    first_copy = next(i for i, e in enumerate(ev) if e[0] == "copy")
    assert first_copy >= 2, f"no read-ahead: {ev[:4]}"
    assert plex_bytes(vol) == [bytes(ref)] * 2


async def test_replaced_image_gets_full_resync(tmp_path, caplog):
    vc = volume_config(tmp_path, size=8 * MiB, nplex=2)
    ref = bytearray(vc.size)
    async with running_volume(vc) as vol:
        await random_writes(vol, ref, 10)
        await vol.detach_plex("p1")
        img = vc.plexes[1]
        tmp = img.with_suffix(".other")
        tmp.write_bytes(os.urandom(vc.size))
        os.replace(tmp, img)
        reply = await vol.attach_plex("p1")
        assert reply["full_resync"] and "changed while it was away" in reply["why"]
        await vol.resync.wait_idle()
        assert vol.resync.synced_bytes == vc.size  # a full resync (holes skipped)
    assert "full resync" in caplog.text
    assert plex_bytes(vol) == [bytes(ref)] * 2


async def test_last_in_sync_plex_cannot_leave(tmp_path):
    from vmd.errors import VmdError

    vc = volume_config(tmp_path, nplex=2)
    async with running_volume(vc) as vol:
        await vol.detach_plex("p1")
        with pytest.raises(VmdError, match="last in-sync plex"):
            await vol.detach_plex("p0")
        with pytest.raises(VmdError, match="last in-sync plex"):
            await vol.remove_plex("p0")
        with pytest.raises(VmdError, match="already DETACHED"):
            await vol.detach_plex("p1")
        with pytest.raises(VmdError, match="no plex 'p7'"):
            await vol.attach_plex("p7")


class LateFlushPlex(Plex):
    """p1's first fdatasync thread gets going 50 ms late (a busy machine)."""

    late = True

    def _flush_sync(self, fd: int | None = None) -> None:
        if self.name == "p1" and LateFlushPlex.late:
            LateFlushPlex.late = False
            time.sleep(0.05)
        super()._flush_sync(fd)


async def test_flush_racing_detach_does_not_touch_a_closed_fd(tmp_path):
    # fsync and the DRL cleaner flush outside the gate; a detach closing the
    # plex meanwhile once made the late thread fdatasync(-1): ValueError,
    # which crashed the daemon.
    async with running_volume(volume_config(tmp_path), plex_factory=LateFlushPlex) as vol:
        await vol.pwrite(0, b"x" * 4096)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(vol.flush)
            await trio.sleep(0.01)
            await vol.detach_plex("p1")
        assert [p.state for p in vol.plexes] == [ACTIVE, "DETACHED"]


async def test_first_start_creates_missing_directories(tmp_path):
    from vmd.config import VolumeConfig

    vc = VolumeConfig(name="vol0", size=4 * MiB, log=tmp_path / "var" / "vol0.log",
                      plexes=(tmp_path / "var" / "a" / "p0.img", tmp_path / "var" / "b" / "p1.img"))
    async with running_volume(vc) as vol:
        await vol.pwrite(0, b"k" * 4096)
    assert [os.path.getsize(p) for p in vc.plexes] == [4 * MiB] * 2
    assert plex_bytes(vol)[0][:4096] == b"k" * 4096


async def test_resync_without_a_source_waits_instead_of_spinning(tmp_path, caplog):
    vc = volume_config(tmp_path, nplex=2)
    FaultyPlex.fail_reads = False
    async with running_volume(vc, plex_factory=FaultyPlex, shutdown=False) as vol:
        await vol.detach_plex("p0")
        await vol.pwrite(0, b"n" * 4096)
        FaultyPlex.fail_reads = True  # p1, the only in-sync plex, cannot be read
        try:
            await vol.attach_plex("p0")
            t0 = trio.current_time()
            with trio.fail_after(2):  # the event loop keeps running
                await trio.sleep(0.3)
            assert trio.current_time() - t0 < 1
        finally:
            FaultyPlex.fail_reads = False
        # The last in-sync plex is kept, its read errors counted (Linux md's rule).
        assert vol.plex("p1").state == ACTIVE and vol.kept_errors["p1"] >= 1
        stopped = [r for r in caplog.records if "resync stopped" in r.getMessage()]
        assert 1 <= len(stopped) <= 3, len(stopped)


async def test_a_recovering_plex_that_fails_keeps_what_it_lacks(tmp_path):
    vc = volume_config(tmp_path, size=16 * MiB, nplex=2)
    async with running_volume(vc, clean_delay=60, shutdown=False) as vol:
        for r in (2, 5, 9):
            await vol.pwrite(r * MiB, os.urandom(4096))
    FaultyPlex.fail_writes = False
    async with running_volume(vc, plex_factory=FaultyPlex, shutdown=False) as vol:
        async with vol.resync.paused():
            p1 = vol.plex("p1")
            lacked = p1.record.missing.copy()
            assert lacked.bytes_covered() == 3 * MiB
            FaultyPlex.fail_writes = True
            try:
                await vol.pwrite(12 * MiB, b"f" * 4096)
            finally:
                FaultyPlex.fail_writes = False
            assert p1.state == IOFAIL
            # Still lacks the three recovering regions, plus what it missed.
            assert not (lacked.bits & ~p1.record.missing.bits).any()
            assert p1.record.missing.any_in(12 * MiB, 4096)


async def test_detach_whose_flush_fails_leaves_the_plex_iofail(tmp_path):
    from vmd.errors import VmdError

    vc = volume_config(tmp_path, nplex=2)
    async with running_volume(vc, plex_factory=FaultyPlex, shutdown=False) as vol:
        await vol.pwrite(3 * MiB, b"w" * 4096)
        FaultyPlex.fail_flush = True
        try:
            with pytest.raises(VmdError, match="failed to flush and is IOFAIL"):
                await vol.detach_plex("p1")
        finally:
            FaultyPlex.fail_flush = False
        p1 = vol.plex("p1")
        assert p1.state == IOFAIL
        # Its unsynced write is in its map: a reattach copies it again.
        assert p1.record.missing.any_in(3 * MiB, 4096)


class StallingPlex(Plex):
    """Plex p1's next `stall` writes each take `seconds` of a fake clock."""

    stall = 0
    seconds = 0.005
    clock = [1000.0]
    slept = [0]  # the fake voluntary context switches: a stall sleeps once

    def _pwrite_sync(self, off: int, data: bytes | memoryview) -> None:
        if self.name == "p1" and StallingPlex.stall:
            StallingPlex.stall -= 1
            StallingPlex.clock[0] += StallingPlex.seconds
            StallingPlex.slept[0] += 1
        super()._pwrite_sync(off, data)


async def test_write_stalls_move_a_plex_off_the_event_loop_for_a_growing_while(
        tmp_path, monkeypatch):
    """A lone stall (say, a journal commit) costs a short hold off the event
    loop; stalls that come back as soon as the hold ends (a throttled or
    failing disk) double it, up to SLOW_HOLD; a stall long after starts over.
    The plexes read a fake clock: real write times would make this flaky."""
    clock = StallingPlex.clock
    monkeypatch.setattr(onloop, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    monkeypatch.setattr(onloop, "voluntary_switches", lambda: StallingPlex.slept[0])
    vc = volume_config(tmp_path, nplex=2)
    async with running_volume(vc, plex_factory=StallingPlex) as vol:
        p0, p1 = vol.plexes
        await vol.pwrite(0, b"x" * 4096)
        holds = []
        for i in range(4):
            StallingPlex.stall = 1
            await vol.pwrite(4096 * i, b"y" * 4096)  # inline: stalls
            assert not p1.write_inline() and p0.write_inline()
            holds.append(p1.write_hold.hold)
            # Written off the loop meanwhile, and still to both plexes.
            await vol.pwrite(4096 * (i + 8), b"z" * 4096)
            assert p1.slow_writes == i + 1
            clock[0] += p1.write_hold.hold + 0.01  # the hold ends; the next stall comes soon
            assert p1.write_inline()
        assert holds == [onloop.FIRST_HOLD * 2 ** k for k in range(4)]
        assert p0.slow_writes == 0
        assert vol.status()["plexes"][1]["slow_writes"] == 4
        for _ in range(4):  # no further than SLOW_HOLD
            StallingPlex.stall = 1
            await vol.pwrite(0, b"v" * 4096)
            clock[0] += p1.write_hold.hold + 0.01
        assert p1.write_hold.hold == onloop.SLOW_HOLD
        clock[0] += onloop.RECUR  # quiet for a while: the next stall starts over
        StallingPlex.stall = 1
        await vol.pwrite(0, b"w" * 4096)
        assert p1.write_hold.hold == onloop.FIRST_HOLD
        # A write that blocks for longer than RECUR right after a hold is no
        # lone stall: the hold still doubles.
        clock[0] += p1.write_hold.hold + 0.01
        monkeypatch.setattr(StallingPlex, "seconds", 2 * onloop.RECUR)
        StallingPlex.stall = 1
        await vol.pwrite(0, b"u" * 4096)
        assert p1.write_hold.hold == 2 * onloop.FIRST_HOLD
        a, b = plex_bytes(vol)
        assert a == b and a[4096 * 9:4096 * 10] == b"z" * 4096


class SlowCpuPlex(Plex):
    """Plex p1's next write first spends `seconds` on the CPU (busy: the
    thread is only ever preempted) or asleep (blocked, as on a slow disk)."""

    seconds = 0.005
    mode = ""

    def _pwrite_sync(self, off: int, data: bytes | memoryview) -> None:
        if self.name == "p1" and SlowCpuPlex.mode:
            mode, SlowCpuPlex.mode = SlowCpuPlex.mode, ""
            if mode == "sleep":
                time.sleep(SlowCpuPlex.seconds)
            else:
                end = time.perf_counter() + SlowCpuPlex.seconds
                while time.perf_counter() < end:
                    pass
        super()._pwrite_sync(off, data)


async def test_a_write_that_was_only_preempted_is_no_stall(tmp_path):
    """A write that took long because the thread was preempted (a busy
    machine; here a write that spins on the CPU) keeps the plex inline: only a
    write that slept moves it off the event loop. Real clock, real
    getrusage: the kernel's count of voluntary context switches tells them
    apart."""
    vc = volume_config(tmp_path, nplex=2)
    async with running_volume(vc, plex_factory=SlowCpuPlex) as vol:
        p0, p1 = vol.plexes
        await vol.pwrite(0, b"x" * 4096)
        SlowCpuPlex.mode = "spin"
        await vol.pwrite(4096, b"y" * 4096)
        assert p1.slow_writes == 0 and p1.write_inline()
        SlowCpuPlex.mode = "sleep"
        await vol.pwrite(8192, b"z" * 4096)
        assert p1.slow_writes == 1 and not p1.write_inline() and p0.write_inline()
        await vol.pwrite(8192, b"w" * 4096)  # off the loop, still to both plexes
        a, b = plex_bytes(vol)
        assert a == b and a[4096:8192] == b"y" * 4096 and a[8192:12288] == b"w" * 4096


async def test_access_rules_refuse_user_io_not_the_engines(tmp_path):
    """The access layer: pread/pwrite ask `Volume.access` first; the feature that
    set the rules reads and writes past them (pread_unguarded/pwrite_unguarded)."""
    from vmd.access import OPEN, Refusal

    class Syncing:  # a Remote Copy target while an update applies
        def refuse_read(self) -> Refusal | None:
            return Refusal(errno.EBUSY, "volume vol0 is syncing")

        def refuse_write(self) -> Refusal | None:
            return Refusal(errno.EROFS, "volume vol0 is read-only")

    vc = volume_config(tmp_path, nplex=2)
    async with running_volume(vc) as vol:
        await vol.pwrite(0, b"a" * 4096)
        vol.access = Syncing()
        for io, code in ((lambda: vol.pread(0, 4096), errno.EBUSY),
                         (lambda: vol.pwrite(0, b"b"), errno.EROFS)):
            with pytest.raises(OSError) as e:
                await io()  # refused at the call or at the await: either is a refusal
            assert e.value.errno == code and "vol0" in str(e.value), e.value
        assert vol.writes == 1  # refused before any work
        await vol.pwrite_unguarded(0, b"c" * 4096)
        assert await vol.pread_unguarded(0, 4096) == b"c" * 4096
        vol.access = OPEN
        assert await vol.pread(0, 4096) == b"c" * 4096
    assert plex_bytes(vol) == [b"c" * 4096 + bytes(vc.size - 4096)] * 2


class SlowToPrepare(Plex):
    """A plex whose attach takes a while to connect (a remote one's does):
    `prepared` is set when it begins, and it ends once `release` is."""

    prepared: trio.Event
    release: trio.Event
    preparing = 0  # prepares under way at once
    most = 0

    async def prepare_attach(self) -> None:
        SlowToPrepare.preparing += 1
        SlowToPrepare.most = max(SlowToPrepare.most, SlowToPrepare.preparing)
        SlowToPrepare.prepared.set()
        await SlowToPrepare.release.wait()
        SlowToPrepare.preparing -= 1


async def test_plex_removed_while_its_attach_prepares_is_not_attached(tmp_path):
    """An attach prepares (connects) before it takes the write gate; a plex
    removed meanwhile is not brought back as a member of nothing."""
    from vmd.errors import VmdError

    SlowToPrepare.prepared = trio.Event()
    SlowToPrepare.release = trio.Event()
    vc = volume_config(tmp_path, nplex=3)
    async with running_volume(vc, plex_factory=SlowToPrepare) as vol:
        await vol.detach_plex("p2")
        p2 = vol.plex("p2")
        result: list[Any] = []

        async def attach() -> None:
            try:
                result.append(await vol.attach_plex("p2"))
            except VmdError as e:
                result.append(e)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(attach)
            await SlowToPrepare.prepared.wait()
            await vol.remove_plex("p2")
            SlowToPrepare.release.set()
        (err,) = result
        assert isinstance(err, VmdError) and "p2" in str(err), err
        assert p2.fd < 0 and [p.name for p in vol.plexes] == ["p0", "p1"]


async def test_attaches_of_one_plex_prepare_one_at_a_time(tmp_path):
    """Two attaches of a plex (an admin's and RemoteWatch's): the second
    prepares only after the first is done, so it never replaces (closes) the
    connection the first prepared and is about to use."""
    SlowToPrepare.prepared = trio.Event()
    SlowToPrepare.release = trio.Event()
    SlowToPrepare.most = 0
    vc = volume_config(tmp_path, nplex=2)
    async with running_volume(vc, plex_factory=SlowToPrepare) as vol:
        await vol.detach_plex("p1")
        results: list[Any] = []

        async def attach() -> None:
            try:
                results.append(await vol.attach_plex("p1"))
            except Exception as e:  # noqa: BLE001 (the second finds it attached)
                results.append(e)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(attach)
            nursery.start_soon(attach)
            await SlowToPrepare.prepared.wait()
            await trio.testing.wait_all_tasks_blocked()
            SlowToPrepare.release.set()
        assert SlowToPrepare.most == 1
        assert sum(isinstance(r, dict) for r in results) == 1, results
        assert vol.plex("p1").state in (ACTIVE, SYNCING)
