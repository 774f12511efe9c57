"""pyfuse3 adapter: one regular file per volume in the mount's root directory.

Handlers turn engine errors (OSError) into FUSEError(errno). Nothing here
knows about plexes or logs: it only calls the Volume API.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pyfuse3

from .mountpath import mount_device
from .volume import Volume

if TYPE_CHECKING:
    from .manager import VolumeManager

log = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE
_FIRST_INODE = ROOT + 1


# The kernel's readahead on the mount, in KiB: one FUSE request's worth (the
# kernel's largest, max_pages = 256 pages). With its default, 128 KiB, a
# loop device's 1 MiB sequential reads of a page-cached volume file reached
# vmd as eight 128 KiB requests (cold 1 MiB reads 225-260 against 400-526
# MiB/s with 1 MiB, and twice the daemon CPU). Random reads are not read
# ahead either way (the kernel reads a lone small read as is).
READ_AHEAD_KB = 1024

# Reads in a row that found nothing else in progress or waiting before one
# may be made on the event loop (VolumeFS._alone).
LONE_STREAK = 16


def fuse_device_fds() -> set[int]:
    """This process's descriptors of /dev/fuse. pyfuse3 does not give out its
    session's: the one that appears across pyfuse3.init is it (one inherited
    from the parent, of no session, is not)."""
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                fds.add(int(name))
        except OSError:  # closed meanwhile (the listing's own fd)
            continue
    return fds


def tune_readahead(mountpoint: Path, kb: int = READ_AHEAD_KB) -> None:
    """Set the mount's readahead (its backing device info in sysfs) once the
    kernel's INIT is answered (whose reply lowers it to what the kernel
    proposed, 128 KiB), and before the daemon says it is ready: a file takes
    the value when it is opened. Blocking (a stat of the mount waits for the
    INIT): for a worker thread, with the FUSE loop running."""
    try:
        os.stat(mountpoint)
    except OSError as e:  # a broken mount: the start fails later, and says why
        log.info("readahead of %s left as is: %s", mountpoint, e.strerror or e)
        return
    dev = mount_device(mountpoint)
    if dev is None:
        log.info("readahead of %s left as is: the mount is not in /proc/self/mountinfo",
                 mountpoint)
        return
    path = Path("/sys/class/bdi") / dev / "read_ahead_kb"
    try:
        path.write_text(f"{kb}\n")
    except OSError as e:  # a read-only /sys (a container): slower sequential reads only
        log.info("readahead of %s left as is: cannot write %s: %s", mountpoint, path,
                 e.strerror or e)


class VolumeFS(pyfuse3.Operations):
    """The volume files of one mount.

    Writeback cache (`writeback_cache: true` in the config). The kernel then
    acknowledges a write to a volume file opened without direct_io once its
    pages are in the page cache, and writes them back later in large requests;
    volumes with direct_io bypass the page cache either way. The flush
    contract still holds, end to end:

    * fsync(2) of the volume file (and a loop device's flush, which the loop
      driver turns into vfs_fsync of its backing file; loop advertises no FUA,
      so FUA writes become write + flush) first writes back every dirty page
      and waits for the replies to those FUSE_WRITEs (fuse_fsync:
      file_write_and_wait_range, then fuse_sync_writes), and only then sends
      FUSE_FSYNC; vmd answers it after every in-sync plex fdatasync'ed
      (Volume.sync; a RAID-5 volume with a log: after its log's sync, which
      a restart replays onto the columns). So every write acknowledged before a completed fsync is
      on every in-sync plex: DESIGN invariant 9 holds, and the DRL rules are
      unchanged because vmd still marks a region dirty before the plex write
      that the writeback request causes.
    * A failed writeback (vmd answered EIO) is recorded on the file's mapping
      and returned by the next fsync, as for any filesystem: nothing is
      reported durable that is not.
    * A daemon killed with SIGKILL takes with it only dirty pages that no
      fsync covered, as a disk loses its volatile cache on power loss
      (tests/test_durability.py proves it with ext4 on a loop device).
    * close(2) writes the dirty pages back and waits (fuse_flush; fuse_release
      again for writes racing the close), so a closed volume has none: `vmd
      stop` and `snap back` refuse while a volume is open, and with --force or
      SIGTERM the daemon writes back the open ones first (`write_back`).
    * What changes: a write entirely past the end of a volume is no longer
      refused at write(2) (the kernel extends its own idea of the size, and
      keeps it: in this mode it ignores the size vmd reports); it fails at
      writeback, and the next fsync reports ENOSPC.

    pyfuse3 reads `enable_writeback_cache` when the kernel's INIT arrives, and
    the kernel keeps it per connection: the setting is mount-wide.
    """

    def __init__(self, manager: "VolumeManager"):
        super().__init__()
        self.manager = manager
        # An instance attribute: pyfuse3 looks it up on the operations object.
        self.enable_writeback_cache = manager.cfg.writeback_cache
        self._inodes: dict[int, str] = {}
        self._by_name: dict[str, int] = {}
        self._next_inode = _FIRST_INODE
        self._handles: dict[int, Volume] = {}
        # Handles whose writes must be durable when answered (O_SYNC,
        # O_DSYNC) and that the kernel sends no fsync for: with direct_io,
        # fuse_direct_write_iter never calls generic_write_sync. Without
        # direct_io the kernel does (fuse_cache_write_iter, and the page
        # cache's generic_file_write_iter with writeback_cache): FUSE_FSYNC
        # follows each such write, and a sync here would be a second one.
        self._sync_writes: set[int] = set()
        self._next_fh = 1
        self._busy = 0  # reads, writes and fsyncs in progress
        self._lone = 0  # reads in a row that found no other request in progress or waiting
        self._queue: select.poll | None = None  # the session's /dev/fuse (watch_queue)
        self._uid = os.getuid()
        self._gid = os.getgid()
        self._t0 = time.time_ns()
        for name in manager.volumes:
            self.add_volume(name)

    # -- membership (snapshots add and remove volumes at run time) -------------

    def add_volume(self, name: str) -> None:
        if name in self._by_name:
            return
        ino = self._next_inode
        self._next_inode += 1
        self._inodes[ino] = name
        self._by_name[name] = ino

    def remove_volume(self, name: str) -> None:
        ino = self._by_name.pop(name, None)
        if ino is not None:
            del self._inodes[ino]
            try:
                pyfuse3.invalidate_entry_async(ROOT, name.encode(), ignore_enoent=True)
            except Exception:  # not mounted (tests of the adapter alone)
                pass

    def show_volume(self, name: str) -> None:
        """A volume file added at run time (`vmd start`) must be found at once:
        have the kernel drop any entry it holds for the name. (It caches no
        negative entry from our ENOENT reply to a lookup, fuse_lookup
        invalidates it; this is for whatever else may have cached the name.)
        The directory listing is not cached (no cache_readdir). Blocks until
        a lookup in progress is answered: call it in a thread."""
        try:
            pyfuse3.invalidate_entry(ROOT, name.encode())
        except Exception:  # ENOENT: the kernel holds no entry; or not mounted
            pass

    def invalidate_volume(self, name: str) -> None:
        """Make the kernel forget its cached pages of a volume whose bytes
        changed behind its file (snap back --from-snapshot): with keep_cache
        it would go on serving the old ones. Blocks: call it in a thread."""
        ino = self._by_name.get(name)
        if ino is not None:
            try:
                pyfuse3.invalidate_inode(ino, attr_only=False)
            except Exception:  # ENOENT: nothing cached; or not mounted
                pass

    def write_back(self, name: str) -> None:
        """Make the kernel write back its dirty pages of a volume (stopping
        while it is open). Blocks while vmd serves the writes: call it in a
        thread, with the FUSE loop running."""
        if not self.enable_writeback_cache:
            return
        fd = os.open(self.manager.cfg.mountpoint / name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _volume(self, ino: int) -> Volume:
        name = self._inodes.get(ino)
        vol = self.manager.volumes.get(name) if name is not None else None
        if vol is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return vol

    # -- attributes ------------------------------------------------------------

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.generation = 0
        a.entry_timeout = 1
        a.attr_timeout = 1
        a.st_uid = self._uid
        a.st_gid = self._gid
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self._t0
        a.st_blksize = 1 << 20
        if ino == ROOT:
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
            a.st_size = 0
        else:
            vol = self._volume(ino)
            a.st_mode = stat.S_IFREG | 0o600
            a.st_nlink = 1
            a.st_size = vol.size
            a.st_blocks = vol.size // 512
        return a

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if parent_inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name in (b".", b".."):
            return self._attr(ROOT)
        ino = self._by_name.get(name.decode(errors="replace"))
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(ino)

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if inode == ROOT:
            raise pyfuse3.FUSEError(errno.EPERM)
        vol = self._volume(inode)
        if fields.update_size and attr.st_size != vol.size:
            # A volume never grows or shrinks through its file.
            raise pyfuse3.FUSEError(errno.EPERM)
        if fields.update_mode or fields.update_uid or fields.update_gid:
            raise pyfuse3.FUSEError(errno.EPERM)
        return self._attr(inode)  # O_TRUNC to the same size and touch are harmless

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = sum(v.size for v in self.manager.volumes.values()) // 4096
        s.f_bfree = s.f_bavail = 0
        s.f_files = len(self._inodes)
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # -- directory -------------------------------------------------------------

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return ROOT

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = sorted(self._inodes.items())
        for ino, name in entries:
            if ino <= start_id:
                continue
            if not pyfuse3.readdir_reply(token, name.encode(), self._attr(ino), ino):
                break

    # -- files -----------------------------------------------------------------

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if inode == ROOT:
            raise pyfuse3.FUSEError(errno.EISDIR)
        vol = self._volume(inode)
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = vol
        if flags & os.O_DSYNC and vol.cfg.direct_io:  # O_SYNC includes O_DSYNC
            self._sync_writes.add(fh)
        vol.opened()
        # direct_io (the default): every read and write comes to vmd, with no
        # third copy of the data in the kernel's cache of this file. Without
        # it, keep_cache: only vmd changes a volume's bytes, and every change
        # goes through this file, so the kernel's cached pages stay true.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True, direct_io=vol.cfg.direct_io)

    def _handle(self, fh: int) -> Volume:
        vol = self._handles.get(fh)
        if vol is None:
            raise pyfuse3.FUSEError(errno.EBADF)
        return vol

    async def read(self, fh: int, off: int, size: int) -> bytes:
        self._busy += 1
        try:
            return await self._handle(fh).pread(off, size, alone=self._alone)
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        finally:
            self._busy -= 1

    def watch_queue(self, fds: set[int]) -> None:
        """The session's /dev/fuse: readable while the kernel holds requests
        that vmd has not read yet. Without it no read is made inline."""
        if len(fds) != 1:
            log.info("no read is made on the event loop: the FUSE session's /dev/fuse is "
                     "not known (%d new descriptors of it)", len(fds))
            return
        self._queue = select.poll()
        self._queue.register(fds.pop(), select.POLLIN)

    def _alone(self) -> bool:
        """No other read, write or fsync is in progress or waiting in the
        kernel, nor was when each of the last LONE_STREAK reads asked: a plex
        read may block the event loop for the one disk read that the only
        request waits for anyway (Plex.pread), rather than pay a wake-up to
        learn it completed. Readers that overlap are kept off it: a read
        blocking the loop holds up those that arrive meanwhile, where through
        io_uring the disk gets them all at once (4 KiB random reads with 4
        fio jobs on the volume file: 0.72-0.78 of qsd with the count in
        progress alone, 0.97 before). The handlers of inline reads never
        yield, so the count in progress alone cannot see them overlap."""
        if self._busy > 1 or self._queue is None or self._queue.poll(0):
            self._lone = 0
            return False
        self._lone += 1
        return self._lone > LONE_STREAK

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        self._busy += 1
        try:
            vol = self._handle(fh)
            n = await vol.pwrite(off, buf)
            if fh in self._sync_writes:
                await vol.user_sync()
            return n
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        finally:
            self._busy -= 1

    async def fsync(self, fh: int, datasync: bool) -> None:
        self._busy += 1
        try:
            await self._handle(fh).user_sync()
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO) from None
        finally:
            self._busy -= 1

    async def flush(self, fh: int) -> None:
        # close(2): durability is fsync's job (a RAID-5 volume's writes may
        # still be in its write-back cache, a mirror's in the plexes' page cache).
        self._handle(fh)

    async def release(self, fh: int) -> None:
        self._sync_writes.discard(fh)
        vol = self._handles.pop(fh, None)
        if vol is not None:
            vol.released()
