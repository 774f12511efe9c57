"""A RAID-5 volume's start-up after an unclean stop (docs/design.md, RAID-5,
"At start-up"): the RAID-5 log's entries replayed before the volume is
served, or, without a trusted log, the parity of the stripes that were being
written marked for regeneration; dirty and degraded without a log refused
unless forced."""

from __future__ import annotations

import logging
import os

from .errors import VmdError
from .raid5 import Raid5Volume
from .raid5log import IN_USE as R5LOG_IN_USE
from .regionmap import RegionMap
from .sidecar import ACTIVE

log = logging.getLogger(__name__)


def plan_raid5_recovery(vol: Raid5Volume, *, full: bool, force: bool) -> None:
    """At open, after an unclean stop: the parity of every stripe the DRL says
    was being written (all stripes without a DRL) is regenerated in the
    background, as the parity columns' maps say (invariant 8). A column that
    was already out gets those stripes too. Dirty and degraded without a
    RAID-5 log is refused unless forced: a lost column's units would be
    rebuilt from parity that may not match (the write hole)."""
    st = vol.state
    trusted = vol.r5log is not None and vol.r5log.trusted()
    if vol.r5log is not None:
        replay_raid5_log(vol, trusted)
    else:
        st.extra.pop(R5LOG_IN_USE, None)
    if st.clean:
        return
    dirty = RegionMap(st.size, st.region_size, fill=True) if full else st.drl.copy()
    stripes: set[int] = set()
    for r in dirty.set_indices():
        off, n = dirty.region_bytes(r)
        stripes.update(vol._stripes(off, n))
    out = [c for c in range(vol.ncol) if vol.columns[c].state != ACTIVE
           or vol.columns[c].fd < 0]
    if trusted:
        # The log was replayed: every stripe's parity matches its data.
        stripes_parity: set[int] = set()
    else:
        stripes_parity = stripes
    if stripes_parity and out:
        names = ", ".join(vol.columns[c].name for c in out)
        no_log = ("has no RAID-5 log" if vol.r5log is None else
                  f"its RAID-5 log {vol.r5log.path} was not in use before (new, empty or failed)")
        why = (f"volume {vol.name} was not stopped cleanly and is degraded (column {names} "
               f"out) and {no_log}: the parity of {len(stripes)} stripe(s) may not "
               f"match their data, so rebuilding column {names} could return garbage for data "
               f"nobody wrote (the RAID-5 write hole)")
        if not force:
            raise VmdError(f"{why}. Bring the column back if it holds its data, or start with "
                           f"`vmd daemon --force-degraded {vol.name}` (or, while the daemon "
                           f"runs, `vmd start {vol.name} --force-degraded`) to serve it anyway")
        log.critical("%s; started anyway (--force-degraded): those stripes of column %s may "
                     "read wrong", why, names)
    for s in sorted(stripes):
        for c in out:
            vol._mark_missed(vol.columns[c].record, s * vol.width, vol.width)
        if not out and s in stripes_parity:
            vol._mark_missed(vol.columns[vol.parity_col(s)].record, s * vol.width, vol.width)
    st.drl.clear()
    vol.recovered_regions = dirty.count()
    log.warning("volume %s was not stopped cleanly: regenerating the parity of %d stripe(s) "
                "(%s)", vol.name, len(stripes_parity) if not out else 0,
                "whole volume, no DRL" if full else f"{dirty.count()} dirty regions")


def replay_raid5_log(vol: Raid5Volume, trusted: bool) -> None:
    """Before the volume is served: write every entry not retired to the
    columns that are in, flush them, and start the log empty. A log not
    `trusted` is emptied unread; the sidecar log then names this one in use."""
    assert vol.r5log is not None

    def write(c: int, off: int, data: bytes) -> None:
        if c < vol.ncol and vol._writable(c):
            os.pwrite(vol.columns[c].fd, data, off)

    try:
        if not trusted:
            vol.r5log.discard()
        n = vol.r5log.replay(write)
    except ValueError as e:
        then = ("vmd cannot tell which stripes were being written" if trusted else
                f"check raid5_log of volume {vol.name} in the config")
        raise VmdError(f"volume {vol.name}: RAID-5 log {vol.r5log.path}: {e}; {then}") from None
    for c in range(vol.ncol):
        if vol._writable(c):
            os.fsync(vol.columns[c].fd)
    vol.r5log.reset()
    vol.state.extra[R5LOG_IN_USE] = str(vol.r5log.path)
    vol.replayed_entries = n
    if n:
        log.warning("volume %s: RAID-5 log replayed: %d entries", vol.name, n)
