"""CLI for `vmd resize`."""

from __future__ import annotations

import argparse
from typing import Any

from .cli_help import VOLUME_HELP, add_verb
from .config import format_size
from .errors import EXIT_OK


def add_resize_parser(sub: Any) -> None:
    r = add_verb(sub, "resize", "grow VOLUME to SIZE while it serves (never shrinks)", (
        ("vmd resize vol0 2GiB", "then: losetup -c /dev/loopN; resize2fs /dev/loopN"),
        ("vmd resize vol0 3000MB", "SI units are powers of 1000, as in the config")))
    r.add_argument("volume", help=VOLUME_HELP)
    r.add_argument("size", metavar="SIZE",
                   help="the new size, as the config's `size:` reads it (e.g. 2GiB, 4096MiB, "
                        "bytes); a multiple of 512, not below the current size")


def run_resize_command(args: argparse.Namespace, client: Any) -> int:
    reply = client.request({"cmd": "resize", "volume": args.volume, "size": args.size})
    if not reply["grown"]:
        print(f"{args.volume}: already {format_size(reply['size'])} ({reply['size']} bytes)")
        return EXIT_OK
    # Both in bytes too: format_size rounds, so 1.5GiB + 4KiB reads "1.5GiB" (trial 10, T-J).
    print(f"{args.volume}: grown from {format_size(reply['old_size'])} ({reply['old_size']} "
          f"bytes) to {format_size(reply['size'])} ({reply['size']} bytes)")
    if reply["not_extended"]:
        print(f"  images not extended (see `vmd status`): {', '.join(reply['not_extended'])}")
    if reply.get("kernel_note"):
        print(f"  note: {reply['kernel_note']}")
    print("  next: `losetup -c DEVICE` on a loop device over it, then grow the filesystem "
          "(e.g. resize2fs DEVICE)")
    return EXIT_OK
