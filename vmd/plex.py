"""One plex: a raw image file holding a full copy of a volume.

Disk calls that may block go through io_uring (see uring.py) or, where it is
not available, worker threads, so that the plexes of a volume are really
written in parallel and a slow plex does not hold up the event loop.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .exclusive import close_locked, lock_exclusive
from .iopool import IOPool
from .onloop import Alone, Hold
from .plexcopy import ResyncCopies
from .plexerr import PlexIOError
from .sidecar import PlexRecord
from .uring import IOV_MAX, EndOfFile, Ring

log = logging.getLogger(__name__)

# Worker threads per plex (see iopool): enough for the requests FUSE has in
# flight, few enough to cost nothing while idle.
IO_THREADS = 8

# From this size a copy into the page cache costs more than a thread hop, so
# the plexes of a volume are written in parallel threads (one stays inline).
PARALLEL_BYTES = 128 * 1024
# A RAID-5 write's pieces (or a batch of the RAID-5 log's) under this, every
# column fast, go into the page cache from the event loop, in turn.
INLINE_BYTES = 256 * 1024


# fallocate(2) mode FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE: os has no
# binding for it (os.posix_fallocate only allocates).
PUNCH_HOLE_KEEP_SIZE = 0x02 | 0x01
# Zeros written where a filesystem cannot punch, this much per write.
ZERO_CHUNK = 1024 * 1024
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def punch_hole(fd: int, off: int, length: int) -> None:
    """Deallocate [off, off+length) of `fd`, which reads as zeros after."""
    if _fallocate(fd, PUNCH_HOLE_KEEP_SIZE, off, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class Plex(ResyncCopies):
    remote = False  # an NBD export (nbdplex.NbdPlex): reads go to local plexes first

    def __init__(self, record: PlexRecord, size: int):
        self.record = record
        self.size = size
        self.fd = -1
        self.reads = 0
        self.writes = 0
        self.bytes_written = 0
        self.inflight = 0
        self._pool = IOPool(f"plex-{record.name}", IO_THREADS)
        self.inline = True  # may write inline while fast (tests of slow disks turn it off)
        self.write_hold = Hold()  # inline writes (status: slow_writes)
        self.read_hold = Hold()  # inline reads (status: slow_reads)
        self.inline_reads = 0  # reads made on the event loop (alone: Plex.pread)
        self._nowait_reads = True
        # SEEK_DATA/SEEK_HOLE answers for a regular image file only; a block
        # device (or a filesystem refusing them) is all data.
        self._seek_holes = False
        self._punch_ok = True  # False once the filesystem refused to punch
        self._punched = False  # a hole punched since the last flush
        self._mark_unsynced = False  # its identity mark set since (imageid.mark)
        # Resync may copy to and from this image in the kernel (open() sets it
        # for a regular file whose blocking calls are the real ones), and did
        # since the last flush.
        self._kernel_copy = False
        self._kernel_copied = False
        # The same image opened again with O_DIRECT, for a resync pass's
        # copies into it (`open_direct_for_copies`); -1 outside a pass.
        self._direct_fd = -1
        self._direct_ok = True
        # The image was created empty by open() and nothing has been written
        # to it since but its first resync's copies: where that copy's source
        # has holes it reads as zeros already, so the copy need not punch
        # them. Any other write (or punch) clears it, as does the end of that
        # resync pass: a later copy may meet a hole where the image has data.
        self.fresh = False
        self._nowait_skip = 0
        self._nowait_backoff = 0
        # A subclass that replaces the blocking calls (tests injecting delays
        # or faults) keeps them on every path: no io_uring, no kernel copy.
        cls = type(self)
        self._real_io = (cls._pread_sync is Plex._pread_sync
                          and cls._pwrite_sync is Plex._pwrite_sync)

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def path(self) -> Path:
        return Path(self.record.path)

    @property
    def state(self) -> str:
        return self.record.state

    def open(self, *, create: bool = False) -> None:
        """Open the image (creating it sparse at the volume size if allowed)."""
        flags = os.O_RDWR | os.O_CLOEXEC
        if create:
            flags |= os.O_CREAT
        fd = os.open(self.path, flags, 0o600)
        try:
            lock_exclusive(fd, self.path, "plex image")  # held until close()
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode):
                self._seek_holes = True
                self._kernel_copy = self._real_io
                if st.st_size == 0 and create:
                    os.ftruncate(fd, self.size)
                    self.fresh = True
                elif st.st_size != self.size:
                    # (A mirror's image is the volume's size, a column a share of it.)
                    raise OSError(errno.EINVAL, f"image {self.path} is {st.st_size} bytes, "
                                                f"it must be {self.size} bytes")
        except BaseException:
            close_locked(fd)
            raise
        self.fd = fd

    def close(self) -> None:
        self.fresh = False  # reopened, it may hold anything
        self._pool.stop()
        self.close_direct_for_copies()
        if self.fd >= 0 and self.inflight:
            # A write still in the kernel (io_uring's worker looks the fd up
            # only when it starts) or a thread would reach whatever file got
            # this number next: the file stays open instead. Callers close
            # with the volume's gate held, which waits for writes: this is
            # a bug's guard, not a path.
            log.critical("plex %s: closed with %d write(s) in flight: its file %s stays "
                         "open until the daemon exits", self.name, self.inflight, self.path)
            self.fd = -1
        if self.fd >= 0:
            close_locked(self.fd)
            self.fd = -1

    def identity(self) -> list[int] | None:
        """What says 'this is the same image that left': device, inode, size, mtime."""
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]

    async def prepare_attach(self) -> None:
        """What an attach must learn that may take a while, done before the
        attach takes the write gate (a remote plex connects and reads back
        its identity). An image file's identity is one stat: nothing to do."""

    def drop_prepared(self) -> None:
        """Forget what `prepare_attach` got, if the attach did not use it."""

    def start_on_loop(self) -> None:
        """In trio, after `open` ran in a worker thread (`vmd start` opens a
        volume off the event loop): start what needs the loop. An image
        file needs nothing."""

    def why_changed(self) -> str:
        """Why this image is not the one that left (so its FastResync map
        cannot be trusted); "" if it is."""
        rec = self.record
        now = self.identity()
        if now is None:
            return f"its image {rec.path} is missing"
        if rec.identity is None:
            return "its identity was not recorded when it left"
        if now != rec.identity:
            names = ("device", "inode", "size", "mtime")
            diff = [n for n, a, b in zip(names, now, rec.identity) if a != b]
            return (f"its image {rec.path} changed while it was away "
                    f"({', '.join(diff)} differ): the map cannot be trusted")
        return ""

    def status_extra(self) -> dict[str, Any]:
        """What `vmd status` shows of this kind of plex beyond the common fields."""
        return {}

    # Synchronous parts, run in a worker thread. Tests subclass these to inject
    # latency or faults where the real call would block or fail.

    def _pread_sync(self, off: int, size: int, into: memoryview | None = None
                    ) -> bytes | memoryview:
        """Read [off, off+size), into `into` if given (no allocation: resync
        reuses one buffer, which matters for 4 MiB chunks)."""
        if into is None:
            data = os.pread(self.fd, size, off)
            if len(data) < size:
                if not data:
                    raise self.end_of_image(off)
                data += self._pread_sync(off + len(data), size - len(data))
            return data
        view = into[:size]
        done = 0
        while done < size:
            n = os.preadv(self.fd, [view[done:]], off + done)
            if n <= 0:
                raise self.end_of_image(off + done)
            done += n
        return view

    def end_of_image(self, at: int, image_size: int | None = None) -> OSError:
        """The error of a read that met the end of the image at `at`, inside
        the volume. An image is always the volume's size (created so, grown
        with it, refused at attach and start otherwise), so a shorter one was
        cut while in use: what lay past its end is lost, not zeros, and
        reading it as zeros would serve them, resync them and let verify
        repair the good copies with them."""
        if image_size is None:
            try:
                image_size = os.fstat(self.fd).st_size
            except OSError:
                image_size = at
        # Raised inside a PlexIOError, which names the plex and its image.
        return OSError(errno.EIO, f"the image ends at offset {image_size}, short of the "
                                  f"{self.size} bytes it must have (truncated while in use?)")

    def _pwrite_sync(self, off: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, off)
            if n <= 0:
                raise OSError(errno.EIO, "short write")
            view = view[n:]
            off += n

    def _pwritev_sync(self, off: int, bufs: list[Any]) -> None:
        """The buffers one after the other from `off`, with no copy into one."""
        views = [memoryview(b) for b in bufs if len(b)]
        while views:
            n = os.pwritev(self.fd, views[:IOV_MAX], off)
            if n <= 0:
                raise OSError(errno.EIO, "short write")
            off += n
            while n and n >= len(views[0]):
                n -= len(views.pop(0))
            if n:
                views[0] = views[0][n:]

    def _flush_sync(self, fd: int | None = None) -> None:
        if self._punched or self._kernel_copied or self._mark_unsynced:
            # Not every filesystem counts a punched hole as data that
            # fdatasync must make durable (it is a metadata change), nor the
            # extents a kernel copy may share with its source (reflink), nor
            # an extended attribute.
            self._punched = self._kernel_copied = self._mark_unsynced = False
            os.fsync(self.fd if fd is None else fd)
        else:
            os.fdatasync(self.fd if fd is None else fd)

    def data_ranges(self, off: int, length: int) -> list[tuple[int, int]]:
        """(offset, length) of the allocated ranges of [off, off+length), in
        order; the rest reads as zeros. Blocking (lseek): call it from a worker
        thread. Where the image cannot say, all of it (copying is always safe)."""
        if not self._seek_holes:
            return [(off, length)]
        end = off + length
        # Past the end of a short image SEEK_DATA finds nothing: a hole to
        # copy or compare as zeros, where the data was lost.
        image_size = os.fstat(self.fd).st_size
        if image_size < end:
            raise self.end_of_image(off, image_size)
        out: list[tuple[int, int]] = []
        pos = off
        while pos < end:
            try:
                data = os.lseek(self.fd, pos, os.SEEK_DATA)
                hole = os.lseek(self.fd, data, os.SEEK_HOLE)
            except OSError as e:
                if e.errno == errno.ENXIO:  # no data from pos to the end of the file
                    break
                if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                    self._seek_holes = False
                    return [(off, length)]
                raise
            if data >= end:
                break
            hole = min(hole, end)
            out.append((data, hole - data))
            pos = hole
        return out

    def _punch_sync(self, off: int, length: int) -> None:
        """Make [off, off+length) read as zeros: punch it, or write zeros where
        the filesystem (or device) cannot punch."""
        if self._punch_ok:
            try:
                punch_hole(self.fd, off, length)
                self._punched = True
                return
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.ENODEV):
                    raise
                self._punch_ok = False
        zeros = bytes(min(length, ZERO_CHUNK))
        end = off + length
        while off < end:
            n = min(len(zeros), end - off)
            self._pwrite_sync(off, memoryview(zeros)[:n])
            off += n

    def _pread_cached(self, off: int, size: int) -> bytearray | None:
        """The bytes if the page cache holds them all (RWF_NOWAIT), else None."""
        buf = bytearray(size)
        try:
            n = os.preadv(self.fd, [buf], off, os.RWF_NOWAIT)
        except BlockingIOError:
            return None
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                self._nowait_reads = False  # not on this filesystem: threads only
                return None
            raise
        return buf if n == size else None

    def _ring(self) -> Ring | None:
        if not self._real_io:
            return None
        ring = Ring.get()
        return None if ring is None or ring.full else ring

    async def pread(self, off: int, size: int, *, alone: Alone = None,
                    ahead: tuple[int, int] | None = None) -> bytes | bytearray:
        """Read [off, off+size). `alone` (see Alone): asked right before the
        read, so that a read that waited (a gate, a failed plex's record)
        counts who came meanwhile. `ahead` (start, length), around the range:
        if the page cache was not found to hold the range, start reading
        that too (a hint: this read waits only for its own range), so that
        the next reads near it find it there (RAID-5's small writes)."""
        if alone is not None and size < PARALLEL_BYTES and self.read_inline() and alone():
            return self._pread_inline(off, size)
        try:
            data = self._probe_cache(off, size)
        except OSError as e:
            raise PlexIOError(self, "read", off, e) from e
        if data is not None:
            self.reads += 1
            return data
        if ahead is not None:
            self.will_read(*ahead)  # one disk read for the range and around it
        return await self._pread_async(off, size)

    async def _pread_async(self, off: int, size: int) -> bytes | bytearray:
        ring = self._ring()
        if ring is not None:
            try:
                data = await ring.pread(self.fd, off, size)
            except EndOfFile as e:
                raise PlexIOError(self, "read", off, self.end_of_image(e.offset)) from e
            except OSError as e:
                raise PlexIOError(self, "read", off, e) from e
        else:
            try:
                data = await self._pool.run(self._pread_sync, off, size)
            except OSError as e:
                raise PlexIOError(self, "read", off, e) from e
        self.reads += 1
        return data

    def _probe_cache(self, off: int, size: int) -> bytearray | None:
        """The range from the page cache, if all of it is there (RWF_NOWAIT):
        one system call, where io_uring's submit and reap of a hit cost the
        loop several µs of Python. A miss costs a call, not the read: the
        kernel has started it, and the ring's read waits for it. After
        misses, skip the probe for a while (doubling; a hit halves it), so
        that cold random reads, with a hit now and then, pay little for it."""
        if self._nowait_skip:
            self._nowait_skip -= 1
            return None
        if not self._nowait_reads or size >= PARALLEL_BYTES or not self.read_hold.open():
            return None  # (a plex held for slow reads: nothing of it on the loop)
        data = self._pread_cached(off, size)
        if data is None:
            self._nowait_backoff = min(256, self._nowait_backoff * 2 or 1)
            self._nowait_skip = self._nowait_backoff
        else:
            self._nowait_backoff //= 2
        return data

    def write_inline(self) -> bool:
        return self.inline and self.write_hold.open()

    def read_inline(self) -> bool:
        return self.inline and self.read_hold.open()

    @property
    def slow_writes(self) -> int:
        return self.write_hold.stalls

    @property
    def slow_reads(self) -> int:
        return self.read_hold.stalls

    def _pread_inline(self, off: int, size: int) -> bytes:
        """A small read alone, made right here, blocking the event loop for
        the one disk read that the only request in progress waits for anyway.
        Through io_uring the same cold 4 KiB read costs the loop a wake-up,
        a trip through trio's scheduler and the kernel's asynchronous
        buffered-read path: through a loop device, 5.5k against 7.3k reads a
        second with numjobs 1 (docs/performance.md). A read that slept for
        over INLINE_BUDGET moves this plex's reads off the loop for a while
        (onloop.Hold). What it cannot bound: a disk that stops answering
        holds the loop until it answers or fails (as a page-cache write
        throttled behind it can); vmd/onloop.py then names the plex in the
        log."""
        try:
            data = self.read_hold.call(self, "read", off, self._pread_sync, off, size)
        except OSError as e:
            raise PlexIOError(self, "read", off, e) from e
        self.reads += 1
        self.inline_reads += 1
        return data  # type: ignore[return-value]

    def pwrite_inline(self, off: int, data: bytes | memoryview) -> None:
        """Write from the event loop (the caller checked write_inline())."""
        self.fresh = False
        try:
            self.write_hold.call(self, "write", off, self._pwrite_sync, off, data)
        except OSError as e:
            raise PlexIOError(self, "write", off, e) from e
        self.writes += 1
        self.bytes_written += len(data)

    async def pwrite(self, off: int, data: bytes | memoryview) -> None:
        if self.write_inline():
            self.pwrite_inline(off, data)
        else:
            await self.pwrite_async(off, data)

    @contextmanager
    def _in_flight(self, what: str, off: int) -> Iterator[None]:
        """Count a change under way (an identity read after a failure must wait
        for it) and name this plex in its error."""
        self.inflight += 1
        try:
            yield
        except OSError as e:
            raise PlexIOError(self, what, off, e) from e
        finally:
            self.inflight -= 1

    async def pwrite_async(self, off: int, data: bytes | memoryview) -> None:
        """Write without blocking the event loop: io_uring, or a worker thread."""
        self.fresh = False
        with self._in_flight("write", off):
            # A big write goes to the kernel's worker (IOSQE_ASYNC): io_uring
            # would otherwise copy it into the page cache inside the submit,
            # on the event loop's thread, after the copy the loop makes into
            # another plex (not beside it).
            ring = self._ring()
            if ring is None:
                done = False
            elif len(data) >= PARALLEL_BYTES:
                done = await ring.pwritev_async(self.fd, off, [data])
            else:
                done = await ring.pwrite(self.fd, off, data)
            if not done:  # no ring, or a buffer it cannot take as it is
                await self._pool.run(self._pwrite_sync, off, data)
        self.writes += 1
        self.bytes_written += len(data)

    async def pwritev_async(self, off: int, bufs: list[Any]) -> None:
        """pwrite_async of the buffers end to end, without joining them first
        (a RAID-5 column's units of one write: the join cost the event loop a
        copy of every byte): one writev in the kernel's io_uring worker, or
        in a worker thread where there is no ring. A subclass that replaces
        the blocking calls gets them joined, through its own `_pwrite_sync`."""
        if len(bufs) == 1 or not self._real_io:
            await self.pwrite_async(off, bufs[0] if len(bufs) == 1 else b"".join(bufs))
            return
        self.fresh = False
        with self._in_flight("write", off):
            ring = self._ring()
            if ring is None or not await ring.pwritev_async(self.fd, off, bufs):
                await self._pool.run(self._pwritev_sync, off, bufs)
        self.writes += 1
        self.bytes_written += sum(map(len, bufs))

    async def punch(self, off: int, size: int) -> None:
        """Make [off, off+size) read as zeros (`_punch_sync`), off the event loop."""
        self.fresh = False
        with self._in_flight("punch", off):
            await self._pool.run(self._punch_sync, off, size)
        self.writes += 1

    async def allocated(self, off: int, size: int) -> list[tuple[int, int]]:
        """`data_ranges` off the event loop; all of it if the image cannot say."""
        try:
            return await self._pool.run(self.data_ranges, off, size)
        except OSError:
            return [(off, size)]  # copying (or keeping) everything is always safe

    def will_read(self, off: int, size: int) -> None:
        """Start reading [off, off+size) into the page cache; a hint only,
        given on the event loop: none while the plex is held for slow reads
        (its bio submission could wait there, unnamed by the watch)."""
        if self.fd >= 0 and self.read_hold.open():
            try:
                os.posix_fadvise(self.fd, off, size, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass

    async def flush(self) -> None:
        # Flushes run outside the volume's gate (fsync, the DRL cleaner), so a
        # detach or attach may close self.fd before the worker thread runs:
        # sync a duplicate of it, which stays the same open file meanwhile.
        if self.fd < 0:
            return
        try:
            fd = os.dup(self.fd)
        except OSError as e:
            raise PlexIOError(self, "fdatasync", 0, e) from e
        try:
            await self._pool.run(self._flush_sync, fd)
        except OSError as e:
            raise PlexIOError(self, "fdatasync", 0, e) from e
        finally:
            os.close(fd)
