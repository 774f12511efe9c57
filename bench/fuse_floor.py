#!/usr/bin/env python3
"""The cost of a FUSE request in pyfuse3 + trio, with no storage behind it.

    .venv/bin/python bench/fuse_floor.py [--runtime 5] [--size 1GiB]

Mounts a one-file pyfuse3 filesystem (the same mount options and direct_io as
vmd's volume files) whose `read` answers zeros at once and whose `write`
accepts everything, runs fio 4 KiB random read and write (psync, numjobs 1
and 4) against it, and prints IOPS and the server's CPU time per request.
That is the floor under vmd's per-request figures: what any pyfuse3 daemon on
this machine pays before it touches a plex.
"""

from __future__ import annotations

import argparse
import errno
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fiojobs import BY_KEY, fio_args  # noqa: E402
from measure import fio_with_cpu, parse_size  # noqa: E402
from procs import REPO, BenchError, Cleanup, lazy_umount, mounted  # noqa: E402

FILE_INODE = 2


def serve(mountpoint: str, size: int) -> None:
    import pyfuse3
    import trio

    zeros = bytes(1 << 20)

    class NullFS(pyfuse3.Operations):
        def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
            a = pyfuse3.EntryAttributes()
            a.st_ino = inode
            if inode == pyfuse3.ROOT_INODE:
                a.st_mode, a.st_nlink = stat.S_IFDIR | 0o755, 2
            else:
                a.st_mode, a.st_nlink, a.st_size = stat.S_IFREG | 0o600, 1, size
            a.attr_timeout = a.entry_timeout = 300
            return a

        async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
            return self._attr(inode)

        async def lookup(self, parent: int, name: bytes, ctx: pyfuse3.RequestContext
                         ) -> pyfuse3.EntryAttributes:
            if parent != pyfuse3.ROOT_INODE or name != b"null":
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._attr(FILE_INODE)

        async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
            return pyfuse3.FileInfo(fh=inode, direct_io=True)

        async def read(self, fh: int, off: int, n: int) -> bytes:
            return zeros[:max(0, min(n, size - off))]

        async def write(self, fh: int, off: int, buf: bytes) -> int:
            return len(buf)

        async def fsync(self, fh: int, datasync: bool) -> None:
            pass

    options = set(pyfuse3.default_options)
    options.add("fsname=vmd-null")
    pyfuse3.init(NullFS(), mountpoint, options)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


def measure(scratch: Path, size: int, runtime: float, cleanup: Cleanup) -> list[dict[str, Any]]:
    """Mount the null filesystem under scratch, run the fio jobs, unmount.
    One row per job: workload key, label, numjobs, IOPS, server µs of CPU per request."""
    mnt = scratch / "null-mnt"
    mnt.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(mnt), "--size", str(size)],
                            start_new_session=True)

    def stop() -> None:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        lazy_umount(mnt)

    cleanup.push("null filesystem", stop)
    deadline = time.monotonic() + 30
    while not mounted(mnt):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise BenchError("fuse_floor: the null filesystem did not mount")
        time.sleep(0.05)
    rows = []
    try:
        for key in ("randread", "randwrite"):
            wl = BY_KEY[key]
            for nj in (1, 4):
                r, cpu = fio_with_cpu(fio_args(wl, nj, mnt / "null", size, runtime), wl, proc.pid)
                rows.append({"key": key, "label": wl.label, "numjobs": nj, "iops": round(r.iops),
                             "cpu_us_per_request": round(cpu, 1)})
    finally:
        stop()
    return rows


def table(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| fio job | numjobs | IOPS | server CPU per request |", "| --- | ---: | ---: | ---: |"]
    out += [f"| {r['label']} | {r['numjobs']} | {r['iops']:,} | {r['cpu_us_per_request']} µs |"
            for r in rows]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", type=float, default=5.0)
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    a = ap.parse_args()
    size = parse_size(a.size)
    if a.serve:
        serve(a.serve, size)
        return 0
    cleanup = Cleanup()
    parent = REPO / "var"
    parent.mkdir(exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="fuse-floor-", dir=parent))
    cleanup.push("scratch", lambda: shutil.rmtree(scratch, ignore_errors=True))
    try:
        print("\n".join(table(measure(scratch, size, a.runtime, cleanup))))
    finally:
        cleanup.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
