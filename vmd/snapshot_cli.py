"""CLI for `vmd snap …`."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from .config import format_size
from .errors import EXIT_OK


def add_snapshot_parsers(sub: Any) -> None:
    s = sub.add_parser("snap", help="third-mirror break-off snapshots")
    ss = s.add_subparsers(dest="snap_cmd", required=True, metavar="ACTION")
    p = ss.add_parser("start", help="add a snapshot mirror to VOLUME (synchronizes in background)")
    p.add_argument("volume")
    p.add_argument("--path", help="image file for the snapshot mirror")
    p = ss.add_parser("wait", help="wait until VOLUME's snapshot mirror is SNAPDONE")
    p.add_argument("volume")
    p = ss.add_parser("take", help="break the SNAPDONE mirror off as volume NAME")
    p.add_argument("volume")
    p.add_argument("name")
    p = ss.add_parser("back", help="merge snapshot NAME back into its volume")
    p.add_argument("name")
    p.add_argument("--from-snapshot", action="store_true",
                   help="the volume takes the snapshot's contents (restore)")
    p.add_argument("--force", action="store_true",
                   help="even if the snapshot's file (with --from-snapshot: the volume's) is open")
    p = ss.add_parser("refresh", help="snap back NAME, then take it again")
    p.add_argument("name")
    p.add_argument("--force", action="store_true")
    p = ss.add_parser("clear", help="make snapshot NAME an unrelated volume")
    p.add_argument("name")
    p = ss.add_parser("abort", help="remove VOLUME's snapshot mirror")
    p.add_argument("volume")


def run_snapshot_command(args: argparse.Namespace, client: Any, progress: Any) -> int:
    c = args.snap_cmd
    req: dict[str, Any] = {"cmd": f"snap.{c}"}
    for key in ("volume", "name", "path", "from_snapshot", "force"):
        if getattr(args, key, None) is not None:
            req[key] = getattr(args, key)
    if "path" in req:
        # Relative to where the user typed it, not to the daemon's directory.
        req["path"] = os.path.abspath(req["path"])
    show = progress(f"{getattr(args, 'volume', None) or args.name} snapshot mirror")
    reply = client.request(req, show)
    if sys.stderr.isatty() and c in ("wait", "refresh"):
        sys.stderr.write("\n")
    if c == "start":
        p = reply["plex"]
        print(f"{args.volume}: snapshot mirror {p['name']} ({p['path']}) is {p['state']}")
    elif c == "wait":
        print(f"{args.volume}: snapshot mirror {reply['plex']['name']} is SNAPDONE")
    elif c in ("take", "refresh"):
        print(f"{reply['of']}: snapshot {reply['snapshot']} taken "
              f"(writes held {reply['held_seconds'] * 1000:.0f} ms)")
    elif c == "back":
        print(f"{reply['volume']}: snapshot {args.name} merging back as plex {reply['plex']}: "
              f"{format_size(reply['copy_bytes'])} to copy" + (" (full)" if reply["full"] else ""))
    elif c == "clear":
        print(f"{args.name}: no longer a snapshot")
    elif c == "abort":
        print(f"{args.volume}: snapshot mirror {reply['removed']} removed; {reply['image']}")
    return EXIT_OK
