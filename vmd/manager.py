"""Opening volumes from the config and their sidecar logs; the set of running volumes."""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import trio

from . import events, imageid, samefile
from .config import Config, VolumeConfig, format_size
from .errors import SidecarError, VmdError
from .exclusive import InUseError, close_locked, lock_exclusive, open_locked
from .layout_check import check_layout, record_layout
from .mountpath import unmounted_fstab_point
from .nbdplex import map_after_open_error, remote_aware
from .plex import Plex
from .regionmap import RegionMap
from .resize import finish_grow
from .sidecar import (ACTIVE, IOFAIL, SNAPATT, SYNCING, WRITABLE, PlexRecord, SidecarLog,
                      VolumeState, new_state)
from .mirror import MirrorVolume
from .raid5 import Raid5Volume
from .raid5_recovery import plan_raid5_recovery
from .recover import (adopt_raid5_log, config_source, fill_all_but, logged_uuid,
                      prepare_salvaged, recovery_hint, refuse_named_for_raid5, salvage)
from .tasks import Task
from .spread import DeviceSlots
from .volume import Volume, delete_if_created
from .verify import repair_source

log = logging.getLogger(__name__)


def _holds_data(path: Path) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return st.st_blocks > 0


def open_volume(vc: VolumeConfig, cfg_path: Path, *, recover_all: bool = False,
                clean_delay: float = 5.0, rate_limit: int = 0,
                plex_factory: Callable[[PlexRecord, int], Plex] = Plex,
                force_degraded: bool = False, recover_from: str | None = None) -> Volume:
    """Open one volume: replay (or create) its sidecar log, open its plexes,
    and set up crash recovery. Raises VmdError if the volume must be refused.
    `recover_from` (with `recover_all`): the plex to resync every other from."""
    if vc.log.exists() and not recover_all:
        try:
            sidecar, replay = SidecarLog.open(vc.log)
        except InUseError as e:
            raise InUseError(f"volume {vc.name}: {e}", e.holder) from None
        except SidecarError as e:
            raise SidecarError(
                f"volume {vc.name}: {e}. vmd will not guess which regions the mirrors may "
                f"disagree on. {recovery_hint(vc)}") from None
        state = replay.state
        try:
            _check_against_config(state, vc, cfg_path)
            finish_grow(state, vc.name)  # a resize a crash interrupted
        except BaseException:
            sidecar.close()
            raise
        created = False
    else:
        # A new log must not be written for plexes another daemon serves.
        _check_not_in_use(vc)
        if not recover_all:
            # A disk that should hold the volume but is not mounted looks like
            # a first start (no log, no data): never create the volume there.
            for f in (vc.log, *_images(vc)):
                point = unmounted_fstab_point(f)
                if point is not None:
                    raise SidecarError(
                        f"volume {vc.name}: {f} lies under {point}, which /etc/fstab lists "
                        f"but is not mounted: vmd will not create a new, empty volume in its "
                        f"place. Mount it, then `vmd start {vc.name}`")
            for p in _images(vc):
                if _holds_data(p):
                    raise SidecarError(
                        f"volume {vc.name}: sidecar log {vc.log} is missing but plex image {p} "
                        f"holds data; vmd will not guess that the mirrors agree. "
                        f"{recovery_hint(vc)}")
        salvaged: VolumeState | None = None
        known_uuid: str | None = None
        source, why = 0, "the first plex in the config"
        if recover_all:
            # Decided before the log is set aside, so that a refusal leaves it in
            # place; a readable checkpoint knows the plexes, the config may not.
            refuse_named_for_raid5(vc, recover_from)
            salvaged = salvage(vc) if vc.log.exists() else None
            known_uuid = logged_uuid(vc.log)
            if salvaged is not None:
                _check_against_config(salvaged, vc, cfg_path)
                why = prepare_salvaged(salvaged, vc, recover_from)
            elif vc.layout == "mirror":
                source, why = config_source(vc, recover_from)
        if recover_all and vc.log.exists():
            held = open_locked(vc.log, os.O_RDONLY | os.O_CLOEXEC, "sidecar log")
            try:
                aside = vc.log.with_name(f"{vc.log.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
                os.rename(vc.log, aside)
            finally:
                close_locked(held)
            log.warning("volume %s: --recover-all: old sidecar log kept as %s", vc.name, aside)
        for d in {vc.log.parent, *(p.parent for p in _images(vc))}:
            d.mkdir(parents=True, exist_ok=True)  # first start: var/ may not exist yet
        if salvaged is not None:
            state = salvaged
            finish_grow(state, vc.name)
            log.warning("volume %s: --recover-all: rebuilding the sidecar log from the plexes "
                        "and states its last readable checkpoint records (%s), not the config's; "
                        "every plex is resynced from %s", vc.name,
                        ", ".join(f"{p.name} {p.path} {p.state}" for p in state.plexes), why)
        else:
            state = _config_state(vc)
            if recover_all and known_uuid is not None:
                state.uuid = known_uuid  # the same volume: its RAID-5 log stays its own
            if not recover_all:
                # Also what a disk holding the log and every image looks like
                # when it is not mounted: say so where the admin will look.
                log.info("volume %s: no sidecar log %s and no image holding data: a new, empty "
                         "volume (images %s)", vc.name, vc.log,
                         ", ".join(str(p) for p in vc.plexes))
        if recover_all:
            adopt_raid5_log(state, vc, state.uuid if salvaged is not None else known_uuid)
        if recover_all and salvaged is None:
            state.clean = False
            if vc.layout == "raid5":
                # No column is a source: each stripe's parity is regenerated
                # from its data (plan_raid5_recovery, full).
                log.warning("volume %s: --recover-all: rebuilding the sidecar log; the parity "
                            "of every stripe is regenerated", vc.name)
            else:
                fill_all_but(state, source)
                log.warning("volume %s: --recover-all: rebuilding the sidecar log from the "
                            "config (no readable checkpoint); every plex is resynced from %s "
                            "(%s)", vc.name, vc.plexes[source], why)
        if recover_all:
            # The plan goes into the new log itself, not only into memory: a
            # refusal further down (a column or every image unopenable), or a
            # crash before the first checkpoint, leaves this log behind, and
            # the plain start that follows must still recover everything, not
            # trust a "not clean" log whose DRL names no region.
            state.drl.fill()
        sidecar = SidecarLog.create(vc.log, state)
        # A new volume's images are created. Under --recover-all a missing
        # image is no source: a mirror's source was checked to exist
        # (config_source), the others are created and copied whole; a RAID-5
        # column created blank would be taken for data (its stripes' parity
        # regenerated over zeros), so it stays unopened: the volume is then
        # degraded and dirty, refused unless --force-degraded.
        created = salvaged is None and not (recover_all and vc.layout == "raid5")
        if recover_all and created:
            for p in _images(vc):
                if not p.exists():
                    log.warning("volume %s: --recover-all: image %s is missing: created empty, "
                                "it is copied whole from the source", vc.name, p)

    plex_factory = remote_aware(plex_factory, vc, state.clean)
    plexes: list[Plex] = []
    unopened: list[tuple[Plex, OSError]] = []
    for rec in state.plexes:
        p = plex_factory(rec, vc.image_size_of(state.size))
        if rec.state in WRITABLE:
            try:
                p.open(create=created)
            except InUseError as e:
                for q in plexes:
                    q.close()
                sidecar.close()
                raise InUseError(f"volume {vc.name}: {e}", e.holder) from None
            except OSError as e:
                unopened.append((p, e))
        plexes.append(p)
    # A mirror serves from its ACTIVE plexes only; a RAID-5 volume needs columns.
    sources = [p for p in plexes if p.state == ACTIVE or vc.layout != "mirror"]
    if unopened and not any(p.fd >= 0 for p in sources):
        # Nothing to serve from (a disk not mounted yet at boot): recording
        # them all IOFAIL would leave no plex to copy from once the images
        # are back. Refused, nothing written: the next start tries again.
        for q in plexes:
            q.close()
        sidecar.close()
        raise VmdError("none of its in-sync images can be opened: " + "; ".join(
            f"{p.name} {p.path}: {e.strerror or e}" for p, e in unopened)
            + (". The rebuilt sidecar log records the whole recovery --recover-all asked "
               "for" if recover_all else ". Nothing was recorded")
            + f": make the images available (mount their filesystem), then `vmd start {vc.name}`")
    for p, e in unopened:
        rec = p.record
        was = rec.state
        rec.state, rec.reason = IOFAIL, f"cannot open image {rec.path}: {e.strerror or e}"
        rec.identity = p.identity()
        rec.missing = map_after_open_error(p, e, state)
        log.error("volume %s: plex %s is IOFAIL: %s", vc.name, rec.name, rec.reason)
        events.emit(events.PLEX_STATE, vc.name, rec.name, state=IOFAIL, was=was,
                    reason=rec.reason)

    try:
        if not recover_all:  # (its source the administrator chose)
            imageid.check_images(state, plexes, vc.name, vc.log, columns=vc.layout == "raid5")
        imageid.begin_run(state, plexes)  # written by the start's checkpoint
    except BaseException:
        _close_files(plexes, sidecar, None)
        raise

    if state.extra.get("config_fastresync") != vc.fastresync:
        # The config changed since: it wins, as `vmd fastresync` would.
        state.fastresync = vc.fastresync
        state.extra["config_fastresync"] = vc.fastresync
        if not vc.fastresync:
            for rec in state.plexes:
                if rec.state not in WRITABLE:
                    rec.missing = None
    layout = Raid5Volume if vc.layout == "raid5" else MirrorVolume
    vol: Volume | None = None
    try:
        vol = layout(vc, state, sidecar, plexes, clean_delay=clean_delay,
                     rate_limit=rate_limit, plex_factory=plex_factory)
        _abort_interrupted_snapshot_mirrors(vol)
        # The DRL says which regions may differ only if the run that wrote the
        # log kept one: a crash of a run without (drl turned on in the config
        # since) leaves every region suspect, whatever the config says now.
        full = not vc.drl or not state.extra.get(DRL_KEPT, vc.drl) or recover_all
        if isinstance(vol, Raid5Volume):
            plan_raid5_recovery(vol, full=full, force=force_degraded)
        elif not state.clean:
            _plan_recovery(vol, full=full)
        state.extra[DRL_KEPT] = vc.drl  # this run's, in the start's checkpoint
    except BaseException:
        # Refused: nothing stays open or locked (a retry must be able to take it).
        _close_files(plexes, sidecar, vol)
        raise
    vol._update_recovering()
    return vol


DRL_KEPT = "drl"  # in VolumeState.extra: whether the run that wrote the log kept a DRL


def _start_on_loop(vol: Volume) -> None:
    for p in vol.plexes:
        p.start_on_loop()


def _close_files(plexes: list[Plex], sidecar: SidecarLog, vol: Volume | None) -> None:
    """Close what opening a volume opened, so that a retry can take it."""
    for p in plexes:
        p.close()
    if isinstance(vol, Raid5Volume) and vol.r5log is not None:
        vol.r5log.close()
    sidecar.close()


def _config_state(vc: VolumeConfig) -> VolumeState:
    """A new volume's state: the config's plexes, p0 the source of any copy."""
    state = new_state(vc.name, vc.size, vc.region_size, vc.fastresync_region)
    state.fastresync = vc.fastresync
    state.extra["config_fastresync"] = vc.fastresync
    state.config_plexes = [str(p) for p in vc.plexes]
    record_layout(state, vc, len(vc.plexes))
    for i, p in enumerate(vc.plexes):
        prefix = "p" if vc.layout == "mirror" else "c"
        # An export may hold anything (vmd cannot tell "new" from "full"):
        # it is copied from p0 like an added plex.
        copy = i > 0 and not isinstance(p, Path)
        state.plexes.append(PlexRecord(name=f"{prefix}{i}", path=str(p),
                                       state=SYNCING if copy else ACTIVE,
                                       missing=state.new_map(fill=copy),
                                       created=isinstance(p, Path) and not p.exists()))
    state.next_plex = len(vc.plexes)
    return state


def _images(vc: VolumeConfig) -> list[Path]:
    """The volume's local plex images (not its remote exports)."""
    return [p for p in vc.plexes if isinstance(p, Path)]


def _check_not_in_use(vc: VolumeConfig) -> None:
    """Refuse (InUseError) if another daemon holds one of the volume's existing plexes."""
    for p in _images(vc):
        try:
            fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue  # missing or unreadable: Plex.open reports it
        try:
            lock_exclusive(fd, p, "plex image")
        except InUseError as e:
            raise InUseError(f"volume {vc.name}: {e}", e.holder) from None
        finally:
            close_locked(fd)  # our own Plex.open takes the lock for good


def snapshot_config(origin: Volume, name: str, info: dict[str, Any]) -> VolumeConfig:
    """The config of a snapshot volume: its origin's, on the broken-off image."""
    ovc = origin.cfg
    return VolumeConfig(name=name, size=origin.size, plexes=(Path(info["path"]),),
                        log=Path(info["log"]), region_size=origin.state.region_size, drl=ovc.drl,
                        fastresync=origin.state.fastresync,
                        fastresync_region=origin.state.fmr_region, direct_io=ovc.direct_io)


def snapshot_gone(origin: Volume, name: str, info: dict[str, Any]) -> str | None:
    """Why snapshot volume `name` cannot be opened: its sidecar log is gone
    (moved or deleted), and opening it would make a new, empty volume of that
    name where the administrator meant to retire it (trial 10, T-K)."""
    if Path(info["log"]).exists():
        return None
    return (f"snapshot {name} of volume {origin.name}: its sidecar log {info['log']} is "
            f"missing; vmd will not make a new, empty volume in its place. Put it back and "
            f"`vmd start {name}`, or `vmd snap remove {name}` to forget the snapshot")


def _check_against_config(state: VolumeState, vc: VolumeConfig, cfg_path: Path) -> None:
    # No "volume NAME:" prefix: the refusal is logged and shown under the volume's name.
    key = f"volumes.{vc.name}"
    if state.name != vc.name:
        raise VmdError(f"{cfg_path}: {key}.log: sidecar log {vc.log} belongs to volume "
                       f"{state.name!r}")
    # Before the size: a layout change shows as a size change too.
    check_layout(state, vc, cfg_path)
    # A snapshot's config is made from its origin's (`snapshot_config`): its
    # log alone says its size, which differs once either side grew after
    # `snap clear`.
    if state.size != vc.size and "snapshot" not in state.extra:
        raise VmdError(f"{cfg_path}: {key}.size is {vc.size} ({format_size(vc.size)}) but "
                       f"sidecar log {vc.log} says {state.size} ({format_size(state.size)}); "
                       f"a volume grows only with `vmd resize`, and never shrinks")
    for sub, ours, theirs in (("region_size", vc.region_size, state.region_size),
                              ("fastresync_region", vc.fastresync_region, state.fmr_region)):
        if ours != theirs:
            log.warning("volume %s: %s in %s is %s but the sidecar log %s was made with %s; "
                        "keeping %s (recreate the volume to change it)", vc.name, sub, cfg_path,
                        format_size(ours), vc.log, format_size(theirs), format_size(theirs))
    if "snapshot" in state.extra:
        return  # not in the config: its log alone says which plexes it has
    cfg_plexes = [str(p) for p in vc.plexes]
    current = [p.path for p in state.plexes if not p.role]
    if sorted(cfg_plexes) == sorted(current):
        state.config_plexes = cfg_plexes  # the administrator brought the config up to date
        return
    lacks = [p for p in current if p not in cfg_plexes]
    extra = [p for p in cfg_plexes if p not in current]
    images = "plexes" if vc.layout == "mirror" else "columns"
    differs = (f"{key}.{images} differs from the {images} sidecar log {vc.log} records "
               f"({', '.join(current)}): " + "; ".join(
                   ([f"it lacks {', '.join(lacks)}"] if lacks else [])
                   + ([f"it lists {', '.join(extra)}, not recorded"] if extra else [])))
    if cfg_plexes == state.config_plexes:
        # The config is as it was when vmd last agreed with it: the plexes changed
        # since with `vmd plex` stand, so that a restart (after a crash, at boot)
        # needs no help. Said at every start until the config catches up. Never
        # taken for a move: after `vmd plex replace`, the config still names the
        # replaced image, which carries the column's mark, and serving it again
        # would bring back what it missed (trial 9, F1).
        log.warning("volume %s: %s: %s. They were changed with `vmd plex` since the config "
                    "was written: serving the recorded plexes; update the config to list "
                    "exactly them", vc.name, cfg_path, differs)
        return
    moved = imageid.find_moved(state, lacks, extra)
    if moved is not None:
        for rec in state.plexes:
            rec.path = moved.get(rec.path, rec.path)
        if vc.layout != "mirror" and [p.path for p in state.plexes if not p.role] != cfg_plexes:
            raise VmdError(f"{cfg_path}: {key}.columns lists the moved columns in another "
                           f"order; list them as " + ", ".join(
                               p.path for p in state.plexes if not p.role))
        state.config_plexes = cfg_plexes
        log.warning("volume %s: its images were moved while vmd was stopped (found by their "
                    "vmd mark or inode): %s; recorded at their new paths", vc.name,
                    ", ".join(f"{old} -> {new}" for old, new in moved.items()))
        return
    raise VmdError(f"{cfg_path}: {differs}. The config was edited since vmd last used it, so "
                   f"vmd will not guess which is meant: make {key}.{images} list exactly the "
                   f"recorded {images}. (Images moved while vmd was stopped are found at their "
                   f"new paths by their vmd mark: move them with `cp -a`, `rsync -X` or `mv`; "
                   f"a copy is taken for the image only once the image is gone from the path "
                   f"recorded)")


def _abort_interrupted_snapshot_mirrors(vol: Volume) -> None:
    """A snapshot mirror still synchronizing when the daemon stopped is removed
    (as VxVM does); its image is deleted only if vmd named and created it."""
    for p in list(vol.plexes):
        if p.state == SNAPATT and p.record.role == "snapshot":
            p.close()
            vol.plexes.remove(p)
            vol.state.plexes.remove(p.record)
            vol.removed_at_open.append(p.record)
            log.warning("volume %s: snapshot mirror %s was still synchronizing when the "
                        "daemon stopped: removed", vol.name, p.name)


def _plan_recovery(vol: Volume, *, full: bool) -> None:
    """The volume was not stopped cleanly: every plex but one source must get
    the regions that were dirty (all of them without a DRL)."""
    st = vol.state
    dirty = RegionMap(st.size, st.region_size, fill=True) if full else st.drl.copy()
    n = dirty.count()
    in_sync = [p for p in vol.plexes if p.state == ACTIVE and p.fd >= 0 and
               (p.record.missing is None or not p.record.missing.bits.any())]
    active = in_sync or [p for p in vol.plexes if p.state == ACTIVE and p.fd >= 0]
    source = repair_source(vol, active) or (active[0] if active else None)
    if n:
        for p in vol.plexes:
            if p is source or p.record.missing is None:
                continue
            p.record.missing.mark_regions_of(dirty, list(dirty.set_indices()))
    # The DRL's job is done: its regions are now in the plexes' maps, which
    # the checkpoint written at start makes durable.
    st.drl.clear()
    vol.recovered_regions = n
    log.warning("volume %s was not stopped cleanly: recovering %d %s (%s) from plex %s",
                vol.name, n, "regions" if not full else "regions (whole volume, no DRL)",
                format_size(dirty.bytes_covered()), source.name if source else "(none)")


class VolumeWork(Task):
    """A volume's background work (its DRL committer and cleaner, its resync).
    Its stop is the volume's: drain, flush, record clean; then the work ends."""

    def __init__(self, vol: Volume):
        super().__init__()
        self.vol = vol
        self.name = f"volume-{vol.name}"

    async def main(self, task_status: Any) -> None:
        await self.vol.run(task_status=task_status)

    async def stop(self) -> None:
        try:
            await self.vol.shutdown()
        finally:
            await super().stop()


class VolumeManager:
    """All volumes of one daemon: running ones and refused ones (with why)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.volumes: dict[str, Volume] = {}
        self.refused: dict[str, str] = {}
        self.force_degraded: set[str] = set()  # `vmd daemon --force-degraded VOLUME`
        # What the daemon's start does for every volume beyond opening and
        # starting it (Remote Copy's roll-back and link), for one `vmd start` starts.
        self.start_hooks: list[Callable[[Volume], Awaitable[None]]] = []
        self._nursery: trio.Nursery | None = None
        self._work: dict[str, VolumeWork] = {}
        self.slots = DeviceSlots(cfg.resync.per_device)  # resyncs and verifies per disk
        self.on_added: Callable[[str], None] = lambda name: None
        self.on_removed: Callable[[str], None] = lambda name: None
        # A volume's bytes changed behind its file (blocking: call in a thread).
        self.on_changed: Callable[[str], None] = lambda name: None
        # A volume file appeared at run time: the kernel must see it now (blocking).
        self.on_shown: Callable[[str], None] = lambda name: None

    def _open(self, vc: VolumeConfig, recover_all: bool = False,
              recover_from: str | None = None, *, force_degraded: bool = False,
              in_use_fatal: bool = True) -> Volume | None:
        """Open one volume as the daemon's start does; None: refused (in
        `refused`, with why). `in_use_fatal`: another daemon holding one of
        its files stops this daemon's start (at start) or only refuses it."""
        try:
            vol = open_volume(
                vc, self.cfg.path, recover_all=recover_all, recover_from=recover_from,
                clean_delay=self.cfg.clean_delay, rate_limit=self.cfg.resync.rate_limit,
                force_degraded=force_degraded or vc.name in self.force_degraded)
        except (VmdError, OSError) as e:
            if isinstance(e, InUseError) and in_use_fatal:
                raise  # another daemon serves it: this daemon must not start at all
            self.refuse(vc.name, str(e))
            return None
        self.refused.pop(vc.name, None)
        return vol

    def refuse(self, name: str, why: str) -> None:
        self.refused[name] = why
        log.error("volume %s refused: %s", name, why.removeprefix(f"volume {name}: "))
        events.emit(events.VOLUME_REFUSED, name, error=why)

    def open_all(self, recover_all: Mapping[str, str | None] | None = None,
                 refused: Mapping[str, str] | None = None) -> None:
        """`recover_all`: volume → the plex to resync every other from (None: default).
        `refused`: volume → why the start's checks refuse it."""
        recover_all, refused = recover_all or {}, refused or {}
        for name, vc in self.cfg.volumes.items():
            if name in refused:
                self.refuse(name, refused[name])
                continue
            vol = self._open(vc, name in recover_all, recover_all.get(name))
            if vol is not None:
                self.volumes[name] = vol
        for vol in list(self.volumes.values()):
            self.volumes.update(self._open_snapshots(vol))

    def _open_snapshots(self, vol: Volume, in_use_fatal: bool = True) -> dict[str, Volume]:
        """The snapshot volumes broken off `vol` (volumes of their own), opened."""
        out: dict[str, Volume] = {}
        for name, info in vol.state.extra.get("snapshots", {}).items():
            if name in self.cfg.volumes or name in self.volumes:
                where = f"in {self.cfg.path}" if name in self.cfg.volumes else "that serves"
                self.refuse(name, f"snapshot {name} of volume {vol.name} has the name of a "
                                  f"volume {where}")
                continue
            gone = snapshot_gone(vol, name, info)
            if gone is not None:
                self.refuse(name, gone)
                continue
            snap = self._open(snapshot_config(vol, name, info), in_use_fatal=in_use_fatal)
            if snap is not None:
                out[name] = snap
        return out

    async def start_one(self, vc: VolumeConfig, *, recover_all: bool = False,
                        recover_from: str | None = None,
                        force_degraded: bool = False) -> list[str]:
        """`vmd start`: open a volume the daemon refused (or one added to the
        config since) exactly as the daemon's start opens it, start it, then
        the snapshot volumes broken off it; each is shown in the mount once it
        runs. Returns the names started. Refused again: it stays in `refused`
        with the new reason (raised as a VmdError), and nothing else changed."""
        # Off the event loop, which serves every other volume meanwhile: an
        # open may block for long (an NBD handshake up to remote_timeout, the
        # fsyncs of a rebuilt log, a RAID-5 log's replay, a hung disk).
        vol = await trio.to_thread.run_sync(functools.partial(
            self._open, vc, recover_all, recover_from, force_degraded=force_degraded,
            in_use_fatal=False))
        if vol is not None:
            _start_on_loop(vol)
        if vol is None or not await self._start_opened(vol, recover_all=recover_all,
                                                       force_degraded=force_degraded):
            raise VmdError(self.refused[vc.name])
        started = [vc.name]
        if "snapshot" in vol.state.extra:
            return started  # as at start: a snapshot's own snapshots are not opened
        self.cfg.volumes[vc.name] = vc
        snaps = await trio.to_thread.run_sync(
            functools.partial(self._open_snapshots, vol, in_use_fatal=False))
        for name, snap in snaps.items():
            _start_on_loop(snap)
            if await self._start_opened(snap, snapshot_of=vc.name):
                started.append(name)
        return started

    async def _start_opened(self, vol: Volume, **details: Any) -> bool:
        """Start an opened volume at run time, run the start hooks, show its
        file; `details` go into its event. False: refused (`refused` says
        why), its files closed."""
        try:
            await self._start(vol)
        except (OSError, VmdError) as e:
            # Its first checkpoint failed (the log's disk): nothing ran yet.
            _close_files(vol.plexes, vol.sidecar, vol)
            self.refuse(vol.name, f"cannot write its sidecar log {vol.cfg.log}: {e}")
            return False
        self.volumes[vol.name] = vol
        try:
            for hook in self.start_hooks:
                await hook(vol)
        except (OSError, VmdError) as e:
            del self.volumes[vol.name]
            await self._work.pop(vol.name).stop()
            self.refuse(vol.name, str(e))
            return False
        self.on_added(vol.name)
        log.info("volume %s started (`vmd start`)", vol.name)
        events.emit(events.VOLUME_STARTED, vol.name, **details)
        return True

    async def start(self, nursery: trio.Nursery) -> None:
        """Start every open volume's background work in `nursery`."""
        self._nursery = nursery
        for vol in list(self.volumes.values()):
            await self._start(vol)

    async def _start(self, vol: Volume) -> None:
        assert self._nursery is not None
        # Persist the recovery plan (and compact the log) before any I/O.
        await vol.checkpoint()
        for rec in vol.removed_at_open:
            log.info("volume %s: removed snapshot mirror %s: %s", vol.name, rec.name,
                     delete_if_created(rec))
        vol.removed_at_open.clear()
        vol.resync.slots = self.slots
        work = self._work[vol.name] = VolumeWork(vol)
        await self._nursery.start(work.run, name=work.name)

    async def add_running(self, vol: Volume) -> None:
        """A volume made at run time (a snapshot): start it and show its file."""
        self.volumes[vol.name] = vol
        await self._start(vol)
        self.on_added(vol.name)

    async def stop_volume(self, name: str) -> Volume:
        vol = self.get(name)
        self.on_removed(name)
        del self.volumes[name]
        await self._work.pop(name).stop()
        return vol

    async def stop(self) -> None:
        """Stop every volume (the daemon's stop); one that fails to stop
        cleanly is logged, and crash recovery sees to it at the next start."""
        for name, work in list(self._work.items()):
            try:
                await work.stop()
            except (OSError, VmdError) as e:
                log.error("volume %s: unclean stop: %s", name, e)

    def name_in_use(self, name: str) -> str | None:
        if name in self.volumes or name in self.refused:
            return f"volume {name} exists"
        if name in self.cfg.volumes:
            return f"volume {name} is in {self.cfg.path}"
        return None

    def get(self, name: str) -> Volume:
        v = self.volumes.get(name)
        if v is None:
            if name in self.refused:
                raise VmdError(f"volume {name} was refused at start: {self.refused[name]}")
            names = [*self.volumes, *(f"{n} (refused)" for n in self.refused)]
            raise VmdError(f"no volume named {name!r} (volumes: {', '.join(names) or 'none'})")
        return v

    def status(self, name: str | None = None) -> dict[str, Any]:
        if name is not None:
            return {"volumes": [self.get(name).status()]}
        return {"volumes": [v.status() for v in self.volumes.values()],
                "refused": [{"name": n, "error": e} for n, e in self.refused.items()]}

    def plex_path_in_use(self, path: str) -> str | None:
        """What file of a serving volume `path` is, under that name or another."""
        return samefile.in_use(self.volumes.values(), path)
