"""Full resync of a mostly empty volume (issue 17): vmd copies only what the
source plex has allocated, against vmd copying every byte (VMD_RESYNC_DENSE=1,
the behaviour before hole-skipping) and against `dd` of the image, same run.

The volume's plexes are sparse; `fraction` of its FastResync regions are
written at random through the mount. Each round deletes the second plex and
its sidecar log and restarts with `--recover-all`: vmd creates the plex anew
and copies p0 to it, as for `plex add`. Rounds alternate the order of the
three methods (the disk is shared and noisy); medians are reported.

Then the same volume's Remote Copy full update to a second daemon over a local
link (a pipe to `vmd rcopy receive`): holes sent as zero ranges, against every
byte sent (VMD_RCOPY_DENSE=1 on the sender). Each round gives the receiver a
new empty volume (it then asks for a full update) and drops the caches.
"""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from measure import Caches, fmt_size, log, rotated
from procs import BenchError, Cleanup, Vmd

VOL = "sparse"
METHODS = ("vmd", "vmd-dense", "dd")
DENSE_ENV = {"VMD_RESYNC_DENSE": "1"}  # vmd/resync.py: copy holes too
RC_METHODS = ("rcopy", "rcopy-dense")
RC_DENSE_ENV = {"VMD_RCOPY_DENSE": "1"}  # vmd/rcopy.py: send holes as bytes too


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


class HolesBench:
    def __init__(self, scratch: Path, cleanup: Cleanup, caches: Caches, *, size: int, reps: int,
                 vol_settings: dict[str, Any], fraction: float = 0.10):
        self.root = scratch / "holes"
        self.size = size
        self.reps = reps
        self.fraction = fraction
        self.caches = caches
        self.b = Vmd(scratch / "holes-b", {VOL: {"size": size, **vol_settings}}, cleanup)
        receive = [sys.executable, "-m", "vmd", "-c", str(self.b.cfg), "rcopy", "receive", VOL]
        self.d = Vmd(self.root, {VOL: {"size": size, **vol_settings,
                                       "rcopy": {"target": receive, "period": "1h"}}}, cleanup)
        self.p0, self.p1 = self.d.plex(VOL, 0), self.d.plex(VOL, 1)
        self.raw: dict[str, Any] = {"size": size, "fraction": fraction, "rounds": [],
                                    "rcopy_rounds": []}

    def run(self) -> None:
        self._fill()
        for rep in range(self.reps):
            for method in rotated(METHODS, rep):
                r = self._dd() if method == "dd" else self._resync(method == "vmd-dense")
                r |= {"method": method, "rep": rep}
                log(f"holes: {r}")
                self.raw["rounds"].append(r)
        for rep in range(self.reps):
            for method in rotated(RC_METHODS, rep):
                r = self._rcopy(method == "rcopy-dense") | {"method": method, "rep": rep}
                log(f"holes: {r}")
                self.raw["rcopy_rounds"].append(r)

    def _fill(self) -> None:
        d = self.d
        d.start()
        region = d.status(VOL)["fastresync_region"]
        n = self.size // region
        picks = sorted(random.Random(17).sample(range(n), int(n * self.fraction)))
        log(f"holes: writing {len(picks)} of {n} regions of {fmt_size(region)} "
            f"({fmt_size(len(picks) * region)}) of a {fmt_size(self.size)} volume")
        fd = os.open(d.file(VOL), os.O_RDWR)
        try:
            for r in picks:
                os.pwrite(fd, os.urandom(region), r * region)
            os.fsync(fd)
        finally:
            os.close(fd)
        d.stop()
        self.raw["source_allocated"] = allocated(self.p0)
        self.raw["written_bytes"] = len(picks) * region

    def _resync(self, dense: bool) -> dict[str, Any]:
        """A new p1, copied from p0 by a --recover-all start."""
        d = self.d
        self.p1.unlink(missing_ok=True)
        (self.root / f"{VOL}.log").unlink(missing_ok=True)
        self.caches.drop()
        d.start(recover_all=(VOL,), env=DENSE_ENV if dense else None)
        t0 = time.monotonic()
        d.request({"cmd": "wait", "volume": VOL}, timeout=None)
        wall = time.monotonic() - t0
        rs = d.status(VOL)["resync"]
        d.stop()
        return {"resync_seconds": rs["seconds"], "ready_to_in_sync_s": round(wall, 3),
                "copied_bytes": rs["copied_bytes"], "allocated": allocated(self.p1)}

    def _rcopy(self, dense: bool) -> dict[str, Any]:
        """A full update of the volume to a new, empty one on the second daemon."""
        d, b = self.d, self.b
        for i in range(2):
            b.plex(VOL, i).unlink(missing_ok=True)
        (b.root / f"{VOL}.log").unlink(missing_ok=True)
        b.start()
        d.start(env=RC_DENSE_ENV if dense else None)
        self.caches.drop()
        t0 = time.monotonic()
        req = {"cmd": "rcopy.sync", "volume": VOL}
        try:
            reply = d.request(req, timeout=None)
        except BenchError as e:  # a new receiver asks for a full update: the next one is
            if "needs a full update" not in str(e):
                raise
            t0 = time.monotonic()
            reply = d.request(req, timeout=None)
        wall = time.monotonic() - t0
        d.stop()
        b.stop()
        if not reply["full"]:
            raise BenchError(f"the remote copy update was not a full one: {reply}")
        return {"update_seconds": round(reply["seconds"], 3), "wall_s": round(wall, 3),
                "sent_bytes": reply["sent_bytes"], "zero_bytes": reply.get("zero_bytes", 0),
                "allocated": allocated(b.plex(VOL, 0))}

    def _dd(self) -> dict[str, Any]:
        copy = self.root / "dd-copy.img"
        self.caches.drop()
        t0 = time.monotonic()
        subprocess.run(["dd", f"if={self.p0}", f"of={copy}", "bs=1M", "conv=fdatasync"],
                       check=True, capture_output=True)
        seconds = time.monotonic() - t0
        r = {"resync_seconds": round(seconds, 3), "copied_bytes": self.size,
             "allocated": allocated(copy)}
        copy.unlink()
        return r

    def median(self, method: str, key: str) -> float:
        return statistics.median(r[key] for r in self.raw["rounds"] if r["method"] == method)

    def report(self) -> list[str]:
        if not self.raw["rounds"]:
            return []
        src = self.raw["source_allocated"]
        base = self.median("vmd-dense", "resync_seconds")
        md = [f"## Full resync of a mostly empty volume ({fmt_size(self.size)}, "
              f"{self.fraction:.0%} of its regions written at random)", "",
              f"Source plex allocated: {fmt_size(src)}; a new plex copied from it. "
              f"Medians of {self.reps} round(s); caches dropped before each.", "",
              "| method | seconds | copied | new copy allocated | allocated / source | "
              "time / copy-everything |",
              "|---|---:|---:|---:|---:|---:|"]
        names = {"vmd": "vmd (holes skipped)", "vmd-dense": "vmd copying everything (before)",
                 "dd": "dd bs=1M conv=fdatasync of the image"}
        for m in METHODS:
            secs = self.median(m, "resync_seconds")
            alloc = self.median(m, "allocated")
            md.append(f"| {names[m]} | {secs:.2f} | {fmt_size(self.median(m, 'copied_bytes'))} | "
                      f"{fmt_size(alloc)} | {alloc / src:.3f} | {secs / base:.3f} |")
        fast = self.median("vmd", "resync_seconds")
        alloc = self.median("vmd", "allocated")
        md += ["", f"- speed-up over copying everything: {base / fast:.1f}× (target ≥ 5×); "
                   f"over dd: {self.median('dd', 'resync_seconds') / fast:.1f}×; new plex "
                   f"allocated within {abs(alloc - src) / src:.1%} of the source (target ≤ 5 %)",
               f"- every round (seconds): " + "; ".join(
                   f"{m} {[r['resync_seconds'] for r in self.raw['rounds'] if r['method'] == m]}"
                   for m in METHODS), ""]
        return md + self._rcopy_report(src)

    def _rcopy_report(self, src: int) -> list[str]:
        rounds = self.raw["rcopy_rounds"]
        if not rounds:
            return []

        def med(method: str, key: str) -> float:
            return statistics.median(r[key] for r in rounds if r["method"] == method)

        base = med("rcopy-dense", "update_seconds")
        md = ["## Remote Copy full update of the same volume (local link: a pipe to "
              "`vmd rcopy receive`)", "",
              f"Source allocated: {fmt_size(src)}. Each round: a new empty target volume, "
              f"caches dropped. Medians of {self.reps} round(s).", "",
              "| method | seconds | bytes sent | sent / allocated | holes as zero ranges | "
              "target allocated | time / send-everything |",
              "|---|---:|---:|---:|---:|---:|---:|"]
        names = {"rcopy": "holes as zero ranges", "rcopy-dense": "every byte sent (before)"}
        for m in RC_METHODS:
            secs, sent = med(m, "update_seconds"), med(m, "sent_bytes")
            md.append(f"| {names[m]} | {secs:.2f} | {fmt_size(sent)} | {sent / src:.3f} | "
                      f"{fmt_size(med(m, 'zero_bytes'))} | {fmt_size(med(m, 'allocated'))} | "
                      f"{secs / base:.3f} |")
        md += ["", f"- speed-up over sending everything: "
                   f"{base / med('rcopy', 'update_seconds'):.1f}×; every round (seconds): "
                   + "; ".join(f"{m} {[r['update_seconds'] for r in rounds if r['method'] == m]}"
                               for m in RC_METHODS), ""]
        return md
