"""A RAID-5 volume with two columns out: which stripes can still be rebuilt.

The problem. A column taken out for maintenance (`vmd plex detach`) and a
second that fails meanwhile (a full disk) leave every stripe short of two
units: I/O that needs them fails, and an attach of either was refused ("has
lost more than one column"), so no command brought the volume back, although
each column's FastResync map says which stripes it missed and the two seldom
miss the same ones (trial 9, F2).

What is decided, at attach (`Raid5Volume.attach_plex`). The column attached
and the other one out come back together when no stripe lacks both: each is
SYNCING with its own map, every stripe lacks one column at most, and the
rebuild recomputes each column's stripes from the others (it stops on a run
that lacks two: none here). A column whose image changed, a new image, or
one without a map lacks every stripe. Stripes that both lack have no second
copy: the attach is refused, naming how many, unless the administrator says
which column to trust there (`--force`): its map is cleared on them, so that
its image is read as it is and the other column is rebuilt from it. That is
md's `--assemble --force`: right when the trusted column's image holds what
was written there (a disk that filled up, the writes before kept), wrong
where it missed writes; the filesystem on the volume must then be checked.

Nothing is written before the decision: a refused attach changes nothing.
"""

from __future__ import annotations

import logging
from typing import Any

from bitarray import bitarray

from .errors import VmdError
from .regionmap import RegionMap
from .sidecar import ACTIVE, SYNCING

# `vol` is a Raid5Volume (vmd/raid5.py imports this module, not the other way).

log = logging.getLogger(__name__)


def lacking(vol: Any, m: RegionMap | None) -> bitarray:
    """The stripes a column with map `m` lacks (None: every stripe). In C:
    a RAID-5 map has one bit per stripe unit, `per` = columns - 1 of them
    per stripe, so stripe s is the OR of bits s*per ... s*per+per-1 (a
    Python loop over the bits of a TiB took a second on the event loop)."""
    out = bitarray(vol.size // vol.width)  # a RAID-5 size is whole stripes (config)
    out.setall(m is None)
    if m is not None:
        per = vol.width // m.region
        for k in range(per):
            out |= m.bits[k::per]
    return out


def column_lacking(vol: Any, c: int) -> bitarray:
    """The stripes column c lacks now (Raid5Volume.lacks, for every stripe)."""
    p = vol.columns[c]
    if p.fd < 0 or p.state not in (ACTIVE, SYNCING):
        return lacking(vol, None)
    if p.record.missing is None:
        out = lacking(vol, None)
        if p.state == ACTIVE:
            out.setall(0)  # in sync, no map kept: lacks nothing
        return out
    return lacking(vol, p.record.missing)


def can_serve(vol: Any, out: list[int]) -> bool:
    """With the columns `out` not ACTIVE: no stripe lacks two of them."""
    if len(out) <= 1:
        return True
    if len(out) > 2:
        return False
    return not (column_lacking(vol, out[0]) & column_lacking(vol, out[1])).any()


class Plan:
    """How a column `p` comes back with the other column out, `q`: the
    stripes to trust `p`'s image on, and whether `q` is rebuilt whole."""

    def __init__(self, q: Any, trust: bitarray, q_whole: str):
        self.q, self.trust, self.q_whole = q, trust, q_whole
        self.q_map = q.record.missing  # as it was: put back if the attach fails after all


def plan(vol: Any, p: Any, why: str, new_image: bool, force: bool) -> Plan | None:
    """None with no other column out; else the plan, or a refusal
    (VmdError) if both cannot be rebuilt. Decides only: nothing is opened,
    written or retired before it (review 15, R5). `why`: why `p`'s map
    cannot be used (its image changed, none kept, a new image)."""
    out = [q for q in vol.columns if q is not p and q.state != ACTIVE]
    if not out:
        return None
    if len(out) > 1:
        names = ", ".join(f"{q.name} {q.state}" for q in out)
        raise VmdError(f"volume {vol.name} has {len(out) + 1} columns out ({p.name}, "
                       f"{names}): a RAID-5 volume rebuilds two at most, from the others")
    q = out[0]
    q_whole = "" if q.state == SYNCING else vol._why_full_resync(q)
    q_lacks = (column_lacking(vol, vol.columns.index(q)) if q.state == SYNCING
               else lacking(vol, None if q_whole else q.record.missing))
    p_lacks = lacking(vol, None if why else p.record.missing)
    both = p_lacks & q_lacks
    if not both.any():
        return Plan(q, both, q_whole)
    if new_image:
        if q.state == SYNCING:
            raise VmdError(
                f"volume {vol.name}: column {q.name} is still being rebuilt and lacks "
                f"{both.count()} stripe(s) that nothing else holds now: a new image for "
                f"{p.name} cannot be rebuilt there. If {p.name}'s old image is reachable, "
                f"`vmd plex attach {vol.name} {p.name} --force` trusts it on them")
        raise VmdError(f"volume {vol.name} has two columns out ({p.name} and {q.name}): a new "
                       f"image for {p.name} cannot be rebuilt while {q.name} is out; bring "
                       f"{q.name} back first (`vmd plex attach {vol.name} {q.name}`, with "
                       f"--force if it is refused)")
    if not force:
        raise VmdError(refusal(vol, p.name, q.name, both, why or q_whole))
    return Plan(q, both, q_whole)


def bring_back(vol: Any, p: Any, plan: Plan) -> None:
    """Open the other column to come back with `p`; VmdError if it cannot."""
    q = plan.q
    if q.fd < 0:
        try:
            q.open()
        except OSError as e:
            raise VmdError(f"volume {vol.name}: column {q.name} must come back with "
                           f"{p.name}, but its image {q.record.path} cannot be opened: "
                           f"{e.strerror or e}") from None
    if plan.q_whole:
        q.record.missing = vol.state.new_map(fill=True)


def trust(m: RegionMap, stripes: bitarray, width: int) -> None:
    """Clear `m` on `stripes`: the column's image is read there as it is."""
    per = width // m.region
    for s in stripes.search(1):
        m.bits[s * per:(s + 1) * per] = 0


def refusal(vol: Any, name: str, other: str, both: bitarray, why: str = "") -> str:
    n = both.count()
    return (f"volume {vol.name} has two columns out ({name} and {other}): {n} stripe(s) "
            f"({n * vol.width} bytes of the volume) lack both"
            + (f" ({why})" if why else "") + ", and nothing can rebuild them. "
            f"If column {name}'s image holds what was written there (its disk filled up or "
            f"went away, the writes before it kept), `vmd plex attach {vol.name} {name} "
            f"--force` trusts it on those stripes and rebuilds {other} from it; else try "
            f"`vmd plex attach {vol.name} {other} --force`. Check the filesystem on the volume "
            f"afterwards (see `RAID-5: two columns out` in docs/operations.md)")


def outage(vol: Any) -> str:
    """The status problem of a volume with stripes that lack two columns."""
    states = ", ".join(f"{p.name} {p.state}" for p in vol.columns)
    return (f"two or more columns are out for some stripes ({states}): I/O that needs them "
            f"fails (EIO); units on in-sync columns still read; see `RAID-5: two columns out` "
            f"in docs/operations.md")
