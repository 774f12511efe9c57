#!/usr/bin/env python3
"""RAID-5 volumes from one or more source trees against the shipped 2-way
mirror (from this tree), side by side on their volume files: to A/B a change
to the RAID-5 write path on the rows of issue 13 that it moves.

    .venv/bin/python bench/raid5_ab.py raid5=. raid5-new=/tmp/new \\
        raid5-log=. raid5-new-log=/tmp/new --rounds 5 --jobs randwrite,seqwrite

Each NAME=TREE is one daemon running TREE's vmd (`git archive REV vmd | tar
-x -C DIR` is enough) with a 3-column RAID-5 volume of 256 MiB, with a
RAID-5 log if NAME ends in "log". Every target is prefilled; then, per round
and job, caches are dropped before each target's fio run (buffered, numjobs
1, end_fsync, as bench/raid5.py's volume-file rows), the targets rotating.
Prints the medians, the daemon's CPU per request, and each target's ratio to
the mirror, per round and its median. bench/raid5.py is the benchmark of
record; this is its quick A/B.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fiojobs import BY_KEY, fio_args, prefill_args, run_fio  # noqa: E402
from measure import Caches, fio_with_cpu, rotated  # noqa: E402
from procs import Cleanup, Vmd, shipped_volume_settings  # noqa: E402

SIZE = 256 << 20
VOL = "vol0"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("targets", nargs="+", metavar="NAME=TREE")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--jobs", default="randwrite",
                    help="comma-separated fio jobs of bench/fiojobs.py (default randwrite)")
    ap.add_argument("--runtime", type=float, default=2.0)
    ap.add_argument("--dir", help="scratch directory (default: a new one under var/)")
    a = ap.parse_args()
    jobs = [BY_KEY[j] for j in a.jobs.split(",")]
    vs = shipped_volume_settings()
    r5 = {k: v for k, v in vs.items() if k != "fastresync_region"}
    r5 |= {"size": SIZE, "layout": "raid5", "columns": [f"{VOL}-c{i}.img" for i in range(3)]}
    root = Path(a.dir or tempfile.mkdtemp(prefix="raid5-ab-", dir=Path(__file__).parent.parent / "var"))
    cleanup, caches = Cleanup(), Caches()
    try:
        vmds = {"mirror": Vmd(root / "mirror", {VOL: {"size": SIZE, **vs}}, cleanup)}
        for spec in a.targets:
            name, _, tree = spec.partition("=")
            cfg = dict(r5, raid5_log=f"{VOL}.r5log") if name.endswith("log") else r5
            vmds[name] = Vmd(root / name, {VOL: cfg}, cleanup)
            vmds[name].repo = Path(tree or ".").resolve()
        for v in vmds.values():
            v.start()
            run_fio(prefill_args(v.file(VOL), SIZE))
        got: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for r in range(a.rounds):
            for wl in jobs:
                for name in rotated(list(vmds), r):
                    caches.drop()
                    v = vmds[name]
                    res, cpu = fio_with_cpu(fio_args(wl, 1, v.file(VOL), SIZE, a.runtime), wl, v.pid)
                    got.setdefault((wl.key, name), []).append((res.value, cpu))
        for wl in jobs:
            base = [x for x, _ in got[(wl.key, "mirror")]]
            for name in vmds:
                vals = got[(wl.key, name)]
                line = (f"{wl.label:18} {name:16} median {statistics.median(x for x, _ in vals):9.0f} "
                        f"{wl.unit:5} CPU/req {statistics.median(c for _, c in vals):6.0f} µs")
                if name != "mirror":
                    ratios = [x / b for (x, _), b in zip(vals, base)]
                    line += (f"  / mirror {statistics.median(ratios):.2f} "
                             f"[{', '.join(f'{q:.2f}' for q in ratios)}]")
                print(line)
    finally:
        cleanup.run()
        if not a.dir:
            import shutil
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
