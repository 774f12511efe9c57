"""The daemon's event bus: what happened to which volume and plex, for
`vmd events` and the `notify:` hook (docs/operations.md#events lists every
kind and its fields).

`emit()` is called from the engine at the moment something changes. It only
appends to in-memory queues and wakes their readers: it never waits, so a
slow reader (a `vmd events` client on a stalled terminal, a notify hook that
hangs) can never hold up I/O. Each reader has its own bounded queue; when one
is full the oldest event is dropped, counted, and the reader's next event is
a `dropped` event saying how many it missed.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from typing import Any

import trio

log = logging.getLogger(__name__)

# The kinds the daemon emits (docs/operations.md#events has their fields).
PLEX_STATE = "plex-state"
PLEX_ERRORS = "plex-errors"  # the last in-sync plex had I/O errors and was kept
RESYNC_STARTED = "resync-started"
RESYNC_FINISHED = "resync-finished"
RESYNC_INTERRUPTED = "resync-interrupted"
VERIFY_FINISHED = "verify-finished"
SNAPSHOT_TAKEN = "snapshot-taken"
SNAPSHOT_MERGED = "snapshot-merged"
RCOPY_COMMITTED = "rcopy-committed"
RCOPY_FAILED = "rcopy-failed"
VOLUME_REFUSED = "volume-refused"
VOLUME_STARTED = "volume-started"  # `vmd start` of a refused volume
RAID5_LOG_FAILED = "raid5-log-failed"  # the volume refuses writes until a restart
DROPPED = "dropped"

QUEUE_EVENTS = 1000  # per reader: far more than a burst of failures and resyncs makes
HISTORY_EVENTS = 100  # kept for a `vmd events` that connects later (start-up events)

Event = dict[str, Any]


class Subscription:
    """One reader's bounded queue of events."""

    def __init__(self, bus: "EventBus", name: str, maxlen: int):
        self.bus = bus
        self.name = name
        self.maxlen = maxlen
        self.queue: deque[Event] = deque()
        self.dropped = 0
        self.closed = False
        self._wakeup = trio.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        try:
            self._token = trio.lowlevel.current_trio_token()
        except RuntimeError:
            pass  # made outside trio (tests of the bus): woken only from there

    def put(self, ev: Event) -> None:
        if len(self.queue) >= self.maxlen:
            self.queue.popleft()
            self.dropped += 1
        self.queue.append(ev)
        self._wake()

    def close(self) -> None:
        """No more events: `get` returns what is queued, then None."""
        self.closed = True
        self.bus.unsubscribe(self)
        self._wake()

    def _wake(self) -> None:
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            # Not the trio thread (an emit from a worker thread): trio's
            # Event may be set only from there.
            # The event set is the one current when this runs there: the
            # reader may have made a new one since (a bound `.set` of the old
            # one would be lost, and the event left waiting in the queue).
            if self._token is not None:
                self._token.run_sync_soon(self._set)
            return
        self._wakeup.set()

    def _set(self) -> None:
        self._wakeup.set()

    def get_nowait(self) -> Event | None:
        """The next event (a `dropped` one first if events were lost), or None."""
        if self.dropped:
            n, self.dropped = self.dropped, 0
            log.warning("events: %d event(s) dropped: the queue of reader %s (%d events) was "
                        "full", n, self.name, self.maxlen)
            return make_event(DROPPED, None, None, count=n, reader=self.name)
        return self.queue.popleft() if self.queue else None

    async def get(self) -> Event | None:
        """Wait for the next event; None once closed and drained."""
        while True:
            ev = self.get_nowait()
            if ev is not None or self.closed:
                return ev
            self._wakeup = trio.Event()
            await self._wakeup.wait()


def make_event(kind: str, volume: str | None, plex: str | None, **details: Any) -> Event:
    return {"time": time.time(), "volume": volume, "kind": kind, "plex": plex,
            "details": details}


class EventBus:
    def __init__(self) -> None:
        self.subscribers: list[Subscription] = []
        self.history: deque[Event] = deque(maxlen=HISTORY_EVENTS)

    def emit(self, kind: str, volume: str | None, plex: str | None = None,
             **details: Any) -> None:
        ev = make_event(kind, volume, plex, **details)
        self.history.append(ev)
        for sub in list(self.subscribers):  # a worker thread may emit (vmd start)
            sub.put(ev)

    def subscribe(self, name: str, *, maxlen: int = QUEUE_EVENTS,
                  history: bool = False) -> Subscription:
        """A new reader; with `history`, the events kept so far come first."""
        sub = Subscription(self, name, maxlen)
        if history:
            for ev in self.history:
                sub.put(ev)
        self.subscribers.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if sub in self.subscribers:
            self.subscribers.remove(sub)


# One bus per process: the engine emits without a handle on the daemon.
BUS = EventBus()


def emit(kind: str, volume: str | None, plex: str | None = None, **details: Any) -> None:
    """Record an event; never blocks (see the module docstring). Details
    must be JSON-serializable."""
    BUS.emit(kind, volume, plex, **details)


def format_event(ev: Event) -> str:
    """One line for `vmd events` without --json."""
    t = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ev["time"]))
    parts = [f"{t}.{int(ev['time'] % 1 * 1000):03d}", ev.get("volume") or "-", ev["kind"]]
    if ev.get("plex"):
        parts.append(f"plex={ev['plex']}")
    for k, v in ev.get("details", {}).items():
        parts.append(f"{k}={v if isinstance(v, (int, float)) else json.dumps(v)}")
    return " ".join(parts)


def register(table: dict[str, Any]) -> None:
    """The `events` admin verb: a streaming request. Every event is sent as a
    progress line {"progress": {"event": EVENT}}; the request never ends by
    itself (the client disconnects, or the daemon stops)."""

    async def events(req: dict[str, Any], progress: Any) -> dict[str, Any]:
        sub = BUS.subscribe("vmd-events", history=not req.get("new"))
        try:
            await progress({"following": True})
            while (ev := await sub.get()) is not None:
                await progress({"event": ev})
        finally:
            sub.close()
        return {"end": "no more events"}

    table["events"] = events
