"""One daemon per volume: exclusive locks on the files a volume lives in, the
admin socket's owner, and the dead FUSE mount a crashed daemon leaves behind.

Two daemons that serve the same plexes write them independently, so the
mirrors drift apart while each daemon's log says "in sync": the worst kind of
loss, silent. Every sidecar log and plex image is therefore held with
`flock(LOCK_EX | LOCK_NB)` for as long as it is open.

Why flock and not an OFD (`F_OFD_SETLK`) or POSIX lock: all three end when the
holder dies (SIGKILL included), and flock and OFD locks both belong to the
open file description, so a second open in the same process conflicts too
(POSIX locks would not). flock wins because `/proc/locks` names the PID that
took it, and the refusal can say who holds the file; OFD locks report PID -1.
Neither kind conflicts with QEMU's byte-range image locks: vmd only refuses
another vmd. flock is advisory: `dd` onto a plex is not stopped, and never was.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import hashlib
import os
import re
import shutil
import socket
import stat
import struct
import subprocess
import threading
from pathlib import Path

from .errors import EXIT_CONFIG, ConfigError, VmdError

log = logging.getLogger(__name__)

# How long a live mount may take to answer statfs() before we call it hung.
MOUNT_PROBE_SECONDS = 5.0


class InUseError(VmdError):
    """A file or socket of ours is held by another process (another daemon)."""

    exit_code = EXIT_CONFIG  # at start, like a config error: nothing was mounted

    def __init__(self, message: str, holder: str = "another process"):
        super().__init__(message)
        self.holder = holder  # "vmd (PID 1234)"


def _holder(st: os.stat_result) -> str:
    """'vmd process 1234' for the flock holder of the file `st`, from /proc/locks."""
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()
                # "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF" ("->" marks waiters)
                if fields[1] == "FLOCK" and fields[5] == want:
                    return _describe_pid(int(fields[4]))
    except (OSError, ValueError, IndexError):
        pass
    return "another process"


def _describe_pid(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return f"process {pid}"
    name = "vmd" if any(a in (b"vmd", b"-m") or a.endswith(b"/vmd") for a in argv) else \
        os.path.basename(argv[0].decode(errors="replace")) or "process"
    return f"{name} (PID {pid})"


# Locks this process holds: inode → [a dup of the locked fd, users]. A daemon
# may open one image twice (a snapshot's image becomes the origin's plex again
# at snap back); the engine decides whether that is right, the lock only keeps
# other processes out. The dup keeps the lock when the first opener closes.
_held: dict[tuple[int, int], list[int]] = {}
_held_lock = threading.Lock()  # sidecar checkpoints lock their new file in a worker thread


def lock_exclusive(fd: int, path: str | os.PathLike[str], what: str) -> None:
    """Hold the exclusive flock of an open file until release(fd), or raise
    InUseError naming the process that holds it."""
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino)
    with _held_lock:
        if key in _held:
            _held[key][1] += 1
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(st)
            raise InUseError(f"{what} {path} is in use by {holder}; vmd serves a volume "
                             f"from one daemon only (is another vmd configured with it?)",
                             holder) from None
        _held[key] = [os.dup(fd), 1]


def release(fd: int) -> None:
    """Give up this user's hold of the lock taken by lock_exclusive (call before closing fd)."""
    st = os.fstat(fd)
    with _held_lock:
        entry = _held.get((st.st_dev, st.st_ino))
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _held[(st.st_dev, st.st_ino)]
            fcntl.flock(entry[0], fcntl.LOCK_UN)  # the fd the caller closes shares the lock
            os.close(entry[0])


def close_locked(fd: int) -> None:
    release(fd)
    os.close(fd)


def open_locked(path: Path, flags: int, what: str, mode: int = 0o600) -> int:
    """Open `path` and hold its exclusive lock. Safe against a concurrent
    rename over `path` (the sidecar log is replaced that way at each
    checkpoint): after locking, the name must still lead to the locked inode."""
    while True:
        fd = os.open(path, flags, mode)
        try:
            lock_exclusive(fd, path, what)
        except BaseException:
            os.close(fd)
            raise
        try:
            st, now = os.fstat(fd), os.stat(path)
            if (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino):
                return fd
        except FileNotFoundError:
            pass  # renamed away between our open and stat: the new file is the one
        close_locked(fd)


# -- the admin socket -------------------------------------------------------------------

def socket_owner(path: Path) -> str | None:
    """Who listens on the Unix socket `path`: None if nobody (a stale socket or none)."""
    if not path.is_socket():
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        try:
            s.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return None  # the listener is gone (or so is the socket): stale
        except OSError as e:
            # EAGAIN (a full backlog), a timeout...: someone may well be listening.
            return f"a process that does not accept connections ({e.strerror or e})"
        creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid = struct.unpack("3i", creds)[0]
    return _describe_pid(pid) if pid > 0 else "another process"


SUN_PATH_MAX = 107  # bytes of a Unix socket's path (sun_path, without its NUL)


def check_socket_path(path: Path, key: str) -> None:
    """Refuse, before anything is mounted, a socket path vmd cannot bind."""
    n = len(os.fsencode(str(path)))
    if n > SUN_PATH_MAX:
        raise ConfigError(f"{key}: {path} is {n} bytes long; a Unix socket's path can be at "
                          f"most {SUN_PATH_MAX} (choose a shorter one, e.g. under /run)")
    if os.path.lexists(path) and not path.is_socket():
        raise ConfigError(f"{key}: {path} exists and is not a socket; vmd will not remove it")


def check_socket_free(path: Path, key: str) -> None:
    owner = socket_owner(path)
    if owner is not None:
        raise InUseError(f"{key}: admin socket {path} is in use by {owner} (another vmd running "
                         f"with this socket?)")


# -- the mountpoint ---------------------------------------------------------------------

_OCTAL_ESCAPE = re.compile(rb"\\([0-7]{3})")


def _mount_at(path: Path) -> tuple[str, str] | None:
    """(fstype, source) of the mount at `path`, the topmost one, or None."""
    # mountinfo shows resolved paths, with space, tab, newline and backslash
    # as octal escapes. Resolve the parent only: resolving a dead mount itself
    # would ask the dead connection.
    want = os.fsencode(os.path.join(os.path.realpath(path.parent), path.name))
    found = None
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            for line in f:
                pre, _, post = line.partition(b" - ")
                where = _OCTAL_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), pre.split()[4])
                if where == want:
                    fstype, source = post.split()[:2]
                    found = (os.fsdecode(fstype), os.fsdecode(source))
    except OSError:
        return ("unknown", "unknown") if os.path.ismount(path) else None
    return found


def _probe(path: Path) -> int | None:
    """statfs() the mount in a thread: 0 if it answers, an errno if it fails,
    None if it does not answer in time (a live daemon that hangs). Not stat():
    the kernel answers that from its attribute cache without asking the daemon."""
    result: list[int] = []

    def run() -> None:
        try:
            os.statvfs(path)
            result.append(0)
        except OSError as e:
            result.append(e.errno or errno.EIO)

    t = threading.Thread(target=run, daemon=True, name="mount-probe")
    t.start()
    t.join(MOUNT_PROBE_SECONDS)
    return result[0] if result else None


def _lazy_unmount(path: Path) -> None:
    for cmd in (["fusermount3", "-u", "-z", str(path)], ["umount", "-l", str(path)]):
        if shutil.which(cmd[0]):
            subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
            if _mount_at(path) is None:
                return


MOUNT_LOCK_DIR = Path("/run/lock")


def hold_mountpoint(path: Path, key: str) -> Path | None:
    """Hold, for the daemon's life, a lock that says which vmd owns mountpoint
    `path`: two daemons starting at once must not both take the mountpoint
    for dead and unmount each other's fresh mount. Returns the lock file, to
    give to release_mountpoint() at exit (None where /run/lock is not there)."""
    real = os.path.join(os.path.realpath(path.parent), path.name)
    lock = MOUNT_LOCK_DIR / f"vmd-mnt-{hashlib.sha256(os.fsencode(real)).hexdigest()[:24]}.lock"
    try:
        # open_locked re-checks the name after locking: the file is removed at
        # exit, and a daemon that locked the removed one must not count.
        fd = open_locked(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, "lock")
    except InUseError as e:
        raise InUseError(f"{key}: {path} is in use by {e.holder} (another vmd "
                         f"running with this mountpoint?)", e.holder) from None
    except OSError as e:
        log.warning("%s: cannot hold a lock on mountpoint %s in %s (%s): two daemons "
                    "starting at the same moment are not kept apart", key, path,
                    MOUNT_LOCK_DIR, e.strerror)
        return None
    _mount_locks[lock] = fd
    return lock


_mount_locks: dict[Path, int] = {}


def release_mountpoint(lock: Path | None) -> None:
    """Remove the lock file (while still holding it, so no one locks it meanwhile), then let go."""
    if lock is None or lock not in _mount_locks:
        return
    fd = _mount_locks.pop(lock)
    try:
        os.unlink(lock)
    except OSError:
        pass
    close_locked(fd)


def warn_if_not_empty(path: Path, key: str) -> None:
    """Mounting over a directory hides what it holds, and mount(8) says
    nothing: an administrator who put files there would think them lost."""
    try:
        names = sorted(os.listdir(path))
    except OSError:
        return  # missing or unreadable: check_environment says so
    if names:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        log.warning("%s: %s is not empty: its %d entries (%s) are hidden while vmd serves "
                    "the volumes there", key, path, len(names), shown)


def clear_dead_mount(path: Path, key: str) -> None:
    """Refuse a mountpoint something live is mounted on; lazily unmount the dead
    FUSE mount of a vmd that crashed, so that a restart needs no manual step."""
    while (mount := _mount_at(path)) is not None:
        fstype, source = mount
        if (fstype, source) != ("fuse.vmd", "vmd"):
            raise ConfigError(f"{key}: {path} is already a mount point ({fstype} from {source}); "
                             f"vmd mounts only on an empty directory")
        err = _probe(path)
        if err is None:
            raise InUseError(f"{key}: {path} is mounted by a vmd that does not answer within "
                             f"{MOUNT_PROBE_SECONDS:.0f} s (hung?); stop it, or unmount with "
                             f"`umount -l {path}` if it is dead")
        if err != errno.ENOTCONN:
            raise InUseError(f"{key}: {path} is mounted by a running vmd (another daemon with "
                             f"this mountpoint?)")
        _lazy_unmount(path)
        if _mount_at(path) == mount:
            raise InUseError(f"{key}: {path} is the dead mount of a vmd that stopped uncleanly "
                             f"and lazy unmount failed; run `umount -l {path}`")
        log.warning("%s was the dead mount of a vmd that stopped uncleanly: lazily unmounted. "
                    "Loop devices still attached to the old volume files return errors: "
                    "detach them (`losetup -d`) and attach the new ones", path)


def still_our_socket(path: Path, st: os.stat_result) -> bool:
    """True if `path` is still the socket we bound (another daemon may have replaced it)."""
    try:
        now = os.stat(path)
    except OSError:
        return False
    return (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino) and stat.S_ISSOCK(now.st_mode)
