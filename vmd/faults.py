"""Test-only fault injection, configured by the environment of the daemon.

VMD_TEST_FAULT=split-write:VOLUME:OFFSET  — the first write to VOLUME that
starts at byte OFFSET reaches only the first writable plex, then the daemon
SIGKILLs itself: the torn mirror write of a power cut, made repeatable.
Unset in production: the write path checks one attribute.
"""

from __future__ import annotations

import os
import signal


class SplitWrite:
    def __init__(self, volume: str, offset: int):
        self.volume = volume
        self.offset = offset

    def matches(self, volume: str, off: int) -> bool:
        return volume == self.volume and off == self.offset

    @staticmethod
    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)


def split_write_fault() -> SplitWrite | None:
    spec = os.environ.get("VMD_TEST_FAULT", "")
    if not spec.startswith("split-write:"):
        return None
    _, vol, off = spec.split(":", 2)
    return SplitWrite(vol, int(off))
