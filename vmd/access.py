"""Access rules: the layer between a volume's users and its engine.

`Volume.pread`/`pwrite` ask the volume's rules (`Volume.access`) before any
work; a feature that must hold users off (a Remote Copy target refuses writes,
and reads while an update applies) sets the rules instead of changing how the
volume reads and writes, and does its own I/O past them. nbdkit's filters
(`backend_can_write`, `next->pwrite`) are the model; RAID-5 and remote plexes
get the same seam.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol


class Refusal(NamedTuple):
    errno: int
    reason: str  # names the volume and what to do, e.g. the verb that lifts the rule


class AccessRules(Protocol):
    def refuse_read(self) -> Refusal | None: ...

    def refuse_write(self) -> Refusal | None: ...


class Open:
    """No rules: every read and write goes to the engine."""

    def refuse_read(self) -> Refusal | None:
        return None

    def refuse_write(self) -> Refusal | None:
        return None


OPEN = Open()
