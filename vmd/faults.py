"""Test-only fault injection, configured by the environment of the daemon.

VMD_TEST_FAULT=split-write:VOLUME:OFFSET  — the first write to VOLUME that
starts at byte OFFSET reaches only the first writable plex, then the daemon
SIGKILLs itself: the torn mirror write of a power cut, made repeatable. On
a RAID-5 volume it reaches only the data units (after the RAID-5 log, if
any); VMD_TEST_FAULT=split-parity:VOLUME:OFFSET reaches only the parity;
VMD_TEST_FAULT=split-logged:VOLUME:OFFSET (with a RAID-5 log) kills it once
the write's entry is durable in the log, before any column is written.
VMD_TEST_FAULT=rcopy-commit:VOLUME — the checkpoint that records a Remote
Copy update's new consistent point on VOLUME fails with EIO, as a full or
failing log disk would make it.
VMD_TEST_FAULT=resize:VOLUME:STEP — `vmd resize VOLUME` SIGKILLs the daemon at
STEP (RESIZE_STEPS), to prove a crash leaves the old or the new size.
VMD_TEST_FAULT=hold-write-back:VOLUME — the RAID-5 log of VOLUME writes no
piece to the columns and never retires: every acknowledged write stays in
the write-back cache (and the log) until a SIGKILL. hold-commit:VOLUME also
commits a batch to the log only when someone waits for it (an fsync).
VMD_TEST_FAULT=mark:VOLUME — SIGKILL once a checkpoint of VOLUME with a new
run generation is durable, before the first image's mark is moved on to it.
Unset in production: the write path checks one attribute.
"""

from __future__ import annotations

import errno
import os
import signal


class SplitWrite:
    def __init__(self, volume: str, offset: int, part: str = "data"):
        self.volume = volume
        self.offset = offset
        self.part = part  # RAID-5: the pieces that reach the columns

    def matches(self, volume: str, off: int) -> bool:
        return volume == self.volume and off == self.offset

    @staticmethod
    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)


def split_write_fault() -> SplitWrite | None:
    spec = os.environ.get("VMD_TEST_FAULT", "")
    if not spec.startswith(("split-write:", "split-parity:", "split-logged:")):
        return None
    kind, vol, off = spec.split(":", 2)
    return SplitWrite(vol, int(off), {"split-parity": "parity",
                                      "split-logged": "none"}.get(kind, "data"))


def rcopy_commit_fault(volume: str) -> None:
    """Raise the injected failure of the commit checkpoint, if configured for `volume`."""
    if os.environ.get("VMD_TEST_FAULT", "") == f"rcopy-commit:{volume}":
        raise OSError(errno.EIO, "injected fault: the commit checkpoint failed")


# The steps of `vmd resize` at which VMD_TEST_FAULT=resize:VOLUME:STEP kills
# the daemon (vmd/resize.py:grow): after the new size is in the log, after
# the first image was extended, after every image was.
RESIZE_STEPS = ("logged", "one-extended", "extended")


def resize_fault(volume: str, step: str) -> None:
    """SIGKILL the daemon at `step` of a resize of `volume`, if configured."""
    if os.environ.get("VMD_TEST_FAULT", "") == f"resize:{volume}:{step}":
        SplitWrite.die()


def raid5_hold(volume: str) -> str | None:
    """"write-back" or "commit" if the RAID-5 log of `volume` is to hold its
    pieces (and, for "commit", its batches until asked), else None."""
    spec = os.environ.get("VMD_TEST_FAULT", "")
    for kind in ("write-back", "commit"):
        if spec == f"hold-{kind}:{volume}":
            return kind
    return None


def mark_fault(volume: str) -> None:
    """SIGKILL the daemon before it moves an image's mark (vmd/imageid.py) on
    to the generation just checkpointed, if VMD_TEST_FAULT=mark:VOLUME."""
    if os.environ.get("VMD_TEST_FAULT", "") == f"mark:{volume}":
        SplitWrite.die()
