"""The RAID-5 log's file format (vmd/raid5log.py writes and replays it).

File layout: a 4096-byte header, then entries from offset 4096.

| bytes | header |
| --- | --- |
| 0-7 | magic `VMDR5LG2` (`VMDR5LOG` in a log of a vmd before 2026-12-01) |
| 8-15 | `retired`: u64 LE, every entry with a sequence number up to it is on the columns |
| 16-19 | crc32 of bytes 0-15 |
| 20-35 | the volume's uuid (its sidecar log's), raw; zeros in a log written before vmd recorded it |
| 36-39 | crc32 of bytes 0-35 |

| bytes | entry |
| --- | --- |
| 0-3 | magic `R5LC` |
| 4-7 | payload length L, u32 LE |
| 8-15 | sequence number, u64 LE (each is the previous + 1) |
| 16-19 | crc32c (Castagnoli) of bytes 4-15 and the payload |
| 20-20+L | payload: pieces of (u16 column, u64 column offset, u32 length, bytes) |

An entry with magic `R5LE` has zlib's crc32 there instead: vmd wrote those
before 2026-12-01, and replays them (a log left by a crash across an
upgrade). The header's magic changed with the entries': a vmd from before
then refuses the log as not its own, where it would have read the new
entries as a torn tail and replayed none of them after a crash. crc32c is computed by the CPU's own instruction: a 1 MiB write
logs 1.5 MiB, and zlib's crc32 of it cost the log's thread ~0.2 ms, a
sixth of the daemon's CPU per MiB (docs/performance.md).
"""

from __future__ import annotations

import struct
import uuid
import zlib
from collections.abc import Callable
from typing import Any

import crc32c

MAGIC = b"VMDR5LG2"  # what this vmd writes: entries are R5LC
MAGICS = (MAGIC, b"VMDR5LOG")  # read: the older is a log of R5LE entries
ENTRY_MAGIC = b"R5LC"  # what this vmd writes: the crc is crc32c
# With the CPU's instruction the GIL is kept: a 64 KiB piece takes about
# 2 µs, and each release had the log's thread wait to take it back from the
# busy event loop. The software fallback (a CPU without SSE 4.2) takes ~0.4
# ms per MiB: it lets the event loop run meanwhile.
_GIL = 0 if crc32c.hardware_based else -1
# Per entry magic, its checksum: (bytes, the crc so far) → the crc.
ENTRY_CRCS: dict[bytes, Callable[[Any, int], int]] = {ENTRY_MAGIC: crc32c.crc32c,
                                                      b"R5LE": zlib.crc32}
HEADER = 4096


def crc_unavailable() -> str | None:
    """Why crc32c cannot be computed here, or None. With CRC32C_SW_MODE=none
    on a CPU without SSE 4.2 the package raises at every call: found when the
    log is opened, not at the first write (which would fail the log)."""
    try:
        crc32c.crc32c(b"vmd", 0, gil_release_mode=_GIL)
    except Exception as e:  # whatever the package raises: the message says it
        return f"{type(e).__name__}: {e}"
    return None
_ENTRY = struct.Struct("<4sIQI")
_PIECE = struct.Struct("<HQI")

Piece = tuple[int, int, Any]  # column, offset in the column, bytes


def entry_buffers(seq: int, pieces: list[Piece]) -> list[Any]:
    """An entry as the buffers to write one after the other: the pieces'
    bytes are not copied (at 1.5 MiB of entry per MiB written, four copies
    cost more than the crc)."""
    out: list[Any] = [b""]  # the entry's header, once its crc is known
    n = 0
    for c, off, d in pieces:
        h = _PIECE.pack(c, off, len(d))
        out += (h, d)
        n += len(h) + len(d)
    crc = crc32c.crc32c(struct.pack("<IQ", n, seq), 0, gil_release_mode=_GIL)
    for b in out[1:]:
        crc = crc32c.crc32c(b, crc, gil_release_mode=_GIL)
    out[0] = _ENTRY.pack(ENTRY_MAGIC, n, seq, crc)
    return out


def entry_size(pieces: list[Piece]) -> int:
    """The bytes the entry of these pieces takes in the log."""
    return _ENTRY.size + sum(_PIECE.size + len(d) for _, _, d in pieces)


def encode_entry(seq: int, pieces: list[Piece]) -> bytes:
    return b"".join(entry_buffers(seq, pieces))


def _header(retired: int, owner: str | None = None) -> bytes:
    h = MAGIC + struct.pack("<Q", retired)
    h += struct.pack("<I", zlib.crc32(h))
    if owner is not None:
        # Which volume the log belongs to: one moved with the config can be
        # replayed, another volume's is never replayed nor emptied.
        h += uuid.UUID(owner).bytes
        h += struct.pack("<I", zlib.crc32(h))
    return h.ljust(HEADER, b"\0")


def read_owner(data: bytes) -> str | None:
    """The uuid of the volume whose log this is, None if the header names
    none (a log from before vmd recorded it). Raises ValueError if it is
    not a RAID-5 log or its owner is damaged."""
    if len(data) < 20 or data[:8] not in MAGICS:
        raise ValueError("not a RAID-5 log (bad magic)")
    if len(data) < 40 or not any(data[20:40]):
        return None
    if struct.unpack_from("<I", data, 36)[0] != zlib.crc32(data[:36]):
        raise ValueError("bad header (the crc of its volume uuid)")
    return str(uuid.UUID(bytes=bytes(data[20:36])))


def read_entries(data: bytes) -> tuple[int, list[tuple[int, list[Piece]]]]:
    """(retired, [(seq, pieces)]) of the entries to replay. Raises ValueError
    if the header is damaged (the log cannot say what was in flight)."""
    if len(data) < 20 or data[:8] not in MAGICS or \
            struct.unpack_from("<I", data, 16)[0] != zlib.crc32(data[:16]):
        raise ValueError("bad header (magic or crc)")
    retired = struct.unpack_from("<Q", data, 8)[0]
    out: list[tuple[int, list[Piece]]] = []
    pos = HEADER
    while pos + _ENTRY.size <= len(data):
        magic, n, seq, crc = _ENTRY.unpack_from(data, pos)
        body = data[pos + _ENTRY.size:pos + _ENTRY.size + n]
        check = ENTRY_CRCS.get(magic)
        if check is None or len(body) != n or seq != retired + len(out) + 1 \
                or check(body, check(struct.pack("<IQ", n, seq), 0)) != crc:
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
