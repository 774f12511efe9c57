"""Is a path under the daemon's own FUSE mount? Decided without a stat of
anything under it.

An image, sidecar log or RAID-5 log there would be served by the daemon
itself: the stat `vmd plex add` makes of its image, from the event loop,
waits for a FUSE reply only that loop can give (a deadlock only kill -9
ends). So the path is resolved the way realpath(3) does, one component at a
time, but the walk stops before it would touch the mountpoint: only the part
of the path outside the mount is ever lstat-ed or read as a symlink.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

_MAX_SYMLINKS = 40  # as the kernel's MAXSYMLINKS


def _mountinfo() -> list[tuple[str, str]]:
    """(device "MAJOR:MINOR", mount point) of every mount this process sees."""
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    # The kernel escapes blanks and such in octal (\040).
    return [(fields[2], re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4]))
            for fields in (line.split() for line in lines) if len(fields) > 4]


def resolved_mountpoint(mountpoint: Path) -> str:
    """The mountpoint with its parent's symlinks resolved; never the mountpoint
    itself (a stat of it is a FUSE request to the daemon)."""
    mp = Path(os.path.abspath(mountpoint))
    return os.path.join(os.path.realpath(mp.parent), mp.name)


def mount_device(mountpoint: Path) -> str | None:
    """The device number ("MAJOR:MINOR") of the mount at `mountpoint`, from
    /proc/self/mountinfo; None if nothing is mounted there."""
    want = resolved_mountpoint(mountpoint)
    found = None
    for dev, point in _mountinfo():
        if point == want:
            found = dev  # the last one mounted there wins
    return found


def mount_paths(mountpoint: Path) -> set[str]:
    """Every path at which the mount is seen: the mountpoint, and while it is
    mounted, each bind mount of it (same device)."""
    want = resolved_mountpoint(mountpoint)
    dev = mount_device(mountpoint)
    return {want} | {point for d, point in _mountinfo() if dev is not None and d == dev}


def under_mount(path: str | os.PathLike[str], mounts: set[str]) -> str | None:
    """The one of `mounts` that `path` (absolute, or relative to the current
    directory) resolves into, or None. Symlinks outside the mounts are
    followed; a path that passes through a mount at all counts as under it."""
    path = os.fspath(path)
    if not os.path.isabs(path):
        path = os.path.join(os.getcwd(), path)  # not normalized: ".." is resolved below
    pending = list(reversed(path.split("/")))
    cur = "/"
    links = 0
    while pending:
        comp = pending.pop()
        if comp in ("", "."):
            continue
        if comp == "..":
            cur = os.path.dirname(cur)
            continue
        nxt = os.path.join(cur, comp)
        if nxt in mounts:
            return nxt
        try:
            st = os.lstat(nxt)
        except OSError:
            # Missing (created later) or unreadable: the rest is read as written.
            cur = os.path.normpath(os.path.join(nxt, *reversed(pending)))
            break
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > _MAX_SYMLINKS:
                break
            target = os.readlink(nxt)
            if os.path.isabs(target):
                cur = "/"
            pending.extend(reversed(target.split("/")))
        else:
            cur = nxt
    for mp in mounts:
        if cur == mp or cur.startswith(mp.rstrip("/") + "/"):
            return mp
    return None


def outside_mount_error(path: str | os.PathLike[str], mountpoint: Path,
                        mounts: set[str] | None = None) -> str | None:
    """Why `path` cannot hold an image or log of the daemon mounting
    `mountpoint` (it lies under that mount), or None if it may."""
    mp = under_mount(path, mount_paths(mountpoint) if mounts is None else mounts)
    if mp is None:
        return None
    seen = f" (mounted again at {mp})" if mp != resolved_mountpoint(mountpoint) else ""
    return (f"{path} lies under the daemon's mountpoint {mountpoint}{seen}: the daemon would "
            f"serve its own image or log; put it on a filesystem outside the mount")


FSTAB_ENV = "VMD_FSTAB"  # another fstab to read (tests)


def _fstab_points() -> list[str]:
    """Mount points /etc/fstab lists (not swap), unescaped."""
    try:
        with open(os.environ.get(FSTAB_ENV, "/etc/fstab")) as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 3 and fields[1].startswith("/") and fields[2] != "swap":
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[1])
            # As the kernel lists it in mountinfo: `/srv/` or a path through a
            # symlink must not look unmounted while its disk is mounted.
            out.append(os.path.realpath(point))
    return out


def unmounted_fstab_point(path: str | os.PathLike[str]) -> str | None:
    """The deepest mount point /etc/fstab lists above `path` if it is not
    mounted now: a disk that should hold the path but does not (yet)."""
    real = os.path.realpath(path)
    above = [p for p in _fstab_points() if p != "/" and
             (real == p or real.startswith(p.rstrip("/") + "/"))]
    if not above:
        return None
    deepest = max(above, key=len)
    mounted = {point for _, point in _mountinfo()}
    return None if deepest in mounted else deepest
