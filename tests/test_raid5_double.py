"""A RAID-5 volume with two columns out (vmd/raid5_double.py, trial 9 F2): a
column detached for maintenance and a second that fails meanwhile. Both come
back when no stripe lacks both; where some do, the attach is refused (nothing
changed) until the administrator names the column to trust there
(`--force`), and every stripe that had a second copy reads right after."""

from __future__ import annotations

import os

import pytest
import trio

from vmd.config import MiB
from vmd.errors import VmdError
from vmd.raid5 import Raid5Volume
from vmd.volume import VolumeIOError

from enginekit import running_volume
from raid5kit import FailingColumn, column_bytes, raid5_config, raid5_spec, xor_all

SIZE = 8 * MiB  # 64 stripes of 128 KiB; DRL regions of 1 MiB (8 stripes)


async def _drl_clean(vol: Raid5Volume) -> None:
    """Until the lazy cleaner has cleaned every region (clean_delay 0.2 s): a
    column failing afterwards lacks only what it failed on."""
    with trio.fail_after(30):
        while vol.state.drl.bits.any():
            await trio.sleep(0.05)


def _states(vol: Raid5Volume) -> dict[str, str]:
    return {p.name: p.state for p in vol.columns}


async def _c0_detached_then_c2_fails(vol: Raid5Volume, failing: type[FailingColumn],
                                     ref: bytearray) -> None:
    """c0 detached misses the first MiB (8 stripes); once the DRL is clean,
    c2 fails on a read far from them (its unit of stripe 40 is data): two
    columns out whose maps do not overlap."""
    await vol.detach_plex("c0")
    ref[0:MiB] = os.urandom(MiB)
    await vol.pwrite(0, bytes(ref[0:MiB]))
    await _drl_clean(vol)
    failing.fail = ("c2", "read")
    with pytest.raises(VolumeIOError):
        await vol.pread(40 * vol.width, vol.width)
    failing.fail = None
    assert _states(vol) == {"c0": "DETACHED", "c1": "ACTIVE", "c2": "IOFAIL"}


@pytest.fixture
def failing(monkeypatch: pytest.MonkeyPatch) -> type[FailingColumn]:
    monkeypatch.setattr(FailingColumn, "fail", None)
    return FailingColumn


@pytest.mark.trio
@pytest.mark.parametrize("attached", ["c0", "c2"])
@pytest.mark.allow_log(r"plex c2 .* is now IOFAIL", r"comes back with")
async def test_two_columns_out_come_back_together_when_no_stripe_lacks_both(
        tmp_path, failing, attached):
    cfg = raid5_config(tmp_path, size=SIZE)
    ref = bytearray(os.urandom(SIZE))
    async with running_volume(cfg, plex_factory=failing) as vol:
        await vol.pwrite(0, bytes(ref))
        await _c0_detached_then_c2_fails(vol, failing, ref)
        assert vol.status()["health"] == "failed"
        assert "see `RAID-5: two columns out`" in vol.status()["problem"]
        reply = await vol.attach_plex(attached)
        other = "c2" if attached == "c0" else "c0"
        assert reply["with"] == other, reply
        assert vol._can_serve()
        # Serving, but no complete second copy yet (trial 10, T-C: it said "ok").
        st = vol.status()
        assert st["health"] == "degraded" and f"column {other} lacks" in st["problem"], st
        # Served at once, both being rebuilt: every stripe lacks one column at most.
        assert bytes(await vol.pread(0, SIZE)) == bytes(ref)
        await vol.resync.wait_idle()
        assert _states(vol) == {"c0": "ACTIVE", "c1": "ACTIVE", "c2": "ACTIVE"}
        assert vol.status()["health"] == "ok"
        assert bytes(await vol.pread(0, SIZE)) == bytes(ref)
    assert not any(xor_all(column_bytes(cfg)))


@pytest.mark.trio
@pytest.mark.allow_log(r"plex c2 .* is now IOFAIL", r"comes back with", r"trusted as it is",
                       r"lost a second column")
async def test_stripes_both_lack_refuse_the_attach_until_forced(tmp_path, failing):
    cfg = raid5_config(tmp_path, size=SIZE)
    ref = bytearray(os.urandom(SIZE))
    async with running_volume(cfg, plex_factory=failing) as vol:
        await vol.pwrite(0, bytes(ref))
        await vol.detach_plex("c0")
        ref[0:MiB] = os.urandom(MiB)
        await vol.pwrite(0, bytes(ref[0:MiB]))
        await _drl_clean(vol)
        # c2 fails on a write with c0 out: that write's stripe lacks both
        # (c0 missed it, c2 failed it), and the write is refused.
        failing.fail = ("c2", "write")
        at = 5 * MiB
        with pytest.raises(VolumeIOError):
            await vol.pwrite(at, os.urandom(4096))
        failing.fail = None
        before = _states(vol)
        assert before == {"c0": "DETACHED", "c1": "ACTIVE", "c2": "IOFAIL"}
        fds = [p.fd for p in vol.columns]
        maps = [p.record.missing.bits.copy() for p in vol.columns]
        for name, other in (("c2", "c0"), ("c0", "c2")):
            with pytest.raises(VmdError) as e:
                await vol.attach_plex(name)
            why = str(e.value)
            for s in (f"has two columns out ({name} and {other})", "lack both",
                      f"vmd plex attach {vol.name} {name} --force"):
                assert s in why, why
            assert _states(vol) == before  # nothing changed
            assert [p.fd for p in vol.columns] == fds
            assert [p.record.missing.bits for p in vol.columns] == maps
        # c2 is the one to trust: it has every write before its failure; c0
        # missed the first MiB.
        reply = await vol.attach_plex("c2", force=True)
        assert reply["with"] == "c0", reply
        await vol.resync.wait_idle()
        assert _states(vol) == {"c0": "ACTIVE", "c1": "ACTIVE", "c2": "ACTIVE"}
        got = bytes(await vol.pread(0, SIZE))
        # Every stripe but the failed write's own reads what was written.
        s = at // vol.width
        lo, hi = s * vol.width, (s + 1) * vol.width
        assert got[:lo] == bytes(ref[:lo]) and got[hi:] == bytes(ref[hi:])
    assert not any(xor_all(column_bytes(cfg)))


@pytest.mark.trio
async def test_force_is_for_a_raid5_volume_with_two_columns_out(tmp_path):
    cfg = raid5_config(tmp_path, size=SIZE)
    async with running_volume(cfg) as vol:
        await vol.detach_plex("c1")
        await vol.attach_plex("c1", force=True)  # one column out: force changes nothing
        await vol.resync.wait_idle()
        assert _states(vol) == {"c0": "ACTIVE", "c1": "ACTIVE", "c2": "ACTIVE"}


@pytest.mark.trio
@pytest.mark.parametrize("r5log", [True, False])
@pytest.mark.allow_log(r"plex c2 .* is now IOFAIL", r"comes back with", r"not stopped cleanly",
                       r"RAID-5 log replayed", r"started anyway", r"resync interrupted")
async def test_a_crash_while_two_columns_are_rebuilt_loses_no_stripe(tmp_path, failing, r5log):
    """Review 15, R1: a crash while both columns were SYNCING marked every
    dirty stripe on both, which then lacked two columns: EIO after the
    restart, also with the RAID-5 log replayed onto both. A SYNCING column
    took every write like an ACTIVE one: only columns closed since before
    get the dirty stripes."""
    kw = {"raid5_log": tmp_path / "r5.r5log"} if r5log else {}
    cfg = raid5_config(tmp_path, size=SIZE, **kw)
    ref = bytearray(os.urandom(SIZE))
    async with running_volume(cfg, plex_factory=failing, shutdown=False,
                              rate_limit=64 * 1024) as vol:  # a rebuild that lasts
        await vol.pwrite(0, bytes(ref))
        await vol.sync()
        await _drl_clean(vol)
        await _c0_detached_then_c2_fails(vol, failing, ref)
        assert (await vol.attach_plex("c0"))["with"] == "c2"
        assert _states(vol) == {"c0": "SYNCING", "c1": "ACTIVE", "c2": "SYNCING"}
        ref[4 * MiB:5 * MiB] = os.urandom(MiB)  # stripes neither lacks, dirty at the crash
        await vol.pwrite(4 * MiB, bytes(ref[4 * MiB:5 * MiB]))
        await vol.sync()
        assert vol.state.drl.bits.any()
    # Without a RAID-5 log a dirty volume with columns out is refused unless forced.
    async with running_volume(cfg, force_degraded=not r5log) as vol:
        assert vol._can_serve(), vol.status()["problem"]
        assert bytes(await vol.pread(0, SIZE)) == bytes(ref)
        await vol.resync.wait_idle()
        assert _states(vol) == {"c0": "ACTIVE", "c1": "ACTIVE", "c2": "ACTIVE"}
        assert bytes(await vol.pread(0, SIZE)) == bytes(ref)
    assert not any(xor_all(column_bytes(cfg)))


@pytest.mark.mount
@pytest.mark.allow_log(r"plex c2 .* is now IOFAIL", r"No space left on device", r"comes back with",
                       r"trusted as it is", r"lost a second column", r"cannot record",
                       r"write .* failed", r"FAILED")
def test_a_column_detached_and_a_second_out_of_space_come_back_with_force(
        vmd_factory, sysres, tmp_path):
    """Trial 9, F2, through the daemon: c0 detached for maintenance, c2's
    filesystem fills up under writes. The volume was FAILED for good: both
    attaches refused, `--recover-all` threw the maps away. Now the attach
    says which stripes lack both and how to go on; `--force` on c2 (whose
    image kept every write before its disk filled up) brings both back."""
    small = tmp_path / "small"
    sysres.make_ext4_image(tmp_path / "small.img", 24 * MiB, small)
    d = vmd_factory(volumes={"r5": raid5_spec(
        "r5", size="64MiB", r5log=False,  # no write-back: c2 fills up only when told
        columns=["r5-c0.img", "r5-c1.img", str(small / "r5-c2.img")])})
    d.start()
    first = os.urandom(8 * MiB)
    fd = os.open(d.volume_file("r5"), os.O_RDWR)
    try:
        os.pwrite(fd, first, 0)
        os.fsync(fd)
        st = os.statvfs(small)
        filler = small / "filler"
        with open(filler, "wb") as f:  # leave 1 MiB of room
            os.posix_fallocate(f.fileno(), 0, st.f_bavail * st.f_frsize - MiB)
        d.cli("plex", "detach", "r5", "c0")
        with pytest.raises(OSError):
            for i in range(16):
                os.pwrite(fd, os.urandom(MiB), (16 + i) * MiB)
                os.fsync(fd)
    finally:
        os.close(fd)
    st = d.status("r5")
    assert {c["name"]: c["state"] for c in st["plexes"]} == {
        "c0": "DETACHED", "c1": "ACTIVE", "c2": "IOFAIL"}, st
    assert st["health"] == "failed" and "two or more columns are out" in st["problem"], st
    filler.unlink()
    p = d.cli("plex", "attach", "r5", "c2", check=False)
    assert p.returncode == 1 and "vmd plex attach r5 c2 --force" in p.stderr, p.stderr
    p = d.cli("plex", "attach", "r5", "c2", "--force")
    assert "column c0 came back with it" in p.stdout, p.stdout
    d.cli("wait", "r5")
    st = d.status("r5")
    assert st["health"] == "ok" and not st["degraded"], st
    assert all(c["state"] == "ACTIVE" for c in st["plexes"]), st
    with open(d.volume_file("r5"), "rb") as f:
        assert f.read(8 * MiB) == first
    d.cli("verify", "r5")
    d.stop()


@pytest.mark.trio
async def test_rebuild_keeps_holes_and_zeroes_a_replaced_image_where_the_others_have_none(
        tmp_path):
    """Trial 9, F7: a rebuild wrote every run, filling the new column's holes
    (a 256 MiB column fully allocated for 140 MiB of files). Runs where no
    other column holds data are punched: a new image stays sparse, and an
    existing one given to `plex replace` reads zeros there, as parity needs."""
    cfg = raid5_config(tmp_path, size=32 * MiB)  # 16 MiB columns
    data = os.urandom(2 * MiB)
    junk = tmp_path / "junk-c2.img"
    junk.write_bytes(os.urandom(16 * MiB))  # an old disk image, full of bytes
    async with running_volume(cfg) as vol:
        await vol.pwrite(8 * MiB, data)
        await vol.detach_plex("c2")
        await vol.attach_plex("c2", path=str(junk))
        await vol.resync.wait_idle()
        assert _states(vol)["c2"] == "ACTIVE"
        assert bytes(await vol.pread(8 * MiB, len(data))) == data
        assert bytes(await vol.pread(0, 8 * MiB)) == bytes(8 * MiB)
    cols = [*cfg.plexes[:2], junk]
    assert not any(xor_all([p.read_bytes() for p in cols]))
    used = [os.stat(p).st_blocks * 512 for p in cols]
    # c2 holds about what the others do (1 MiB of data and parity each), not 16 MiB.
    assert used[2] <= max(used[:2]) + 2 * MiB, used


@pytest.mark.trio
@pytest.mark.allow_log(r"plex c2 .* is now IOFAIL", r"comes back with", r"trusted as it is",
                       r"gets a full rebuild")
async def test_without_fastresync_force_trusts_the_column_named_and_rebuilds_the_other_whole(
        tmp_path, failing):
    """Review 15, R2: with `fastresync: false` no column out has a map, so
    every stripe lacked both, and even `--force` was refused. Now `--force`
    trusts the named column's image and rebuilds the other whole (md's
    --assemble --force); without it the refusal says why and what to do."""
    cfg = raid5_config(tmp_path, size=SIZE, fastresync=False)
    ref = os.urandom(SIZE)
    async with running_volume(cfg, plex_factory=failing) as vol:
        await vol.pwrite(0, ref)
        await vol.detach_plex("c0")
        failing.fail = ("c2", "read")
        with pytest.raises(VolumeIOError):
            await vol.pread(40 * vol.width, vol.width)
        failing.fail = None
        with pytest.raises(VmdError) as e:
            await vol.attach_plex("c2")
        assert "FastResync" in str(e.value) and "--force" in str(e.value), str(e.value)
        reply = await vol.attach_plex("c2", force=True)
        assert reply["with"] == "c0", reply
        assert _states(vol)["c2"] == "ACTIVE"  # trusted everywhere
        await vol.resync.wait_idle()
        assert _states(vol) == {"c0": "ACTIVE", "c1": "ACTIVE", "c2": "ACTIVE"}
        assert bytes(await vol.pread(0, SIZE)) == ref
    assert not any(xor_all(column_bytes(cfg)))


@pytest.mark.trio
@pytest.mark.allow_log(r"plex c2 .* is now IOFAIL", r"lost a second column", r"write-back",
                       r"RAID-5 log")
async def test_a_refused_attach_leaves_the_raid5_log_as_it_was(tmp_path, failing):
    """Review 15, R5: the log was retired (flushed, rewound) before the
    refusal; a refused attach changes nothing, the log included."""
    cfg = raid5_config(tmp_path, size=SIZE, raid5_log=tmp_path / "r5.r5log")
    async with running_volume(cfg, plex_factory=failing) as vol:
        await vol.pwrite(0, os.urandom(SIZE))
        await vol.detach_plex("c0")
        await vol.pwrite(0, os.urandom(MiB))
        failing.fail = ("c2", "write")
        await vol.pwrite(5 * MiB, os.urandom(4096))  # answered: the log holds it
        await vol.drain()  # its write-back meets c2's failure
        failing.fail = None
        assert _states(vol) == {"c0": "DETACHED", "c1": "ACTIVE", "c2": "IOFAIL"}
        retires = vol.r5log.retires
        with pytest.raises(VmdError):
            await vol.attach_plex("c2")
        assert vol.r5log.retires == retires


def test_lacking_in_c_agrees_with_the_bits():
    """raid5_double.lacking ORs the map's bits per stripe with slices (review
    15, R3: a Python loop over the bits took a second per TiB)."""
    import random

    from bitarray import bitarray

    from vmd import raid5_double
    from vmd.regionmap import RegionMap

    class V:
        def __init__(self, ncol: int):
            self.su, self.width = 64 * 1024, (ncol - 1) * 64 * 1024
            self.size = 300 * self.width

    rnd = random.Random(15)
    for ncol in (3, 4, 6):
        vol = V(ncol)
        m = RegionMap(vol.size, vol.su)
        for i in rnd.sample(range(m.nbits), 40):
            m.bits[i] = 1
        want = bitarray(vol.size // vol.width)
        want.setall(0)
        for i in m.set_indices():
            want[i * vol.su // vol.width] = 1
        assert raid5_double.lacking(vol, m) == want
        assert raid5_double.lacking(vol, None).all()


@pytest.mark.trio
@pytest.mark.allow_log(r"plex c2 .* is now IOFAIL", r"comes back with", r"trusted as it is",
                       r"gets a full rebuild")
async def test_a_second_column_whose_image_changed_comes_back_with_force(tmp_path, failing):
    """Trial 10, T-B: c0 detached, c2 failed and its image then "changed"
    (the documented `truncate -s SIZE` after a cut-short image changes its
    size and mtime): each attach named the other as the way out and --force
    was ignored. Now `attach c2 --force` trusts c2 where c0 lacks stripes
    and rebuilds c2 from c0 elsewhere."""
    cfg = raid5_config(tmp_path, size=SIZE)
    ref = bytearray(os.urandom(SIZE))
    async with running_volume(cfg, plex_factory=failing) as vol:
        await vol.pwrite(0, bytes(ref))
        await _c0_detached_then_c2_fails(vol, failing, ref)
        st = os.stat(cfg.plexes[2])
        os.utime(cfg.plexes[2], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # "changed"
        for name in ("c2", "c0"):
            with pytest.raises(VmdError) as e:
                await vol.attach_plex(name)
            assert "--force" in str(e.value), str(e.value)
        reply = await vol.attach_plex("c2", force=True)
        assert reply["with"] == "c0" and reply["full_resync"], reply
        await vol.resync.wait_idle()
        assert _states(vol) == {"c0": "ACTIVE", "c1": "ACTIVE", "c2": "ACTIVE"}
        assert bytes(await vol.pread(0, SIZE)) == bytes(ref)
    assert not any(xor_all(column_bytes(cfg)))
