#!/usr/bin/env python3
"""vmd's CPU and latency per write to a volume with a remote plex, engine
level (no FUSE, no fio): what `bench/nbd.py` cannot separate from the kernel.

    .venv/bin/python bench/nbd_cpu.py [--tree DIR] [--n 2000] [--rounds 3]

A volume of one local plex and one qemu-nbd export (Unix socket, then
127.0.0.1), and vmd's 2-way local mirror beside them, in this process's trio
loop. Each job writes from 1 or 4 concurrent writers; the figures are CPU
(`getrusage(RUSAGE_SELF)`: every thread of the process) and wall time per
write, the median of `--rounds` rounds, targets alternating round by round.
`--tree` imports vmd from another checkout: run it on two trees back to back
to A/B a change (the load average is printed; compare on a quiet machine).
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

KiB, MiB = 1024, 1024 * 1024
SIZE = 64 * MiB
JOBS = (("4k-randwrite", 4 * KiB, 1), ("4k-randwrite", 4 * KiB, 4),
        ("1m-seqwrite", MiB, 1), ("4k-randread-remote", 4 * KiB, 1))


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Server:
    def __init__(self, root: Path, kind: str):
        root.mkdir(parents=True)
        self.image = root / "export.img"
        with open(self.image, "wb") as f:
            f.truncate(SIZE)
        self.pidfile, self.sock = root / "pid", root / "sock"
        if kind == "tcp":
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            where = ["-b", "127.0.0.1", "-p", str(port)]
            self.uri = f"nbd://127.0.0.1:{port}/vmd"
        else:
            where = ["-k", str(self.sock)]
            self.uri = f"nbd+unix:///vmd?socket={self.sock}"
        subprocess.run(["qemu-nbd", "-f", "raw", "-x", "vmd", "-t", "--fork", "--pid-file",
                        str(self.pidfile), *where, str(self.image)], check=True, timeout=60)
        self.pid = int(self.pidfile.read_text())

    def stop(self) -> None:
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


async def job(vol: Any, what: str, bs: int, nj: int, n: int) -> tuple[float, float]:
    import trio

    count = n if bs < MiB else max(20, n // 20)
    data = os.urandom(bs)
    rnd = random.Random(1)
    blocks = vol.size // bs
    offs = ([rnd.randrange(blocks) * bs for _ in range(count)] if "rand" in what
            else [(i % blocks) * bs for i in range(count)])
    if "read" in what:
        # Reads go to the local plex first: fail nothing, just read the remote one.
        (p,) = [p for p in vol.plexes if p.remote]

        async def one(off: int) -> None:
            await p.pread(off, bs)
    else:
        async def one(off: int) -> None:
            await vol.pwrite(off, data)

    async def writer(k: int) -> None:
        for off in offs[k::nj]:
            await one(off)

    c0, t0 = cpu(), time.perf_counter()
    async with trio.open_nursery() as nursery:
        for k in range(nj):
            nursery.start_soon(writer, k)
    return (cpu() - c0) / count * 1e6, (time.perf_counter() - t0) / count * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", type=Path, default=Path(__file__).resolve().parent.parent)
    ap.add_argument("--n", type=int, default=2000, help="4 KiB requests per job")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--only", default="", help="jobs whose 'job target' contains this "
                                                "(to profile one: py-spy record -- ...)")
    args = ap.parse_args()
    # Not bench/ itself: bench/nbd.py would hide libnbd's `nbd` module.
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [str(args.tree.resolve()), *(p for p in sys.path if p != here)]
    import trio

    from vmd.config import VolumeConfig
    from vmd.manager import open_volume

    here_var = Path(__file__).resolve().parent.parent / "var"
    here_var.mkdir(exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="nbdcpu-", dir=args.dir or here_var))
    servers: list[Server] = []
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    slow: dict[str, int] = {}

    async def run() -> None:
        vols: dict[str, Any] = {}
        async with trio.open_nursery() as nursery:
            for name in ("unix", "tcp", "local"):
                d = base / name
                d.mkdir()
                if name == "local":
                    plexes: tuple[Any, ...] = (d / "p0.img", d / "p1.img")
                else:
                    srv = Server(base / f"srv-{name}", name)
                    servers.append(srv)
                    plexes = (d / "p0.img", srv.uri)
                vc = VolumeConfig(name=f"v{name}", size=SIZE, plexes=plexes, log=d / "v.log",
                                  direct_io=False)
                vol = open_volume(vc, d / "vmd.yaml", clean_delay=5.0)
                await vol.checkpoint()
                await nursery.start(vol.run)
                vols[name] = vol
            fill = os.urandom(MiB)
            for vol in vols.values():
                with trio.fail_after(300):
                    while any(p.state != "ACTIVE" for p in vol.plexes) or vol.resync.targets():
                        await trio.sleep(0.05)
                # Allocated and cached, as fio's prefill leaves them: a write
                # into a hole may stall (and send the local plex off the loop).
                for off in range(0, SIZE, MiB):
                    await vol.pwrite(off, fill)
            for r in range(args.rounds):
                order = list(vols)
                order = order[r % len(order):] + order[:r % len(order)]
                for what, bs, nj in JOBS:
                    for name in order:
                        if "remote" in what and name == "local" or \
                                args.only not in f"{what} nj{nj} {name}":
                            continue
                        results.setdefault((f"{what} nj{nj}", name), []).append(
                            await job(vols[name], what, bs, nj, args.n))
            for name, vol in vols.items():
                # Inline writes that stalled sent that plex off the event loop
                # for a while (plex.py): a busy machine's writes cost more.
                slow[name] = sum(p.slow_writes for p in vol.plexes)
                await vol.shutdown()
            nursery.cancel_scope.cancel()

    load0 = os.getloadavg()[0]
    try:
        trio.run(run)
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(base, ignore_errors=True)
    # Only a checkout's own commit: a copy inside another checkout would name that one's.
    rev = (subprocess.run(["git", "-C", str(args.tree), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
           if (args.tree / ".git").exists() else "") or "not a git checkout"
    print(f"tree {args.tree} ({rev}), load {load0:.1f} → {os.getloadavg()[0]:.1f}, "
          f"median of {args.rounds}")
    print("stalled inline writes (the plex went off the loop after each): " +
          ", ".join(f"{k} {v}" for k, v in slow.items()))
    print(f"{'job':<26} {'target':<6} {'CPU µs/req':>11} {'wall µs/req':>12}")
    for (j, name), v in results.items():
        print(f"{j:<26} {name:<6} {statistics.median(c for c, _ in v):>11.0f} "
              f"{statistics.median(w for _, w in v):>12.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
