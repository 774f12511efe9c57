"""CLI for `vmd snap …` (filled in with the snapshot engine)."""

from __future__ import annotations

import argparse
from typing import Any


def add_snapshot_parsers(sub: Any) -> None:
    pass


def run_snapshot_command(args: argparse.Namespace, client: Any, progress: Any) -> int:
    raise NotImplementedError(args.command)
