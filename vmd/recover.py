"""`--recover-all`: which plexes a rebuilt sidecar log holds, and which one
is the source every other is resynced from.

Two cases. A damaged log that still yields a checkpoint knows the plexes
(after `vmd plex remove`/`add` they are not the config's) and which are in
sync: they are kept, and only the regions are forgotten (every plex but the
source is recovered whole). A missing log, or one without any readable
checkpoint, leaves only the config: the source is its first plex unless the
administrator names another, and a config image modified after the first
(the first may be a plex removed since, holding old data) is refused until
one is named (`--recover-all VOLUME=IMAGE`).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from .config import VolumeConfig, format_size
from .errors import SidecarError
from .raid5log import IN_USE as R5LOG_IN_USE
from .raid5log_format import read_owner
from .sidecar import ACTIVE, SNAPLINK, VolumeState, read_log, read_log_header

log = logging.getLogger(__name__)


def salvage(vc: VolumeConfig) -> VolumeState | None:
    """The state the log's last readable checkpoint (and the records before
    any damage) holds; None if the log is missing or has no checkpoint."""
    try:
        return read_log(vc.log, upto_damage=True)[0].state
    except SidecarError:
        return None


def logged_uuid(path: Path) -> str | None:
    """The volume uuid the header of the sidecar log at `path` names, if
    it can be read (the records after it may be damaged)."""
    try:
        return read_log_header(path).uuid
    except (OSError, SidecarError):
        return None


def adopt_raid5_log(state: VolumeState, vc: VolumeConfig, known_uuid: str | None) -> None:
    """--recover-all of a RAID-5 volume with a RAID-5 log: the
    log's entries not retired may be acknowledged writes the columns lack
    (the write-back cache had not written them). Emptied unread they were
    lost. If its header names this volume (the uuid of the old sidecar log's
    header), or the sidecar log is gone altogether and the config names this
    log for this volume (the best evidence left), it is recorded in use, so
    that it is replayed before every stripe's parity is regenerated. Any
    other log a checkpoint records in use is not (missing, emptied, another
    file): the regeneration stands in for it, as --recover-all asked."""
    path = vc.raid5_log
    if vc.layout != "raid5":
        return
    recorded = state.extra.pop(R5LOG_IN_USE, None)
    if path is None:
        return
    try:
        with open(path, "rb") as f:
            owner = read_owner(f.read(40))
    except (OSError, ValueError):
        return  # missing, empty or not a log: nothing to replay (the open says why)
    if owner is None and recorded == str(path):
        owner = known_uuid  # from before logs named their volume: the checkpoint vouches
    if owner is None or (known_uuid is not None and owner != known_uuid):
        return  # unknown, or another volume's (refused at open)
    if known_uuid is None:
        state.uuid = owner
    state.extra[R5LOG_IN_USE] = str(path)
    log.warning("volume %s: --recover-all: RAID-5 log %s names this volume: its entries are "
                "replayed before the parity of every stripe is regenerated", vc.name, path)


def _image_line(path: str) -> str:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"{path} (missing)"
    except OSError as e:
        return f"{path} (cannot stat: {e.strerror})"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st.st_mtime))
    return (f"{path} ({format_size(st.st_size)}, modified {stamp}"
            f".{st.st_mtime_ns % 1_000_000_000 // 1_000_000:03d})")


def _mtime_ns(path: str) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def _match(named: str, candidates: list[tuple[str, str]]) -> int | None:
    """Index of the plex `named` names: its name (p1) or its image path
    (relative to the current directory) or export."""
    for i, (name, path) in enumerate(candidates):
        if named in (name, path) or ("://" not in path
                                     and os.path.realpath(named) == os.path.realpath(path)):
            return i
    return None


def _config_candidates(vc: VolumeConfig) -> list[tuple[str, str]]:
    prefix = "p" if vc.layout == "mirror" else "c"
    return [(f"{prefix}{i}", str(p)) for i, p in enumerate(vc.plexes)]


def _missing_source(vc: VolumeConfig, path: str, listing: str) -> str:
    """Why a missing image cannot be the source: vmd would create it blank
    and copy its zeros over every other plex."""
    return (f"volume {vc.name}: --recover-all would resync every plex from {path}, which is "
            f"missing (is its filesystem mounted?); vmd never copies from an image it would "
            f"have to create. Images: {listing}. Make it available, or name an existing one: "
            f"--recover-all {vc.name}=IMAGE")


def config_source(vc: VolumeConfig, named: str | None) -> tuple[int, str]:
    """(index, why) of the config plex to resync from, when the config is all
    there is. Raises SidecarError if a config image is newer than the first
    and none was named, or if `named` is not one of them."""
    cands = _config_candidates(vc)
    listing = "; ".join(_image_line(p) for _, p in cands)
    if named is not None:
        i = _match(named, cands)
        if i is None:
            raise SidecarError(f"volume {vc.name}: --recover-all {vc.name}={named}: not one of its "
                               f"plexes in the config ({listing})")
        if _mtime_ns(cands[i][1]) is None and "://" not in cands[i][1]:
            raise SidecarError(_missing_source(vc, cands[i][1], listing))
        return i, f"named by --recover-all {vc.name}={named}"
    first = _mtime_ns(cands[0][1])
    if first is None and "://" not in cands[0][1]:
        raise SidecarError(_missing_source(vc, cands[0][1], listing))
    newer = [p for _, p in cands[1:] if first is not None and (_mtime_ns(p) or 0) > first]
    if newer:
        raise SidecarError(
            f"volume {vc.name}: --recover-all without the sidecar log would resync every plex "
            f"from {cands[0][1]}, the first plex in the config, but {', '.join(newer)} was "
            f"modified after it (the first may be a plex removed since, with old data). "
            f"Images: {listing}. Name the source: --recover-all {vc.name}=IMAGE")
    return 0, "the first plex in the config"


def recovery_hint(vc: VolumeConfig) -> str:
    """What a refusal says about `--recover-all`: which plexes, which source, why."""
    name = vc.name
    state = salvage(vc) if vc.log.exists() else None
    if state is not None:
        plexes = [p for p in state.plexes if p.state != SNAPLINK]
        src = next((p for p in plexes if p.state == ACTIVE and p.missing is not None
                    and not p.missing.bits.any()), None)
        return (f"Restore the log, or start with `--recover-all {name}`: it keeps the plexes and "
                f"states of the log's last readable checkpoint ("
                + ", ".join(f"{p.name} {p.path} {p.state}" for p in plexes)
                + f") and resyncs every plex from {src.path if src else 'an in-sync plex'}, "
                f"which that checkpoint records as in sync (or name one: "
                f"`--recover-all {name}=IMAGE`)")
    cands = _config_candidates(vc)
    images = "; ".join(_image_line(p) for _, p in cands)
    if vc.layout != "mirror":
        return (f"Restore the log, or start with `--recover-all {name}`: a new log, and the "
                f"parity of every stripe regenerated from the data (a missing column is not "
                f"created: the volume is then degraded, started only with --force-degraded). "
                f"Images: {images}")
    try:
        i, why = config_source(vc, None)
    except SidecarError:
        first_missing = _mtime_ns(cands[0][1]) is None
        return (f"Restore the log, or name the plex to resync every other from: "
                f"`--recover-all {name}=IMAGE`. Without the log only the config's plexes are "
                f"known (plexes added or removed with `vmd plex` since are not), and "
                + ("the first plex in the config is missing" if first_missing else
                   "an image other than the first was modified after it")
                + f". Images: {images}")
    return (f"Restore the log, or start with `--recover-all {name}` to rebuild it and resync "
            f"every plex from {cands[i][1]} ({why}; plexes added or removed with `vmd plex` "
            f"since are not known without the log; another source: "
            f"`--recover-all {name}=IMAGE`). Images: {images}")


def prepare_salvaged(state: VolumeState, vc: VolumeConfig, named: str | None) -> str:
    """Make a salvaged state recover everything: not clean, and with a named
    source, that plex the only in-sync one. Returns the source's description."""
    state.clean = False
    if named is None:
        return "the in-sync plex the log's checkpoint records"
    plexes = [p for p in state.plexes if p.state != SNAPLINK]
    i = _match(named, [(p.name, p.path) for p in plexes])
    if i is None:
        raise SidecarError(
            f"volume {vc.name}: --recover-all {vc.name}={named}: not one of the plexes its sidecar "
            f"log {vc.log} records (" + ", ".join(f"{p.name} {p.path}" for p in plexes) + ")")
    if _mtime_ns(plexes[i].path) is None and "://" not in plexes[i].path:
        # As config_source: the source must be there, or every other plex is
        # failed over to nothing and every read of the volume is EIO.
        raise SidecarError(_missing_source(
            vc, plexes[i].path, "; ".join(_image_line(p.path) for p in plexes)))
    for j, p in enumerate(plexes):
        if j == i:
            p.state, p.missing, p.reason = ACTIVE, state.new_map(), ""
        elif p.missing is not None:
            p.missing.fill()
    return f"{plexes[i].name} ({plexes[i].path}), named by --recover-all {vc.name}={named}"


def fill_all_but(state: VolumeState, source: int) -> None:
    """Every config plex but `source` is recovered from it."""
    for i, rec in enumerate(state.plexes):
        if i == source:
            rec.state, rec.missing = ACTIVE, state.new_map()
        else:
            rec.missing = state.new_map(fill=True)


def refuse_named_for_raid5(vc: VolumeConfig, named: str | None) -> None:
    if named is not None and vc.layout == "raid5":
        raise SidecarError(f"volume {vc.name}: --recover-all {vc.name}={named}: a RAID-5 volume "
                           f"has no source column (every stripe's parity is regenerated); use "
                           f"--recover-all {vc.name}")

