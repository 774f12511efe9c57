"""Fixtures for integration tests: a real `vmd daemon` in a subprocess on a
real FUSE mount, loop devices, ext4 and tmpfs mounts — all torn down, always.

Reusable pieces (crash tests build on them):

* `SysResources` (fixture `sysres`): loop devices and mounts a test makes;
  teardown lazily unmounts and detaches them and checks that nothing is left
  in /proc/mounts or `losetup -a`.
* `VmdDaemon`: writes a YAML config into a directory, starts/stops/kills/
  restarts the daemon, runs the CLI against it, reads `status --json`.
* `vmd_factory(**kw)` makes (unstarted) daemons; `vmd` is one started daemon
  with volume vol0 (64 MiB, two plexes).
* The autouse log check fails a test whose daemon wrote an unexpected
  WARNING/ERROR/CRITICAL line or a traceback to stderr. Declare expected
  ones with `@pytest.mark.allow_log(r"regex", ...)` or, at run time, the
  `allow_log` fixture: `allow_log(r"regex")`.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from vmd.errors import EXIT_CONFIG, EXIT_NO_DAEMON  # noqa: F401  (tests import them from here)

KiB = 1024
MiB = 1024 * KiB

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 20.0
CMD_TIMEOUT = 60.0


# -- facilities and markers ---------------------------------------------------

def missing_mount_facility() -> str | None:
    """Why mount tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "mount tests need root"
    if not os.path.exists("/dev/fuse"):
        return "mount tests need /dev/fuse"
    if shutil.which("losetup") is None:
        return "mount tests need losetup (util-linux)"
    if shutil.which("fusermount3") is None and shutil.which("umount") is None:
        return "mount tests need fusermount3 or umount"
    return None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "allow_log(*regexes): daemon stderr lines (WARNING/ERROR) a test expects")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("mount") is not None:
        why = missing_mount_facility()
        if why:
            pytest.skip(why)


# -- small helpers --------------------------------------------------------------

def run(cmd: list[str], *, check: bool = True, timeout: float = CMD_TIMEOUT,
        **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a command, capture text output; on failure say what it printed."""
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {p.returncode}\n"
                             f"stdout: {p.stdout}\nstderr: {p.stderr}")
    return p


def _unescape_mountinfo(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def mountinfo() -> list[tuple[str, str, str]]:
    """(mount point, fs type, major:minor) of every mount this process sees."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            out.append((_unescape_mountinfo(fields[4]), fields[sep + 1], fields[2]))
    return out


def is_mounted(path: str | os.PathLike[str], fstype: str | None = None) -> bool:
    """Is `path` a mount point (of type `fstype`, e.g. "fuse.vmd", if given)?"""
    p = os.path.abspath(path)
    return any(m[0] == p and (fstype is None or m[1] == fstype) for m in mountinfo())


def mounts_under(path: str | os.PathLike[str]) -> list[str]:
    p = os.path.abspath(path)
    return [m[0] for m in mountinfo() if m[0] == p or m[0].startswith(p + "/")]


def loop_devices() -> dict[str, str]:
    """{device: backing file} from `losetup -a` style listing (JSON)."""
    p = run(["losetup", "--list", "--json", "-O", "NAME,BACK-FILE"], check=False)
    if p.returncode != 0 or not p.stdout.strip():
        return {}
    return {d["name"]: (d.get("back-file") or "") for d in json.loads(p.stdout)["loopdevices"]}


def pwrite_file(path: str | os.PathLike[str], writes: list[tuple[int, bytes]]) -> None:
    """os.pwrite each (offset, data) into path, then fsync."""
    fd = os.open(path, os.O_RDWR)
    try:
        for off, data in writes:
            assert os.pwrite(fd, data, off) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def sha(path: str | os.PathLike[str]) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def admin_raw(sock: str | os.PathLike[str], payload: bytes, *, timeout: float = 10.0,
              replies: int = 1) -> list[dict[str, Any]]:
    """Send raw bytes to an admin socket, read `replies` JSON lines (fewer if the
    daemon closes the connection)."""
    out: list[dict[str, Any]] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(sock))
        s.sendall(payload)
        f = s.makefile("rb")
        while len(out) < replies:
            line = f.readline()
            if not line:
                break
            msg = json.loads(line)
            if "progress" in msg:
                continue
            out.append(msg)
    return out


def admin_request(sock: str | os.PathLike[str], req: dict[str, Any], **kw: Any) -> dict[str, Any]:
    replies = admin_raw(sock, json.dumps(req).encode() + b"\n", **kw)
    assert replies, f"no reply to {req}"
    return replies[0]


def wait_for(cond: Callable[[], Any], timeout: float = 30.0, what: str = "the condition") -> Any:
    """Poll cond() until it returns something true, and return that; fail the test
    naming `what` if it has not within `timeout` s (a bound on a wait for an event,
    generous for a busy machine, never a guess at how long something takes)."""
    deadline = time.monotonic() + timeout
    while not (v := cond()):
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.05)
    return v


# -- system resources: loop devices and mounts ----------------------------------

class SysResources:
    """Loop devices and (non-FUSE) mounts a test made. `release()` lazily
    unmounts and detaches them (idempotent); `verify_released()` checks that
    nothing is left, retrying detaches that were busy."""

    def __init__(self) -> None:
        self.loops: dict[str, str] = {}  # device -> backing file we attached
        self.mounts: list[str] = []
        self.dirs: list[str] = []
        self.on_hang: Callable[[], None] | None = None  # e.g. kill daemons

    # loop devices
    def losetup(self, path: str | os.PathLike[str], *extra: str) -> str:
        back = os.path.abspath(path)
        dev = run(["losetup", "-f", "--show", *extra, back]).stdout.strip()
        assert dev.startswith("/dev/loop"), dev
        self.loops[dev] = back
        return dev

    def _ours(self, dev: str) -> bool:
        """Still attached to the file we attached (not reused by someone else)?"""
        back = loop_devices().get(dev)
        if not back:
            return False
        back = back.removesuffix(" (deleted)")
        mine = self.loops[dev]
        # After a lazy unmount of the FUSE mount under it, the kernel names the
        # backing file relative to the detached mount ("/vol0").
        return back == mine or (back.startswith("/") and mine.endswith(back))

    def detach_loop(self, dev: str) -> None:
        run(["losetup", "-d", dev])
        self.loops.pop(dev, None)

    # mounts
    def mount(self, source: str, target: str | os.PathLike[str], *opts: str) -> str:
        target = os.path.abspath(target)
        os.makedirs(target, exist_ok=True)
        run(["mount", *opts, source, target])
        self.mounts.append(target)
        return target

    def umount(self, target: str | os.PathLike[str]) -> None:
        target = os.path.abspath(target)
        run(["umount", target])
        if target in self.mounts:
            self.mounts.remove(target)

    def mount_ro_tmpfs(self, target: str | os.PathLike[str]) -> str:
        """A read-only directory even for root (os.access() lies to root)."""
        return self.mount("tmpfs", target, "-t", "tmpfs", "-o", "ro,size=1m")

    def make_ext4_image(self, path: str | os.PathLike[str], size: int,
                        mountpoint: str | os.PathLike[str]) -> str:
        """A small ext4 filesystem of its own, loop-mounted at `mountpoint`."""
        with open(path, "wb") as f:
            f.truncate(size)
        run(["mkfs.ext4", "-q", "-F", "-m", "0", "-E", "nodiscard", str(path)])
        dev = self.losetup(path)
        self.mount(dev, mountpoint)
        return dev

    def world_dir(self) -> Path:
        """A short, world-traversable temporary directory (removed at teardown)."""
        d = tempfile.mkdtemp(prefix="vmdt-", dir="/tmp")
        os.chmod(d, 0o755)
        self.dirs.append(d)
        return Path(d)

    def _run_or_hang(self, cmd: list[str]) -> None:
        try:
            run(cmd, check=False, timeout=20)
        except subprocess.TimeoutExpired:
            if self.on_hang:
                self.on_hang()
            run(cmd, check=False, timeout=20)

    def release(self) -> None:
        for target in reversed(self.mounts):
            if is_mounted(target):
                self._run_or_hang(["umount", "-l", target])
        self.mounts.clear()
        for dev in reversed(list(self.loops)):
            if self._ours(dev):
                self._run_or_hang(["losetup", "-d", dev])
            if not self._ours(dev):
                del self.loops[dev]

    def verify_released(self) -> list[str]:
        """Problems left behind (empty if none). Busy loop devices get
        autoclear from `losetup -d`; wait for them to go."""
        deadline = time.monotonic() + 10
        while True:
            left = [d for d in self.loops if self._ours(d)]
            if not left or time.monotonic() > deadline:
                break
            for d in left:
                run(["losetup", "-d", d], check=False, timeout=20)
            time.sleep(0.2)
        problems = [f"loop device {d} still attached" for d in left]
        self.loops.clear()
        for d in self.dirs:
            for m in mounts_under(d):
                run(["umount", "-l", m], check=False)
                problems.append(f"{m} still mounted")
            shutil.rmtree(d, ignore_errors=True)
        self.dirs.clear()
        return problems


# -- the daemon ------------------------------------------------------------------

def volume_spec(name: str = "vol0", *, size: str | int = "64MiB", nplex: int = 2,
                **kw: Any) -> dict[str, Any]:
    """One volume's config mapping, plex and log paths relative to the config."""
    spec: dict[str, Any] = {"size": size,
                            "plexes": [f"{name}-p{i}.img" for i in range(nplex)],
                            "log": f"{name}.log"}
    spec.update(kw)
    return spec


class VmdDaemon:
    """One vmd daemon and its config, in directory `base`.

    `config` is the dict written as YAML (edit it, then `write_config()`);
    relative paths in it are relative to `base`. Nothing runs until `start()`.
    """

    def __init__(self, base: Path, *, volumes: dict[str, dict[str, Any]] | None = None,
                 mountpoint: str = "mnt", socket_path: str | None = None,
                 rate_limit: int | str | None = None, clean_delay: float | None = None,
                 extra: dict[str, Any] | None = None, env: dict[str, str] | None = None,
                 daemon_args: tuple[str, ...] = (), res: SysResources | None = None):
        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        self.config_path = self.base / "vmd.yaml"
        if socket_path is None:
            socket_path = "vmd.sock"
            if len(str(self.base / socket_path)) > 100:  # sun_path is 108 bytes
                socket_path = str(Path(tempfile.mkdtemp(prefix="vmds-", dir="/tmp")) / "vmd.sock")
        cfg: dict[str, Any] = {"mountpoint": mountpoint, "socket": socket_path,
                               "volumes": volumes if volumes is not None else
                               {"vol0": volume_spec("vol0")}}
        if rate_limit is not None:
            cfg["resync"] = {"rate_limit": rate_limit}
        if clean_delay is not None:
            cfg["clean_delay"] = clean_delay
        cfg.update(extra or {})
        self.config: dict[str, Any] = cfg
        self.env = dict(env or {})
        self.daemon_args = tuple(daemon_args)
        self.res = res or SysResources()
        self.proc: subprocess.Popen[bytes] | None = None
        self.stderr_path = self.base / "daemon.stderr"
        self._log_start = 0  # offset in stderr_path where the current run began
        self.starts = 0
        self.write_config()

    # paths
    def path(self, p: str | os.PathLike[str]) -> Path:
        p = Path(p)
        return p if p.is_absolute() else Path(os.path.normpath(self.base / p))

    @property
    def mountpoint(self) -> Path:
        return self.path(self.config.get("mountpoint", "mnt"))

    @property
    def socket(self) -> Path:
        return self.path(self.config.get("socket", "vmd.sock"))

    def volume_file(self, volume: str = "vol0") -> Path:
        return self.mountpoint / volume

    def plex_paths(self, volume: str = "vol0") -> list[Path]:
        return [self.path(p) for p in self.config["volumes"][volume]["plexes"]]

    def log_path(self, volume: str = "vol0") -> Path:
        return self.path(self.config["volumes"][volume]["log"])

    def volume_size(self, volume: str = "vol0") -> int:
        from vmd.config import parse_size

        return parse_size(self.config["volumes"][volume]["size"])

    def write_config(self, text: str | None = None) -> None:
        self.config_path.write_text(text if text is not None else
                                    yaml.safe_dump(self.config, sort_keys=False))

    def set_rate_limit(self, rate: int | str | None) -> None:
        """Set (None: remove) `resync: rate_limit:` in the config; it applies
        from the next start. Tests slow a resync this way to catch it midway,
        then lift the limit on a restart instead of waiting for it."""
        if rate is None:
            self.config.pop("resync", None)
        else:
            self.config["resync"] = {"rate_limit": rate}
        self.write_config()

    def logged_state(self, volume: str = "vol0") -> Any:
        """The volume state (a `vmd.sidecar.VolumeState`) its sidecar log holds
        now: what a restart after a SIGKILL at this moment would replay. Safe
        while the daemon runs (compaction renames a new file into place)."""
        from vmd.sidecar import read_log

        return read_log(self.log_path(volume))[0].state

    # process
    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _popen(self) -> subprocess.Popen[bytes]:
        env = {**os.environ, **self.env}
        env.pop("NOTIFY_SOCKET", None)
        env.pop("JOURNAL_STREAM", None)
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.stderr_path, "ab") as err:
            self._log_start = err.tell()
            return subprocess.Popen(
                [sys.executable, "-m", "vmd", "daemon", "-c", str(self.config_path),
                 *self.daemon_args],
                cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=err, stderr=err)

    def start(self) -> "VmdDaemon":
        assert not self.running, "daemon already running"
        self.proc = self._popen()
        self.starts += 1
        deadline = time.monotonic() + START_TIMEOUT
        mp = str(self.mountpoint)
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise AssertionError(f"vmd daemon exited with {rc} before it was ready; "
                                     f"stderr:\n{self.stderr()}")
            if is_mounted(mp) and self._status_ok():
                return self
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"vmd daemon not ready after {START_TIMEOUT} s "
                                     f"(mounted: {is_mounted(mp)}); stderr:\n{self.stderr()}")
            time.sleep(0.05)

    def _status_ok(self) -> bool:
        try:
            return bool(admin_request(self.socket, {"cmd": "status"}, timeout=5).get("ok"))
        except (OSError, ValueError):
            return False

    def run_foreground(self, timeout: float = START_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """Run `vmd daemon` expecting it to exit by itself (bad config cases).
        If it starts serving instead, it is killed and the test fails."""
        assert not self.running
        self.proc = self._popen()
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"vmd daemon did not exit within {timeout} s; "
                                 f"stderr:\n{self.stderr()}") from None
        return subprocess.CompletedProcess(self.proc.args, rc, "", self.stderr())

    def stderr(self, whole: bool = False) -> str:
        """The daemon's stderr, of the current (or last) run unless `whole`."""
        try:
            data = self.stderr_path.read_bytes()
        except FileNotFoundError:
            return ""
        return data[0 if whole else self._log_start:].decode(errors="replace")

    def cli(self, *args: str, check: bool = True, timeout: float = CMD_TIMEOUT,
            config: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "vmd"]
        if config:
            cmd += ["-c", str(self.config_path)]
        cmd += list(args)
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                           stdin=subprocess.DEVNULL)
        if check and p.returncode != 0:
            raise AssertionError(f"vmd {' '.join(args)} exited {p.returncode}\n"
                                 f"stdout: {p.stdout}\nstderr: {p.stderr}\n"
                                 f"daemon stderr:\n{self.stderr()}")
        return p

    def status(self, volume: str | None = None) -> dict[str, Any]:
        """`vmd status --json`; with `volume`, that volume's object."""
        p = self.cli("status", *([volume] if volume else []), "--json")
        st = json.loads(p.stdout)
        if volume is None:
            return st
        (v,) = [v for v in st["volumes"] if v["name"] == volume]
        return v

    def plex_states(self, volume: str = "vol0") -> dict[str, str]:
        return {p["name"]: p["state"] for p in self.status(volume)["plexes"]}

    def request(self, req: dict[str, Any], **kw: Any) -> dict[str, Any]:
        return admin_request(self.socket, req, **kw)

    def wait_resync(self, volume: str = "vol0", timeout: float = 120.0) -> dict[str, Any]:
        """`vmd wait VOLUME`, then the volume's status (no plex SYNCING)."""
        self.cli("wait", volume, timeout=timeout)
        st = self.status(volume)
        assert not st["resync"]["running"], st
        assert all(p["state"] != "SYNCING" for p in st["plexes"]), st
        return st

    def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"vmd daemon still running after {timeout} s; "
                                 f"stderr:\n{self.stderr()}") from None

    def stop(self, force: bool = False, timeout: float = 30.0) -> None:
        """`vmd stop`; the daemon exits 0 and the mount is gone."""
        self.cli("stop", *(["--force"] if force else []), timeout=timeout)
        rc = self.wait_exit(timeout)
        assert rc == 0, f"daemon exited {rc} after stop; stderr:\n{self.stderr()}"
        assert not is_mounted(self.mountpoint), f"{self.mountpoint} still mounted after stop"

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def kill(self) -> None:
        """SIGKILL the daemon (a crash) and lazily unmount its dead mount."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.lazy_unmount()

    def lazy_unmount(self) -> None:
        mp = str(self.mountpoint)
        if is_mounted(mp):
            if shutil.which("fusermount3"):
                run(["fusermount3", "-u", "-z", mp], check=False, timeout=20)
            if is_mounted(mp):
                run(["umount", "-l", mp], check=False, timeout=20)

    def restart(self, *, kill: bool = False) -> "VmdDaemon":
        if self.running:
            if kill:
                self.kill()
            else:
                self.stop()
        return self.start()

    # loop devices and mounts on the volume file (tracked for teardown)
    def losetup(self, volume: str = "vol0") -> str:
        return self.res.losetup(self.volume_file(volume))

    def cleanup(self) -> None:
        """Teardown: kill the daemon and remove its mount (the caller releases
        loop devices and mounts on top of it first)."""
        self.kill()
        sock = self.socket
        if sock.parent.name.startswith("vmds-"):
            shutil.rmtree(sock.parent, ignore_errors=True)


# -- stderr check -------------------------------------------------------------------

_BAD_LINE = re.compile(r"^\S+ \S+ (WARNING|ERROR|CRITICAL) |^<[0-4]>|Traceback \(most recent")


def unexpected_log_lines(text: str, allowed: list[str]) -> list[str]:
    pats = [re.compile(a) for a in allowed]
    return [line for line in text.splitlines()
            if _BAD_LINE.search(line) and not any(p.search(line) for p in pats)]


@pytest.fixture
def allow_log(request: pytest.FixtureRequest) -> Callable[..., None]:
    """Call with regexes of daemon stderr lines this test expects."""
    allowed: list[str] = request.node.stash.setdefault(_ALLOWED, [])

    def add(*regexes: str) -> None:
        allowed.extend(regexes)

    return add


_DAEMONS = pytest.StashKey[list[VmdDaemon]]()
_ALLOWED = pytest.StashKey[list[str]]()


@pytest.fixture(autouse=True)
def _daemon_log_check(request: pytest.FixtureRequest) -> Iterator[None]:
    """After the test (and after its daemons stopped), fail on unexpected
    WARNING/ERROR lines in any daemon's stderr."""
    daemons: list[VmdDaemon] = request.node.stash.setdefault(_DAEMONS, [])
    allowed: list[str] = request.node.stash.setdefault(_ALLOWED, [])
    yield
    for m in request.node.iter_markers("allow_log"):
        allowed.extend(m.args)
    bad = []
    for d in daemons:
        for line in unexpected_log_lines(d.stderr(whole=True), allowed):
            bad.append(f"{d.base}: {line}")
    if bad:
        pytest.fail("unexpected WARNING/ERROR lines in daemon stderr (declare expected ones "
                    "with @pytest.mark.allow_log):\n" + "\n".join(bad), pytrace=False)


# -- fixtures ----------------------------------------------------------------------

@pytest.fixture
def sysres() -> Iterator[SysResources]:
    res = SysResources()
    yield res
    res.release()
    problems = res.verify_released()
    assert not problems, problems


@pytest.fixture
def vmd_factory(request: pytest.FixtureRequest, tmp_path: Path,
                sysres: SysResources) -> Iterator[Callable[..., VmdDaemon]]:
    """make(subdir="d0", **VmdDaemon kwargs) → an unstarted VmdDaemon."""
    daemons: list[VmdDaemon] = request.node.stash.setdefault(_DAEMONS, [])
    mine: list[VmdDaemon] = []

    def kill_all() -> None:
        for d in mine:
            if d.proc is not None and d.proc.poll() is None:
                d.proc.kill()

    sysres.on_hang = kill_all

    def make(subdir: str | None = None, **kw: Any) -> VmdDaemon:
        d = VmdDaemon(tmp_path / (subdir or f"d{len(mine)}"), res=sysres, **kw)
        mine.append(d)
        daemons.append(d)
        return d

    yield make
    sysres.release()  # ext4 mounts and loop devices sit on top of the volume files
    for d in mine:
        d.cleanup()
    left = [str(d.mountpoint) for d in mine if is_mounted(d.mountpoint)]
    assert not left, f"FUSE mounts left behind: {left}"


@pytest.fixture
def vmd(vmd_factory: Callable[..., VmdDaemon]) -> VmdDaemon:
    """A running daemon: vol0, 64 MiB, plexes vol0-p0.img and vol0-p1.img."""
    return vmd_factory().start()


def enospc_or_efbig(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, errno.EFBIG)
