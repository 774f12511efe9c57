"""Verify and repair (issue 15, part 1) and recoveries spread per disk (part 4),
on a real daemon, real plex images and real fio."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from conftest import REPO, MiB, VmdDaemon, pwrite_file, sha, volume_spec, wait_for
from vmd.spread import DeviceSlots, Queued

SECTOR = 512
MISMATCH_LOG = r"verify.* mismatched in \d+ range"


def flip(path: Path, off: int, n: int) -> bytes:
    """Invert n bytes of an image at off (a hole becomes 0xff); the new bytes."""
    fd = os.open(path, os.O_RDWR)
    try:
        new = bytes(b ^ 0xFF for b in os.pread(fd, n, off).ljust(n, b"\0"))
        os.pwrite(fd, new, off)
        os.fsync(fd)
    finally:
        os.close(fd)
    return new


def sector_runs(flips: list[tuple[int, int]]) -> list[list[int]]:
    """The [offset, length] runs of 512-byte sectors the flipped bytes touch."""
    sectors = sorted({s for off, n in flips for s in range(off // SECTOR, (off + n - 1) // SECTOR + 1)})
    runs: list[list[int]] = []
    for s in sectors:
        if runs and runs[-1][0] + runs[-1][1] == s * SECTOR:
            runs[-1][1] += SECTOR
        else:
            runs.append([s * SECTOR, SECTOR])
    return runs


def read_at(path: Path, off: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)


def verify(d: VmdDaemon, *args: str, volume: str = "vol0") -> tuple[int, str, dict[str, Any]]:
    """`vmd verify VOLUME ARGS`: exit code, stdout, and the `verify` of status."""
    p = d.cli("verify", volume, *args, check=False, timeout=120)
    assert p.returncode in (0, 1), f"vmd verify exited {p.returncode}: {p.stderr}"
    return p.returncode, p.stdout, d.status(volume)["verify"]


@pytest.mark.mount
@pytest.mark.allow_log(MISMATCH_LOG)
def test_verify_finds_flipped_bytes_and_repair_makes_plexes_identical(
        vmd_factory: Callable[..., VmdDaemon]) -> None:
    d = vmd_factory().start()
    size = d.volume_size()
    pwrite_file(d.volume_file(), [(0, os.urandom(8 * MiB)), (40 * MiB, os.urandom(MiB))])
    rc, out, r = verify(d)
    assert rc == 0 and "no mismatches" in out, out
    assert r["mismatched_bytes"] == 0 and r["checked_bytes"] == size and r["complete"], r
    d.stop()

    p0, p1 = d.plex_paths()
    # Whole sectors, a single byte, a run across a sector boundary, and data
    # where both images had a hole (p0 still reads zeros there).
    flips = [(4096, 4096), (MiB + 700, 1), (40 * MiB + 1546, 1000), (20 * MiB, 512)]
    flipped = {off: flip(p1, off, n) for off, n in flips}
    expected = sector_runs(flips)

    d.start()
    rc, out, r = verify(d)
    assert rc == 1, out
    assert r["ranges"] == expected, (r["ranges"], expected)
    assert r["mismatched_bytes"] == sum(n for _, n in expected) and r["range_count"] == len(expected)
    assert r["checked_bytes"] == size and r["repaired_bytes"] == 0, r
    assert f"mismatched in {len(expected)} ranges" in out, out
    assert f"offset {expected[0][0]} " in out, out
    assert "verify finished" in d.stderr() and "mismatched in 4 ranges" in d.stderr()
    assert "mismatched in 4 ranges" in d.cli("status").stdout.split("last verify ")[1]

    # --from p1: the flipped bytes win.
    rc, out, r = verify(d, "--repair", "--from", "p1")
    assert rc == 0, out
    assert r["repaired_bytes"] == r["mismatched_bytes"] == sum(n for _, n in expected), r
    assert r["source"] == "p1" and "plex p0 now holds plex p1's bytes" in out, out
    rc, out, r = verify(d)
    assert rc == 0 and r["mismatched_bytes"] == 0, out
    # The volume file shows the repaired bytes (the kernel's cache was dropped).
    for off, new in flipped.items():
        assert read_at(d.volume_file(), off, len(new)) == new
    d.stop()
    assert sha(p0) == sha(p1)
    for off, new in flipped.items():
        assert read_at(p0, off, len(new)) == new

    # The default source is p0: flip p1 again, repair, p1 takes p0's bytes back.
    original = read_at(p0, 30 * 512, 3 * 512)
    flip(p1, 30 * 512, 3 * 512)
    d.start()
    assert d.status("vol0")["verify"] == r, "the last result is kept across a restart"
    rc, out, r = verify(d, "--repair")
    assert rc == 0 and r["ranges"] == [[30 * 512, 3 * 512]] and r["source"] == "p0", r
    d.stop()
    assert sha(p0) == sha(p1)
    assert read_at(p1, 30 * 512, 3 * 512) == original


@pytest.mark.mount
def test_verify_refuses_what_it_cannot_do(vmd: VmdDaemon) -> None:
    p = vmd.cli("verify", "vol0", "--repair", "--from", "p7", check=False)
    assert p.returncode == 1 and "no plex 'p7'" in p.stderr, p.stderr
    p = vmd.cli("verify", "vol0", "--from", "p1", check=False)
    assert p.returncode == 1 and "--from PLEX needs --repair" in p.stderr, p.stderr
    vmd.cli("plex", "detach", "vol0", "p1")
    p = vmd.cli("verify", "vol0", check=False)
    assert p.returncode == 1 and "1 in-sync plex (p0): nothing to compare" in p.stderr, p.stderr
    p = vmd.cli("verify", "nosuch", check=False)
    assert p.returncode == 1 and "nosuch" in p.stderr, p.stderr


@pytest.mark.mount
@pytest.mark.skipif(shutil.which("fio") is None, reason="needs fio")
def test_verify_under_concurrent_random_writes_finds_no_mismatch(
        vmd_factory: Callable[..., VmdDaemon]) -> None:
    # A rate limit stretches the verify over seconds of fio writes.
    d = vmd_factory(rate_limit="16MiB").start()
    vol = d.volume_file()
    size = d.volume_size()
    pwrite_file(vol, [(off, os.urandom(4 * MiB)) for off in range(0, size, 4 * MiB)])
    p0 = d.plex_paths()[0]
    before = os.stat(p0).st_mtime_ns
    fio = subprocess.Popen(
        ["fio", "--name=randw", f"--filename={vol}", "--rw=randwrite", "--bs=4k",
         f"--size={size}", "--ioengine=psync", "--iodepth=1", "--numjobs=2",
         "--time_based", "--runtime=600", "--output-format=json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: os.stat(p0).st_mtime_ns != before, what="fio's writes to reach plex p0")
        rc, out, r = verify(d)
        assert fio.poll() is None, f"fio ended during the verify: {fio.stderr}"
    finally:
        fio.send_signal(signal.SIGINT)
        fio_out, fio_err = fio.communicate(timeout=60)
    assert rc == 0 and r["mismatched_bytes"] == 0 and r["ranges"] == [], (out, r)
    assert r["checked_bytes"] == size and r["complete"], r
    assert r["seconds"] >= 2, "the verify was not slowed down enough to overlap the writes"
    report = json.loads(fio_out[fio_out.index("{"):])  # after "fio: terminating on signal 2"
    written = sum(j["write"]["io_bytes"] for j in report["jobs"])
    assert written > MiB, fio_out
    d.stop()
    assert sha(d.plex_paths()[0]) == sha(d.plex_paths()[1])


# -- recoveries spread per disk --------------------------------------------------


def _resync_states(d: VmdDaemon, names: list[str]) -> dict[str, str]:
    """Per volume: running, queued, or idle (all in sync)."""
    out = {}
    for v in d.request({"cmd": "status"})["volumes"]:
        if v["name"] in names:
            rs = v["resync"]
            syncing = any(p["state"] == "SYNCING" for p in v["plexes"])
            out[v["name"]] = ("queued" if rs["queued"] else "running" if rs["running"]
                              else "pending" if syncing else "idle")
    return out


class OnTerminal:
    """A `vmd` command with its stderr on a pseudo-terminal (progress is shown
    only there), read by a thread."""

    def __init__(self, d: VmdDaemon, *args: str):
        master, slave = os.openpty()
        self.proc = subprocess.Popen([sys.executable, "-m", "vmd", "-c", str(d.config_path), *args],
                                     cwd=REPO, stdout=subprocess.PIPE, stderr=slave, text=True)
        os.close(slave)
        self.said = ""

        def read() -> None:
            while True:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: the command closed the terminal
                    break
                if not chunk:
                    break
                self.said += chunk.decode(errors="replace")
            os.close(master)

        threading.Thread(target=read, daemon=True).start()


def _job_log(d: VmdDaemon) -> list[tuple[str, ...]]:
    """(volume, resync|verify, started|finished) of the daemon's log lines, in order."""
    return [m.group(1, 2, 3) for m in re.finditer(
        r"^.*volume (\w+): (resync|verify)\b.*?\b(started|finished)", d.stderr(), re.M)]


@pytest.mark.mount
def test_resyncs_on_one_disk_run_one_at_a_time_in_order(
        vmd_factory: Callable[..., VmdDaemon]) -> None:
    names = ["v0", "v1", "v2"]
    d = vmd_factory(volumes={v: volume_spec(v, size="16MiB") for v in names},
                    rate_limit="4MiB").start()
    for v in names:
        pwrite_file(d.volume_file(v), [(0, os.urandom(8 * MiB))])
    d.request({"cmd": "plex.add", "volume": "v0", "path": str(d.base / "v0-p2.img")})
    wait_for(lambda: _resync_states(d, names)["v0"] == "running", what="v0's resync to run")
    for v in names[1:]:
        d.request({"cmd": "plex.add", "volume": v, "path": str(d.base / f"{v}-p2.img")})
    st = wait_for(lambda: (s := _resync_states(d, names))["v2"] == "queued" and s, what="queued")
    assert st == {"v0": "running", "v1": "queued", "v2": "queued"}, st
    text = d.cli("status").stdout
    assert "resync: queued behind resync of volume v0 (resync.per_device)" in text, text
    queued = d.status("v2")["resync"]
    assert queued["queued"] and queued["queued_behind"] == ["resync of volume v0"], queued
    # `vmd wait` on a terminal says what its resync waits for (it showed "0B / 0B").
    waiting = OnTerminal(d, "wait", "v2")
    wait_for(lambda: "queued behind" in waiting.said or "/" in waiting.said,
             what="vmd wait v2 to show its progress")
    assert "v2 resync: queued behind resync of volume v0 (resync.per_device)" in waiting.said, \
        waiting.said
    # A verify waits its turn on the disk too.
    job = subprocess.Popen([sys.executable, "-m", "vmd", "-c", str(d.config_path), "verify", "v0"],
                           cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: d.status("v0").get("verify_running", {}).get("queued"),
                 what="the verify of v0 to be queued")
        def finished() -> bool:
            s = _resync_states(d, names)
            running = [v for v, x in s.items() if x == "running"]
            assert len(running) <= 1, f"two resyncs on one disk at once: {s}"
            return all(x == "idle" for x in s.values())

        wait_for(finished, timeout=120, what="every resync to finish")
        assert job.wait(timeout=60) == 0
        assert waiting.proc.wait(timeout=60) == 0
        assert "v2: in sync" in waiting.proc.stdout.read()  # type: ignore[union-attr]
    finally:
        for p in (job, waiting.proc):
            if p.poll() is None:
                p.kill()
    assert "no mismatches" in job.stdout.read()  # type: ignore[union-attr]
    # The daemon's log: each job started after the one before it finished, in order.
    assert _job_log(d) == [("v0", "resync", "started"), ("v0", "resync", "finished"),
                           ("v1", "resync", "started"), ("v1", "resync", "finished"),
                           ("v2", "resync", "started"), ("v2", "resync", "finished"),
                           ("v0", "verify", "started"), ("v0", "verify", "finished")]
    for v in names:
        assert len({sha(p) for p in [*d.plex_paths(v), d.base / f"{v}-p2.img"]}) == 1


@pytest.mark.mount
def test_per_device_zero_runs_resyncs_at_once(vmd_factory: Callable[..., VmdDaemon]) -> None:
    names = ["v0", "v1"]
    d = vmd_factory(volumes={v: volume_spec(v, size="16MiB") for v in names},
                    extra={"resync": {"rate_limit": "4MiB", "per_device": 0}})
    d.start()
    for v in names:
        pwrite_file(d.volume_file(v), [(0, os.urandom(8 * MiB))])
    for v in names:
        d.request({"cmd": "plex.add", "volume": v, "path": str(d.base / f"{v}-p2.img")})
    wait_for(lambda: set(_resync_states(d, names).values()) == {"running"},
             what="both resyncs running at once")
    for v in names:
        d.wait_resync(v)


# -- DeviceSlots alone (no mount) -------------------------------------------------


def test_a_queued_job_names_what_it_waits_behind_now() -> None:
    """The third job in line waited behind the first long after the first
    ended and the second took the disk: status said so (new-user trial 8)."""

    async def main() -> None:
        slots = DeviceSlots(1)
        gates = {n: trio.Event() for n in ("j1", "j2", "j3")}
        queues = {n: Queued() for n in gates}

        async def job(name: str) -> None:
            async with slots.turn(frozenset({1}), name, queues[name]):
                await gates[name].wait()

        async with trio.open_nursery() as n:
            for name in gates:
                n.start_soon(job, name)
                await trio.testing.wait_all_tasks_blocked()
            assert queues["j2"].behind == queues["j3"].behind == ["j1"]
            gates["j1"].set()
            await trio.testing.wait_all_tasks_blocked()
            assert queues["j2"].behind == [] and queues["j3"].behind == ["j2"]
            gates["j2"].set()
            gates["j3"].set()

    trio.run(main)


def test_device_slots_order_independence_and_cancel() -> None:
    events: list[str] = []

    async def main() -> None:
        slots = DeviceSlots(1)
        gates = {n: trio.Event() for n in ("a1", "a2", "b1", "a3")}

        async def job(name: str, devs: frozenset[int], q: Queued | None = None) -> None:
            async with slots.turn(devs, name, q):
                events.append(f"start {name}")
                await gates[name].wait()
            events.append(f"end {name}")

        async with trio.open_nursery() as n:
            n.start_soon(job, "a1", frozenset({1}))
            await trio.testing.wait_all_tasks_blocked()
            q = Queued()
            n.start_soon(job, "a2", frozenset({1}), q)
            await trio.testing.wait_all_tasks_blocked()
            assert q.behind == ["a1"]
            # A job on another device does not wait behind device 1's queue.
            n.start_soon(job, "b1", frozenset({2}))
            await trio.testing.wait_all_tasks_blocked()
            assert events == ["start a1", "start b1"]
            # A queued job that is cancelled gives its place up.
            with trio.CancelScope() as cs:
                cs.cancel()
                async with slots.turn(frozenset({1}), "gone"):
                    raise AssertionError("a cancelled job ran")
            n.start_soon(job, "a3", frozenset({1, 2}))
            await trio.testing.wait_all_tasks_blocked()
            gates["a1"].set()
            await trio.testing.wait_all_tasks_blocked()
            assert events[-1] == "start a2" and q.behind == []
            gates["b1"].set()
            gates["a2"].set()
            await trio.testing.wait_all_tasks_blocked()
            assert events[-1] == "start a3"
            gates["a3"].set()

    trio.run(main)
    assert events.index("start a3") > events.index("end a2")


def _verify_under_way(vmd_factory: Callable[..., VmdDaemon], *, found_before: bool = False
                      ) -> tuple[VmdDaemon, int, subprocess.Popen[str]]:
    """A daemon whose data a `vmd verify` client is checking, slowed by the
    rate limit, once it has made progress. Every byte is data: the pace
    counts bytes read, and a hole is not read (with half the volume holes the
    verify ended before a slow CI machine's status poll saw it midway).
    `found_before`: a whole verify first found 512 bytes of p1 changed."""
    d = vmd_factory().start()
    size = d.volume_size()
    pwrite_file(d.volume_file(), [(0, os.urandom(size))])
    d.stop()
    if found_before:
        with open(d.plex_paths()[1], "r+b") as f:
            f.seek(MiB)
            f.write(bytes(512))
        d.start()
        assert d.cli("verify", "vol0", check=False).returncode == 1
        d.stop()
    d.set_rate_limit("2MiB")
    d.start()
    job = subprocess.Popen([sys.executable, "-m", "vmd", "-c", str(d.config_path), "verify", "vol0"],
                           cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: d.status("vol0").get("verify_running", {}).get("done_bytes"),
                 what="the verify to make progress")
    except BaseException:
        job.kill()
        raise
    return d, size, job


@pytest.mark.mount
@pytest.mark.allow_log(r"verify finished: .* mismatched in 1 range")
def test_interrupted_verify_stops_and_its_partial_result_says_so(
        vmd_factory: Callable[..., VmdDaemon]) -> None:
    """...and keeps the last complete result beside it: the mismatch a whole
    verify had found vanished from status (new-user trial 8)."""
    d, size, job = _verify_under_way(vmd_factory, found_before=True)
    try:
        job.send_signal(signal.SIGINT)  # Ctrl-C: the verify stops with its client
        _, err = job.communicate(timeout=30)
        assert job.returncode == 130, err
        assert "interrupted: the verify of volume vol0 stops" in err, err
    finally:
        if job.poll() is None:
            job.kill()
    r = wait_for(lambda: "verify_running" not in (s := d.status("vol0")) and s.get("verify"),
                 what="the verify to stop")
    assert r["complete"] is False and 0 < r["stopped_at"] < size, r
    assert r["last_complete"]["mismatched_bytes"] == 512, r
    assert "verify stopped" in d.stderr()
    text = d.cli("status").stdout
    assert "(stopped before the end)" in text, text
    assert re.search(r"last complete verify .*: 512B? mismatched in 1 range", text), text


@pytest.mark.mount
@pytest.mark.allow_log(r"verify finished: .* mismatched in 1 range")
def test_a_verify_killed_with_the_daemon_is_shown_unfinished(
        vmd_factory: Callable[..., VmdDaemon]) -> None:
    """A verify the daemon died during leaves no result of its own: status
    said the result before it ("no mismatches") as if it were the last one
    (new-user trial 10, T-F). While it runs, status shows the one before."""
    d, size, job = _verify_under_way(vmd_factory, found_before=True)
    try:
        r = d.status("vol0")["verify"]
        assert r["complete"] and r["mismatched_bytes"] == 512 and "unfinished" not in r, r
        d.kill()
        job.communicate(timeout=30)
        assert job.returncode != 0
    finally:
        if job.poll() is None:
            job.kill()
    d.start()
    r = d.status("vol0")["verify"]
    assert r["unfinished"] and not r["complete"], r
    assert r["last_complete"]["mismatched_bytes"] == 512, r
    text = d.cli("status").stdout
    assert "started and did not finish: the daemon stopped during it" in text, text
    assert re.search(r"last complete verify .*: 512B? mismatched in 1 range", text), text
    # The next whole verify's result replaces it.
    d.set_rate_limit(None)
    d.restart()
    rc, _, r = verify(d)
    assert rc == 1 and r["complete"] and r["mismatched_bytes"] == 512, r
    assert "unfinished" not in r and "last_complete" not in r, r


@pytest.mark.mount
def test_daemon_stop_ends_a_running_verify_and_tells_its_client(
        vmd_factory: Callable[..., VmdDaemon]) -> None:
    """The verify is a job of the daemon's verify task group, which `vmd stop`
    stops before the volumes close: the client is told, the partial result kept."""
    d, size, job = _verify_under_way(vmd_factory)
    try:
        d.stop()
        _, err = job.communicate(timeout=30)
        assert job.returncode == 1, err
        assert re.search(r"the verify of volume vol0 was stopped at offset \d+ of "
                         rf"{size}: the daemon is stopping", err), err
    finally:
        if job.poll() is None:
            job.kill()
    d.start()
    r = d.status("vol0")["verify"]
    assert r["complete"] is False and 0 < r["stopped_at"] < size, r


@pytest.mark.mount
def test_repair_of_a_remote_copy_target_is_refused(vmd_factory: Callable[..., VmdDaemon],
                                                   tmp_path: Path) -> None:
    from test_rcopy import make_pair, sync

    a, b = make_pair(vmd_factory, tmp_path)
    pwrite_file(a.volume_file(), [(0, os.urandom(2 * MiB))])
    sync(a)
    p = b.cli("verify", "vol0", "--repair", check=False)
    assert p.returncode == 1, p.stderr
    assert ("volume vol0 is the remote copy target of volume vol0: its bytes belong to its "
            "source, and --repair would write bytes that no update sent") in p.stderr, p.stderr
    assert "verify" not in b.status("vol0"), "a refused repair ran"
    rc, out, r = verify(b)  # checking it is fine
    assert rc == 0 and r["mismatched_bytes"] == 0, out
    b.cli("rcopy", "promote", "vol0")  # its bytes are its own now
    rc, out, r = verify(b, "--repair")
    assert rc == 0 and r["repair"], out


async def test_repair_dirties_its_regions_before_writing(tmp_path: Path) -> None:
    """A repair is a write where reads may already have been answered from the
    source: its regions are durably dirty in the DRL before a plex changes,
    so a crash before the repair is flushed is recovered (one copy
    everywhere) rather than left to reads that alternate between two."""
    from enginekit import running_volume, volume_config
    from vmd.verify import Verify

    vc = volume_config(tmp_path, size=8 * MiB, region_size=1 * MiB)
    async with running_volume(vc, clean_delay=3600) as vol:
        await vol.pwrite(5 * MiB, b"a" * 4096)
        await vol.flush()
        vol.drl.state.drl.bits.setall(0)  # as after the lazy clean
        await vol.checkpoint()
        p1 = vol.plex("p1")
        os.pwrite(p1.fd, b"b" * 4096, 5 * MiB)  # p1 disagrees in region 5
        dirty_at_write: list[bool] = []
        write = p1.pwrite

        async def watched(off: int, data: Any) -> None:
            dirty_at_write.append(bool(vol.drl.state.drl.bits[off // MiB]))
            await write(off, data)

        p1.pwrite = watched  # type: ignore[method-assign]
        result = await Verify(vol, repair=True, source="p0").work()
        assert result["mismatched_bytes"] == 4096 and result["repaired_bytes"] == 4096
        assert dirty_at_write == [True], "the repair wrote before its region was dirty"
        assert os.pread(p1.fd, 4096, 5 * MiB) == b"a" * 4096


async def test_repair_reaches_a_syncing_plex_the_resync_already_copied_there(
        tmp_path: Path) -> None:
    """A SYNCING plex takes writes but is not compared: where its resync has
    already copied the source's wrong bytes, the repair writes the good ones
    there too, or it becomes ACTIVE holding bytes no other plex has and reads
    alternate (reviewer 4, F7)."""
    from enginekit import running_volume, volume_config
    from vmd.sidecar import ACTIVE, SYNCING
    from vmd.verify import Verify

    vc = volume_config(tmp_path, size=16 * MiB, region_size=1 * MiB)
    # Rate-limited: one chunk at a time, and time to see offset 0 copied.
    async with running_volume(vc, rate_limit=2 * MiB) as vol:
        await vol.pwrite(0, b"a" * 4096)
        await vol.pwrite(4 * MiB, os.urandom(8 * MiB))  # ~4 s of copy after offset 0
        await vol.flush()
        os.pwrite(vol.plex("p1").fd, b"b" * 4096, 0)  # p1 holds the good copy at 0
        p2 = await vol.add_plex(str(tmp_path / "p2.img"))
        with trio.fail_after(20):  # its resync copied offset 0 from p0 (the wrong bytes)
            while p2.record.missing.bits[0]:
                await trio.sleep(0.01)
        with trio.fail_after(30):
            async with vol.resync.paused():  # it resumes where it stopped, after the repair
                vol.resync.rate_limit = 0  # (a verify is throttled by it too)
                assert p2.state == SYNCING and not p2.record.missing.bits[0]
                result = await Verify(vol, repair=True, source="p1").work()
            assert result["repaired_bytes"] == 4096, result
            while p2.state != ACTIVE:
                await trio.sleep(0.05)
        copies = {p.name: os.pread(p.fd, 4096, 0) for p in vol.plexes}
    assert set(copies.values()) == {b"b" * 4096}, {n: c[:1] for n, c in copies.items()}
