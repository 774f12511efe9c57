"""Admin verbs of break-off snapshots (`vmd snap ...`), over snapshot.py."""

from __future__ import annotations

from typing import Any

from .commands import CommandTable, new_image_path, req_str
from .manager import VolumeManager
from .snapshot import (snap_abort, snap_back, snap_clear, snap_remove, snap_start, snap_take,
                       snap_wait)
from .volume import Volume


def register(table: CommandTable, m: VolumeManager) -> None:

    def vol(req: dict[str, Any]) -> Volume:
        return m.get(req_str(req, "volume"))

    def name(req: dict[str, Any]) -> str:
        return req_str(req, "name")

    async def start(req: dict[str, Any], progress: Any) -> dict[str, Any]:
        path = req.get("path")
        if path is not None:
            path = new_image_path(m, path, f"snap start {req_str(req, 'volume')}")
        return {"plex": await snap_start(vol(req), path)}

    async def wait(req: dict[str, Any], progress: Any) -> dict[str, Any]:
        return {"plex": await snap_wait(vol(req), progress)}

    async def take(req: dict[str, Any], progress: Any) -> dict[str, Any]:
        return await snap_take(m, vol(req), name(req))

    async def back(req: dict[str, Any], progress: Any) -> dict[str, Any]:
        return await snap_back(m, name(req), from_snapshot=bool(req.get("from_snapshot")),
                               force=bool(req.get("force")))

    async def refresh(req: dict[str, Any], progress: Any) -> dict[str, Any]:
        n = name(req)
        origin = m.get(m.get(n).state.extra.get("snapshot", {}).get("of", n))
        back_reply = await snap_back(m, n, force=bool(req.get("force")))
        await snap_wait(origin, progress)
        return {**await snap_take(m, origin, n), "copied_bytes": back_reply["copy_bytes"]}

    async def clear(req: dict[str, Any], progress: Any) -> dict[str, Any]:
        return await snap_clear(m, name(req))

    async def remove(req: dict[str, Any], progress: Any) -> dict[str, Any]:
        return await snap_remove(m, name(req))

    async def abort(req: dict[str, Any], progress: Any) -> dict[str, Any]:
        return await snap_abort(vol(req))

    table.update({"snap.start": start, "snap.wait": wait, "snap.take": take,
                  "snap.back": back, "snap.refresh": refresh, "snap.clear": clear,
                  "snap.remove": remove, "snap.abort": abort})
