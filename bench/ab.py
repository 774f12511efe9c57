#!/usr/bin/env python3
"""A quick side-by-side of vmd and qemu-storage-daemon on chosen fio jobs.

    .venv/bin/python bench/ab.py randread:1,randread:4 [--reps 3] [--runtime 5]
        [--set direct_io=false] [--warm]
    .venv/bin/python bench/ab.py --loop [JOBS] [--warm | --cold] [--fs] [--set ...] [--top ...]
        [--alt-set ... --alt-top ...]   # a second vmd, vmd-alt, in the same run

The method of `make bench` (same fio jobs, targets alternating job by job,
page caches dropped before each job), without the rest of its matrix: for
trying one change or one setting. `--set` changes vmd's volume settings (as
in config/vmd.yaml); `--warm` reads every image file into the page cache
before each job instead of dropping it, to separate per-request cost from
disk-read cost. Prints medians, vmd/qsd, and each daemon's CPU per request.

`--loop` runs the loop-device section of `make bench` (loopdev.py) for vmd
and qsd only: each behind its own /dev/loopN, fio direct=1 on the loop
device, 512 MiB, the six rows of issue 12 warm then cold, runs of 2 s, 3
repetitions, as in `make bench`: about 3 minutes (3.7 on a busy 2-CPU
machine; `--warm` or `--cold` alone: about 2). `--fs` adds the ext4 rows
(fio fsync=32, cp -a + sync). To A/B a change, run it on both trees and
compare the vmd/qsd and CPU/req columns.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fiojobs import (BY_KEY, NUMJOBS, WORKLOADS, Workload, fio_args, prefill_args,  # noqa: E402
                     run_fio)
from loopdev import LOOP_ROWS, LoopBench  # noqa: E402
from measure import Caches, Samples, Target, TableRow, parse_size, rotated, vs_table  # noqa: E402
from procs import REPO, Cleanup, Qsd, Vmd, shipped_top_settings, shipped_volume_settings  # noqa: E402,E501


def setting(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    import yaml

    return key, yaml.safe_load(value)


def job_list(text: str) -> list[tuple[Workload, int]]:
    try:
        return [(BY_KEY[k], int(n)) for k, _, n in (j.partition(":") for j in text.split(","))]
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(
            f"bad job list {text!r}: expected e.g. randread:1,seqwrite:4 (jobs: "
            f"{', '.join(BY_KEY)})") from None


def on_files(a: argparse.Namespace, scratch: Path, cleanup: Cleanup, settings: dict[str, Any],
             jobs: list[tuple[Workload, int]]) -> list[str]:
    """vmd's volume file against qsd's FUSE export, as the fio matrix of run.py."""
    size = parse_size(a.size or "1GiB")
    caches = Caches()
    vmd = Vmd(scratch / "vmd", {"vol0": {"size": size, **settings}}, cleanup)
    vmd.start()
    qsd = Qsd(scratch / "qsd", size, cleanup)
    qsd.create()
    qsd.start()
    targets = {"vmd": Target("vmd", vmd.file("vol0"), vmd.pid),
               "qsd": Target("qsd", qsd.file, qsd.pid)}
    images = {"vmd": [vmd.plex("vol0", i) for i in (0, 1)], "qsd": qsd.images}
    for t in targets.values():
        run_fio(prefill_args(t.path, size), None, timeout=900)
    s = Samples()
    for rep in range(a.reps):
        for wl, nj in jobs:
            for name in rotated(["vmd", "qsd"], rep):
                caches.drop()
                if a.warm:
                    for img in images[name]:
                        subprocess.run(["cat", str(img)], stdout=subprocess.DEVNULL, check=True)
                s.fio((wl.key, nj), targets[name],
                      fio_args(wl, nj, targets[name].path, size, a.runtime or 5.0), wl)
    vmd.stop()
    out = [f"{a.reps} repetition(s) of {a.runtime or 5.0:g} s, {'warm' if a.warm else 'cold'} "
           f"page cache; vmd settings: {dict(a.settings) or 'as shipped'}"]
    return out + vs_table(["fio job", "numjobs"],
                          [TableRow((wl.key, nj), (wl.label, str(nj)), wl.unit) for wl, nj in jobs],
                          s, ["vmd", "qsd"], goal=None)


def on_loops(a: argparse.Namespace, scratch: Path, cleanup: Cleanup, settings: dict[str, Any],
             jobs: list[tuple[Workload, int]]) -> list[str]:
    modes = ["warm"] if a.warm else ["cold"] if a.cold else ["warm", "cold"]
    lb = LoopBench(scratch, cleanup, Caches(), size=parse_size(a.size or "512MiB"),
                   runtime=a.runtime or 2.0, reps=a.reps, vol_settings=settings,
                   top_settings={**shipped_top_settings(), **dict(a.top)}, rows=jobs,
                   alt=(dict(a.alt_set), dict(a.alt_top)) if a.alt_set or a.alt_top else None,
                   modes=modes, fs=a.fs, names=("vmd", "qsd"))
    lb.run()
    return [f"vmd settings: {dict(a.settings) or 'as shipped'}, {dict(a.top)}", ""] + lb.report()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("jobs", nargs="?", type=job_list,
                    help="comma-separated job:numjobs (jobs: " + ", ".join(BY_KEY) + "); "
                         "default: every row of the fio matrix, or with --loop the six loop rows")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--runtime", type=float, help="seconds per fio job (default 5; --loop: 2)")
    ap.add_argument("--size", help="default 1GiB; --loop: 512MiB")
    ap.add_argument("--set", type=setting, action="append", default=[], dest="settings",
                    help="vmd volume setting key=value (repeatable)")
    ap.add_argument("--top", type=setting, action="append", default=[],
                    help="--loop: vmd top-level setting key=value, e.g. writeback_cache=true")
    ap.add_argument("--alt-set", type=setting, action="append", default=[],
                    help="--loop: add a second vmd, vmd-alt, with this volume setting too")
    ap.add_argument("--alt-top", type=setting, action="append", default=[],
                    help="--loop: ... and this top-level setting (compare two configurations "
                         "in one run)")
    ap.add_argument("--warm", action="store_true",
                    help="images in the page cache before each job (--loop: only the warm rows)")
    ap.add_argument("--loop", action="store_true",
                    help="each target behind a loop device (the loop section of make bench)")
    ap.add_argument("--cold", action="store_true", help="--loop: only the cold rows")
    ap.add_argument("--fs", action="store_true", help="--loop: also the ext4 rows")
    a = ap.parse_args()
    if (a.cold or a.fs) and not a.loop:
        ap.error("--cold and --fs go with --loop")
    if a.warm and a.cold:
        ap.error("--warm and --cold exclude each other (neither: both)")
    jobs = a.jobs or (LOOP_ROWS if a.loop else [(w, nj) for w in WORKLOADS for nj in NUMJOBS])
    parent = REPO / "var"
    parent.mkdir(exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="ab-", dir=parent))
    cleanup = Cleanup()
    cleanup.push("scratch", lambda: shutil.rmtree(scratch, ignore_errors=True))
    settings = {**shipped_volume_settings(), **dict(a.settings)}
    try:
        out = (on_loops if a.loop else on_files)(a, scratch, cleanup, settings, jobs)
    finally:
        cleanup.run()
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
