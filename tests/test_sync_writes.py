"""O_SYNC/O_DSYNC writes through a real mount: durable when answered, with
direct_io (the kernel sends no fsync after them) and without (it does: vmd
must not sync a second time)."""

from __future__ import annotations

import os

import pytest

from vmd.config import KiB

from daemonkit import volume_spec
from raid5kit import raid5_spec


def _pwrite(path, flags: int, off: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | flags)
    try:
        assert os.pwrite(fd, data, off) == len(data)
    finally:
        os.close(fd)


def _syncs(d, volume: str) -> int:
    st = d.status(volume)
    return (st["volumes"][0] if "volumes" in st else st)["syncs"]


@pytest.mark.allow_log("not stopped cleanly", "RAID-5 log replayed")
def test_an_o_dsync_write_to_raid5_survives_a_sigkill_with_the_log_committing_only_when_asked(
        vmd_factory):
    # The fault: the RAID-5 log commits a batch only when someone waits for
    # it, and writes nothing back; a write nobody syncs is lost at a SIGKILL.
    d = vmd_factory(volumes={"r5": raid5_spec(size="4MiB")},
                    env={"VMD_TEST_FAULT": "hold-commit:r5"})
    d.start()
    vol = d.volume_file("r5")
    synced, plain = b"S" * (8 * KiB), b"P" * (8 * KiB)
    _pwrite(vol, os.O_DSYNC, 100 * KiB, synced)
    assert _syncs(d, "r5") == 1
    _pwrite(vol, 0, 900 * KiB, plain)  # answered from the cache, never committed
    d.kill()
    d.env.pop("VMD_TEST_FAULT")
    d.start()
    with open(vol, "rb") as f:
        assert os.pread(f.fileno(), len(synced), 100 * KiB) == synced, \
            "an O_DSYNC write was answered before it was durable"
        assert os.pread(f.fileno(), len(plain), 900 * KiB) == bytes(len(plain)), \
            "the fault did not hold the plain write: the test proves nothing"
    d.stop()


@pytest.mark.parametrize("direct_io,writeback_cache", [(True, False), (False, True),
                                                       (False, False)])
def test_a_mirror_syncs_once_per_o_sync_write(vmd_factory, direct_io, writeback_cache):
    d = vmd_factory(volumes={"vol0": volume_spec(size="4MiB", direct_io=direct_io)},
                    extra={"writeback_cache": writeback_cache})
    d.start()
    vol = d.volume_file("vol0")
    for i, flag in enumerate([os.O_DSYNC, os.O_SYNC, os.O_DSYNC]):
        _pwrite(vol, flag, i * 64 * KiB, b"x" * 4096)
        # With direct_io vmd syncs; without, the kernel's fsync after the
        # write does, and vmd adds none.
        assert _syncs(d, "vol0") == i + 1
    _pwrite(vol, 0, 512 * KiB, b"y" * 4096)
    assert _syncs(d, "vol0") == 3
    d.stop()
