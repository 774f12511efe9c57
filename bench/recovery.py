"""Resync on a larger volume (`make bench`, section 3): crash (SIGKILL)
recovery of a few dirty regions on sparse plexes, a full resync
(`--recover-all`) of plexes full of data alternated with `dd` of one plex
image as the disk's reference, and a FastResync reattach after 1 % of the
FastResync regions changed.

Run alone:  .venv/bin/python bench/run.py --skip-fio --skip-loop --skip-holes --skip-spread
--skip-nbd --skip-raid5
"""

from __future__ import annotations

import os
import random
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from fiojobs import prefill_args, run_fio
from measure import Caches, fmt_size, log
from procs import Cleanup, Vmd, lazy_umount


def regions_equal(a: Path, b: Path, spans: list[tuple[int, int]]) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for off, n in spans:
            fa.seek(off)
            fb.seek(off)
            if fa.read(n) != fb.read(n):
                return False
    return True


class RecoveryBench:
    def __init__(self, scratch: Path, cleanup: Cleanup, caches: Caches, *, size: int, reps: int,
                 vol_settings: dict[str, Any]):
        self.scratch = scratch
        self.cleanup = cleanup
        self.caches = caches
        self.size = size
        self.reps = reps
        self.vol_settings = vol_settings
        self.raw: dict[str, Any] = {}

    def run(self) -> None:
        rsize = self.size
        rec = self.raw
        vol = "big"
        d = Vmd(self.scratch / "rec", {vol: {"size": rsize, **self.vol_settings}}, self.cleanup)
        p0, p1 = d.plex(vol, 0), d.plex(vol, 1)
        rng = random.Random(6)

        # 1. DRL crash recovery on sparse plexes.
        log(f"recovery: {fmt_size(rsize)} volume, sparse plexes; writing a handful of regions")
        d.start()
        st = d.status(vol)
        region = st["region_size"]
        fmr_region = st["fastresync_region"]
        n_regions = rsize // region
        picks = sorted(rng.sample(range(n_regions), 8))
        spans = [(r * region + 4096 * rng.randrange(0, region // 4096 - 16), 64 * 1024)
                 for r in picks]
        fd = os.open(d.file(vol), os.O_RDWR)
        try:
            for off, n in spans:
                os.pwrite(fd, os.urandom(n), off)
            os.fsync(fd)
            dirty_before = d.status(vol)["dirty_regions"]
            # SIGKILL with the volume still open (as under a mounted filesystem).
            d.proc.kill()
            d.proc.wait(timeout=30)
        finally:
            try:
                os.close(fd)
            except OSError:
                pass
        lazy_umount(d.mnt)
        t0 = time.monotonic()
        ready = d.start()
        d.request({"cmd": "wait", "volume": vol}, timeout=None)
        wall = time.monotonic() - t0
        st = d.status(vol)
        rec["crash"] = {"dirty_before_kill": dirty_before, "restart_to_ready_s": round(ready, 3),
                        "restart_to_in_sync_s": round(wall, 3),
                        "resync_seconds": st["resync"]["seconds"],
                        "copied_bytes": st["resync"]["copied_bytes"],
                        "recovered_regions": st.get("recovered_regions"),
                        "written_regions_identical": regions_equal(p0, p1, spans)}
        log(f"crash recovery: {rec['crash']}")
        d.stop()

        # 2 and 3. Full resync of the same volume, now holding data everywhere,
        # and dd of one plex image to a new file on the same filesystem:
        # alternated round by round (the disk is shared and noisy), medians kept.
        log(f"full resync: filling plex p0 with {fmt_size(rsize)} of data")
        run_fio(prefill_args(p0, rsize), None, timeout=900)
        fulls: list[dict[str, Any]] = []
        dds: list[float] = []
        for i in range(self.reps):
            for step in (("resync", "dd") if i % 2 == 0 else ("dd", "resync")):
                if step == "resync":
                    if d.proc is not None and d.proc.poll() is None:
                        d.stop()
                    fulls.append(self.full_resync(d, vol))
                    log(f"full resync {len(fulls)}: {fulls[-1]}")
                else:
                    dds.append(self.dd_copy(p0))
                    log(f"dd bs=1M conv=fdatasync {len(dds)}: {dds[-1]:.2f} s")
        fulls.sort(key=lambda x: x["resync_seconds"])
        rec["full"] = {**fulls[len(fulls) // 2],
                       "all_resync_seconds": [x["resync_seconds"] for x in fulls],
                       "hwm_kib": max(x["hwm_kib"] or 0 for x in fulls)}
        rec["dd"] = {"seconds": round(statistics.median(dds), 3), "bytes": rsize,
                     "all_seconds": sorted(round(x, 3) for x in dds)}

        # 4. FastResync: detach p1, change 1 % of the FastResync regions, attach.
        d.cli("plex", "detach", vol, "p1")
        n_fmr = rsize // fmr_region
        changed = sorted(rng.sample(range(n_fmr), max(1, n_fmr // 100)))
        fspans = [(i * fmr_region, fmr_region) for i in changed]
        fd = os.open(d.file(vol), os.O_RDWR)
        try:
            for off, n in fspans:
                os.pwrite(fd, os.urandom(n), off)
            os.fsync(fd)
        finally:
            os.close(fd)
        st = d.status(vol)
        missing = next(p["missing_bytes"] for p in st["plexes"] if p["name"] == "p1")
        self.caches.drop()
        t0 = time.monotonic()
        d.request({"cmd": "plex.attach", "volume": vol, "plex": "p1"})
        d.request({"cmd": "wait", "volume": vol}, timeout=None)
        wall = time.monotonic() - t0
        st = d.status(vol)
        rec["fmr"] = {"changed_regions": len(changed), "changed_bytes": len(changed) * fmr_region,
                      "map_bytes_before_attach": missing, "attach_to_in_sync_s": round(wall, 3),
                      "resync_seconds": st["resync"]["seconds"],
                      "copied_bytes": st["resync"]["copied_bytes"],
                      "changed_regions_identical": regions_equal(p0, p1, fspans),
                      "plex_states": [p["state"] for p in st["plexes"]],
                      "hwm_kib": d.hwm_kib()}
        log(f"FastResync: {rec['fmr']}")
        d.stop()
        shutil.rmtree(self.scratch / "rec", ignore_errors=True)

    def full_resync(self, d: Vmd, vol: str) -> dict[str, Any]:
        """Restart with --recover-all and wait until every plex is in sync."""
        self.caches.drop()
        t0 = time.monotonic()
        ready = d.start(recover_all=(vol,))
        t1 = time.monotonic()
        d.request({"cmd": "wait", "volume": vol}, timeout=None)
        t2 = time.monotonic()
        st = d.status(vol)
        return {"restart_to_ready_s": round(ready, 3), "ready_to_in_sync_s": round(t2 - t1, 3),
                "restart_to_in_sync_s": round(t2 - t0, 3),
                "resync_seconds": st["resync"]["seconds"],
                "copied_bytes": st["resync"]["copied_bytes"], "hwm_kib": d.hwm_kib()}

    def dd_copy(self, image: Path) -> float:
        """Seconds for dd to copy one plex image to a new file and fdatasync it."""
        self.caches.drop()
        copy = image.parent / "dd-copy.img"
        t0 = time.monotonic()
        subprocess.run(["dd", f"if={image}", f"of={copy}", "bs=1M", "conv=fdatasync"], check=True,
                       capture_output=True)
        seconds = time.monotonic() - t0
        copy.unlink()
        return seconds

    def report(self) -> list[str]:
        rec = self.raw
        md: list[str] = []
        if not rec.get("crash"):
            return md
        size = self.size
        c, f, dd, fm = rec["crash"], rec.get("full"), rec.get("dd"), rec.get("fmr")
        md.append(f"## Resync: {fmt_size(size)} volume (issue 3 DRL recovery, issue 4 FastResync)")
        md.append("")
        md.append("Times from the daemon's `status --json` (`resync.seconds`) and wall clock "
                  "through the admin socket (the `wait` request that `vmd wait` sends; CLI "
                  "start-up excluded). Page caches dropped before each resync and before dd. "
                  f"Full resync and dd alternate, {self.reps} round(s); their medians are shown, "
                  "all values in the notes below.")
        md.append("")
        md.append("| case | copied | resync.seconds | wall until in sync | note |")
        md.append("| --- | ---: | ---: | ---: | --- |")
        md.append(f"| crash (SIGKILL) with {c['dirty_before_kill']} dirty regions, sparse plexes | "
                  f"{fmt_size(c['copied_bytes'])} | {c['resync_seconds']:.3f} s | "
                  f"{c['restart_to_in_sync_s']:.2f} s from restart (ready after "
                  f"{c['restart_to_ready_s']:.2f} s) | recovered_regions={c['recovered_regions']}, "
                  f"written regions identical: {c['written_regions_identical']} |")
        if f:
            thr = f["copied_bytes"] / f["resync_seconds"] / 1e6 if f["resync_seconds"] else 0
            md.append(f"| full resync (`--recover-all`), plexes full of data | "
                      f"{fmt_size(f['copied_bytes'])} | {f['resync_seconds']:.2f} s | "
                      f"{f['ready_to_in_sync_s']:.2f} s from ready | {thr:.0f} MB/s |")
        if fm:
            md.append(f"| FastResync reattach after {fm['changed_regions']} × "
                      f"{fmt_size(fm['changed_bytes'] // max(1, fm['changed_regions']))} changed "
                      f"(1 % of regions) | {fmt_size(fm['copied_bytes'])} | "
                      f"{fm['resync_seconds']:.3f} s | {fm['attach_to_in_sync_s']:.2f} s from attach | "
                      f"map covered {fmt_size(fm['map_bytes_before_attach'])}; changed regions "
                      f"identical: {fm['changed_regions_identical']}; states "
                      f"{'/'.join(fm['plex_states'])} |")
        if dd:
            md.append(f"| `dd bs=1M conv=fdatasync` of one plex image | {fmt_size(dd['bytes'])} | – | "
                      f"{dd['seconds']:.2f} s | {dd['bytes'] / dd['seconds'] / 1e6:.0f} MB/s |")
        md.append("")
        md.append("| ratio | value | target |")
        md.append("| --- | ---: | --- |")
        if f and f["resync_seconds"]:
            md.append(f"| crash recovery / full resync (resync.seconds) | "
                      f"{c['resync_seconds'] / f['resync_seconds']:.4f} | well under 1 s of work |")
        if f and fm and f["resync_seconds"]:
            md.append(f"| FastResync reattach / full resync (resync.seconds) | "
                      f"{fm['resync_seconds'] / f['resync_seconds']:.4f} | ≤ 0.05 |")
            md.append(f"| FastResync reattach / full resync (wall, attach→in sync vs ready→in sync) | "
                      f"{fm['attach_to_in_sync_s'] / f['ready_to_in_sync_s']:.4f} | ≤ 0.05 |")
        if f and dd and f["resync_seconds"]:
            thr = f["copied_bytes"] / f["resync_seconds"]
            md.append(f"| full resync throughput / dd throughput | "
                      f"{thr / (dd['bytes'] / dd['seconds']):.2f} | ≥ 0.8 |")
        md.append("")
        if f and dd and "all_seconds" in dd:
            md.append(f"- full resync resync.seconds, every round: {f['all_resync_seconds']}; "
                      f"dd seconds, every round: {dd['all_seconds']}")
        hw = [x.get("hwm_kib") for x in (f, fm) if x and x.get("hwm_kib")]
        if hw:
            md.append(f"- vmd peak RSS (VmHWM) with the {fmt_size(size)} volume through full resync "
                      f"and FastResync: {max(hw) / 1024:.1f} MiB")
            md.append("")
        return md
