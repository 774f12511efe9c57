"""Resync's copies from one plex image to others (`ResyncCopies`, a part of
vmd/plex.py's Plex): in the kernel with copy_file_range where both are image
files, into a second open of the target with O_DIRECT for aligned ranges, or
through a buffer, where an error names the plex that failed."""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING, Any

from .iopool import IOPool
from .plexerr import PlexIOError

DIRECT_ALIGN = 4096  # O_DIRECT offsets and lengths: the largest logical block size
# copy_file_range(2) errors that mean "not between these two files" (another
# filesystem, a kernel or filesystem without it): copy through a buffer.
NO_KERNEL_COPY = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})


class ResyncCopies:
    """Plex's copy methods; its state (fd, the O_DIRECT fd, whether the
    kernel may copy) is Plex's, set up in Plex.__init__ and Plex.open."""

    if TYPE_CHECKING:
        name: str
        fd: int
        fresh: bool
        reads: int
        writes: int
        bytes_written: int
        _direct_fd: int
        _direct_ok: bool
        _kernel_copy: bool
        _kernel_copied: bool
        _pool: IOPool

        def data_ranges(self, off: int, length: int) -> list[tuple[int, int]]: ...

        def _pread_sync(self, off: int, size: int, into: memoryview | None = None
                        ) -> bytes | memoryview: ...

        def _pwrite_sync(self, off: int, data: bytes | memoryview) -> None: ...

        def _punch_sync(self, off: int, length: int) -> None: ...

    def _kernel_copy_sync(self, target: ResyncCopies, off: int, length: int) -> bool:
        """Copy [off, off+length) of this image to the same range of `target`
        with copy_file_range: at most one copy in the kernel (none into the
        target's O_DIRECT file, for aligned ranges), where a pread and a pwrite
        through a buffer make two (a lone resync is CPU-bound on them). False
        if it did not copy it all: the caller copies the range
        through a buffer again, where an error says which plex failed (this
        one's errno cannot say whether the read or the write did). Where the
        kernel cannot copy between the two files, never tried for `target` again."""
        done = 0
        out = target._direct_fd if (off | length) % DIRECT_ALIGN == 0 else -1
        try:
            while done < length:
                try:
                    n = os.copy_file_range(self.fd, target.fd if out < 0 else out,
                                           length - done, off + done, off + done)
                except OSError as e:
                    if out < 0 or e.errno != errno.EINVAL:
                        raise
                    out = -1  # O_DIRECT refused here after all: through the page cache
                    continue
                if n == 0:
                    # The source ends early: the buffered copy's read fails
                    # with the error that names this image.
                    return False
                done += n
        except OSError as e:
            if e.errno in NO_KERNEL_COPY:
                target._kernel_copy = False
            return False
        finally:
            target._kernel_copied = target._kernel_copied or done > 0
        return True

    def open_direct_for_copies(self) -> None:
        """Open this image a second time with O_DIRECT for a resync pass's
        copies into it (a worker thread of the pass calls this before its
        copies start; `close_direct_for_copies` at its end). A copy through
        the page cache leaves every byte dirty for writeback, and a lone
        resync then waited on writeback throttling of its one target file,
        far slower than four resyncs at once; with O_DIRECT both take the
        same time (bench/kernel_copy.py, docs/performance.md "Recoveries
        spread per disk"). The fsync on `fd` still makes the
        direct writes durable (it flushes the disk's cache). The data stays
        coherent: under the inode lock a direct write first writes back and
        then drops the cached pages of its range, and the range lock keeps
        the volume's other I/O of the range out meanwhile."""
        if self._direct_fd >= 0 or not self._direct_ok or not self._kernel_copy or self.fd < 0:
            return
        try:
            self._direct_fd = os.open(f"/proc/self/fd/{self.fd}",
                                      os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
        except OSError:
            self._direct_ok = False  # some FUSE filesystems, NFS options: the page cache

    def close_direct_for_copies(self) -> None:
        """After a pass (no copy runs): the O_DIRECT file is not kept open."""
        if self._direct_fd >= 0:
            os.close(self._direct_fd)
            self._direct_fd = -1

    async def copy_to(self, targets: list[ResyncCopies], off: int, size: int, buf: bytearray | None,
                      *, sparse: bool = False, pool: IOPool | None = None
                      ) -> tuple[dict[str, PlexIOError], int]:
        """Resync: copy [off, off+size) of this plex to every target, all in one
        worker thread (of `pool`, else this plex's): in the kernel where both
        are image files (`_kernel_copy_sync`), else read into `buf` (None:
        one made for it) and written. `sparse`: copy
        only the ranges allocated here and make the rest read as zeros on the
        targets (punched, except on a `fresh` target, whose unwritten ranges
        are holes already). Returns the write (or punch) errors per target, and
        the bytes copied; a read error raises. Reading ahead is the caller's
        job (`will_read`)."""

        def copy() -> tuple[dict[str, PlexIOError], int]:
            errors: dict[str, PlexIOError] = {}

            def each(op: str, at: int, method: str, *args: Any, to: list[ResyncCopies] = targets
                     ) -> None:
                # By name: a subclass's (a test's) fault injection applies.
                for t in to:
                    if t.name not in errors and (op == "write" or not t.fresh):
                        try:
                            getattr(t, method)(*args)
                        except OSError as e:
                            errors[t.name] = PlexIOError(t, op, at, e)

            try:
                data = self.data_ranges(off, size) if sparse else [(off, size)]
            except OSError as e:
                raise PlexIOError(self, "seek", off, e) from e
            pos = off
            copied = 0
            for start, length in data + [(off + size, 0)]:
                if start > pos:  # a hole in the source
                    each("punch", pos, "_punch_sync", pos, start - pos)
                if length:
                    # Through the buffer to the targets the kernel did not copy
                    # to: there an error names the plex that failed.
                    rest = [t for t in targets if t.name not in errors and not (
                        self._kernel_copy and t._kernel_copy
                        and self._kernel_copy_sync(t, start, length))]
                    if rest:
                        try:
                            view = self._pread_sync(start, length, memoryview(
                                buf if buf is not None else bytearray(length)))
                        except OSError as e:
                            raise PlexIOError(self, "read", start, e) from e
                        each("write", start, "_pwrite_sync", start, view, to=rest)
                    copied += length
                pos = start + length
            return errors, copied

        errors, copied = await (pool or self._pool).run(copy)
        self.reads += 1
        for t in targets:
            if t.name not in errors:
                t.writes += 1
                t.bytes_written += copied
        return errors, copied
