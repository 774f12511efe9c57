"""FastResync through a real daemon and a real mount (issue 4).

A detached (or IOFAIL) plex's `missing` map records every 64 KiB region
written while it is away; `vmd plex attach` copies only those regions — also
after a clean restart, a SIGKILL while detached, or a SIGKILL in the middle of
the copy — unless the image changed while it was away or FastResync is off,
in which case the whole plex is copied and the log says why.

Volumes are 1 GiB of sparse image files: comparisons walk only the data
extents of the plexes (SEEK_DATA/SEEK_HOLE), so the size costs nothing.
"""

from __future__ import annotations

import errno
import os
import random
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from conftest import MiB, KiB, SysResources, VmdDaemon, volume_spec, wait_for
from vmd.sidecar import PlexRecord, SidecarLog, read_log

pytestmark = pytest.mark.mount

GiB = 1024 * MiB
R = 64 * KiB  # the default fastresync_region
BIG = 1 * GiB
NREG = BIG // R  # 16384 map regions
ONE_PCT = NREG // 100  # 163 regions, 10.2 MiB
CHUNK = 4 * MiB

UNCLEAN = r"was not stopped cleanly"


# -- a sparse reference of what the volume should hold ---------------------------

class Ref:
    """Expected volume content: zeros except what the test wrote, kept per
    64 KiB region so that 1 GiB costs only what was written."""

    def __init__(self, size: int):
        self.size = size
        self.regions: dict[int, bytearray] = {}

    def write(self, off: int, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            r, o = divmod(off + pos, R)
            n = min(R - o, len(data) - pos)
            buf = self.regions.setdefault(r, bytearray(R))
            buf[o:o + n] = data[pos:pos + n]
            pos += n

    def forget(self, off: int, length: int) -> None:
        """Content unknown (a write in flight at a crash): skip it in checks."""
        for r in range(off // R, (off + length - 1) // R + 1):
            self.regions[r] = None  # type: ignore[assignment]

    def expected(self, off: int, n: int) -> tuple[bytes, list[tuple[int, int]]]:
        """Expected bytes of [off, off+n) and the (start, end) spans to skip."""
        out = bytearray(n)
        skip = []
        for r in range(off // R, (off + n - 1) // R + 1):
            if r not in self.regions:
                continue
            lo, hi = max(off, r * R), min(off + n, (r + 1) * R)
            buf = self.regions[r]
            if buf is None:
                skip.append((lo - off, hi - off))
            else:
                out[lo - off:hi - off] = buf[lo - r * R:hi - r * R]
        return bytes(out), skip


def data_extents(path: Path) -> list[tuple[int, int]]:
    """(start, end) of the data (non-hole) parts of a file."""
    size = os.path.getsize(path)
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        off = 0
        while off < size:
            try:
                start = os.lseek(fd, off, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                if e.errno == errno.EINVAL:  # no SEEK_DATA here: all of it
                    return [(0, size)]
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            off = end
    finally:
        os.close(fd)
    return out


def _merge(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _chunks(spans: list[tuple[int, int]]) -> Iterable[tuple[int, int]]:
    for a, b in spans:
        for o in range(a, b, CHUNK):
            yield o, min(CHUNK, b - o)


def assert_plexes_identical(paths: list[Path], ref: Ref | None = None) -> None:
    """Every plex holds the same bytes (and, with `ref`, the expected ones).
    Outside the union of the files' data extents all of them read as zeros,
    so only that union (and the reference's regions) is read, in chunks."""
    sizes = {p: os.path.getsize(p) for p in paths}
    assert len(set(sizes.values())) == 1, f"plex sizes differ: {sizes}"
    size = sizes[paths[0]]
    spans = [e for p in paths for e in data_extents(p)]
    if ref is not None:
        assert ref.size == size
        spans += [(r * R, (r + 1) * R) for r in ref.regions]
    fds = [os.open(p, os.O_RDONLY) for p in paths]
    try:
        for off, n in _chunks(_merge(spans)):
            datas = [os.pread(fd, n, off) for fd in fds]
            for p, d in zip(paths[1:], datas[1:]):
                if d != datas[0]:
                    bad = next(i for i in range(n) if d[i] != datas[0][i])
                    raise AssertionError(f"plex {p.name} differs from {paths[0].name} at "
                                         f"offset {off + bad} (64 KiB region {(off + bad) // R})")
            if ref is not None:
                want, skip = ref.expected(off, n)
                got = bytearray(datas[0])
                for a, b in skip:
                    got[a:b] = want[a:b]
                if bytes(got) != want:
                    bad = next(i for i in range(n) if got[i] != want[i])
                    raise AssertionError(f"plexes differ from what was written at offset "
                                         f"{off + bad} (64 KiB region {(off + bad) // R})")
    finally:
        for fd in fds:
            os.close(fd)


# -- helpers ------------------------------------------------------------------------

def plex_st(st: dict[str, Any], name: str) -> dict[str, Any]:
    (p,) = [p for p in st["plexes"] if p["name"] == name]
    return p


def write_regions(path: Path, regions: Iterable[int], ref: Ref, rng: random.Random) -> int:
    """One random 64 KiB write per region through the mount; fsync."""
    n = 0
    fd = os.open(path, os.O_RDWR)
    try:
        for r in regions:
            data = rng.randbytes(R)
            assert os.pwrite(fd, data, r * R) == R
            ref.write(r * R, data)
            n += 1
        os.fsync(fd)
    finally:
        os.close(fd)
    return n


def big_daemon(vmd_factory: Callable[..., VmdDaemon], size: int | str = "1GiB",
               **kw: Any) -> VmdDaemon:
    kw.setdefault("clean_delay", 0.3)
    return vmd_factory(volumes={"vol0": volume_spec("vol0", size=size)}, **kw)


def seed_both(vmd: VmdDaemon, ref: Ref, rng: random.Random, count: int = 64) -> list[int]:
    """Data on both plexes before anything leaves, so that stale != zeros."""
    regions = rng.sample(range(vmd.volume_size() // R), count)
    write_regions(vmd.volume_file(), regions, ref, rng)
    return regions


def attach_and_wait(vmd: VmdDaemon, plex: str = "p1") -> dict[str, Any]:
    vmd.cli("plex", "attach", "vol0", plex)
    st = vmd.wait_resync("vol0")
    assert all(p["state"] == "ACTIVE" for p in st["plexes"]), st["plexes"]
    assert all(p["missing_bytes"] == 0 for p in st["plexes"]), st["plexes"]
    return st


# -- the tests ------------------------------------------------------------------------

def test_reattach_copies_only_the_regions_written_while_detached(
        vmd_factory: Callable[..., VmdDaemon]) -> None:
    vmd = big_daemon(vmd_factory).start()
    rng = random.Random(4001)
    ref = Ref(BIG)
    seed_both(vmd, ref, rng)

    vmd.cli("plex", "detach", "vol0", "p1")
    st = vmd.status("vol0")
    assert st["fastresync"] is True
    p1 = plex_st(st, "p1")
    assert p1["state"] == "DETACHED" and p1["map"] and p1["missing_bytes"] == 0, p1

    missed = sorted(rng.sample(range(NREG), ONE_PCT))
    write_regions(vmd.volume_file(), missed, ref, rng)
    assert plex_st(vmd.status("vol0"), "p1")["missing_bytes"] == len(missed) * R

    st = attach_and_wait(vmd)
    copied = st["resync"]["copied_bytes"]
    print(f"1 % of 1 GiB: copied {copied} bytes of {BIG} ({100 * copied / BIG:.2f} %)")
    assert copied == len(missed) * R, (copied, len(missed) * R)
    vmd.stop()
    assert_plexes_identical(vmd.plex_paths(), ref)


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


def test_reattach_with_nothing_missed_is_in_sync_at_once(
        vmd_factory: Callable[..., VmdDaemon]) -> None:
    """An empty FastResync map (issue 16, item 3): reattached at once, or after a clean
    restart, the plex is ACTIVE without a copy and `vmd wait` returns."""
    size = 64 * MiB
    vmd = big_daemon(vmd_factory, size=size).start()
    rng = random.Random(4011)
    ref = Ref(size)
    seed_both(vmd, ref, rng, count=16)
    for restart in (False, True):
        vmd.cli("plex", "detach", "vol0", "p1")
        assert plex_st(vmd.status("vol0"), "p1")["missing_bytes"] == 0
        if restart:
            vmd.restart()
        st = attach_and_wait(vmd)
        assert st["resync"]["copied_bytes"] == 0, st["resync"]
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


@pytest.mark.allow_log(r"plex p1 gets a full resync: .*changed while it was away")
def test_replaced_image_gets_full_resync_and_log_says_why(
        vmd_factory: Callable[..., VmdDaemon]) -> None:
    size = 64 * MiB
    vmd = big_daemon(vmd_factory, size=size).start()
    rng = random.Random(4006)
    ref = Ref(size)
    seed_both(vmd, ref, rng, count=32)
    vmd.cli("plex", "detach", "vol0", "p1")
    write_regions(vmd.volume_file(), rng.sample(range(size // R), 8), ref, rng)
    assert plex_st(vmd.status("vol0"), "p1")["missing_bytes"] == 8 * R

    # Someone puts another image of the same size in its place.
    p1_path = vmd.plex_paths()[1]
    other = p1_path.with_name("other.img")
    with open(other, "wb") as f:
        f.truncate(size)
        for r in rng.sample(range(size // R), 40):
            f.seek(r * R)
            f.write(rng.randbytes(R))
    os.replace(other, p1_path)

    out = vmd.cli("plex", "attach", "vol0", "p1")
    st = vmd.wait_resync("vol0")
    assert st["resync"]["synced_bytes"] == size, st["resync"]
    log_lines = [ln for ln in vmd.stderr().splitlines() if "full resync" in ln]
    assert any("changed while it was away" in ln for ln in log_lines), \
        f"daemon log does not say why p1 got a full resync:\n{vmd.stderr()}\n{out.stdout}"
    vmd.stop()
    assert_plexes_identical(vmd.plex_paths(), ref)


def test_random_writes_during_fastresync_copy(vmd_factory: Callable[..., VmdDaemon]) -> None:
    # ~10 MiB to copy at 1 MiB/s: about 10 s of copy for the writes to race.
    vmd = big_daemon(vmd_factory, rate_limit="1MiB").start()
    rng = random.Random(4007)
    ref = Ref(BIG)
    seed_both(vmd, ref, rng)
    vmd.cli("plex", "detach", "vol0", "p1")
    # Runs of 1..4 regions, so that copy chunks span several regions.
    missed: set[int] = set()
    while len(missed) < ONE_PCT:
        r = rng.randrange(NREG - 4)
        missed.update(range(r, r + rng.randint(1, 4)))
    write_regions(vmd.volume_file(), sorted(missed), ref, rng)
    hot = sorted(missed)

    vmd.cli("plex", "attach", "vol0", "p1")
    fd = os.open(vmd.volume_file(), os.O_RDWR)
    writes = during = 0
    try:
        while True:
            for _ in range(20):
                if rng.random() < 0.7:  # mostly onto and across regions being copied
                    off = rng.choice(hot) * R + rng.randrange(-R // 2, R)
                else:
                    off = rng.randrange(BIG - 300 * KiB)
                off = max(0, off)
                data = rng.randbytes(rng.choice((512, 4 * KiB, 33 * KiB, 100 * KiB, 200 * KiB)))
                assert os.pwrite(fd, data, off) == len(data)
                ref.write(off, data)
                writes += 1
            # Straight to the socket: a CLI's start-up per check would eat the
            # copy's time on a busy machine.
            rs = vmd.request({"cmd": "status", "volume": "vol0"})["volumes"][0]["resync"]
            if not rs["running"]:
                break
            during += 20
        os.fsync(fd)
    finally:
        os.close(fd)
    print(f"{writes} random writes, {during} while the copy ran")
    assert during >= 100, f"only {during} writes landed while the copy ran: too fast to race"
    st = vmd.wait_resync("vol0")
    assert {p["name"]: p["state"] for p in st["plexes"]} == {"p0": "ACTIVE", "p1": "ACTIVE"}
    assert len(missed) * R <= st["resync"]["copied_bytes"] < BIG // 10, st["resync"]
    with open(vmd.volume_file(), "rb") as f:  # read back through the mount too
        for r in rng.sample(hot, 20):
            f.seek(r * R)
            want, _ = ref.expected(r * R, R)
            assert f.read(R) == want, f"region {r} reads back wrong through the mount"
    vmd.stop()
    assert_plexes_identical(vmd.plex_paths(), ref)


@pytest.mark.allow_log(r"plex p1 .* is now IOFAIL", r"No space left on device")
def test_iofail_plex_comes_back_with_partial_copy_after_space_is_freed(
        vmd_factory: Callable[..., VmdDaemon], sysres: SysResources, tmp_path: Path) -> None:
    size = 64 * MiB
    small = tmp_path / "small"
    sysres.make_ext4_image(tmp_path / "small.img", 64 * MiB, small)
    p1_path = small / "vol0-p1.img"
    # Small DRL regions: at the failure, every region not yet cleaned joins
    # p1's map (its unsynced writes may be lost with the disk), so the map
    # stays partial only if those regions are small.
    vmd = vmd_factory(volumes={"vol0": {"size": size, "plexes": ["vol0-p0.img", str(p1_path)],
                                        "log": "vol0.log", "region_size": "256KiB"}},
                      clean_delay=0.3).start()
    rng = random.Random(4008)
    ref = Ref(size)
    seed_both(vmd, ref, rng, count=16)  # 1 MiB on both plexes
    # The seed's regions cleaned: synced on both plexes.
    wait_for(lambda: vmd.status("vol0")["dirty_regions"] == 0, 30, "the DRL to be cleaned")

    # Ballast leaves p1's filesystem about 1 MiB of room.
    ballast = small / "ballast"
    sv = os.statvfs(small)
    free = sv.f_bavail * sv.f_frsize
    fd = os.open(ballast, os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        os.posix_fallocate(fd, 0, free - 1 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)

    # 12 MiB more than fits: p1 fails, the volume keeps serving from p0.
    used = set(ref.regions)
    more = rng.sample([r for r in range(size // R) if r not in used], 192)
    write_regions(vmd.volume_file(), more, ref, rng)
    st = vmd.status("vol0")
    p1 = plex_st(st, "p1")
    assert p1["state"] == "IOFAIL", p1
    assert "No space left" in p1["reason"] or str(errno.ENOSPC) in p1["reason"], p1
    assert p1["map"] and 0 < p1["missing_bytes"] < size // 2, p1
    # Writes while IOFAIL are tracked too.
    later = rng.sample([r for r in range(size // R) if r not in used and r not in more], 16)
    write_regions(vmd.volume_file(), later, ref, rng)
    p1 = plex_st(vmd.status("vol0"), "p1")
    assert p1["state"] == "IOFAIL"
    assert p1["missing_bytes"] >= len(later) * R + R, p1

    os.unlink(ballast)
    os.sync()
    st = attach_and_wait(vmd)
    copied = st["resync"]["synced_bytes"]
    print(f"IOFAIL reattach: map {p1['missing_bytes']}, copied {copied} of {size}")
    assert copied == p1["missing_bytes"], (copied, p1)
    assert copied < size // 2  # a partial copy
    vmd.stop()
    assert_plexes_identical(vmd.plex_paths(), ref)


@pytest.mark.allow_log(r"plex p1 gets a full resync: .*(FastResync|map)")
def test_fastresync_off_while_detached_makes_next_attach_full(
        vmd_factory: Callable[..., VmdDaemon]) -> None:
    size = 64 * MiB
    vmd = big_daemon(vmd_factory, size=size).start()
    rng = random.Random(4009)
    ref = Ref(size)
    seed_both(vmd, ref, rng, count=16)
    vmd.cli("plex", "detach", "vol0", "p1")
    write_regions(vmd.volume_file(), rng.sample(range(size // R), 10), ref, rng)
    st = vmd.status("vol0")
    assert st["fastresync"] is True
    p1 = plex_st(st, "p1")
    assert p1["map"] and p1["missing_bytes"] == 10 * R, p1
    assert "fastresync on" in vmd.cli("status", "vol0").stdout

    vmd.cli("fastresync", "vol0", "off")
    st = vmd.status("vol0")
    assert st["fastresync"] is False
    p1 = plex_st(st, "p1")
    assert not p1["map"] and p1["missing_bytes"] == size, p1  # no map: all of it
    assert "fastresync off" in vmd.cli("status", "vol0").stdout
    # Off survives a restart (the config still says on, but was not changed).
    write_regions(vmd.volume_file(), rng.sample(range(size // R), 4), ref, rng)
    vmd.restart()
    st = vmd.status("vol0")
    assert st["fastresync"] is False and not plex_st(st, "p1")["map"], st

    st = attach_and_wait(vmd)
    assert st["resync"]["synced_bytes"] == size, st["resync"]
    assert "gets a full resync" in vmd.stderr()
    assert_plexes_identical(vmd.plex_paths(), ref)

    # On again: tracking starts now, the next reattach is partial.
    vmd.cli("fastresync", "vol0", "on")
    assert vmd.status("vol0")["fastresync"] is True
    vmd.cli("plex", "detach", "vol0", "p1")
    write_regions(vmd.volume_file(), rng.sample(range(size // R), 3), ref, rng)
    assert plex_st(vmd.status("vol0"), "p1")["missing_bytes"] == 3 * R
    st = attach_and_wait(vmd)
    assert st["resync"]["copied_bytes"] == 3 * R, st["resync"]
    vmd.stop()
    assert_plexes_identical(vmd.plex_paths(), ref)
