"""CLI for `vmd start`: bring up one volume the running daemon refused."""

from __future__ import annotations

import argparse
from typing import Any

from .cli_help import VOLUME_HELP, add_verb
from .errors import EXIT_OK, VmdError


def add_start_parser(sub: Any) -> None:
    s = add_verb(sub, "start", "bring up a volume the running daemon refused (or one added to "
                               "the config since), the others serving on", (
        ("vmd start vol0", "after mounting the disk its images are on"),
        ("vmd start vol0 --recover-all", "its sidecar log is missing or damaged"),
        ("vmd start vol0 --recover-all=/srv/disk2/vol0-p1.img",
         "the same, resyncing every plex from that image"),
        ("vmd start --recover-all vol0=p1", "the same, as `vmd daemon` spells it"),
        ("vmd start r5 --force-degraded", "RAID-5 r5 is dirty, degraded and has no log")))
    s.add_argument("volume", nargs="?", metavar="VOLUME",
                   help=f"{VOLUME_HELP}, or a volume added to the config")
    # const True, not "": argparse passes a string const through the non-empty check.
    s.add_argument("--recover-all", nargs="?", const=True, default=None, metavar="IMAGE",
                   help="as `vmd daemon --recover-all VOLUME[=IMAGE]`: rebuild the volume's "
                        "sidecar log and resync every plex from IMAGE (a plex's image path or "
                        "name; write it --recover-all=IMAGE), by default from the in-sync plex "
                        "a damaged log's checkpoint records, else the config's first. The "
                        "daemon's spelling, which refusals quote, works too: "
                        "`vmd start --recover-all VOLUME[=IMAGE]`")
    s.add_argument("--force-degraded", action="store_true",
                   help="as `vmd daemon --force-degraded VOLUME`: serve a RAID-5 volume that "
                        "was not stopped cleanly, lacks a column and has no RAID-5 log (the "
                        "write hole)")


def _volume_and_source(args: argparse.Namespace) -> tuple[str, str | None]:
    """VOLUME and the IMAGE of --recover-all, in either spelling."""
    image = args.recover_all if isinstance(args.recover_all, str) else None
    if args.volume is None:
        if image is None:
            raise VmdError("start: VOLUME must be given (`vmd start VOLUME`)")
        # `vmd start --recover-all VOLUME[=IMAGE]`: a volume name has no "=".
        volume, _, image = image.partition("=")
        return volume, image or None
    if image is not None and image.startswith(f"{args.volume}="):
        image = image.split("=", 1)[1] or None
    return args.volume, image


def run_start_command(args: argparse.Namespace, client: Any) -> int:
    volume, image = _volume_and_source(args)
    reply = client.request({"cmd": "start", "volume": volume,
                            "recover_all": args.recover_all is not None,
                            "recover_from": image,
                            "force_degraded": args.force_degraded})
    for name in reply["started"]:
        print(f"{name}: started, served at {reply['mountpoint']}/{name}")
    print(f"  recovery, if any, runs in the background: `vmd status {volume}`, "
          f"`vmd wait {volume}`")
    return EXIT_OK
