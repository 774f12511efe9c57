"""At start: the config's data layout against the one the sidecar log records.

A RAID-5 volume's stripe unit, column count and column order say where every
byte is; vmd has no reshape, so a config that changed any of them would be
served (and written, parity included) with the wrong placement. They are
refused, naming the key, both values and the way back. Logs written before
vmd recorded the layout take the config's once, after the one check they
allow: a RAID-5 volume's FastResync region is its stripe unit.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .config import VolumeConfig, format_size
from .errors import VmdError
from .sidecar import VolumeState

log = logging.getLogger(__name__)


def _size(v: int | None) -> str:
    return "none" if v is None else f"{v} ({format_size(v)})"


def record_layout(state: VolumeState, vc: VolumeConfig, ncol: int) -> None:
    state.layout = vc.layout
    if vc.layout == "raid5":
        state.stripe_unit, state.columns = vc.stripe_unit, ncol


def check_layout(state: VolumeState, vc: VolumeConfig, cfg_path: Path) -> None:
    """Refuse (VmdError) a config whose layout differs from the log's; record
    the layout in a log that has none (written by the next checkpoint)."""
    key = f"volumes.{vc.name}"
    raid5 = vc.layout == "raid5"
    columns = [p.path for p in state.plexes if not p.role]
    if state.layout is None:
        if raid5 and state.fmr_region != vc.stripe_unit:
            raise VmdError(
                f"{cfg_path}: {key}.stripe_unit is {_size(vc.stripe_unit)} but sidecar log "
                f"{vc.log} was made with a FastResync region of {_size(state.fmr_region)}, "
                f"which for a RAID-5 volume is its stripe unit: the stripe unit changed, and "
                f"the data would be read from the wrong places. Put `stripe_unit: "
                f"{format_size(state.fmr_region)}` back (vmd cannot reshape a volume)")
        record_layout(state, vc, len(columns))
        log.info("volume %s: sidecar log %s records no layout (written by an older vmd): "
                 "recording the config's (%s)", vc.name, vc.log, vc.layout)
    else:
        ncol = len(vc.plexes) if raid5 else None
        for sub, ours, theirs, show in (
                ("layout", vc.layout, state.layout, str),
                ("stripe_unit", vc.stripe_unit if raid5 else None, state.stripe_unit, _size),
                ("columns", ncol, state.columns, lambda n: f"{n} columns")):
            if ours != theirs:
                raise VmdError(
                    f"{cfg_path}: {key}.{sub} is {show(ours)} but sidecar log {vc.log} "
                    f"records {show(theirs)}: the data is laid out by the recorded one, and "
                    f"vmd cannot reshape a volume. Put the recorded value back in the config "
                    f"(a new layout needs a new volume and a copy of the data)")
    cfg_columns = [str(p) for p in vc.plexes]
    if raid5 and cfg_columns != columns and sorted(cfg_columns) == sorted(columns):
        raise VmdError(
            f"{cfg_path}: {key}.columns lists the recorded columns in another order; a RAID-5 "
            f"volume's column order is where its data and parity are, and stays the one "
            f"sidecar log {vc.log} records: list them as {', '.join(columns)}")
