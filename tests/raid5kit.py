"""RAID-5 test helpers: configs, and an independent left-symmetric decoder.

The decoder is written from the rule in the issue (and md's documentation),
not from vmd/raid5.py, so that a placement bug in the engine cannot hide.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vmd.config import KiB, MiB, VolumeConfig


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
