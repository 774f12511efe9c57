"""One daemon per volume, and a restart after a crash with no manual step.

A SIGKILLed daemon leaves a dead FUSE mount ("Transport endpoint is not
connected") and a stale admin socket; the next start must clear both by
itself. A second daemon on the same plexes, log, socket or mountpoint must be
refused, naming the file and the holder, and must not disturb the first.
"""

from __future__ import annotations

import errno
import os
import random
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from conftest import MiB, VmdDaemon, is_mounted, pwrite_file, sha, volume_spec
from vmd.exclusive import close_locked, open_locked
from vmd.errors import EXIT_CONFIG, SidecarError
from vmd.sidecar import SidecarLog, new_state

pytestmark = pytest.mark.mount

UNCLEAN = r"was not stopped cleanly: recovering \d+ regions"
DEAD_MOUNT = r"was the dead mount of a vmd that stopped uncleanly: lazily unmounted"


def _dead(path: Path) -> bool:
    try:
        os.statvfs(path)  # stat() may be answered from the kernel's cache
    except OSError as e:
        return e.errno == errno.ENOTCONN
    return False


def test_restart_after_sigkill_clears_dead_mount_and_recovers(
        vmd_factory: Callable[..., VmdDaemon], allow_log: Callable[..., None]) -> None:
    allow_log(UNCLEAN, DEAD_MOUNT)
    d = vmd_factory(rate_limit=0).start()
    rng = random.Random(16)
    size = d.volume_size()
    writes = [(rng.randrange(size // 4096) * 4096, rng.randbytes(4096)) for _ in range(200)]
    pwrite_file(d.volume_file(), writes)  # fsync'd: every one must survive
    expected = {off: data for off, data in writes}  # the last write to an offset wins
    # Keep the volume dirty at the kill: a write the daemon has not cleaned yet.
    pwrite_file(d.volume_file(), [(0, b"\x5a" * 4096)])
    expected[0] = b"\x5a" * 4096
    assert d.proc is not None
    d.proc.kill()  # a crash: no unmount, as systemd's Restart=on-failure would find it
    d.proc.wait(timeout=30)
    assert is_mounted(d.mountpoint) and _dead(d.mountpoint), "SIGKILL left no dead mount"
    assert d.socket.is_socket(), "SIGKILL left no stale socket"

    d.start()  # no manual umount, no socket removal
    assert re.search(DEAD_MOUNT, d.stderr()), d.stderr()
    assert re.search(UNCLEAN, d.stderr()), d.stderr()
    d.wait_resync()
    with open(d.volume_file(), "rb") as f:
        for off, data in expected.items():
            f.seek(off)
            assert f.read(len(data)) == data, f"write at {off} lost across the crash"
    d.stop()
    p0, p1 = d.plex_paths()
    assert sha(p0) == sha(p1), "plexes differ after recovery"


def test_second_daemon_on_same_log_and_plexes_is_refused(
        vmd_factory: Callable[..., VmdDaemon]) -> None:
    first = vmd_factory("first").start()
    spec = volume_spec("vol0")
    same = {"vol0": {**spec, "plexes": [str(p) for p in first.plex_paths()],
                     "log": str(first.log_path())}}
    second = vmd_factory("second", volumes=same)
    r = second.run_foreground()
    assert r.returncode == EXIT_CONFIG, (r.returncode, r.stderr)
    assert first.proc is not None
    assert f"sidecar log {first.log_path()} is in use by vmd (PID {first.proc.pid})" in r.stderr, \
        r.stderr
    assert not is_mounted(second.mountpoint), "a refused daemon mounted"

    # Only one plex shared, under another log: refused before any log is written.
    other = vmd_factory("third", volumes={"vol0": {**spec, "plexes": [
        str(first.plex_paths()[1]), "own.img"]}})
    r = other.run_foreground()
    assert r.returncode == EXIT_CONFIG, (r.returncode, r.stderr)
    assert f"plex image {first.plex_paths()[1]} is in use by vmd (PID {first.proc.pid})" \
        in r.stderr, r.stderr
    assert not other.log_path().exists(), "a refused daemon wrote a sidecar log"

    # The first daemon never noticed: still serving, still in sync.
    pwrite_file(first.volume_file(), [(0, b"first" * 100)])
    assert first.plex_states() == {"p0": "ACTIVE", "p1": "ACTIVE"}
    first.stop()


def test_second_daemon_on_same_socket_or_mountpoint_is_refused(
        vmd_factory: Callable[..., VmdDaemon]) -> None:
    first = vmd_factory("first").start()
    assert first.proc is not None
    same_socket = vmd_factory("second", socket_path=str(first.socket))
    r = same_socket.run_foreground()
    assert r.returncode == EXIT_CONFIG, (r.returncode, r.stderr)
    assert f"admin socket {first.socket} is in use by vmd (PID {first.proc.pid})" in r.stderr, \
        r.stderr
    assert first.socket.is_socket(), "a refused daemon removed the live daemon's socket"
    assert first.status("vol0")["name"] == "vol0"

    same_mount = vmd_factory("third", mountpoint=str(first.mountpoint))
    r = same_mount.run_foreground()
    assert r.returncode == EXIT_CONFIG, (r.returncode, r.stderr)
    assert f"mountpoint: {first.mountpoint} is in use by vmd (PID {first.proc.pid})" \
        in r.stderr, r.stderr
    assert first.status("vol0")["name"] == "vol0"
    first.stop()


def test_exit_leaves_a_socket_another_daemon_bound(
        vmd_factory: Callable[..., VmdDaemon]) -> None:
    first = vmd_factory("first").start()
    sock = first.socket
    moved = sock.with_name("first.sock")
    os.rename(sock, moved)  # an administrator's mistake: the name is free again
    second = vmd_factory("second", socket_path=str(sock)).start()
    assert first.proc is not None
    first.proc.terminate()
    assert first.wait_exit() == 0
    assert sock.is_socket(), "the first daemon deleted the second daemon's socket at exit"
    assert second.status("vol0")["name"] == "vol0"
    second.stop()


def _locked_elsewhere(path: Path) -> bool:
    """Does another process find `path` flock'ed? (util-linux flock, non-blocking)"""
    return subprocess.run(["flock", "-n", str(path), "true"], timeout=30).returncode != 0


def test_sidecar_lock_survives_checkpoints(tmp_path: Path) -> None:
    """The log is replaced by rename at each checkpoint: the lock must move
    with it and never lapse."""
    path = tmp_path / "v.log"
    log = SidecarLog.create(path, new_state("v", 64 * MiB, MiB, 64 * 1024))
    try:
        assert _locked_elsewhere(path)
        for _ in range(3):
            trio.run(log.checkpoint, lambda: new_state("v", 64 * MiB, MiB, 64 * 1024))
            assert _locked_elsewhere(path), "the checkpoint's new log is not locked"
    finally:
        log.close()
    assert not _locked_elsewhere(path), "the lock outlived close()"


def test_one_process_may_open_an_image_twice(tmp_path: Path) -> None:
    """A snapshot's image becomes its origin's plex again at snap back, in the
    same daemon: the lock keeps other processes out, and lasts until the last
    opener closes, whichever closes first."""
    path = tmp_path / "img"
    path.write_bytes(b"\0" * 4096)
    a = open_locked(path, os.O_RDWR, "plex image")
    b = open_locked(path, os.O_RDWR, "plex image")
    close_locked(a)
    assert _locked_elsewhere(path), "closing the first opener dropped the lock"
    close_locked(b)
    assert not _locked_elsewhere(path)


def test_a_new_log_never_replaces_one(tmp_path: Path) -> None:
    """Two daemons first-starting the same new volume: the second's new log must not
    be renamed over the first's (whose records would then go to an unlinked file)."""
    path = tmp_path / "v.log"
    first = SidecarLog.create(path, new_state("v", 64 * MiB, MiB, 64 * 1024))
    try:
        before = path.read_bytes()
        with pytest.raises(SidecarError, match="appeared while vmd was creating it"):
            SidecarLog.create(path, new_state("v", 64 * MiB, MiB, 64 * 1024))
        assert path.read_bytes() == before
        assert _locked_elsewhere(path)
        assert not path.with_name("v.log.new").exists(), "the refused new log was left behind"
    finally:
        first.close()
