"""The `verify` admin verb (over verify.py), and each volume's last verify
result (and a running one's progress) in `status`."""

from __future__ import annotations

from typing import Any

import outcome
import trio

from .commands import PROGRESS_SECONDS, CommandTable, req_str
from .errors import VmdError
from .manager import VolumeManager
from .verify import Verify


def register(table: CommandTable, m: VolumeManager) -> None:
    running: dict[str, Verify] = {}
    volume_status = table["status"]

    async def status_with_verify(req: dict[str, Any], progress: Any) -> dict[str, Any]:
        reply = await volume_status(req, progress)
        for v in reply["volumes"]:
            vol = m.volumes.get(v["name"])
            last = vol.state.extra.get("verify") if vol is not None else None
            if last is not None:
                v["verify"] = last
            if v["name"] in running:
                v["verify_running"] = running[v["name"]].status()
        return reply

    async def verify(req: dict[str, Any], progress: Any) -> dict[str, Any]:
        vol = m.get(req_str(req, "volume"))
        source = req.get("from")
        if source is not None:
            source = req_str(req, "from")
        if vol.name in running:
            raise VmdError(f"a verify of volume {vol.name} is already running (`vmd status "
                           f"{vol.name}` shows its progress)")
        job = Verify(vol, repair=bool(req.get("repair")), source=source, slots=m.slots)
        running[vol.name] = job
        result: outcome.Outcome[dict[str, Any]] | None = None
        try:
            async with trio.open_nursery() as nursery:

                async def work() -> None:
                    nonlocal result
                    result = await outcome.acapture(job.run)
                    nursery.cancel_scope.cancel()

                async def report() -> None:
                    try:
                        while True:
                            await progress({"volume": vol.name, **job.status()})
                            await trio.sleep(PROGRESS_SECONDS)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
                        job.stop()  # the client went away (Ctrl-C): so does the verify

                nursery.start_soon(work)
                nursery.start_soon(report)
        finally:
            running.pop(vol.name, None)
        if result is None:
            raise VmdError(f"the verify of volume {vol.name} was interrupted")
        reply = result.unwrap()
        if reply["repaired_bytes"]:
            # The kernel may cache the volume file's old bytes.
            await trio.to_thread.run_sync(m.on_changed, vol.name)
        return {"verify": reply}

    table.update({"status": status_with_verify, "verify": verify})
