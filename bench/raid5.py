"""RAID-5 (issue 13) against the shipped 2-way mirror and a raw file, same run,
same directory: RAID-5 with 3 columns without and with its RAID-5 log, each
through its volume file and through a loop device; then a degraded RAID-5's
4 KiB random reads against the healthy ones, and the rebuild of a replaced
column against `dd` writing a file of the column's size.

Each target is its own daemon (its CPU per request is its own). Targets rotate
job by job; caches are dropped before every job through the volume file, and
before every read job through the loop device (fio direct=1 on the device):
there the writes run warm, as loopdev.py's warm mode, but a healthy read
served from the page cache against a degraded one that must read the other
columns would compare a cache with a disk. So both sides of the degraded /
healthy ratio are cold, whichever way they go.

Run alone:  .venv/bin/python bench/run.py --skip-fio --skip-loop --skip-recovery --skip-holes

`BENCH_RAID5_BASE=DIR` (another commit's tree: `git archive REV vmd | tar -x -C
DIR` is enough) adds base-log: the RAID-5 with its log run from that tree, in
the same run, rotating with the others in the healthy rows, to A/B a change;
the report adds raid5-log / base-log.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from fiojobs import BY_KEY, Workload, fio_args, prefill_args, run_fio
from loopdev import LoopDevice
from measure import Caches, Samples, Target, fmt_size, fmt_us, fmt_val, log, rotated
from procs import Cleanup, Vmd

VOL = "vol0"
NCOL = 3
NAMES = ("raid5", "raid5-log", "mirror", "file")
DAEMONS = NAMES[:3]
ROWS = [BY_KEY["seqwrite"], BY_KEY["randwrite"], BY_KEY["randread"]]
DEGRADED = "randread-degraded"
# Jobs run cold through the loop device too: the healthy and the degraded reads
# (the degraded row runs the randread workload).
COLD = {"randread"}
REBUILD_ROUNDS = 5
# (row key, target, baseline target, goal): issue 13's targets.
GOALS = [("seqwrite", "raid5", "mirror", 1.0), ("seqwrite", "raid5-log", "mirror", 0.7),
         ("randwrite", "raid5", "mirror", 0.5), ("randwrite", "raid5-log", "mirror", 0.5),
         ("randread", "raid5", "mirror", 0.9), ("randread", "raid5-log", "mirror", 0.9)]


class Raid5Bench:
    def __init__(self, scratch: Path, cleanup: Cleanup, caches: Caches, *, size: int,
                 runtime: float, reps: int, vol_settings: dict[str, Any]):
        self.root = scratch / "raid5"
        self.size = size - size % (2 * 64 * 1024 * (NCOL - 1))
        self.runtime = runtime
        self.reps = reps
        self.caches = caches
        # A section of its own: torn down when it ends, or by the caller's cleanup.
        self.cleanup = Cleanup()
        cleanup.push("RAID-5 section", self.cleanup.run)
        r5 = {k: v for k, v in vol_settings.items() if k != "fastresync_region"}
        r5 |= {"size": self.size, "layout": "raid5",
               "columns": [f"{VOL}-c{i}.img" for i in range(NCOL)]}
        self.vmds = {
            "raid5": Vmd(self.root / "raid5", {VOL: r5}, self.cleanup),
            "raid5-log": Vmd(self.root / "raid5-log", {VOL: {**r5, "raid5_log": f"{VOL}.r5log"}},
                             self.cleanup),
            "mirror": Vmd(self.root / "mirror", {VOL: {"size": self.size, **vol_settings}},
                          self.cleanup)}
        self.names, self.daemons = NAMES, DAEMONS
        base = os.environ.get("BENCH_RAID5_BASE")
        if base:
            self.vmds["base-log"] = Vmd(self.root / "base-log",
                                        {VOL: {**r5, "raid5_log": f"{VOL}.r5log"}}, self.cleanup)
            self.vmds["base-log"].repo = Path(base).resolve()
            self.names, self.daemons = NAMES + ("base-log",), DAEMONS + ("base-log",)
        self.samples = Samples()
        self.raw: dict[str, Any] = {"size": self.size, "records": self.samples.records,
                                    "base": base}

    # -- the run ---------------------------------------------------------------

    def run(self) -> None:
        t0 = time.monotonic()
        try:
            files = self._start()
            loops = {n: Target(n, LoopDevice(t.path, self.cleanup).dev, t.pid)
                     for n, t in files.items()}
            for rep in range(self.reps):
                for where, targets in (("file", files), ("loop", loops)):
                    for wl in ROWS:
                        for n in rotated(self.names, rep):
                            self._fio((where, wl.key), targets[n], wl, direct=where == "loop")
            # Column c1 out: its units are rebuilt from the others on every read.
            for n in DAEMONS[:2]:
                self.vmds[n].cli("plex", "detach", VOL, "c1")
            wl = BY_KEY["randread"]
            for rep in range(self.reps):
                for where, targets in (("file", files), ("loop", loops)):
                    for n in rotated(DAEMONS[:2], rep):
                        self._fio((where, DEGRADED), targets[n], wl, direct=where == "loop")
            self._rebuild_vs_dd()
            self.raw["status"] = {n: self.vmds[n].status(VOL) for n in self.daemons}
        finally:
            self.cleanup.run()
            self.raw["seconds"] = round(time.monotonic() - t0, 1)

    def _start(self) -> dict[str, Target]:
        raw = self.root / "file" / "raw.img"
        raw.parent.mkdir(parents=True)
        with open(raw, "wb") as f:
            f.truncate(self.size)
        out = {"file": Target("file", raw)}
        for n, d in self.vmds.items():
            d.start()
            out[n] = Target(n, d.file(VOL), d.pid)
        prefill = {}
        for n, t in out.items():
            self.caches.drop()
            prefill[n] = round(run_fio(prefill_args(t.path, self.size), None, timeout=900)
                               .bw_bytes / 1e6)
        self.raw["prefill_mbps"] = prefill
        log(f"raid5: {fmt_size(self.size)} per target, prefilled, MB/s: {prefill}")
        return out

    def _fio(self, row: tuple[str, str], t: Target, wl: Workload, direct: bool) -> None:
        if not direct or wl.key in COLD:
            self.caches.drop()
        r = self.samples.fio(row, t, fio_args(wl, 1, t.path, self.size, self.runtime,
                                              direct=direct), wl)
        log(f"raid5 {row[0]:<4} {row[1]:<17} {t.name:<9} {fmt_val(r.value, wl.unit):>8} {wl.unit}")

    def _rebuild_vs_dd(self) -> None:
        """A new image for c1 of the RAID-5 without log, rebuilt whole, against
        dd writing a file of the column's size in the columns' directory;
        alternating, caches dropped (the sync before the drop also lets ext4
        discard what the last round deleted, before the clock starts).
        REBUILD_ROUNDS at least: a round takes about a second, and one round
        moves by 2x with the others' load on this disk."""
        d = self.vmds["raid5"]
        column = self.size // (NCOL - 1)
        rounds: list[dict[str, Any]] = []
        for rep in range(max(self.reps, REBUILD_ROUNDS)):
            for method in rotated(("rebuild", "dd"), rep):
                self.caches.drop()
                if method == "dd":
                    out = self.root / "raid5" / "dd.img"
                    t0 = time.monotonic()
                    subprocess.run(["dd", "if=/dev/zero", f"of={out}", "bs=1M",
                                    f"count={column // (1 << 20)}", "conv=fdatasync"],
                                   check=True, capture_output=True)
                    secs = time.monotonic() - t0
                    out.unlink()
                else:
                    new = self.root / "raid5" / f"new-c1-{rep}.img"
                    # Through the admin socket, as `vmd plex replace` and `vmd
                    # wait` send it: the CLI's own start (0.3-2.5 s of Python
                    # imports on this loaded machine) is not the rebuild's.
                    t0 = time.monotonic()
                    d.request({"cmd": "plex.replace", "volume": VOL, "plex": "c1",
                               "path": str(new)}, timeout=None)
                    d.request({"cmd": "wait", "volume": VOL}, timeout=None)
                    secs = time.monotonic() - t0
                    rs = d.status(VOL)["resync"]
                    d.cli("plex", "detach", VOL, "c1")  # out again for the next round
                rounds.append({"method": method, "seconds": round(secs, 3),
                               "mb_s": round(column / secs / 1e6, 1),
                               **({"resync_seconds": rs["seconds"]} if method == "rebuild"
                                  else {})})
                log(f"raid5: {method} of a {fmt_size(column)} column: {secs:.2f} s")
        self.raw["rebuild"] = rounds
        self.raw["rebuild_resync_status"] = rs

    # -- the report --------------------------------------------------------------

    def _rebuild(self, method: str) -> float:
        return statistics.median(r["seconds"] for r in self.raw.get("rebuild", [])
                                 if r["method"] == method)

    def report(self) -> list[str]:
        if not self.samples.values:
            return []
        s = self.samples
        names, daemons = self.names, self.daemons
        ab = ["raid5-log / base-log"] if "base-log" in names else []
        md = ["## RAID-5 (3 columns) vs the 2-way mirror vs a raw file", "",
              f"One daemon per vmd target, {fmt_size(self.size)} volumes, 64 KiB stripe unit, "
              f"shipped volume settings otherwise; fio psync numjobs=1, end_fsync=1, runs of "
              f"{max(1, round(self.runtime))} s (sequential: the volume once, capped by that). "
              f"volume file: buffered, caches dropped before each job; loop: `losetup` over the "
              f"volume file, fio direct=1 on the device, caches dropped before each read job "
              f"(not the writes): healthy and degraded reads are both cold. Median of {self.reps} repetition(s), "
              f"targets rotating. CPU/req: the daemon's CPU per fio request.", "",
              "| through | fio job | unit | " + " | ".join(names) +
              " | raid5 / mirror | raid5-log / mirror | " + "".join(f"{x} | " for x in ab) +
              " | ".join(f"{n} CPU/req" for n in daemons) + " |",
              "|---|---|---|" + "---:|" * (len(names) + 2 + len(ab) + len(daemons))]
        for where in ("file", "loop"):
            for wl in ROWS:
                row = (where, wl.key)
                m = s.value(row, "mirror")
                md.append(f"| {where} | {wl.label} | {wl.unit} | " + " | ".join(
                    fmt_val(s.value(row, n), wl.unit) for n in names) + " | " +
                    " | ".join(f"{s.value(row, n) / m:.2f}" for n in DAEMONS[:2]) + " | " +
                    "".join(f"{s.value(row, 'raid5-log') / s.value(row, 'base-log'):.2f} | "
                            for _ in ab) +
                    " | ".join(fmt_us(s.cpu_us(row, n)) for n in daemons) + " |")
            row = (where, DEGRADED)
            md.append(f"| {where} | 4 KiB rand read, c1 out | IOPS | " + " | ".join(
                fmt_val(s.value(row, n), "IOPS") if n in DAEMONS[:2] else "–" for n in names)
                + " | – | – | " + "– | " * len(ab) +
                " | ".join(fmt_us(s.cpu_us(row, n)) if n in DAEMONS[:2] else "–"
                           for n in daemons) + " |")
        md += ["", "| target (issue 13) | measured | met |", "|---|---:|---|"]

        def goal(what: str, ratio: float, want: float) -> None:
            md.append(f"| {what} ≥ {want:.1f}× | {ratio:.2f}× | "
                      f"{'yes' if ratio >= want else '**no**'} |")

        for where in ("file", "loop"):
            for key, n, base, want in GOALS:
                goal(f"{where}: {BY_KEY[key].label}, {n} / {base}",
                     s.value((where, key), n) / s.value((where, key), base), want)
            for n in DAEMONS[:2]:
                goal(f"{where}: 4 KiB rand read, {n} degraded / healthy (both cold)",
                     s.value((where, DEGRADED), n) / s.value((where, "randread"), n), 0.5)
        if self.raw.get("rebuild"):
            rb, dd = self._rebuild("rebuild"), self._rebuild("dd")
            goal(f"rebuild of a {fmt_size(self.size // (NCOL - 1))} column "
                 f"({rb:.2f} s) / dd of that size ({dd:.2f} s), speed", dd / rb, 0.5)
        md += ["", f"- section time {self.raw.get('seconds', 0):.0f} s; prefill MB/s: "
                   + ", ".join(f"{k} {v}" for k, v in self.raw.get("prefill_mbps", {}).items()),
               ""]
        return md
