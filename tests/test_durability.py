"""Nothing acknowledged is lost (issue 12): ext4 on a loop device on a volume,
a writer appending numbered records with fsync, the daemon SIGKILLed while it
writes; after a restart the filesystem is clean and every record up to the
last acknowledged fsync is there, intact.

The fsync chain under test: the writer's fsync commits ext4's journal, which
ends in a flush (REQ_PREFLUSH/FUA) to the loop device; the loop device turns it
into an fsync of its backing file, the volume file, which vmd answers only
after every in-sync plex fdatasync'ed. Any cache on the way (the volume file's
page cache with `direct_io: false`, the FUSE writeback cache) must be written
back to vmd before that fsync is, or a record the writer was told is durable
dies with the daemon.
"""

from __future__ import annotations

import errno
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import (CMD_TIMEOUT, MiB, REPO, START_TIMEOUT, SysResources, VmdDaemon, run,
                      volume_spec, wait_for)
from fsync_writer import RECORD, record
from vmd.config import load_config

pytestmark = pytest.mark.mount

WRITER = Path(__file__).with_name("fsync_writer.py")
ROUND_TIMEOUT = 45.0  # per round: acknowledged records must arrive well within it
# (records acknowledged before the kill, records per fsync) for each round: an
# early and a later kill, and fsyncs covering one record or a batch.
ROUNDS = [(40, 1), (150, 16), (300, 1)]


class Writer:
    """fsync_writer.py in a subprocess; `acked` is the last record number it
    reported as fsync'd (-1: none yet)."""

    def __init__(self, path: Path, tag: str, batch: int):
        self.path = path
        self.proc = subprocess.Popen([sys.executable, str(WRITER), str(path), tag, str(batch)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.acked = -1
        self._partial = b""

    def _take(self, data: bytes) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()  # a number not yet followed by its newline is not reported
        if lines:
            self.acked = int(lines[-1])

    def wait_acked(self, n: int, timeout: float) -> None:
        """Until record n is reported fsync'd (the writer is mid-stream then)."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while self.acked < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.path}: only {self.acked + 1} records fsync'd "
                                     f"after {timeout} s (wanted {n + 1})")
            if select.select([fd], [], [], left)[0]:
                data = os.read(fd, 65536)
                if not data:
                    self.proc.wait()
                    raise AssertionError(f"writer exited {self.proc.returncode} after "
                                         f"{self.acked + 1} records: {self._stderr()}")
                self._take(data)

    def kill(self) -> int:
        """Kill it and collect what it reported before dying: the last acked number."""
        self.proc.kill()
        out, _ = self.proc.communicate(timeout=30)
        self._take(out)
        return self.acked

    def _stderr(self) -> str:
        assert self.proc.stderr is not None
        return self.proc.stderr.read().decode(errors="replace")


def check_records(path: Path, tag: str, last: int) -> None:
    """Records 0..last of round `tag` are in `path`, each exactly as written."""
    data = path.read_bytes()
    assert len(data) >= (last + 1) * RECORD, (
        f"{path}: {len(data)} bytes, but record {last} was fsync'd "
        f"(needs {(last + 1) * RECORD})")
    for n in range(last + 1):
        got = data[n * RECORD:(n + 1) * RECORD]
        assert got == record(tag, n), f"{path}: record {n} of {last} fsync'd ones differs: {got[:40]!r}"


def fsck_clean(dev: str) -> None:
    fsck = run(["fsck.ext4", "-fn", dev], check=False)
    assert fsck.returncode == 0, f"fsck.ext4 -fn {dev} found problems:\n{fsck.stdout}\n{fsck.stderr}"


# The three ways a volume file's writes reach vmd: (direct_io, writeback_cache).
TESTED_CACHE_MODES = [(True, False), (False, False), (False, True)]
CACHE_MODES = pytest.mark.parametrize("direct_io,writeback", TESTED_CACHE_MODES,
                                      ids=["direct_io", "page_cache", "writeback"])


def make_vmd(vmd_factory: Callable[..., VmdDaemon], direct_io: bool, writeback: bool,
             size: str = "128MiB") -> VmdDaemon:
    return vmd_factory(volumes={"vol0": volume_spec("vol0", size=size, direct_io=direct_io)},
                       extra={"writeback_cache": writeback})


@pytest.mark.allow_log(r"volume vol0 was not stopped cleanly")
@CACHE_MODES
def test_fsynced_records_survive_sigkill(vmd_factory: Callable[..., VmdDaemon],
                                         sysres: SysResources, tmp_path: Path,
                                         direct_io: bool, writeback: bool) -> None:
    vmd = make_vmd(vmd_factory, direct_io, writeback).start()
    dev = vmd.losetup()
    run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", dev])
    fs = tmp_path / "fs"
    acked: dict[str, int] = {}
    for i, (kill_after, batch) in enumerate(ROUNDS):
        mnt = Path(sysres.mount(dev, fs))
        tag = f"r{i}"
        writer = Writer(mnt / f"{tag}.log", tag, batch)
        try:
            writer.wait_acked(kill_after, ROUND_TIMEOUT)
            vmd.kill()  # SIGKILL mid-stream: the writer is between two fsyncs
        finally:
            acked[tag] = writer.kill()
        assert acked[tag] >= kill_after
        # The ext4 mount and the loop device sit on a dead FUSE connection:
        # lazy umount, detach, then a restart (which clears the dead mount).
        sysres.release()
        assert not sysres.verify_released()
        vmd.start()
        dev = vmd.losetup()
        # fsck -n cannot replay ext4's journal (it is read-only), so before the
        # replay it would report the committed-but-unapplied transactions as
        # damage; and e2fsck -y would repair, hiding exactly what this test
        # looks for. The kernel's mount replays the journal, as at any boot;
        # the replayed filesystem must then be clean without any repair.
        mnt = Path(sysres.mount(dev, fs))
        sysres.umount(mnt)
        fsck_clean(dev)
        mnt = Path(sysres.mount(dev, fs, "-o", "ro"))
        for t, last in acked.items():  # this round's and every earlier one's
            check_records(mnt / f"{t}.log", t, last)
        sysres.umount(mnt)
    sysres.detach_loop(dev)
    vmd.stop()


def _plex_bytes(vmd: VmdDaemon, off: int, length: int) -> list[bytes]:
    out = []
    for p in vmd.plex_paths():
        with open(p, "rb") as f:
            f.seek(off)
            out.append(f.read(length))
    return out


@pytest.mark.parametrize("force", [False, True], ids=["closed", "force_while_open"])
def test_writeback_stop_loses_no_written_page(vmd_factory: Callable[..., VmdDaemon],
                                              force: bool) -> None:
    """Writes never fsync'd, only cached by the kernel (writeback cache), are
    on both plexes after a stop: a clean one (the close wrote them back) and
    `vmd stop --force` with the file still open (the daemon has the kernel
    write them back before it unmounts)."""
    vmd = make_vmd(vmd_factory, direct_io=False, writeback=True, size="16MiB").start()
    data = os.urandom(3 * 4096 + 100)
    off = 5 * 4096 + 7
    fd = os.open(vmd.volume_file(), os.O_RDWR)
    try:
        # The cache is on: 4 KiB writes reach vmd merged, at the fsync.
        for i in range(16):
            os.pwrite(fd, b"%4096d" % i, 1 << 20 | i * 4096)
        os.fsync(fd)
        assert vmd.status("vol0")["max_write"] > 4096
        assert os.pwrite(fd, data, off) == len(data)
        if not force:
            os.close(fd)
            fd = -1
            vmd.stop()
        else:
            assert vmd.status("vol0")["open"] >= 1
            vmd.stop(force=True)
    finally:
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:  # the mount is gone under it
                pass
    assert _plex_bytes(vmd, off, len(data)) == [data, data]


def test_writeback_write_past_end_fails_at_fsync(vmd_factory: Callable[..., VmdDaemon]) -> None:
    """With the writeback cache the kernel takes a write past the end into its
    cache; vmd refuses it at writeback and fsync says so (ENOSPC); the
    plexes never grow."""
    vmd = make_vmd(vmd_factory, direct_io=False, writeback=True, size="16MiB").start()
    size = vmd.volume_size()
    fd = os.open(vmd.volume_file(), os.O_RDWR)
    try:
        assert os.pwrite(fd, b"x" * 4096, size) == 4096
        with pytest.raises(OSError) as ei:
            os.fsync(fd)
        assert ei.value.errno == errno.ENOSPC, ei.value
    finally:
        os.close(fd)
    vmd.stop()
    assert [p.stat().st_size for p in vmd.plex_paths()] == [size, size]


def test_shipped_config_keeps_what_was_fsynced(tmp_path: Path) -> None:
    """config/vmd.yaml as shipped (`make run`), in a copy whose relative
    paths land in tmp_path: its cache mode is one the tests above cover, and
    a daemon on it, killed with SIGKILL after an fsync, still has those bytes
    after a restart (while a later write that no fsync covered may be lost)."""
    cfg_dir = tmp_path / "config"
    cfg_dir.mkdir()
    cfg = cfg_dir / "vmd.yaml"
    shutil.copy(REPO / "config" / "vmd.yaml", cfg)
    shipped = load_config(cfg)
    vol = shipped.volumes["vol0"]
    assert (vol.direct_io, shipped.writeback_cache) in TESTED_CACHE_MODES
    vmd = [sys.executable, "-m", "vmd", "-c", str(cfg)]

    log = tmp_path / "daemon.log"

    def start() -> subprocess.Popen[bytes]:
        with open(log, "ab") as err:
            proc = subprocess.Popen([*vmd, "daemon"], cwd=REPO, stderr=err)
        wait_for(lambda: proc.poll() is not None or subprocess.run(
            [*vmd, "status"], cwd=REPO, capture_output=True).returncode == 0,
            START_TIMEOUT, "the daemon on the shipped config to serve")
        assert proc.poll() is None, log.read_text()
        return proc

    proc = start()
    try:
        data = os.urandom(4 * MiB)
        with open(shipped.mountpoint / "vol0", "r+b") as f:
            f.write(data)
            os.fsync(f.fileno())
            f.seek(8 * MiB)
            f.write(b"not fsynced" * 1000)
        proc.kill()
        proc.wait()
        proc = start()  # clears the dead mount, recovers the dirty regions
        with open(shipped.mountpoint / "vol0", "rb") as f:
            assert f.read(len(data)) == data
        subprocess.run([*vmd, "stop"], cwd=REPO, check=True, capture_output=True)
        proc.wait(timeout=CMD_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        subprocess.run(["umount", "-l", str(shipped.mountpoint)], capture_output=True)
