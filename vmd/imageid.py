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
- an extended attribute `user.vmd.image` = "<volume uuid>:<plex name>:<run
  generation>", so that a legitimate move (`cp -a`, `rsync -X` to another
  disk; device numbers that change across reboots) keeps the image
  recognised. Filesystems without user xattrs fall back to the inode.

The run generation (md's event counter) is in the sidecar state
(`extra.generation`): one more at each open of the volume and at each clean
stop, written by that run's first (or the stop's) checkpoint; the in-sync
images are marked with it only once that checkpoint is durable, so a mark
never names a generation its log does not hold. Two things an inode and a
bare mark cannot tell then are told:

- an old copy restored with its xattrs (`cp -a` one day, put back later):
  its inode differs and its mark names an older generation than the log's:
  not recognised;
- an old sidecar log restored from a backup: an image marked by a later run
  than the log records. The log's plex states are stale (a plex it calls in
  sync may have been detached since and missed writes): the volume is
  refused, and the administrator names the image in sync last
  (`--recover-all`) or puts back the current log.

- an old copy written over the image itself (`cp -a backup p1.img` keeps
  the inode and brings the copy's mark): once the marks of a generation are
  durable (fsync of each image), a second checkpoint records it
  (`extra.marked`); from then every in-sync image carries that generation,
  so an older mark on the recorded inode is such a copy: not recognised.

A crash between a checkpoint that moves the generation on and the marks
(before `extra.marked` names it) leaves images one generation behind their
log with their inodes unchanged: recognised by the inode, and marked again
by the next run. Not caught: a copy taken during the run that then
crashed, put back before the next start (it names the log's generation);
and bytes changed in place, which keep the mark (dd, bit rot, a `cp`
without `-a` over the image): `vmd verify` finds those. Marks of the
previous format (no generation) are taken as before.

At open an image is recognised if its inode matches, or its mark names it
and the log's generation (or no generation), or nothing was recorded (a log
written before this). In a mirror, an unrecognised image next to a
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
import weakref
from pathlib import Path

from . import events
from .errors import VmdError
from .faults import mark_fault
from .plex import Plex
from .sidecar import ACTIVE, SNAPATT, SNAPDONE, SYNCING, WRITABLE, VolumeState

log = logging.getLogger(__name__)

XATTR = "user.vmd.image"
GENERATION = "generation"  # in VolumeState.extra: the run generation (none: 0)
MARKED = "marked"  # in extra: the generation every in-sync image's mark durably names
# No user xattrs on this filesystem (or not allowed): the inode alone decides.
_NO_XATTRS = frozenset({errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.EACCES})
FS_IOC_GETVERSION = 0x80087601  # _IOR('v', 1, long); the kernel writes an int
# Per open image, the (inode, mark) last written or found on it this run:
# a checkpoint then costs no xattr call for an image already marked.
_marked: "weakref.WeakKeyDictionary[Plex, tuple[list[int], bytes]]" = \
    weakref.WeakKeyDictionary()


def generation(state: VolumeState) -> int:
    return int(state.extra.get(GENERATION, 0))


def _marked_by(state: VolumeState, name: str, mark: bytes | None) -> tuple[bool, int | None]:
    """(whether `mark` names plex `name` of this volume, the generation it
    names: None for a mark of the previous format, which had none)."""
    prefix = f"{state.uuid}:{name}".encode()
    if mark == prefix:
        return True, None
    if mark is not None and mark.startswith(prefix + b":"):
        gen = mark[len(prefix) + 1:]
        if gen.isdigit():
            return True, int(gen)
    return False, None


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
    """Record the identity of every open in-sync local image whose recorded
    one differs; forget it for the others (an image that comes back in sync
    is recorded again then). Called before each checkpoint: one fstat per
    plex; `mark` follows once the checkpoint is durable."""
    for p in plexes:
        rec = p.record
        now = _local_inode(p) if rec.state in WRITABLE else None
        if now == rec.inode or (now is None and rec.state in WRITABLE):
            continue  # unchanged; or nothing to learn now (remote, closed): keep it
        rec.inode = now


def mark(state: VolumeState, plexes: list[Plex], gen: int) -> bool:
    """Mark every open in-sync local image with this volume, its plex and
    `gen`, the generation of the checkpoint just made durable. Never before
    it: an image marked with a generation its log does not hold yet would,
    after a crash, look newer than its log (a log restored from a backup)
    and the volume would be refused. An image marked now is fsynced at its
    next flush (`Plex._mark_unsynced`). False if a mark could not be written."""
    ok = True
    for p in plexes:
        rec = p.record
        if rec.state not in WRITABLE or rec.inode is None or p.fd < 0:
            continue
        want = f"{state.uuid}:{rec.name}:{gen}".encode()
        if _marked.get(p) == (rec.inode, want):
            continue
        _marked[p] = (rec.inode, want)
        was = _read_mark(p.fd)
        if was == want:
            continue
        if was is not None:
            mark_fault(state.name)  # test fault: a crash before the marks move on
        try:
            os.setxattr(p.fd, XATTR, want)
            p._mark_unsynced = True
        except OSError as e:
            if e.errno not in _NO_XATTRS:
                # Only the move-proof mark is lost: the inode still recognises it.
                log.warning("could not mark plex image %s (%s): %s", rec.path, XATTR,
                            e.strerror or e)
                _marked.pop(p, None)
                ok = False
    return ok


def begin_run(state: VolumeState, plexes: list[Plex]) -> None:
    """At open, after the images were checked: this run's generation, past
    the log's and past any this volume's images carry (--recover-all may
    rebuild the log from an older checkpoint, or from none)."""
    marks = [gen for p in plexes if p.fd >= 0 and not p.remote
             for ours, gen in [_marked_by(state, p.name, _read_mark(p.fd))]
             if ours and gen is not None]
    state.extra[GENERATION] = max([generation(state), *marks]) + 1


def end_run(state: VolumeState) -> None:
    """At a clean stop, before its checkpoint: a copy of an image taken
    during this run (cp -a keeps its mark) is older than what the next run
    finds, even where the copy is written over the image itself."""
    state.extra[GENERATION] = generation(state) + 1


def retire_mark(state: VolumeState, name: str, path: str) -> None:
    """The image at `path`, which `vmd plex replace` takes out of plex
    `name`, no longer names it: its mark would have it taken for the new
    image (it names the log's generation after a crash) wherever that one is
    not at its path (review 15, R7). Best effort: an image that cannot be
    reached (its disk gone) cannot be served either."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        if _marked_by(state, name, _read_mark(fd))[0]:
            os.setxattr(fd, XATTR, f"{state.uuid}:{name}:replaced".encode())
            os.fsync(fd)
    except OSError as e:
        log.warning("could not retire the mark (%s) of %s, taken out of %s: %s", XATTR, path,
                    name, e.strerror or e)
    finally:
        os.close(fd)


def find_moved(state: VolumeState, old_paths: list[str], new_paths: list[str]
               ) -> dict[str, str] | None:
    """The config lists `new_paths` where the log records `old_paths`: if the
    images were moved while vmd was stopped (to another disk, another
    directory), each is found at one new path by its mark (this volume, that
    plex; an in-sync one with the log's generation or later, as at open) or
    by its inode (a `mv` within one filesystem). Returns old → new only if
    every old path is found at exactly one new path and every new path is
    one of them: vmd does not guess. An image still at its old path was not
    moved: only the same file (a symlink to it) is found for it."""
    recs = {r.path: r for r in state.plexes if not r.role}
    # An image still at its recorded path was not moved: another file that
    # carries its mark is a copy, or the image a `vmd plex replace` took out
    # (it keeps the column's mark, and the log's generation after a crash).
    # Only the same file under another name (a symlink) is taken for it.
    stayed = {old for old in old_paths if (rec := recs.get(old)) is not None
              and rec.inode is not None and (at := _identity_at(old)) is not None
              and at[0] == rec.inode}
    found: dict[str, list[str]] = {}
    for new in new_paths:
        at = _identity_at(new)
        if at is None:
            continue  # missing, a remote URI, unreadable: not a moved image
        inode, mark = at
        for old in old_paths:
            rec = recs.get(old)
            if rec is None:
                continue
            ours, gen = _marked_by(state, rec.name, mark)
            if ((ours and old not in stayed
                 and (gen is None or rec.state not in WRITABLE or gen >= generation(state)))
                    or (rec.inode is not None and inode == rec.inode)):
                found.setdefault(old, []).append(new)
    chosen = {old: news[0] for old, news in found.items() if len(news) == 1}
    if (set(chosen) != set(old_paths) or len(set(chosen.values())) != len(chosen)
            or set(chosen.values()) != set(new_paths)):
        return None
    return chosen


def _identity_at(path: str) -> tuple[list[int], bytes | None] | None:
    """((dev, ino, generation), vmd mark) of the file at `path`; None if there
    is none (or it cannot be opened: a remote URI, no permission)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        return [st.st_dev, st.st_ino, _generation(fd)], _read_mark(fd)
    finally:
        os.close(fd)


def _unrecognised_why(state: VolumeState, p: Plex) -> str:
    """"" if `p`'s open image is the one recorded; else why not."""
    rec = p.record
    now = _local_inode(p)
    if now is None or rec.inode is None:
        return ""
    mark = _read_mark(p.fd)
    ours, gen = _marked_by(state, rec.name, mark)
    if now == rec.inode:
        return _overwritten_why(state, gen) if ours and gen is not None else ""
    if ours and (gen is None or gen >= generation(state)):
        return ""  # moved with its xattrs (cp -a, rsync -X): the same image
    if ours:
        return (f"its inode changed and its mark ({XATTR}) is from run {gen} of the volume, "
                f"older than the sidecar log's run {generation(state)}: an old copy of it "
                f"was put in its place")
    if mark is None:
        return "its inode changed and it carries no vmd mark: another file was put in its place"
    return (f"its inode changed and it carries the mark of another image "
            f"({mark.decode(errors='replace')}): another image was put in its place")


def _overwritten_why(state: VolumeState, gen: int) -> str:
    """"" unless the image's own inode carries a mark (`gen`) older than its
    log allows: an old copy written over the image itself while vmd was
    stopped (`cp -a backup p1.img` keeps the inode and brings the copy's
    mark). Bytes changed in place (dd, a disk's bit rot) keep the current
    mark: those are verify's to find. Once the log records that the marks
    of its generation are durable (`extra.marked`, written after them), every
    in-sync image carries that generation; before, one behind is a crash
    between the checkpoint and the marks."""
    logged = generation(state)
    marked = state.extra.get(MARKED) == logged
    if gen >= (logged if marked else logged - 1):
        return ""
    return (f"its mark ({XATTR}) is from run {gen} of the volume, older than the sidecar "
            f"log's run {logged}: an old copy of it was written over it (cp -a onto the "
            f"image keeps its inode)")


def _check_log_not_older(state: VolumeState, plexes: list[Plex], volume: str,
                         log_path: Path, columns: bool = False) -> None:
    """Refuse (VmdError) if an image was marked by a later run than the log
    records: the log is an older copy, and its plex states may be stale."""
    logged = generation(state)
    newer = [(p, gen) for p in plexes if p.state in WRITABLE and p.fd >= 0 and not p.remote
             for ours, gen in [_marked_by(state, p.name, _read_mark(p.fd))]
             if ours and gen is not None and gen > logged]
    if not newer:
        return
    images = "; ".join(f"plex {p.name} image {p.record.path} is marked by run {gen}"
                       for p, gen in newer)
    raise VmdError(
        f"volume {volume}: sidecar log {log_path} is older than the images it describes: it "
        f"records run {logged} of the volume, but {images}. The log was put back from a "
        f"backup (or an older copy): the plex states it holds may be stale (a plex it calls "
        f"in sync may have been detached since and missed writes), and vmd will not guess "
        f"which image is current. Put back the sidecar log that is current" + (
            # RAID-5 has no source to name: --recover-all would trust every
            # column, a stale one included.
            f"; if it is lost, move aside the image of a column that was out since (it "
            f"is stale), `vmd start {volume} --recover-all --force-degraded`, then `vmd "
            f"plex replace` that column" if columns else
            f", or name the image that was in sync last: `vmd start {volume} "
            f"--recover-all=IMAGE` (every other plex is copied whole from it)"))


def check_images(state: VolumeState, plexes: list[Plex], volume: str, log_path: Path, *,
                 columns: bool = False) -> None:
    """At open (not under --recover-all, whose source the admin chose):
    refused (VmdError) if the log is older than its images; an unrecognised
    in-sync image is copied whole from a recognised one. `columns`: RAID-5,
    where one column at most can be rebuilt from the others."""
    _check_log_not_older(state, plexes, volume, log_path, columns)
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
