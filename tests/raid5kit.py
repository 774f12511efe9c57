"""RAID-5 test helpers: configs, and an independent left-symmetric decoder.

The decoder is written from the rule in the issue (and md's documentation),
not from vmd/raid5.py, so that a placement bug in the engine cannot hide.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

from vmd.config import KiB, MiB, VolumeConfig
from vmd.plex import Plex, PlexIOError


def raid5_config(tmp: Path, *, name: str = "r5", size: int = 8 * MiB, ncol: int = 3,
                 stripe_unit: int = 64 * KiB, **kw: Any) -> VolumeConfig:
    kw.setdefault("region_size", 1 * MiB)
    return VolumeConfig(name=name, size=size, layout="raid5", stripe_unit=stripe_unit,
                        plexes=tuple(tmp / f"{name}-c{i}.img" for i in range(ncol)),
                        log=tmp / f"{name}.log", fastresync_region=stripe_unit, **kw)


def decode(columns: list[bytes], stripe_unit: int) -> bytes:
    """Volume bytes from md left-symmetric column images (all present)."""
    n = len(columns)
    stripes = len(columns[0]) // stripe_unit
    out = bytearray()
    for s in range(stripes):
        parity = n - 1 - s % n
        for k in range(n - 1):
            col = (parity + 1 + k) % n
            out += columns[col][s * stripe_unit:(s + 1) * stripe_unit]
    return bytes(out)


def xor_all(columns: list[bytes]) -> bytes:
    acc = 0
    for c in columns:
        acc ^= int.from_bytes(c, "little")
    return acc.to_bytes(len(columns[0]), "little")


def column_bytes(cfg: VolumeConfig) -> list[bytes]:
    return [Path(p).read_bytes() for p in cfg.plexes]


def raid5_spec(name: str = "r5", *, size: str = "4MiB", ncol: int = 3, stripe_unit: str = "64KiB",
               r5log: bool = True, columns: list[str] | None = None, **kw: Any) -> dict[str, Any]:
    """One RAID-5 volume's mapping for a daemon's config (paths relative to it)."""
    spec: dict[str, Any] = {"size": size, "layout": "raid5", "log": f"{name}.log",
                            "stripe_unit": stripe_unit,
                            "columns": columns or [f"{name}-c{i}.img" for i in range(ncol)], **kw}
    if r5log:
        spec["raid5_log"] = f"{name}.r5log"
    return spec


def xor_is_zero(paths: list[Path], chunk: int = 4 * MiB) -> bool:
    """The XOR of all column images is zero (every stripe's parity matches),
    read in chunks so that big columns cost no more memory than one chunk each."""
    size = Path(paths[0]).stat().st_size
    files = [open(p, "rb") for p in paths]
    try:
        for off in range(0, size, chunk):
            if any(xor_all([f.read(chunk) for f in files])):
                return False
        return True
    finally:
        for f in files:
            f.close()


def decoded_sha256(paths: list[Path], stripe_unit: int, chunk_stripes: int = 64) -> str:
    """sha256 of the volume bytes the decoder makes of the column images."""
    import hashlib

    h = hashlib.sha256()
    size = Path(paths[0]).stat().st_size
    step = chunk_stripes * stripe_unit
    files = [open(p, "rb") for p in paths]
    try:
        for off in range(0, size, step):
            # decode() numbers stripes from 0: feed it whole stripes from one
            # that has the same parity column as stripe `off // stripe_unit`.
            first = off // stripe_unit
            pad = first % len(paths)
            cols = [bytes(pad * stripe_unit) + f.read(step) for f in files]
            h.update(decode(cols, stripe_unit)[pad * (len(paths) - 1) * stripe_unit:])
    finally:
        for f in files:
            f.close()
    return h.hexdigest()


def assert_columns_hold(cfg: VolumeConfig, ref: bytes | bytearray) -> None:
    """After a clean stop: the column images decode (left-symmetric) to
    `ref`, and every stripe's parity matches its data."""
    cols = column_bytes(cfg)
    assert decode(cols, cfg.stripe_unit) == bytes(ref)
    assert not any(xor_all(cols)), "the XOR of the columns is not zero: parity does not match"


class FailingColumn(Plex):
    """Column `name` fails its reads or writes with EIO once told to."""

    fail: tuple[str, str] | None = None  # (column, "read" | "write")

    def _pread_sync(self, off, size, into=None):
        if FailingColumn.fail == (self.name, "read"):
            raise OSError(errno.EIO, "injected read error")
        return super()._pread_sync(off, size, into)

    async def pread(self, off, size, **kw):
        # The volume's reads (the page cache probe, io_uring) too.
        if FailingColumn.fail == (self.name, "read"):
            raise PlexIOError(self, "read", off, OSError(errno.EIO, "injected read error"))
        return await super().pread(off, size, **kw)

    def _pwrite_sync(self, off, data):
        if FailingColumn.fail == (self.name, "write"):
            raise OSError(errno.EIO, "injected write error")
        super()._pwrite_sync(off, data)
