"""Recognising an in-sync plex's image at open (invariant 5 across a stop).

An image has no header (other tools read it as a plain disk image), so
nothing in its bytes says which volume and plex it belongs to. A file put
in its place while vmd was stopped (a disk swapped and the image recreated
with `truncate -s`, an old backup restored, another volume's image copied
there) has the right size and would be served as in sync: reads would
alternate between the real data and whatever it holds.

Two marks from outside the bytes:

- the image's (st_dev, st_ino, inode generation), recorded in the sidecar
  log's checkpoint
  (`PlexRecord.inode`) whenever it differs from what is recorded: at open,
  attach, add, and the clean stop's checkpoint. mtime cannot help for an
  in-sync plex: every write changes it. The generation (FS_IOC_GETVERSION)
  matters: ext4 hands a file created just after the image was deleted the
  same inode number, with another generation; where the ioctl is not
  supported it is 0;
- an extended attribute `user.vmd.image` = "<volume uuid>:<plex name>",
  written with the inode, so that a legitimate move (`cp -a`, `rsync -X`
  to another disk; device numbers that change across reboots) keeps the
  image recognised. Filesystems without user xattrs fall back to the inode.

At open an image is recognised if either matches (or nothing was recorded:
a log written before this). In a mirror, an unrecognised image next to a
recognised in-sync one is not trusted: it is copied whole from the others
(SYNCING, full map), as a reattached image that changed while away is. If
no in-sync image is recognised, vmd cannot tell a move of them all (a plain
`cp`, losing the xattrs) from a swap of them all: it serves them as they
are, says so, and records their new identities.

Remote exports and block devices are not covered (no inode to compare).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import struct

from . import events
from .plex import Plex
from .sidecar import ACTIVE, SNAPATT, SNAPDONE, SYNCING, WRITABLE, VolumeState

log = logging.getLogger(__name__)

XATTR = "user.vmd.image"
# No user xattrs on this filesystem (or not allowed): the inode alone decides.
_NO_XATTRS = frozenset({errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.EACCES})
FS_IOC_GETVERSION = 0x80087601  # _IOR('v', 1, long); the kernel writes an int


def mark_of(state: VolumeState, name: str) -> bytes:
    return f"{state.uuid}:{name}".encode()


def _generation(fd: int) -> int:
    try:
        return struct.unpack("<i", fcntl.ioctl(fd, FS_IOC_GETVERSION, bytes(8))[:4])[0]
    except OSError:
        return 0  # not kept by this filesystem: the inode number alone


def _local_inode(p: Plex) -> list[int] | None:
    """(dev, ino, generation) of an open local image file; None for anything
    else, or if it cannot be read (a checkpoint must not fail for it)."""
    if p.remote or p.fd < 0:
        return None
    try:
        st = os.fstat(p.fd)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return [st.st_dev, st.st_ino, _generation(p.fd)]


def _read_mark(fd: int) -> bytes | None:
    try:
        return os.getxattr(fd, XATTR)
    except OSError:
        return None  # none, none allowed here, or unreadable: the inode decides


def record(state: VolumeState, plexes: list[Plex]) -> None:
    """Record (and mark) the identity of every open in-sync local image
    whose recorded one differs; forget it for the others (an image that
    comes back in sync is recorded and marked again then). Called before each
    checkpoint: one fstat per plex, a write only when something changed."""
    for p in plexes:
        rec = p.record
        now = _local_inode(p) if rec.state in WRITABLE else None
        if now == rec.inode or (now is None and rec.state in WRITABLE):
            continue  # unchanged; or nothing to learn now (remote, closed): keep it
        rec.inode = now
        if now is not None:
            try:
                os.setxattr(p.fd, XATTR, mark_of(state, rec.name))
            except OSError as e:
                if e.errno not in _NO_XATTRS:
                    # Only the move-proof mark is lost: the inode still recognises it.
                    log.warning("could not mark plex image %s (%s): %s", rec.path, XATTR,
                                e.strerror or e)


def _unrecognised_why(state: VolumeState, p: Plex) -> str:
    """"" if `p`'s open image is the one recorded; else why not."""
    rec = p.record
    now = _local_inode(p)
    if now is None or rec.inode is None or now == rec.inode:
        return ""
    mark = _read_mark(p.fd)
    if mark == mark_of(state, rec.name):
        return ""  # moved with its xattrs (cp -a, rsync -X): the same image
    if mark is None:
        return "its inode changed and it carries no vmd mark: another file was put in its place"
    return (f"its inode changed and it carries the mark of another image "
            f"({mark.decode(errors='replace')}): another image was put in its place")


def check_images(state: VolumeState, plexes: list[Plex], volume: str, *,
                 columns: bool = False) -> None:
    """At open (not under --recover-all, whose source the admin chose):
    an unrecognised in-sync image is copied whole from a recognised one.
    `columns`: RAID-5, where one column at most can be rebuilt from the others."""
    why = {p.name: w for p in plexes if p.state in WRITABLE
           for w in [_unrecognised_why(state, p)] if w}
    if not why:
        return
    listing = "; ".join(f"{p.name} {p.record.path}: {why[p.name]}" for p in plexes
                        if p.name in why)
    trusted = [p for p in plexes if p.state == ACTIVE and p.fd >= 0 and p.name not in why]
    if not trusted:
        log.warning(
            "volume %s: no in-sync image is the one the sidecar log recorded (%s). vmd cannot "
            "tell a move of them all (cp without -a, which drops the %s mark) from other files "
            "put in their place: serving them as they are and recording them. If they were "
            "not moved, stop the volume and check that each path holds this volume's image",
            volume, listing, XATTR)
        return
    if columns and len(plexes) - len(trusted) > 1:
        # Taking them out would leave stripes nothing can rebuild: the
        # volume unreadable for what may be a move without the marks.
        log.warning(
            "volume %s: columns not recognised (%s), and %d column(s) would be out: a RAID-5 "
            "volume rebuilds one at most, so they are served as they are and recorded. If "
            "they were not moved, stop the volume and check that each path holds this "
            "volume's column", volume, listing, len(plexes) - len(trusted))
        return
    for p in plexes:
        if p.name not in why:
            continue
        rec = p.record
        was = rec.state
        # A snapshot mirror stays one; anything else is copied like an attach.
        rec.state = SNAPATT if was in (SNAPATT, SNAPDONE) else SYNCING
        rec.missing = state.new_map(fill=True)
        rec.reason = f"image not recognised at start: {why[p.name]}"
        log.warning("volume %s: plex %s image %s is not the one it had: %s; it is not trusted "
                    "and is copied whole from %s", volume, rec.name, rec.path, why[p.name],
                    ", ".join(q.name for q in trusted))
        events.emit(events.PLEX_STATE, volume, rec.name, state=rec.state, was=was,
                    reason=rec.reason)
