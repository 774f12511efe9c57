"""Remote plexes through the daemon and FUSE: fio with verify=crc32c while the
NBD server is SIGKILLed and restarted; ext4 on a loop device, fsck -fn."""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import SysResources, VmdDaemon, pwrite_file, run, sha, wait_for
from nbdservers import Make, nbd_server  # noqa: F401 (a fixture)

pytestmark = pytest.mark.mount
MiB = 1024 * 1024


def _daemon(vmd_factory: Callable[..., VmdDaemon], uri: str, size: int) -> VmdDaemon:
    vmd = vmd_factory(volumes={"vol0": {"size": size, "plexes": ["vol0-p0.img", uri],
                                        "log": "vol0.log", "remote_timeout": "2s"}}).start()
    _wait_synced(vmd)
    return vmd


def _remote(vmd: VmdDaemon) -> dict[str, Any]:
    return vmd.status("vol0")["plexes"][1]


def _wait_synced(vmd: VmdDaemon) -> dict[str, Any]:
    def synced() -> dict[str, Any] | None:
        st = vmd.status("vol0")
        ok = all(p["state"] == "ACTIVE" and not p["missing_bytes"] for p in st["plexes"])
        return st if ok and not st["resync"]["running"] else None

    return wait_for(synced, 60, "every plex ACTIVE and in sync")


@pytest.mark.allow_log(r"the server closed the connection|Connection reset|is now IOFAIL|"
                       r"not reattached")
def test_server_killed_under_fio_verify(vmd_factory: Callable[..., VmdDaemon],
                                        nbd_server: Make) -> None:
    size = 64 * MiB
    srv = nbd_server("qemu-nbd", size=size)
    vmd = _daemon(vmd_factory, srv.uri, size)
    # Rate-limited, so that the writes outlast the kill and the restart;
    # fio verifies every block it wrote once it has written them all.
    fio = subprocess.Popen(
        ["fio", "--name=nbdkill", f"--filename={vmd.volume_file()}", "--rw=randwrite",
         "--bs=4k", "--size=32M", "--ioengine=psync", "--direct=1", "--rate_iops=2000",
         "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: vmd.status("vol0")["dirty_regions"] > 0, 30, "fio writing")
        srv.kill()
        wait_for(lambda: _remote(vmd)["state"] == "IOFAIL", 10, "the remote plex IOFAIL")
        assert not _remote(vmd)["connected"] and _remote(vmd)["last_error"]
        srv.start()
        out, _ = fio.communicate(timeout=120)
    finally:
        fio.kill()
    assert fio.returncode == 0, f"fio (verify=crc32c) failed:\n{out}"
    st = _wait_synced(vmd)
    remote = st["plexes"][1]
    assert remote["connected"] and remote["reattached"] == "FastResync", remote
    assert remote["last_reconnect_attempt"]
    assert st["resync"]["synced_bytes"] < size, st["resync"]
    vmd.stop()
    assert sha(vmd.plex_paths()[0]) == sha(srv.image)


def test_ext4_on_a_volume_with_a_remote_plex(vmd_factory: Callable[..., VmdDaemon],
                                             nbd_server: Make, sysres: SysResources,
                                             tmp_path: Path) -> None:
    size = 128 * MiB
    srv = nbd_server("nbdkit", tcp=True, size=size)
    vmd = _daemon(vmd_factory, srv.uri, size)
    dev = vmd.losetup()
    run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", dev])
    mnt = Path(sysres.mount(dev, tmp_path / "fs"))
    rnd = random.Random(7)
    for i in range(40):
        (mnt / f"f{i}").write_bytes(rnd.randbytes(rnd.randint(1, 512 * 1024)))
    run(["sync"])
    sysres.umount(mnt)
    fsck = run(["fsck.ext4", "-fn", dev], check=False)
    assert fsck.returncode == 0, f"fsck.ext4 -fn found problems:\n{fsck.stdout}\n{fsck.stderr}"
    sysres.detach_loop(dev)
    vmd.stop()
    assert sha(vmd.plex_paths()[0]) == sha(srv.image)
    fsck = run(["fsck.ext4", "-fn", str(srv.image)], check=False)
    assert fsck.returncode == 0, f"the export alone is not a clean ext4:\n{fsck.stdout}"


@pytest.mark.allow_log(r"the server closed the connection|Connection reset|is now IOFAIL|"
                       r"not reattached")
def test_plex_add_an_export_from_the_command_line(vmd_factory: Callable[..., VmdDaemon],
                                                  nbd_server: Make) -> None:
    """Added while the daemon runs (no remote plex at start), the export is
    watched as one listed in the config: a server that goes away fails it, and
    when it is back `auto_attach` reattaches it with FastResync (it was never
    reconnected until the next restart)."""
    size = 32 * MiB
    vmd = vmd_factory(volumes={"vol0": {"size": size, "plexes": ["vol0-p0.img"],
                                        "log": "vol0.log"}}).start()
    small = nbd_server("qemu-nbd", size=size // 2)
    bad = vmd.cli("plex", "add", "vol0", small.uri, check=False)
    assert bad.returncode != 0 and f"export {small.uri} is {size // 2} bytes" in bad.stderr
    srv = nbd_server("nbdkit", tcp=True, size=size)
    vmd.cli("plex", "add", "vol0", srv.uri)
    _wait_synced(vmd)
    text = vmd.cli("status", "vol0").stdout
    assert srv.uri in text and "connected" in text and "not connected" not in text, text
    # Writes the export acknowledged: what tells the export that comes back apart.
    pwrite_file(vmd.volume_file(), [(0, os.urandom(MiB))])
    srv.kill()
    pwrite_file(vmd.volume_file(), [(4 * MiB, os.urandom(MiB))])
    wait_for(lambda: _remote(vmd)["state"] == "IOFAIL", 10, "the remote plex IOFAIL")
    srv.start()
    st = _wait_synced(vmd)
    remote = _remote(vmd)
    assert remote["connected"] and remote["reattached"] == "FastResync", remote
    assert st["resync"]["synced_bytes"] < size, st["resync"]
    # Gone again: status no longer says how the last reattach went.
    srv.kill()
    pwrite_file(vmd.volume_file(), [(8 * MiB, os.urandom(MiB))])
    wait_for(lambda: _remote(vmd)["state"] == "IOFAIL", 10, "the remote plex IOFAIL again")
    assert _remote(vmd)["reattached"] == "", _remote(vmd)
    srv.start()
    _wait_synced(vmd)
    vmd.stop()
    assert sha(vmd.plex_paths()[0]) == sha(srv.image)
