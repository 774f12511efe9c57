"""RAID-5 through a real mount: the write hole, cut by the fault hook and SIGKILL."""

from __future__ import annotations

import errno
import os

import pytest

from conftest import KiB, MiB

from raid5kit import decode, xor_all

SU = 64 * KiB
DEAD = {errno.ENOTCONN, errno.EIO, errno.ECONNABORTED, errno.ENODEV}


def r5_spec(log: bool) -> dict:
    spec = {"size": "4MiB", "layout": "raid5", "log": "r5.log", "stripe_unit": "64KiB",
            "columns": [f"r5-c{i}.img" for i in range(3)]}
    if log:
        spec["raid5_log"] = "r5.r5log"
    return spec


def read_direct(path, off: int, n: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        import mmap

        buf = mmap.mmap(-1, n)
        os.preadv(fd, [buf], off)
        return bytes(buf)
    finally:
        os.close(fd)


@pytest.mark.parametrize("part,log", [("data", True), ("parity", True), ("none", True),
                                      ("data", False), ("parity", False)])
def test_write_hole_cut_between_data_and_parity_then_a_column_missing(vmd_factory, allow_log,
                                                                      part, log):
    """With a RAID-5 log the cut falls in the write-back, after the entry's
    sync: part of the pieces (or none: `split-logged`) reached the columns."""
    allow_log("not stopped cleanly", "IOFAIL", "RAID-5 log replayed", "refused",
              "write hole", "cannot open image")
    # Stripe 2: parity on column 0, data units on columns 1 and 2. The cut
    # write goes to the unit on column 1; column 2 goes missing afterwards,
    # so its unit is rebuilt from column 1 and the parity.
    stripe = 2
    off = stripe * 2 * SU + 8 * KiB
    kind = {"data": "split-write", "parity": "split-parity", "none": "split-logged"}[part]
    d = vmd_factory(volumes={"r5": r5_spec(log)},
                    env={"VMD_TEST_FAULT": f"{kind}:r5:{off}"})
    d.start()
    vol = d.volume_file("r5")
    old = os.urandom(4 * MiB)
    fd = os.open(vol, os.O_RDWR | os.O_DIRECT)
    try:
        import mmap

        buf = mmap.mmap(-1, 4 * MiB)
        buf[:] = old
        assert os.pwritev(fd, [buf], 0) == 4 * MiB
        os.fsync(fd)
        new = mmap.mmap(-1, 4 * KiB)
        new[:] = os.urandom(4 * KiB)
        try:
            # With the log's write-back cache the write may be answered
            # before the committer reaches the cut.
            os.pwritev(fd, [new], off)
            assert log, "answered without a log: the cut write reached the columns"
        except OSError as e:
            assert e.errno in DEAD
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    assert d.wait_exit(60) == -9
    d.kill()
    cols = [d.path(f"r5-c{i}.img") for i in range(3)]
    os.rename(cols[2], str(cols[2]) + ".away")  # the other data column of the stripe is lost
    d.env.pop("VMD_TEST_FAULT")
    if not log:
        d.start()
        refused = {r["name"]: r["error"] for r in d.status()["refused"]}
        assert "write hole" in refused["r5"] and "--force-degraded r5" in refused["r5"], refused
        d.stop()
        d.daemon_args = ("--force-degraded", "r5")
        d.start()
        st = d.status("r5")
        assert (st["volumes"][0] if "volumes" in st else st)["degraded"]
        d.stop()
        return
    d.start()
    st = d.status("r5")
    st = st["volumes"][0] if "volumes" in st else st
    assert st["degraded"] and st["replayed_entries"] >= 1, st
    got = read_direct(vol, 0, 4 * MiB)
    expect_new = bytearray(old)
    expect_new[off:off + 4 * KiB] = bytes(new)
    # Every byte reads back as the old or the new data: the entry was durable
    # before the columns were touched, so the replay finished the write.
    assert got == bytes(expect_new)
    d.stop()
