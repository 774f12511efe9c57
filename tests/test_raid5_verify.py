"""Verify and repair of a RAID-5 volume (issue 15, part 1): parity against
the XOR of the data units, on a real daemon and real column images."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from conftest import KiB, MiB, VmdDaemon, pwrite_file
from raid5kit import decode, xor_all
from test_verify import flip, read_at, verify

SU = 64 * KiB
NCOL = 3


def r5_spec(**kw: object) -> dict[str, object]:
    return {"size": "4MiB", "layout": "raid5", "log": "r5.log", "stripe_unit": "64KiB",
            "columns": [f"r5-c{i}.img" for i in range(NCOL)], **kw}


def parity_col(s: int) -> int:
    """md left-symmetric, written from the rule (not from vmd/raid5.py)."""
    return NCOL - 1 - s % NCOL


@pytest.mark.mount
@pytest.mark.allow_log(r"verify.* mismatched in \d+ range")
@pytest.mark.parametrize("r5log", [False, True])
def test_raid5_verify_finds_flipped_parity_and_data_and_repair_regenerates_parity(
        vmd_factory: Callable[..., VmdDaemon], r5log: bool) -> None:
    d = vmd_factory(volumes={"r5": r5_spec(**({"raid5_log": "r5.r5log"} if r5log else {}))})
    d.start()
    size = d.volume_size("r5")
    data = os.urandom(size)
    pwrite_file(d.volume_file("r5"), [(0, data)])
    rc, out, r = verify(d, volume="r5")
    assert rc == 0 and "no mismatches" in out, out
    assert r["checked_bytes"] == size and r["layout"] == "raid5" and r["complete"], r
    p = d.cli("verify", "r5", "--repair", "--from", "c0", check=False)
    assert p.returncode == 1 and "volume r5 is RAID-5" in p.stderr, p.stderr
    assert "there is no copy to choose" in p.stderr, p.stderr
    d.stop()

    cols = [d.path(c) for c in d.config["volumes"]["r5"]["columns"]]
    # Stripe 2's data unit on column 1 (parity on column 0), stripe 4's parity
    # unit (column 1), and a run on column 0 across the end of stripe 6 into
    # stripe 7: two ranges, one per stripe.
    assert parity_col(2) == 0 and parity_col(4) == 1 and 0 not in (parity_col(6), parity_col(7))
    parity_before = read_at(cols[1], 4 * SU, SU)
    flipped_data = flip(cols[1], 2 * SU + 1000, 100)
    flip(cols[1], 4 * SU + 8 * KiB, 512)
    flip(cols[0], 7 * SU - 512, 1024)
    expected = [[2 * SU + 512, 1024], [4 * SU + 8 * KiB, 512], [7 * SU - 512, 512], [7 * SU, 512]]

    d.start()
    rc, out, r = verify(d, volume="r5")
    assert rc == 1, out
    assert r["ranges_in"] == "column" and r["ranges"] == expected, r
    assert r["parity_columns"] == [f"c{parity_col(off // SU)}" for off, _ in expected], r
    assert r["mismatched_bytes"] == 2560 and r["range_count"] == 4 and r["repaired_bytes"] == 0
    assert f"column offset {4 * SU + 8 * KiB} (stripe 4, parity on c1), 512 bytes" in out, out

    rc, out, r = verify(d, "--repair", volume="r5")
    assert rc == 0 and r["repaired_bytes"] == r["mismatched_bytes"] == 2560, (out, r)
    assert "parity rewritten from the data units" in out, out
    rc, out, r = verify(d, volume="r5")
    assert rc == 0 and r["mismatched_bytes"] == 0, out
    # A flipped data unit stays flipped: parity now agrees with it (md does the same).
    got = read_at(d.volume_file("r5"), 4 * SU + 1000, 100)  # stripe 2, data unit 0
    assert got == flipped_data, "the repair changed data: it must only rewrite parity"
    d.stop()

    images = [c.read_bytes() for c in cols]
    assert xor_all(images) == bytes(len(images[0])), "parity does not match data after repair"
    assert images[1][4 * SU:5 * SU] == parity_before, "stripe 4's parity was not regenerated"
    want = bytearray(data)
    want[4 * SU + 1000:4 * SU + 1100] = flipped_data
    for off in (7 * SU - 512, 7 * SU):  # column 0's flipped data units in stripes 6 and 7
        s, at = divmod(off, SU)
        k = (0 - parity_col(s) - 1) % NCOL
        vol_off = s * (NCOL - 1) * SU + k * SU + at
        want[vol_off:vol_off + 512] = images[0][off:off + 512]
    assert decode(images, SU) == bytes(want)


@pytest.mark.mount
def test_raid5_verify_refuses_a_degraded_volume(vmd_factory: Callable[..., VmdDaemon]) -> None:
    d = vmd_factory(volumes={"r5": r5_spec()}).start()
    d.cli("plex", "detach", "r5", "c2")
    p = d.cli("verify", "r5", check=False)
    assert p.returncode == 1, p.stderr
    assert "volume r5 is degraded (column c2 DETACHED): its parity cannot be checked" in p.stderr
