"""Admin verbs: what each admin-socket request does, over the Volume API.

Each feature (these core verbs, snapshots, Remote Copy) adds its verbs to the
daemon's `CommandTable` through a `register(table, manager, ...)` of its own;
none imports the daemon, which imports them (one way)."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from .admin import command_words
from .config import check_image
from .errors import VmdError
from .mountpath import outside_mount_error
from .nbdlink import check_uri, is_remote, uri_typo
from .manager import VolumeManager
from .sidecar import ACTIVE, RESYNC_TARGETS, SNAPLINK, SYNCING

PROGRESS_SECONDS = 0.5

# A verb: (request, progress callback) → reply. The table maps "cmd" to it.
Handler = Callable[[dict[str, Any], Any], Awaitable[dict[str, Any]]]
CommandTable = dict[str, Handler]


def req_str(req: dict[str, Any], key: str) -> str:
    """The non-empty string argument `key` of an admin request."""
    v = req.get(key)
    if not isinstance(v, str) or not v:
        # Worded as the CLI's usage line names the command and the argument.
        raise VmdError(f"{command_words(req.get('cmd'))}: {key.upper()} must be given (a "
                       f"non-empty string)")
    return v


def new_image_path(m: VolumeManager, path: str, verb: str) -> str:
    """The absolute path of a new plex's image, refused if another plex uses it
    or it lies under the daemon's own mount. The mount is checked first, and
    without a stat under it: a stat there, from the event loop, would wait for
    a FUSE reply only the event loop can give."""
    path = os.path.abspath(path)
    bad = outside_mount_error(path, m.cfg.mountpoint)
    if bad:
        raise VmdError(f"{verb}: {bad}")
    used = m.plex_path_in_use(path)
    if used:
        raise VmdError(f"{path} is already {used}")
    return path


def _own_column_path(m: VolumeManager, vol: Any, name: str, path: str) -> str | None:
    """`path` if it is column `name`'s own image path: a new disk mounted
    where the failed one was (as md adds a replacement under the old name).
    The column must be out (attach_plex says so otherwise); whatever the
    file holds is not trusted: it is rebuilt whole, created if missing."""
    path = os.path.abspath(path)
    if outside_mount_error(path, m.cfg.mountpoint):
        return None  # refused by new_image_path, without a stat under the mount
    for p in getattr(vol, "columns", []):
        if p.name == name and os.path.realpath(p.record.path) == os.path.realpath(path):
            return path
    return None


def register(table: CommandTable, m: VolumeManager, request_stop: Callable[[], None]) -> None:

    async def status(req: dict[str, Any], progress: Any) -> dict[str, Any]:
        name = req.get("volume")
        return m.status(name if isinstance(name, str) and name else None)

    async def stop(req: dict[str, Any], progress: Any) -> dict[str, Any]:
        busy = [v.name for v in m.volumes.values() if v.openers]
        if busy and not req.get("force"):
            files = ", ".join(f"{m.cfg.mountpoint}/{b}" for b in busy)
            raise VmdError(
                (f"volume {busy[0]} is open" if len(busy) == 1 else
                 f"volumes {', '.join(busy)} are open")
                + f" (a loop device attached, or a process holding {files}); unmount what is on "
                f"{'it' if len(busy) == 1 else 'them'} and detach "
                f"{'it' if len(busy) == 1 else 'them'} first (umount, losetup -d) or use "
                f"`vmd stop --force`")
        request_stop()
        return {"stopping": True}

    async def plex_detach(req: dict[str, Any], progress: Any) -> dict[str, Any]:
        return {"plex": await m.get(req_str(req, "volume")).detach_plex(req_str(req, "plex"))}

    async def plex_attach(req: dict[str, Any], progress: Any) -> dict[str, Any]:
        vol = m.get(req_str(req, "volume"))
        if not req.get("force"):
            return {"plex": await vol.attach_plex(req_str(req, "plex"))}
        if not hasattr(vol, "columns"):
            raise VmdError(f"plex attach --force applies to RAID-5 volumes with two columns "
                           f"out; volume {vol.name} is a mirror")
        return {"plex": await vol.attach_plex(req_str(req, "plex"), force=True)}

    async def plex_add(req: dict[str, Any], progress: Any) -> dict[str, Any]:
        vol = m.get(req_str(req, "volume"))
        path = req_str(req, "path")
        remote = is_remote(path)
        if uri_typo(path):
            raise VmdError(f"plex add {vol.name}: {uri_typo(path)}")
        if remote and check_uri(path):
            raise VmdError(f"plex add {vol.name}: {check_uri(path)}")
        if not remote:
            path = new_image_path(m, path, f"plex add {vol.name}")
        elif m.plex_path_in_use(path):
            raise VmdError(f"{path} is already {m.plex_path_in_use(path)}")
        if hasattr(vol, "columns"):
            await vol.add_plex(path)  # RAID-5: refused with the reason, whatever the image
        if not remote:  # an export's size is checked when it is opened
            check_image(Path(path), vol.size, f"plex add {vol.name}")
        p = await vol.add_plex(path, named=remote)
        return {"plex": vol._plex_status(p)}

    async def plex_replace(req: dict[str, Any], progress: Any) -> dict[str, Any]:
        vol = m.get(req_str(req, "volume"))
        if is_remote(req_str(req, "path")):  # not made a path relative to the daemon's cwd
            raise VmdError(f"plex replace {vol.name}: {req['path']} is a remote image; a RAID-5 "
                           f"column must be a local image file (remote columns are not supported)")
        path = (_own_column_path(m, vol, req_str(req, "plex"), req_str(req, "path"))
                or new_image_path(m, req_str(req, "path"), f"plex replace {vol.name}"))
        if not hasattr(vol, "columns"):
            raise VmdError(f"volume {vol.name} is a mirror: `plex replace` is for RAID-5 "
                           f"columns; use `vmd plex remove` and `vmd plex add`")
        check_image(Path(path), vol.cfg.image_size_of(vol.size), f"plex replace {vol.name}",
                    what=vol.cfg.image_what)
        return {"plex": await vol.attach_plex(req_str(req, "plex"), path=path)}

    async def plex_remove(req: dict[str, Any], progress: Any) -> dict[str, Any]:
        rec, _ = await m.get(req_str(req, "volume")).remove_plex(req_str(req, "plex"))
        return {"removed": rec.name, "path": rec.path}

    async def fastresync(req: dict[str, Any], progress: Any) -> dict[str, Any]:
        on = req.get("on")
        if not isinstance(on, bool):
            raise VmdError("fastresync: \"on\" must be true or false")
        vol = m.get(req_str(req, "volume"))
        await vol.set_fastresync(on)
        return {"fastresync": on}

    async def wait(req: dict[str, Any], progress: Any) -> dict[str, Any]:
        vol = m.get(req_str(req, "volume"))
        passes = vol.resync.passes
        while True:
            st = vol.resync.status()
            if st["error"] is not None:  # it will not go on by itself: do not wait for it
                raise VmdError(f"{vol.name}: the resync stopped on an unexpected error "
                               f"({st['error']}); the daemon's log has its traceback")
            syncing = any(p.state == SYNCING for p in vol.plexes)
            if not vol.resync.targets() and not st["running"] and not syncing:
                # The last pass's failed targets, whenever it ran (`plex
                # replace ... && vmd wait` may connect after it ended), while
                # they are still failed: the redundancy it was to restore is not.
                by_name = {p.name: p for p in vol.plexes}
                failed = [{"plex": n, "state": by_name[n].state, "reason": why}
                          for n, why in st["failed"].items()
                          if n in by_name and by_name[n].state not in RESYNC_TARGETS]
                # Plexes out for another reason (detached, failed before this
                # pass): nothing to wait for, but "in sync" alone would hide them.
                out = [{"plex": p.name, "state": p.state, "reason": p.record.reason}
                       for p in vol.plexes if p.state not in (ACTIVE, SNAPLINK)
                       and p.record.role != "snapshot"
                       and not any(f["plex"] == p.name for f in failed)]
                return {"resync": st, "ran": vol.resync.passes != passes, "failed": failed,
                        "rebuild": hasattr(vol, "columns"), "out": out}
            await progress({"volume": vol.name, **st})
            with trio.move_on_after(PROGRESS_SECONDS):
                await vol.resync.wait_idle()

    table.update({
        "status": status, "stop": stop, "plex.detach": plex_detach, "plex.attach": plex_attach,
        "plex.add": plex_add, "plex.remove": plex_remove, "plex.replace": plex_replace, "fastresync": fastresync, "wait": wait,
    })
