"""The volume file on a real FUSE mount, against a reference buffer."""

from __future__ import annotations

import errno
import os
import random
import signal
import stat
import threading
from pathlib import Path
from collections.abc import Callable

import pytest

from conftest import KiB, MiB, VmdDaemon, sha, volume_spec
from vmd.fusefs import READ_AHEAD_KB, mount_device

pytestmark = pytest.mark.mount

SIZE = 64 * MiB


def _random_ops(rng: random.Random, size: int, n: int) -> list[tuple[int, int]]:
    """(offset, length) pairs: aligned and unaligned, tiny to 1 MiB, at both ends."""
    ops = [(0, 1), (size - 1, 1), (size - 4096, 4096), (511, 1025), (4095, 2),
           (size - 1 * MiB - 3, 1 * MiB + 3), (3 * MiB - 7, 128 * KiB + 13)]
    for _ in range(n):
        length = rng.choice([1, 7, 512, 4096, 4097, 65536, 131072 + 5, 1 * MiB, rng.randrange(1, 300_000)])
        if rng.random() < 0.5:
            off = rng.randrange(0, size - length + 1) // 4096 * 4096
        else:
            off = rng.randrange(0, size - length + 1)
        ops.append((off, length))
    return ops


@pytest.mark.parametrize("direct_io", [True, False], ids=["direct_io", "page_cache"])
def test_random_io_matches_reference_and_every_plex(vmd_factory: Callable[..., VmdDaemon],
                                                    direct_io: bool) -> None:
    vmd = vmd_factory(volumes={"vol0": volume_spec(direct_io=direct_io)}).start()
    rng = random.Random(1234)
    ref = bytearray(SIZE)
    path = vmd.volume_file()
    fd = os.open(path, os.O_RDWR)
    try:
        for i, (off, length) in enumerate(_random_ops(rng, SIZE, 150)):
            data = rng.randbytes(length)
            assert os.pwrite(fd, data, off) == length
            ref[off:off + length] = data
            if i % 5 == 0:
                # A read of some other random range, cached or not, matches too.
                roff = rng.randrange(0, SIZE)
                rlen = rng.randrange(1, 200_000)
                got = os.pread(fd, rlen, roff)
                assert got == bytes(ref[roff:roff + rlen]), (roff, rlen)
        os.fsync(fd)
    finally:
        os.close(fd)

    # A fresh descriptor with the page cache dropped reads through the daemon.
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("1\n")
    with open(path, "rb") as f:
        assert f.read() == ref
    st = vmd.status("vol0")
    assert [p["state"] for p in st["plexes"]] == ["ACTIVE", "ACTIVE"]
    assert st["open"] == 0

    vmd.stop()
    want = sha_bytes(ref)
    for p in vmd.plex_paths():
        assert os.path.getsize(p) == SIZE
        assert sha(p) == want, f"plex image {p} differs from the reference"


def test_page_cache_reads_reach_vmd_as_one_mib_requests(
        vmd_factory: Callable[..., VmdDaemon]) -> None:
    """The daemon sets its mount's readahead to one FUSE request's worth, so
    a cold sequential read of a page-cached volume file (what a loop device
    does) reaches vmd as 1 MiB requests, not the kernel's default 128 KiB."""
    vmd = vmd_factory(volumes={"vol0": volume_spec(direct_io=False)}).start()
    dev = mount_device(vmd.mountpoint)
    assert dev is not None
    assert int((Path("/sys/class/bdi") / dev / "read_ahead_kb").read_text()) == READ_AHEAD_KB
    data = random.Random(5).randbytes(8 * MiB)
    path = vmd.volume_file()
    with open(path, "r+b") as f:
        f.write(data)
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # cold again
    with open(path, "rb") as f:
        assert f.read(len(data)) == data
    assert vmd.status("vol0")["max_read"] == READ_AHEAD_KB * 1024


def test_shared_mmap_needs_the_page_cache_mode(vmd_factory: Callable[..., VmdDaemon]) -> None:
    """direct_io (the default) refuses a shared writable mapping of the volume
    file (docs/design.md: Page cache and durability); `direct_io: false` allows it, and bytes stored
    through the mapping reach every plex at msync."""
    import mmap

    d = vmd_factory(volumes={"vol0": volume_spec(), "vol1": volume_spec("vol1", direct_io=False)})
    d.start()
    with open(d.volume_file("vol0"), "r+b") as f:
        with pytest.raises(OSError) as ei:
            mmap.mmap(f.fileno(), 4096)
        assert ei.value.errno == errno.ENODEV
    with open(d.volume_file("vol1"), "r+b") as f:
        m = mmap.mmap(f.fileno(), 2 * MiB)
        try:
            m[MiB:MiB + 5] = b"hello"
            m.flush()
        finally:
            m.close()
        os.fsync(f.fileno())
    for p in d.plex_paths("vol1"):
        with open(p, "rb") as f:
            f.seek(MiB)
            assert f.read(5) == b"hello", p


def sha_bytes(b: bytes | bytearray) -> str:
    import hashlib

    return hashlib.sha256(b).hexdigest()


@pytest.mark.allow_log(r"is not empty: its 1 entries \(keep\.txt\) are hidden")
def test_a_non_empty_mountpoint_is_served_with_a_warning_naming_what_it_hides(
        vmd_factory: Callable[..., VmdDaemon]) -> None:
    d = vmd_factory()
    d.mountpoint.mkdir(parents=True, exist_ok=True)
    (d.mountpoint / "keep.txt").write_text("mine")
    d.start()
    assert "keep.txt" not in os.listdir(d.mountpoint)
    assert f"{d.mountpoint} is not empty: its 1 entries (keep.txt) are hidden" in d.stderr()
    d.stop()
    assert (d.mountpoint / "keep.txt").read_text() == "mine"  # there again after the unmount


def test_concurrent_writers_disjoint_ranges(vmd: VmdDaemon) -> None:
    """Eight threads writing interleaved 64 KiB stripes at once: no write lost,
    plexes agree."""
    ref = bytearray(SIZE)
    path = vmd.volume_file()
    stripe = 64 * KiB
    nthreads = 8
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        rng = random.Random(k)
        try:
            fd = os.open(path, os.O_RDWR)
            try:
                for off in range(k * stripe, 16 * MiB, nthreads * stripe):
                    data = rng.randbytes(stripe)
                    ref[off:off + stripe] = data  # disjoint slices: no race on ref
                    assert os.pwrite(fd, data, off) == stripe
            finally:
                os.close(fd)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    with open(path, "rb") as f:
        assert f.read(16 * MiB) == ref[:16 * MiB]
    vmd.stop()
    for p in vmd.plex_paths():
        with open(p, "rb") as f:
            assert f.read(16 * MiB) == ref[:16 * MiB], p


def test_file_attributes(vmd: VmdDaemon) -> None:
    st = os.stat(vmd.volume_file())
    assert stat.S_ISREG(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_size == SIZE
    assert os.listdir(vmd.mountpoint) == ["vol0"]
    with pytest.raises(FileNotFoundError):
        os.stat(vmd.mountpoint / "nosuch")


def test_size_cannot_change(vmd: VmdDaemon) -> None:
    path = vmd.volume_file()
    with open(path, "r+b") as f:
        f.write(b"keep me")
    for new in (SIZE * 2, SIZE // 2, 0):
        with pytest.raises(OSError):
            os.truncate(path, new)
    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(OSError):
            os.ftruncate(fd, SIZE + 4096)
    finally:
        os.close(fd)
    assert os.stat(path).st_size == SIZE
    with open(path, "rb") as f:
        assert f.read(7) == b"keep me"
    # Creating other files in the mount is refused as well.
    with pytest.raises(OSError):
        open(vmd.mountpoint / "other", "wb")
    assert vmd.status("vol0")["size"] == SIZE


def test_io_past_the_end(vmd: VmdDaemon) -> None:
    path = vmd.volume_file()
    fd = os.open(path, os.O_RDWR)
    try:
        tail = os.urandom(4096)
        assert os.pwrite(fd, tail, SIZE - 4096) == 4096
        # Reads at or after the end: EOF, like a block device.
        assert os.pread(fd, 4096, SIZE) == b""
        assert os.pread(fd, 4096, SIZE + 10 * MiB) == b""
        assert os.pread(fd, 4096, SIZE - 100) == tail[-100:]
        # Writes entirely past the end fail with ENOSPC and never grow the file.
        for off, n in ((SIZE, 1), (SIZE, 4096), (SIZE + 1 * MiB, 65536)):
            with pytest.raises(OSError) as ei:
                os.pwrite(fd, b"x" * n, off)
            assert ei.value.errno == errno.ENOSPC, ei.value
        # A write straddling the end either fails whole (ENOSPC) or is short;
        # what is reported written is there, nothing else changed.
        data = os.urandom(8192)
        try:
            n = os.pwrite(fd, data, SIZE - 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
            n = 0
        assert 0 <= n <= 4096
        expect = data[:n] + tail[n:]
        assert os.pread(fd, 4096, SIZE - 4096) == expect
    finally:
        os.close(fd)
    assert os.stat(path).st_size == SIZE
    with open(path, "rb") as f:
        f.seek(SIZE - 4096)
        assert f.read() == expect
    vmd.stop()
    for p in vmd.plex_paths():
        assert os.path.getsize(p) == SIZE
        with open(p, "rb") as f:
            f.seek(SIZE - 4096)
            assert f.read() == expect, p


def test_data_survives_restart(vmd: VmdDaemon) -> None:
    rng = random.Random(7)
    chunks = {off: rng.randbytes(100_000) for off in (0, 5 * MiB + 3, SIZE - 100_000)}
    with open(vmd.volume_file(), "r+b") as f:
        for off, data in chunks.items():
            f.seek(off)
            f.write(data)
    vmd.restart()
    st = vmd.status("vol0")
    assert st["clean"] is True
    assert st["resync"]["running"] is False
    with open(vmd.volume_file(), "rb") as f:
        for off, data in chunks.items():
            f.seek(off)
            assert f.read(len(data)) == data


def test_sigterm_stops_cleanly(vmd: VmdDaemon) -> None:
    with open(vmd.volume_file(), "r+b") as f:
        f.write(b"A" * 4096)
    assert vmd.terminate() == 0
    assert not os.path.ismount(vmd.mountpoint)
    assert not vmd.socket.exists()
    for p in vmd.plex_paths():
        with open(p, "rb") as f:
            assert f.read(4096) == b"A" * 4096
    vmd.start()
    assert vmd.status("vol0")["clean"] is True


def test_sigint_stops_cleanly(vmd: VmdDaemon) -> None:
    with open(vmd.volume_file(), "r+b") as f:
        f.write(b"B" * 4096)
    assert vmd.proc is not None
    vmd.proc.send_signal(signal.SIGINT)
    assert vmd.wait_exit() == 0
    assert not os.path.ismount(vmd.mountpoint)
    vmd.start()
    assert vmd.status("vol0")["clean"] is True
    with open(vmd.volume_file(), "rb") as f:
        assert f.read(4096) == b"B" * 4096


def test_two_volumes_are_independent(vmd_factory: Callable[..., VmdDaemon]) -> None:
    vmd = vmd_factory(volumes={"a": volume_spec("a", size="64MiB"),
                               "b": volume_spec("b", size="96MiB", nplex=3)}).start()
    assert sorted(os.listdir(vmd.mountpoint)) == ["a", "b"]
    assert os.stat(vmd.volume_file("b")).st_size == 96 * MiB
    da, db = os.urandom(1 * MiB), os.urandom(1 * MiB)
    with open(vmd.volume_file("a"), "r+b") as fa, open(vmd.volume_file("b"), "r+b") as fb:
        fa.seek(5 * MiB)
        fa.write(da)
        fb.seek(5 * MiB)
        fb.write(db)
    with open(vmd.volume_file("a"), "rb") as fa:
        fa.seek(5 * MiB)
        assert fa.read(1 * MiB) == da
    st = vmd.status()
    assert [len(v["plexes"]) for v in st["volumes"]] == [2, 3]
    vmd.stop()
    for name, data in (("a", da), ("b", db)):
        for p in vmd.plex_paths(name):
            with open(p, "rb") as f:
                f.seek(5 * MiB)
                assert f.read(1 * MiB) == data, p
