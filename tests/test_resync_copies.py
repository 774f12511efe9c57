"""A resync keeps the disk busy alone (vmd/resync.py): it copies several
chunks at once (one at a time under a rate limit), and starts its targets'
writeback as it copies, so that a progress commit's fdatasync has little left
to write; the commit still makes the copy durable before it is recorded
(tests/test_crash.py). A resync whose targets failed while it waited its turn
on the disk (vmd/spread.py) skips its pass, and an unexpected error in one
volume's resync is that resync's failure, not the daemon's."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from enginekit import plex_bytes, running_volume, volume_config
from vmd import resync
from vmd.config import MiB
from vmd.plex import Plex, PlexIOError
from vmd.resync import Resync
from vmd.sidecar import IOFAIL
from vmd.spread import DeviceSlots, devices_of


def test_libc_has_sync_file_range() -> None:
    assert resync._sync_file_range is not None, "no early writeback on this system"


async def test_full_resync_starts_writeback_of_its_targets_as_it_copies(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where a target cannot be written O_DIRECT (a filesystem without it),
    its copies go through the page cache: their writeback is started early."""
    monkeypatch.setattr(Plex, "open_direct_for_copies", lambda self: None)
    monkeypatch.setattr(resync, "KERNEL_COPIES", resync.COPIES)
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
    """A full resync of 64 MiB: 16 chunks of 4 MiB, cut smaller so that
    KERNEL_COPIES are in flight (one at a time under a rate limit)."""
    cap = 1 if rate_limit else resync.KERNEL_COPIES
    most = await _most_copies_at_once(tmp_path, monkeypatch, rate_limit=rate_limit,
                                      hold_until=cap)
    assert most == cap, most


async def _other_job(slots: DeviceSlots, plexes: list[Plex], done: trio.Event,
                     task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Another volume's resync (or a verify) holding the disk of `plexes`."""
    async with slots.turn(devices_of(plexes), "resync of volume other"):
        task_status.started()
        await done.wait()


@pytest.mark.allow_log(r"plex p2 .* is now IOFAIL")
async def test_target_failing_while_the_resync_is_queued_skips_the_pass(tmp_path: Path) -> None:
    async with running_volume(volume_config(tmp_path)) as vol:
        await vol.pwrite(0, b"a" * 4096)
        slots = vol.resync.slots = DeviceSlots(1)
        other_done = trio.Event()
        async with trio.open_nursery() as n:
            await n.start(_other_job, slots, vol.plexes, other_done)
            p2 = await vol.add_plex(str(tmp_path / "p2.img"))
            await trio.testing.wait_all_tasks_blocked()
            assert vol.resync.queue.behind, "the resync should be queued behind the other job"
            # Its only target fails meanwhile (a user write's EIO): a failure
            # does not cancel the queued turn as a detach would.
            await vol.fail_plex(p2, PlexIOError(p2, "write", 0, OSError(errno.EIO, "EIO")),
                                0, 4096)
            assert p2.state == IOFAIL
            other_done.set()  # the turn comes, with nothing left to copy into
            await trio.testing.wait_all_tasks_blocked()
        await vol.pwrite(4096, b"b" * 4096)  # the volume still serves
        rs = vol.resync.status()
    assert list(rs["failed"]) == ["p2"], rs  # `vmd wait` says the add failed
    assert rs["error"] is None, rs


async def test_a_queued_resync_shows_its_own_size_not_the_last_pass(tmp_path: Path) -> None:
    """While it waited for its turn, `status --json` showed the previous
    pass's done/total (80/80 MiB; new-user trial 8)."""
    async with running_volume(volume_config(tmp_path)) as vol:
        await vol.pwrite(0, os.urandom(MiB))
        await vol.add_plex(str(tmp_path / "p2.img"))
        await vol.resync.wait_idle()
        assert vol.resync.status()["done_bytes"] >= MiB
        await vol.detach_plex("p2")
        await vol.pwrite(0, b"a" * 4096)  # p2 misses one FastResync region
        slots = vol.resync.slots = DeviceSlots(1)
        other_done = trio.Event()
        async with trio.open_nursery() as n:
            await n.start(_other_job, slots, vol.plexes, other_done)
            await vol.attach_plex("p2")
            await trio.testing.wait_all_tasks_blocked()
            rs = vol.resync.status()
            assert rs["queued"] and rs["done_bytes"] == 0, rs
            assert rs["total_bytes"] == rs["span_bytes"] == vol.state.fmr_region, rs
            other_done.set()
        await vol.resync.wait_idle()


async def test_unexpected_error_in_one_resync_leaves_the_other_volumes_serving(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A fault injected into the pass (a bug's stand-in): the volumes' work runs
    # in one nursery as in the daemon (manager.VolumeWork), so an error that
    # left a volume's resync would cancel the other volume too.
    async def broken(self: Resync) -> bool:
        raise RuntimeError("injected fault")

    monkeypatch.setattr(Resync, "_pass", broken)
    a_cfg, b_cfg = volume_config(tmp_path, name="a"), volume_config(tmp_path, name="b")
    async with running_volume(a_cfg) as a, running_volume(b_cfg) as b:
        await a.add_plex(str(tmp_path / "a-p2.img"))
        with trio.fail_after(10):
            while a.resync.error is None:
                await trio.sleep(0.01)
        await a.resync.wait_idle()  # returns: a failed resync is not one still due
        await b.pwrite(0, b"b" * 4096)
        assert bytes(await b.pread(0, 4096)) == b"b" * 4096
        await a.pwrite(0, b"a" * 4096)  # the volume itself serves on, degraded
        rs, st = a.resync.status(), a.status()
    assert "RuntimeError: injected fault" in rs["error"], rs
    assert st["health"] == "errors" and "resync" in st["problem"], st


async def test_a_lower_rate_limit_paces_the_copy_from_the_change(
        autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGHUP may lower resync.rate_limit in the middle of a pass: paced from
    the pass's start, 100 MiB copied at 100 MiB/s then a limit of 1 MiB/s
    held the copy for 99 s before its next chunk."""
    monkeypatch.setattr(resync.time, "monotonic", trio.current_time)  # the test's clock
    r = Resync(None, rate_limit=100 * MiB)  # type: ignore[arg-type]
    started = trio.current_time()
    await r._throttle(started)
    r.done_bytes = 100 * MiB
    await trio.sleep(1.0)  # copied at the limit
    await r._throttle(started)
    assert trio.current_time() - started == pytest.approx(1.0, abs=0.01)
    r.rate_limit = MiB
    t = trio.current_time()
    await r._throttle(started)  # nothing copied since the change: no wait
    r.done_bytes += 2 * MiB
    await r._throttle(started)  # 2 MiB at 1 MiB/s since the change
    assert trio.current_time() - t == pytest.approx(2.0, abs=0.3)


async def test_a_mid_pass_commit_that_fails_is_retried(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """An OSError from the pass's progress commit (the sidecar log's disk full
    a moment) reaches run() wrapped in the pass nursery's ExceptionGroup: it
    was taken for a bug, and the resync stopped for good instead of retrying."""
    monkeypatch.setattr(resync, "RETRY_SECONDS", 1)
    monkeypatch.setattr(resync, "COMMIT_SECONDS", 0.3)
    cfg = volume_config(tmp_path, size=16 * MiB)
    async with running_volume(cfg, rate_limit=4 * MiB) as vol:
        await vol.detach_plex("p1")
        await vol.pwrite(0, os.urandom(8 * MiB))
        real = vol.sidecar.append
        failed: list[Any] = []

        async def append(build: Any, **kw: Any) -> Any:
            rec = build()
            if rec is not None and rec.get("t") == "copied" and not failed:
                failed.append(rec)
                raise OSError(errno.ENOSPC, "No space left on device (injected)")
            return await real(lambda: rec, **kw)

        vol.sidecar.append = append  # type: ignore[method-assign]
        await vol.attach_plex("p1")
        with trio.move_on_after(30):  # a bound, not a guess: it ends when ACTIVE
            while vol.plexes[1].state != "ACTIVE" and vol.resync.error is None:
                await trio.sleep(0.1)
        assert failed, "the injected failure was not reached"
        assert vol.resync.error is None, f"an OSError taken for a bug: {vol.resync.error}"
        assert vol.plexes[1].state == "ACTIVE"


async def _most_copies_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               buffered_only: bool = False, rate_limit: int = 0,
                               hold_until: int = 0) -> int:
    """A full resync of 64 MiB from p0 to p1: the most copies (through a
    buffer only, if asked) in flight at once; the plexes end equal. Copies
    wait (10 s at most) until `hold_until` are in flight: on a busy machine
    the first could end before the last began."""
    vc = volume_config(tmp_path, size=64 * MiB)
    data = os.urandom(vc.size)
    vc.plexes[0].write_bytes(data)
    vc.plexes[1].write_bytes(bytes(vc.size))
    now = most = 0
    real = Plex.copy_to
    enough = trio.Event()

    async def counted(self: Plex, *args: Any, pool: Any = None, **kw: Any) -> Any:
        nonlocal now, most
        counts = pool is None or not buffered_only
        now += counts
        most = max(most, now)
        if most >= hold_until:
            enough.set()
        try:
            with trio.move_on_after(10):
                await enough.wait()
            return await real(self, *args, pool=pool, **kw)
        finally:
            now -= counts

    monkeypatch.setattr(Plex, "copy_to", counted)
    async with running_volume(vc, recover_all=True, recover_from="p0",
                              rate_limit=rate_limit) as vol:
        await vol.resync.wait_idle()
    p0, p1 = plex_bytes(vc.plexes)
    assert p0 == p1 == data
    return most


async def test_a_source_that_cannot_copy_in_the_kernel_keeps_few_copies_in_flight(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A remote (NBD) source: 32 reads of 4 MiB in flight on its one link
    would pass its request timeout on a slow line (review R1)."""
    real_open = Plex.open

    def open_(self: Plex, **kw: Any) -> None:
        real_open(self, **kw)
        if self.name == "p0":
            self._kernel_copy = False  # as for an NBD plex

    monkeypatch.setattr(Plex, "open", open_)
    most = await _most_copies_at_once(tmp_path, monkeypatch, hold_until=resync.COPIES)
    assert most == resync.COPIES, most


async def test_copies_through_a_buffer_stay_few_when_the_kernel_refuses_mid_pass(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A target on another filesystem is found by the pass's first copies
    (EXDEV): the later ones go through buffers, COPIES at a time, not one
    4 MiB buffer per kernel copy the pass was sized for (review R2)."""

    def refuse(self: Plex, target: Plex, off: int, length: int) -> bool:
        target._kernel_copy = False  # what EXDEV does
        return False

    monkeypatch.setattr(Plex, "_kernel_copy_sync", refuse)
    monkeypatch.setattr(resync, "CHUNK", MiB)  # 64 chunks: more than the first wave
    most = await _most_copies_at_once(tmp_path, monkeypatch, buffered_only=True)
    assert 1 <= most <= resync.COPIES, most
