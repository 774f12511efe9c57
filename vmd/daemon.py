"""The daemon: wiring of volumes, the FUSE mount, the admin socket, signals,
and systemd readiness. `run()` is the async main; `serve()` blocks."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from . import (commands, events, rcopy_verbs, resize_verbs, snapshot_verbs, start_verbs,
               verify_verbs)
from .admin import AdminServer
from .config import Config, check_environment, format_size, load_config
from .errors import VmdError
from .exclusive import (check_socket_free, check_socket_path, clear_dead_mount, hold_mountpoint,
                        release_mountpoint, warn_if_not_empty)
from .fusefs import VolumeFS, fuse_device_fds, tune_readahead
from .onloop import WATCH
from .manager import VolumeManager
from .notify import Notifier
from .resize import adopt_logged_sizes
from .tasks import Task
from .uring import Ring

log = logging.getLogger(__name__)

SHUTDOWN_SECONDS = 60  # bound on draining and flushing at stop
FUSE_MAX_TASKS = 64  # concurrent FUSE requests (loop devices and fio numjobs>1 overlap I/O)
READ_AHEAD_SECONDS = 10  # bound on the mount's first request, which tunes its readahead


def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) how we are; a no-op outside systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError as e:
        log.warning("cannot notify systemd at %s: %s", os.environ["NOTIFY_SOCKET"], e)


class FuseSession(Task):
    """The FUSE session: `pyfuse3.main` serving the mountpoint. Its stop asks
    the kernel for the writes it still caches, then ends the session; a session
    that ends by itself (unmounted under us) stops the daemon."""

    name = "fuse"

    def __init__(self, daemon: Daemon):
        super().__init__()
        self.daemon = daemon
        self.is_open = False

    def open(self, fs: VolumeFS, mountpoint: Path) -> None:
        options = set(pyfuse3.default_options)
        options.add("fsname=vmd")
        options.add("subtype=vmd")
        before = fuse_device_fds()
        pyfuse3.init(fs, str(mountpoint), options)
        self.is_open = True
        fs.watch_queue(fuse_device_fds() - before)

    def close(self) -> None:
        if self.is_open:
            self.is_open = False
            pyfuse3.close(unmount=True)

    async def main(self, task_status: Any) -> None:
        task_status.started()
        try:
            await pyfuse3.main(min_tasks=2, max_tasks=FUSE_MAX_TASKS)
        finally:
            self.daemon.request_stop()

    async def stop(self) -> None:
        if self.ended:
            return
        await self.daemon.write_back_open_volumes()
        pyfuse3.terminate()
        await self.wait_ended()


class Daemon:
    def __init__(self, cfg: Config, recover_all: dict[str, str | None] | None = None,
                 force_degraded: set[str] | None = None):
        self.cfg = cfg
        self.recover_all = recover_all or {}  # volume → the plex to resync from (None: default)
        self.manager = VolumeManager(cfg)
        self.manager.force_degraded = force_degraded or set()
        self.fs: VolumeFS | None = None
        self._refused: dict[str, str] = {}  # by the start's checks of the disk
        self._stop = trio.Event()
        # The admin verbs: each feature adds its own (Remote Copy wraps `status`).
        self.commands: commands.CommandTable = {}
        commands.register(self.commands, self.manager, self.request_stop)
        snapshot_verbs.register(self.commands, self.manager)
        resize_verbs.register(self.commands, self.manager)
        self.rcopy = rcopy_verbs.register(self.commands, self.manager)
        events.register(self.commands)
        self.verifies = verify_verbs.register(self.commands, self.manager)
        start_verbs.register(self.commands, self.manager, self._stop.is_set)

    def request_stop(self) -> None:
        self._stop.set()

    async def handle(self, req: dict[str, Any], progress: Any) -> dict[str, Any]:
        fn = self.commands.get(req["cmd"])
        if fn is None:
            raise VmdError(f"unknown command {req['cmd']!r} (known: {', '.join(sorted(self.commands))})")
        return await fn(req, progress)

    async def run(self) -> None:
        cfg = self.cfg
        # Before anything is opened: refuse a socket or mount a live daemon
        # holds, and clear the dead mount a crashed one left.
        mount_lock = hold_mountpoint(cfg.mountpoint, f"{cfg.path}: mountpoint")
        try:
            check_socket_path(cfg.socket, f"{cfg.path}: socket")
            check_socket_free(cfg.socket, f"{cfg.path}: socket")
            clear_dead_mount(cfg.mountpoint, f"{cfg.path}: mountpoint")
            warn_if_not_empty(cfg.mountpoint, f"{cfg.path}: mountpoint")
            # After `vmd resize` the sidecar log's size wins over the config's.
            self._refused = check_environment(cfg, adopt_logged_sizes(cfg))
            await self._run()
        finally:
            release_mountpoint(mount_lock)

    async def _run(self) -> None:
        cfg = self.cfg
        notifier = Notifier(cfg.notify) if cfg.notify else None  # queues the start's events
        self.manager.open_all(self.recover_all, self._refused)
        cfg.mountpoint.mkdir(parents=True, exist_ok=True)
        async with AsyncExitStack() as stack:
            WATCH.start()  # names a plex call that holds the event loop (a hung disk)
            stack.callback(WATCH.stop)
            fuse = FuseSession(self)
            # Registered before the nursery, so it runs after the nursery has
            # ended: closing the session under a running pyfuse3.main (when a
            # task failed at start) crashed the process with SIGSEGV.
            stack.callback(fuse.close)
            nursery = await stack.enter_async_context(trio.open_nursery())
            stack.callback(nursery.cancel_scope.cancel)
            # The stop stack: each long-lived job's stop, unwound newest first at a
            # requested stop (a failed task instead cancels the nursery and leaves
            # the volumes to crash recovery). Pushed here in the reverse of the
            # order they must stop in: the verifies, Remote Copy (no remote copy
            # I/O past it; a receiver cut off rolls back through the volume and
            # tells FUSE),
            # then FUSE (the kernel's cached writes still reach the volumes), then
            # the volumes (drained, flushed, recorded clean).
            stops = AsyncExitStack()
            if notifier is not None:  # the last to stop: the others' events still reach it
                await nursery.start(notifier.run, name="notify")
                stops.push_async_callback(notifier.stop)
            stops.push_async_callback(self.manager.stop)
            stops.push_async_callback(fuse.stop)
            plex_io = "io_uring" if Ring.get() is not None else "worker threads"
            await self.manager.start(nursery)
            await nursery.start(self.rcopy.run, name="rcopy")  # roll back unfinished updates; start links
            stops.push_async_callback(self.rcopy.stop)
            await nursery.start(self.verifies.run, name="verify")
            stops.push_async_callback(self.verifies.stop)  # no verify reads a closing volume
            self.fs = VolumeFS(self.manager)
            self.manager.on_added = self.fs.add_volume
            self.manager.on_removed = self.fs.remove_volume
            self.manager.on_changed = self.fs.invalidate_volume
            self.manager.on_shown = self.fs.show_volume
            fuse.open(self.fs, cfg.mountpoint)
            await nursery.start(fuse.run, name="fuse")
            with trio.move_on_after(READ_AHEAD_SECONDS):
                await trio.to_thread.run_sync(tune_readahead, cfg.mountpoint,
                                              abandon_on_cancel=True)
            await nursery.start(AdminServer(cfg.socket, self.handle).run, name="admin")
            nursery.start_soon(self._signals, name="signals")
            log.info("vmd ready: %d volume(s) at %s, admin socket %s, plex I/O through %s%s",
                     len(self.manager.volumes), cfg.mountpoint, cfg.socket, plex_io,
                     f"; refused: {', '.join(self.manager.refused)}" if self.manager.refused else "")
            sd_notify("READY=1")

            await self._stop.wait()
            sd_notify("STOPPING=1")
            log.info("stopping: draining I/O and flushing plexes")
            with trio.move_on_after(SHUTDOWN_SECONDS) as scope:
                await stops.aclose()
            if scope.cancelled_caught:
                log.error("stop took over %d s; leaving the rest to crash recovery", SHUTDOWN_SECONDS)
            fuse.close()
        log.info("vmd stopped")

    async def write_back_open_volumes(self) -> None:
        """A stop while a volume is open (--force, SIGTERM): with the
        writeback cache, the kernel still holds written pages that vmd has
        not seen; have it send them while the FUSE loop still serves."""
        fs = self.fs
        if fs is None or not self.cfg.writeback_cache:
            return
        for vol in list(self.manager.volumes.values()):
            if vol.openers and not vol.cfg.direct_io:
                try:
                    await trio.to_thread.run_sync(fs.write_back, vol.name, abandon_on_cancel=True)
                except OSError as e:
                    log.error("volume %s: writing back the kernel's cached writes at stop "
                              "failed: %s", vol.name, e)

    async def _signals(self) -> None:
        # SIGHUP too: its default action killed the daemon on the spot (a
        # "reload" reflex, logrotate's postrotate, a terminal closed), every
        # filesystem above its volumes then lost its disk.
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    await self.reload()
                    continue
                busy = [v.name for v in self.manager.volumes.values() if v.openers]
                log.info("got %s: stopping%s", signal.Signals(signum).name,
                         f" (volumes still open: {', '.join(busy)})" if busy else "")
                self.request_stop()


    async def reload(self) -> None:
        """SIGHUP: re-read the config for what applies at once,
        `resync.rate_limit`. The rest is read when a volume starts (`vmd start`
        for a new one); a config that does not load changes nothing."""
        try:
            cfg = await trio.to_thread.run_sync(load_config, self.cfg.path)
        except VmdError as e:
            log.error("got SIGHUP: %s does not load, nothing changed: %s", self.cfg.path, e)
            return
        rate = cfg.resync.rate_limit
        # For the volumes started from now on too (the manager's is the same
        # object); the config's other fields stay as this run read them.
        self.cfg = self.manager.cfg = dataclasses.replace(
            self.cfg, resync=dataclasses.replace(self.cfg.resync, rate_limit=rate))
        for vol in self.manager.volumes.values():
            vol.resync.rate_limit = rate
        log.info("got SIGHUP: re-read %s: resync.rate_limit is %s (other settings apply when a "
                 "volume starts)", self.cfg.path, f"{format_size(rate)}/s" if rate else "unlimited")


def serve(cfg: Config, recover_all: dict[str, str | None] | None = None,
          force_degraded: set[str] | None = None) -> None:
    try:
        trio.run(Daemon(cfg, recover_all, force_degraded).run)
    except BaseExceptionGroup as group:
        # A user error raised in a task reaches here wrapped by the nursery:
        # the user gets its one line, not a traceback.
        errors = _leaves(group)
        if errors and all(isinstance(e, VmdError) for e in errors):
            raise errors[0] from None
        raise


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out
