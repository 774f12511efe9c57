"""Remote Copy in the daemon: the links it runs (one per source volume), the
updates it receives, and the `rcopy.*` admin verbs over them."""

from __future__ import annotations

import logging
import time
from typing import Any

from . import rcopy_recv
from .admin import PASSED_FDS
from .commands import CommandTable, req_str
from .config import RcopyConfig, parse_duration
from .errors import VmdError
from .manager import VolumeManager
from .rcopy import Link, add_tracker, drop_tracker, tracker
from .rcopy_tasks import Receive, Sender, Update
from .tasks import TaskGroup
from .volume import Volume

log = logging.getLogger(__name__)


class Engine(TaskGroup):
    """Remote Copy in the daemon: a task group of the links' senders and of the
    updates and receivers the verbs start. Started, it has rolled back the
    updates a crash left unfinished and runs a sender per source volume."""

    def __init__(self, manager: VolumeManager):
        super().__init__("remote copy")
        self.manager = manager
        self.links: dict[str, Link] = {}
        self.receiving: set[str] = set()

    @staticmethod
    def link_config(vol: Volume) -> RcopyConfig | None:
        """The volume's role from its sidecar log first: a target (promoted or not)
        is no source; a source from a reverse has its link in the log."""
        if rcopy_recv.target_info(vol) is not None:
            return None
        ext = vol.state.extra.get("rcopy") or {}
        if ext.get("target"):
            return RcopyConfig(target=tuple(ext["target"]), period=float(ext.get("period", 300)))
        return vol.cfg.rcopy

    async def add(self, link: Link) -> None:
        sender = Sender(link)
        # A reverse that committed here makes the volume a target: its sender ends.
        link.on_demoted = lambda: self.remove(link, sender)
        self.links[link.vol.name] = link
        await self.start(sender)

    def remove(self, link: Link, sender: Sender) -> None:
        if self.links.get(link.vol.name) is link:
            del self.links[link.vol.name]
        sender.cancel()  # not waited for: its update may be what demoted the link

    async def starting(self) -> None:
        m = self.manager
        for vol in list(m.volumes.values()):
            await rcopy_recv.startup(m, vol)
        for vol in list(m.volumes.values()):
            await self.start_volume(vol)
        # A volume `vmd start` brings up later gets the same.
        m.start_hooks.append(self.volume_started)

    async def volume_started(self, vol: Volume) -> None:
        """`vmd start` of one volume: what `starting` does for each."""
        self.refuse_if_stopping()
        await rcopy_recv.startup(self.manager, vol)
        await self.start_volume(vol)

    async def start_volume(self, vol: Volume) -> None:
        """A started volume's link (a source) or its target rules."""
        cfg = self.link_config(vol)
        info = rcopy_recv.target_info(vol)
        if cfg is not None:
            link = Link(vol, cfg)
            await link.setup()
            await self.add(link)
        elif info is not None:
            if vol.cfg.rcopy is not None:
                log.info("volume %s: a remote copy target of %s since a reverse: the "
                         "config's rcopy target is not used (`vmd rcopy promote` and "
                         "`vmd rcopy reverse` restore this direction)", vol.name,
                         info.get("source"))
            if not info.get("promoted") and tracker(vol) is not None:
                drop_tracker(vol)
                await vol.checkpoint()
            # promoted: the tracker holds its own changes since the promote
        elif tracker(vol) is not None:
            drop_tracker(vol)
            vol.state.extra.pop("rcopy", None)
            await vol.checkpoint()
            log.info("volume %s: no rcopy in the config any more: change map dropped",
                     vol.name)

    def link(self, name: str) -> Link:
        vol = self.manager.get(name)
        link = self.links.get(vol.name)
        if link is not None:
            return link
        info = rcopy_recv.target_info(vol)
        if info is None:
            raise VmdError(f"volume {name} has no remote copy (add `rcopy: {{target: COMMAND}}` "
                           f"to it in {self.manager.cfg.path})")
        src = f"volume {info.get('source')} ({info.get('source_uuid')})"
        if info.get("promoted"):
            raise VmdError(f"volume {vol.name} is a promoted remote copy target of {src}: it "
                           f"sends no updates until `vmd rcopy reverse {vol.name}` makes it the "
                           f"source")
        unused = (f"; its config's rcopy entry is not used until the original direction is "
                  f"restored (`vmd rcopy promote {vol.name}`, then `vmd rcopy reverse "
                  f"{vol.name}`)" if vol.cfg.rcopy is not None else "")
        raise VmdError(f"volume {vol.name} is the remote copy target of {src}"
                       f"{' since a reverse' if info.get('reversed') else ''}: it receives "
                       f"updates and sends none (run this on the source's host){unused}")

    def summary(self, vol: Volume) -> dict[str, Any] | None:
        """The volume's remote copy role for `vmd status` (None: it takes no part)."""
        link = self.links.get(vol.name)
        if link is not None:
            return {"role": "source", "sequence": int(link.ext.get("acked", 0)),
                    "target": " ".join(link.cfg.target), "paused": bool(link.ext.get("paused"))}
        info = rcopy_recv.target_info(vol)
        if info is None:
            return None
        return {"role": "target", "sequence": int(info.get("seq") or 0),
                "source": info.get("source"), "promoted": bool(info.get("promoted")),
                "syncing": rcopy_recv.syncing(vol)}


def register(table: CommandTable, m: VolumeManager) -> Engine:
    """Add the `rcopy.*` verbs (and the remote copy role to `status`); the
    daemon starts and stops the returned engine (a task group)."""
    eng = Engine(m)

    def name(req: dict[str, Any]) -> str:
        return req_str(req, "volume")

    volume_status = table["status"]

    async def status_with_role(req: dict[str, Any], progress: Any) -> dict[str, Any]:
        reply = await volume_status(req, progress)
        for v in reply["volumes"]:
            role = eng.summary(m.get(v["name"]))
            if role is not None:
                v["rcopy"] = role
        return reply

    async def status(req: dict[str, Any], progress: Any) -> dict[str, Any]:
        n = name(req)
        if n in eng.links:
            return {"rcopy": eng.links[n].status()}
        vol = m.get(n)
        info = rcopy_recv.target_info(vol)
        if info is None:
            raise VmdError(f"volume {n} takes no part in a remote copy")
        t = info.get("time")
        return {"rcopy": {"volume": n, "role": "target", "sequence": int(info.get("seq") or 0),
                          "time": t, "lag_seconds": None if t is None else time.time() - t,
                          "syncing": rcopy_recv.syncing(vol), "source": info.get("source"),
                          "promoted": bool(info.get("promoted"))}}

    async def sync(req: dict[str, Any], progress: Any) -> dict[str, Any]:
        link = eng.link(name(req))
        if link.ext.get("paused"):
            raise VmdError(f"remote copy of {link.vol.name} is paused: `vmd rcopy resume "
                           f"{link.vol.name}` first")
        return await eng.call(Update(link, "sync"))

    async def pause(req: dict[str, Any], progress: Any) -> dict[str, Any]:
        link = eng.link(name(req))
        link.ext["paused"] = True
        await link.vol.checkpoint()
        return {"paused": True}

    async def resume(req: dict[str, Any], progress: Any) -> dict[str, Any]:
        link = eng.link(name(req))
        link.ext["paused"] = False
        await link.vol.checkpoint()
        return {"paused": False}

    async def receive(req: dict[str, Any], progress: Any) -> dict[str, Any]:
        fds = req.get(PASSED_FDS) or []  # type: ignore[call-overload]
        if len(fds) != 2:
            raise VmdError("rcopy receive needs the stream's two file descriptors (use "
                           "`vmd rcopy receive VOLUME`)")
        vol = m.get(name(req))
        eng.refuse_if_stopping()  # before the fds are taken: the admin server closes them
        rfd, wfd = fds.pop(0), fds.pop(0)  # from here rcopy_recv.receive owns (closes) them
        return await eng.call(Receive(m, vol, rfd, wfd, eng.receiving, eng.links.get(vol.name)))

    async def promote(req: dict[str, Any], progress: Any) -> dict[str, Any]:
        vol = m.get(name(req))
        info = rcopy_recv.target_info(vol)
        if info is None:
            raise VmdError(f"volume {vol.name} is not a remote copy target")
        if vol.name in eng.receiving:
            raise VmdError(f"volume {vol.name} is receiving an update; try again when it ends")
        if not info.get("seq"):
            raise VmdError(f"volume {vol.name} holds no consistent point yet")
        async with vol.gate.hold():
            info["promoted"] = True
            if tracker(vol) is None:
                add_tracker(vol, full=False)  # B's own changes from this point on
            await vol.checkpoint()
            rcopy_recv.set_access(vol)
        log.info("volume %s: promoted: writable, consistent point %s", vol.name, info.get("seq"))
        return {"volume": vol.name, "sequence": info.get("seq"), "time": info.get("time")}

    async def reverse(req: dict[str, Any], progress: Any) -> dict[str, Any]:
        vol = m.get(name(req))
        target = req.get("target")
        if target is not None and (not isinstance(target, list) or not target
                                   or not all(isinstance(a, str) and a for a in target)):
            raise VmdError("reverse: --target must be a command")
        period = req.get("period")
        if period is not None:
            try:
                period = parse_duration(period)
            except (ValueError, TypeError) as e:
                raise VmdError(f"reverse: bad --period: {e}") from None
        link = eng.links.get(vol.name)
        if link is not None:
            if not link.ext.get("reverse"):
                raise VmdError(f"volume {vol.name} is already the remote copy source; "
                               f"`vmd rcopy reverse` runs on a promoted target")
            if target is not None or period is not None:  # a retry with another link
                if target is not None:
                    link.ext["target"] = target
                if period is not None:
                    link.ext["period"] = period
                link.cfg = RcopyConfig(target=tuple(target or link.cfg.target),
                                       period=link.cfg.period if period is None else period)
                await vol.checkpoint()
        else:
            info = rcopy_recv.target_info(vol)
            if info is None:
                raise VmdError(f"volume {vol.name} is not a remote copy target")
            if not info.get("promoted"):
                raise VmdError(f"volume {vol.name} is not promoted: `vmd rcopy promote "
                               f"{vol.name}` first")
            if not info.get("source_uuid") or not info.get("seq"):
                raise VmdError(f"volume {vol.name} does not know which volume it replicated")
            if target is None and vol.cfg.rcopy is None:
                raise VmdError(f"reverse: which command reaches {info.get('source')}? Give "
                               f"--target 'ssh HOST vmd -c CONFIG rcopy receive VOLUME'")
            seq = int(info["seq"])
            async with vol.gate.hold():
                ext: dict[str, Any] = {
                    "acked": seq, "next_seq": seq + 1, "time": info.get("time"),
                    "reverse": {"source": info.get("source"), "source_uuid": info["source_uuid"],
                                "seq": seq}}
                if target is not None:
                    ext["target"] = target
                    ext["period"] = 300.0 if period is None else period
                vol.state.extra["rcopy"] = ext
                del vol.state.extra["rcopy_target"]
                if tracker(vol) is None:
                    add_tracker(vol, full=True)
                    log.warning("volume %s: no change map since the promote: the reverse sends "
                                "the whole volume", vol.name)
                await vol.checkpoint()
                rcopy_recv.set_access(vol)
            cfg = eng.link_config(vol)
            assert cfg is not None
            if target is None and period is not None:
                cfg = RcopyConfig(target=cfg.target, period=period)
            link = Link(vol, cfg)
            await link.setup()
            await eng.add(link)
            log.info("volume %s: reversing: now the remote copy source to %s (%s)", vol.name,
                     info.get("source"), " ".join(cfg.target))
        return await eng.call(Update(link, "reverse"))

    table.update({"status": status_with_role, "rcopy.status": status, "rcopy.sync": sync,
                  "rcopy.pause": pause, "rcopy.resume": resume, "rcopy.receive": receive,
                  "rcopy.promote": promote, "rcopy.reverse": reverse})
    return eng
