"""The `vmd` command: `vmd daemon` runs the daemon; every other subcommand
talks to it through the admin socket."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from .admin import AdminClient
from .config import format_size, load_config
from .errors import EXIT_OK, VmdError

DEFAULT_CONFIG = "config/vmd.yaml"
# `vmd --help`'s examples, one per verb (tests/test_docs.py parses each one).
EXAMPLES = """examples (the shipped config/vmd.yaml: volume vol0, plexes p0 and p1):
  vmd daemon -c config/vmd.yaml             # run in the foreground (make run)
  vmd status vol0 --json
  vmd wait vol0                             # until no resync runs
  vmd plex detach vol0 p1                   # then: vmd plex attach vol0 p1
  vmd plex attach vol0 p1
  vmd plex remove vol0 p1                   # a failed plex: remove it, add a new image
  vmd plex add vol0 /srv/disk2/vol0-p2.img
  vmd fastresync vol0 off
  vmd snap start vol0                       # then: vmd snap wait vol0
  vmd snap wait vol0
  vmd snap take vol0 nightly                # the volume file var/mnt/nightly
  vmd snap back nightly                     # --from-snapshot: restore vol0 from it
  vmd snap refresh nightly
  vmd snap clear nightly
  vmd snap abort vol0
  vmd rcopy status vol0
  vmd rcopy sync vol0
  vmd rcopy pause vol0
  vmd rcopy resume vol0
  vmd rcopy promote vol0                    # on the target host: failover
  vmd rcopy reverse vol0 --target 'ssh hostA vmd -c /etc/vmd/vmd.yaml rcopy receive vol0'
  vmd rcopy receive vol0                    # run by the sender's rcopy.target command
  vmd inspect-log var/vol0.log
  vmd stop
README.md lists every command; docs/operations.md has the procedures."""


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="vmd", description="Mirrored volumes over FUSE.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
    ap.add_argument("-c", "--config", default=os.environ.get("VMD_CONFIG", DEFAULT_CONFIG),
                    help="config file (default: $VMD_CONFIG or %(default)s)")
    ap.add_argument("--socket", help="admin socket (default: the one named in the config)")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("daemon", help="run the daemon in the foreground")
    d.add_argument("-c", "--config", dest="config_sub", help=argparse.SUPPRESS)
    d.add_argument("--recover-all", action="append", default=[], metavar="VOLUME",
                   help="rebuild VOLUME's sidecar log and resync every plex from the first one "
                        "(for a missing or damaged log); may be repeated")
    d.add_argument("--debug", action="store_true", help="debug logging")

    s = sub.add_parser("status", help="show volumes and plexes")
    s.add_argument("volume", nargs="?")
    s.add_argument("--json", action="store_true", help="one JSON object {\"volumes\": [...]}")

    st = sub.add_parser("stop", help="stop the daemon (refused while a volume is open)")
    st.add_argument("--force", action="store_true", help="stop even if volumes are open")

    p = sub.add_parser("plex", help="detach, attach, add or remove a plex")
    psub = p.add_subparsers(dest="plex_cmd", required=True, metavar="ACTION")
    for action, what in (("detach", "PLEX"), ("attach", "PLEX"), ("remove", "PLEX"), ("add", "PATH")):
        pp = psub.add_parser(action, help=f"{action} a plex")
        pp.add_argument("volume")
        pp.add_argument(what.lower(), metavar=what)

    w = sub.add_parser("wait", help="wait until no resync runs on VOLUME")
    w.add_argument("volume")

    f = sub.add_parser("fastresync", help="turn FastResync on or off for VOLUME")
    f.add_argument("volume")
    f.add_argument("state", choices=["on", "off"])

    il = sub.add_parser("inspect-log", help="print what a sidecar log says (offline)")
    il.add_argument("path")

    from .snapshot_cli import add_snapshot_parsers  # noqa: PLC0415

    add_snapshot_parsers(sub)
    from .rcopy_cli import add_rcopy_parsers  # noqa: PLC0415

    add_rcopy_parsers(sub)
    return ap


def _setup_logging(debug: bool) -> None:
    if os.environ.get("JOURNAL_STREAM"):
        # journald reads "<priority>" prefixes and adds its own timestamps.
        fmt = "<%(levelno_syslog)s>%(name)s: %(message)s"
    else:
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_SyslogFormatter(fmt))
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, handlers=[handler])
    if not debug:
        logging.getLogger("pyfuse3").setLevel(logging.WARNING)


class _SyslogFormatter(logging.Formatter):
    _PRIO = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}

    def format(self, record: logging.LogRecord) -> str:
        record.levelno_syslog = self._PRIO.get(record.levelno, 6)
        return super().format(record)


def _progress_printer(label: str) -> Any:
    tty = sys.stderr.isatty()

    def show(p: dict[str, Any]) -> None:
        if not tty:
            return
        total = p.get("total_bytes") or 0
        done = p.get("done_bytes") or 0
        pct = 100.0 * done / total if total else 0.0
        sys.stderr.write(f"\r{label}: {format_size(done)} / {format_size(total)} ({pct:5.1f}%)  ")
        sys.stderr.flush()

    return show


def _print_status(reply: dict[str, Any]) -> None:
    for v in reply["volumes"]:
        rs = v["resync"]
        state = "clean" if v["clean"] else "dirty"
        print(f"volume {v['name']}  {format_size(v['size'])}  {state}  "
              f"fastresync {'on' if v['fastresync'] else 'off'}  drl {'on' if v['drl'] else 'off'}"
              f"{'  open' if v.get('open') else ''}")
        if rs["running"]:
            pct = 100.0 * rs["done_bytes"] / rs["total_bytes"] if rs["total_bytes"] else 100.0
            print(f"  resync: {format_size(rs['done_bytes'])} / {format_size(rs['total_bytes'])} "
                  f"({pct:.1f}%) to {', '.join(rs['targets'])}")
        elif rs["copied_bytes"]:
            print(f"  last resync: {format_size(rs['copied_bytes'])} in {rs['seconds']} s")
        if "snapshot" in v:
            s = v["snapshot"]
            print(f"  snapshot of {s.get('of')} taken {s.get('taken')}")
        if "rcopy" in v:
            from .rcopy_cli import describe  # noqa: PLC0415

            print(f"  remote copy {describe(v['rcopy'])}")
        print(f"  {'PLEX':<6} {'STATE':<9} {'MISSING':>9}  PATH")
        for p in v["plexes"]:
            miss = format_size(p["missing_bytes"]) if p["missing_bytes"] else "-"
            why = f"  ({p['reason']})" if p.get("reason") and p["state"] != "ACTIVE" else ""
            print(f"  {p['name']:<6} {p['state']:<9} {miss:>9}  {p['path']}{why}")
    for r in reply.get("refused", []):
        print(f"volume {r['name']}  REFUSED: {r['error']}")


def _inspect_log(path: str) -> int:
    from .sidecar import read_log

    replay, end, seq = read_log(Path(path))
    st = replay.state
    print(json.dumps({
        "name": st.name, "uuid": st.uuid, "size": st.size, "clean": st.clean,
        "region_size": st.region_size, "fastresync_region": st.fmr_region,
        "dirty_regions": st.drl.count(), "records": replay.records, "last_seq": seq,
        "torn_bytes": replay.torn_bytes, "fastresync": st.fastresync,
        "plexes": [{"name": p.name, "path": p.path, "state": p.state,
                    "missing_bytes": None if p.missing is None else p.missing.bytes_covered()}
                   for p in st.plexes],
    }, indent=2))
    return EXIT_OK


def _nonempty(value: str) -> str:
    if not value:
        raise argparse.ArgumentTypeError("must not be empty")
    return value


def _refuse_empty_strings(parser: argparse.ArgumentParser) -> None:
    """Every string argument of every subcommand must be non-empty, so that
    `vmd snap take vol0 ""` is a usage error naming the argument as the usage
    line shows it, not a request the daemon turns down in its own terms."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                _refuse_empty_strings(sub)
        elif (type(action) is argparse._StoreAction and action.type is None
              and action.choices is None and action.nargs in (None, "?")):
            action.type = _nonempty


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    _refuse_empty_strings(parser)
    args = parser.parse_args(argv)
    try:
        code = _run(args)
        sys.stdout.flush()  # here, so that a closed pipe is caught below
        return code
    except BrokenPipeError:
        # The reader went away (`vmd status | head -1`): stop quietly, as a
        # command killed by SIGPIPE would. Point stdout at /dev/null so that
        # the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except VmdError as e:
        print(f"vmd: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace) -> int:
    if args.command == "inspect-log":
        return _inspect_log(args.path)
    cfg_path = getattr(args, "config_sub", None) or args.config
    if args.command == "daemon":
        from .daemon import serve  # pyfuse3 only where it is needed

        _setup_logging(args.debug)
        cfg = load_config(cfg_path)
        unknown = [v for v in args.recover_all if v not in cfg.volumes]
        if unknown:
            raise VmdError(f"--recover-all: no volume {unknown[0]!r} in {cfg.path}")
        serve(cfg, set(args.recover_all))
        return EXIT_OK

    sock = Path(args.socket) if args.socket else load_config(cfg_path).socket
    client = AdminClient(sock, timeout=None if args.command in ("wait", "snap") else 120.0)
    if args.command == "status":
        reply = client.request({"cmd": "status", "volume": args.volume})
        if args.json:
            reply.pop("ok", None)
            print(json.dumps(reply, indent=2))
        else:
            _print_status(reply)
    elif args.command == "stop":
        client.request({"cmd": "stop", "force": args.force})
        _wait_gone(sock)
        print("vmd stopped")
    elif args.command == "plex":
        arg = "path" if args.plex_cmd == "add" else "plex"
        value = os.path.abspath(args.path) if arg == "path" else args.plex
        reply = client.request({"cmd": f"plex.{args.plex_cmd}", "volume": args.volume, arg: value})
        if "plex" in reply:
            p = reply["plex"]
            extra = f" (full resync: {reply['why']})" if reply.get("why") else ""
            print(f"{args.volume}: plex {p['name']} is {p['state']}{extra}")
        else:
            print(f"{args.volume}: plex {reply['removed']} removed (image {reply['path']} kept)")
    elif args.command == "wait":
        reply = client.request({"cmd": "wait", "volume": args.volume},
                               _progress_printer(f"{args.volume} resync"))
        if sys.stderr.isatty():
            sys.stderr.write("\n")
        rs = reply["resync"]
        print(f"{args.volume}: in sync (last resync copied {format_size(rs['copied_bytes'])})")
    elif args.command == "fastresync":
        client.request({"cmd": "fastresync", "volume": args.volume, "on": args.state == "on"})
        print(f"{args.volume}: FastResync {args.state}")
    elif args.command == "rcopy":
        from .rcopy_cli import run_rcopy_command  # noqa: PLC0415

        return run_rcopy_command(args, client)
    else:
        from .snapshot_cli import run_snapshot_command  # noqa: PLC0415

        return run_snapshot_command(args, client, _progress_printer)
    return EXIT_OK


def _wait_gone(sock: Path, timeout: float = 120.0) -> None:
    """`stop` returns once the daemon has let go of its socket."""
    deadline = time.monotonic() + timeout
    while sock.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    if sock.exists():
        raise VmdError(f"the daemon accepted stop but still holds {sock} after {timeout:.0f} s")


if __name__ == "__main__":
    raise SystemExit(main())
