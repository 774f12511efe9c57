"""How a benchmark figure is taken and shown, for run.py, loopdev.py, ab.py and
fuse_floor.py: page-cache drops, targets rotating job by job, fio runs with the
daemon's CPU time counted, medians, and the vmd/qsd table."""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Hashable, Sequence

from fiojobs import FioResult, Workload, run_fio
from procs import GiB, MiB, BenchError, cpu_seconds


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_size(s: str) -> int:
    s = s.strip().lower().removesuffix("b").removesuffix("i")
    mult = {"k": 1 << 10, "m": MiB, "g": GiB, "t": 1 << 40}
    if s and s[-1] in mult:
        return int(float(s[:-1]) * mult[s[-1]])
    return int(s)


def fmt_size(n: float) -> str:
    for unit, m in (("GiB", GiB), ("MiB", MiB), ("KiB", 1 << 10)):
        if n >= m:
            v = n / m
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{int(n)} B"


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def fmt_val(v: float, unit: str) -> str:
    if v != v:  # NaN
        return "–"
    if unit == "MB/s":
        return f"{v:.0f}"
    if unit == "s":
        return f"{v:.2f}"
    return f"{v:,.0f}".replace(",", " ")


def fmt_ratio(r: float) -> str:
    return "–" if r != r else f"{r:.2f}"


def fmt_us(v: float) -> str:
    return "–" if v != v else f"{v:.0f} µs"


class Caches:
    """sync + drop_caches before a measured step, so that no target reads
    another's (or its own earlier) data from the page cache."""

    def __init__(self) -> None:
        self.dropped = 0
        self.failed = 0

    def drop(self) -> None:
        os.sync()
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            self.dropped += 1
        except OSError:
            self.failed += 1


@dataclass(frozen=True)
class Target:
    name: str
    path: Path                # what fio (or the workload) is pointed at
    pid: int | None = None    # the daemon serving it, whose CPU time is counted


def rotated(names: Sequence[str], rep: int) -> list[str]:
    """The targets in the order of repetition `rep`: each starts first in turn,
    so that none is always the one measured right after a cache drop or a
    neighbour's writeback."""
    k = rep % len(names)
    return list(names[k:]) + list(names[:k])


def fio_with_cpu(args: list[str], wl: Workload | None, pid: int | None,
                 timeout: float = 600) -> tuple[FioResult, float]:
    """One fio run and the daemon's CPU per fio request over it (NaN without a daemon)."""
    cpu0 = cpu_seconds(pid) if pid else 0.0
    r = run_fio(args, wl, timeout=timeout)
    cpu = r.cpu_us_per_request(cpu_seconds(pid) - cpu0) if pid else float("nan")
    return r, cpu


Row = Hashable  # what identifies a table row, e.g. (workload key, numjobs)


class Samples:
    """Every repetition's figure and daemon CPU per request, per (row, target)."""

    def __init__(self) -> None:
        self.values: dict[tuple[Row, str], list[float]] = {}
        self.cpu: dict[tuple[Row, str], list[float]] = {}
        self.records: list[dict[str, object]] = []  # every run, for the raw JSON

    def add(self, row: Row, target: str, value: float, cpu_us: float = float("nan")) -> None:
        self.values.setdefault((row, target), []).append(value)
        if cpu_us == cpu_us:
            self.cpu.setdefault((row, target), []).append(cpu_us)

    def fio(self, row: Row, target: Target, args: list[str], wl: Workload) -> FioResult:
        r, cpu = fio_with_cpu(args, wl, target.pid)
        if r.errors:
            raise BenchError(f"fio reported error {r.errors} on {target.name} ({target.path})")
        self.add(row, target.name, r.value, cpu)
        self.records.append({"row": row, "target": target.name,
                             "rep": len(self.values[(row, target.name)]) - 1, "value": r.value,
                             "unit": wl.unit, "bw_bytes": r.bw_bytes, "iops": r.iops,
                             "runtime_ms": r.runtime_ms,
                             "cpu_us_per_request": cpu if cpu == cpu else None})
        return r

    def value(self, row: Row, target: str) -> float:
        return median(self.values.get((row, target), []))

    def cpu_us(self, row: Row, target: str) -> float:
        return median(self.cpu.get((row, target), []))

    def ratio(self, row: Row, unit: str, a: str = "vmd", b: str = "qsd") -> float:
        """How many times faster a is than b: a/b for rates, b/a for times."""
        x, y = self.value(row, a), self.value(row, b)
        if unit == "s":
            x, y = y, x
        return x / y if x == x and y == y and y else float("nan")


@dataclass(frozen=True)
class TableRow:
    key: Row
    cells: tuple[str, ...]  # the leading cells (job, numjobs, ...)
    unit: str


def vs_table(head: Sequence[str], rows: Sequence[TableRow], s: Samples, targets: Sequence[str],
             cpu_of: Sequence[str] = ("vmd", "qsd"), goal: float | None = 1.0,
             more_ratios: Sequence[tuple[str, str]] = ()) -> list[str]:
    """Markdown: the leading cells, the unit, each target's median, vmd/qsd
    (and whether it meets `goal`), `more_ratios` (a/b), each daemon's median
    CPU per request."""
    cols = [(c, "---:" if c == "numjobs" else "---") for c in (*head, "unit")]
    cols += [(t, "---:") for t in (*targets, "vmd/qsd")]
    if goal is not None:
        cols.append((f"target ≥ {goal:.1f}", "---"))
    cols += [(f"{a}/{b}", "---:") for a, b in more_ratios]
    cols += [(f"{t} CPU/req", "---:") for t in cpu_of]
    out = ["| " + " | ".join(c for c, _ in cols) + " |",
           "| " + " | ".join(a for _, a in cols) + " |"]
    for r in rows:
        ratio = s.ratio(r.key, r.unit)
        cells = [*r.cells, r.unit, *(fmt_val(s.value(r.key, t), r.unit) for t in targets),
                 fmt_ratio(ratio)]
        if goal is not None:
            cells.append("–" if ratio != ratio else ("yes" if ratio >= goal else "**no**"))
        cells += [fmt_ratio(s.ratio(r.key, r.unit, a, b)) for a, b in more_ratios]
        cells += [fmt_us(s.cpu_us(r.key, t)) for t in cpu_of]
        out.append("| " + " | ".join(cells) + " |")
    return out
