"""Loop devices, mounts and small helpers of the integration tests (conftest.py
re-exports them): `SysResources` (loop devices and mounts a test makes, all
released and checked at teardown), /proc/self/mountinfo, commands, file
hashes, the admin socket's raw protocol, and `wait_for`."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any



KiB = 1024
MiB = 1024 * KiB

REPO = Path(__file__).resolve().parent.parent
CMD_TIMEOUT = 60.0


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


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    return out


def processes_with_open(pid: int, path: str | os.PathLike[str]) -> int:
    """How many of a process and its children have `path` open."""
    want = os.path.realpath(path)
    n = 0
    for p in [pid, *_children(pid)]:
        try:
            fds = os.listdir(f"/proc/{p}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{p}/fd/{fd}") == want:
                    n += 1
                    break
            except OSError:
                pass
    return n


def where_stuck(pid: int) -> str:
    """Where a process and its children wait (their threads' wchan and
    kernel stack): for the message of a test whose subprocess did not end."""
    pids = [pid, *_children(pid)]
    out = []
    for p in pids:
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                base = f"/proc/{p}/task/{tid}"
                parts = []
                for name in ("wchan", "stack"):
                    try:
                        with open(f"{base}/{name}") as f:
                            parts.append(f.read().strip())
                    except OSError as e:
                        parts.append(f"({name}: {e.strerror})")
                out.append(f"pid {p} thread {tid}: " + " | ".join(parts))
        except OSError:
            out.append(f"pid {p}: gone")
    return "\n".join(out)


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
                        mountpoint: str | os.PathLike[str], *mkfs_opts: str) -> str:
        """A small ext4 filesystem of its own, loop-mounted at `mountpoint`."""
        with open(path, "wb") as f:
            f.truncate(size)
        run(["mkfs.ext4", "-q", "-F", "-m", "0", "-E", "nodiscard", *mkfs_opts, str(path)])
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


def enospc_or_efbig(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, errno.EFBIG)
