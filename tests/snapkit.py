"""Helpers of the snapshot tests (test_snapshot.py, test_snapshot_refusals.py):
reading a volume past the page cache, writing and hashing file trees on ext4,
plex states by role, a whole snapshot cycle, and ext4 with a frozen snapshot."""

from __future__ import annotations

import hashlib
import mmap
import os
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from conftest import MiB, KiB, SysResources, VmdDaemon, run

FMR = 64 * KiB  # default fastresync_region: the unit SNAPLINK maps track


def read_direct(path: str | os.PathLike[str]) -> bytes:
    """The whole file read with O_DIRECT: what vmd returns now, not what the
    kernel's page cache remembers."""
    size = os.stat(path).st_size
    out = bytearray()
    buf = mmap.mmap(-1, 4 * MiB)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        off = 0
        while off < size:
            n = os.preadv(fd, [buf], off)
            assert n > 0, f"short read of {path} at {off}"
            out += buf[:n]
            off += n
    finally:
        os.close(fd)
        buf.close()
    return bytes(out)


def read_buffered(path: str | os.PathLike[str]) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def h(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def region_writes(regions: list[int], rng: random.Random) -> list[tuple[int, bytes]]:
    """One 4 KiB write of random bytes somewhere inside each 64 KiB region."""
    return [(r * FMR + rng.randrange(0, FMR // 4096) * 4096, rng.randbytes(4096))
            for r in regions]


def write_tree(root: Path, prefix: str, rng: random.Random, n: int,
               sizes: tuple[int, ...] = (0, 1, 4095, 10_000, 100_000, 1 << 20)) -> dict[str, str]:
    sums = {}
    for i in range(n):
        d = root / f"{prefix}{i % 3}"
        d.mkdir(exist_ok=True)
        data = rng.randbytes(rng.choice(sizes))
        p = d / f"{prefix}-file{i}.bin"
        p.write_bytes(data)
        sums[str(p.relative_to(root))] = h(data)
    return sums


def tree(root: Path) -> dict[str, str]:
    """{relpath: sha256} of every regular file (lost+found aside)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "lost+found"]
        for f in filenames:
            p = Path(dirpath) / f
            out[str(p.relative_to(root))] = h(p.read_bytes())
    return out


def fsck_clean(dev: str) -> None:
    p = run(["fsck.ext4", "-fn", dev], check=False)
    assert p.returncode == 0, f"fsck.ext4 -fn {dev} exited {p.returncode}:\n{p.stdout}\n{p.stderr}"


def plex_states(vmd: VmdDaemon, volume: str = "vol0") -> dict[str, str]:
    return {p["name"]: p["state"] for p in vmd.status(volume)["plexes"]}


def plex_by_role(st: dict[str, Any], *roles: str) -> dict[str, Any]:
    ps = [p for p in st["plexes"] if p["role"] in roles]
    assert len(ps) == 1, st["plexes"]
    return ps[0]


def snapshot_cycle(vmd: VmdDaemon, name: str = "nightly") -> float:
    """snap start + wait + take; returns the writes-held time vmd reports (s)."""
    vmd.cli("snap", "start", "vol0")
    vmd.cli("snap", "wait", "vol0", timeout=120)
    assert "SNAPDONE" in plex_states(vmd).values()
    out = vmd.cli("snap", "take", "vol0", name).stdout
    m = re.search(r"writes held (\d+) ms", out)
    assert m, out
    return int(m.group(1)) / 1000


def set_rate(vmd: VmdDaemon, rate: str | None) -> None:
    vmd.set_rate_limit(rate)


def ext4_with_snapshot(vmd_factory: Callable[..., VmdDaemon], sysres: SysResources,
                       tmp_path: Path, seed: int, nfiles: int
                       ) -> tuple[VmdDaemon, str, Path, random.Random, dict[str, str]]:
    """ext4 on a loop device over vol0 holding `nfiles` files, and snapshot
    `nightly` taken of it frozen: (daemon, loop device, mount, rng, tree)."""
    vmd = vmd_factory().start()
    dev = vmd.losetup()
    run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", dev])
    fs = Path(sysres.mount(dev, tmp_path / "fs"))
    rng = random.Random(seed)
    before = write_tree(fs, "a", rng, nfiles)
    run(["sync"])
    vmd.cli("snap", "start", "vol0")
    vmd.cli("snap", "wait", "vol0", timeout=120)
    run(["fsfreeze", "-f", str(fs)])
    try:
        vmd.cli("snap", "take", "vol0", "nightly")
    finally:
        run(["fsfreeze", "-u", str(fs)])
    return vmd, dev, fs, rng, before
