"""The admin verb `resize` (online grow), over resize.py."""

from __future__ import annotations

import contextlib
import os
from typing import Any

import trio

from .commands import CommandTable, req_str
from .manager import VolumeManager
from .resize import grow, parse_new_size


def register(table: CommandTable, m: VolumeManager) -> None:

    def show_new_size(name: str) -> None:
        """Make the kernel take the volume file's new size now, not after its
        attribute timeout: drop its cached attributes, then stat the file,
        which refreshes the size a loop device reads at `losetup -c`.
        Blocks on a FUSE request: run in a thread."""
        m.on_changed(name)
        with contextlib.suppress(OSError):  # not mounted (the engine alone)
            os.stat(m.cfg.mountpoint / name)

    async def resize(req: dict[str, Any], progress: Any) -> dict[str, Any]:
        vol = m.get(req_str(req, "volume"))
        reply = await grow(vol, parse_new_size(req.get("size"), vol))
        if reply["grown"]:
            await trio.to_thread.run_sync(show_new_size, vol.name)
        return reply

    table["resize"] = resize
