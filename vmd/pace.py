"""`resync.rate_limit` applied to a background copy (a resync, a verify)."""

from __future__ import annotations

import time
from collections.abc import Callable

import trio


class Pace:
    """Holds a copy (a resync, a verify) to `resync.rate_limit`, re-read in
    short steps: SIGHUP may change it while the copy waits. Paced from the
    copy's start, or from the last change: a lower limit measured from the
    start would stop the copy for as long as the bytes already done take at
    the new rate."""

    def __init__(self, since: float, rate: int):
        self.since, self._done, self._rate = since, 0, rate

    async def wait(self, rate_of: Callable[[], int], done_of: Callable[[], int]) -> None:
        await trio.sleep(0)  # let writes in between chunks
        while (rate := rate_of()) > 0:
            now = time.monotonic()
            if rate != self._rate:
                self.since, self._done, self._rate = now, done_of(), rate
            delay = self.since + (done_of() - self._done) / rate - now
            if delay <= 0:
                return
            await trio.sleep(min(delay, 0.25))
