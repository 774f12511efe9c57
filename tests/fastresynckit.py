"""Helpers of the FastResync tests (test_fastresync.py, test_fastresync_crash.py)
and of test_holes.py: a sparse reference of what a volume should hold, a
comparison of plex images that reads only their data extents, and a 1 GiB
two-plex daemon with writes by 64 KiB region."""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from conftest import MiB, KiB, VmdDaemon, volume_spec

GiB = 1024 * MiB
R = 64 * KiB  # the default fastresync_region
BIG = 1 * GiB
NREG = BIG // R  # 16384 map regions
ONE_PCT = NREG // 100  # 163 regions, 10.2 MiB
CHUNK = 4 * MiB

UNCLEAN = r"was not stopped cleanly"


# -- a sparse reference of what the volume should hold ---------------------------

class Ref:
    """Expected volume content: zeros except what the test wrote, kept per
    64 KiB region so that 1 GiB costs only what was written."""

    def __init__(self, size: int):
        self.size = size
        self.regions: dict[int, bytearray] = {}

    def write(self, off: int, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            r, o = divmod(off + pos, R)
            n = min(R - o, len(data) - pos)
            buf = self.regions.setdefault(r, bytearray(R))
            buf[o:o + n] = data[pos:pos + n]
            pos += n

    def forget(self, off: int, length: int) -> None:
        """Content unknown (a write in flight at a crash): skip it in checks."""
        for r in range(off // R, (off + length - 1) // R + 1):
            self.regions[r] = None  # type: ignore[assignment]

    def expected(self, off: int, n: int) -> tuple[bytes, list[tuple[int, int]]]:
        """Expected bytes of [off, off+n) and the (start, end) spans to skip."""
        out = bytearray(n)
        skip = []
        for r in range(off // R, (off + n - 1) // R + 1):
            if r not in self.regions:
                continue
            lo, hi = max(off, r * R), min(off + n, (r + 1) * R)
            buf = self.regions[r]
            if buf is None:
                skip.append((lo - off, hi - off))
            else:
                out[lo - off:hi - off] = buf[lo - r * R:hi - r * R]
        return bytes(out), skip


def data_extents(path: Path) -> list[tuple[int, int]]:
    """(start, end) of the data (non-hole) parts of a file."""
    size = os.path.getsize(path)
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        off = 0
        while off < size:
            try:
                start = os.lseek(fd, off, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                if e.errno == errno.EINVAL:  # no SEEK_DATA here: all of it
                    return [(0, size)]
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            off = end
    finally:
        os.close(fd)
    return out


def _merge(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _chunks(spans: list[tuple[int, int]]) -> Iterable[tuple[int, int]]:
    for a, b in spans:
        for o in range(a, b, CHUNK):
            yield o, min(CHUNK, b - o)


def assert_plexes_identical(paths: list[Path], ref: Ref | None = None) -> None:
    """Every plex holds the same bytes (and, with `ref`, the expected ones).
    Outside the union of the files' data extents all of them read as zeros,
    so only that union (and the reference's regions) is read, in chunks."""
    sizes = {p: os.path.getsize(p) for p in paths}
    assert len(set(sizes.values())) == 1, f"plex sizes differ: {sizes}"
    size = sizes[paths[0]]
    spans = [e for p in paths for e in data_extents(p)]
    if ref is not None:
        assert ref.size == size
        spans += [(r * R, (r + 1) * R) for r in ref.regions]
    fds = [os.open(p, os.O_RDONLY) for p in paths]
    try:
        for off, n in _chunks(_merge(spans)):
            datas = [os.pread(fd, n, off) for fd in fds]
            for p, d in zip(paths[1:], datas[1:]):
                if d != datas[0]:
                    bad = next(i for i in range(n) if d[i] != datas[0][i])
                    raise AssertionError(f"plex {p.name} differs from {paths[0].name} at "
                                         f"offset {off + bad} (64 KiB region {(off + bad) // R})")
            if ref is not None:
                want, skip = ref.expected(off, n)
                got = bytearray(datas[0])
                for a, b in skip:
                    got[a:b] = want[a:b]
                if bytes(got) != want:
                    bad = next(i for i in range(n) if got[i] != want[i])
                    raise AssertionError(f"plexes differ from what was written at offset "
                                         f"{off + bad} (64 KiB region {(off + bad) // R})")
    finally:
        for fd in fds:
            os.close(fd)


# -- helpers ------------------------------------------------------------------------

def plex_st(st: dict[str, Any], name: str) -> dict[str, Any]:
    (p,) = [p for p in st["plexes"] if p["name"] == name]
    return p


def write_regions(path: Path, regions: Iterable[int], ref: Ref, rng: random.Random) -> int:
    """One random 64 KiB write per region through the mount; fsync."""
    n = 0
    fd = os.open(path, os.O_RDWR)
    try:
        for r in regions:
            data = rng.randbytes(R)
            assert os.pwrite(fd, data, r * R) == R
            ref.write(r * R, data)
            n += 1
        os.fsync(fd)
    finally:
        os.close(fd)
    return n


def big_daemon(vmd_factory: Callable[..., VmdDaemon], size: int | str = "1GiB",
               **kw: Any) -> VmdDaemon:
    kw.setdefault("clean_delay", 0.3)
    return vmd_factory(volumes={"vol0": volume_spec("vol0", size=size)}, **kw)


def seed_both(vmd: VmdDaemon, ref: Ref, rng: random.Random, count: int = 64) -> list[int]:
    """Data on both plexes before anything leaves, so that stale != zeros."""
    regions = rng.sample(range(vmd.volume_size() // R), count)
    write_regions(vmd.volume_file(), regions, ref, rng)
    return regions


def attach_and_wait(vmd: VmdDaemon, plex: str = "p1") -> dict[str, Any]:
    vmd.cli("plex", "attach", "vol0", plex)
    st = vmd.wait_resync("vol0")
    assert all(p["state"] == "ACTIVE" for p in st["plexes"]), st["plexes"]
    assert all(p["missing_bytes"] == 0 for p in st["plexes"]), st["plexes"]
    return st
