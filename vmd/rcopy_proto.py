"""The Remote Copy stream protocol (sender → receiver over a command's stdin,
replies back over its stdout).

Sender → receiver, binary:

    preamble  b"VMDRCOPY" + u16 version + u16 zero
    frames    u8 type, 3 pad bytes, u32 payload length, u32 crc32(type|length|payload), payload
      'H'  header, JSON: volume (name), uuid, size, region, seq, base, full, time
      'D'  data: u64 offset + bytes (at most MAX_DATA)
      'E'  end, JSON: records, bytes (must match what came)

Receiver → sender, one JSON object per line:

    {"t": "ready", "committed": SEQ}         header accepted, send the data
    {"t": "ack", "seq": SEQ, "time": T}      update committed: B holds this point
    {"t": "error", "error": MSG, "need_full": BOOL}

Every frame is checked before it is used: a bad checksum, an unknown type, an
oversized frame, or the stream ending early is a ProtocolError; the receiver
then restores its last consistent point.
"""

from __future__ import annotations

import json
import struct
import zlib
from typing import Any

import trio

from .errors import VmdError

MAGIC = b"VMDRCOPY"
VERSION = 1
PREAMBLE = struct.Struct("<8sHH")
FRAME = struct.Struct("<B3xII")  # type, length, crc32
OFFSET = struct.Struct("<Q")
HEADER, DATA, END = ord("H"), ord("D"), ord("E")
MAX_DATA = 4 * 1024 * 1024  # bytes of data in one 'D' frame
MAX_JSON = 64 * 1024
MAX_LINE = 64 * 1024
CHUNK = 1024 * 1024  # what the sender puts in one 'D' frame


class ProtocolError(VmdError):
    pass


def preamble() -> bytes:
    return PREAMBLE.pack(MAGIC, VERSION, 0)


def _crc(kind: int, payload: bytes | memoryview) -> int:
    return zlib.crc32(payload, zlib.crc32(struct.pack("<BI", kind, len(payload))))


def frame(kind: int, payload: bytes | memoryview) -> bytes:
    return FRAME.pack(kind, len(payload), _crc(kind, payload)) + bytes(payload)


def json_frame(kind: int, obj: dict[str, Any]) -> bytes:
    return frame(kind, json.dumps(obj, separators=(",", ":")).encode())


def data_frame(off: int, data: bytes | memoryview) -> bytes:
    return frame(DATA, OFFSET.pack(off) + bytes(data))


class Reader:
    """Buffered reads of exact sizes from a trio ReceiveStream."""

    def __init__(self, stream: trio.abc.ReceiveStream):
        self.stream = stream
        self.buf = bytearray()
        self.received = 0

    async def exactly(self, n: int, what: str) -> bytes:
        while len(self.buf) < n:
            chunk = await self.stream.receive_some(max(65536, n - len(self.buf)))
            if not chunk:
                raise ProtocolError(f"truncated stream: it ended inside {what} "
                                    f"(after {self.received + len(self.buf)} bytes)")
            self.buf += chunk
        out = bytes(self.buf[:n])
        del self.buf[:n]
        self.received += n
        return out

    async def line(self) -> dict[str, Any] | None:
        while b"\n" not in self.buf:
            if len(self.buf) > MAX_LINE:
                raise ProtocolError("reply line too long")
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                return None
            self.buf += chunk
        i = self.buf.index(b"\n")
        line = bytes(self.buf[:i])
        del self.buf[:i + 1]
        try:
            msg = json.loads(line)
        except ValueError as e:
            raise ProtocolError(f"malformed reply {line[:80]!r}: {e}") from None
        if not isinstance(msg, dict):
            raise ProtocolError(f"malformed reply {line[:80]!r}")
        return msg

    async def preamble(self) -> None:
        raw = await self.exactly(PREAMBLE.size, "the preamble")
        magic, version, _ = PREAMBLE.unpack(raw)
        if magic != MAGIC:
            raise ProtocolError(f"not a vmd rcopy stream (bad magic {magic!r})")
        if version != VERSION:
            raise ProtocolError(f"unsupported rcopy protocol version {version} (this vmd speaks "
                                f"{VERSION})")

    async def frame(self) -> tuple[int, bytes]:
        kind, length, crc = FRAME.unpack(await self.exactly(FRAME.size, "a frame header"))
        if kind not in (HEADER, DATA, END):
            raise ProtocolError(f"unknown frame type {kind} at byte {self.received - FRAME.size}")
        limit = OFFSET.size + MAX_DATA if kind == DATA else MAX_JSON
        if length > limit:
            raise ProtocolError(f"oversized {chr(kind)!r} frame: {length} bytes (limit {limit})")
        payload = await self.exactly(length, f"a {chr(kind)!r} frame of {length} bytes")
        if _crc(kind, payload) != crc:
            raise ProtocolError(f"bad checksum in the {chr(kind)!r} frame ending at byte "
                                f"{self.received}")
        return kind, payload


def decode_json(payload: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(payload)
    except ValueError as e:
        raise ProtocolError(f"malformed {what}: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"malformed {what}: not an object")
    return obj


def line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"
