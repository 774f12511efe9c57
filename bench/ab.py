#!/usr/bin/env python3
"""A quick side-by-side of vmd and qemu-storage-daemon on chosen fio jobs.

    .venv/bin/python bench/ab.py randread:1,randread:4 [--reps 3] [--runtime 5]
        [--set direct_io=false] [--warm]

The method of `make bench` (same fio jobs, targets alternating job by job,
page caches dropped before each job), without the rest of its matrix: for
trying one change or one setting. `--set` changes vmd's volume settings (as
in config/vmd.yaml); `--warm` reads every image file into the page cache
before each job instead of dropping it, to separate per-request cost from
disk-read cost. Prints medians, vmd/qsd, and each daemon's CPU per request.
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

from fiojobs import NUMJOBS, WORKLOADS, fio_args, prefill_args, run_fio  # noqa: E402
from procs import REPO, Cleanup, Qsd, Vmd, cpu_seconds  # noqa: E402
from run import Caches, fmt_ratio, fmt_val, median, parse_size, shipped_volume_settings  # noqa: E402


def setting(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    import yaml

    return key, yaml.safe_load(value)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("jobs", nargs="?", default=",".join(
        f"{w.key}:{nj}" for w in WORKLOADS for nj in NUMJOBS),
        help="comma-separated job:numjobs (jobs: " + ", ".join(w.key for w in WORKLOADS) + ")")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--runtime", type=float, default=5.0)
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--set", type=setting, action="append", default=[], dest="settings",
                    help="vmd volume setting key=value (repeatable)")
    ap.add_argument("--warm", action="store_true", help="images in the page cache before each job")
    a = ap.parse_args()
    size = parse_size(a.size)
    keys = {w.key: w for w in WORKLOADS}
    try:
        jobs = [(keys[k], int(n)) for k, _, n in (j.partition(":") for j in a.jobs.split(","))]
    except (KeyError, ValueError):
        ap.error(f"bad job list {a.jobs!r}: expected e.g. randread:1,seqwrite:4")
    parent = REPO / "var"
    parent.mkdir(exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="ab-", dir=parent))
    cleanup = Cleanup()
    cleanup.push("scratch", lambda: shutil.rmtree(scratch, ignore_errors=True))
    caches = Caches()
    try:
        vmd = Vmd(scratch / "vmd", {"vol0": {"size": size, **shipped_volume_settings(),
                                             **dict(a.settings)}}, cleanup)
        vmd.start()
        qsd = Qsd(scratch / "qsd", size, cleanup)
        qsd.create()
        qsd.start()
        targets = {"vmd": (vmd.file("vol0"), vmd.pid, [vmd.plex("vol0", i) for i in (0, 1)]),
                   "qsd": (qsd.file, qsd.pid, qsd.images)}
        for path, _, _ in targets.values():
            run_fio(prefill_args(path, size), None, timeout=900)
        values: dict[tuple[str, int, str], list[float]] = {}
        cpu: dict[tuple[str, int, str], list[float]] = {}
        for rep in range(a.reps):
            for wl, nj in jobs:
                for name in (("vmd", "qsd") if rep % 2 == 0 else ("qsd", "vmd")):
                    path, pid, images = targets[name]
                    caches.drop()
                    if a.warm:
                        for img in images:
                            subprocess.run(["cat", str(img)], stdout=subprocess.DEVNULL, check=True)
                    c0 = cpu_seconds(pid)
                    r = run_fio(fio_args(wl, nj, path, size, a.runtime), wl)
                    values.setdefault((wl.key, nj, name), []).append(r.value)
                    cpu.setdefault((wl.key, nj, name), []).append(
                        r.cpu_us_per_request(cpu_seconds(pid) - c0))
        print(f"{a.reps} repetition(s) of {a.runtime:g} s, {'warm' if a.warm else 'cold'} page "
              f"cache; vmd settings: {dict(a.settings) or 'as shipped'}")
        print("| fio job | numjobs | unit | vmd | qsd | vmd/qsd | vmd CPU/req | qsd CPU/req |")
        print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
        for wl, nj in jobs:
            v, q = (median(values[(wl.key, nj, t)]) for t in ("vmd", "qsd"))
            vc, qc = (median(cpu[(wl.key, nj, t)]) for t in ("vmd", "qsd"))
            print(f"| {wl.label} | {nj} | {wl.unit} | {fmt_val(v, wl.unit)} | "
                  f"{fmt_val(q, wl.unit)} | {fmt_ratio(v / q)} | {vc:.0f} µs | {qc:.0f} µs |")
        vmd.stop()
    finally:
        cleanup.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
