"""fio jobs of the benchmark: how they are built, run and read."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence


@dataclass(frozen=True)
class Workload:
    key: str       # short id used in results
    label: str     # row label in the table
    rw: str
    bs: str
    unit: str      # "MB/s" or "IOPS"

    @property
    def sequential(self) -> bool:
        return not self.rw.startswith("rand")

    @property
    def is_write(self) -> bool:
        return "write" in self.rw


WORKLOADS = [
    Workload("seqwrite", "1 MiB seq write", "write", "1m", "MB/s"),
    Workload("randwrite", "4 KiB rand write", "randwrite", "4k", "IOPS"),
    Workload("randread", "4 KiB rand read", "randread", "4k", "IOPS"),
    Workload("seqread", "1 MiB seq read", "read", "1m", "MB/s"),
]
NUMJOBS = (1, 4)
BY_KEY = {w.key: w for w in WORKLOADS}


def fio_args(wl: Workload, numjobs: int, filename: Path, size: int, runtime: float,
             direct: bool = False, extra: Sequence[str] = ()) -> list[str]:
    """One fio job. Sequential jobs cover the file once (each of the numjobs
    threads its own slice, capped by `runtime`); random jobs are time based
    over the whole file. psync, end_fsync=1 for all, as in issue 6; buffered
    unless `direct` (O_DIRECT, as on a loop device)."""
    args = ["fio", "--name=" + f"{wl.key}-{numjobs}", f"--filename={filename}",
            f"--direct={int(direct)}", *extra,
            "--ioengine=psync", f"--rw={wl.rw}", f"--bs={wl.bs}", f"--numjobs={numjobs}",
            "--group_reporting=1", "--end_fsync=1", "--fallocate=none", "--randrepeat=1",
            "--norandommap=1", "--invalidate=1", f"--runtime={max(1, round(runtime))}s",
            "--output-format=json"]
    if wl.sequential:
        part = size // numjobs
        args += [f"--size={part}", f"--offset_increment={part}"]
    else:
        args += [f"--size={size}", "--time_based=1"]
    return args


def prefill_args(filename: Path, size: int, direct: bool = False) -> list[str]:
    """Write every byte once (1 MiB sequential, fio's random buffers), fsync."""
    return ["fio", "--name=prefill", f"--filename={filename}", "--ioengine=psync", "--rw=write",
            f"--direct={int(direct)}",
            "--bs=1m", f"--size={size}", "--end_fsync=1", "--fallocate=none",
            "--output-format=json"]


@dataclass
class FioResult:
    value: float          # MB/s (10^6 bytes/s) or IOPS, per the workload's unit
    bw_bytes: float
    iops: float
    runtime_ms: int
    errors: int

    def cpu_us_per_request(self, cpu_seconds: float) -> float:
        """A daemon's CPU seconds over this job, as µs per fio request."""
        return cpu_seconds / max(1.0, self.iops * self.runtime_ms / 1000) * 1e6


def run_fio(args: list[str], wl: Workload | None = None, timeout: float = 600) -> FioResult:
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "LC_ALL": "C"})
    if r.returncode != 0:
        raise RuntimeError(f"fio failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    out = r.stdout
    # fio may print notes before the JSON document.
    data: dict[str, Any] = json.loads(out[out.index("{"):])
    job = data["jobs"][0]
    side = job["write"] if (wl is None or wl.is_write) else job["read"]
    bw = float(side["bw_bytes"])
    iops = float(side["iops"])
    value = bw / 1e6 if (wl is None or wl.unit == "MB/s") else iops
    return FioResult(value=value, bw_bytes=bw, iops=iops,
                     runtime_ms=int(side.get("runtime", job.get("job_runtime", 0))),
                     errors=int(job.get("error", 0)))
