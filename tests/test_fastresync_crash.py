"""FastResync across restarts and crashes (issue 4), through a real daemon and
a real mount: a detached plex's `missing` map survives a clean restart and a
SIGKILL with writes in flight; a SIGKILL in the middle of the copy resumes it;
plexes left with nothing to copy finish at the next start.

Volumes are 1 GiB of sparse image files: comparisons walk only the data
extents of the plexes (SEEK_DATA/SEEK_HOLE), so the size costs nothing.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import MiB, VmdDaemon, wait_for
from fastresynckit import (BIG, NREG, ONE_PCT, R, UNCLEAN, Ref, assert_plexes_identical,
                           attach_and_wait, big_daemon, plex_st, seed_both, write_regions)
from vmd.sidecar import PlexRecord, SidecarLog, read_log

pytestmark = pytest.mark.mount


# -- the tests ------------------------------------------------------------------------

def test_map_survives_clean_restart_while_detached(
        vmd_factory: Callable[..., VmdDaemon]) -> None:
    vmd = big_daemon(vmd_factory).start()
    rng = random.Random(4002)
    ref = Ref(BIG)
    seed_both(vmd, ref, rng)
    vmd.cli("plex", "detach", "vol0", "p1")

    missed = rng.sample(range(NREG), ONE_PCT)
    before, after = missed[:ONE_PCT // 2], missed[ONE_PCT // 2:]
    write_regions(vmd.volume_file(), before, ref, rng)
    vmd.restart()
    p1 = plex_st(vmd.status("vol0"), "p1")
    assert p1["state"] == "DETACHED" and p1["map"], p1
    assert p1["missing_bytes"] == len(before) * R, (p1, len(before) * R)

    # Tracking goes on after the restart.
    write_regions(vmd.volume_file(), after, ref, rng)
    assert plex_st(vmd.status("vol0"), "p1")["missing_bytes"] == len(missed) * R
    vmd.restart()
    assert plex_st(vmd.status("vol0"), "p1")["missing_bytes"] == len(missed) * R

    st = attach_and_wait(vmd)
    assert st["resync"]["copied_bytes"] == len(missed) * R
    vmd.stop()
    assert_plexes_identical(vmd.plex_paths(), ref)


class Writer(threading.Thread):
    """Writes random 64 KiB blocks to `regions`, in order, through the mount
    until the list ends or the mount dies. `acked` holds (region, data) of the
    writes that returned, in order; `inflight` the region being written
    (content unknown after a crash)."""

    def __init__(self, path: Path, regions: list[int], seed: int, fsync_every: int = 0):
        super().__init__(daemon=True)
        self.path = path
        self.regions = regions
        self.rng = random.Random(seed)
        self.fsync_every = fsync_every
        self.acked: list[tuple[int, bytes]] = []
        self.inflight: int | None = None
        self.error: OSError | None = None

    def run(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR)
        except OSError as e:
            self.error = e
            return
        try:
            for i, r in enumerate(self.regions):
                data = self.rng.randbytes(R)
                self.inflight = r
                os.pwrite(fd, data, r * R)
                self.acked.append((r, data))
                self.inflight = None
                if self.fsync_every and (i + 1) % self.fsync_every == 0:
                    os.fsync(fd)
        except OSError as e:
            self.error = e
        finally:
            try:
                os.close(fd)
            except OSError:
                pass


def test_map_survives_sigkill_while_detached_with_writes_in_flight(
        vmd_factory: Callable[..., VmdDaemon], allow_log: Callable[..., None]) -> None:
    allow_log(UNCLEAN)
    vmd = big_daemon(vmd_factory).start()
    rng = random.Random(4003)
    ref = Ref(BIG)
    seed_both(vmd, ref, rng)
    vmd.cli("plex", "detach", "vol0", "p1")

    # 1 % of the volume written while detached, then idle until the DRL has
    # cleaned those regions: their FMR bits now live in clean records only.
    hot_area = range(16 * MiB // R)  # where the writes in flight at the kill go
    missed = set(rng.sample(range(len(hot_area), NREG), ONE_PCT))
    write_regions(vmd.volume_file(), sorted(missed), ref, rng)
    wait_for(lambda: vmd.status("vol0")["dirty_regions"] == 0, 20, "the DRL to be cleaned")

    # Then a writer hammering the first 16 MiB when the daemon is killed.
    w = Writer(vmd.volume_file(), [rng.choice(hot_area) for _ in range(200_000)],
               seed=4004, fsync_every=16)
    w.start()
    wait_for(lambda: len(w.acked) >= 100, 30, "the writer to get going")
    time.sleep(0.5)
    assert w.is_alive() and w.error is None, w.error
    vmd.kill()
    w.join(timeout=30)
    assert not w.is_alive(), "writer still blocked on the dead mount"
    assert w.error is not None, "the writer finished before the kill: nothing was in flight"
    for r, data in w.acked:
        ref.write(r * R, data)
    if w.inflight is not None:
        ref.forget(w.inflight * R, R)
    acked = {r for r, _ in w.acked}
    print(f"SIGKILL with writes in flight: {len(w.acked)} writes to {len(acked)} regions "
          f"acknowledged, in flight {w.inflight}, writer error {w.error!r}")

    vmd.start()
    st = vmd.status("vol0")
    p1 = plex_st(st, "p1")
    assert p1["state"] == "DETACHED" and p1["map"], p1
    assert p1["missing_bytes"] >= len(missed | acked) * R, (p1, len(missed | acked) * R)
    # Not much more: the 1 % exactly (from the clean records), plus at most
    # the area the writer was busy in (dirty DRL regions at the crash).
    assert p1["missing_bytes"] <= len(missed | set(hot_area)) * R, p1
    assert st["recovered_regions"] >= 1, st  # the crash left dirty regions

    st = attach_and_wait(vmd)
    copied = st["resync"]["synced_bytes"]
    print(f"after SIGKILL: map {p1['missing_bytes']} bytes "
          f"({st['recovered_regions']} DRL regions recovered), copied {copied}, "
          f"written while detached {len(missed | acked) * R}, volume {BIG}")
    assert copied == p1["missing_bytes"]
    vmd.stop()
    assert_plexes_identical(vmd.plex_paths(), ref)


def test_plexes_left_with_nothing_to_copy_finish_at_start(
        vmd_factory: Callable[..., VmdDaemon]) -> None:
    """A SYNCING plex whose copy was done, and a merging snapshot mirror (SNAPATT) with
    nothing to copy, as a crash between the last progress record and the state change
    leaves them (or as an older vmd left an empty snap back): the next start finishes
    both, without a copy (issue 16, item 3)."""
    size = 64 * MiB
    vmd = big_daemon(vmd_factory, size=size).start()
    rng = random.Random(4012)
    ref = Ref(size)
    seed_both(vmd, ref, rng, count=16)
    vmd.stop()
    p0 = vmd.plex_paths()[0]
    mirror = p0.with_name("vol0-mirror.img")
    mirror.write_bytes(p0.read_bytes())
    replay, _, _ = read_log(vmd.log_path())
    state = replay.state
    state.plex("p1").state = "SYNCING"  # type: ignore[union-attr]
    state.plexes.append(PlexRecord(name=f"p{state.next_plex}", path=str(mirror),
                                   state="SNAPATT", missing=state.new_map(), role="snapback"))
    state.next_plex += 1
    vmd.log_path().unlink()  # create() never replaces a log (it could be a live one)
    SidecarLog.create(vmd.log_path(), state).close()

    vmd.start()
    st = vmd.wait_resync("vol0", timeout=20)
    assert [(p["state"], p["role"], p["missing_bytes"]) for p in st["plexes"]] == [
        ("ACTIVE", "", 0), ("ACTIVE", "", 0), ("SNAPDONE", "snapshot", 0)], st["plexes"]
    assert st["resync"]["copied_bytes"] == 0, st["resync"]
    vmd.cli("snap", "wait", "vol0", timeout=20)
    vmd.cli("snap", "take", "vol0", "nightly")
    vmd.stop()
    assert_plexes_identical([*vmd.plex_paths(), mirror], ref)


def test_crash_with_no_dirty_region_recovers_nothing(
        vmd_factory: Callable[..., VmdDaemon], allow_log: Callable[..., None]) -> None:
    """SIGKILL once the DRL is clean: the recovery has nothing to copy and ends at once;
    a SNAPDONE snapshot mirror stays ready (issue 16, item 3)."""
    allow_log(UNCLEAN)
    size = 64 * MiB
    vmd = big_daemon(vmd_factory, size=size).start()
    rng = random.Random(4013)
    ref = Ref(size)
    seed_both(vmd, ref, rng, count=16)
    vmd.cli("snap", "start", "vol0")
    vmd.cli("snap", "wait", "vol0", timeout=30)
    wait_for(lambda: vmd.status("vol0")["dirty_regions"] == 0, 20, "the DRL to be cleaned")
    vmd.kill()
    vmd.start()
    st = vmd.wait_resync("vol0", timeout=20)
    assert st["recovered_regions"] == 0, st
    assert [(p["state"], p["missing_bytes"]) for p in st["plexes"]] == [
        ("ACTIVE", 0), ("ACTIVE", 0), ("SNAPDONE", 0)], st["plexes"]
    vmd.cli("snap", "wait", "vol0", timeout=20)
    vmd.cli("snap", "take", "vol0", "nightly")
    vmd.stop()
    assert_plexes_identical(vmd.plex_paths(), ref)


def test_sigkill_during_fastresync_copy_resumes(
        vmd_factory: Callable[..., VmdDaemon], allow_log: Callable[..., None]) -> None:
    allow_log(UNCLEAN)
    # 6 MiB at 128 KiB/s: 48 s, so the kill below, and the status after the
    # restart, land well before the end of the copy.
    vmd = big_daemon(vmd_factory, rate_limit="128KiB").start()
    rng = random.Random(4005)
    ref = Ref(BIG)
    seed_both(vmd, ref, rng)
    vmd.cli("plex", "detach", "vol0", "p1")
    missed = rng.sample(range(NREG), 96)  # 6 MiB
    write_regions(vmd.volume_file(), missed, ref, rng)
    total = len(missed) * R

    vmd.cli("plex", "attach", "vol0", "p1")
    st = vmd.status("vol0")
    assert plex_st(st, "p1")["state"] == "SYNCING", st
    # Past the first durable progress record (every 2 s): the log, which the
    # restart replays, has p1 lacking less than it did.
    wait_for(lambda: vmd.logged_state().plex("p1").missing.bytes_covered() < total, 30,
             "a durable progress record")
    rs = vmd.status("vol0")["resync"]
    assert rs["running"] and rs["total_bytes"] == total, rs
    assert 0 < rs["done_bytes"] < total, rs
    vmd.kill()

    vmd.start()
    st = vmd.status("vol0")
    p1 = plex_st(st, "p1")
    print(f"SIGKILL during copy: done {rs['done_bytes']} of {total}; "
          f"left after restart {p1['missing_bytes']}")
    assert p1["state"] == "SYNCING", p1
    assert 0 < p1["missing_bytes"] < total, \
        f"resync restarted from zero: {p1['missing_bytes']} of {total} left"
    vmd.stop()  # the rest of the copy without the rate limit
    vmd.set_rate_limit(None)
    vmd.start()
    st = vmd.wait_resync("vol0")
    assert {p["name"]: p["state"] for p in st["plexes"]} == {"p0": "ACTIVE", "p1": "ACTIVE"}
    copied = st["resync"]["copied_bytes"]
    print(f"resumed copy: {copied} bytes")
    assert 0 < copied < total, (copied, total)
    vmd.stop()
    assert_plexes_identical(vmd.plex_paths(), ref)
