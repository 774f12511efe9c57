"""Third-mirror break-off snapshots (VxVM snapstart / snapshot / snapback).

`snap start` adds a SNAPATT plex that the resync brings to SNAPDONE. `snap
take` breaks the SNAPDONE plex off as a volume of its own. Both sides then keep
a SNAPLINK map of the regions written since the break-off, with FastResync's
durability, so `snap back` copies only the union of the two.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import trio

from . import events
from .config import check_name, format_size
from .errors import VmdError
from .manager import VolumeManager, open_volume, snapshot_config
from .sidecar import (ACTIVE, SNAPATT, SNAPDONE, SNAPLINK, PlexRecord, SidecarLog,
                      new_state)
from .volume import Volume

log = logging.getLogger(__name__)


def _snap_plexes(vol: Volume, *states: str) -> list[Any]:
    return [p for p in vol.plexes if p.state in states and p.record.role == "snapshot"]


def _mirrors(vol: Volume) -> list[Any]:
    """Every snapshot mirror: synchronizing, done, or merging back (snap back)."""
    return [p for p in vol.plexes if p.state != SNAPLINK
            and p.record.role in ("snapshot", "snapback", "restore")]


def _ready(vol: Volume) -> list[Any]:
    """SNAPDONE mirrors that lack nothing (after a crash one may be recovering)."""
    return [p for p in _snap_plexes(vol, SNAPDONE)
            if p.record.missing is not None and not p.record.missing.bits.any()]


def _link(vol: Volume, other: str) -> PlexRecord | None:
    return vol.state.plex(f"snap:{other}")


def _new_link(vol: Volume, other: str, path: str) -> PlexRecord:
    from .plex import Plex

    rec = PlexRecord(name=f"snap:{other}", path=path, state=SNAPLINK,
                     missing=vol.state.new_map() if vol.state.fastresync else None,
                     role="snaplink")
    vol.state.plexes.append(rec)
    vol.plexes.append(Plex(rec, vol.size))  # never opened: it only tracks writes
    return rec


def _drop_link(vol: Volume, other: str) -> PlexRecord | None:
    for p in vol.plexes:
        if p.state == SNAPLINK and p.name == f"snap:{other}":
            vol.plexes.remove(p)
            vol.state.plexes.remove(p.record)
            return p.record
    return None


def _refuse_if_open(m: VolumeManager, vol: Volume, what: str, why: str) -> None:
    """Refuse while the volume's file is open, as `vmd stop` does (--force skips this)."""
    if vol.openers:
        raise VmdError(f"{what} is open (a loop device attached, or a process holding "
                       f"{m.cfg.mountpoint}/{vol.name}){why}; umount and detach it first "
                       f"(umount, losetup -d) or use --force")


def _free_image_name(vol: Volume) -> str:
    """`<volume>-snap<N>.img` beside the first plex, for the first N whose file
    does not exist: a default name never lands on an image that holds data
    (an older snapshot's, whose record a `--recover-all` may have dropped, or
    any image in use, which exists)."""
    first = Path(vol.plexes[0].record.path)
    n = vol.state.next_plex
    while (cand := first.with_name(f"{vol.name}-snap{n}.img")).exists():
        n += 1
    return str(cand)


async def snap_start(vol: Volume, path: str | None) -> dict[str, Any]:
    if _mirrors(vol):
        p = _mirrors(vol)[0]
        raise VmdError(f"volume {vol.name} already has a snapshot mirror {p.name} ({p.state}); "
                       f"`vmd snap take` it or `vmd snap abort {vol.name}`")
    named = path is not None
    if path is None:
        path = _free_image_name(vol)
    p = await vol.add_plex(path, state=SNAPATT, role="snapshot", named=named)
    log.info("volume %s: snapshot mirror %s (%s) started", vol.name, p.name, path)
    return vol._plex_status(p)


async def snap_wait(vol: Volume, progress: Any) -> dict[str, Any]:
    while True:
        done = _ready(vol)
        if done:
            return vol._plex_status(done[0])
        # A plex merging back (snap back/refresh) becomes SNAPDONE too.
        if not _mirrors(vol):
            raise VmdError(f"volume {vol.name} has no snapshot mirror: run `vmd snap start "
                           f"{vol.name}` first")
        await progress({"volume": vol.name, **vol.resync.status()})
        with trio.move_on_after(0.5):
            await vol.resync.wait_idle()


async def snap_take(m: VolumeManager, vol: Volume, name: str) -> dict[str, Any]:
    try:
        check_name(name)
    except ValueError as e:
        raise VmdError(f"volume {vol.name}: cannot name the snapshot: {e}") from None
    clash = m.name_in_use(name)
    if clash:
        raise VmdError(f"volume {vol.name}: cannot name the snapshot {name}: {clash}")
    if not _ready(vol):
        att = _snap_plexes(vol, SNAPATT, SNAPDONE)
        raise VmdError(f"volume {vol.name} has no SNAPDONE snapshot mirror"
                       + (f" ({att[0].name} is still synchronizing: `vmd snap wait {vol.name}`)"
                          if att else f" (run `vmd snap start {vol.name}` first)"))
    log_path = Path(vol.sidecar.path).with_name(f"{name}.log")
    if log_path.exists():
        raise VmdError(f"snapshot {name}: its sidecar log would be {log_path}, which exists "
                       f"(another volume's log?); choose another name")
    t0 = time.monotonic()
    async with vol.gate.hold(), vol.resync.paused():  # no write in flight from here
        ready = _ready(vol)
        if not ready:
            raise VmdError(f"volume {vol.name}: the snapshot mirror is no longer SNAPDONE")
        p = ready[0]
        await vol.flush_plex(p)  # an error: IOFAIL, and no snapshot is taken
        # p stays open (holding its image's lock) until the snapshot volume
        # holds the image: no moment in which another daemon could take it.
        vol.plexes.remove(p)
        vol.state.plexes.remove(p.record)
        taken = time.strftime("%Y-%m-%d %H:%M:%S")
        # The snapshot volume's log first: if we crash before the origin's
        # checkpoint, the origin still has its SNAPDONE plex and this log is
        # simply never referenced.
        st = new_state(name, vol.size, vol.state.region_size, vol.state.fmr_region)
        st.fastresync = vol.state.fastresync
        st.extra = {"snapshot": {"of": vol.name, "taken": taken, "origin_uuid": vol.state.uuid},
                    "config_fastresync": st.fastresync}
        st.config_plexes = [p.record.path]
        st.plexes = [PlexRecord(name="p0", path=p.record.path, state=ACTIVE, missing=st.new_map(),
                                created=p.record.created),
                     PlexRecord(name=f"snap:{vol.name}", path="", state=SNAPLINK,
                                missing=st.new_map() if st.fastresync else None, role="snaplink")]
        st.next_plex = 1
        SidecarLog.create(log_path, st).close()
        _new_link(vol, name, p.record.path)
        vol.state.extra.setdefault("snapshots", {})[name] = {
            "path": p.record.path, "log": str(log_path), "taken": taken}
        try:
            await vol.checkpoint()
            snap = open_volume(snapshot_config(vol, name, vol.state.extra["snapshots"][name]),
                               m.cfg.path, clean_delay=m.cfg.clean_delay,
                               rate_limit=m.cfg.resync.rate_limit)
        finally:
            p.close()
        await m.add_running(snap)
    held = time.monotonic() - t0
    log.info("volume %s: snapshot %s taken from plex %s (writes held %.3f s)", vol.name, name,
             p.name, held)
    events.emit(events.SNAPSHOT_TAKEN, vol.name, p.name, snapshot=name, path=p.record.path)
    return {"snapshot": name, "of": vol.name, "path": p.record.path, "held_seconds": held}


async def snap_back(m: VolumeManager, name: str, *, from_snapshot: bool = False,
                    force: bool = False) -> dict[str, Any]:
    snap = m.get(name)
    info = snap.state.extra.get("snapshot")
    if not info or info.get("cleared"):
        raise VmdError(f"volume {name} is not a snapshot (or was cleared with `vmd snap clear`)")
    origin = m.get(info["of"])
    if not force:
        _refuse_if_open(m, snap, f"snapshot {name}", "")
        if from_snapshot:
            # A filesystem mounted on it would keep its cached blocks and
            # metadata and write them over the restored ones: corruption.
            _refuse_if_open(m, origin, f"volume {origin.name}",
                            f": restoring it from snapshot {name} under a mounted filesystem "
                            f"corrupts that filesystem")
    if not origin.resync.targets() and not [p for p in origin.plexes if p.state == ACTIVE]:
        raise VmdError(f"volume {origin.name} has no ACTIVE plex")
    path = snap.plexes[0].record.path
    created = snap.plexes[0].record.created
    from .plex import Plex

    plex = Plex(PlexRecord(name=f"p{origin.state.next_plex}", path=path, state=SNAPATT,
                           missing=None, created=created, role="snapback"), origin.size)
    try:
        plex.open()  # before anything changes: a bad image leaves all as it was
    except OSError as e:
        raise VmdError(f"snapshot {name}: cannot open its image {path}: {e.strerror or e}") from None
    try:
        await m.stop_volume(name)  # its side's map is final from here
    except BaseException:
        plex.close()
        raise
    async with origin.gate.hold(), origin.resync.paused():
        # The regions that differ, written on either side since the break-off;
        # computed with writes held, so that none falls between map and copy.
        o_link, s_link = _link(origin, name), _link(snap, origin.name)
        if (o_link is not None and o_link.missing is not None and s_link is not None
                and s_link.missing is not None and origin.state.fastresync):
            diff = o_link.missing.copy()
            diff.union(s_link.missing)
            why = ""
        else:
            diff = origin.state.new_map(fill=True)
            why = "no FastResync maps on both sides: copying everything"
        _drop_link(origin, name)
        origin.state.extra.get("snapshots", {}).pop(name, None)
        rec = plex.record
        if from_snapshot:
            # The snapshot plex is the one in-sync copy of `diff`; every other
            # plex lacks it, so reads of `diff` come from it until restored.
            rec.state, rec.role, rec.missing = ACTIVE, "restore", origin.state.new_map()
            if not diff.bits.any():  # nothing changed on either side
                rec.state, rec.role = SNAPDONE, "snapshot"
            # Other snapshots' links count the restored regions as written.
            for p in origin.plexes:
                if p.record.missing is not None:
                    p.record.missing.union(diff)
        else:
            rec.missing = diff
        origin.state.next_plex += 1
        origin.state.plexes.append(rec)
        origin.plexes.append(plex)
        origin._update_recovering()
        await origin.checkpoint()
    if from_snapshot:
        # Outside the gate: the kernel may wait for reads that need it.
        await trio.to_thread.run_sync(m.on_changed, origin.name)
    try:
        os.unlink(Path(snap.sidecar.path))
    except OSError:
        pass
    origin.resync.wake()
    if why:
        log.warning("volume %s: snap back of %s: %s", origin.name, name, why)
    log.info("volume %s: snap back of %s%s: %s to copy", origin.name, name,
             " (from the snapshot)" if from_snapshot else "", format_size(diff.bytes_covered()))
    events.emit(events.SNAPSHOT_MERGED, origin.name, rec.name, snapshot=name,
                from_snapshot=from_snapshot, copy_bytes=diff.bytes_covered(), full=bool(why))
    return {"volume": origin.name, "plex": rec.name, "copy_bytes": diff.bytes_covered(),
            "full": bool(why)}


async def snap_clear(m: VolumeManager, name: str) -> dict[str, Any]:
    snap = m.get(name)
    info = snap.state.extra.get("snapshot")
    if not info or info.get("cleared"):
        raise VmdError(f"volume {name} is not a snapshot")
    origin = m.volumes.get(info["of"])
    async with snap.gate.hold():
        _drop_link(snap, info["of"])
        info["cleared"] = True
        await snap.checkpoint()
    if origin is not None:
        async with origin.gate.hold():
            _drop_link(origin, name)
            origin.state.extra.get("snapshots", {}).get(name, {})["cleared"] = True
            await origin.checkpoint()
    return {"volume": name}


async def snap_remove(m: VolumeManager, name: str) -> dict[str, Any]:
    """Retire snapshot volume `name`, cleared or not: it stops being served
    and its origin forgets it (the origin's log named it, so every start of
    the origin brought it back, and one whose files were moved away came
    back new and empty: trial 10, T-K). Its image and sidecar log stay where
    they are, for the administrator to delete or keep: vmd never deletes
    data it was not asked to."""
    origin = next((v for v in m.volumes.values()
                   if name in v.state.extra.get("snapshots", {})), None)
    if origin is None:
        why = ("a volume of the config: remove it from the config instead"
               if name in m.cfg.volumes else "not a snapshot broken off a serving volume")
        m.get(name)  # no such volume at all: the usual error, with the names there are
        raise VmdError(f"volume {name} is {why}")
    snap = m.volumes.get(name)
    if snap is not None and snap.openers:
        raise VmdError(f"snapshot {name} is open (a loop device attached, or a process holding "
                       f"{m.cfg.mountpoint}/{name}); umount and detach it first "
                       f"(umount, losetup -d)")
    info = origin.state.extra["snapshots"][name]
    if snap is not None:
        await m.stop_volume(name)  # its log closed clean: nothing left to recover
    m.refused.pop(name, None)
    # Forgotten by the origin last: a crash before this leaves it to be
    # opened again at the next start, and removed again.
    async with origin.gate.hold():
        _drop_link(origin, name)
        origin.state.extra["snapshots"].pop(name, None)
        await origin.checkpoint()
    log.info("volume %s: snapshot %s removed; its image %s and log %s are left in place",
             origin.name, name, info["path"], info["log"])
    return {"volume": name, "of": origin.name, "path": info["path"], "log": info["log"]}


async def snap_abort(vol: Volume) -> dict[str, Any]:
    # Not a restore in progress: that plex is the only copy of what it restores.
    ps = [p for p in _mirrors(vol) if p.state in (SNAPATT, SNAPDONE)]
    if not ps:
        raise VmdError(f"volume {vol.name} has no snapshot mirror to abort")
    p = ps[0]
    rec, fate = await vol.remove_plex(p.name, snapshot_ok=True, delete_created=True)
    return {"removed": rec.name, "path": rec.path, "image": fate}
