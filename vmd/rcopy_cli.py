"""`vmd rcopy ...` on the command line: its parsers, and the text of its replies."""

from __future__ import annotations

import json
import shlex
import sys
import time
from typing import Any

from .cli_help import VOLUME_HELP, Example, add_verb
from .config import format_size


_TO_OLD_PRIMARY = "ssh hostA vmd -c /etc/vmd/vmd.yaml rcopy receive vol0"
# (action, summary, examples) of `vmd rcopy ACTION VOLUME`.
_ACTIONS: tuple[tuple[str, str, tuple[Example, ...]], ...] = (
    ("status", "show the last consistent point, bytes sent, lag",
     ("vmd rcopy status vol0", "vmd rcopy status vol0 --json")),
    ("sync", "run an update now and wait for it", ("vmd rcopy sync vol0",)),
    ("pause", "stop periodic updates", ("vmd rcopy pause vol0",)),
    ("resume", "restart them", ("vmd rcopy resume vol0",)),
    ("receive", "receive an update stream on stdin (the link command)",
     (("vmd rcopy receive vol0", "run by the sender's rcopy.target command"),)),
    ("promote", "make a target volume writable (failover)",
     (("vmd rcopy promote vol0", "on the target host: failover"),)),
    ("reverse", "on a promoted target: send its changes back to the old primary, which "
                "becomes its target (return)",
     (f"vmd rcopy reverse vol0 --target '{_TO_OLD_PRIMARY}'",
      ("vmd rcopy reverse vol0 --period 1h", "to the volume's configured target"))),
)


def add_rcopy_parsers(sub: Any) -> None:
    r = add_verb(sub, "rcopy", "remote copy (asynchronous periodic replication)")
    rs = r.add_subparsers(dest="rcopy_cmd", required=True, metavar="ACTION")
    for action, what, examples in _ACTIONS:
        p = add_verb(rs, action, what, examples)
        p.add_argument("volume", help=VOLUME_HELP)
        if action == "status":
            p.add_argument("--json", action="store_true", help="the status as one JSON object")
        if action == "reverse":
            p.add_argument("--target", metavar="COMMAND",
                           help=f"the command that reaches the old primary, e.g. "
                                f"'{_TO_OLD_PRIMARY}' (kept in the log as this volume's link; "
                                f"default: the volume's configured target)")
            p.add_argument("--period", metavar="TIME",
                           help="period of the later updates, e.g. 30s, 5min, 1h (default 5min)")


def describe(r: dict[str, Any]) -> str:
    """One line of `vmd status` for a volume's remote copy role (Engine.summary)."""
    if r["role"] == "source":
        return (f"source, consistent point {r['sequence']} on the target; target: "
                f"{r['target']}{'  PAUSED' if r['paused'] else ''}")
    state = ("PROMOTED (writable, takes no updates)" if r["promoted"] else
             "syncing (an update is being applied)" if r["syncing"] else "read-only")
    return f"target of {r['source']}, consistent point {r['sequence']}, {state}"


def run_rcopy_command(args: Any, client: Any) -> int:
    c = args.rcopy_cmd
    req: dict[str, Any] = {"cmd": f"rcopy.{c}", "volume": args.volume}
    if c == "reverse":
        if args.target is not None:
            req["target"] = shlex.split(args.target)
        if args.period is not None:
            req["period"] = args.period
    if c == "receive":
        # The stream is our stdin/stdout; the daemon reads and answers them itself.
        client.bound = "connect"
        reply = client.request(req, fds=[sys.stdin.fileno(), sys.stdout.fileno()])
        print(f"{args.volume}: update {reply['seq']} committed ({format_size(reply['bytes'])})",
              file=sys.stderr)
        return 0
    if c in ("sync", "reverse"):
        client.bound = "connect"
    reply = client.request(req)
    reply.pop("ok", None)
    if c == "status":
        s = reply["rcopy"]
        if args.json:
            print(json.dumps(s, indent=2))
            return 0
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["time"])) if s.get("time") \
            else "never"
        print(f"{s['volume']}: remote copy {s['role']}, consistent point {s['sequence']} "
              f"({when})" + (f", lag {s['lag_seconds']:.0f} s" if s.get("lag_seconds") else ""))
        if s["role"] == "source":
            print(f"  target: {s['target']}  period {s['period']:.0f} s"
                  f"{'  PAUSED' if s['paused'] else ''}  {s['state']}")
            print(f"  changed since: {format_size(s['pending_bytes'] or 0)}  sent in all: "
                  f"{format_size(s['bytes_sent_total'])}")
            if s.get("next_full"):
                print(f"  a full update is pending: {s['next_full_why']}")
            last = s.get("last_update") or {}
            if last.get("error"):
                print(f"  last update {last['seq']} failed: {last['error']}")
        elif s.get("syncing"):
            print("  syncing: an update is being applied (reads refused)")
    elif c == "sync":
        print(f"{args.volume}: update {reply['seq']} committed: {format_size(reply['sent_bytes'])}"
              f" sent in {reply['seconds']:.2f} s" + (" (full)" if reply["full"] else "")
              + (f"; {format_size(reply['zero_bytes'])} of holes sent as zero ranges"
                 if reply.get("zero_bytes") else ""))
    elif c in ("pause", "resume"):
        print(f"{args.volume}: remote copy {'paused' if reply['paused'] else 'resumed'}")
    elif c == "reverse":
        print(f"{args.volume}: reverse {reply['seq']} committed: {format_size(reply['sent_bytes'])}"
              f" sent of {format_size(reply['size'])} in {reply['seconds']:.2f} s; "
              f"{format_size(reply['overwritten_bytes'])} of the old primary's unsent changes "
              f"overwritten; this volume is now the remote copy source")
    elif c == "promote":
        print(f"{args.volume}: promoted at consistent point {reply['sequence']}")
    return 0
