"""Remote Copy (issue 7) with two real daemons on one machine, linked by a
local command: initial and incremental updates, point-in-time images under
racing writes, link/receiver/sender killed mid-transfer, and bad streams."""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import MiB, KiB, REPO, VmdDaemon, sha, volume_spec
from vmd import rcopy_proto as P

pytestmark = pytest.mark.mount

SIZE = 64 * MiB
R = 64 * KiB  # fastresync_region: the unit the change map tracks
BLK = 4096
FAILED = (r"remote copy update \d+ failed", r"did not complete", r"rolled back",
          r"holds no consistent point", r"needs a full update")


def image(d: VmdDaemon, i: int = 0) -> bytes:
    return d.plex_paths()[i].read_bytes()


def pwrite_file(path: Path, writes: list[tuple[int, bytes]]) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        for off, data in writes:
            assert os.pwrite(fd, data, off) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def make_pair(vmd_factory: Callable[..., VmdDaemon], tmp_path: Path,
              relay: bool = False) -> tuple[VmdDaemon, VmdDaemon]:
    b = vmd_factory("b", volumes={"vol0": volume_spec("vol0", size=SIZE)}).start()
    target = [sys.executable, "-m", "vmd", "-c", str(b.config_path), "rcopy", "receive", "vol0"]
    if relay:
        (tmp_path / "rate").write_text("0")
        target = [sys.executable, str(REPO / "tests" / "rcopy_relay.py"), str(tmp_path / "rate"),
                  str(tmp_path / "relay.pid"), "--", *target]
    a = vmd_factory("a", volumes={"vol0": volume_spec(
        "vol0", size=SIZE, rcopy={"target": target, "period": "1h"})}).start()
    return a, b


def sync(a: VmdDaemon, check: bool = True) -> dict[str, Any]:
    reply = a.request({"cmd": "rcopy.sync", "volume": "vol0"}, timeout=120)
    if check:
        assert reply["ok"], reply
    return reply


def rstatus(d: VmdDaemon) -> dict[str, Any]:
    return json.loads(d.cli("rcopy", "status", "vol0", "--json").stdout)


def assert_b_equals(b: VmdDaemon, want: bytes) -> None:
    for i in range(2):
        got = image(b, i)
        assert got == want, f"B plex {i} differs from the expected image"


@pytest.mark.allow_log(r"was not stopped cleanly")
def test_initial_and_incremental(vmd_factory: Callable[..., VmdDaemon], tmp_path: Path) -> None:
    a, b = make_pair(vmd_factory, tmp_path)
    rng = random.Random(7)
    pwrite_file(a.volume_file(), [(o, rng.randbytes(256 * KiB)) for o in range(0, SIZE, 4 * MiB)])
    first = sync(a)
    assert first["full"] and first["sent_bytes"] == SIZE, first
    assert_b_equals(b, image(a))
    st = rstatus(b)
    assert st["role"] == "target" and st["sequence"] == first["seq"] and not st["syncing"]

    # 1 % of the regions changed: about 1 % of the volume is sent.
    nreg = SIZE // R
    regions = rng.sample(range(nreg), nreg // 100)
    pwrite_file(a.volume_file(), [(r * R + rng.randrange(R // BLK) * BLK, rng.randbytes(BLK))
                                  for r in regions])
    t0 = time.monotonic()
    second = sync(a)
    secs = time.monotonic() - t0
    assert not second["full"] and second["sent_bytes"] == len(regions) * R, second
    print(f"\n1% update: {second['sent_bytes']} bytes sent of {SIZE} "
          f"({100 * second['sent_bytes'] / SIZE:.2f} %), {secs:.2f} s")
    assert_b_equals(b, image(a))
    st = rstatus(a)
    assert st["sequence"] == second["seq"] and st["pending_bytes"] == 0
    assert st["bytes_sent_total"] == SIZE + second["sent_bytes"]
    # Nothing changed: an empty update.
    assert sync(a)["sent_bytes"] == 0
    # B refuses writes (a target) and reads them back from the consistent point.
    with pytest.raises(OSError):
        pwrite_file(b.volume_file(), [(0, b"x" * BLK)])
    with open(b.volume_file(), "rb") as f:
        assert f.read(BLK) == image(a)[:BLK]
    # The change map survives a clean restart and a crash of A.
    pwrite_file(a.volume_file(), [(5 * R, b"y" * BLK)])
    a.restart()
    pwrite_file(a.volume_file(), [(9 * R, b"z" * BLK)])
    a.restart(kill=True)
    third = sync(a)
    assert 2 * R <= third["sent_bytes"] <= 64 * R, third
    assert_b_equals(b, image(a))
