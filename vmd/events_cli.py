"""CLI for `vmd events`: follow the daemon's events (vmd/events.py)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .cli_help import add_verb
from .errors import EXIT_NO_DAEMON, EXIT_OK, VmdError
from .events import format_event


def add_events_parser(sub: Any) -> None:
    e = add_verb(sub, "events", "follow the daemon's events as they happen (plex state changes, "
                                "resyncs, snapshots, Remote Copy updates ...)", (
        ("vmd events", "the recent ones, then each as it happens"),
        ("vmd events --json", "one JSON object a line"),
        ("vmd events --new --json", "only those from now on")))
    e.add_argument("--json", action="store_true",
                   help="one JSON object a line: time, volume, kind, plex, details")
    e.add_argument("--new", action="store_true",
                   help="skip the recent events the daemon kept (up to 100 since it started)")


def run_events_command(args: argparse.Namespace, client: Any) -> int:
    def show(p: dict[str, Any]) -> None:
        if p.get("following"):
            # Said on stderr, so that scripts (and tests) know from when on
            # nothing is missed.
            print("vmd events: following (Ctrl-C to stop)", file=sys.stderr, flush=True)
            return
        ev = p["event"]
        print(json.dumps(ev) if args.json else format_event(ev), flush=True)

    try:
        client.request({"cmd": "events", "new": args.new}, show)
    except VmdError as e:
        if "closed the connection" not in str(e):
            raise
        # Non-zero: a script following events must see that they ended.
        print("vmd events: the daemon stopped", file=sys.stderr)
        return EXIT_NO_DAEMON
    return EXIT_OK
