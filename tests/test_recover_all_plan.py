"""`--recover-all` writes a new sidecar log before the checks that may still
refuse the volume (a RAID-5 column missing, no in-sync image openable), and
a crash may come before its first checkpoint. The full recovery it asked for
must be in that log: the plain start that follows (what the refusal tells the
admin to run, or systemd's restart) must not trust a "not clean" log whose
dirty-region log names nothing."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vmd import sidecar as sc

from conftest import MiB, VmdDaemon, volume_spec
from raid5kit import raid5_spec, xor_is_zero
from test_recover_all import NEW, _write


def _stale_parity(d: VmdDaemon) -> list[Path]:
    """A RAID-5 volume full of data whose stripe 0 parity no longer matches
    (what a crash between a stripe's data and parity writes leaves), its
    sidecar log lost: the case for --recover-all."""
    d.start()
    _write(d.volume_file("r5"), os.urandom(4 * MiB))
    d.stop()
    cols = [d.path(f"r5-c{i}.img") for i in range(3)]
    with open(cols[2], "r+b") as f:
        b = f.read(1)
        f.seek(0)
        f.write(bytes([b[0] ^ 0xFF]))
    assert not xor_is_zero(cols)
    d.log_path("r5").unlink()
    return cols


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A Unix socket nobody answers: an NBD export whose handshake hangs."""
    path = f"/tmp/vmd-silent-{os.getpid()}.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(8)
    try:
        yield path
    finally:
        srv.close()
        os.unlink(path)


def test_a_refused_raid5_recover_all_still_regenerates_every_parity_at_the_next_start(
        vmd_factory: Callable[..., VmdDaemon], allow_log: Callable[..., None]) -> None:
    allow_log(r"volume r5 refused: ", r"--recover-all", r"not stopped cleanly", r"is IOFAIL",
              r"--force-degraded", r"write hole", r"regenerat")
    d = vmd_factory(volumes={"r5": raid5_spec("r5", size="4MiB", r5log=False)})
    cols = _stale_parity(d)
    away = d.path("c1-elsewhere.img")
    cols[1].rename(away)  # its disk not mounted: refused (dirty and degraded)
    d.daemon_args = ("--recover-all", "r5")
    d.start()
    err = {r["name"]: r["error"] for r in d.status().get("refused", [])}["r5"]
    assert "If the image of column c1 is only missing" in err, err
    assert "make it available and start again" in err, err
    d.stop()

    away.rename(cols[1])  # what the refusal says; then a plain start
    d.daemon_args = ()
    d.start()
    assert not d.status().get("refused"), d.status()
    d.wait_resync("r5")
    d.stop()
    assert xor_is_zero(cols), "the refused --recover-all's parity regeneration was lost"


def test_a_crash_before_the_first_checkpoint_keeps_the_recover_all_plan(
        vmd_factory: Callable[..., VmdDaemon], allow_log: Callable[..., None],
        silent_server: str) -> None:
    """The new log exists from the moment r5 is opened; the first checkpoint
    comes only once every volume is open, and the next volume's remote plex
    takes its time. SIGKILL there, then the restart systemd makes."""
    allow_log(r"--recover-all", r"not stopped cleanly", r"regenerat", r"slow",
              r"nbd\+unix", r"write hole")
    d = vmd_factory(volumes={"r5": raid5_spec("r5", size="4MiB", r5log=False)})
    cols = _stale_parity(d)
    d.config["volumes"]["slow"] = {
        "size": "4MiB", "log": "slow.log", "remote_timeout": "8s",
        "plexes": ["slow-p0.img", f"nbd+unix:///x?socket={silent_server}"]}
    d.write_config()
    d.daemon_args = ("--recover-all", "r5")
    d.proc = d._popen()
    deadline = time.monotonic() + 20
    while not d.log_path("r5").exists():  # r5 opened, "slow" not yet
        assert time.monotonic() < deadline, "r5's new log never appeared"
        time.sleep(0.02)
    d.kill()
    d.config["volumes"].pop("slow")
    d.write_config()
    d.daemon_args = ()
    d.start()
    assert not d.status().get("refused"), d.status()
    d.wait_resync("r5")
    d.stop()
    assert xor_is_zero(cols), "the --recover-all's parity regeneration was lost by the crash"


def test_a_refused_recover_all_from_a_damaged_log_still_resyncs_everything(
        vmd_factory: Callable[..., VmdDaemon], allow_log: Callable[..., None]) -> None:
    """Mirror, a log damaged after its checkpoint: --recover-all salvages the
    checkpoint, writes the new log, then finds no image it can open (their
    disk not mounted) and refuses. Mounted again, a plain start must resync
    the whole volume, not only the salvaged dirty-region log."""
    allow_log(r"volume vol0 refused: ", r"--recover-all", r"not stopped cleanly", r"damaged",
              r"is IOFAIL", r"cannot be opened", r"valid records follow")
    d = vmd_factory(volumes={"vol0": volume_spec("vol0", size="8MiB", region_size="1MiB")},
                    clean_delay=30)
    a, b = d.plex_paths()
    d.start()
    _write(d.volume_file(), NEW)
    d.kill()
    for img, fill in ((a, b"A"), (b, b"B")):  # the plexes disagree at 5 MiB
        with open(img, "r+b") as f:
            f.seek(5 * MiB)
            f.write(fill * 4096)
    log0 = d.log_path()
    data = bytearray(log0.read_bytes())
    offs, off = [], sc.HEADER_SIZE
    while (got := sc._unframe(bytes(data), off)) is not None:
        offs.append(off)
        off = got[1]
    assert len(offs) >= 3, offs  # checkpoints, then the dirty records
    data[offs[-1] + 30] ^= 1  # the last record: damaged, the checkpoint readable
    log0.write_bytes(bytes(data))
    a.rename(d.path("a-away.img"))
    b.rename(d.path("b-away.img"))
    d.daemon_args = ("--recover-all", "vol0")
    d.start()
    err = {r["name"]: r["error"] for r in d.status().get("refused", [])}["vol0"]
    assert "records the whole recovery --recover-all asked for" in err, err
    d.stop()
    d.path("a-away.img").rename(a)
    d.path("b-away.img").rename(b)
    d.daemon_args = ()
    d.start()
    assert not d.status().get("refused"), d.status()
    d.wait_resync()
    d.stop()
    with open(a, "rb") as fa, open(b, "rb") as fb:
        fa.seek(5 * MiB)
        fb.seek(5 * MiB)
        assert fa.read(4096) == fb.read(4096), "the plexes still disagree"


def test_recover_all_naming_a_missing_image_of_a_readable_checkpoint_is_refused(
        vmd_factory: Callable[..., VmdDaemon], allow_log: Callable[..., None]) -> None:
    """The config path refused a missing named source; the salvaged path (the
    log's checkpoint readable) served the volume with every read EIO."""
    allow_log(r"volume vol0 refused: ", r"--recover-all")
    d = vmd_factory(volumes={"vol0": volume_spec("vol0", size="8MiB", region_size="1MiB")})
    a, _ = d.plex_paths()
    d.start()
    _write(d.volume_file(), NEW)
    d.stop()
    a.rename(d.path("a-away.img"))
    d.daemon_args = ("--recover-all", "vol0=p0")
    d.start()
    err = {r["name"]: r["error"] for r in d.status().get("refused", [])}["vol0"]
    assert f"from {a}, which is missing" in err, err
    d.stop()
    d.path("a-away.img").rename(a)
    d.daemon_args = ()
    d.start()  # the old log was left in place
    with open(d.volume_file(), "rb") as f:
        assert f.read(len(NEW)) == NEW
    d.stop()


def _killed_with_writes_in_the_raid5_log_only(vmd_factory: Callable[..., VmdDaemon],
                                              at: int) -> tuple[VmdDaemon, bytes]:
    """A RAID-5 volume with a log, SIGKILLed right after an fsync'd write the
    write-back cache held back: the write is durable in the RAID-5 log only."""
    d = vmd_factory(volumes={"r5": raid5_spec("r5", size="4MiB")})
    d.start()
    _write(d.volume_file("r5"), bytes(4 * MiB))
    d.stop()
    d.env["VMD_TEST_FAULT"] = "hold-write-back:r5"  # nothing leaves the cache
    d.start()
    data = os.urandom(200 * 1024)
    fd = os.open(d.volume_file("r5"), os.O_RDWR)
    try:
        os.pwrite(fd, data, at)
        os.fsync(fd)
    finally:
        os.close(fd)
    d.kill()
    d.env.pop("VMD_TEST_FAULT")
    return d, data


@pytest.mark.parametrize("lost", ["log-gone", "header-only"])
def test_recover_all_replays_the_raid5_log_that_names_the_volume(
        vmd_factory: Callable[..., VmdDaemon], allow_log: Callable[..., None], lost: str) -> None:
    """The sidecar log lost (or all of it but its header), the RAID-5 log
    intact: the writes an fsync made durable only in the RAID-5 log (the
    write-back cache had written none of them to the columns) were emptied
    unread by --recover-all, or refused as another volume's log."""
    allow_log(r"--recover-all", r"not stopped cleanly", r"regenerat", r"RAID-5 log replayed")
    d, data = _killed_with_writes_in_the_raid5_log_only(vmd_factory, 1000)
    cols = [d.path(f"r5-c{i}.img") for i in range(3)]
    assert not any(any(c.read_bytes()) for c in cols), "a write reached the columns"
    log0 = d.log_path("r5")
    if lost == "log-gone":
        log0.unlink()
    else:
        with open(log0, "r+b") as f:
            f.truncate(sc.HEADER_SIZE)  # the header, no checkpoint
    d.daemon_args = ("--recover-all", "r5")
    d.start()
    assert not d.status().get("refused"), d.status()
    d.wait_resync("r5")
    with open(d.volume_file("r5"), "rb") as f:
        f.seek(1000)
        assert f.read(len(data)) == data, "the writes the RAID-5 log held were lost"
    d.stop()
    assert xor_is_zero(cols)


def test_a_raid5_log_with_a_damaged_magic_names_the_way_out(
        vmd_factory: Callable[..., VmdDaemon], allow_log: Callable[..., None]) -> None:
    """After an unclean stop, a RAID-5 log whose first bytes are damaged is
    refused (vmd cannot tell which stripes were being written), and so was
    --recover-all (it will not overwrite a file that is not a RAID-5 log);
    the refusal now says what to do, and doing it serves the volume."""
    allow_log(r"volume r5 refused: ", r"--recover-all", r"not stopped cleanly", r"regenerat")
    d = vmd_factory(volumes={"r5": raid5_spec("r5", size="4MiB")})
    d.start()
    data = os.urandom(4 * MiB)
    _write(d.volume_file("r5"), data)
    d.stop()
    d.start()
    small = os.urandom(4096)
    _write(d.volume_file("r5"), small)  # dirty again, perhaps only in the log
    d.kill()
    r5log = d.path("r5.r5log")
    with open(r5log, "r+b") as f:
        f.write(b"XXXXXXXX")
    d.start()
    err = {r["name"]: r["error"] for r in d.status().get("refused", [])}["r5"]
    assert f"mv {r5log} {r5log}.damaged" in err and "vmd start r5 --recover-all" in err, err
    r5log.rename(f"{r5log}.damaged")
    d.cli("start", "r5", "--recover-all")
    d.wait_resync("r5")
    with open(d.volume_file("r5"), "rb") as f:
        got = f.read()
    # The small write may have been in the damaged log only: old or new.
    assert got[4096:] == data[4096:] and got[:4096] in (data[:4096], small)
    d.stop()
    assert xor_is_zero([d.path(f"r5-c{i}.img") for i in range(3)])


def test_a_missing_raid5_log_after_a_crash_is_refused_until_it_is_back(
        vmd_factory: Callable[..., VmdDaemon], allow_log: Callable[..., None]) -> None:
    """The RAID-5 log's disk not mounted at the restart after a crash: the
    log was created anew, empty, and the fsync'd writes it held were lost
    with no word. Refused; back in place, `vmd start` replays it."""
    allow_log(r"volume r5 refused: ", r"not stopped cleanly", r"RAID-5 log replayed",
              r"regenerat", r"--recover-all")
    d, data = _killed_with_writes_in_the_raid5_log_only(vmd_factory, 8192)
    r5log = d.path("r5.r5log")
    away = d.path("r5.r5log.offline")
    r5log.rename(away)
    d.start()
    err = {r["name"]: r["error"] for r in d.status().get("refused", [])}["r5"]
    assert f"its RAID-5 log {r5log} is missing" in err, err
    assert not r5log.exists(), "an empty log was left where the real one belongs"
    away.rename(r5log)
    d.cli("start", "r5")
    d.wait_resync("r5")
    with open(d.volume_file("r5"), "rb") as f:
        f.seek(8192)
        assert f.read(len(data)) == data, "the fsync'd writes the RAID-5 log held were lost"
    d.stop()
    assert xor_is_zero([d.path(f"r5-c{i}.img") for i in range(3)])
