"""Remote plexes (issue 14): how one NBD connection (vmd/nbdlink.py) dies.
A link that fails, whatever fails in it, fails its plex at once, not at the
watchdog's remote_timeout, and lets go of its socket and its tasks at once."""

from __future__ import annotations

import os
import select
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import trio

from nbdservers import HoldProxy, Make, nbd_server  # noqa: F401 (a fixture)
from test_nbd import remote, remote_vc, synced, until
from enginekit import running_volume
from vmd import nbdlink
from vmd.config import MiB
from vmd.sidecar import IOFAIL, read_log


def socket_of(fd: int) -> str:
    """The kernel's name of the socket behind `fd` ("socket:[INODE]")."""
    return os.readlink(f"/proc/self/fd/{fd}")


def open_sockets() -> set[str]:
    names = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            names.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass  # (the listing's own descriptor, closed meanwhile)
    return names


def system_tasks(prefix: str) -> list[str]:
    """The names of the running trio tasks that start with `prefix`."""
    names: list[str] = []

    def walk(task: trio.lowlevel.Task) -> None:
        if task.name.startswith(prefix):
            names.append(task.name)
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child)

    walk(trio.lowlevel.current_root_task())
    return names


class BreakableEpoll:
    """A pump's epoll set whose poll() raises, once broken, the ValueError of
    a closed set."""

    broken = False

    def __init__(self) -> None:
        self.ep = select.epoll()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.ep, name)

    def poll(self, timeout: float = -1) -> list[tuple[int, int]]:
        if BreakableEpoll.broken:
            raise ValueError("I/O operation on closed epoll object")
        return self.ep.poll(timeout)


async def test_a_failing_epoll_fails_the_plex_at_once(tmp_path: Path, nbd_server: Make,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The pump's epoll set raises ValueError while the link lives: the link
    and its plex fail now, durably, not at remote_timeout (30 s here)."""
    monkeypatch.setattr(nbdlink, "select", types.SimpleNamespace(
        **{**vars(select), "epoll": BreakableEpoll}))
    monkeypatch.setattr(BreakableEpoll, "broken", False)
    srv = nbd_server("qemu-nbd")
    vc = remote_vc(tmp_path, srv.uri, remote_timeout=30.0, auto_attach=False)
    async with running_volume(vc) as vol:
        await synced(vol)
        p = remote(vol)
        link = p.link
        assert link is not None and isinstance(link._ep, BreakableEpoll)
        BreakableEpoll.broken = True
        # As a write that leaves bytes to send does: the pump then polls the set.
        link._watch(select.EPOLLIN | select.EPOLLOUT)
        with trio.fail_after(5):
            await until(lambda: p.state == IOFAIL, "the remote plex failed")
        assert link.error is not None and "epoll" in link.error, link.error
        on_disk = read_log(vc.log)[0].state.plex(p.name)
        assert on_disk is not None and on_disk.state == IOFAIL and "epoll" in on_disk.reason
        data = os.urandom(64 * 1024)
        with trio.fail_after(5):
            await vol.pwrite(MiB, data)
        assert await vol.pread(MiB, len(data)) == data


async def test_a_closed_idle_link_lets_go_at_once(tmp_path: Path, nbd_server: Make) -> None:
    """A link closed while idle (remote_timeout 30 s) closes its socket and
    ends its tasks now, not when its watchdog next wakes."""
    srv = nbd_server("qemu-nbd")
    vc = remote_vc(tmp_path, srv.uri, remote_timeout=30.0, auto_attach=False)
    async with running_volume(vc) as vol:
        await synced(vol)
        link = remote(vol).link
        assert link is not None
        sock = socket_of(link.fd)
        tasks = f"nbd-watchdog {srv.uri}"
        assert system_tasks(tasks)
        link.close()
        with trio.fail_after(2):
            await until(lambda: sock not in open_sockets() and not system_tasks(tasks),
                        "the socket closed and the watchdog gone")


async def test_a_hung_link_lets_go_of_its_socket_when_found_dead(tmp_path: Path,
                                                                 nbd_server: Make) -> None:
    """The watchdog finds a hung link dead: its plex fails, and its socket
    is closed then, though the plex keeps the link (its error) for status."""
    srv = nbd_server("qemu-nbd", tcp=True)
    proxy = HoldProxy(srv.port)
    vc = remote_vc(tmp_path, proxy.uri, remote_timeout=1.0, auto_attach=False)
    try:
        async with running_volume(vc) as vol:
            await synced(vol)
            p = remote(vol)
            assert p.link is not None
            sock = socket_of(p.link.fd)
            proxy.hold()
            await vol.pwrite(0, os.urandom(4096))
            assert p.state == IOFAIL and p.link is not None and p.link.error
            with trio.fail_after(2):
                await until(lambda: sock not in open_sockets(), "the socket closed")
            assert not system_tasks(f"nbd-watchdog {proxy.uri}")
    finally:
        proxy.close()


class DeadAfterSend:
    """A libnbd handle that went DEAD inside a send but whose direction
    still says READ: what it says of its state is `aio_is_dead`."""

    def __init__(self, h: Any):
        self.h = h
        self.dead = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.h, name)

    def aio_pwrite(self, buf: Any, off: int) -> int:
        cookie = self.h.aio_pwrite(buf, off)
        self.dead = True
        return cookie

    def aio_is_dead(self) -> bool:
        return self.dead or self.h.aio_is_dead()

    def aio_get_direction(self) -> int:
        return nbdlink.READ


async def test_a_handle_dead_after_the_send_fails_the_link(tmp_path: Path,
                                                           nbd_server: Make) -> None:
    """issue() asks the handle whether the send left it dead (aio_is_dead),
    not what its direction implies."""
    srv = nbd_server("qemu-nbd")
    vc = remote_vc(tmp_path, srv.uri, remote_timeout=30.0, auto_attach=False)
    async with running_volume(vc) as vol:
        await synced(vol)
        link = remote(vol).link
        assert link is not None
        link.h = DeadAfterSend(link.h)
        req = link.issue_write(0, os.urandom(4096))
        assert link.error == "the server closed the connection"
        with trio.fail_after(5), pytest.raises(OSError):
            await req.wait()


async def test_requests_do_not_keep_their_buffers(tmp_path: Path, nbd_server: Make) -> None:
    """libnbd 1.14's binding keeps a reference to the object an `nbd.Buffer`
    wraps, for good: the daemon grew by every byte written to a remote plex
    (and every page of a new write buffer faulted in afresh). Once answered,
    a request holds nothing of its data or of what it read."""
    srv = nbd_server("qemu-nbd")
    vc = remote_vc(tmp_path, srv.uri, auto_attach=False)
    async with running_volume(vc) as vol:
        await synced(vol)
        link = remote(vol).link
        assert link is not None
        for data in (os.urandom(MiB), bytearray(os.urandom(MiB)),
                     memoryview(os.urandom(2 * MiB))[MiB:]):
            before = sys.getrefcount(data.obj if isinstance(data, memoryview) else data)
            for i in range(3):
                await link.pwrite(i * MiB, data)
            after = sys.getrefcount(data.obj if isinstance(data, memoryview) else data)
            assert after == before, f"{type(data).__name__}: {after - before} references kept"
            read = await link.pread(MiB, MiB)
            assert read == data
            # Only this frame's name and getrefcount's argument.
            assert sys.getrefcount(read) == 2, "the read's buffer is kept"
