"""How this disk copies 4 image files with copy_file_range, as resyncs do:
one file at a time (`resync.per_device: 1`) against all four at once, with the
target written through the page cache or O_DIRECT, and N chunks of 4 MiB in
flight per file. No vmd involved: it tells what the kernel and the disk give
a lone copy (vmd/resync.py's KERNEL_COPIES and Plex._direct_for_copies were
chosen from it).

    .venv/bin/python bench/kernel_copy.py --dir var/kcopy [--size-mib 1024] [--rounds 3]

Writes 8 files of --size-mib in --dir (kept for the next run: delete them
after). Caches are dropped before each case; the cases alternate per round;
each line is the seconds until all four copies are durable (fdatasync).
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from pathlib import Path

CHUNK = 4 << 20
FILES = 4
CASES = [  # (all at once, chunks in flight per file, target O_DIRECT)
    (False, 4, False), (True, 4, False),
    (False, 4, True), (False, 16, True), (True, 4, True),
]


def prepare(d: Path, size: int) -> None:
    d.mkdir(parents=True, exist_ok=True)
    block = os.urandom(CHUNK)
    for name in [f"src{i}" for i in range(FILES)] + [f"dst{i}" for i in range(FILES)]:
        p = d / name
        if p.exists() and p.stat().st_size == size:
            continue
        with open(p, "wb") as f:
            for _ in range(size // CHUNK):
                f.write(block)
            os.fsync(f.fileno())


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3")


def copy_file(d: Path, i: int, size: int, threads: int, direct: bool) -> None:
    src = os.open(d / f"src{i}", os.O_RDONLY)
    dst = os.open(d / f"dst{i}", os.O_RDWR | (os.O_DIRECT if direct else 0))
    offsets = iter(range(0, size, CHUNK))
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                off = next(offsets, None)
            if off is None:
                return
            done = 0
            while done < CHUNK:
                done += os.copy_file_range(src, dst, CHUNK - done, off + done, off + done)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    os.fdatasync(dst)
    os.close(src)
    os.close(dst)


def run_case(d: Path, size: int, together: bool, threads: int, direct: bool) -> float:
    drop_caches()
    t0 = time.monotonic()
    if together:
        jobs = [threading.Thread(target=copy_file, args=(d, i, size, threads, direct))
                for i in range(FILES)]
        for j in jobs:
            j.start()
        for j in jobs:
            j.join()
    else:
        for i in range(FILES):
            copy_file(d, i, size, threads, direct)
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, required=True, help="scratch directory on the disk to measure")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    size = args.size_mib << 20
    prepare(args.dir, size)
    times: dict[tuple[bool, int, bool], list[float]] = {c: [] for c in CASES}
    for r in range(args.rounds):
        for case in CASES[r % len(CASES):] + CASES[:r % len(CASES)]:
            times[case].append(run_case(args.dir, size, *case))
    print(f"| {FILES} x {args.size_mib} MiB | chunks in flight per file | target | median s | rounds |")
    print("| --- | ---: | --- | ---: | --- |")
    for (together, threads, direct), ts in times.items():
        print(f"| {'all at once' if together else 'one at a time'} | {threads} | "
              f"{'O_DIRECT' if direct else 'page cache'} | {statistics.median(ts):.2f} | "
              f"{', '.join(f'{t:.2f}' for t in ts)} |")


if __name__ == "__main__":
    main()
