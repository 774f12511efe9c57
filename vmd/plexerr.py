"""PlexIOError: an I/O error on a plex, naming it. Its own module so that
the plex's parts (vmd/plex.py, vmd/plexcopy.py) can raise it without an
import cycle; `from .plex import PlexIOError` works as before."""

from __future__ import annotations

import errno
from typing import Any


class PlexIOError(OSError):
    """An I/O error on a plex, naming it."""

    def __init__(self, plex: Any, op: str, off: int, err: OSError):
        # plex: a vmd.plex.Plex (not imported here: plex.py imports this)
        # One that passed through another layer names the plex once, with
        # the first (innermost) offset's cause, not "write of plex … : write
        # of plex … : No space left on device".
        self.reason: str = (err.reason if isinstance(err, PlexIOError)
                            else str(err.strerror or err))
        super().__init__(err.errno or errno.EIO,
                         f"{op} of plex {plex.name} ({plex.path}) at offset {off}: {self.reason}")
        self.plex = plex
        self.op = op
        self.off = off
