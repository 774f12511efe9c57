"""io_uring for plex reads and writes, from the event loop, without threads.

Handing a request to a worker thread and back costs about 100 µs of CPU in
Python (queue, wake-ups, the GIL changing hands), more than a 4 KiB disk read
on a fast disk. With io_uring the kernel does the I/O asynchronously (buffered
reads that miss the page cache, writes it punts to its own workers) and the
event loop learns of completions by polling the ring's fd (readable while
completions wait to be reaped). A request that the
kernel can finish at once (a page-cache hit) completes inside the submitting
call and costs one system call. Big writes (`pwritev_async`) go to the
kernel's worker at once (IOSQE_ASYNC): their copy into the page cache runs
there, beside the event loop, and no Python thread has to take the GIL
back after it (a RAID-5 column's units: 1 074 → 918 µs of daemon CPU per
MiB written, docs/performance.md).

Pure ctypes + mmap: the stack has no io_uring binding. Used only where it is
safe and available; otherwise `Ring.get()` returns None and plexes use their
worker threads as before:
  * x86-64 only: completions are read from shared memory without an acquire
    barrier, which x86's ordering of stores makes unnecessary;
  * kernel ≥ 5.6 (IORING_OP_READ/WRITE) and io_uring not disabled by sysctl;
  * VMD_URING=0 in the environment turns it off (comparisons, bug hunts).

One ring per trio run, with a system task that reaps completions.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import logging
import mmap
import os
import platform
import struct
from typing import Any

import outcome
import trio

log = logging.getLogger(__name__)

_SYS_SETUP, _SYS_ENTER = 425, 426  # the same on every 64-bit ABI
_OP_WRITEV, _OP_READ, _OP_WRITE = 2, 22, 23
_SQE_ASYNC = 1 << 4  # IOSQE_ASYNC: straight to the kernel's io-wq worker
IOV_MAX = 1024  # buffers per writev (Linux's UIO_MAXIOV)
_FEAT_SINGLE_MMAP = 1 << 0
_FEAT_NODROP = 1 << 1
_OFF_SQ_RING, _OFF_CQ_RING, _OFF_SQES = 0, 0x8000000, 0x10000000

ENTRIES = 256  # in flight at once; past that, callers fall back to threads

_SQE = struct.Struct("<BBHiQQIIQHHiQQ")  # struct io_uring_sqe, 64 bytes
_CQE = struct.Struct("<QiI")  # struct io_uring_cqe, 16 bytes
_U32 = struct.Struct("<I")
assert _SQE.size == 64 and _CQE.size == 16


class _SqOffsets(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint32) for n in
                ("head", "tail", "ring_mask", "ring_entries", "flags", "dropped", "array", "resv1")
                ] + [("user_addr", ctypes.c_uint64)]


class _CqOffsets(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint32) for n in
                ("head", "tail", "ring_mask", "ring_entries", "overflow", "cqes", "flags", "resv1")
                ] + [("user_addr", ctypes.c_uint64)]


class _Params(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint32) for n in
                ("sq_entries", "cq_entries", "flags", "sq_thread_cpu", "sq_thread_idle",
                 "features", "wq_fd")] + [("resv", ctypes.c_uint32 * 3),
                                          ("sq_off", _SqOffsets), ("cq_off", _CqOffsets)]


_libc = ctypes.CDLL(None, use_errno=True)


def _syscall_fn(nargs: int) -> Any:
    # syscall(2) is variadic; declaring every argument a long puts full 64-bit
    # values in the registers the kernel reads.
    fn = _libc["syscall"]  # a new function object per call: own argtypes
    fn.restype = ctypes.c_long
    fn.argtypes = [ctypes.c_long] * (nargs + 1)
    return fn


_setup = _syscall_fn(2)
_enter = _syscall_fn(6)


def _check(ret: int, what: str) -> int:
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return ret


class EndOfFile(OSError):
    """A read met the end of the file at `offset`, short of what it asked:
    an I/O error (EIO), never zeros (the caller names the file)."""

    def __init__(self, offset: int):
        super().__init__(errno.EIO, f"end of file at offset {offset}")
        self.offset = offset


class _Op:
    __slots__ = ("task", "res", "keep")

    def __init__(self, keep: Any):
        self.task: Any = None
        self.res: int | None = None
        self.keep = keep  # the buffer (and its ctypes view): alive until the kernel is done


class _PyBuffer(ctypes.Structure):
    # Py_buffer, as CPython lays it out (the stable ABI since 3.11); only
    # `buf` is read. `obj` is a plain pointer here: the reference the call
    # takes is PyBuffer_Release's to drop, not ctypes'.
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int),
                ("ndim", ctypes.c_int), ("format", ctypes.c_char_p),
                ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]


def _address(buf: Any) -> tuple[int, Any] | None:
    """(address, object keeping it valid) of a buffer's bytes, without copying;
    None for a buffer that is not contiguous."""
    if isinstance(buf, bytes):
        p = ctypes.c_char_p(buf)  # points into the bytes object itself
        return ctypes.cast(p, ctypes.c_void_p).value or 0, (p, buf)
    mv = memoryview(buf)
    if not mv.c_contiguous:
        return None
    if mv.readonly:
        # A view of FUSE's bytes (a RAID-5 unit of a write): its address
        # through the buffer protocol; the view, kept, keeps it valid.
        pb = _PyBuffer()
        _get_buffer(mv, ctypes.byref(pb), 0)  # PyBUF_SIMPLE
        addr = pb.buf or 0
        _release_buffer(ctypes.byref(pb))
        return addr, mv
    c = (ctypes.c_char * mv.nbytes).from_buffer(mv)
    return ctypes.addressof(c), (c, mv)


class Ring:
    _current: trio.lowlevel.RunVar[Ring | None] = trio.lowlevel.RunVar("vmd_uring")
    _disabled_reason: str | None = None

    @classmethod
    def get(cls) -> Ring | None:
        """The ring of the running trio loop, set up on first use; None where
        io_uring cannot be used (logged once)."""
        try:
            return cls._current.get()
        except LookupError:
            pass
        ring: Ring | None = None
        reason = cls._unsupported()
        if reason is None:
            try:
                ring = cls(ENTRIES)
            except OSError as e:
                reason = f"io_uring setup failed: {e}"
        if ring is None:
            if cls._disabled_reason != reason:
                log.info("plex I/O through worker threads (%s)", reason)
                cls._disabled_reason = reason
        else:
            trio.lowlevel.spawn_system_task(ring._reap_forever, name="vmd-uring-reaper")
        cls._current.set(ring)
        return ring

    @staticmethod
    def _unsupported() -> str | None:
        if os.environ.get("VMD_URING", "1") == "0":
            return "VMD_URING=0"
        if platform.machine() not in ("x86_64", "AMD64"):
            return f"io_uring is used on x86-64 only, this is {platform.machine()}"
        return None

    def __init__(self, entries: int):
        p = _Params()
        self.fd = _check(_setup(_SYS_SETUP, entries, ctypes.addressof(p)),
                         "io_uring_setup")
        try:
            if not p.features & _FEAT_NODROP:
                raise OSError(errno.ENOSYS, "kernel too old (no IORING_FEAT_NODROP)")
            sq_size = p.sq_off.array + p.sq_entries * 4
            cq_size = p.cq_off.cqes + p.cq_entries * _CQE.size
            if p.features & _FEAT_SINGLE_MMAP:
                self._sq = self._cq = mmap.mmap(self.fd, max(sq_size, cq_size), offset=_OFF_SQ_RING)
            else:
                self._sq = mmap.mmap(self.fd, sq_size, offset=_OFF_SQ_RING)
                self._cq = mmap.mmap(self.fd, cq_size, offset=_OFF_CQ_RING)
            self._sqes = mmap.mmap(self.fd, p.sq_entries * _SQE.size, offset=_OFF_SQES)
        except BaseException:
            os.close(self.fd)
            raise
        self.entries = p.sq_entries
        self._sq_mask = _U32.unpack_from(self._sq, p.sq_off.ring_mask)[0]
        self._cq_mask = _U32.unpack_from(self._cq, p.cq_off.ring_mask)[0]
        self._sq_tail_off = p.sq_off.tail
        self._cq_head_off = p.cq_off.head
        self._cq_tail_off = p.cq_off.tail
        self._cqes_off = p.cq_off.cqes
        self._sq_tail = _U32.unpack_from(self._sq, p.sq_off.tail)[0]
        self._cq_head = _U32.unpack_from(self._cq, p.cq_off.head)[0]
        # Slot i of the SQ array always names SQE i: submissions are in order.
        for i in range(p.sq_entries):
            _U32.pack_into(self._sq, p.sq_off.array + 4 * i, i)
        self._ops: dict[int, _Op] = {}
        self._ids = itertools.count(1)
        self.submitted = 0
        self.completed_at_submit = 0
        self.reads_waited = 0  # reads not done at submit: the page cache lacked them

    @property
    def full(self) -> bool:
        return len(self._ops) >= self.entries

    # -- the block operations --------------------------------------------------

    async def pread(self, fd: int, off: int, size: int) -> bytearray:
        """Read [off, off+size) of fd; EndOfFile if the file ends before."""
        buf = bytearray(size)
        view = memoryview(buf)
        done = 0
        while done < size:
            part = view[done:]
            addr, keep = _address(part)  # type: ignore[misc]  # a bytearray is writable
            n = await self._run(_OP_READ, fd, off + done, addr, size - done, keep)
            if n == 0:
                raise EndOfFile(off + done)
            done += n
        return buf

    async def pwrite(self, fd: int, off: int, data: bytes | bytearray | memoryview) -> bool:
        """Write all of data at off. False (nothing written) if the buffer
        cannot be passed to the kernel as is: the caller writes it another way."""
        target = _address(data)
        if target is None:
            return False
        addr, keep = target
        size = len(memoryview(data).cast("B"))
        done = 0
        while done < size:
            # The rest of a short write is not cancellable: the caller's range
            # is written whole or the error says why (review 14, F3).
            n = await self._run(_OP_WRITE, fd, off + done, addr + done, size - done, keep,
                                cancellable=not done)
            if n == 0:
                raise OSError(errno.EIO, "short write")
            done += n
        return True

    async def pwritev_async(self, fd: int, off: int, bufs: list[Any]) -> bool:
        """Write the buffers end to end from off, in the kernel's own worker
        (IOSQE_ASYNC): the copy into the page cache runs there, neither in
        the submitting call on the event loop's thread nor in a Python
        thread that must take the GIL back after it. False (nothing
        written) if a buffer cannot be passed as is."""
        targets = [_address(b) for b in bufs]
        if any(t is None for t in targets):
            return False
        lens = [len(memoryview(b).cast("B")) for b in bufs]
        segs = [(t[0], n) for t, n in zip(targets, lens) if n]  # type: ignore[index]
        keep = [t[1] for t in targets]  # type: ignore[index]
        first = True
        while segs:
            part = segs[:IOV_MAX]  # the kernel refuses more (EINVAL): the rest next
            iov = (ctypes.c_uint64 * (2 * len(part)))(*[x for seg in part for x in seg])
            n = await self._run(_OP_WRITEV, fd, off, ctypes.addressof(iov), len(part),
                                (iov, keep), flags=_SQE_ASYNC, cancellable=first)
            first = False  # begun: the rest is written whatever comes (as pwrite)
            if n <= 0:
                raise OSError(errno.EIO, "short write")
            off += n
            while segs and n >= segs[0][1]:
                n -= segs.pop(0)[1]
            if n:
                segs[0] = (segs[0][0] + n, segs[0][1] - n)
        return True

    async def _run(self, opcode: int, fd: int, off: int, addr: int, length: int, keep: Any,
                   flags: int = 0, cancellable: bool = True) -> int:
        if cancellable:
            await trio.lowlevel.checkpoint_if_cancelled()
        uid = next(self._ids)
        op = _Op(keep)
        self._ops[uid] = op
        tail = self._sq_tail
        _SQE.pack_into(self._sqes, (tail & self._sq_mask) * _SQE.size, opcode, flags, 0, fd, off,
                       addr, length, 0, uid, 0, 0, 0, 0, 0)
        self._sq_tail = tail = (tail + 1) & 0xFFFFFFFF
        _U32.pack_into(self._sq, self._sq_tail_off, tail)
        ret = _enter(_SYS_ENTER, self.fd, 1, 0, 0, 0, 0)
        if ret < 0:
            # Not taken: nothing of it reaches the kernel (EBUSY/EAGAIN are
            # resource shortages; the SQ entry is dropped with the tail below).
            e = ctypes.get_errno()
            self._sq_tail = (tail - 1) & 0xFFFFFFFF
            _U32.pack_into(self._sq, self._sq_tail_off, self._sq_tail)
            del self._ops[uid]
            raise OSError(e, f"io_uring_enter: {os.strerror(e)}")
        self.submitted += 1
        self._reap()  # a page-cache hit is done already: no wake-up needed
        if op.res is None:
            self.reads_waited += opcode == _OP_READ
            op.task = trio.lowlevel.current_task()
            # Not cancellable: the kernel may be writing into the buffer.
            res = await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
        else:
            self.completed_at_submit += 1
            res = op.res
        if res < 0:
            raise OSError(-res, os.strerror(-res))
        return res  # type: ignore[no-any-return]

    # -- completions -------------------------------------------------------------

    def _reap(self) -> None:
        head = self._cq_head
        tail = _U32.unpack_from(self._cq, self._cq_tail_off)[0]
        if head == tail:
            return
        cq, mask, base, ops = self._cq, self._cq_mask, self._cqes_off, self._ops
        while head != tail:
            uid, res, _flags = _CQE.unpack_from(cq, base + (head & mask) * _CQE.size)
            head = (head + 1) & 0xFFFFFFFF
            op = ops.pop(uid, None)
            if op is None:
                continue
            op.res = res
            op.keep = None
            if op.task is not None:
                trio.lowlevel.reschedule(op.task, outcome.Value(res))
        self._cq_head = head
        _U32.pack_into(cq, self._cq_head_off, head)

    async def _reap_forever(self) -> None:
        try:
            while True:
                # The ring fd polls readable while the completion queue is
                # not empty: no eventfd to read and reset per wake-up.
                await trio.lowlevel.wait_readable(self.fd)
                self._reap()
        finally:
            if not self._ops:
                self.close()
            # else: requests still in flight own buffers; leave the ring to the
            # process exit rather than free memory the kernel may write.

    def close(self) -> None:
        for m in {id(x): x for x in (self._sq, self._cq, self._sqes)}.values():
            m.close()
        os.close(self.fd)
