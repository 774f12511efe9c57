#!/usr/bin/env python3
"""`make bench`: vmd against qemu-storage-daemon (quorum over two raw files,
FUSE export) and a plain file, plus DRL, crash-recovery and FastResync figures.

Run as root from the repository's virtualenv:  .venv/bin/python bench/run.py [--quick]

Sections, in order (each can be skipped: --skip-fio, --skip-loop, --skip-recovery,
--skip-holes, --skip-spread, --skip-nbd, --skip-raid5):
- the fio matrix on the volume files themselves, and the pyfuse3 floor
  (fuse_floor.py);
- the loop-device section (loopdev.py): each target behind its own /dev/loopN,
  as a user attaches it, fio direct=1 on the loop device, warm and cold, then
  ext4 on each loop device (fio fsync=32, cp -a + sync);
- crash recovery, full resync, FastResync and dd on a larger volume
  (recovery.py);
- full resync of a mostly empty volume of the same size (holes.py): holes
  skipped, against copying everything and against dd; then its Remote Copy
  full update over a local link, holes sent as zero ranges or as bytes;
- recoveries spread per disk (recovery_spread.py): 4 volumes of 1 GiB recovering
  at once after a crash and in full, one resync per disk against all at once.
- remote plexes (nbd.py): vmd with a qemu-nbd export against qsd's quorum
  with an nbd child, Unix socket and TCP, and against vmd's local mirror.
- RAID-5 (raid5.py): 3 columns with and without the RAID-5 log against the
  mirror and a raw file, through the volume file and a loop device; degraded
  reads; the rebuild of a column against dd.

To A/B a change on the loop-device rows alone (vmd and qsd, the same method,
about 3 minutes; run it on both trees and compare the vmd/qsd column):

    .venv/bin/python bench/ab.py --loop [--warm | --cold] [--fs] [--set direct_io=false]

Everything happens in one scratch directory on the disk the plexes would use
(default: var/bench-* in the repository, never tmpfs); daemons are stopped,
loop devices detached, mounts unmounted and scratch files removed however the
run ends. Results go to stdout and to bench/results/<timestamp>.md (+ .json,
raw data).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fiojobs import NUMJOBS, WORKLOADS, fio_args, prefill_args, run_fio  # noqa: E402
import fuse_floor  # noqa: E402
from holes import HolesBench  # noqa: E402
from raid5 import Raid5Bench  # noqa: E402
from loopdev import LoopBench  # noqa: E402
from recovery import RecoveryBench  # noqa: E402
from recovery_spread import SpreadBench  # noqa: E402
from nbd import NbdBench  # noqa: E402
from measure import (Caches, Samples, Target, TableRow, fmt_ratio, fmt_size, fmt_val,  # noqa: E402
                     log, parse_size, rotated, vs_table)
from procs import (GiB, MiB, REPO, BenchError, Cleanup, Qsd, Vmd,  # noqa: E402
                   shipped_volume_settings, tail)

RESULTS = Path(__file__).resolve().parent / "results"
DRL_JOBS = ("seqwrite", "randwrite")  # also run on a DRL-off vmd, for the DRL cost


# -- small helpers ---------------------------------------------------------------


def loadavg() -> float:
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")


def verify_mirror(front: Path, images: list[Path], offset: int, what: str) -> None:
    """Write 1 MiB of random bytes through `front`, fsync, and check every image got it."""
    pattern = os.urandom(MiB)
    fd = os.open(front, os.O_RDWR)
    try:
        os.pwrite(fd, pattern, offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    for img in images:
        with open(img, "rb") as f:
            f.seek(offset)
            if f.read(MiB) != pattern:
                raise BenchError(f"{what}: image {img.name} did not get the data written through "
                                 f"the export (mirror set-up is wrong)")


# -- the run ---------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, scratch: Path, cleanup: Cleanup):
        self.a = args
        self.scratch = scratch
        self.cleanup = cleanup
        self.caches = Caches()
        self.raw: dict[str, Any] = {"params": {}, "fio": [], "recovery": {}, "info": {}}
        self.md: list[str] = []
        self.vol_settings = shipped_volume_settings()

    # -- fio matrix ---------------------------------------------------------

    def matrix(self) -> None:
        a = self.a
        size = a.size
        vmd = Vmd(self.scratch / "vmd", {"vol0": {"size": size, **self.vol_settings}}, self.cleanup)
        nodrl = Vmd(self.scratch / "vmd-nodrl",
                    {"vol0": {"size": size, **self.vol_settings, "drl": False}}, self.cleanup)
        qsd = Qsd(self.scratch / "qsd", size, self.cleanup)
        fdir = self.scratch / "file"
        fdir.mkdir()
        raw_img = fdir / "raw.img"
        with open(raw_img, "wb") as f:
            f.truncate(size)

        log("starting vmd (DRL on), vmd (DRL off), qemu-storage-daemon")
        vmd.start()
        nodrl.start()
        qsd.create()
        qsd.start()
        # Set-up checks: a write through each mirror reaches both images.
        verify_mirror(vmd.file("vol0"), [vmd.plex("vol0", 0), vmd.plex("vol0", 1)],
                      size // 2 + 4096 * 3, "vmd")
        verify_mirror(nodrl.file("vol0"), [nodrl.plex("vol0", 0), nodrl.plex("vol0", 1)],
                      size // 2 + 4096 * 3, "vmd (DRL off)")
        verify_mirror(qsd.file, qsd.images, size // 2 + 4096 * 3, "qemu-storage-daemon quorum")
        log("mirror check passed: writes through vmd and through qsd reach both images")

        targets = {t.name: t for t in (
            Target("vmd", vmd.file("vol0"), vmd.pid), Target("qsd", qsd.file, qsd.pid),
            Target("file", raw_img), Target("vmd-drl-off", nodrl.file("vol0"), nodrl.pid))}
        prefill = {}
        for name, t in targets.items():
            self.caches.drop()
            r = run_fio(prefill_args(t.path, size), None, timeout=900)
            prefill[name] = r.bw_bytes / 1e6
            log(f"prefilled {name}: {fmt_size(size)} at {prefill[name]:.0f} MB/s")
        self.raw["prefill_mbps"] = prefill

        self.samples = samples = Samples()  # partial results are reported if the run is cut short
        self.raw["fio"] = samples.records
        t_start = time.monotonic()
        for rep in range(a.side_reps):
            for wl in WORKLOADS:
                for nj in NUMJOBS:
                    names = rotated(["vmd", "qsd", "file"], rep)
                    if wl.key in DRL_JOBS:
                        names.append("vmd-drl-off")
                    for name in names:
                        self.caches.drop()
                        r = samples.fio((wl.key, nj), targets[name],
                                        fio_args(wl, nj, targets[name].path, size, a.runtime), wl)
                        log(f"rep {rep + 1}/{a.side_reps} {wl.label:<17} nj={nj} {name:<12} "
                            f"{fmt_val(r.value, wl.unit):>8} {wl.unit}")
        self.raw["matrix_seconds"] = round(time.monotonic() - t_start, 1)

        st = vmd.status("vol0")
        st_nodrl = nodrl.status("vol0")
        info = self.raw["info"]
        info["vmd_max_write"] = st.get("max_write")
        info["vmd_nodrl_max_write"] = st_nodrl.get("max_write")
        info["vmd_hwm_kib"] = vmd.hwm_kib()
        info["vmd_nodrl_hwm_kib"] = nodrl.hwm_kib()
        info["qsd_hwm_kib"] = qsd.hwm_kib()
        info["vmd_log_bytes"] = st.get("log_bytes")
        info["vmd_plex_states"] = [p["state"] for p in st["plexes"]]

        log("stopping the fio targets")
        vmd.stop()
        nodrl.stop()
        qsd.stop()
        for d in ("vmd", "vmd-nodrl", "qsd", "file"):
            shutil.rmtree(self.scratch / d, ignore_errors=True)

    def matrix_report(self) -> None:
        s = self.samples
        md = self.md
        md.append("## fio: vmd vs qemu-storage-daemon (quorum) vs plain file")
        md.append("")
        md.append(f"Median of {self.a.side_reps} repetition(s); MB/s = 10^6 bytes/s. Targets alternate "
                  f"job by job (rotating start); page caches dropped (sync; echo 3 > "
                  f"/proc/sys/vm/drop_caches) before every job"
                  + ("" if not self.caches.failed else
                     f" — **{self.caches.failed} drops FAILED**") + ".")
        md.append("")
        md.append("CPU/req: the daemon's CPU time (user + system, all threads) per fio request, "
                  f"median µs; the machine has {os.cpu_count()} CPUs, shared with fio. "
                  "Writeback that vmd's fdatasyncs start is counted to vmd; qsd leaves it to "
                  "the kernel's flusher threads.")
        md.append("")
        md += vs_table(["fio job", "numjobs"],
                       [TableRow((wl.key, nj), (wl.label, str(nj)), wl.unit)
                        for wl in WORKLOADS for nj in NUMJOBS], s, ["vmd", "qsd", "file"])
        md.append("")
        md.append("## DRL cost: vmd with DRL on vs off (same run, interleaved with the rows above)")
        md.append("")
        md.append("| fio job | numjobs | unit | DRL on | DRL off | on/off | target ≥ 0.9 (4 KiB rand write) |")
        md.append("| --- | ---: | --- | ---: | ---: | ---: | --- |")
        for wl in WORKLOADS:
            if wl.key not in DRL_JOBS:
                continue
            for nj in NUMJOBS:
                on, off = s.value((wl.key, nj), "vmd"), s.value((wl.key, nj), "vmd-drl-off")
                ratio = s.ratio((wl.key, nj), wl.unit, "vmd", "vmd-drl-off")
                ok = "–" if ratio != ratio else ("yes" if ratio >= 0.9 else "**no**")
                md.append(f"| {wl.label} | {nj} | {wl.unit} | {fmt_val(on, wl.unit)} | "
                          f"{fmt_val(off, wl.unit)} | {fmt_ratio(ratio)} | {ok} |")
        md.append("")
        info = self.raw["info"]
        hwm = info.get("vmd_hwm_kib")
        md.append("## Daemon figures (fio volume)")
        md.append("")
        md.append(f"- vmd peak RSS (VmHWM) over the fio run: "
                  f"{hwm / 1024:.1f} MiB (target < 100 MiB)" if hwm else
                  "- vmd peak RSS: not available")
        if info.get("vmd_nodrl_hwm_kib"):
            md.append(f"- vmd (DRL off) peak RSS: {info['vmd_nodrl_hwm_kib'] / 1024:.1f} MiB; "
                      f"qemu-storage-daemon peak RSS: {(info.get('qsd_hwm_kib') or 0) / 1024:.1f} MiB")
        mw = info.get("vmd_max_write")
        md.append(f"- largest write request vmd saw (FUSE max_write in practice): "
                  f"{fmt_size(mw) if mw else mw}")
        md.append(f"- sidecar log size after the run: {fmt_size(info.get('vmd_log_bytes') or 0)}; "
                  f"plex states: {', '.join(info.get('vmd_plex_states', []))}")
        md.append("- prefill (1 MiB seq write of the whole target, before any measurement), MB/s: "
                  + ", ".join(f"{k} {v:.0f}" for k, v in self.raw.get("prefill_mbps", {}).items()))
        md.append("")

    # -- the per-request floor of pyfuse3 + trio ---------------------------------

    def floor(self) -> None:
        log("pyfuse3 floor: a null filesystem (no storage) under the random 4 KiB jobs")
        self.raw["floor"] = fuse_floor.measure(self.scratch / "floor", self.a.size,
                                               self.a.runtime, self.cleanup)

    def floor_report(self) -> None:
        rows = self.raw.get("floor")
        if not rows:
            return
        self.md += ["## Floor: one FUSE request in pyfuse3 + trio, no storage", "",
                    "`bench/fuse_floor.py`: a one-file pyfuse3 filesystem (direct_io, as vmd's "
                    "volume files) whose read returns zeros and whose write discards, same fio "
                    "jobs. What any pyfuse3 daemon on this machine pays per request before it "
                    "touches a plex.", ""]
        self.md += fuse_floor.table(rows)
        self.md.append("")

    # -- the targets behind loop devices (loopdev.py) --------------------------

    def loop(self) -> None:
        a = self.a
        log(f"loop devices: {fmt_size(a.loop_size)} per target, {a.loop_runtime:g} s runs")
        self.loopbench = LoopBench(self.scratch, self.cleanup, self.caches, size=a.loop_size,
                                   runtime=a.loop_runtime, reps=a.reps,
                                   vol_settings=self.vol_settings)
        self.raw["loop"] = self.loopbench.raw
        self.loopbench.run()

    # -- a mostly empty volume's full resync (holes.py) -------------------------

    def holes(self) -> None:
        a = self.a
        self.holesbench = HolesBench(self.scratch, self.cleanup, self.caches,
                                     size=a.holes_size, reps=a.side_reps,
                                     vol_settings=self.vol_settings)
        self.raw["holes"] = self.holesbench.raw
        self.holesbench.run()

    def spread(self) -> None:
        self.spreadbench = SpreadBench(self.scratch, self.cleanup, self.caches, size=GiB,
                                       reps=self.a.side_reps, vol_settings=self.vol_settings)
        self.raw["spread"] = self.spreadbench.raw
        self.spreadbench.run()

    def remote(self) -> None:
        a = self.a
        self.nbd = NbdBench(self.scratch, self.cleanup, self.caches, size=a.nbd_size,
                            runtime=a.nbd_runtime, reps=a.side_reps, vol_settings=self.vol_settings,
                            numjobs=a.nbd_numjobs)
        self.raw["nbd"] = self.nbd.raw
        self.nbd.run()

    def raid5(self) -> None:
        a = self.a
        self.raid5bench = Raid5Bench(self.scratch, self.cleanup, self.caches, size=a.raid5_size,
                                     runtime=a.raid5_runtime, reps=a.side_reps,
                                     vol_settings=self.vol_settings)
        self.raw["raid5"] = self.raid5bench.raw
        self.raid5bench.run()

    # -- recovery, FastResync, dd (recovery.py) ----------------------------------

    def recovery(self) -> None:
        a = self.a
        self.recoverybench = RecoveryBench(self.scratch, self.cleanup, self.caches,
                                           size=a.recovery_size, reps=a.reps,
                                           vol_settings=self.vol_settings)
        self.raw["recovery"] = self.recoverybench.raw
        self.recoverybench.run()


# -- main ----------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 1 repetition, 1 s jobs, 256 MiB, 1 GiB resync volume "
                         "(explicit flags and env still win)")
    ap.add_argument("--size", help="fio file/volume size (env BENCH_SIZE; default 512MiB, "
                                   "--full 1GiB)")
    ap.add_argument("--runtime", type=float,
                    help="seconds per fio job on the volume files (env BENCH_RUNTIME; default 1, "
                         "--full 2)")
    ap.add_argument("--reps", type=int,
                    help="repetitions of the loop-device and resync sections, and with --full of "
                         "every section (env BENCH_REPS; default 3)")
    ap.add_argument("--recovery-size",
                    help="volume size for the resync and holes figures (env BENCH_RECOVERY_SIZE; "
                         "default 1GiB, --full 4GiB)")
    ap.add_argument("--dir", default=os.environ.get("BENCH_DIR"),
                    help="parent of the scratch directory (env BENCH_DIR; default: var/ in the "
                         "repository). Must not be tmpfs: use the plexes' disk.")
    ap.add_argument("--loop-size",
                    help="data per loop device (env BENCH_LOOP_SIZE; default 512MiB)")
    ap.add_argument("--loop-runtime", type=float,
                    help="seconds per fio job on the loop devices "
                         "(env BENCH_LOOP_RUNTIME; default 2)")
    ap.add_argument("--skip-fio", action="store_true",
                    help="skip the fio matrix on the volume files (and the pyfuse3 floor)")
    ap.add_argument("--skip-loop", action="store_true", help="skip the loop-device section")
    ap.add_argument("--skip-recovery", action="store_true", help="skip the resync figures")
    ap.add_argument("--skip-holes", action="store_true",
                    help="skip the full resync of a mostly empty volume")
    ap.add_argument("--skip-spread", action="store_true",
                    help="skip the recoveries of 4 volumes on one disk (resync.per_device)")
    ap.add_argument("--skip-nbd", action="store_true",
                    help="skip the remote-plex section (qemu-nbd exports)")
    ap.add_argument("--skip-raid5", action="store_true",
                    help="skip RAID-5 against the mirror (bench/raid5.py)")
    ap.add_argument("--full", action="store_true",
                    help="the long run (make bench-full, about 32 minutes): 1 GiB fio volumes, a "
                         "4 GiB resync volume, and the remote-plex and RAID-5 sections at the "
                         "fio and loop sizes and runtimes")
    ap.add_argument("--side-size",
                    help="volume size of the remote-plex and RAID-5 sections (env "
                         "BENCH_SIDE_SIZE; default 256MiB; --full: the fio and loop sizes; the "
                         "holes section takes --recovery-size, at most 512 MiB without --full)")
    ap.add_argument("--side-runtime", type=float,
                    help="seconds per fio job in those sections (env BENCH_SIDE_RUNTIME; "
                         "default 1; --full: the fio and loop runtimes)")
    ap.add_argument("--side-reps", type=int,
                    help="repetitions in the fio matrix and the holes, spread, remote-plex and "
                         "RAID-5 sections (env BENCH_SIDE_REPS; default 2; --full: --reps)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory (debugging)")
    a = ap.parse_args(argv)
    # `make bench` keeps the whole run near 12 minutes (13 measured idle): every section but the
    # loop devices' runs shorter than with `--full` (make bench-full, about 32).
    profile = "quick" if a.quick else "full" if a.full else "normal"
    #                 flag            env                     normal    --full    --quick
    for attr, env, *values in (("size", "BENCH_SIZE", "512MiB", "1GiB", "256MiB"),
                               ("runtime", "BENCH_RUNTIME", "1", "2", "1"),
                               ("reps", "BENCH_REPS", "3", "3", "1"),
                               ("recovery_size", "BENCH_RECOVERY_SIZE", "1GiB", "4GiB", "1GiB"),
                               ("loop_size", "BENCH_LOOP_SIZE", "512MiB", "512MiB", "256MiB"),
                               ("loop_runtime", "BENCH_LOOP_RUNTIME", "2", "2", "1"),
                               ("side_size", "BENCH_SIDE_SIZE", "256MiB", "", "256MiB"),
                               ("side_runtime", "BENCH_SIDE_RUNTIME", "1", "", "1"),
                               ("side_reps", "BENCH_SIDE_REPS", "2", "", "1")):
        normal, full, quick = values
        if getattr(a, attr) is None:
            setattr(a, attr, os.environ.get(env) or
                    {"normal": normal, "full": full, "quick": quick}[profile])
    # --full: the remote-plex and RAID-5 sections at the sizes of the fio and
    # loop sections they compare with.
    a.nbd_size = parse_size(str(a.side_size or a.size))
    a.nbd_runtime = float(a.side_runtime or a.runtime)
    a.raid5_size = parse_size(str(a.side_size or a.loop_size))
    a.raid5_runtime = float(a.side_runtime or a.loop_runtime)
    a.side_reps = int(a.side_reps or a.reps)
    # Without --full the remote-plex section runs the numjobs=1 rows only.
    a.nbd_numjobs = NUMJOBS if a.full else (1,)
    a.runtime = float(a.runtime)
    a.loop_runtime = float(a.loop_runtime)
    a.loop_size = parse_size(str(a.loop_size))
    a.reps = int(a.reps)
    a.size = parse_size(str(a.size))
    a.recovery_size = parse_size(str(a.recovery_size))
    # The holes section copies and sends its volume four ways per round.
    a.holes_size = a.recovery_size if a.full else min(a.recovery_size, 512 * MiB)
    if any(x % (4 * MiB) for x in (a.size, a.recovery_size, a.loop_size)) or \
            min(a.size, a.loop_size) < 64 * MiB:
        ap.error("sizes must be multiples of 4 MiB, and the fio and loop sizes at least 64 MiB")
    if a.reps < 1 or a.runtime <= 0 or a.loop_runtime <= 0:
        ap.error("--reps must be >= 1 and the runtimes > 0")
    return a


def fs_type(path: Path) -> str:
    r = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True)
    return r.stdout.strip() or "?"


def tool_version(argv: list[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return (r.stdout or r.stderr).splitlines()[0].strip()
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "?"


def vmd_version() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "vmd"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return f"{head}{' + uncommitted changes in vmd/' if dirty else ''}"
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if os.geteuid() != 0:
        print("bench: run as root (FUSE mounts, drop_caches, umount)", file=sys.stderr)
        return 2
    for tool in ("fio", "qemu-storage-daemon", "dd", "umount", "losetup", "mkfs.ext4"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} not found (make bench installs fio and qemu-system-common)",
                  file=sys.stderr)
            return 2

    parent = Path(a.dir) if a.dir else REPO / "var"
    parent.mkdir(parents=True, exist_ok=True)
    fstype = fs_type(parent)
    if fstype in ("tmpfs", "ramfs"):
        print(f"bench: the scratch directory's parent is on {fstype}; use --dir on the disk the "
              f"plexes would use", file=sys.stderr)
        return 2
    need = max(7 * a.size, 3 * a.recovery_size, 6 * a.loop_size) + GiB
    free = shutil.disk_usage(parent).free
    if free < need:
        print(f"bench: {fmt_size(free)} free where the scratch goes, need about {fmt_size(need)}",
              file=sys.stderr)
        return 2

    cleanup = Cleanup()
    scratch = Path(tempfile.mkdtemp(prefix="bench-", dir=parent))
    if not a.keep:
        cleanup.push("scratch directory", lambda: shutil.rmtree(scratch, ignore_errors=True))

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    b = Bench(a, scratch, cleanup)
    load_start = loadavg()
    if load_start > 0.5:
        log(f"warning: load average is {load_start:.2f} before the run: other work on this "
            f"machine will skew the figures")
    b.raw["info"]["loadavg_start"] = load_start
    stamp = time.strftime("%Y%m%d-%H%M%S")
    started = time.monotonic()
    rc = 0
    failure = ""
    try:
        sections = b.raw["section_seconds"] = {}

        def section(name: str, skip: bool, run: Any) -> None:
            if skip:
                return
            t0 = time.monotonic()
            run()
            sections[name] = round(time.monotonic() - t0, 1)
            log(f"section {name}: {sections[name]:.0f} s")

        section("fio", a.skip_fio, lambda: (b.matrix(), b.floor()))
        section("loop", a.skip_loop, b.loop)
        section("recovery", a.skip_recovery, b.recovery)
        section("holes", a.skip_holes, b.holes)
        section("spread", a.skip_spread, b.spread)
        section("nbd", a.skip_nbd, b.remote)
        section("raid5", a.skip_raid5, b.raid5)
    except KeyboardInterrupt:
        failure = "interrupted"
        rc = 130
    except Exception as e:  # noqa: BLE001
        failure = f"failed: {e}"
        traceback.print_exc()
        for sub in ("vmd", "vmd-nodrl", "rec", "holes", "holes-b", "qsd", "loop/vmd", "loop/qsd",
                    "spread", "raid5/raid5", "raid5/raid5-log", "raid5/mirror"):
            for name in ("daemon.log", "qsd.log"):
                p = scratch / sub / name
                if p.exists():
                    print(f"--- last lines of {sub}/{name} ---\n{tail(p)}", file=sys.stderr)
        rc = 1
    finally:
        log("cleaning up: daemons, FUSE mounts, scratch files")
        cleanup.run()

    total = time.monotonic() - started
    load_end = loadavg()
    b.raw["info"]["loadavg_end"] = load_end
    head = [f"# vmd benchmark {stamp}", ""]
    head.append(f"- vmd {vmd_version()}; {tool_version(['fio', '--version'])}; "
                f"{tool_version(['qemu-storage-daemon', '--version'])}")
    head.append(f"- Linux {platform.release()}, {os.cpu_count()} CPUs, scratch on {fstype}; "
                f"Python {platform.python_version()}")
    head.append(f"- fio: ioengine=psync, buffered, end_fsync=1, size {fmt_size(a.size)}; sequential "
                f"jobs cover the file once (numjobs slices, capped at {a.runtime:g} s), random jobs "
                f"time_based {a.runtime:g} s; every target pre-filled with data first")
    head.append(f"- vmd: 2 plexes, shipped volume settings "
                f"({', '.join(f'{k}={v}' for k, v in b.vol_settings.items()) or 'defaults'}); "
                f"qsd: quorum (vote-threshold=1) over two file+raw nodes, fuse export writable=on; "
                f"file: fio on one raw image")
    head.append(f"- total run time {total:.0f} s; 1-min load average {load_start:.2f} at start, "
                f"{load_end:.2f} at end (the run itself keeps it near 1-2)"
                + (" — **the machine had other work: figures skewed**" if load_start > 0.5 else "")
                + (f" — **{failure}**" if failure else ""))
    if b.raw.get("section_seconds"):
        head.append(f"- profile: {'--quick' if a.quick else '--full' if a.full else 'make bench'}; "
                    "section times: " + ", ".join(f"{k} {v:.0f} s"
                                                  for k, v in b.raw["section_seconds"].items()))
    head.append("")
    if getattr(b, "samples", None):
        b.matrix_report()
    if getattr(b, "loopbench", None):
        b.md += b.loopbench.report()
    b.floor_report()
    if getattr(b, "recoverybench", None):
        b.md += b.recoverybench.report()
    if getattr(b, "holesbench", None):
        b.md += b.holesbench.report()
    if getattr(b, "spreadbench", None):
        b.md += b.spreadbench.report()
    if getattr(b, "nbd", None):
        b.md += b.nbd.report()
    if getattr(b, "raid5bench", None):
        b.md += b.raid5bench.report()
    text = "\n".join(head + b.md) + "\n"
    print(text)
    b.raw["params"] = {"size": a.size, "runtime": a.runtime, "reps": a.reps,
                       "loop_size": a.loop_size, "loop_runtime": a.loop_runtime,
                       "recovery_size": a.recovery_size, "quick": a.quick, "full": a.full,
                       "nbd_size": a.nbd_size, "nbd_runtime": a.nbd_runtime,
                       "raid5_size": a.raid5_size, "raid5_runtime": a.raid5_runtime,
                       "caches_dropped": b.caches.dropped, "cache_drop_failures": b.caches.failed,
                       "total_seconds": round(total, 1)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stamp}.md").write_text(text)
    (RESULTS / f"{stamp}.json").write_text(json.dumps(b.raw, indent=1, default=str) + "\n")
    log(f"results written to bench/results/{stamp}.md (raw data in {stamp}.json)")
    return rc


if __name__ == "__main__":
    sys.exit(main())
