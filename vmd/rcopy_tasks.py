"""Remote Copy's background tasks, in the daemon's one shape (vmd/tasks.py):
the periodic sender of each link, and the jobs admin verbs start on demand:
an update (`rcopy sync`, `rcopy reverse`) and the receiving of one stream
(`rcopy receive`). They all run in Remote Copy's task group, which the daemon
stops first at `vmd stop`: a transfer cut off there rolls back (receiver) or
is retried by the next update (sender) before the volumes close."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import trio

from . import rcopy_recv
from .errors import VmdError
from .rcopy import Link
from .tasks import Job, Task
from .volume import Volume

if TYPE_CHECKING:
    from .manager import VolumeManager


class Sender(Task):
    """A source volume's periodic updates: one every `period` (none with 0);
    a paused link skips its turn; a failed update is logged by the link and
    its regions go with the next one."""

    def __init__(self, link: Link):
        super().__init__()
        self.link = link
        self.name = f"rcopy-{link.vol.name}"

    async def main(self, task_status: Any) -> None:
        link = self.link
        period = link.cfg.period
        task_status.started()
        while True:
            await trio.sleep(period if period > 0 else math.inf)
            if link.ext.get("paused"):
                continue
            try:
                await link.update("periodic")
            except VmdError:
                pass  # logged; retried next period


class Update(Job[dict[str, Any]]):
    """One update run on demand; its reply is the verb's."""

    def __init__(self, link: Link, why: str):
        super().__init__()
        self.link = link
        self.why = why
        self.name = f"rcopy-{why}-{link.vol.name}"

    async def work(self) -> dict[str, Any]:
        return await self.link.update(self.why)


class Receive(Job[dict[str, Any]]):
    """Applying one update stream to a volume. It owns the stream's two file
    descriptors from the moment it is made: `rcopy_recv.receive` closes them."""

    def __init__(self, m: "VolumeManager", vol: Volume, rfd: int, wfd: int,
                 active: set[str], source: Link | None):
        super().__init__()
        self.args = (m, vol, rfd, wfd, active, source)
        self.name = f"rcopy-receive-{vol.name}"

    async def work(self) -> dict[str, Any]:
        return await rcopy_recv.receive(*self.args)
