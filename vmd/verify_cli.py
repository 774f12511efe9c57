"""CLI for `vmd verify VOLUME [--repair] [--from PLEX]`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from .cli_help import VOLUME_HELP, add_verb
from .config import format_size
from .errors import EXIT_ERROR, EXIT_OK, VmdError

RANGES_SHOWN = 8


def add_verify_parser(sub: Any) -> None:
    v = add_verb(sub, "verify", "compare VOLUME's in-sync plexes while it serves; with --repair "
                                "make them equal", (
        ("vmd verify vol0", "exit 1 if the plexes differ; says which agree"),
        ("vmd verify vol0 --repair", "where most plexes agree their bytes win, else p0's"),
        ("vmd verify vol0 --repair --from p1", "p1's bytes win everywhere")))
    v.add_argument("volume", help=VOLUME_HELP)
    v.add_argument("--repair", action="store_true",
                   help="write the source plex's bytes over the others where they differ")
    v.add_argument("--from", dest="source", metavar="PLEX",
                   help="the repair's source: an ACTIVE plex in sync (default: per range, the "
                        "bytes a strict majority of the plexes hold, else the first ACTIVE plex)")


def run_verify_command(args: argparse.Namespace, client: Any,
                       progress: Callable[[str], Callable[[dict[str, Any]], None]]) -> int:
    if args.source is not None and not args.repair:
        raise VmdError("verify: --from PLEX needs --repair (it names the repair's source)")
    req: dict[str, Any] = {"cmd": "verify", "volume": args.volume, "repair": args.repair}
    if args.source is not None:
        req["from"] = args.source
    r = client.request(req, progress(f"{args.volume} verify"))["verify"]
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    print(describe(args.volume, r))
    return EXIT_ERROR if r["mismatched_bytes"] > r["repaired_bytes"] else EXIT_OK


def describe(volume: str, r: dict[str, Any]) -> str:
    """What a verify found, as `vmd verify` prints it."""
    raid5 = r.get("layout") == "raid5"
    head = (f"{volume}: {format_size(r['checked_bytes'])} "
            f"{'(parity) of columns' if raid5 else 'of plexes'} {', '.join(r['plexes'])} "
            f"checked in {r['seconds']} s")
    if not r["mismatched_bytes"]:
        return f"{head}: no mismatches"
    n = r["range_count"]
    lines = [f"{head}: {format_size(r['mismatched_bytes'])} ({r['mismatched_bytes']} bytes) "
             f"{'of parity ' if raid5 else ''}mismatched in {n} range{'' if n == 1 else 's'}"
             f"{' (column offsets)' if raid5 else ''}:"]
    for i, (off, length) in enumerate(r["ranges"][:RANGES_SHOWN]):
        where = (f"column offset {off} (stripe {off // r['stripe_unit']}, parity on "
                 f"{r['parity_columns'][i]})" if raid5 else f"offset {off} ({format_size(off)})")
        lines.append(f"  {where}, {length} bytes{_range_detail(r, i)}")
    if n > RANGES_SHOWN:
        lines.append(f"  … and {n - RANGES_SHOWN} more")
    if r["repaired_bytes"] and raid5:
        lines.append(f"repaired {format_size(r['repaired_bytes'])}: parity rewritten from the "
                     f"data units (a damaged data unit stays as it is)")
    elif r["repaired_bytes"]:
        lines.append(_repaired(r))
    return "\n".join(lines)


def agreement(versions: list[list[str]]) -> str:
    """Which plexes hold which version of a range: `p1, p2 agree; p0 differs`."""
    parts = [f"{', '.join(g)} agree" for g in versions if len(g) > 1]
    alone = [g[0] for g in versions if len(g) == 1]
    if alone and parts:
        parts.append(f"{', '.join(alone)} differ{'s' if len(alone) == 1 else ''}")
    elif alone:
        parts.append(f"{' and '.join(alone)} differ" if len(alone) == 2
                     else f"{', '.join(alone)} all differ")
    return "; ".join(parts)


def _range_detail(r: dict[str, Any], i: int) -> str:
    versions, sources = r.get("range_versions") or [], r.get("range_sources") or []
    return ((f": {agreement(versions[i])}" if i < len(versions) else "")
            + (f"; repaired from {sources[i]}" if i < len(sources) else ""))


def _repaired(r: dict[str, Any]) -> str:
    """A mirror's repair: whose bytes the others hold now, and why those."""
    done = r.get("repaired_from") or {r["source"]: r["repaired_bytes"]}
    if len(done) == 1:
        (source,) = done
        others = [p for p in r["plexes"] if p != source]
        text = (f"repaired {format_size(r['repaired_bytes'])}: plex{'es' if len(others) > 1 else ''} "
                f"{', '.join(others)} now hold{'' if len(others) > 1 else 's'} plex {source}'s "
                f"bytes there")
    else:
        text = (f"repaired {format_size(r['repaired_bytes'])}: from " +
                ", ".join(f"plex {p} ({format_size(n)})" for p, n in done.items()))
    if r.get("from_given", True):
        return text  # --from (or a result from before majorities): its source everywhere
    if r.get("no_majority_bytes"):
        text += (f"\nno strict majority of the plexes agreed on "
                 f"{format_size(r['no_majority_bytes'])}: repaired there from plex {r['source']}, "
                 f"the first ACTIVE plex (the default; choose with --from PLEX)")
    if r["no_majority_bytes"] < r["mismatched_bytes"]:
        text += "\nwhere a strict majority of the plexes agreed, their bytes were kept"
    return text


def status_lines(v: dict[str, Any]) -> list[str]:
    """A volume's running and last verify, for `vmd status`."""
    out = []
    job = v.get("verify_running")
    if job is not None:
        if job["queued"]:
            out.append(f"  verify: queued behind {', '.join(job['queued_behind'])}")
        else:
            out.append(f"  verify: {format_size(job['done_bytes'])} / "
                       f"{format_size(job['total_bytes'])}, "
                       f"{format_size(job['mismatched_bytes'])} mismatched so far")
    r = v.get("verify")
    if r is not None:
        out.append(f"  last verify {_found(r)}")
        if r.get("last_complete") is not None:
            out.append(f"  last complete verify {_found(r['last_complete'])}")
    return out


def _found(r: dict[str, Any]) -> str:
    if r.get("unfinished"):
        return (f"{r['time']}: started{' with --repair' if r['repair'] else ''} and did not "
                f"finish: the daemon stopped during it (a repair's writes made before are on "
                f"the plexes); run it again")
    found = (f"{format_size(r['mismatched_bytes'])} mismatched in {r['range_count']} "
             f"range{'' if r['range_count'] == 1 else 's'}"
             if r["mismatched_bytes"] else "no mismatches")
    repaired = f", {format_size(r['repaired_bytes'])} repaired" if r["repaired_bytes"] else ""
    return (f"{r['time']}: {found}{repaired}"
            f"{'' if r['complete'] else ' (stopped before the end)'}")
