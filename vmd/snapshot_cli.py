"""CLI for `vmd snap …`."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from .cli_help import SNAPSHOT_HELP, VOLUME_HELP, add_verb
from .config import format_size
from .errors import EXIT_OK


def add_snapshot_parsers(sub: Any) -> None:
    s = add_verb(sub, "snap", "third-mirror break-off snapshots")
    ss = s.add_subparsers(dest="snap_cmd", required=True, metavar="ACTION")
    p = add_verb(ss, "start", "add a snapshot mirror to VOLUME (synchronizes in background)", (
        ("vmd snap start vol0", "then: vmd snap wait vol0"),
        ("vmd snap start vol0 --path /srv/disk3/vol0-snap.img", "vmd snap abort keeps this image")))
    p.add_argument("volume", help=VOLUME_HELP)
    p.add_argument("--path", help="image file for the snapshot mirror (default: "
                                  "VOLUME-snapN.img beside the first plex, made by vmd)")
    p = add_verb(ss, "wait", "wait until VOLUME's snapshot mirror is SNAPDONE", (
        "vmd snap wait vol0",))
    p.add_argument("volume", help=VOLUME_HELP)
    p = add_verb(ss, "take", "break the SNAPDONE mirror off as volume NAME", (
        ("vmd snap take vol0 nightly", "the volume file var/mnt/nightly"),))
    p.add_argument("volume", help=VOLUME_HELP)
    p.add_argument("name", help="the new volume's name (its file in the mount point)")
    p = add_verb(ss, "back", "merge snapshot NAME back into its volume", (
        ("vmd snap back nightly", "becomes vol0's snapshot mirror again"),
        ("vmd snap back nightly --from-snapshot", "restore vol0 from it"),
        ("vmd snap back nightly --force", "even with var/mnt/nightly open")))
    p.add_argument("name", help=SNAPSHOT_HELP)
    p.add_argument("--from-snapshot", action="store_true",
                   help="the volume takes the snapshot's contents (restore)")
    p.add_argument("--force", action="store_true",
                   help="even if the snapshot's file (with --from-snapshot: the volume's) is open")
    p = add_verb(ss, "refresh", "snap back NAME, then take it again", (
        "vmd snap refresh nightly", ("vmd snap refresh nightly --force",
                                     "even with var/mnt/nightly open")))
    p.add_argument("name", help=SNAPSHOT_HELP)
    p.add_argument("--force", action="store_true", help="even if the snapshot's file is open")
    p = add_verb(ss, "clear", "make snapshot NAME an unrelated volume", (
        "vmd snap clear nightly",))
    p.add_argument("name", help=SNAPSHOT_HELP)
    p = add_verb(ss, "remove", "stop serving snapshot NAME (cleared or not) for good", (
        ("vmd snap remove nightly", "its image and log stay: delete them yourself"),))
    p.add_argument("name", help=SNAPSHOT_HELP)
    p = add_verb(ss, "abort", "remove VOLUME's snapshot mirror", ("vmd snap abort vol0",))
    p.add_argument("volume", help=VOLUME_HELP)


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
    elif c == "remove":
        print(f"{args.name}: snapshot of {reply['of']} removed; its image {reply['path']} and "
              f"sidecar log {reply['log']} are left in place")
    elif c == "abort":
        print(f"{args.volume}: snapshot mirror {reply['removed']} removed; {reply['image']}")
    return EXIT_OK
