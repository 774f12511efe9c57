"""Medians of direct_reads_ab.sh output: job, base and new IOPS, new/base, CPU µs per request.
usage: python bench/direct_reads_summary.py FILE"""

import statistics
import sys
from collections import defaultdict

runs: dict[tuple[str, str], list[tuple[float, float, float]]] = defaultdict(list)
for line in open(sys.argv[1]):
    f = line.split()
    if len(f) == 8 and f[2] == "iops":
        runs[f[0], f[1]].append((float(f[3]), float(f[5]), float(f[7])))
print("| job | rounds | base IOPS | new IOPS | new/base | base CPU µs/req | new CPU µs/req | load |")
print("|---|---|---|---|---|---|---|---|")
for job in dict.fromkeys(j for j, _ in runs):
    b, n = runs[job, "base"], runs[job, "new"]
    k = min(len(b), len(n))
    med = lambda xs, i: statistics.median(x[i] for x in xs[:k])  # noqa: E731
    loads = [x[2] for x in b[:k] + n[:k]]
    print(f"| {job} | {k} | {med(b, 0):.0f} | {med(n, 0):.0f} | {med(n, 0) / med(b, 0):.2f} "
          f"| {med(b, 1):.0f} | {med(n, 1):.0f} | {min(loads):.1f}-{max(loads):.1f} |")
