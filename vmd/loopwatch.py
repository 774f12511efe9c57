"""Names the plex call that holds the event loop.

A fast plex is read and written inline: a blocking call on the event loop's
thread, cheaper than any hop off it (vmd/plex.py says when and why). A disk
that stops answering holds such a call, and with it every volume, the FUSE
mount and the admin socket, until the disk answers or fails; `vmd status`
cannot answer meanwhile. This thread needs no event loop: it says in the log
which plex holds it, in what call, since when, and again when the call
returned.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

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
