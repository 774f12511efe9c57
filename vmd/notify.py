"""The `notify:` hook: a command run for every event, one at a time, in order.

It reads events from its own queue on the bus (vmd/events.py), so a hook
that is slow or hangs only makes that queue grow (up to QUEUE_EVENTS, then
the oldest are dropped and the next run gets a `dropped` event); I/O never
waits for it. A run that fails is logged with the last lines it printed; one
that runs past the timeout is killed (its whole process group: `sh -c`'s
children too) and logged.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
from collections import deque
from typing import Any

import trio

from .events import BUS, Event

log = logging.getLogger(__name__)

TIMEOUT = 30.0  # seconds a run may take before it is killed
# Internal (tests): another timeout, in seconds.
TIMEOUT_ENV = "VMD_NOTIFY_TIMEOUT"
STOP_GRACE = 5.0  # at daemon stop: seconds left to deliver what is queued
OUTPUT_LINES = 5  # of a failed run's output, in the log


class Notifier:
    """A background job (`vmd/tasks.py`'s shape): `run()` in the daemon's
    nursery (`nursery.start`), `stop()` on its stop stack, the first pushed
    (so the last unwound: the volumes' stop events are still delivered). It subscribes when made, so that events of
    the start-up (a volume refused, a plex that cannot be opened) are queued
    before the nursery exists."""

    def __init__(self, argv: tuple[str, ...]):
        self.argv = argv
        self.timeout = float(os.environ.get(TIMEOUT_ENV) or TIMEOUT)
        self.sub = BUS.subscribe("notify")
        self.runs = 0
        self.failures = 0
        self._scope: trio.CancelScope | None = None
        self._deadline = float("inf")
        self._running = False
        self._ended = trio.Event()

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self._running = True
        task_status.started()
        try:
            while (ev := await self.sub.get()) is not None:
                # Shielded: a run is bounded by the timeout anyway, and at a
                # stop the daemon cancels its nursery right after `stop()`;
                # the grace deadline `stop()` sets is what ends it then.
                with trio.CancelScope(shield=True, deadline=self._deadline) as self._scope:
                    await self._run_hook(ev)
                if self._scope.cancelled_caught:
                    log.error("notify hook: stopping: %d event(s) left undelivered after %.0f s",
                              len(self.sub.queue) + 1, STOP_GRACE)
                    return
        finally:
            self._scope = None
            self.sub.close()
            self._ended.set()

    async def stop(self) -> None:
        """Stop taking events; what is queued is still delivered, for at most
        STOP_GRACE s (a stop is not held up by a slow hook any longer).
        Returns once the last run has ended."""
        self.sub.close()
        self._deadline = trio.current_time() + STOP_GRACE
        if self._scope is not None:
            self._scope.deadline = min(self._scope.deadline, self._deadline)
        if self._running:
            await self._ended.wait()

    def _what(self, ev: Event) -> str:
        vol = f" of volume {ev['volume']}" if ev.get("volume") else ""
        return f"{self.argv[-1] if self.argv[:2] == ('sh', '-c') else ' '.join(self.argv)!r} " \
               f"(event {ev['kind']}{vol})"

    async def _run_hook(self, ev: Event) -> None:
        env = {**os.environ, "VMD_EVENT": ev["kind"], "VMD_VOLUME": ev.get("volume") or "",
               "VMD_PLEX": ev.get("plex") or ""}
        self.runs += 1
        try:
            # A session of its own: a timeout kills the hook's children too.
            proc = await trio.lowlevel.open_process(
                list(self.argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, env=env, start_new_session=True)
        except OSError as e:
            self.failures += 1
            log.error("notify hook %s cannot be run: %s", self._what(ev), e.strerror or e)
            return
        output: deque[str] = deque(maxlen=OUTPUT_LINES)
        read_all = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._feed, proc, json.dumps(ev).encode() + b"\n")
                nursery.start_soon(self._collect, proc, output, read_all)
                with trio.move_on_after(self.timeout) as waited:
                    await proc.wait()
                if waited.cancelled_caught:
                    _kill_group(proc)
                    self.failures += 1
                    log.error("notify hook %s ran past %.0f s: killed", self._what(ev),
                              self.timeout)
                # What it printed last, unless a child it left in the
                # background keeps the output open: then stop reading.
                with trio.move_on_after(1):
                    await read_all.wait()
                nursery.cancel_scope.cancel()
            if not waited.cancelled_caught and proc.returncode != 0:
                self.failures += 1
                said = "; ".join(output) or "no output"
                log.error("notify hook %s exited %s: %s", self._what(ev), _how(proc.returncode),
                          said)
        finally:
            if proc.returncode is None:
                _kill_group(proc)
                with trio.CancelScope(shield=True):
                    await proc.wait()
            for s in (proc.stdin, proc.stdout):
                if s is not None:
                    with trio.CancelScope(shield=True):
                        await s.aclose()

    @staticmethod
    async def _feed(proc: trio.Process, data: bytes) -> None:
        assert proc.stdin is not None
        try:
            await proc.stdin.send_all(data)
            await proc.stdin.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the hook does not read its stdin: that is its choice

    @staticmethod
    async def _collect(proc: trio.Process, output: deque[str], read_all: trio.Event) -> None:
        assert proc.stdout is not None
        buf = b""
        while chunk := await proc.stdout.receive_some(4096):
            buf += chunk
            *lines, buf = buf.split(b"\n")
            output.extend(ln.decode(errors="replace")[:300] for ln in lines if ln.strip())
            buf = buf[-4096:]  # one endless line: keep its end
        if buf.strip():
            output.append(buf.decode(errors="replace")[:300])
        read_all.set()


def _kill_group(proc: trio.Process) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _how(rc: int | None) -> str:
    if rc is not None and rc < 0:
        return f"on signal {signal.Signals(-rc).name}"
    return f"with status {rc}"
