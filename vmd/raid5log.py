"""The RAID-5 log: each write's column pieces (new data and new parity, with
their addresses) made durable before any column is written.

It closes the RAID-5 write hole: after an unclean stop the entries not yet
retired are replayed, in order, before the volume is served, so every stripe
a crash cut in the middle ends with data and parity that match (the new
data, or the old where the entry never became durable and the write was
never acknowledged), also when a column is missing at the restart.

File layout: a 4096-byte header, then entries from offset 4096.

| bytes | header |
| --- | --- |
| 0-7 | magic `VMDR5LOG` |
| 8-15 | `retired`: u64 LE, every entry with a sequence number up to it is on the columns |
| 16-19 | crc32 of bytes 0-15 |

| bytes | entry |
| --- | --- |
| 0-3 | magic `R5LE` |
| 4-7 | payload length L, u32 LE |
| 8-15 | sequence number, u64 LE (each is the previous + 1) |
| 16-19 | crc32 of bytes 4-15 and the payload |
| 20-20+L | payload: pieces of (u16 column, u64 column offset, u32 length, bytes) |

Entries are appended by one committer task for every writer waiting at that
moment (group commit: one pwrite and one fdatasync). They retire once their
column writes are done and the columns flushed: the header's `retired` is
rewritten, and when nothing is in flight the next entry starts at 4096
again. A writer that finds the log full waits for a retire; no entry is
ever dropped. Replay reads entries from 4096 while each is whole, its crc
matches and its sequence number is the next one after `retired`: a torn or
partial entry (a write never acknowledged), or an older one left from
before a rewind, ends it.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from .config import MiB

log = logging.getLogger(__name__)

MAGIC = b"VMDR5LOG"
ENTRY_MAGIC = b"R5LE"
HEADER = 4096
_ENTRY = struct.Struct("<4sIQI")
_PIECE = struct.Struct("<HQI")
CAPACITY = 64 * MiB  # the log file's size: writes beyond wait for a retire
RETIRE_AT = CAPACITY // 2  # a retire starts once this much is used

Piece = tuple[int, int, Any]  # column, offset in the column, bytes


def encode_entry(seq: int, pieces: list[Piece]) -> bytes:
    body = b"".join(_PIECE.pack(c, off, len(d)) + bytes(d) for c, off, d in pieces)
    head = struct.pack("<IQ", len(body), seq)
    crc = zlib.crc32(body, zlib.crc32(head))
    return _ENTRY.pack(ENTRY_MAGIC, len(body), seq, crc) + body


def _header(retired: int) -> bytes:
    h = MAGIC + struct.pack("<Q", retired)
    return (h + struct.pack("<I", zlib.crc32(h))).ljust(HEADER, b"\0")


def read_entries(data: bytes) -> tuple[int, list[tuple[int, list[Piece]]]]:
    """(retired, [(seq, pieces)]) of the entries to replay. Raises ValueError
    if the header is damaged (the log cannot say what was in flight)."""
    if len(data) < 20 or data[:8] != MAGIC or \
            struct.unpack_from("<I", data, 16)[0] != zlib.crc32(data[:16]):
        raise ValueError("bad header (magic or crc)")
    retired = struct.unpack_from("<Q", data, 8)[0]
    out: list[tuple[int, list[Piece]]] = []
    pos = HEADER
    while pos + _ENTRY.size <= len(data):
        magic, n, seq, crc = _ENTRY.unpack_from(data, pos)
        body = data[pos + _ENTRY.size:pos + _ENTRY.size + n]
        if magic != ENTRY_MAGIC or len(body) != n or seq != retired + len(out) + 1 \
                or zlib.crc32(body, zlib.crc32(struct.pack("<IQ", n, seq))) != crc:
            break
        pieces: list[Piece] = []
        p = 0
        while p < n:
            c, off, ln = _PIECE.unpack_from(body, p)
            p += _PIECE.size
            pieces.append((c, off, body[p:p + ln]))
            p += ln
        out.append((seq, pieces))
        pos += _ENTRY.size + n
    return retired, out


class _Batch:
    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: BaseException | None = None


class Raid5Log:
    def __init__(self, path: Path, flush_columns: Callable[[], Awaitable[None]]):
        self.path = path
        self._flush_columns = flush_columns
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.retired = 0
        self.seq = 0  # last sequence number handed out
        self.end = HEADER  # where the next entry goes
        self._inflight: set[int] = set()  # appended, columns not yet written
        self._pending: list[bytes] = []
        self._batch = _Batch()
        self._wake = trio.Event()
        self._drained = trio.Event()  # set when no entry is in flight
        self._retired = trio.Event()  # set at the end of each retire
        self._retiring = False
        self.commits = 0  # log flushes (each one group of writers)
        self.retires = 0
        self.waits = 0  # writers that found the log full

    # -- start-up --------------------------------------------------------------

    def replay(self, write: Callable[[int, int, bytes], None]) -> int:
        """Call `write(column, offset, bytes)` for every piece of every entry
        not retired, in order; returns how many entries. The caller flushes
        the columns, then `reset`s the log."""
        if os.fstat(self.fd).st_size == 0:
            return 0
        with open(self.path, "rb") as f:
            data = f.read()
        retired, entries = read_entries(data)
        for _, pieces in entries:
            for c, off, d in pieces:
                write(c, off, d)
        self.seq = self.retired = entries[-1][0] if entries else retired
        return len(entries)

    def reset(self) -> None:
        """Everything so far is on the (flushed) columns: start the log empty."""
        os.pwrite(self.fd, _header(self.seq), 0)
        os.fdatasync(self.fd)
        self.retired, self.end = self.seq, HEADER

    # -- write path ------------------------------------------------------------

    async def append(self, pieces: list[Piece]) -> int:
        """Make the pieces durable in the log; returns the entry's sequence
        number, to pass to `written` once the columns are written."""
        size = _ENTRY.size + sum(_PIECE.size + len(d) for _, _, d in pieces)
        if size > CAPACITY - HEADER:
            raise OSError(27, f"RAID-5 log {self.path}: an entry of {size} bytes does not fit")
        while self.end + sum(map(len, self._pending)) + size > CAPACITY:
            self.waits += 1
            await self._retire_wait()
        self.seq += 1
        seq = self.seq
        self._inflight.add(seq)
        self._pending.append(encode_entry(seq, pieces))
        batch = self._batch
        self._wake.set()
        await batch.done.wait()
        if batch.error is not None:
            raise OSError(5, f"cannot write RAID-5 log {self.path}: {batch.error}")
        return seq

    def written(self, seq: int) -> None:
        self._inflight.discard(seq)
        if not self._inflight:
            self._drained.set()

    async def run_committer(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            if not self._pending:
                continue
            batch, self._batch = self._batch, _Batch()
            blob, self._pending = b"".join(self._pending), []
            at = self.end
            self.end += len(blob)
            try:
                await trio.to_thread.run_sync(self._write_sync, blob, at)
            except OSError as e:
                log.error("RAID-5 log %s: write failed: %s", self.path, e)
                batch.error = e
            else:
                self.commits += 1
            batch.done.set()
            if self.end >= RETIRE_AT and not self._retiring:
                trio.lowlevel.spawn_system_task(self._retire_wait)

    def _write_sync(self, blob: bytes, at: int) -> None:
        os.pwrite(self.fd, blob, at)
        os.fdatasync(self.fd)

    async def _retire_wait(self) -> None:
        """Retire what is written; rewind when nothing is in flight."""
        if self._retiring:
            await self._retired.wait()
            return
        self._retiring = True
        done = self._retired = trio.Event()
        try:
            while self._inflight:
                self._drained = trio.Event()
                await self._drained.wait()
            await self.retire()
        finally:
            self._retiring = False
            done.set()

    async def retire(self) -> None:
        """Flush the columns, then record every entry written so far retired."""
        if self._inflight or self.end == HEADER:
            return
        seq = self.seq
        await self._flush_columns()
        if self._inflight or self.seq != seq or self._pending:
            return  # writers came in meanwhile: their entries stay
        await trio.to_thread.run_sync(self._rewind_sync, seq)
        self.retires += 1

    def _rewind_sync(self, seq: int) -> None:
        os.pwrite(self.fd, _header(seq), 0)
        os.fdatasync(self.fd)
        self.retired, self.end = seq, HEADER

    def status(self) -> dict[str, Any]:
        return {"path": str(self.path), "capacity": CAPACITY, "used_bytes": self.end - HEADER,
                "in_flight": len(self._inflight), "commits": self.commits,
                "retires": self.retires, "full_waits": self.waits}

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
