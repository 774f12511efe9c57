"""A real plex fault: one plex on a tiny filesystem of its own runs out of space."""

from __future__ import annotations

import errno
import hashlib
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import MiB, SysResources, VmdDaemon, is_mounted

pytestmark = pytest.mark.mount

SIZE = 64 * MiB


@pytest.mark.allow_log(r"plex p1 .* is now IOFAIL", r"No space left on device")
def test_enospc_plex_goes_iofail_volume_keeps_serving(
        vmd_factory: Callable[..., VmdDaemon], sysres: SysResources, tmp_path: Path) -> None:
    small = tmp_path / "small"
    sysres.make_ext4_image(tmp_path / "small.img", 8 * MiB, small)
    assert is_mounted(small)
    p1 = small / "vol0-p1.img"
    vmd = vmd_factory(volumes={"vol0": {"size": "64MiB", "plexes": ["vol0-p0.img", str(p1)],
                                        "log": "vol0.log"}}).start()
    assert os.path.getsize(p1) == SIZE  # sparse: it fits only until written

    rng = random.Random(99)
    ref = bytearray(SIZE)
    path = vmd.volume_file()
    fd = os.open(path, os.O_RDWR)
    try:
        # 24 MiB of data in 1 MiB writes, three times what p1's filesystem holds.
        offsets = list(range(0, 48 * MiB, 2 * MiB))
        rng.shuffle(offsets)
        for off in offsets:
            data = rng.randbytes(1 * MiB)
            assert os.pwrite(fd, data, off) == len(data)  # acknowledged: never EIO
            ref[off:off + len(data)] = data
        os.fsync(fd)
        states = vmd.plex_states()
        assert states == {"p0": "ACTIVE", "p1": "IOFAIL"}, states
        st = vmd.status("vol0")
        p1st = [p for p in st["plexes"] if p["name"] == "p1"][0]
        assert "No space left" in p1st["reason"] or str(errno.ENOSPC) in p1st["reason"], p1st

        # The volume keeps serving: more writes and reads, from p0 alone.
        for off in (50 * MiB + 3, 60 * MiB):
            data = rng.randbytes(300_000)
            assert os.pwrite(fd, data, off) == len(data)
            ref[off:off + len(data)] = data
        os.fsync(fd)
    finally:
        os.close(fd)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("1\n")
    with open(path, "rb") as f:
        assert f.read() == ref, "an acknowledged write does not read back"

    vmd.stop()
    with open(vmd.plex_paths()[0], "rb") as f:
        assert hashlib.sha256(f.read()).digest() == hashlib.sha256(ref).digest(), \
            "plex p0 (the good one) differs from the reference"

    # The IOFAIL state is durable: after a restart p1 is still out, data intact.
    vmd.start()
    assert vmd.plex_states() == {"p0": "ACTIVE", "p1": "IOFAIL"}
    with open(path, "rb") as f:
        assert f.read() == ref
    vmd.stop()
