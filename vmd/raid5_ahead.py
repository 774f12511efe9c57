"""RAID-5 reads started ahead of the writes that will need them: what a
small write reads in a stripe written again, and the partial edge stripes
of a write that waits for its range lock. Hints to the kernel
(POSIX_FADV_WILLNEED through `Plex.will_read`): the reads themselves report
any error, and a hint never fails a write."""

from __future__ import annotations

import collections
import logging
from typing import TYPE_CHECKING, Any

from .plex import Plex
from .raid5_plan import edge_plan
from .volume import Volume, Zeros

log = logging.getLogger(__name__)

# A small write's read ahead around a cold piece, in a stripe with another
# small write among the last RECENT (ReadAhead._small_write_again): its
# stripe unit, at most AHEAD bytes of it (a stripe unit may be MiBs).
AHEAD = 64 * 1024
RECENT = 4096


class ReadAhead(Volume):
    """Raid5Volume's read-ahead: its columns, geometry and membership are
    the volume's."""

    columns: list[Plex]
    su: int
    width: int

    def __init__(self, *args: Any, **kw: Any):
        super().__init__(*args, **kw)
        # Stripes of the last RECENT small writes, oldest first.
        self._recent_small: collections.OrderedDict[int, None] = collections.OrderedDict()

    if TYPE_CHECKING:  # Raid5Volume's
        def _all_in(self) -> bool: ...

    def _prefetch(  # type: ignore[override]
            self, off: int, data: bytes | memoryview | Zeros) -> None:
        """The reads of the write's partial stripes at its edges, started
        while it waits for its range lock. A sequential writer's writes, cut
        by the kernel's writeback where the writer was and not at stripe
        boundaries, share a partial stripe with the next one: each waits for
        the one before, then reads the rest of its last stripe cold, which
        the next write will overwrite. Read ahead (POSIX_FADV_WILLNEED),
        that read finds the page cache filled."""
        if len(data) <= self.width or isinstance(data, Zeros) or not self._all_in():
            return
        try:
            plan = edge_plan(self, off, memoryview(data), count=False)
            for c, at, length in plan.reads:
                self.columns[c].will_read(at, length)
        except Exception:  # noqa: BLE001 -- a hint never fails a write: the reads report
            log.debug("volume %s: no read-ahead for the write at %d", self.name, off,
                      exc_info=True)

    def _ahead(self, off: int, end: int) -> tuple[int, int]:
        """What to read ahead around [off, end) of a column if the page cache
        lacks it (Plex.pread): its stripe unit, at most AHEAD bytes of it."""
        unit = off // self.su * self.su
        start = max(unit, off // AHEAD * AHEAD)
        return start, min(unit + self.su, max(start + AHEAD, end)) - start

    def _small_write_again(self, s: int) -> bool:
        """Stripe s had a small write among the last RECENT ones: read ahead
        around what this one reads, if the page cache lacks it (its unit, at
        most AHEAD bytes), so that the stripe's next small writes find what
        they read there. A stripe written once is not: where random writes
        seldom come back (a volume much bigger than the page cache), the
        read ahead cost a third of the writes a second (64 KiB units, 2 000
        writes to distinct stripes), and more with bigger units."""
        recent = self._recent_small
        if s in recent:
            return True
        recent[s] = None
        if len(recent) > RECENT:
            recent.popitem(last=False)
        return False
