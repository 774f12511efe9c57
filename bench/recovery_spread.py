"""Recoveries spread per disk (issue 15, part 4): four volumes on one disk
recovering at once, `resync.per_device: 1` (one resync at a time per disk,
the default) against `0` (all at once, as before).

Four volumes of `size` (1 GiB) in one daemon, plexes on the scratch disk,
every plex full of data. Two cases, each measured in both modes, the modes
alternating round by round (the disk is shared and noisy), caches dropped
before each restart:

- crash: 8 regions written in each volume, SIGKILL, restart: each volume
  recovers its 8 dirty regions (whole DRL regions are copied);
- full: restart with `--recover-all` for every volume: each copies its
  whole plex p0 to p1.

Per round: the time from the restart until every volume is in sync, and the
mean over the volumes of the time until that volume is in sync (what a user
waiting for one volume sees). Both from polling `status` every 50 ms.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

from fiojobs import prefill_args, run_fio
from measure import Caches, fmt_size, log, rotated
from procs import BenchError, Cleanup, Vmd

VOLUMES = tuple(f"sp{i}" for i in range(4))
MODES = {"per_device=1": 1, "unlimited": 0}
DIRTY_REGIONS = 8
POLL = 0.05


def set_per_device(d: Vmd, n: int) -> None:
    """Rewrite the config's `resync:` section (applies at the next start)."""
    lines = d.cfg.read_text().splitlines()
    if "resync:" in lines:
        del lines[lines.index("resync:"):lines.index("resync:") + 2]
    d.cfg.write_text("\n".join(lines + ["resync:", f"  per_device: {n}"]) + "\n")


class SpreadBench:
    def __init__(self, scratch: Path, cleanup: Cleanup, caches: Caches, *, size: int, reps: int,
                 vol_settings: dict[str, Any]):
        self.size = size
        self.reps = reps
        self.caches = caches
        self.d = Vmd(scratch / "spread", {v: {"size": size, **vol_settings} for v in VOLUMES},
                     cleanup)
        self.rng = random.Random(15)
        self.raw: dict[str, Any] = {"size": size, "volumes": len(VOLUMES), "rounds": []}

    def run(self) -> None:
        d = self.d
        log(f"spread: filling plex p0 of {len(VOLUMES)} volumes of {fmt_size(self.size)}")
        for v in VOLUMES:
            run_fio(prefill_args(d.plex(v, 0), self.size), None, timeout=900)
        set_per_device(d, 0)
        d.start(recover_all=VOLUMES)  # p1 gets the data: both plexes full from here on
        self._until_in_sync(time.monotonic())
        d.stop()
        for rep in range(self.reps):
            for case in ("crash", "full"):
                for mode in rotated(list(MODES), rep):
                    r = (self._crash if case == "crash" else self._full)(MODES[mode])
                    r |= {"case": case, "mode": mode, "rep": rep}
                    log(f"spread: {r}")
                    self.raw["rounds"].append(r)

    def _until_in_sync(self, t0: float) -> dict[str, Any]:
        """Poll status until every volume is in sync: seconds from t0 for each."""
        done: dict[str, float] = {}
        deadline = t0 + 1800
        while len(done) < len(VOLUMES):
            if time.monotonic() > deadline:
                raise BenchError(f"spread: volumes not in sync after 30 min: "
                                 f"{sorted(set(VOLUMES) - set(done))}")
            for v in self.d.request({"cmd": "status"})["volumes"]:
                if v["name"] in done or v["name"] not in VOLUMES:
                    continue
                rs = v["resync"]
                if not rs["running"] and not rs.get("queued") and all(
                        p["state"] == "ACTIVE" and not p["missing_bytes"] for p in v["plexes"]):
                    done[v["name"]] = time.monotonic() - t0
            time.sleep(POLL)
        return {"all_in_sync_s": round(max(done.values()), 3),
                "mean_in_sync_s": round(statistics.mean(done.values()), 3),
                "per_volume_s": {v: round(done[v], 3) for v in VOLUMES}}

    def _restart(self, per_device: int, recover_all: tuple[str, ...] = ()) -> dict[str, Any]:
        d = self.d
        set_per_device(d, per_device)
        self.caches.drop()
        t0 = time.monotonic()
        d.start(recover_all=recover_all)
        r = self._until_in_sync(t0)
        st = d.request({"cmd": "status"})["volumes"]
        r["copied_bytes"] = sum(v["resync"]["copied_bytes"] for v in st if v["name"] in VOLUMES)
        # Each volume's own copy (its turn, not its wait): where the time went.
        r["copy_s"] = {v["name"]: v["resync"]["seconds"] for v in st if v["name"] in VOLUMES}
        d.stop()
        return r

    def _crash(self, per_device: int) -> dict[str, Any]:
        d = self.d
        d.start()
        region = d.request({"cmd": "status"})["volumes"][0]["region_size"]
        fds = [os.open(d.file(v), os.O_RDWR) for v in VOLUMES]
        try:
            for fd in fds:
                for r in self.rng.sample(range(self.size // region), DIRTY_REGIONS):
                    os.pwrite(fd, os.urandom(64 * 1024), r * region + 4096 * self.rng.randrange(16))
                os.fsync(fd)
            dirty = sum(v["dirty_regions"] for v in d.request({"cmd": "status"})["volumes"])
            # SIGKILL with the volumes open (as under mounted filesystems): a
            # volume closed and idle is recorded clean and recovers nothing.
            d.sigkill()
        finally:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
        return {"dirty_regions": dirty, **self._restart(per_device)}

    def _full(self, per_device: int) -> dict[str, Any]:
        return self._restart(per_device, recover_all=VOLUMES)

    def report(self) -> list[str]:
        rounds = self.raw["rounds"]
        if not rounds:
            return []
        md = [f"## Recoveries spread per disk: {len(VOLUMES)} volumes of {fmt_size(self.size)} "
              f"on one disk (issue 15)", "",
              "One daemon; every plex full of data; page caches dropped before each restart. "
              "`per_device=1`: one resync at a time per disk (the default); `unlimited`: "
              f"`per_device: 0`, all at once. Modes alternate; medians of {self.reps} round(s). "
              "Times from the restart, by polling `status` every 50 ms.", "",
              "| case | mode | copied | all in sync | mean per volume | rounds (all in sync) |",
              "| --- | --- | ---: | ---: | ---: | --- |"]
        for case, what in (("crash", f"SIGKILL, {DIRTY_REGIONS} dirty regions per volume"),
                           ("full", "full resync (`--recover-all` each)")):
            for mode in MODES:
                rs = [r for r in rounds if r["case"] == case and r["mode"] == mode]
                if not rs:
                    continue
                alls = [r["all_in_sync_s"] for r in rs]
                md.append(f"| {what} | {mode} | {fmt_size(rs[0]['copied_bytes'])} | "
                          f"{statistics.median(alls):.2f} s | "
                          f"{statistics.median(r['mean_in_sync_s'] for r in rs):.2f} s | "
                          f"{', '.join(f'{x:.2f}' for x in alls)} |")
        md.append("")
        return md
