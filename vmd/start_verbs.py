"""The admin verb `start`: bring up one volume the running daemon refused at
its start (or one added to the config since), the way the daemon's start
would have, while the other volumes keep serving (md's `--assemble` of one
array, LVM's `lvchange -ay` of one volume)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import trio

from . import samefile
from .commands import CommandTable, req_str
from .config import (VolumeConfig, VolumeRefused, check_volume_environment, load_config,
                     shared_in_config)
from .errors import VmdError
from .manager import VolumeManager, snapshot_config, snapshot_gone
from .resize import adopt_logged_sizes



class _NoChange(VmdError):
    """Nothing to start from (the config does not load, or lacks the volume):
    nothing is changed."""


def _read_block(m: VolumeManager, name: str) -> tuple[VolumeConfig | None, list[str]]:
    """The volume's block of the config as the file says now (the
    administrator may have fixed it), after the start's checks against the
    disk (None: not in it), and the volumes the file lists. Raises _NoChange,
    or as the start would refuse the volume (ConfigError). Blocking: in a
    thread."""
    try:
        cfg = load_config(m.cfg.path)
    except VmdError as e:
        raise _NoChange(f"the config does not load, so nothing was changed: {e}") from None
    if name not in cfg.volumes:
        return None, list(cfg.volumes)
    # The start's checks, on this volume alone (a sidecar log's larger size wins).
    one = dataclasses.replace(cfg, volumes={name: cfg.volumes[name]})
    grown = adopt_logged_sizes(one)
    vc = one.volumes[name]
    shared = shared_in_config(cfg).get(name)  # with a volume refused, or not started yet
    if shared is not None:
        raise VolumeRefused(shared)
    check_volume_environment(cfg.path, vc, grown.get(name))
    return vc, list(cfg.volumes)


def _snapshot_block(m: VolumeManager, name: str) -> VolumeConfig | None:
    """A snapshot volume broken off a serving volume (refused on its own, or
    because a config volume had its name) is opened as the start opens it."""
    for origin in list(m.volumes.values()):
        info = origin.state.extra.get("snapshots", {}).get(name)
        if info is not None and "snapshot" not in origin.state.extra:
            gone = snapshot_gone(origin, name, info)
            if gone is not None:
                raise VmdError(gone)
            return snapshot_config(origin, name, info)
    return None


def register(table: CommandTable, m: VolumeManager, stopping: Callable[[], bool]) -> None:
    lock = trio.Lock()  # one start at a time: each sees the others' result

    async def start(req: dict[str, Any], progress: Any) -> dict[str, Any]:
        name = req_str(req, "volume")
        recover_from = req.get("recover_from")
        if recover_from is not None:
            recover_from = req_str(req, "recover_from")
        async with lock:
            if stopping():
                raise VmdError("the daemon is stopping")
            if name in m.volumes:
                raise VmdError(f"volume {name} is already serving ({m.cfg.mountpoint / name}); "
                               f"`vmd start` brings up a volume the daemon refused (`vmd status` "
                               f"shows it as REFUSED)")
            was = "still " if name in m.refused else ""
            try:
                vc, listed = await trio.to_thread.run_sync(_read_block, m, name)
                vc = vc or _snapshot_block(m, name)
                if vc is None:
                    what = ("was refused at start and" if was else
                            "is neither served nor refused, and it")
                    raise _NoChange(
                        f"volume {name} {what} is not in {m.cfg.path} (volumes there now: "
                        f"{', '.join(listed)}), nor a snapshot of a volume that serves (a "
                        f"snapshot volume comes up with the volume it was taken of)")
                if req.get("force_degraded") and vc.layout != "raid5":
                    raise _NoChange(f"--force-degraded applies to RAID-5 volumes only; volume "
                                    f"{name} is a {vc.layout}, so nothing was changed")
                # A snapshot's files are vmd's own (its origin records its image).
                used = samefile.config_in_use(m.volumes.values(), vc) if name in listed else None
                if used is not None:
                    raise VmdError(used)
            except _NoChange:
                raise
            except VmdError as e:
                m.refuse(name, str(e))
                raise VmdError(f"volume {name} is {was}refused: {e}") from None
            try:
                started = await m.start_one(vc, recover_all=bool(req.get("recover_all")),
                                            recover_from=recover_from,
                                            force_degraded=bool(req.get("force_degraded")))
            except VmdError as e:
                raise VmdError(f"volume {name} is {was}refused: {e}") from None
            for n in started:
                await trio.to_thread.run_sync(m.on_shown, n)
        return {"started": started, "mountpoint": str(m.cfg.mountpoint)}

    table["start"] = start
