"""Which serving volume already uses a file, under its name or another one.

A path is compared by name (realpath: `..`, symlinks) and, for a file that
exists, by (st_dev, st_ino): a hard link, or the same file seen through a
bind mount, has a name of its own. Two plexes on one file overwrite each
other's data while each volume records it as in sync, and the daemon's own
flock cannot tell (vmd/exclusive.py holds one lock per inode per process).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from .config import ALIAS, Ident, VolumeConfig, ident
from .nbdlink import is_remote

if TYPE_CHECKING:
    from .volume import Volume


def _fd_ident(fd: int) -> Ident | None:
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _files(v: Volume) -> Iterator[tuple[str, str, Ident | None]]:
    """What each file of a serving volume is, its path and its identity: an
    open image's from its fd (its path may name another file by now)."""
    for p in v.plexes:
        if is_remote(p.record.path):
            yield f"plex {p.name} of volume {v.name}", p.record.path, None
            continue
        fd = getattr(p, "fd", -1)
        yield (f"plex {p.name} of volume {v.name}", p.record.path,
               _fd_ident(fd) if fd >= 0 else ident(p.record.path))
    for what, f in (("sidecar log", v.cfg.log), ("RAID-5 log", v.cfg.raid5_log)):
        if f is not None:
            yield f"the {what} of volume {v.name}", str(f), ident(f)


def _same_name(a: str, b: str) -> bool:
    if is_remote(a) or is_remote(b):
        return a == b  # a URI is no path: realpath would fold its "//"
    return os.path.realpath(a) == os.path.realpath(b)


def in_use(volumes: Iterable[Volume], path: str) -> str | None:
    """What of `volumes` uses `path` ("plex p1 of volume v", with the other
    name when it is an alias), or None."""
    me = None if is_remote(path) else ident(path)
    for v in volumes:
        for what, p, other in _files(v):
            if _same_name(p, path):
                return what
            if me is not None and me == other:
                return f"{what} ({p}): {ALIAS}"
    return None


def config_in_use(volumes: Iterable[Volume], vc: VolumeConfig) -> str | None:
    """A file of `vc` (image, sidecar or RAID-5 log) a serving volume uses, as
    "PATH is plex p1 of volume v", or None."""
    volumes = list(volumes)
    for p in (*vc.plexes, vc.log, vc.raid5_log):
        used = None if p is None else in_use(volumes, str(p))
        if used is not None:
            return f"{p} is {used}"
    return None
