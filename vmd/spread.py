"""Recoveries spread per disk: at most `resync.per_device` background jobs
(resyncs, rebuilds, verifies) at a time on any one underlying device.

Several volumes recovering at once from plexes on one disk make the disk seek
between them; each job runs slower than alone and together they finish no
sooner (VxVM spreads recoveries "to avoid stressing a specific disk or
controller"). A job names the devices its images are on (`devices_of`) and
waits its turn in `DeviceSlots.turn`; jobs are granted in the order they
asked, except that a job never waits for one that shares no device with it.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

import trio

from .plex import Plex

log = logging.getLogger(__name__)

def device_of(p: Plex) -> int | None:
    """The device an open plex's bytes live on: the filesystem's (st_dev) for
    an image file, the device itself (st_rdev) for a block device (every
    block device node shares devtmpfs's st_dev). None if it cannot say."""
    if p.fd < 0:
        return None
    try:
        st = os.fstat(p.fd)
    except OSError:
        return None
    return st.st_rdev if stat.S_ISBLK(st.st_mode) else st.st_dev


def devices_of(plexes: Iterable[Plex]) -> frozenset[int]:
    return frozenset(d for d in map(device_of, plexes) if d is not None)


def device_name(dev: int) -> str:
    return f"{os.major(dev)}:{os.minor(dev)}"


class _Job:
    __slots__ = ("devices", "label", "granted")

    def __init__(self, devices: frozenset[int], label: str):
        self.devices = devices
        self.label = label
        self.granted = trio.Event()


class DeviceSlots:
    """`per_device` jobs at a time per device; 0 means no limit."""

    def __init__(self, per_device: int = 1):
        self.per_device = per_device
        self._running: list[_Job] = []
        self._waiting: list[_Job] = []

    def _busy(self, dev: int) -> int:
        return sum(dev in j.devices for j in self._running)

    def _grant(self) -> None:
        """Start every waiting job whose devices all have a free slot, in
        order; a job keeps the devices it waits for from later jobs."""
        claimed: set[int] = set()
        for job in list(self._waiting):
            free = all(self._busy(d) < self.per_device for d in job.devices)
            if free and not (job.devices & claimed):
                self._waiting.remove(job)
                self._running.append(job)
                job.granted.set()
            else:
                claimed |= job.devices

    def waiting_for(self, devices: frozenset[int]) -> list[str]:
        """Labels of the running jobs that hold one of `devices` (status)."""
        return [j.label for j in self._running if j.devices & devices]

    def behind(self, job: _Job) -> list[str]:
        """What the waiting `job` waits behind now: the running jobs on its
        devices, else the jobs queued before it that share one."""
        if job not in self._waiting:
            return []  # granted (not yet out of its wait): behind nothing
        ahead = self._waiting[:self._waiting.index(job)]
        return self.waiting_for(job.devices) or [j.label for j in ahead
                                                  if j.devices & job.devices]

    @asynccontextmanager
    async def turn(self, devices: frozenset[int], label: str,
                   queued: "Queued | None" = None) -> AsyncIterator[None]:
        """Wait until the job `label` on `devices` may run, and hold its slots
        for the block. `queued` is told while it waits (for `vmd status`)."""
        job = _Job(devices, label)
        if self.per_device > 0 and devices:
            self._waiting.append(job)
            self._grant()
            if not job.granted.is_set():
                log.info("%s queued behind %s (resync.per_device: %d on device %s)", label,
                         ", ".join(self.behind(job)), self.per_device,
                         ", ".join(device_name(d) for d in sorted(devices)))
                if queued is not None:
                    queued._waiting = (self, job)
                try:
                    await job.granted.wait()
                except BaseException:
                    # Cancelled while queued (or just as it was granted).
                    for jobs in (self._waiting, self._running):
                        if job in jobs:
                            jobs.remove(job)
                    self._grant()  # later jobs it kept waiting may go now
                    raise
                finally:
                    if queued is not None:
                        queued._waiting = None
        else:
            self._running.append(job)
        try:
            yield
        finally:
            if job in self._running:
                self._running.remove(job)
            self._grant()


class Queued:
    """What a job waits behind while queued (empty: not queued), asked when
    status is: the job holding its disk changes while it waits."""

    def __init__(self) -> None:
        self._waiting: tuple[DeviceSlots, _Job] | None = None

    @property
    def behind(self) -> list[str]:
        if self._waiting is None:
            return []
        slots, job = self._waiting
        return slots.behind(job)
