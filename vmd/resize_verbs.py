"""The admin verb `resize` (online grow), over resize.py."""

from __future__ import annotations

import logging
import os
from typing import Any

import trio

from .commands import CommandTable, req_str
from .manager import VolumeManager
from .resize import grow, parse_new_size

log = logging.getLogger(__name__)


def register(table: CommandTable, m: VolumeManager) -> None:

    def show_new_size(name: str) -> int | None:
        """Make the kernel take the volume file's new size now, not after its
        attribute timeout: drop its cached attributes, then stat the file,
        which refreshes the size a loop device reads at `losetup -c`.
        Returns the size the kernel now reports (None: not mounted). On a
        `writeback_cache` mount the kernel keeps its own size of an open
        file and ignores vmd's. Blocks on a FUSE request: run in a thread."""
        m.on_changed(name)
        try:
            return os.stat(m.cfg.mountpoint / name).st_size
        except OSError:
            return None  # not mounted (the engine alone)

    async def resize(req: dict[str, Any], progress: Any) -> dict[str, Any]:
        vol = m.get(req_str(req, "volume"))
        reply = await grow(vol, parse_new_size(req.get("size"), vol))
        if reply["grown"]:
            reply["kernel_size"] = await trio.to_thread.run_sync(show_new_size, vol.name)
            if reply["kernel_size"] not in (None, reply["size"]):
                reply["kernel_note"] = (
                    f"the kernel still reports {reply['kernel_size']} bytes for "
                    f"{m.cfg.mountpoint / vol.name}: with writeback_cache: true it keeps its "
                    f"own size of a volume file and ignores vmd's; it sees the new size once "
                    f"the daemon restarts (the grow itself is done and durable)")
                log.warning("volume %s: %s", vol.name, reply["kernel_note"])
        return reply

    table["resize"] = resize
