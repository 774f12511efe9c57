"""The loop-device section of the benchmark: what a user does with a volume.

Each target (vmd with the shipped volume settings, qemu-storage-daemon's quorum
of two raw files through its FUSE export, and one raw file) is attached to its
own /dev/loopN with a plain `losetup` (buffered: no --direct-io) and measured
as a block device, fio `direct=1`, psync, on the loop device:

- six rows (4 KiB random write and read, numjobs 1 and 4; 1 MiB sequential
  write and read, numjobs 1) over prefilled data, first warm (no cache drop:
  what the prefill and the earlier jobs left in the page cache), then cold
  (sync; echo 3 > /proc/sys/vm/drop_caches before every job);
- then ext4 on each loop device: fio 4 KiB random write with fsync=32 on a
  prefilled file, and `cp -a` of a few thousand small files followed by
  `sync -f` on the filesystem, timed (sync before each job, no cache drop, so
  cp reads its source from memory on every target).

Medians of the repetitions, targets rotating job by job, vmd/qsd, and each
daemon's CPU per fio request. run.py runs it as part of `make bench`; ab.py
--loop runs it alone for vmd and qsd (see ab.py).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Sequence

from fiojobs import BY_KEY, Workload, fio_args, prefill_args, run_fio
from measure import Caches, Samples, Target, TableRow, fmt_size, fmt_val, log, rotated, vs_table
from procs import MiB, BenchError, Cleanup, Qsd, Vmd, shipped_top_settings

# (workload, numjobs): the rows of issue 12.
LOOP_ROWS: list[tuple[Workload, int]] = [
    (BY_KEY["randwrite"], 1), (BY_KEY["randwrite"], 4), (BY_KEY["randread"], 1),
    (BY_KEY["randread"], 4), (BY_KEY["seqwrite"], 1), (BY_KEY["seqread"], 1)]
MODES = ("warm", "cold")
TARGETS = ("vmd", "qsd", "file")
TREE_FILES = 3000
FSYNC_ROW = ("ext4", "fsync32")
CP_ROW = ("ext4", "cp")


def _run(argv: list[str], what: str) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise BenchError(f"{what}: {' '.join(argv)} failed ({r.returncode}): "
                         f"{(r.stderr or r.stdout).strip()[-1000:]}")
    return r.stdout


class LoopDevice:
    """`losetup --find --show FILE` (buffered, as a user attaches it); detached
    by its own name on cleanup."""

    def __init__(self, backing: Path, cleanup: Cleanup):
        self.dev = Path(_run(["losetup", "--find", "--show", str(backing)],
                             f"attaching {backing} to a loop device").strip())
        cleanup.push(f"loop device {self.dev}", self.detach)

    @property
    def direct_io(self) -> str:
        try:
            return (Path("/sys/block") / self.dev.name / "loop" / "dio").read_text().strip()
        except OSError:
            return "?"

    def detach(self) -> None:
        _run(["losetup", "-d", str(self.dev)], f"detaching {self.dev}")


class Ext4:
    """A fresh ext4 on `dev`, mounted at `mnt` and unmounted on cleanup."""

    def __init__(self, dev: Path, mnt: Path, cleanup: Cleanup):
        # Inode tables and journal written now, not by ext4lazyinit during the measurements.
        _run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(dev)],
             f"mkfs.ext4 on {dev}")
        mnt.mkdir(parents=True, exist_ok=True)
        _run(["mount", "-t", "ext4", str(dev), str(mnt)], f"mounting {dev}")
        self.mnt = mnt
        cleanup.push(f"ext4 mount {mnt}", self.unmount)

    def unmount(self) -> None:
        r = subprocess.run(["umount", str(self.mnt)], capture_output=True, text=True)
        if r.returncode != 0:  # still busy: detach it now, the kernel finishes when it can
            _run(["umount", "-l", str(self.mnt)], f"unmounting {self.mnt}")


def make_tree(root: Path, n: int, seed: int = 12) -> int:
    """n small files (1-16 KiB, 100 per directory); returns their total size."""
    rng = random.Random(seed)
    total = 0
    for i in range(n):
        d = root / f"d{i // 100:03d}"
        if i % 100 == 0:
            d.mkdir(parents=True)
        size = rng.randint(1, 16) * 1024 - rng.randint(0, 1023)
        (d / f"f{i:05d}").write_bytes(rng.randbytes(size))
        total += size
    return total


class LoopBench:
    """Sets up the targets behind loop devices, runs the rows, reports them."""

    def __init__(self, scratch: Path, cleanup: Cleanup, caches: Caches, *, size: int,
                 runtime: float, reps: int, vol_settings: dict[str, Any],
                 top_settings: dict[str, Any] | None = None,
                 alt: tuple[dict[str, Any], dict[str, Any]] | None = None,
                 rows: Sequence[tuple[Workload, int]] = LOOP_ROWS,
                 modes: Sequence[str] = MODES, fs: bool = True,
                 names: Sequence[str] = TARGETS):
        self.root = scratch / "loop"
        self.caches = caches
        self.size = size
        self.runtime = runtime
        self.reps = reps
        self.vol_settings = vol_settings
        self.top_settings = shipped_top_settings() if top_settings is None else top_settings
        # A second vmd, "vmd-alt", with other (volume, top-level) settings in
        # the same run: to compare two configurations side by side.
        self.alt = alt
        self.rows = list(rows)
        self.modes = list(modes)
        self.fs = fs
        self.names = list(names) + (["vmd-alt"] if alt else [])
        self.samples = Samples()
        self.raw: dict[str, Any] = {"records": self.samples.records}
        self.cp_files = 0
        self.cp_bytes = 0
        # Everything of this section is torn down when it ends, and by the
        # caller's cleanup if the run is cut short first.
        self.cleanup = Cleanup()
        cleanup.push("loop-device section", self.cleanup.run)

    # -- set-up --------------------------------------------------------------

    def _backings(self) -> dict[str, tuple[Path, int | None]]:
        """Start the daemons; the file each loop device goes over, and its server's pid."""
        out: dict[str, tuple[Path, int | None]] = {}
        if "vmd" in self.names:
            vmd = Vmd(self.root / "vmd", {"vol0": {"size": self.size, **self.vol_settings}},
                      self.cleanup, top=self.top_settings)
            vmd.start()
            self.vmd = vmd
            out["vmd"] = (vmd.file("vol0"), vmd.pid)
        if self.alt:
            vol, top = self.alt
            alt = Vmd(self.root / "vmd-alt", {"vol0": {"size": self.size, **self.vol_settings,
                                                       **vol}}, self.cleanup,
                      top={**self.top_settings, **top})
            alt.start()
            out["vmd-alt"] = (alt.file("vol0"), alt.pid)
        if "qsd" in self.names:
            qsd = Qsd(self.root / "qsd", self.size, self.cleanup)
            qsd.create()
            qsd.start()
            out["qsd"] = (qsd.file, qsd.pid)
        if "file" in self.names:
            raw = self.root / "file" / "raw.img"
            raw.parent.mkdir(parents=True)
            with open(raw, "wb") as f:
                f.truncate(self.size)
            out["file"] = (raw, None)
        return out

    def setup(self) -> dict[str, Target]:
        self.root.mkdir(parents=True)
        self.cleanup.push("loop scratch", lambda: shutil.rmtree(self.root, ignore_errors=True))
        targets: dict[str, Target] = {}
        dio = {}
        for name, (backing, pid) in self._backings().items():
            loop = LoopDevice(backing, self.cleanup)
            targets[name] = Target(name, loop.dev, pid)
            dio[name] = f"{loop.dev} (dio={loop.direct_io})"
        self.raw["loop_devices"] = dio
        log("loop devices: " + ", ".join(f"{k} {v}" for k, v in dio.items()))
        return targets

    # -- the measurements ----------------------------------------------------

    def run(self) -> None:
        t0 = time.monotonic()
        try:
            targets = self.setup()
            if self.rows:
                self.block_rows(targets)
            if self.fs:
                self.fs_rows(targets)
            if hasattr(self, "vmd"):
                self.raw["vmd_max_write"] = self.vmd.status("vol0").get("max_write")
        finally:
            self.cleanup.run()
            self.raw["seconds"] = round(time.monotonic() - t0, 1)

    def block_rows(self, targets: dict[str, Target]) -> None:
        prefill = {}
        for name in self.names:
            r = run_fio(prefill_args(targets[name].path, self.size, direct=True), None, timeout=900)
            prefill[name] = round(r.bw_bytes / 1e6)
        self.raw["prefill_mbps"] = prefill
        log(f"loop devices prefilled with {fmt_size(self.size)}, MB/s: {prefill}")
        for mode in self.modes:
            for rep in range(self.reps):
                for wl, nj in self.rows:
                    for name in rotated(self.names, rep):
                        if mode == "cold":
                            self.caches.drop()
                        t = targets[name]
                        r = self.samples.fio(
                            (mode, wl.key, nj), t,
                            fio_args(wl, nj, t.path, self.size, self.runtime, direct=True), wl)
                        log(f"loop {mode} rep {rep + 1}/{self.reps} {wl.label:<17} nj={nj} "
                            f"{name:<5} {fmt_val(r.value, wl.unit):>8} {wl.unit}")

    def fs_rows(self, targets: dict[str, Target]) -> None:
        tree = self.root / "tree"
        self.cp_files = TREE_FILES
        self.cp_bytes = make_tree(tree, TREE_FILES)
        fsize = min(128 * MiB, self.size // 4)
        mnts: dict[str, Path] = {}
        for name in self.names:
            mnts[name] = Ext4(targets[name].path, self.root / f"{name}-ext4", self.cleanup).mnt
            run_fio(prefill_args(mnts[name] / "fio.dat", fsize), None, timeout=900)
        wl = BY_KEY["randwrite"]
        for rep in range(self.reps):
            for name in rotated(self.names, rep):
                os.sync()
                t = Target(name, mnts[name] / "fio.dat", targets[name].pid)
                r = self.samples.fio(FSYNC_ROW, t, fio_args(wl, 1, t.path, fsize, self.runtime,
                                                            extra=["--fsync=32"]), wl)
                log(f"loop ext4 rep {rep + 1}/{self.reps} fsync=32 {name:<5} {r.value:.0f} IOPS")
            for name in rotated(self.names, rep):
                os.sync()
                dst = mnts[name] / f"cp-{rep}"
                t0 = time.monotonic()
                _run(["cp", "-a", str(tree), str(dst)], f"cp -a onto {name}'s ext4")
                _run(["sync", "-f", str(dst)], f"sync -f on {name}'s ext4")
                self.samples.add(CP_ROW, name, time.monotonic() - t0)
                log(f"loop ext4 rep {rep + 1}/{self.reps} cp -a   {name:<5} "
                    f"{time.monotonic() - t0:.2f} s")

    # -- the report ----------------------------------------------------------

    def table_rows(self) -> list[TableRow]:
        rows = [TableRow((mode, wl.key, nj), (mode, wl.label, str(nj)), wl.unit)
                for mode in self.modes for wl, nj in self.rows]
        if self.fs:
            rows.append(TableRow(FSYNC_ROW, ("ext4, sync before", "4 KiB rand write, fsync=32",
                                             "1"), "IOPS"))
            rows.append(TableRow(CP_ROW, ("ext4, sync before", f"cp -a {self.cp_files} files "
                                          f"({fmt_size(self.cp_bytes)}) + sync -f", "1"), "s"))
        return rows

    def report(self) -> list[str]:
        md = ["## Loop devices: each target behind its own /dev/loopN, as a user attaches it", ""]
        backing = {"vmd": "vmd's volume file", "qsd": "qsd's FUSE export", "file": "a raw file",
                   "vmd-alt": "a second vmd's volume file"}
        md.append(f"`losetup --find --show` (buffered, no --direct-io) over "
                  f"{', '.join(backing[n] for n in self.names)}: "
                  f"{', '.join(f'{k} {v}' for k, v in self.raw.get('loop_devices', {}).items())}; "
                  f"vmd with the volume settings {self.vol_settings}"
                  f"{f' and {self.top_settings}' if self.top_settings else ''}"
                  f"{f'; vmd-alt with {self.alt[0]} and {self.alt[1]}' if self.alt else ''}. "
                  f"fio psync, direct=1 on the loop device, end_fsync=1, {fmt_size(self.size)} "
                  f"prefilled; runs of {max(1, round(self.runtime))} s (sequential jobs: the "
                  f"device once, capped by that). Median of {self.reps} repetition(s), targets "
                  f"rotating job by job. warm: no cache drop (what the prefill and earlier jobs "
                  f"left in the page cache); cold: sync; echo 3 > /proc/sys/vm/drop_caches "
                  f"before every job. ext4 (mkfs.ext4 defaults, no lazy init) on each loop "
                  f"device: sync before every job, no drop; the cp source is in memory. "
                  f"vmd/qsd is a speed ratio (for times, qsd's over vmd's). CPU/req: the "
                  f"daemon's CPU time per fio request (the loop driver's kernel worker, which "
                  f"copies between the device and the backing file, is counted to neither).")
        md.append("")
        alt = [("vmd-alt", "qsd"), ("vmd-alt", "vmd")] if self.alt else []
        md += vs_table(["page cache", "fio job", "numjobs"], self.table_rows(), self.samples,
                       self.names, cpu_of=["vmd", "qsd"] + (["vmd-alt"] if self.alt else []),
                       more_ratios=alt)
        md.append("")
        extra = []
        if self.raw.get("vmd_max_write"):
            extra.append(f"largest write request vmd saw through the loop device: "
                         f"{fmt_size(self.raw['vmd_max_write'])}")
        if self.raw.get("prefill_mbps"):
            extra.append("prefill through the loop devices, MB/s: " + ", ".join(
                f"{k} {v}" for k, v in self.raw["prefill_mbps"].items()))
        extra.append(f"section time {self.raw.get('seconds', 0):.0f} s")
        md += [f"- {e}" for e in extra] + [""]
        return md
