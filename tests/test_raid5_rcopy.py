"""Remote Copy of a RAID-5 volume: it needs only the change map, which the
volume front keeps for every layout. Two real daemons, a RAID-5 source and a
RAID-5 target; full updates send only the stripes that hold data."""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import KiB, MiB, VmdDaemon, pwrite_file
from raid5kit import decoded_sha256, raid5_spec, xor_is_zero
from test_raid5_fs import file_sha

pytestmark = pytest.mark.mount

SIZE = 16 * MiB
SU = 64 * KiB
WIDTH = 2 * SU  # 3 columns


def sync(a: VmdDaemon) -> dict:
    reply = a.request({"cmd": "rcopy.sync", "volume": "r5"}, timeout=120)
    assert reply["ok"], reply
    return reply


def assert_same(a: VmdDaemon, b: VmdDaemon) -> None:
    assert file_sha(b.volume_file("r5")) == file_sha(a.volume_file("r5")), \
        "the target's volume differs from the source's"


def test_remote_copy_of_a_raid5_volume(vmd_factory: Callable[..., VmdDaemon]) -> None:
    b = vmd_factory("b", volumes={"r5": raid5_spec(size="16MiB")}).start()
    target = [sys.executable, "-m", "vmd", "-c", str(b.config_path), "rcopy", "receive", "r5"]
    a = vmd_factory("a", volumes={"r5": raid5_spec(
        size="16MiB", rcopy={"target": target, "period": "1h"})}).start()
    rng = random.Random(5)
    # Data in 5 stripes; the full update sends those and zero ranges for the rest.
    stripes = [1, 7, 8, 40, 127]
    pwrite_file(a.volume_file("r5"), [(s * WIDTH + 1000, rng.randbytes(3000)) for s in stripes])
    first = sync(a)
    assert first["full"] and first["sent_bytes"] == len(stripes) * WIDTH, first
    assert first["sent_bytes"] + first["zero_bytes"] == SIZE, first
    assert_same(a, b)

    # Incremental: what changed goes, also while the source is degraded.
    pwrite_file(a.volume_file("r5"), [(3 * MiB + 5, rng.randbytes(70 * KiB))])
    assert 0 < sync(a)["sent_bytes"] <= 3 * 64 * KiB
    assert_same(a, b)
    a.cli("plex", "detach", "r5", "c1")
    pwrite_file(a.volume_file("r5"), [(o, rng.randbytes(9000)) for o in (0, 9 * MiB + 77)])
    second = sync(a)
    assert not second["full"] and 0 < second["sent_bytes"] <= 4 * 64 * KiB, second
    assert_same(a, b)
    st = json.loads(b.cli("rcopy", "status", "r5", "--json").stdout)
    assert st["role"] == "target" and st["sequence"] == second["seq"], st
    want = file_sha(a.volume_file("r5"))
    a.stop()
    b.stop()
    cols = [b.path(f"r5-c{i}.img") for i in range(3)]
    assert xor_is_zero(cols) and decoded_sha256(cols, SU) == want
