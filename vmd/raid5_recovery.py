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
    trusted = _replays_log(vol)
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
        why = (f"volume {vol.name} was not stopped cleanly and is degraded (column "
               + ", ".join(f"{vol.columns[c].name} {vol.columns[c].state}" for c in out)
               + f") and {no_log}: the parity of {len(stripes)} stripe(s) written last may not "
               f"match their data, so rebuilding column {names} there could return garbage for "
               f"data nobody wrote (the RAID-5 write hole)")
        if not force:
            # Only an image that could not be opened can come back by itself;
            # one detached, failed or being rebuilt is brought back after the
            # start (trial 10, T-E: "bring it back" had no command).
            unopened = [vol.columns[c] for c in out if vol.columns[c].state == ACTIVE
                        or vol.columns[c].record.reason.startswith("cannot open image")]
            first = (f"If the image of column {', '.join(p.name for p in unopened)} is only "
                     f"missing (a disk not mounted, a path that changed), make it available "
                     f"and start again: nothing is lost then. Otherwise start" if unopened
                     else "Start")
            raise VmdError(f"{why}. {first} it with `vmd start {vol.name} --force-degraded` "
                           f"(or `vmd daemon --force-degraded {vol.name}`), check the "
                           f"filesystem on it, then `vmd plex attach` (or `replace`) the "
                           f"column; a RAID-5 log (`raid5_log:`) avoids this")
        log.critical("%s; started anyway (--force-degraded): those stripes of column %s may "
                     "read wrong", why, names)
    regenerated = 0
    for s in sorted(stripes):
        marked = False
        for c in out:
            if not vol._writable(c):  # out since before: it missed those writes (invariant 3)
                vol._mark_missed(vol.columns[c].record, s * vol.width, vol.width)
                marked = True
        # A SYNCING column took every write (and the replay) like an ACTIVE
        # one: marking it too made a stripe lack two columns while two were
        # being rebuilt (review 15, R1). Without a trusted log, a stripe no
        # column lacks gets its parity regenerated from the data; one that a
        # SYNCING column lacks is rebuilt there from the others (as forced).
        if s in stripes_parity and not marked and not any(vol.lacks(c, s) for c in out):
            vol._mark_missed(vol.columns[vol.parity_col(s)].record, s * vol.width, vol.width)
            regenerated += 1
    st.drl.clear()
    vol.recovered_regions = dirty.count()
    log.warning("volume %s was not stopped cleanly: regenerating the parity of %d stripe(s) "
                "(%s)", vol.name, regenerated,
                "whole volume, no DRL" if full else f"{dirty.count()} dirty regions")


def _replays_log(vol: Raid5Volume) -> bool:
    """Whether the config's RAID-5 log is replayed (else it is emptied unread).
    Refused (VmdError): a log whose header names another volume, and, after
    an unclean stop, the config naming another log than the one the sidecar
    log records in use (or none), unless the config's names this volume: the
    recorded one may hold acknowledged writes the columns lack."""
    st, r5 = vol.state, vol.r5log
    key = f"volumes.{vol.name}.raid5_log"
    owner = None
    if r5 is not None:
        try:
            owner = r5.owner()
        except ValueError:
            pass  # not a log, or damaged: replay or discard says so
    if owner is not None and owner != st.uuid:
        raise VmdError(f"volume {vol.name}: {r5.path} ({key}) is the RAID-5 log of another "
                       f"volume (uuid {owner}; this volume's is {st.uuid}): vmd neither "
                       f"replays nor empties it. Make {key} name this volume's own RAID-5 "
                       f"log, or a new file")
    recorded = st.extra.get(R5LOG_IN_USE)
    here = None if r5 is None else str(r5.path)
    if not st.clean and r5 is not None and recorded == here and r5.was_empty:
        # The crashed run's log is missing (its disk not mounted yet) or was
        # emptied: started afresh, the acknowledged writes it held were lost.
        if r5.created:
            os.unlink(r5.path)  # made by this open: leave the mount point as it was
        raise VmdError(
            f"volume {vol.name} was not stopped cleanly and its RAID-5 log {here} is "
            f"{'missing' if r5.created else 'empty'}: it may have held acknowledged writes "
            f"the columns lack. Make it available (mount its filesystem) and `vmd start "
            f"{vol.name}`: it is replayed. To go on without it: `vmd start {vol.name} "
            f"--recover-all` regenerates the parity of every stripe from the data, and the "
            f"writes only that log held are lost")
    if st.clean or recorded is None or recorded == here:
        return r5 is not None and r5.trusted()
    if r5 is not None and owner == st.uuid:
        log.warning("volume %s: RAID-5 log %s is recorded in use, the config names %s, whose "
                    "header names this volume: the log moved with the config; replaying it",
                    vol.name, recorded, here)
        return True
    what = ("the config has no raid5_log" if r5 is None else
            f"the config names {here}, " + ("a new, empty file" if r5.was_empty else
                                            "whose header does not name this volume"))
    raise VmdError(f"volume {vol.name} was not stopped cleanly and its RAID-5 log {recorded} "
                   f"may hold acknowledged writes its columns lack, but {what}; vmd will not "
                   f"discard them. Make {key} name {recorded} again (move the file back there "
                   f"if it was moved) and start the volume: the log is replayed. Once the "
                   f"volume stopped cleanly, {key} can be changed")


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
        path = vol.r5log.path
        then = ("vmd cannot tell which stripes were being written" if trusted else
                f"check raid5_log of volume {vol.name} in the config")
        raise VmdError(
            f"volume {vol.name}: RAID-5 log {path}: {e}; {then}. If it is this volume's log, "
            f"damaged: move it aside (`mv {path} {path}.damaged`) and `vmd start {vol.name} "
            f"--recover-all`, which regenerates the parity of every stripe from the data "
            f"(writes only this log held are lost)") from None
    for c in range(vol.ncol):
        if vol._writable(c):
            os.fsync(vol.columns[c].fd)
    vol.r5log.reset()
    vol.state.extra[R5LOG_IN_USE] = str(vol.r5log.path)
    vol.replayed_entries = n
    if n:
        log.warning("volume %s: RAID-5 log replayed: %d entries", vol.name, n)
