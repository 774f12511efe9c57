#!/usr/bin/env python3
"""Profile the vmd daemon under one benchmark workload with py-spy.

    .venv/bin/pip install py-spy
    .venv/bin/python bench/profile.py randwrite [--numjobs 1] [--runtime 5] [--idle] [--gil]
    .venv/bin/python bench/profile.py resync          # full resync of --size from p0
    .venv/bin/python bench/profile.py seqwrite --layout raid5-log --size 256MiB

Starts a vmd with the shipped volume settings in a scratch directory (var/ by
default), pre-fills the volume, runs the fio job while `py-spy record` samples
the daemon, and prints the hottest functions (inclusive and self, % of
samples) and the fio figure. Everything is cleaned up afterwards.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fiojobs import BY_KEY, fio_args, prefill_args, run_fio  # noqa: E402
from measure import Caches, parse_size  # noqa: E402
from procs import REPO, Cleanup, Vmd, shipped_volume_settings  # noqa: E402


def summarize(raw: Path, top: int) -> str:
    """py-spy --format raw: 'frame;frame;... count' lines (root first)."""
    incl: collections.Counter[str] = collections.Counter()
    self_: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        count = int(n)
        total += count
        frames = stack.split(";")
        for f in set(frames):
            incl[f] += count
        self_[frames[-1]] += count
    if not total:
        return "(no samples)"
    out = [f"{total} samples", "", "inclusive %  function"]
    out += [f"{100 * c / total:10.1f}  {f}" for f, c in incl.most_common(top)]
    out += ["", "self %       function"]
    out += [f"{100 * c / total:10.1f}  {f}" for f, c in self_.most_common(top)]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("job", choices=[*BY_KEY, "resync"])
    ap.add_argument("--numjobs", type=int, default=1)
    ap.add_argument("--runtime", type=float, default=5.0)
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    ap.add_argument("--idle", action="store_true", help="include idle (waiting) threads")
    ap.add_argument("--gil", action="store_true", help="only threads holding the GIL")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--drl-off", action="store_true", help="the volume with drl: false")
    ap.add_argument("--layout", choices=["mirror", "raid5", "raid5-log"], default="mirror",
                    help="the shipped mirror, or a 3-column RAID-5 volume (with a RAID-5 log)")
    ap.add_argument("--dir", default=os.environ.get("BENCH_DIR"))
    a = ap.parse_args()
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.path.exists(pyspy):
        print("profile: py-spy not found; .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    size = parse_size(a.size)
    parent = Path(a.dir) if a.dir else REPO / "var"
    parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="profile-", dir=parent))
    cleanup = Cleanup()
    cleanup.push("scratch", lambda: shutil.rmtree(scratch, ignore_errors=True))
    caches = Caches()
    vol_settings = shipped_volume_settings()
    if a.drl_off:
        vol_settings["drl"] = False
    if a.layout != "mirror":
        if a.job == "resync":
            ap.error("resync profiles a mirror's full resync; use --layout mirror")
        vol_settings.pop("fastresync_region", None)
        vol_settings |= {"layout": "raid5", "columns": [f"vol0-c{i}.img" for i in range(3)]}
        if a.layout == "raid5-log":
            vol_settings["raid5_log"] = "vol0.r5log"
    try:
        d = Vmd(scratch / "vmd", {"vol0": {"size": size, **vol_settings}}, cleanup)
        if a.job == "resync":
            d.plex("vol0", 0).parent.mkdir(parents=True, exist_ok=True)
            with open(d.plex("vol0", 0), "wb") as f:
                f.truncate(size)
            run_fio(prefill_args(d.plex("vol0", 0), size), None, timeout=900)
            caches.drop()
            d.start(recover_all=("vol0",))
            spy_args = ["--duration", "600"]
        else:
            d.start()
            run_fio(prefill_args(d.file("vol0"), size), None, timeout=900)
            caches.drop()
            spy_args = ["--duration", str(int(a.runtime) + 30)]
        out = scratch / "pyspy.raw"
        cmd = [pyspy, "record", "--pid", str(d.pid), "--format", "raw", "-o", str(out),
               "--rate", str(a.rate), "--nonblocking", *spy_args]
        if a.idle:
            cmd.append("--idle")
        if a.gil:
            cmd.append("--gil")
        spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        cleanup.push("py-spy", lambda: spy.poll() is None and spy.terminate())
        time.sleep(1.0)
        t0 = time.monotonic()
        if a.job == "resync":
            d.request({"cmd": "wait", "volume": "vol0"}, timeout=None)
            st = d.status("vol0")["resync"]
            figure = (f"full resync: {st['copied_bytes'] / 2**20:.0f} MiB in {st['seconds']} s "
                      f"= {st['copied_bytes'] / max(st['seconds'], 1e-9) / 1e6:.0f} MB/s")
        else:
            wl = BY_KEY[a.job]
            r = run_fio(fio_args(wl, a.numjobs, d.file("vol0"), size, a.runtime), wl)
            figure = f"{wl.label} numjobs={a.numjobs}: {r.value:.0f} {wl.unit}"
        elapsed = time.monotonic() - t0
        spy.send_signal(2)  # SIGINT: py-spy writes its output and exits
        spy.wait(timeout=60)
        print(f"# {figure} ({elapsed:.1f} s sampled; py-spy rate {a.rate}/s"
              f"{', idle threads included' if a.idle else ''}{', GIL holders only' if a.gil else ''})")
        print(summarize(out, a.top) if out.exists() else f"(py-spy wrote nothing: "
              f"{spy.stderr.read().decode()[-500:] if spy.stderr else ''})")
        d.stop()
    finally:
        cleanup.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
