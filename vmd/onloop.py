"""Plex calls made on the event loop: when (the budget and the holds below),
and the watch for one that hangs.

A disk that stops answering holds such a call, and with it every volume, the
FUSE mount and the admin socket, until the disk answers or fails; `vmd status`
cannot answer meanwhile. The watch thread needs no event loop: it says in the
log which plex holds it, in what call, since when, and again when the call
returned.
"""

from __future__ import annotations

import logging
import resource
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

# A write into the page cache takes microseconds; any hop off the event loop
# costs tens (measured per 4 KiB: ~2 µs inline, ~80 µs through a worker
# thread, ~70 µs through io_uring, which ext4 hands to a kernel worker for
# buffered writes). So plexes are written inline while they are fast, and a
# plex whose write took longer than INLINE_BUDGET is written off the event
# loop for a while, where it cannot hold up the loop or the other plexes. The
# hold starts short and doubles while stalls keep coming back soon after it
# ends (dirty-page throttling, a slow or failing disk), up to SLOW_HOLD: a
# lone stall (a journal commit forced by another file's fsync) costs 0.1 s of
# slow writes, not 5 s.
INLINE_BUDGET = 0.002
FIRST_HOLD = 0.1
SLOW_HOLD = 5.0
RECUR = 1.0  # a stall this soon after the last hold ended doubles the hold

# Says, when asked, whether the read asking is the only request in progress
# (the FUSE adapter's count): then a fast plex may read it on the event loop.
Alone = Callable[[], bool] | None


class Hold:
    """One plex's inline calls of one kind (its reads, or its writes): each
    made through `call`, which times it, names it to the watch, and keeps
    the plex's calls of that kind off the event loop for a while after one
    that slept past INLINE_BUDGET (`stalls` counts them) or failed. Reads
    and writes are held apart: a disk slow to read cold still takes
    page-cache writes at once."""

    __slots__ = ("until", "hold", "stalls")

    def __init__(self) -> None:
        self.until = 0.0  # off the loop until then
        self.hold = 0.0  # the last hold, seconds
        self.stalls = 0

    def open(self) -> bool:
        return not self.until or time.monotonic() >= self.until

    def call(self, plex: Any, what: str, off: int, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) on the event loop's thread; OSError passes through."""
        t0 = time.monotonic()
        slept = voluntary_switches()
        WATCH.call = (plex, what, off, t0)
        try:
            result = fn(*args)
        except OSError:
            self.hold = SLOW_HOLD
            self.until = t0 + SLOW_HOLD
            raise
        finally:
            WATCH.call = None
        t1 = time.monotonic()
        # Slept: a preempted call (a busy machine) is no slow disk.
        if t1 - t0 > INLINE_BUDGET and voluntary_switches() != slept:
            self.stalls += 1
            # The hold starts short and doubles while stalls keep coming back
            # soon after it ends. From t0, not t1: a call that blocked for
            # longer than RECUR is the worst kind of stall, not a lone one.
            again = self.until and t0 < self.until + RECUR
            self.hold = min(SLOW_HOLD, 2 * self.hold) if again else FIRST_HOLD
            self.until = t1 + self.hold
        return result


def voluntary_switches() -> int:
    """This thread's voluntary context switches so far. A write that slept
    (on the disk, dirty-page throttling, a journal or inode lock) adds at
    least one; a write that was only preempted because the machine is busy
    adds none. Without this test a busy machine's preemptions look like
    stalls, and move healthy plexes off the event loop, where each write costs
    tens of µs more: 4 KiB random writes through a loop device ran at half
    the IOPS under load."""
    return resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw


REPORT_AFTER = 10.0  # seconds an inline call may hold the loop before the log says so


class LoopWatch:
    def __init__(self, after: float = REPORT_AFTER) -> None:
        self.after = after
        # (plex, "read" | "write", offset, start) of the inline call in
        # progress, or None. Set and cleared by the event loop's thread only;
        # read here as one reference.
        self.call: tuple[Any, str, int, float] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="loop-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        reported: tuple[Any, str, int, float] | None = None
        while not self._stop.wait(min(1.0, self.after / 4)):
            call = self.call
            if reported is not None and call is not reported:
                plex, what, off, t0 = reported
                log.warning("plex %s (%s): the %s at offset %d returned after about %.0f s; "
                            "the event loop goes on", plex.name, plex.path, what, off,
                            time.monotonic() - t0)
                reported = None
            if call is not None and call is not reported \
                    and time.monotonic() - call[3] >= self.after:
                plex, what, off, t0 = call
                log.error("plex %s (%s): a %s at offset %d has held the event loop for %.0f s: "
                          "its disk does not answer, and every volume and the admin socket "
                          "wait for it", plex.name, plex.path, what, off, time.monotonic() - t0)
                reported = call


# The daemon's: plexes report their inline calls to it, the daemon runs it.
WATCH = LoopWatch()
