"""Online grow: `vmd resize VOLUME SIZE` makes a volume bigger while it serves.

The steps (docs/design.md, "Online grow"), with the volume's I/O held and its
resync paused:

1. Every map grows in memory (the new bits clear: the new bytes are zeros on
   every copy), and one checkpoint writes the new size into the log's header
   with `extra.grow = {from, to}`. A crash before its rename leaves the old
   size everywhere; after it, the new size, with images that may be short.
2. Every image is extended (`ftruncate`: sparse) and fsynced: the open
   plexes', then the detached plexes' (closed) ones. If no in-sync image
   could be extended (EFBIG, EDQUOT, EROFS), the grow is taken back instead
   (`_undo_grow`) and refused: kept, the volume would not start again.
3. A checkpoint without `grow`.

At start, `finish_grow` extends the images a crash left at the `from` size,
before the plexes are opened, so that the volume opens whole at the new size.
A detached plex must not lose its FastResync map to its own image growing: if
its image is unchanged since it left, step 1 records the identity it will have
once grown (new size, same mtime: the mtime is restored after the extension).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from .config import SECTOR, Config, _si_hint, format_size, parse_size
from .errors import SidecarError, VmdError
from .exclusive import close_locked, open_locked
from .faults import resize_fault
from .plex import Plex, PlexIOError
from .sidecar import SNAPLINK, WRITABLE, VolumeState, read_log
from .volume import Volume

log = logging.getLogger(__name__)

# Roles of plexes that are a snapshot's image merging back into the volume.
_MERGING = ("snapback", "restore")


def parse_new_size(value: Any, vol: Volume) -> int:
    """SIZE as the config reads sizes, whole sectors; errors name the value."""
    try:
        n = parse_size(value)
    except ValueError as e:
        raise VmdError(f"resize {vol.name}: SIZE: {e}") from None
    if n % SECTOR:
        raise VmdError(f"resize {vol.name}: SIZE {value} is {n} bytes, not a multiple of "
                       f"{SECTOR} (a volume is whole sectors){_si_hint(value)}")
    return n


def why_not_growable(vol: Volume) -> str | None:
    """What vmd cannot grow end to end on this volume, in words for the user."""
    n, extra = vol.name, vol.state.extra
    if vol.error is not None:
        return f"volume {n} refuses writes: {vol.error}"
    if vol.cfg.layout != "mirror":
        return (f"volume {n} is a {vol.cfg.layout} volume: online grow is built for mirrors "
                f"only so far")
    info = extra.get("snapshot")
    if info and not info.get("cleared"):
        return (f"volume {n} is a snapshot of {info.get('of')}, and a snapshot merges back only "
                f"into a volume of its own size; `vmd snap clear {n}` makes it a volume of "
                f"its own, which can grow")
    snaps = [p.name.removeprefix("snap:") for p in vol.plexes
             if p.state == SNAPLINK and p.name.startswith("snap:")]
    if snaps:
        return (f"volume {n} has snapshot {', '.join(snaps)}, which merges back only into a "
                f"volume of its own size: `vmd snap back` or `vmd snap clear` it first")
    merging = [p.name for p in vol.plexes if p.record.role in _MERGING]
    if merging:
        return (f"a snapshot is merging back into volume {n} (plex {', '.join(merging)}): "
                f"wait until it is done (`vmd wait {n}`)")
    if "rcopy" in extra or "rcopy_target" in extra or vol.state.plex("rcopy:link"):
        return (f"volume {n} is a Remote Copy source or target: growing a replicated pair is "
                f"not supported yet (a target refuses an update of another size, and both "
                f"sides would have to grow at one consistent point)")
    for p in vol.plexes:
        if p.remote:
            return (f"plex {p.name} of volume {n} is the remote export {p.path}: vmd never "
                    f"resizes a remote image (grow the export, then `vmd plex remove` and "
                    f"`vmd plex add` it, or remove it before the grow)")
        if p.fd >= 0 and not stat.S_ISREG(os.fstat(p.fd).st_mode):
            return (f"plex {p.name} of volume {n} is {p.path}, not an image file: vmd grows "
                    f"only image files")
    return None


def _extend(fd: int, size: int, mtime_ns: int | None = None) -> None:
    """Grow an image to `size` (sparse: the new bytes are holes reading as
    zeros), restore its mtime if asked, and make both durable. (Also shrinks
    one back when a grow is taken back.)"""
    os.ftruncate(fd, size)
    if mtime_ns is not None:
        os.utime(fd, ns=(os.fstat(fd).st_atime_ns, mtime_ns))
    os.fsync(fd)  # a size change is metadata: fdatasync may not cover it


def _extend_image(path: Path, size: int, mtime_ns: int | None) -> None:
    """`_extend` a closed image, under the lock every vmd takes on a plex."""
    fd = open_locked(path, os.O_RDWR | os.O_CLOEXEC, "plex image")
    try:
        _extend(fd, size, mtime_ns)
    finally:
        close_locked(fd)


def _closed_images(vol: Volume, old: int) -> list[tuple[Plex, int | None]]:
    """The closed images (detached plexes) to extend with the volume, each
    with the mtime to keep (None: its identity was not trusted anyway). An
    image of another size than the volume's, or missing, is left alone: it
    was not this volume's copy before the grow either."""
    out: list[tuple[Plex, int | None]] = []
    for p in vol.plexes:
        if p.fd >= 0 or p.state == SNAPLINK:
            continue
        try:
            st = os.stat(p.path)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_size != old:
            continue
        # Check now that no one holds it, before the log says anything.
        close_locked(open_locked(p.path, os.O_RDWR | os.O_CLOEXEC, "plex image"))
        trusted = p.record.identity == [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]
        out.append((p, st.st_mtime_ns if trusted else None))
    return out


def _set_size(vol: Volume, size: int) -> None:
    """The volume and every map of it in memory at `size` (the I/O is held)."""
    st = vol.state
    st.size = vol.size = size
    st.drl.resize(size)
    vol.drl.map_resized()
    for p in vol.plexes:
        p.size = size
        if p.record.missing is not None:
            p.record.missing.resize(size)


async def grow(vol: Volume, size: int) -> dict[str, Any]:
    """Grow `vol` to `size` bytes (steps in the module's docstring)."""
    async with vol.gate.hold(), vol.resync.paused():
        old = vol.size
        why = why_not_growable(vol)
        if why:
            raise VmdError(f"cannot resize volume {vol.name}: {why}")
        if size < old:
            raise VmdError(f"volume {vol.name} is {format_size(old)} ({old} bytes) and "
                           f"{format_size(size)} ({size} bytes) is smaller: vmd does not "
                           f"shrink a volume (the filesystem on it would lose its end)")
        reply: dict[str, Any] = {"volume": vol.name, "old_size": old, "size": size,
                                 "grown": size > old, "extended": [], "not_extended": []}
        if size == old:
            return reply
        closed = _closed_images(vol, old)
        identities = {p.name: p.record.identity for p, _ in closed}
        # Step 1: the new size in the log before anything else changes.
        _set_size(vol, size)
        for p, mtime in closed:
            if mtime is not None:
                ident = p.record.identity
                assert ident is not None
                p.record.identity = [*ident[:2], size, mtime]
        vol.state.extra["grow"] = {"from": old, "to": size}

        def undo_in_memory() -> None:
            del vol.state.extra["grow"]
            _set_size(vol, old)
            for p, _ in closed:
                p.record.identity = identities[p.name]

        try:
            await vol.checkpoint()
        except BaseException:
            # Not recorded: nothing else changed yet, so put memory back too.
            undo_in_memory()
            raise
        resize_fault(vol.name, "logged")
        # Step 2: the images.
        in_sync = vol._in_sync()  # type: ignore[attr-defined]  # (a mirror: why_not_growable)
        failed: list[tuple[Plex, OSError]] = []
        for p in [p for p in vol.plexes if p.fd >= 0]:
            try:
                await trio.to_thread.run_sync(_extend, p.fd, size)
            except OSError as e:
                failed.append((p, e))
                continue
            reply["extended"].append(p.name)
            resize_fault(vol.name, "one-extended")
        if not any(p.name in reply["extended"] for p in in_sync):
            await _undo_grow(vol, old, [p for p in vol.plexes if p.name in reply["extended"]],
                             undo_in_memory)
            why = "; ".join(f"plex {p.name}, image {p.path}: {e.strerror or e}"
                            for p, e in failed if p in in_sync) or "it has no in-sync plex"
            raise VmdError(f"cannot resize volume {vol.name}: no in-sync image could be "
                           f"extended to {size} bytes ({why}); the volume stays "
                           f"{format_size(old)} ({old} bytes)")
        for p, e in failed:
            reply["not_extended"].append(p.name)
            await vol.fail_plex(p, PlexIOError(p, "extension", old, e), old, size - old)
        for p, mtime in closed:
            try:
                await trio.to_thread.run_sync(_extend_image, p.path, size, mtime)
            except (OSError, VmdError) as e:
                # Its identity no longer matches: its reattach is a full resync.
                log.warning("volume %s: image %s of detached plex %s not extended: %s",
                            vol.name, p.path, p.name, e)
                reply["not_extended"].append(p.name)
                continue
            reply["extended"].append(p.name)
        resize_fault(vol.name, "extended")
        # Step 3: done.
        del vol.state.extra["grow"]
        await vol.checkpoint()
    log.info("volume %s grown from %s to %s (images extended: %s)", vol.name, format_size(old),
             format_size(size), ", ".join(reply["extended"]) or "none")
    return reply


async def _undo_grow(vol: Volume, old: int, extended: list[Plex],
                     undo_in_memory: Callable[[], None]) -> None:
    """No in-sync image took the new size: the volume would start refused
    (its only complete copies short). Nothing was written past `old` (the
    gate is still held), so the grow is taken back: the images it extended
    (plexes not in sync) shrink first, then the log says the old size. A
    crash between the two leaves the log's `grow`, which the start finishes
    as any interrupted grow."""
    for p in extended:
        try:
            await trio.to_thread.run_sync(_extend, p.fd, old)
        except OSError as e:  # its image is not the volume's size: it needs a full resync
            await vol.fail_plex(p, PlexIOError(p, "shrink back", old, e), old, 0)
    undo_in_memory()
    await vol.checkpoint()


def finish_grow(state: VolumeState, name: str) -> None:
    """At start, before the plexes open: complete a grow the log recorded
    (step 1) whose images a crash left short. The start checkpoint then
    records it done."""
    grow_rec = state.extra.pop("grow", None)
    if not grow_rec:
        return
    old, new = int(grow_rec["from"]), int(grow_rec["to"])
    for rec in state.plexes:
        if not rec.path:
            continue
        try:
            st = os.stat(rec.path)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode) or st.st_size != old:
            continue
        keep = None
        if rec.state not in WRITABLE and rec.identity == [st.st_dev, st.st_ino, new,
                                                          st.st_mtime_ns]:
            keep = st.st_mtime_ns  # step 1 recorded it trusted, as it will be once grown
        try:
            _extend_image(Path(rec.path), new, keep)
        except OSError as e:
            log.error("volume %s: cannot extend image %s of plex %s to %d bytes to finish an "
                      "interrupted resize: %s", name, rec.path, rec.name, new, e)
            continue
        log.warning("volume %s: finishing an interrupted resize: image %s of plex %s extended "
                    "from %s to %s", name, rec.path, rec.name, format_size(old), format_size(new))


def adopt_logged_sizes(cfg: Config) -> dict[str, int]:
    """Before the start's checks: a volume's sidecar log says a larger size
    than the config's `size:` after `vmd resize` (the config is the
    administrator's file; vmd does not rewrite it). The log wins, with a
    warning, and `cfg.volumes` takes its size. Returns, per volume whose
    grow a crash interrupted, the size its images may still have."""
    pending: dict[str, int] = {}
    for name, vc in list(cfg.volumes.items()):
        try:
            state = read_log(vc.log)[0].state
        except (SidecarError, OSError):
            continue  # none yet, or damaged: opening the volume says so
        if state.size > vc.size:
            log.warning("volume %s: %s: volumes.%s.size is %s but the sidecar log %s says %s "
                        "(it was created that large or grown by `vmd resize`; it never "
                        "shrinks): using %s; update the config", name, cfg.path,
                        name, format_size(vc.size), vc.log, format_size(state.size),
                        format_size(state.size))
            cfg.volumes[name] = dataclasses.replace(vc, size=state.size)
        grow_rec = state.extra.get("grow")
        if grow_rec and state.size == cfg.volumes[name].size:
            pending[name] = int(grow_rec["from"])
    return pending
