"""Crash recovery with the real daemon: SIGKILL under concurrent writes, a torn
mirror write (split-write fault), damaged or missing sidecar logs, clean stops.

Engine-level replay tests of the log live in test_sidecar.py; these run
`vmd daemon` in a subprocess on a real FUSE mount and look at the plex images
and the sidecar log from outside, as an administrator would.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import random
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from vmd.drl import LOOKAHEAD

from conftest import KiB, MiB, VmdDaemon, sha, volume_spec
from vmd import sidecar as sc
from vmd.errors import EXIT_ERROR
from vmd.sidecar import read_log

pytestmark = pytest.mark.mount

BLOCK = 4 * KiB
REGION = 1 * MiB
UNCLEAN = r"was not stopped cleanly: recovering \d+ regions"
# Errors a write through the mount may see once the daemon is gone.
DEAD_DAEMON_ERRNOS = {errno.ENOTCONN, errno.EIO, errno.ECONNABORTED, errno.ENODEV}

# Figures printed at the end of a run (pytest -s) and quoted in reports.
FIGURES: list[str] = []


# -- helpers ------------------------------------------------------------------------

def inspect_log(d: VmdDaemon, volume: str = "vol0") -> dict[str, Any]:
    """`vmd inspect-log` of the volume's sidecar log (offline, daemon down)."""
    p = d.cli("inspect-log", str(d.log_path(volume)), config=False)
    return json.loads(p.stdout)


def dirty_set(d: VmdDaemon, volume: str = "vol0") -> set[int]:
    """The DRL regions the sidecar log says are dirty (what inspect-log counts)."""
    replay, _, _ = read_log(d.log_path(volume))
    return set(replay.state.drl.set_indices())


def regions_of(off: int, length: int, region: int = REGION) -> range:
    return range(off // region, (off + length - 1) // region + 1)


def plex_hashes(d: VmdDaemon, volume: str = "vol0") -> list[str]:
    return [sha(p) for p in d.plex_paths(volume)]


def read_direct(path: Path, off: int, length: int) -> bytes:
    """Read through the daemon, not the page cache (O_DIRECT, aligned buffer)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, length)
        try:
            got = os.preadv(fd, [buf], off)
            return bytes(buf[:got])
        finally:
            buf.close()
    finally:
        os.close(fd)


def pread_file(path: Path, off: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(length)


def flip_byte(path: Path, off: int) -> None:
    with open(path, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0x5A]))
        f.flush()
        os.fsync(f.fileno())


def record_offsets(path: Path) -> list[tuple[int, int]]:
    """(start, end) of each valid record of a sidecar log, in order."""
    data = path.read_bytes()
    out = []
    off = sc.HEADER_SIZE
    while (got := sc._unframe(data, off)) is not None:
        out.append((off, got[1]))
        off = got[1]
    return out


def run_log_lines(d: VmdDaemon, pattern: str) -> list[str]:
    """Lines of the daemon's current run's stderr that match `pattern`."""
    return [line for line in d.stderr().splitlines() if re.search(pattern, line)]


# -- crash rounds ---------------------------------------------------------------------

CRASH_SIZE = 256 * MiB
CRASH_ROUNDS = 4
CRASH_THREADS = 4
# How long a step that only waits on the daemon may take before the test gives
# up: generous, because CI runs on a machine whose cores other jobs keep busy.
EVENT_TIMEOUT = 60.0
# Longer than any round can last, however loaded the machine: the DRL cleans
# nothing while a round runs, so the log must hold every region written.
NEVER_CLEAN = 3600


class Writer(threading.Thread):
    """Random aligned writes of 4 KiB to 256 KiB within [lo, hi) of the volume
    file, paced, until the daemon dies. Threads own disjoint ranges, so the
    shared `model` has exactly one writer per byte."""

    def __init__(self, path: Path, lo: int, hi: int, seed: int, model: bytearray):
        super().__init__(daemon=True)
        self.path, self.lo, self.hi = path, lo, hi
        self.rng = random.Random(seed)
        self.model = model
        self.stop = threading.Event()
        self.started_writes: list[tuple[int, int]] = []
        self.completed: list[tuple[int, int]] = []
        self.inflight: tuple[int, bytes] | None = None  # issued, not answered
        self.error: OSError | None = None
        self.error_at = 0.0
        self.unexpected: BaseException | None = None
        self.first_done = threading.Event()  # set once a write completed, or the writer ended

    def run(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.unexpected = e
            self.first_done.set()
            return
        try:
            while not self.stop.is_set():
                length = self.rng.randrange(1, 65) * BLOCK
                off = self.rng.randrange(self.lo // BLOCK, (self.hi - length) // BLOCK + 1) * BLOCK
                data = self.rng.randbytes(length)
                self.started_writes.append((off, length))
                self.inflight = (off, data)
                try:
                    n = os.pwrite(fd, data, off)
                except OSError as e:
                    self.error, self.error_at = e, time.monotonic()
                    return
                if n != length:
                    self.unexpected = AssertionError(f"short write {n} of {length} at {off}")
                    return
                self.model[off:off + length] = data
                self.completed.append((off, length))
                self.inflight = None
                self.first_done.set()
                # Paced so that a round dirties a fraction of the volume's regions.
                time.sleep(self.rng.uniform(0.05, 0.15))
        except BaseException as e:  # noqa: BLE001
            self.unexpected = e
        finally:
            self.first_done.set()
            try:
                os.close(fd)  # the close's FUSE flush fails on a dead mount
            except OSError as e:
                if e.errno not in DEAD_DAEMON_ERRNOS:
                    self.unexpected = e


def test_sigkill_under_random_writes_recovers_only_dirty_regions(
        vmd_factory: Callable[..., VmdDaemon], allow_log: Callable[..., None]) -> None:
    allow_log(UNCLEAN)
    seed = int(os.environ.get("VMD_CRASH_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    d = vmd_factory(volumes={"vol0": volume_spec("vol0", size=CRASH_SIZE, region_size="1MiB")},
                    clean_delay=NEVER_CLEAN)
    nregions = CRASH_SIZE // REGION
    model = bytearray(CRASH_SIZE)  # what the volume must hold, byte for byte
    d.start()
    figures = []
    for rnd in range(CRASH_ROUNDS):
        ctx = f"seed {seed} round {rnd}"
        part = CRASH_SIZE // CRASH_THREADS
        writers = [Writer(d.volume_file(), i * part, (i + 1) * part, rng.randrange(1 << 30), model)
                   for i in range(CRASH_THREADS)]
        for w in writers:
            w.start()
        # Kill only once every writer has a write done (on a busy machine the
        # first ones can take seconds), then after a random extra moment, so
        # that the kill lands at a different point of the writes each round.
        for w in writers:
            assert w.first_done.wait(EVENT_TIMEOUT), f"{ctx}: no write done in {EVENT_TIMEOUT} s"
            assert w.unexpected is None and w.error is None and w.completed, \
                f"{ctx}: writer stopped before its first write completed: " \
                f"{w.unexpected or w.error!r}; stderr:\n{d.stderr()}"
        time.sleep(rng.uniform(0, 1.3))
        killed_at = time.monotonic()
        d.kill()
        for w in writers:
            w.stop.set()
            w.join(EVENT_TIMEOUT)
            assert not w.is_alive(), f"{ctx}: a writer hangs after the daemon was killed"
            assert w.unexpected is None, f"{ctx}: {w.unexpected!r}"
            if w.error is not None:  # else it slept through the kill
                assert w.error_at >= killed_at, f"{ctx}: write failed before the kill: {w.error!r}"
                assert w.error.errno in DEAD_DAEMON_ERRNOS, f"{ctx}: {w.error!r}"
        n_completed = sum(len(w.completed) for w in writers)
        assert n_completed > 0, f"{ctx}: no write completed before the kill"

        # The log, read offline before restart.
        info = inspect_log(d)
        dirty = dirty_set(d)
        assert info["dirty_regions"] == len(dirty), ctx
        assert info["clean"] is False, f"{ctx}: volume recorded clean while writers held it open"
        done_regions = {r for w in writers for o, n in w.completed for r in regions_of(o, n)}
        issued_regions = {r for w in writers for o, n in w.started_writes for r in regions_of(o, n)}
        # Invariant 1: every region a finished write touched is durably dirty
        # (clean_delay NEVER_CLEAN: nothing was cleaned). Nothing else is, but for
        # the regions a sequential writer dirties ahead (drl.LOOKAHEAD).
        assert done_regions <= dirty, f"{ctx}: written but not dirty: {sorted(done_regions - dirty)}"
        ahead = {r + k for r in issued_regions for k in range(LOOKAHEAD + 1)}
        assert dirty <= ahead, f"{ctx}: dirty but never written: {sorted(dirty - ahead)}"

        t0 = time.monotonic()
        d.start()
        st = d.status("vol0")
        recovered = st["recovered_regions"]
        assert recovered <= info["dirty_regions"], (ctx, recovered, info["dirty_regions"])
        assert recovered >= len(done_regions) > 0, ctx
        assert recovered < nregions // 2, f"{ctx}: {recovered} of {nregions} regions: not a DRL recovery"
        lines = run_log_lines(d, UNCLEAN)
        assert len(lines) == 1 and f"recovering {recovered} regions" in lines[0], lines
        st = d.wait_resync("vol0")
        seconds = time.monotonic() - t0
        # Exactly the recovered regions were copied: no full resync.
        assert st["resync"]["synced_bytes"] == recovered * REGION, (ctx, st["resync"])

        hashes = plex_hashes(d)
        assert len(set(hashes)) == 1, f"{ctx}: plexes differ after recovery: {hashes}"

        # The volume file reads what the plexes hold, and what the writers
        # wrote: every finished write survives; a write in flight at the kill
        # left each of its 4 KiB blocks either old or new.
        vol = d.volume_file()
        for w in writers:
            if w.inflight is None:
                continue
            off, data = w.inflight
            got = read_direct(vol, off, len(data))
            for b in range(0, len(data), BLOCK):
                blk = got[b:b + BLOCK]
                assert blk in (bytes(model[off + b:off + b + BLOCK]), data[b:b + BLOCK]), \
                    f"{ctx}: block at {off + b} of a torn write is neither old nor new"
            model[off:off + len(data)] = got
        h = hashlib.sha256()
        with open(vol, "rb") as f:
            pos = 0
            while chunk := f.read(4 * MiB):
                assert chunk == model[pos:pos + len(chunk)], \
                    f"{ctx}: volume differs from what was written in [{pos}, {pos + len(chunk)})"
                h.update(chunk)
                pos += len(chunk)
        assert pos == CRASH_SIZE
        assert h.hexdigest() == hashes[0], f"{ctx}: volume file differs from the plexes"
        figures.append(f"round {rnd}: {n_completed} writes done, dirty {info['dirty_regions']}, "
                       f"recovered {recovered}/{nregions} regions, recovery {seconds:.2f} s "
                       f"(resync {st['resync']['seconds']} s)")
    d.stop()
    FIGURES.extend(f"crash seed {seed} {f}" for f in figures)
    print("\n".join(figures))


# -- divergence: a mirror write torn between plexes --------------------------------------

def test_split_write_reads_stable_until_recovered(
        vmd_factory: Callable[..., VmdDaemon], allow_log: Callable[..., None]) -> None:
    allow_log(UNCLEAN)
    size = 64 * MiB
    region = 40                         # the region the torn write lands in
    off = region * REGION + 64 * KiB    # where it starts (the fault's OFFSET)
    n = 64 * KiB
    # Region 0 is dirty too, and written whole: recovery copies it first, and
    # then this rate limit holds region 40 back for 1 MiB / 8 KiB/s = 128 s,
    # far longer than the reads below can take on a busy machine (a region
    # written only in part would be copied in a fraction of that: resync skips
    # holes and counts only what it copies). The rate is lifted by a restart
    # once the reads are checked.
    d = vmd_factory(volumes={"vol0": volume_spec("vol0", size=size, region_size="1MiB")},
                    clean_delay=NEVER_CLEAN, rate_limit="8KiB",
                    env={"VMD_TEST_FAULT": f"split-write:vol0:{off}"})
    rng = random.Random(7)
    old = rng.randbytes(4 * n)  # region 40 from its start, covering [off, off+n)
    new = rng.randbytes(n)
    first = rng.randbytes(REGION)
    d.start()
    vol = d.volume_file()
    fd = os.open(vol, os.O_RDWR)
    try:
        assert os.pwrite(fd, first, 0) == REGION
        assert os.pwrite(fd, old, region * REGION) == len(old)  # does not start at `off`
        with pytest.raises(OSError) as ei:
            os.pwrite(fd, new, off)
        assert ei.value.errno in DEAD_DAEMON_ERRNOS, ei.value
    finally:
        try:
            os.close(fd)
        except OSError as e:  # the close's FUSE flush, on a dead mount
            assert e.errno in DEAD_DAEMON_ERRNOS, e
    assert d.wait_exit(EVENT_TIMEOUT) == -9, "the split-write fault should SIGKILL the daemon"
    d.kill()  # lazy unmount of the dead mount

    p0, p1 = d.plex_paths()
    old_here = old[off - region * REGION:][:n]
    assert pread_file(p0, off, n) == new, "p0 should hold the torn write"
    assert pread_file(p1, off, n) == old_here, "p1 should not have the torn write"
    info = inspect_log(d)
    assert dirty_set(d) == {0, region}, info
    assert not info["clean"]

    d.env.pop("VMD_TEST_FAULT")
    d.start()
    st = d.status("vol0")
    assert st["recovered_regions"] <= info["dirty_regions"]
    assert st["recovered_regions"] == 2, st
    # Invariant 7: until region 40 is recovered, two reads of it agree, and
    # they go to the daemon each time (O_DIRECT: no page cache).
    r1 = read_direct(vol, off, n)
    r2 = read_direct(vol, off, n)
    whole1 = read_direct(vol, region * REGION, REGION)
    st_mid = d.status("vol0")
    whole2 = read_direct(vol, region * REGION, REGION)
    assert r1 == r2, "two reads of an unrecovered dirty region returned different bytes"
    assert whole1 == whole2
    assert whole1[off - region * REGION:][:n] == r1
    assert r1 in (new, old_here), "the read is neither the old nor the new data"
    # The resync had not reached region 40 yet (else this test proves nothing) ...
    rs = st_mid["resync"]
    assert rs["running"] and rs["done_bytes"] <= 1 * MiB, \
        f"resync already past region {region}; raise the rate limit's hold: {rs}"
    # ... yet the read wrote back what it returned: both plexes hold it now.
    assert pread_file(p0, off, n) == pread_file(p1, off, n) == r1

    # The rest of the recovery at full speed: a clean stop in the middle of it,
    # a restart without the rate limit.
    d.stop()
    d.set_rate_limit(None)
    d.start()
    st = d.wait_resync("vol0")
    hashes = plex_hashes(d)
    assert len(set(hashes)) == 1, hashes
    assert read_direct(vol, off, n) == r1, "recovery changed bytes that were already read"
    assert sha(vol) == hashes[0], "the volume file differs from the plexes"
    assert pread_file(vol, 0, REGION) == first
    FIGURES.append(f"split-write: recovered {st['recovered_regions']} regions, read "
                   f"{'new' if r1 == new else 'old'} data, resync {st['resync']['seconds']} s")
    d.stop()


# -- damaged or missing sidecar logs ----------------------------------------------------

def _two_volume_daemon(vmd_factory: Callable[..., VmdDaemon]) -> VmdDaemon:
    return vmd_factory(volumes={"vol0": volume_spec("vol0", size="16MiB", region_size="1MiB"),
                                "vol1": volume_spec("vol1", size="8MiB", region_size="1MiB")},
                       clean_delay=30)


@pytest.mark.parametrize("damage", ["missing", "bad-header", "bad-record"])
def test_damaged_log_refused_then_recover_all(
        vmd_factory: Callable[..., VmdDaemon], allow_log: Callable[..., None], damage: str) -> None:
    allow_log(r"volume vol0 refused: ", r"--recover-all", UNCLEAN)
    d = _two_volume_daemon(vmd_factory)
    size0 = d.volume_size("vol0")
    rng = random.Random(damage)
    d.start()
    data1 = rng.randbytes(3 * MiB)
    with open(d.volume_file("vol1"), "r+b") as f:
        f.write(data1)
    fd = os.open(d.volume_file("vol0"), os.O_RDWR)
    try:
        # One write per region, one after another: each its own `dirty` record.
        for r in range(0, 12, 2):
            assert os.pwrite(fd, rng.randbytes(256 * KiB), r * REGION + 128 * KiB) == 256 * KiB
    finally:
        os.close(fd)
    if damage == "bad-record":
        d.kill()  # no clean stop: the records stay in the log, not compacted away
    else:
        d.stop()
    log0 = d.log_path("vol0")

    if damage == "missing":
        log0.unlink()
    elif damage == "bad-header":
        hdr = log0.read_bytes()[:sc.HEADER_SIZE]
        assert hdr.startswith(sc.HEADER_MAGIC)
        json_len = int.from_bytes(hdr[8:12], "little")
        # Inside the header's JSON, in both its copies (one alone is read around).
        flip_byte(log0, 16 + json_len // 2)
        flip_byte(log0, sc.HEADER_COPY + 16 + json_len // 2)
    else:
        recs = record_offsets(log0)
        assert len(recs) >= 4, f"expected a checkpoint and several dirty records: {recs}"
        start, end = recs[len(recs) // 2]  # neither the first nor the last
        flip_byte(log0, (start + end) // 2)
    damaged = log0.read_bytes() if log0.exists() else None

    # p1 of vol0 goes astray: only a full resync from p0 repairs it.
    p0, p1 = d.plex_paths("vol0")
    with open(p1, "r+b") as f:
        f.seek(5 * MiB)
        f.write(b"\xee" * MiB)
    p0_hash = sha(p0)
    assert sha(p1) != p0_hash

    d.start()
    st = d.status()
    refused = {r["name"]: r["error"] for r in st.get("refused", [])}
    assert set(refused) == {"vol0"}, st
    err = refused["vol0"]
    assert str(log0) in err, f"the refusal does not name the log file: {err}"
    assert "--recover-all vol0" in err, f"the refusal does not say how to recover: {err}"
    why = {"missing": "is missing", "bad-header": "bad sidecar header",
           "bad-record": "valid records follow"}[damage]
    assert why in err, f"the refusal does not say what is wrong: {err}"
    err_lines = run_log_lines(d, r"ERROR .*volume vol0 refused")
    assert err_lines and str(log0) in err_lines[0] and "--recover-all vol0" in err_lines[0], \
        d.stderr()
    # Never "clean" by default: the volume is not served at all ...
    assert [v["name"] for v in st["volumes"]] == ["vol1"], st
    assert sorted(os.listdir(d.mountpoint)) == ["vol1"]
    assert d.cli("status", "vol0", check=False).returncode == EXIT_ERROR
    # ... and nothing was written over the damaged log or the plexes.
    assert (log0.read_bytes() if log0.exists() else None) == damaged
    assert sha(p0) == p0_hash
    # The other volume is served as usual.
    assert pread_file(d.volume_file("vol1"), 0, len(data1)) == data1
    with open(d.volume_file("vol1"), "r+b") as f:
        f.seek(4 * MiB)
        f.write(b"still served")
    d.stop()

    d.daemon_args = ("--recover-all", "vol0")
    if damage != "bad-record":
        # No checkpoint left: the config is all there is, and p1 (gone astray)
        # is newer than p0, so vmd does not guess the source: it is named.
        d.start()
        err = {r["name"]: r["error"] for r in d.status().get("refused", [])}["vol0"]
        assert f"{p1} was modified after it" in err and "vol0=IMAGE" in err, err
        d.stop()
        d.daemon_args = ("--recover-all", f"vol0={p0}")
    t0 = time.monotonic()
    d.start()
    assert not d.status().get("refused"), d.status()
    assert run_log_lines(d, r"--recover-all: rebuilding the sidecar log")
    st = d.wait_resync("vol0")
    seconds = time.monotonic() - t0
    assert st["resync"]["synced_bytes"] == size0, st["resync"]  # a full resync
    assert plex_hashes(d, "vol0") == [p0_hash, p0_hash], "plexes differ, or p0 was not the source"
    assert sha(d.volume_file("vol0")) == p0_hash
    aside = sorted(log0.parent.glob(log0.name + ".damaged-*"))
    if damaged is None:
        assert aside == []
    else:
        assert len(aside) == 1 and aside[0].read_bytes() == damaged, aside
        assert any(str(aside[0]) in line for line in run_log_lines(d, r"old sidecar log kept"))
    d.stop()

    # The rebuilt log is an ordinary one now: a plain restart serves vol0, clean.
    d.daemon_args = ()
    d.start()
    st = d.status()
    assert not st.get("refused") and {v["name"] for v in st["volumes"]} == {"vol0", "vol1"}, st
    assert d.status("vol0")["recovered_regions"] == 0
    assert not run_log_lines(d, UNCLEAN)
    d.stop()
    FIGURES.append(f"recover-all after {damage}: {size0 // MiB} MiB copied, "
                   f"{seconds:.2f} s to in sync")


# -- clean stops ---------------------------------------------------------------------------

def test_clean_stop_then_restart_recovers_nothing(vmd_factory: Callable[..., VmdDaemon]) -> None:
    d = vmd_factory(volumes={"vol0": volume_spec("vol0", size="32MiB", region_size="1MiB")},
                    clean_delay=NEVER_CLEAN)
    rng = random.Random(3)
    d.start()
    ref = bytearray(32 * MiB)
    fd = os.open(d.volume_file(), os.O_RDWR)
    try:
        for _ in range(40):
            n = rng.randrange(1, 65) * BLOCK
            o = rng.randrange(0, 32 * MiB - n)
            data = rng.randbytes(n)
            assert os.pwrite(fd, data, o) == n
            ref[o:o + n] = data
        os.fsync(fd)
        # The file stays open through the stop: a closed, idle volume is marked
        # clean a second later, however slow the machine, and then the stop
        # would have nothing to clean. Hence --force.
        assert d.status("vol0")["dirty_regions"] > 0
        d.stop(force=True)
    finally:
        try:
            os.close(fd)
        except OSError as e:  # the close's FUSE flush, on the unmounted volume
            assert e.errno in DEAD_DAEMON_ERRNOS, e
    info = inspect_log(d)
    assert info["clean"] is True and info["dirty_regions"] == 0, info

    d.start()
    st = d.status("vol0")
    assert st["recovered_regions"] == 0, st
    assert st["clean"] is True
    rs = st["resync"]
    assert not rs["running"] and rs["total_bytes"] == 0 and rs["copied_bytes"] == 0, rs
    assert all(p["state"] == "ACTIVE" and p["missing_bytes"] == 0 for p in st["plexes"]), st
    assert not run_log_lines(d, r"not stopped cleanly")
    hashes = plex_hashes(d)
    assert len(set(hashes)) == 1
    assert pread_file(d.volume_file(), 0, 32 * MiB) == ref
    d.stop()


def test_closed_idle_volume_is_clean_so_a_crash_recovers_nothing(
        vmd_factory: Callable[..., VmdDaemon]) -> None:
    """The volume dirty flag clears once every opener closed the file and the
    data is flushed; a SIGKILL after that needs no recovery at all."""
    d = vmd_factory(volumes={"vol0": volume_spec("vol0", size="16MiB", region_size="1MiB")},
                    clean_delay=1)
    d.start()
    data = random.Random(5).randbytes(3 * MiB)
    with open(d.volume_file(), "r+b") as f:
        f.write(data)
    deadline = time.monotonic() + 15
    while not d.status("vol0")["clean"]:
        assert time.monotonic() < deadline, d.status("vol0")
        time.sleep(0.2)
    d.kill()
    info = inspect_log(d)
    assert info["clean"] is True and info["dirty_regions"] == 0, info
    d.start()
    st = d.status("vol0")
    assert st["recovered_regions"] == 0 and not st["resync"]["running"], st
    assert not run_log_lines(d, r"not stopped cleanly")
    assert len(set(plex_hashes(d))) == 1
    assert pread_file(d.volume_file(), 0, len(data)) == data
    d.stop()


def teardown_module() -> None:
    if FIGURES:
        print("\n" + "\n".join(FIGURES))
