"""`drl:` changed in the config between a crash and the restart. The DRL
names the regions a crash may have left different only if the run that
crashed kept one: a run with `drl: false` restarted with `drl: true`
recovered the empty, never-kept DRL's 0 regions, leaving torn mirror
writes (reads alternating between two versions) and stale RAID-5 parity
(the write hole open again)."""

from __future__ import annotations

import os
from collections.abc import Callable

from conftest import MiB, VmdDaemon, pwrite_file, volume_spec
from raid5kit import raid5_spec, xor_is_zero

AT = 5 * MiB + 4096


def _flip(path: os.PathLike[str], off: int) -> None:
    """What a crash between the two plexes' writes (or a stripe's data and
    parity writes) leaves: one copy of the block differs."""
    fd = os.open(path, os.O_RDWR)
    try:
        b = os.pread(fd, 4096, off)
        os.pwrite(fd, bytes(x ^ 0xFF for x in b), off)
    finally:
        os.close(fd)


def test_a_crash_without_a_drl_restarted_with_one_recovers_the_whole_mirror(
        vmd_factory: Callable[..., VmdDaemon], allow_log: Callable[..., None]) -> None:
    allow_log(r"not stopped cleanly")
    d = vmd_factory(volumes={"vol0": volume_spec("vol0", size="16MiB", drl=False)})
    a, b = d.plex_paths()
    d.start()
    pwrite_file(d.volume_file(), [(0, os.urandom(16 * MiB))])
    d.kill()
    _flip(b, AT)
    d.config["volumes"]["vol0"]["drl"] = True
    d.write_config()
    d.start()
    assert "whole volume" in d.stderr(), d.stderr()
    d.wait_resync()
    d.stop()
    assert a.read_bytes() == b.read_bytes(), "the plexes still differ"
    # The run that just stopped kept a DRL: a crash of the next run is
    # recovered from its dirty regions only.
    d.start()
    pwrite_file(d.volume_file(), [(0, b"x" * 4096)])
    d.kill()
    d.start()
    assert "recovering 1 regions" in d.stderr(), d.stderr()
    d.stop()


def test_a_raid5_crash_without_a_drl_restarted_with_one_regenerates_every_parity(
        vmd_factory: Callable[..., VmdDaemon], allow_log: Callable[..., None]) -> None:
    allow_log(r"not stopped cleanly", r"regenerat", r"write hole")
    d = vmd_factory(volumes={"r5": raid5_spec("r5", size="4MiB", r5log=False, drl=False)})
    cols = [d.path(f"r5-c{i}.img") for i in range(3)]
    d.start()
    pwrite_file(d.volume_file("r5"), [(0, os.urandom(4 * MiB))])
    d.kill()
    _flip(cols[2], 0)  # stripe 0's parity (on the last column) stale
    assert not xor_is_zero(cols)
    d.config["volumes"]["r5"]["drl"] = True
    d.write_config()
    d.start()
    d.wait_resync("r5")
    d.stop()
    assert xor_is_zero(cols), "stripe 0's stale parity was never regenerated"
