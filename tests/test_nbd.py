"""Remote plexes over NBD (issue 14), engine level: a volume with one local
plex and one export of a real qemu-nbd or nbdkit, on a Unix socket or on
127.0.0.1. The daemon-level tests (fio, ext4) are in test_nbd_mount.py."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from enginekit import random_writes, running_volume, volume_config
from nbdservers import HoldProxy, Make, nbd_server  # noqa: F401 (a fixture)
from vmd.config import MiB, VolumeConfig
from vmd.errors import VmdError
from vmd.nbdplex import NbdPlex
from vmd.sidecar import ACTIVE, IOFAIL
from vmd.volume import Volume

SIZE = 16 * MiB
SERVERS = [("qemu-nbd", False), ("qemu-nbd", True), ("nbdkit", False), ("nbdkit", True)]
IDS = ["qemu-nbd-unix", "qemu-nbd-tcp", "nbdkit-unix", "nbdkit-tcp"]

def remote_vc(tmp: Path, uri: str, **kw: Any) -> VolumeConfig:
    kw.setdefault("remote_timeout", 2.0)
    vc = volume_config(tmp, size=SIZE, nplex=1, **kw)
    return dataclasses.replace(vc, plexes=(*vc.plexes, uri))


def remote(vol: Volume) -> NbdPlex:
    (p,) = [p for p in vol.plexes if isinstance(p, NbdPlex)]
    return p


async def until(cond: Callable[[], Any], what: str, timeout: float = 30.0) -> None:
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.02)


async def synced(vol: Volume, timeout: float = 30.0) -> None:
    await until(lambda: all(p.state == ACTIVE for p in vol.plexes) and not vol.resync.targets(),
                "every plex ACTIVE", timeout)
    await vol.resync.wait_idle()


@pytest.mark.parametrize("kind,tcp", SERVERS, ids=IDS)
async def test_remote_mirror_holds_the_data(tmp_path: Path, nbd_server: Make, kind: str,
                                            tcp: bool) -> None:
    srv = nbd_server(kind, tcp)
    vc = remote_vc(tmp_path, srv.uri)
    ref = bytearray(SIZE)
    async with running_volume(vc) as vol:
        await synced(vol)  # an export may hold anything: it is copied from p0 first
        await random_writes(vol, ref, 60)
        reads_before = remote(vol).reads
        assert await vol.pread(0, SIZE) == ref
        assert remote(vol).reads == reads_before, "reads go to the local plex first"
        st = vol.status()["plexes"][1]
        assert st["uri"] == srv.uri and st["connected"] and st["state"] == ACTIVE
    assert Path(vc.plexes[0]).read_bytes() == ref
    assert srv.image.read_bytes() == ref


async def wait_failed(vol: Volume) -> NbdPlex:
    p = remote(vol)
    await until(lambda: p.state == IOFAIL, "the remote plex failed", 10)
    return p


@pytest.mark.parametrize("kind,tcp", [SERVERS[0], SERVERS[3]], ids=[IDS[0], IDS[3]])
async def test_killed_server_comes_back_with_fastresync(tmp_path: Path, nbd_server: Make,
                                                        kind: str, tcp: bool) -> None:
    srv = nbd_server(kind, tcp)
    vc = remote_vc(tmp_path, srv.uri)
    ref = bytearray(SIZE)
    async with running_volume(vc) as vol:
        await synced(vol)
        await random_writes(vol, ref, 40, max_len=64 * 1024)
        # The regions written so far cleaned: the plex misses only what follows.
        await until(lambda: vol.state.drl.count() == 0, "the DRL clean")
        srv.kill()
        # The volume keeps serving from the local plex.
        for i in range(20):
            data = os.urandom(4096)
            await vol.pwrite(i * 64 * 1024, data)
            ref[i * 64 * 1024:i * 64 * 1024 + 4096] = data
        p = await wait_failed(vol)
        assert p.state == IOFAIL and not p.connected
        assert p.status_extra()["last_error"]
        assert await vol.pread(0, SIZE) == ref
        srv.start()
        await synced(vol)
        assert p.reattached == "FastResync"
        assert 0 < vol.resync.synced_bytes < SIZE // 2, vol.resync.status()
        assert p.status_extra()["last_reconnect_attempt"]
    assert srv.image.read_bytes() == ref


async def test_replaced_export_gets_a_full_resync(tmp_path: Path, nbd_server: Make) -> None:
    srv = nbd_server("qemu-nbd")
    vc = remote_vc(tmp_path, srv.uri)
    ref = bytearray(SIZE)
    async with running_volume(vc) as vol:
        await synced(vol)
        await random_writes(vol, ref, 30)
        await vol.flush()
        srv.kill()
        await random_writes(vol, ref, 5, seed=2)
        p = await wait_failed(vol)
        # Another export of the same size where the old one was.
        srv.image.unlink()
        with open(srv.image, "wb") as f:
            f.truncate(SIZE)
        srv.start()
        await synced(vol)
        assert p.reattached.startswith("full resync"), p.reattached
        assert "does not hold what vmd last wrote" in p.reattached
        assert vol.resync.synced_bytes == SIZE
    assert srv.image.read_bytes() == ref


async def test_hung_link_fails_the_plex_within_the_timeout(tmp_path: Path,
                                                          nbd_server: Make) -> None:
    srv = nbd_server("qemu-nbd", tcp=True)
    proxy = HoldProxy(srv.port)
    timeout = 1.0
    vc = remote_vc(tmp_path, proxy.uri, remote_timeout=timeout, auto_attach=False)
    try:
        async with running_volume(vc) as vol:
            await synced(vol)
            await vol.pwrite(0, os.urandom(8192))  # acknowledged: it identifies the export
            proxy.hold()
            data = os.urandom(128 * 1024)
            t0 = trio.current_time()
            await vol.pwrite(MiB, data)
            took = trio.current_time() - t0
            p = remote(vol)
            assert p.state == IOFAIL and "remote_timeout" in p.record.reason, p.record.reason
            assert timeout <= took < timeout + 2.0, took
            assert await vol.pread(MiB, len(data)) == data
            # A flush (fsync) does not wait for it either.
            with trio.fail_after(timeout):
                await vol.flush()
            # auto_attach is off: back on demand, copying only what it missed.
            proxy.release()
            res = await vol.attach_plex(p.name)
            assert not res["full_resync"], res
            await synced(vol)
            assert vol.resync.synced_bytes < SIZE
    finally:
        proxy.close()


async def test_a_cancelled_writer_waits_for_its_remote_half(tmp_path: Path,
                                                            nbd_server: Make) -> None:
    """A writer cancelled while its remote write is on the wire (a Remote Copy
    apply or a repair being stopped) leaves only once the reply came: the
    DRL cannot record the region clean before it, the plex is not counted in
    flight for good, and an error in the reply would fail the plex."""
    srv = nbd_server("qemu-nbd", tcp=True)
    proxy = HoldProxy(srv.port)
    vc = remote_vc(tmp_path, proxy.uri, remote_timeout=60.0, auto_attach=False)
    try:
        async with running_volume(vc) as vol:
            await synced(vol)
            p = remote(vol)
            assert p.link is not None
            proxy.hold()
            data = os.urandom(64 * 1024)
            scope = trio.CancelScope()
            returned = trio.Event()

            async def writer() -> None:
                with scope:
                    await vol.pwrite(MiB, data)
                returned.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer)
                with trio.fail_after(10):
                    while not p.link._pending:
                        await trio.sleep(0.01)
                scope.cancel()
                with trio.move_on_after(0.5):
                    await returned.wait()
                assert not returned.is_set(), "the writer left with its remote write unanswered"
                assert p.inflight == 1 and vol.drl._inflight
                proxy.release()
                with trio.fail_after(30):
                    await returned.wait()
            assert p.inflight == 0 and not p.link._pending and not vol.drl._inflight
            assert p.state == ACTIVE
            assert await vol.pread(MiB, len(data)) == data
    finally:
        proxy.close()


async def test_a_send_to_a_dead_server_fails_at_once(tmp_path: Path, nbd_server: Make) -> None:
    """libnbd finds the server gone inside the send, goes DEAD and closes its
    socket before the pump could hear of it: the write fails now, not after
    remote_timeout, and the volume answers from the local plex."""
    srv = nbd_server("qemu-nbd")
    vc = remote_vc(tmp_path, srv.uri, remote_timeout=30.0, auto_attach=False)
    async with running_volume(vc) as vol:
        await synced(vol)
        p = remote(vol)
        srv.kill()  # no checkpoint from here to the send: the pump has not run
        assert p.link is not None and p.link.error is None
        req = p.link.issue_write(0, os.urandom(4096))
        with trio.fail_after(5), pytest.raises(OSError):
            await req.wait()
        # (Or the send went out and the pump read the reset: fast either way.)
        assert p.link.error is not None and "remote_timeout" not in p.link.error
        data = os.urandom(4096)
        with trio.fail_after(5):
            await vol.pwrite(4096, data)
        assert p.state == IOFAIL
        assert await vol.pread(4096, 4096) == data


async def served_while(vol: Volume, verb: Callable[[], Awaitable[Any]]) -> Any:
    """Run an admin verb that waits for a hung server; meanwhile a write and
    a flush of the volume complete (before the verb ends). The verb's
    result or error."""
    outcome: list[Any] = []

    async def run() -> None:
        try:
            outcome.append(await verb())
        except (OSError, VmdError) as e:
            outcome.append(e)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await trio.sleep(0)  # the verb is under way
        data = os.urandom(64 * 1024)
        await vol.pwrite(MiB, data)
        await vol.flush()
        assert not outcome, outcome  # served while the verb waits
        assert await vol.pread(MiB, len(data)) == data
    return outcome[0]


async def test_attach_through_a_hung_link_does_not_stop_writes(tmp_path: Path,
                                                             nbd_server: Make) -> None:
    """`vmd plex attach` of a remote plex whose server hangs waits up to
    remote_timeout for it, but in a worker thread and before the write gate:
    writes to the volume complete while that attach is still waiting."""
    srv = nbd_server("qemu-nbd", tcp=True)
    proxy = HoldProxy(srv.port)
    vc = remote_vc(tmp_path, proxy.uri, remote_timeout=3.0, auto_attach=False)
    try:
        async with running_volume(vc) as vol:
            await synced(vol)
            await vol.pwrite(0, os.urandom(8192))
            p = remote(vol)
            await vol.detach_plex(p.name)
            proxy.hold()
            failed = await served_while(vol, lambda: vol.attach_plex(p.name))
            assert isinstance(failed, OSError) and proxy.uri in str(failed), failed
            assert p.state != ACTIVE
            proxy.release()
            res = await vol.attach_plex(p.name)  # the same export: FastResync
            assert not res["full_resync"], res
            await synced(vol)
            assert vol.resync.synced_bytes < SIZE
    finally:
        proxy.close()


async def test_add_through_a_hung_link_does_not_stop_writes(tmp_path: Path,
                                                          nbd_server: Make) -> None:
    """`vmd plex add VOL URI` of a server that hangs: the same."""
    srv = nbd_server("qemu-nbd", tcp=True)
    other = nbd_server("qemu-nbd", tcp=True)
    proxy = HoldProxy(other.port)
    try:
        async with running_volume(remote_vc(tmp_path, srv.uri, remote_timeout=3.0)) as vol:
            await synced(vol)
            proxy.hold()
            failed = await served_while(vol, lambda: vol.add_plex(proxy.uri, named=True))
            assert isinstance(failed, VmdError) and proxy.uri in str(failed), failed
            assert len(vol.plexes) == 2
            proxy.release()
            await vol.add_plex(proxy.uri, named=True)
            await synced(vol)
    finally:
        proxy.close()


async def test_crash_with_a_remote_plex_recovers_the_dirty_regions(tmp_path: Path,
                                                                   nbd_server: Make) -> None:
    srv = nbd_server("nbdkit", tcp=True)
    vc = remote_vc(tmp_path, srv.uri)
    ref = bytearray(SIZE)
    async with running_volume(vc, shutdown=False) as vol:
        await synced(vol)
        await random_writes(vol, ref, 20, max_len=64 * 1024)
    async with running_volume(vc) as vol:  # after the "crash"
        assert vol.recovered_regions > 0
        await synced(vol)
        assert remote(vol).state == ACTIVE and vol.resync.synced_bytes < SIZE
        assert await vol.pread(0, SIZE) == ref
    assert srv.image.read_bytes() == ref


async def test_export_of_another_size_is_refused(tmp_path: Path, nbd_server: Make) -> None:
    small = nbd_server("nbdkit", size=SIZE // 2)
    vc = remote_vc(tmp_path, small.uri)
    async with running_volume(vc) as vol:
        rec = remote(vol).record
        assert rec.state == IOFAIL
        assert small.uri in rec.reason and f"is {SIZE // 2} bytes" in rec.reason, rec.reason
        other = nbd_server("qemu-nbd", size=SIZE + 4096)
        with pytest.raises(VmdError,
                           match=re.escape(f"export {other.uri} is {SIZE + 4096} bytes")):
            await vol.add_plex(other.uri, named=True)
        good = nbd_server("qemu-nbd", tcp=True)
        await vol.add_plex(good.uri, named=True)
        await until(lambda: vol.plexes[-1].state == ACTIVE, "the added export in sync")
