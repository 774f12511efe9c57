"""An image cut short while the daemon runs (`truncate -s 8M p0.img`): what
lay past its new end is lost, not zeros. Its reads fail (EIO) and take the
plex or column out (IOFAIL), the volume is served from the other copies, and
neither resync nor verify --repair copies its "zeros" over good data. Real
daemon, real image files."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import MiB, VmdDaemon, pwrite_file, sha, volume_spec, wait_for
from test_events import EventStream, find
from test_raid5_verify import r5_spec
from test_verify import verify
from vmd import events

SIZE = 64 * MiB
SHORT = 8 * MiB  # where the cut image ends
DATA = 32 * MiB  # written (and fsync'd) before the cut: a part of it is past SHORT
IOFAIL_LOG = r"is now IOFAIL after .* of plex \S+ \(.*\) at offset \d+: the image ends at offset"


def read_volume(d: VmdDaemon, volume: str, chunk: int = MiB) -> bytes:
    """The whole volume file, read in `chunk` requests (many reads: the
    mirror's round robin sends some of them to every plex)."""
    out = bytearray()
    with open(d.volume_file(volume), "rb", buffering=0) as f:
        while piece := f.read(chunk):
            out += piece
    return bytes(out)


def plex_record(d: VmdDaemon, volume: str, name: str) -> dict[str, Any]:
    return next(p for p in d.status(volume)["plexes"] if p["name"] == name)


def assert_failed_short(d: VmdDaemon, volume: str, name: str, image: Path, size: int) -> None:
    """`name` is IOFAIL, its reason (status) and its event name the image,
    where it ends and the size it must have."""
    rec = plex_record(d, volume, name)
    assert rec["state"] == "IOFAIL", rec
    assert f"({image}) at offset" in rec["reason"], rec
    assert f"the image ends at offset {SHORT}" in rec["reason"], rec
    assert f"short of the {size} bytes it must have" in rec["reason"], rec
    es = EventStream(d)  # the history: the failure happened before it connected
    try:
        ev = es.wait(events.PLEX_STATE, name, state="IOFAIL")
        assert f"ends at offset {SHORT}" in ev["details"]["reason"], ev
    finally:
        es.close()


def write_reference(d: VmdDaemon, volume: str, size: int) -> bytes:
    """DATA random bytes at 0 of the volume, fsync'd; the volume's expected bytes."""
    data = os.urandom(DATA)
    pwrite_file(d.volume_file(volume), [(0, data)])  # fsyncs
    return data + bytes(size - DATA)


@pytest.mark.mount
@pytest.mark.allow_log(IOFAIL_LOG, r"verify.* stopped", r"repair stopped")
@pytest.mark.parametrize("uring,first", [("1", "read"), ("0", "read"), ("1", "verify")])
def test_a_mirror_plex_cut_short_is_failed_and_its_zeros_never_served_or_repaired_from(
        vmd_factory: Callable[..., VmdDaemon], uring: str, first: str) -> None:
    d = vmd_factory(env={"VMD_URING": uring}).start()
    ref = write_reference(d, "vol0", SIZE)
    p0, p1 = d.plex_paths()
    os.truncate(p0, SHORT)  # p0: the default repair source

    if first == "verify":
        # p0 is the source: reading it fails it, and the repair stops
        # instead of writing p0's "zeros" over p1's data.
        rc, out, r = verify(d, "--repair")
        assert rc == 1, out
        assert r["repaired_bytes"] == 0 and not r["complete"], r
        assert "repair stopped" in r.get("error", ""), r
    assert read_volume(d, "vol0") == ref
    assert d.plex_states() == {"p0": "IOFAIL", "p1": "ACTIVE"}
    assert_failed_short(d, "vol0", "p0", p0, SIZE)
    assert re.search(IOFAIL_LOG, d.stderr()), d.stderr()

    d.stop()
    assert sha(p1) == hashlib.sha256(ref).hexdigest(), "the good plex lost data"
    d.start()  # the failure is durable; the volume still reads right
    assert d.plex_states() == {"p0": "IOFAIL", "p1": "ACTIVE"}
    assert read_volume(d, "vol0") == ref


@pytest.mark.mount
@pytest.mark.allow_log(IOFAIL_LOG, r"verify.* stopped", r"verify.* mismatched")
@pytest.mark.parametrize("first", ["read", "verify"])
def test_a_raid5_column_cut_short_is_failed_and_its_stripes_reconstructed(
        vmd_factory: Callable[..., VmdDaemon], first: str) -> None:
    size = 2 * SIZE  # three columns of SIZE: DATA lies on every column past SHORT
    d = vmd_factory(volumes={"r5": r5_spec(size=f"{size // MiB}MiB")}).start()
    ref = write_reference(d, "r5", size)
    cols = [d.path(c) for c in d.config["volumes"]["r5"]["columns"]]
    os.truncate(cols[0], SHORT)

    if first == "verify":
        # Its "zeros" are no data: no parity is computed from them.
        rc, out, r = verify(d, "--repair", volume="r5")
        assert r["repaired_bytes"] == 0 and r["mismatched_bytes"] == 0, (out, r)
    assert read_volume(d, "r5") == ref
    assert d.plex_states("r5") == {"c0": "IOFAIL", "c1": "ACTIVE", "c2": "ACTIVE"}
    assert_failed_short(d, "r5", "c0", cols[0], SIZE)
    d.stop()
    d.start()
    assert d.plex_states("r5")["c0"] == "IOFAIL"
    assert read_volume(d, "r5") == ref


@pytest.mark.mount
@pytest.mark.allow_log(IOFAIL_LOG, r"cannot find the allocated ranges of the resync source: "
                       r".*the image ends at offset")
def test_a_resync_whose_source_is_cut_short_fails_it_and_copies_from_another(
        vmd_factory: Callable[..., VmdDaemon]) -> None:
    d = vmd_factory(volumes={"vol0": volume_spec(nplex=3)}).start()
    ref = bytearray(write_reference(d, "vol0", SIZE))
    d.cli("plex", "detach", "vol0", "p2")
    # What p2 misses (its FastResync map), past where p0 will end.
    new = os.urandom(8 * MiB)
    pwrite_file(d.volume_file(), [(16 * MiB, new)])
    ref[16 * MiB:24 * MiB] = new
    p0, p1, p2 = d.plex_paths()
    os.truncate(p0, SHORT)  # p0: the first source a resync reads

    d.cli("plex", "attach", "vol0", "p2")
    d.wait_resync(redundant=False)  # p0 is out now
    assert d.plex_states() == {"p0": "IOFAIL", "p1": "ACTIVE", "p2": "ACTIVE"}
    assert_failed_short(d, "vol0", "p0", p0, SIZE)
    assert read_volume(d, "vol0") == ref
    d.stop()
    want = hashlib.sha256(ref).hexdigest()
    assert sha(p1) == want and sha(p2) == want, "the resync copied the short image's zeros"


@pytest.mark.mount
@pytest.mark.allow_log(r"plex p1 is IOFAIL: cannot open image .* is 8388608 bytes, it must "
                       r"be 67108864 bytes", r"plex p1 gets a full resync: its image could not")
def test_an_image_cut_short_while_stopped_fails_its_plex_at_start(vmd: VmdDaemon) -> None:
    """Not the daemon: the other volumes and plexes are served."""
    ref = write_reference(vmd, "vol0", SIZE)
    vmd.stop()
    p1 = vmd.plex_paths()[1]
    os.truncate(p1, SHORT)
    vmd.start()
    rec = plex_record(vmd, "vol0", "p1")
    assert rec["state"] == "IOFAIL", rec
    assert str(p1) in rec["reason"] and f"{SHORT} bytes" in rec["reason"], rec
    assert f"{SIZE} bytes" in rec["reason"], rec
    assert read_volume(vmd, "vol0") == ref
    # Put right and attached: copied whole, and the reason says why (it read
    # "FastResync was off, or it was never tracked").
    os.truncate(p1, SIZE)
    out = vmd.cli("plex", "attach", "vol0", "p1").stdout
    assert "its image could not be opened at start" in out, out
    vmd.wait_resync()
    assert read_volume(vmd, "vol0") == ref
