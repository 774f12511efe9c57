"""io_uring plex I/O (vmd/uring.py): real rings on real files, pipes and a
full tmpfs; and the thread fallback giving the same bytes."""

from __future__ import annotations

import ctypes
import errno
import os
import random

import pytest
import trio

from vmd.config import KiB, MiB
from vmd.plex import Plex, PlexIOError
from vmd.sidecar import ACTIVE, PlexRecord
from vmd import uring
from vmd.uring import EndOfFile, Ring

from enginekit import plex_bytes, random_writes, running_volume, volume_config


async def ring_or_skip() -> Ring:
    ring = Ring.get()
    if ring is None:
        pytest.skip(f"no io_uring here ({Ring._disabled_reason}); plexes use threads")
    return ring


async def test_read_write_roundtrip(tmp_path):
    ring = await ring_or_skip()
    path = tmp_path / "img"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, 1 * MiB)
        assert await ring.pwrite(fd, 4096, b"a" * 8192)
        src = bytearray(b"0123456789" * 10)
        assert await ring.pwrite(fd, 100, memoryview(src)[10:60])  # a slice, no copy
        assert await ring.pread(fd, 4096, 8192) == b"a" * 8192
        assert await ring.pread(fd, 100, 50) == bytes(src[10:60])
        # A read past the end of the file is an error (EIO) saying where the
        # file ends, never zeros: a plex image cut short lost that data.
        with pytest.raises(EndOfFile) as err:
            await ring.pread(fd, 1 * MiB - 10, 100)
        assert err.value.errno == errno.EIO and err.value.offset == 1 * MiB
        # A read-only view (of FUSE's bytes) is handed over as it is, no copy.
        assert await ring.pwrite(fd, 0, memoryview(b"xyz")[1:]) is True
        assert await ring.pread(fd, 0, 3) == b"yz\0"
    finally:
        os.close(fd)
    assert path.read_bytes()[4096:4096 + 8192] == b"a" * 8192


async def test_writev_of_buffers_end_to_end_in_the_kernels_worker(tmp_path):
    # A RAID-5 column's units of one write: bytes, a read-only view of
    # bytes (FUSE's), a bytearray (the parity), written end to end without
    # a join, by the kernel's worker (IOSQE_ASYNC), not a Python thread.
    ring = await ring_or_skip()
    path = tmp_path / "img"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    fuse = os.urandom(3 * 64 * KiB)
    bufs = [b"a" * 4096, memoryview(fuse)[64 * KiB:2 * 64 * KiB], bytearray(b"p" * 100),
            b"", memoryview(fuse)[7:64 * KiB]]
    try:
        before = ring.submitted
        assert await ring.pwritev_async(fd, 12345, bufs)
        assert ring.submitted == before + 1  # one request for all of them
        want = b"".join(bytes(b) for b in bufs)
        assert await ring.pread(fd, 12345, len(want)) == want
    finally:
        os.close(fd)
    with pytest.raises(OSError) as ei:
        await ring.pwritev_async(fd, 0, [b"x", b"y"])  # closed descriptor
    assert ei.value.errno == errno.EBADF


async def test_writev_of_more_buffers_than_the_kernel_takes_at_once(tmp_path):
    # UIO_MAXIOV (1024): more in one request is EINVAL, and a healthy column
    # would have failed; they go in requests of 1024 (review 14).
    ring = await ring_or_skip()
    fd = os.open(tmp_path / "img", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        bufs = [bytes([i % 251]) * 512 for i in range(2 * 1024 + 3)]
        before = ring.submitted
        assert await ring.pwritev_async(fd, 4096, bufs)
        assert ring.submitted == before + 3
        assert os.pread(fd, len(bufs) * 512, 4096) == b"".join(bufs)
    finally:
        os.close(fd)


async def test_a_short_writev_goes_on_at_the_right_offset_and_buffer(tmp_path, monkeypatch):
    # The kernel made to write at most `cap` bytes per writev (as a short
    # write would): the continuation still writes every byte in place.
    # From review 14.
    ring = await ring_or_skip()
    real_run = Ring._run
    calls = []

    async def capped(self, opcode, fd, off, addr, length, keep, flags=0, cancellable=True):
        if opcode != uring._OP_WRITEV:
            return await real_run(self, opcode, fd, off, addr, length, keep, flags, cancellable)
        iov = (ctypes.c_uint64 * (2 * length)).from_address(addr)
        segs, left = [], cap
        for i in range(length):
            if left <= 0:
                break
            n = min(iov[2 * i + 1], left)
            segs += [iov[2 * i], n]
            left -= n
        new = (ctypes.c_uint64 * len(segs))(*segs)
        calls.append(len(segs) // 2)
        return await real_run(self, opcode, fd, off, ctypes.addressof(new), len(segs) // 2,
                              (keep, new), flags, cancellable)

    monkeypatch.setattr(Ring, "_run", capped)
    rnd = random.Random(14)
    fd = os.open(tmp_path / "img", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        for cap in (1, 7, 4096, 5000, 65537):
            bufs: list = []
            for _ in range(4 if cap == 1 else 12):
                kind = rnd.randrange(3)
                n = rnd.choice([0, 1, 100, 4096, 10000])
                raw = os.urandom(n + 5)
                bufs.append(raw[:n] if kind == 0 else memoryview(raw)[5:] if kind == 1
                            else bytearray(raw[:n]))
            want = b"".join(bytes(b) for b in bufs)
            off = rnd.randrange(1 << 20)
            os.ftruncate(fd, 0)
            assert await ring.pwritev_async(fd, off, bufs)
            assert os.pread(fd, len(want) + 10, off) == want
    finally:
        os.close(fd)
    assert len(calls) > 5


@pytest.mark.allow_log(r"closed with 1 write\(s\) in flight")
async def test_a_plex_closed_with_a_write_in_flight_keeps_its_file_open(tmp_path):
    # io_uring's worker looks a write's fd up only when it starts: closed
    # meanwhile, the number could name another file by then (review 14 saw
    # the write land there). The callers close under the volume's gate,
    # which waits for writes; close() itself refuses to let the number go.
    plex = Plex(PlexRecord(name="p0", path=str(tmp_path / "p0.img"), state=ACTIVE,
                            missing=None), 1 * MiB)
    plex.open(create=True)
    fd = plex.fd
    plex.inflight += 1  # as a write under way
    plex.close()
    assert plex.fd == -1
    os.fstat(fd)  # still open: no other file can get its number
    plex.inflight -= 1
    os.close(fd)


async def test_errors_come_back_as_oserror(tmp_path):
    ring = await ring_or_skip()
    fd = os.open(tmp_path / "img", os.O_RDONLY | os.O_CREAT, 0o600)
    os.close(fd)
    with pytest.raises(OSError) as ei:
        await ring.pread(fd, 0, 4096)  # closed descriptor
    assert ei.value.errno == errno.EBADF
    ro = os.open(tmp_path / "img", os.O_RDONLY)
    try:
        with pytest.raises(OSError) as ei:
            await ring.pwrite(ro, 0, b"x" * 10)
        assert ei.value.errno == errno.EBADF
    finally:
        os.close(ro)


async def test_completion_that_waits_is_reaped_by_polling_the_ring():
    """A read of an empty pipe cannot finish at submission: the task sleeps
    until the reaper sees the completion (the path of every cache miss)."""
    ring = await ring_or_skip()
    r, w = os.pipe()
    try:
        got: list[bytes] = []

        async def reader() -> None:
            got.append(bytes(await ring.pread(r, 0, 5)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.sleep(0.1)
            assert got == []  # still waiting
            os.write(w, b"hello")
        assert got == [b"hello"]
    finally:
        os.close(r)
        os.close(w)


async def test_many_cold_reads_in_flight(tmp_path):
    """200 concurrent reads of data not in the page cache all return their own bytes."""
    ring = await ring_or_skip()
    path = tmp_path / "img"
    data = random.Random(7).randbytes(8 * MiB)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        offs = [random.Random(i).randrange(0, 8 * MiB - 4096) for i in range(200)]
        results: dict[int, bytes] = {}
        waited_before = ring.submitted - ring.completed_at_submit

        async def one(i: int) -> None:
            results[i] = bytes(await ring.pread(fd, offs[i], 4096))

        async with trio.open_nursery() as nursery:
            for i in range(len(offs)):
                nursery.start_soon(one, i)
    finally:
        os.close(fd)
    for i, off in enumerate(offs):
        assert results[i] == data[off:off + 4096], f"read {i} at {off}"
    # Some of them really went to the disk asynchronously.
    assert ring.submitted - ring.completed_at_submit > waited_before


@pytest.mark.parametrize("how", ["pwrite 64 KiB", "pwrite 256 KiB", "pwritev"])
async def test_plex_write_to_a_full_filesystem_fails_with_enospc(tmp_path, sysres, how):
    # Small writes through the ring as they are, big ones and a column's
    # units (pwritev) in the kernel's worker (IOSQE_ASYNC): the error of
    # either comes back as the plex's.
    ring = await ring_or_skip()
    mnt = sysres.mount("tmpfs", tmp_path / "small", "-t", "tmpfs", "-o", "size=1m")
    plex = Plex(PlexRecord(name="p0", path=os.path.join(mnt, "p0.img"), state=ACTIVE,
                            missing=None), 8 * MiB)
    plex.open(create=True)
    size = 256 * KiB if how == "pwrite 256 KiB" else 64 * KiB
    try:
        before = ring.submitted
        with pytest.raises(PlexIOError) as ei:
            for off in range(0, 8 * MiB, size):
                if how == "pwritev":
                    half = size // 2
                    await plex.pwritev_async(off, [b"z" * half, memoryview(b"y" * size)[:half]])
                else:
                    await plex.pwrite_async(off, b"z" * size)
        assert ei.value.errno == errno.ENOSPC
        assert "p0" in str(ei.value)
        assert ring.submitted > before  # the ring did the writes, not a thread
    finally:
        plex.close()


@pytest.mark.parametrize("uring", ["1", "0"])
async def test_volume_bytes_same_with_and_without_uring(tmp_path, monkeypatch, uring):
    """Random writes and reads through a volume give identical plexes equal to
    the reference, on io_uring and on the worker-thread fallback."""
    monkeypatch.setenv("VMD_URING", uring)
    ring = Ring.get()
    if uring == "0":
        assert ring is None
    else:
        ring = await ring_or_skip()
    vc = volume_config(tmp_path, size=16 * MiB)
    ref = bytearray(vc.size)
    async with running_volume(vc) as vol:
        await random_writes(vol, ref, 300, seed=3, max_len=512 * KiB)
        for off in range(0, vc.size, 1 * MiB):
            assert await vol.pread(off, 1 * MiB) == ref[off:off + MiB]
        if ring is not None:
            # Reads and the writes below PARALLEL_BYTES (bigger ones go to threads).
            assert ring.submitted > 0, ring.submitted
    a, b = plex_bytes(vc.plexes)
    assert a == b == ref


async def test_a_short_write_cancelled_between_its_parts_is_written_whole(tmp_path, monkeypatch):
    """Review 14, F3: a cancel that came while the first part of a short
    write was in the kernel stopped it half done (the thread path always
    finished). Now the parts after the first are not cancellable."""
    ring = await ring_or_skip()
    real_run = Ring._run
    scope = trio.CancelScope()
    parts = []

    async def short(self, opcode, fd, off, addr, length, keep, flags=0, cancellable=True):
        if opcode == uring._OP_WRITEV:  # the first buffer's first 4 KiB only
            iov = (ctypes.c_uint64 * (2 * length)).from_address(addr)
            one = (ctypes.c_uint64 * 2)(iov[0], min(iov[1], 4096))
            addr, length, keep = ctypes.addressof(one), 1, (keep, one)
        else:
            length = min(length, 4096)
        got = await real_run(self, opcode, fd, off, addr, length, keep, flags, cancellable)
        parts.append(got)
        scope.cancel()  # as if it came while that part was in the kernel
        return got

    monkeypatch.setattr(Ring, "_run", short)
    fd = os.open(tmp_path / "img", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        for write in ("pwrite", "pwritev_async"):
            data = os.urandom(64 * 1024 + 100)
            parts.clear()
            os.ftruncate(fd, 0)
            scope = trio.CancelScope()
            with scope:
                if write == "pwrite":
                    await ring.pwrite(fd, 8192, data)
                else:
                    await ring.pwritev_async(fd, 8192, [data[:30000], memoryview(data)[30000:]])
                await trio.sleep(0)  # the cancel lands here, once the write is whole
            assert scope.cancelled_caught, write
            assert len(parts) > 10, (write, parts)
            assert os.pread(fd, len(data) + 10, 8192) == data, write
    finally:
        os.close(fd)
