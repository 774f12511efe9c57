"""Benchmark targets as subprocesses: vmd daemons, qemu-storage-daemon, and the
cleanup that must happen however the run ends.

Nothing here knows about fio; run.py drives these objects.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
GiB = 1 << 30
SHIPPED_CONFIG = REPO / "config" / "vmd.yaml"


class BenchError(RuntimeError):
    pass


# -- cleanup -------------------------------------------------------------------


class Cleanup:
    """LIFO of cleanup callbacks; each runs once, errors are reported, not raised."""

    def __init__(self) -> None:
        self._items: list[tuple[str, Callable[[], None]]] = []

    def push(self, what: str, fn: Callable[[], None]) -> None:
        self._items.append((what, fn))

    def run(self) -> None:
        # Ignore further Ctrl-C while tearing down: a half-done cleanup is worse.
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            while self._items:
                what, fn = self._items.pop()
                try:
                    fn()
                except Exception as e:  # noqa: BLE001
                    print(f"bench: cleanup of {what} failed: {e}", file=sys.stderr)
        finally:
            signal.signal(signal.SIGINT, old)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def mounted(path: Path) -> bool:
    p = str(path)
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                mp = line.split()[4]
                mp = mp.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n") \
                       .replace("\\134", "\\")
                if mp == p:
                    return True
    except OSError:
        return os.path.ismount(p)
    return False


def lazy_umount(path: Path) -> None:
    for _ in range(5):
        if not mounted(path):
            return
        r = subprocess.run(["umount", "-l", str(path)], capture_output=True, text=True)
        if r.returncode != 0:
            subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True)
        time.sleep(0.1)
    if mounted(path):
        raise BenchError(f"cannot unmount {path.name}")


def stop_process(proc: subprocess.Popen[Any], timeout: float = 30.0) -> None:
    """SIGTERM, then SIGKILL after `timeout`; only this process, by its pid."""
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


def vm_hwm_kib(pid: int) -> int | None:
    """Peak resident set size (VmHWM) of a live process, KiB."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def tail(path: Path, n: int = 25) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:])


def _wait_for(cond: Callable[[], bool], timeout: float, what: str,
              alive: Callable[[], bool] | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if alive is not None and not alive():
            raise BenchError(f"{what}: the process exited\n{tail(log) if log else ''}")
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not ready after {timeout:.0f} s\n{tail(log) if log else ''}")
        time.sleep(0.02)


# -- vmd -----------------------------------------------------------------------


def _shipped_config() -> dict[str, Any]:
    try:
        import yaml

        return yaml.safe_load(SHIPPED_CONFIG.read_text()) or {}
    except Exception:  # noqa: BLE001
        return {}


def shipped_volume_settings() -> dict[str, Any]:
    """The volume keys (other than size and paths) of the shipped config/vmd.yaml,
    so the benchmark volume is 'defaults as shipped'."""
    vols = _shipped_config().get("volumes") or {}
    first = next(iter(vols.values()), {}) if vols else {}
    return {k: v for k, v in (first or {}).items() if k not in ("size", "plexes", "log")}


# Top-level keys of the shipped config that change how volumes perform; the
# others (resync.rate_limit, clean_delay, paths) are left at vmd's defaults.
SHIPPED_TOP_KEYS = ("writeback_cache",)


def shipped_top_settings() -> dict[str, Any]:
    raw = _shipped_config()
    return {k: raw[k] for k in SHIPPED_TOP_KEYS if k in raw}


class Vmd:
    """One vmd daemon with its own config, mountpoint, socket and plex images,
    all inside `root` (a directory of the scratch area)."""

    def __init__(self, root: Path, volumes: dict[str, dict[str, Any]], cleanup: Cleanup,
                 clean_delay: float | None = None, top: dict[str, Any] | None = None):
        """`top`: top-level config keys; default: those of the shipped config
        that change performance (`shipped_top_settings`)."""
        self.root = root
        self.volumes = volumes
        self.cleanup = cleanup
        self.cfg = root / "vmd.yaml"
        self.mnt = root / "mnt"
        self.sock = root / "vmd.sock"
        self.log = root / "daemon.log"
        self.proc: subprocess.Popen[Any] | None = None
        self._logf: Any = None
        self.repo = REPO  # the tree whose vmd runs (nbd.py's BENCH_NBD_BASE: another one)
        root.mkdir(parents=True, exist_ok=True)
        lines = ["# written by bench/run.py", "mountpoint: mnt", "socket: vmd.sock"]
        if clean_delay is not None:
            lines.append(f"clean_delay: {clean_delay}")
        top = shipped_top_settings() if top is None else top
        lines += [f"{k}: {json.dumps(v)}" for k, v in top.items()]
        lines.append("volumes:")
        for name, v in volumes.items():
            lines.append(f"  {name}:")
            lines.append(f"    size: {v['size']}")
            if "columns" not in v:  # a RAID-5 volume lists its own images
                # Two local images unless the volume lists its plexes (nbd.py: an export).
                plexes = v.get("plexes") or [f"{name}-p0.img", f"{name}-p1.img"]
                lines.append(f"    plexes: {json.dumps(plexes)}")
            lines.append(f"    log: {name}.log")
            for k, val in v.items():
                if k not in ("size", "plexes"):
                    lines.append(f"    {k}: {json.dumps(val)}")
        self.cfg.write_text("\n".join(lines) + "\n")
        cleanup.push(f"vmd in {root.name}", self.kill_and_unmount)

    def plex(self, vol: str, i: int) -> Path:
        return self.root / f"{vol}-p{i}.img"

    def file(self, vol: str) -> Path:
        return self.mnt / vol

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, recover_all: tuple[str, ...] = (), timeout: float = 120.0,
              env: dict[str, str] | None = None) -> float:
        """Start the daemon (with `env` added to this process's environment);
        return seconds until it answers status and the volume files are visible
        in the mount."""
        if self.proc is not None and self.proc.poll() is None:
            raise BenchError("vmd already running")
        args = [sys.executable, "-m", "vmd", "daemon", "-c", str(self.cfg)]
        for v in recover_all:
            args += ["--recover-all", v]
        self._logf = open(self.log, "ab")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(args, cwd=self.repo, stdout=self._logf,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env={**os.environ, **(env or {})}, start_new_session=True)

        def ready() -> bool:
            if not self.sock.exists() or not mounted(self.mnt):
                return False
            try:
                self.request({"cmd": "status"}, timeout=5)
            except (OSError, BenchError):
                return False
            return all(self.file(v).exists() for v in self.volumes)

        _wait_for(ready, timeout, "vmd daemon", alive=lambda: self.proc.poll() is None,
                  log=self.log)
        return time.monotonic() - t0

    def request(self, req: dict[str, Any], timeout: float | None = 30.0) -> dict[str, Any]:
        """One admin-socket request (the protocol of vmd/admin.py), progress skipped."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.sock))
            s.sendall(json.dumps(req).encode() + b"\n")
            f = s.makefile("rb")
            while True:
                line = f.readline()
                if not line:
                    raise BenchError(f"vmd closed the admin connection on {req['cmd']}")
                msg = json.loads(line)
                if "progress" in msg:
                    continue
                if not msg.get("ok"):
                    raise BenchError(f"vmd {req['cmd']}: {msg.get('error')}")
                return msg

    def cli(self, *args: str, timeout: float = 900.0) -> str:
        """The `vmd` command against this daemon."""
        r = subprocess.run([sys.executable, "-m", "vmd", "-c", str(self.cfg), *args], cwd=REPO,
                           capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise BenchError(f"vmd {' '.join(args)} failed ({r.returncode}): "
                             f"{r.stderr.strip() or r.stdout.strip()}")
        return r.stdout

    def status(self, vol: str) -> dict[str, Any]:
        return json.loads(self.cli("status", "--json", vol))["volumes"][0]

    def hwm_kib(self) -> int | None:
        return vm_hwm_kib(self.pid) if self.proc is not None and self.proc.poll() is None else None

    def stop(self) -> None:
        """Clean stop through `vmd stop`, then make sure the mount is gone."""
        if self.proc is None or self.proc.poll() is not None:
            self.kill_and_unmount()
            return
        try:
            self.cli("stop", timeout=120)
            self.proc.wait(timeout=60)
        except (BenchError, subprocess.TimeoutExpired) as e:
            print(f"bench: vmd stop did not work ({e}); terminating", file=sys.stderr)
        self.kill_and_unmount()

    def sigkill(self) -> None:
        """Crash: SIGKILL the daemon, then drop its dead mount."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=30)
        lazy_umount(self.mnt)

    def kill_and_unmount(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        lazy_umount(self.mnt)
        if self._logf is not None:
            self._logf.close()
            self._logf = None


# -- qemu-storage-daemon ---------------------------------------------------------


def quorum_blockdevs(images: list[Path], node: str = "quorum0") -> list[str]:
    """--blockdev arguments: a file+raw pair per image, a quorum node over the
    raw nodes with vote-threshold=1 (a write goes to every child; a read is
    satisfied by one). Cache and AIO options are qemu's defaults (page cache,
    thread pool), as a user would start it."""
    args: list[str] = []
    children = []
    for i, img in enumerate(images):
        args += ["--blockdev", json.dumps({"driver": "file", "node-name": f"file{i}",
                                          "filename": str(img)})]
        args += ["--blockdev", json.dumps({"driver": "raw", "node-name": f"raw{i}",
                                          "file": f"file{i}"})]
        children.append(f"raw{i}")
    args += ["--blockdev", json.dumps({"driver": "quorum", "node-name": node,
                                      "vote-threshold": 1, "children": children})]
    return args


class Qsd:
    def __init__(self, root: Path, size: int, cleanup: Cleanup):
        self.root = root
        self.size = size
        root.mkdir(parents=True, exist_ok=True)
        self.images = [root / "q-p0.img", root / "q-p1.img"]
        self.export = root / "export.img"  # the FUSE export's mountpoint: a regular file
        self.log = root / "qsd.log"
        self.proc: subprocess.Popen[Any] | None = None
        self._logf: Any = None
        cleanup.push("qemu-storage-daemon", self.stop)

    def create(self) -> None:
        for img in self.images:
            with open(img, "wb") as f:
                f.truncate(self.size)
        self.export.touch()

    @property
    def file(self) -> Path:
        return self.export

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def argv(self) -> list[str]:
        return ["qemu-storage-daemon", *quorum_blockdevs(self.images),
                "--export", f"type=fuse,id=exp0,node-name=quorum0,"
                            f"mountpoint={self.export},writable=on"]

    def start(self, timeout: float = 30.0) -> None:
        self._logf = open(self.log, "ab")
        self.proc = subprocess.Popen(self.argv(), cwd=self.root, stdout=self._logf,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        _wait_for(lambda: mounted(self.export) and os.path.getsize(self.export) == self.size,
                  timeout, "qemu-storage-daemon", alive=lambda: self.proc.poll() is None,
                  log=self.log)

    def hwm_kib(self) -> int | None:
        return vm_hwm_kib(self.pid) if self.proc is not None and self.proc.poll() is None else None

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        lazy_umount(self.export)
        if self._logf is not None:
            self._logf.close()
            self._logf = None
