"""Remote plexes (issue 14): vmd with one local plex and one qemu-nbd export,
on a Unix socket and on 127.0.0.1, against qemu-storage-daemon with a quorum
of a local file and an `nbd` child on its own qemu-nbd of the same kind, both
exported through FUSE; and each against vmd's 2-way local mirror. The fio
rows of the main matrix (fiojobs.py), targets alternating job by job.

Every target has its own images and its own qemu-nbd, so that no two share a
server or a page-cache file.

`BENCH_NBD_BASE=DIR` (a checkout of another commit, `git archive REV vmd |
tar -x -C DIR` is enough) adds base-unix and base-tcp: the same vmd targets
run from that tree, in the same run, alternating with the others, to A/B a
change; the report adds vmd/base ratios.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

from fiojobs import NUMJOBS, WORKLOADS, fio_args, prefill_args, run_fio
from measure import Caches, Samples, Target, fmt_ratio, fmt_val, log, rotated
from procs import BenchError, Cleanup, Qsd, Vmd, _wait_for

KINDS = ("unix", "tcp")
TARGETS = ("vmd-unix", "qsd-unix", "vmd-tcp", "qsd-tcp", "vmd-local")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class QemuNbd:
    """qemu-nbd serving one raw image (forks once it listens)."""

    def __init__(self, root: Path, size: int, kind: str, cleanup: Cleanup):
        root.mkdir(parents=True, exist_ok=True)
        self.image = root / "export.img"
        with open(self.image, "wb") as f:
            f.truncate(size)
        self.kind = kind
        self.sock = root / "nbd.sock"
        self.port = _free_port() if kind == "tcp" else 0
        self.pidfile = root / "qemu-nbd.pid"
        where = ["-b", "127.0.0.1", "-p", str(self.port)] if kind == "tcp" else ["-k", str(self.sock)]
        subprocess.run(["qemu-nbd", "-f", "raw", "-x", "vmd", "-t", "--fork", "--pid-file",
                        str(self.pidfile), *where, str(self.image)], check=True, timeout=60)
        _wait_for(lambda: self.pidfile.exists() and self.pidfile.read_text().strip() != "", 30,
                  "qemu-nbd")
        self.pid = int(self.pidfile.read_text())
        cleanup.push(f"qemu-nbd {root.name}", self.stop)

    @property
    def uri(self) -> str:
        if self.kind == "tcp":
            return f"nbd://127.0.0.1:{self.port}/vmd"
        return f"nbd+unix:///vmd?socket={self.sock}"

    def qemu_server(self) -> dict[str, Any]:
        if self.kind == "tcp":
            return {"type": "inet", "host": "127.0.0.1", "port": str(self.port)}
        return {"type": "unix", "path": str(self.sock)}

    def stop(self) -> None:
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


class NbdQsd(Qsd):
    """qemu-storage-daemon: quorum (vote-threshold 1) of a local raw file and
    an nbd child, FUSE export."""

    def __init__(self, root: Path, size: int, server: QemuNbd, cleanup: Cleanup):
        super().__init__(root, size, cleanup)
        self.server = server
        self.images = [root / "q-p0.img", server.image]

    def create(self) -> None:
        with open(self.images[0], "wb") as f:
            f.truncate(self.size)
        self.export.touch()

    def argv(self) -> list[str]:
        dev = lambda d: ["--blockdev", json.dumps(d)]  # noqa: E731
        return ["qemu-storage-daemon",
                *dev({"driver": "file", "node-name": "file0", "filename": str(self.images[0])}),
                *dev({"driver": "raw", "node-name": "raw0", "file": "file0"}),
                *dev({"driver": "nbd", "node-name": "nbd1", "export": "vmd",
                      "server": self.server.qemu_server()}),
                *dev({"driver": "quorum", "node-name": "quorum0", "vote-threshold": 1,
                      "children": ["raw0", "nbd1"]}),
                "--export", f"type=fuse,id=exp0,node-name=quorum0,mountpoint={self.export},"
                            f"writable=on"]


class NbdBench:
    def __init__(self, scratch: Path, cleanup: Cleanup, caches: Caches, *, size: int,
                 runtime: float, reps: int, vol_settings: dict[str, Any],
                 numjobs: tuple[int, ...] = NUMJOBS):
        self.root = scratch / "nbd"
        self.numjobs = numjobs
        self.cleanup, self.caches = cleanup, caches
        self.size, self.runtime, self.reps = size, runtime, reps
        self.vol_settings = vol_settings
        self.samples = Samples()
        self.raw: dict[str, Any] = {"size": size, "fio": self.samples.records}
        base = os.environ.get("BENCH_NBD_BASE")
        self.base = Path(base).resolve() if base else None
        self.targets = TARGETS + (tuple(f"base-{k}" for k in KINDS) if self.base else ())

    def run(self) -> None:
        size, root = self.size, self.root
        targets: dict[str, Target] = {}
        vmds: list[tuple[str, Vmd]] = []
        daemons: dict[str, Vmd | Qsd] = {}  # for their peak memory at the end
        for kind in KINDS:
            for tree in ("vmd", "base") if self.base else ("vmd",):
                name = f"{tree}-{kind}"
                srv = QemuNbd(root / f"srv-{name}", size, kind, self.cleanup)
                v = Vmd(root / name, {"vol0": {"size": size, **self.vol_settings,
                                               "plexes": ["vol0-p0.img", srv.uri]}},
                        self.cleanup)
                if tree == "base":
                    v.repo = self.base  # type: ignore[assignment]
                v.start()
                vmds.append((name, v))
                targets[name] = Target(name, v.file("vol0"), v.pid)
            q = NbdQsd(root / f"qsd-{kind}", size, QemuNbd(root / f"srv-qsd-{kind}", size, kind,
                                                          self.cleanup), self.cleanup)
            q.create()
            q.start()
            daemons[f"qsd-{kind}"] = q
            targets[f"qsd-{kind}"] = Target(f"qsd-{kind}", q.file, q.pid)
        local = Vmd(root / "vmd-local", {"vol0": {"size": size, **self.vol_settings}}, self.cleanup)
        local.start()
        vmds.append(("vmd-local", local))
        targets["vmd-local"] = Target("vmd-local", local.file("vol0"), local.pid)
        for name, v in vmds:
            v.request({"cmd": "wait", "volume": "vol0"}, timeout=None)  # the export's first copy
            states = [p["state"] for p in v.status("vol0")["plexes"]]
            if states != ["ACTIVE", "ACTIVE"]:
                raise BenchError(f"{name}: plexes are {states}, not both ACTIVE")
        for name, t in targets.items():
            self.caches.drop()
            r = run_fio(prefill_args(t.path, size), None, timeout=900)
            log(f"nbd: prefilled {name} at {r.bw_bytes / 1e6:.0f} MB/s")
        for rep in range(self.reps):
            for wl in WORKLOADS:
                for nj in self.numjobs:
                    for name in rotated(list(self.targets), rep):
                        self.caches.drop()
                        r = self.samples.fio((wl.key, nj), targets[name],
                                             fio_args(wl, nj, targets[name].path, size,
                                                      self.runtime), wl)
                        log(f"nbd rep {rep + 1}/{self.reps} {wl.label:<17} nj={nj} {name:<10} "
                            f"{fmt_val(r.value, wl.unit):>8} {wl.unit}")
        # Every daemon wrote each target's size about 5 times by now: a peak far
        # above the others' is memory kept per write (libnbd's nbd.Buffer kept
        # every write buffer: 1 MiB per 1 MiB written).
        self.raw["hwm_kib"] = {name: d.hwm_kib() for name, d in {**dict(vmds), **daemons}.items()}
        for name, v in vmds:
            remote = [p for p in v.status("vol0")["plexes"] if p.get("remote")]
            self.raw[f"{name}_remote_plex"] = remote
            if any(p["state"] != "ACTIVE" for p in remote):
                raise BenchError(f"{name}: the remote plex left during the run: {remote}")
            v.stop()

    def report(self) -> list[str]:
        s = self.samples
        md = ["## Remote plexes: vmd (local + qemu-nbd export) vs qemu-storage-daemon "
              "(quorum of a file and an nbd child)", "",
              "`bench/nbd.py`. Each target has its own images and qemu-nbd; unix = "
              "`nbd+unix://` socket, tcp = 127.0.0.1. vmd-local: vmd's 2-way local mirror. "
              f"Median of {self.reps} repetition(s), caches dropped before every job; "
              "CPU/req is the daemon's (not qemu-nbd's)."
              + (f" base-*: the vmd targets run from {self.base}." if self.base else ""), ""]
        ratios = [("vmd-unix", "qsd-unix"), ("vmd-tcp", "qsd-tcp"), ("vmd-unix", "vmd-local"),
                  ("vmd-tcp", "vmd-local"), ("qsd-unix", "vmd-local"), ("qsd-tcp", "vmd-local")]
        cpu = ["vmd-unix", "qsd-unix", "vmd-tcp", "qsd-tcp"]
        if self.base:
            ratios += [("vmd-unix", "base-unix"), ("vmd-tcp", "base-tcp")]
            cpu += ["base-unix", "base-tcp"]
        head = ["fio job", "nj", "unit", *self.targets, *(f"{a}/{b}" for a, b in ratios),
                *(f"{t} CPU/req" for t in cpu)]
        md += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for wl in WORKLOADS:
            for nj in self.numjobs:
                row = (wl.key, nj)
                cells = [wl.label, str(nj), wl.unit,
                         *(fmt_val(s.value(row, t), wl.unit) for t in self.targets),
                         *(fmt_ratio(s.ratio(row, wl.unit, a, b)) for a, b in ratios),
                         *(f"{s.cpu_us(row, t):.0f} µs" for t in cpu)]
                md.append("| " + " | ".join(cells) + " |")
        hwm = self.raw.get("hwm_kib") or {}
        md += ["", "Peak memory (VmHWM) of each daemon at the end: " + ", ".join(
            f"{name} {kib / 1024:.0f} MiB" for name, kib in hwm.items() if kib), ""]
        return md
