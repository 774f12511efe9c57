"""The `verify` admin verb (over verify.py), the task group its verifies run
in, and each volume's last verify result (and a running one's progress) in
`status`."""

from __future__ import annotations

from typing import Any

import trio

from . import rcopy_recv
from .commands import PROGRESS_SECONDS, CommandTable, req_str
from .errors import VmdError
from .manager import VolumeManager
from .raid5 import Raid5Volume
from .raid5_verify import Raid5Verify
from .tasks import TaskGroup
from .verify import Verify, previous_result


class Verifies(TaskGroup):
    """The daemon's running verifies (one per volume at most): a task group the
    daemon starts and stops (first at `vmd stop`: no verify reads a volume
    that is closing)."""

    def __init__(self) -> None:
        super().__init__("verify")
        self.running: dict[str, Verify] = {}


def register(table: CommandTable, m: VolumeManager) -> Verifies:
    """Add the `verify` verb (and the verify results to `status`); the daemon
    starts and stops the returned task group."""
    group = Verifies()
    running = group.running
    volume_status = table["status"]

    async def status_with_verify(req: dict[str, Any], progress: Any) -> dict[str, Any]:
        reply = await volume_status(req, progress)
        for v in reply["volumes"]:
            vol = m.volumes.get(v["name"])
            last = vol.state.extra.get("verify") if vol is not None else None
            if v["name"] in running:  # its start is in the log: show the one before
                last = previous_result(last)
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
        group.refuse_if_stopping()
        target = rcopy_recv.target_info(vol)
        if req.get("repair") and target is not None and not target.get("promoted"):
            # Its bytes are its source's (as of the last update): a repair would
            # make it hold bytes the source never sent.
            raise VmdError(
                f"volume {vol.name} is the remote copy target of volume "
                f"{target.get('source')}: its bytes belong to its source, and --repair would "
                f"write bytes that no update sent. `vmd verify {vol.name}` without --repair "
                f"checks it; if its plexes differ, replace the wrong one (`vmd plex remove "
                f"{vol.name} P`, then `vmd plex add {vol.name} PATH` copies it whole from the "
                f"others), or repair the source on its host (the next update sends the repair)")
        # A RAID-5 volume's columns are no copies of each other: its parity is checked.
        kind = Raid5Verify if isinstance(vol, Raid5Volume) else Verify
        job = kind(vol, repair=bool(req.get("repair")), source=source, slots=m.slots)
        running[vol.name] = job
        reply: dict[str, Any] | None = None
        error: Exception | None = None
        try:
            async with trio.open_nursery() as nursery:

                async def call() -> None:
                    nonlocal reply, error
                    try:
                        reply = await group.call(job)
                    except Exception as e:  # the verb's error, not its nursery's
                        error = e
                    nursery.cancel_scope.cancel()

                async def report() -> None:
                    try:
                        while True:
                            await progress({"volume": vol.name, **job.status()})
                            await trio.sleep(PROGRESS_SECONDS)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
                        # The client went away (Ctrl-C): cancelled, `call` takes
                        # the verify with it.
                        nursery.cancel_scope.cancel()

                nursery.start_soon(call)
                nursery.start_soon(report)
        finally:
            running.pop(vol.name, None)
        if error is not None:
            raise error
        if reply is None:
            raise VmdError(f"the verify of volume {vol.name} was interrupted")
        if reply["repaired_bytes"]:
            # The kernel may cache the volume file's old bytes.
            await trio.to_thread.run_sync(m.on_changed, vol.name)
        return {"verify": reply}

    table.update({"status": status_with_verify, "verify": verify})
    return group
