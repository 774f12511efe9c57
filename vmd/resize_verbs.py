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

    def show_new_size(name: str, size: int) -> int | None:
        """Make the kernel take the volume file's new size now, not after its
        attribute timeout: drop its cached attributes, then stat the file,
        which refreshes the size a loop device reads at `losetup -c`.
        Returns the size the kernel now reports (None: not mounted). Blocks
        on a FUSE request: run in a thread."""
        m.on_changed(name)
        path = m.cfg.mountpoint / name
        try:
            seen = os.stat(path).st_size
            if seen < size:
                # A writeback_cache mount keeps its own size of a volume file
                # and ignores the one vmd reports; only a truncate moves it
                # (the kernel takes the size of its own SETATTR, which vmd
                # accepts because it is the volume's size already). The
                # kernel writes back its dirty pages of the file first.
                os.truncate(path, size)
                seen = os.stat(path).st_size
            return seen
        except OSError:
            return None  # not mounted (the engine alone)

    async def resize(req: dict[str, Any], progress: Any) -> dict[str, Any]:
        vol = m.get(req_str(req, "volume"))
        reply = await grow(vol, parse_new_size(req.get("size"), vol))
        if reply["grown"]:
            reply["kernel_size"] = await trio.to_thread.run_sync(show_new_size, vol.name,
                                                                 reply["size"])
            if reply["kernel_size"] not in (None, reply["size"]):
                reply["kernel_note"] = (
                    f"the kernel still reports {reply['kernel_size']} bytes for "
                    f"{m.cfg.mountpoint / vol.name}; it sees the new size once the daemon "
                    f"restarts (the grow itself is done and durable)")
                log.warning("volume %s: %s", vol.name, reply["kernel_note"])
        return reply

    table["resize"] = resize
