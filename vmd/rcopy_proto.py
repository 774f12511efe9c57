"""The Remote Copy stream protocol (sender → receiver over a command's stdin,
replies back over its stdout).

Sender → receiver, binary:

    preamble  b"VMDRCOPY" + u16 version + u16 zero
    frames    u8 type, 3 pad bytes, u32 payload length, u32 crc32(type|length|payload), payload
      'H'  header, JSON: volume (name), uuid, size, region, seq, base, full, time
           (version 2) reverse: {source_uuid, seq} — see below
      'D'  data: u64 offset + bytes (at most MAX_DATA)
      'Z'  (version 3) zeros: u64 offset + u64 length: the range reads as zeros
           (a hole of the source); the receiver punches it
      'E'  end, JSON: records, bytes (must match what came); (version 2) time: the
           update's point in time, when the header could not know it yet;
           (version 3) zero_bytes: the length of the 'Z' frames (records counts them)

Receiver → sender, one JSON object per line:

    {"t": "ready", "committed": SEQ}         header accepted, send the data
    {"t": "ack", "seq": SEQ, "time": T}      update committed: B holds this point
    {"t": "error", "error": MSG, "need_full": BOOL}

Version 2 adds the reverse (failover and return): a promoted secondary B sends
its changes back to the old primary A. Its header carries `reverse`: the uuid
of the volume B replicated (A's own uuid, checked by A) and B's consistent
point. A answers `ready` with the map of its own changes B never received
(tracker + unacknowledged update), as `map` (MapCodec: region, bits, zlib,
crc32, all checked by B), and `unsent_bytes`; B then takes its point in time
and sends the union of that map and its own changes, so that A ends equal to
B. A version-1 stream is still accepted (without `reverse`).

Version 3 adds the 'Z' frame: a full update sends the source's holes as zero
ranges instead of their bytes. A sender announces version 3 only in a stream
that may carry one (otherwise 2, which older receivers take); a receiver that
does not speak 3 refuses the stream at its preamble, and one that does refuses
a 'Z' frame in a stream announced as older.

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
VERSION = 3
NO_ZEROS = 2  # what a stream without 'Z' frames announces (older receivers take it)
MIN_VERSION = 1  # still accepted from an older sender
PREAMBLE = struct.Struct("<8sHH")
FRAME = struct.Struct("<B3xII")  # type, length, crc32
OFFSET = struct.Struct("<Q")
HEADER, DATA, END, ZERO = ord("H"), ord("D"), ord("E"), ord("Z")
ZERO_RANGE = struct.Struct("<QQ")  # offset, length
MAX_DATA = 4 * 1024 * 1024  # bytes of data in one 'D' frame
MAX_JSON = 64 * 1024
MAX_LINE = 64 * 1024
MAX_MAP_LINE = 64 * 1024 * 1024  # the reverse's `ready` carries a change map
CHUNK = 1024 * 1024  # what the sender puts in one 'D' frame


class ProtocolError(VmdError):
    pass


def preamble(version: int = VERSION) -> bytes:
    return PREAMBLE.pack(MAGIC, version, 0)


def _crc(kind: int, payload: bytes | memoryview) -> int:
    return zlib.crc32(payload, zlib.crc32(struct.pack("<BI", kind, len(payload))))


def frame(kind: int, payload: bytes | memoryview) -> bytes:
    return FRAME.pack(kind, len(payload), _crc(kind, payload)) + bytes(payload)


def json_frame(kind: int, obj: dict[str, Any]) -> bytes:
    return frame(kind, json.dumps(obj, separators=(",", ":")).encode())


def data_frame(off: int, data: bytes | memoryview) -> bytes:
    return frame(DATA, OFFSET.pack(off) + bytes(data))


def zero_frame(off: int, length: int) -> bytes:
    return frame(ZERO, ZERO_RANGE.pack(off, length))


class Reader:
    """Buffered reads of exact sizes from a trio ReceiveStream."""

    def __init__(self, stream: trio.abc.ReceiveStream):
        self.stream = stream
        self.buf = bytearray()
        self.received = 0
        self.version = 0

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

    async def line(self, limit: int = MAX_LINE) -> dict[str, Any] | None:
        while b"\n" not in self.buf:
            if len(self.buf) > limit:
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
        if not MIN_VERSION <= version <= VERSION:
            raise ProtocolError(f"unsupported rcopy protocol version {version} (this vmd speaks "
                                f"{MIN_VERSION} to {VERSION})")
        self.version = version

    async def frame(self) -> tuple[int, bytes]:
        kind, length, crc = FRAME.unpack(await self.exactly(FRAME.size, "a frame header"))
        if kind not in (HEADER, DATA, END, ZERO):
            raise ProtocolError(f"unknown frame type {kind} at byte {self.received - FRAME.size}")
        if kind == ZERO and self.version < 3:
            raise ProtocolError(f"a zero-range frame at byte {self.received - FRAME.size} in a "
                                f"stream of protocol version {self.version} (it needs 3)")
        limit = (OFFSET.size + MAX_DATA if kind == DATA else
                 ZERO_RANGE.size if kind == ZERO else MAX_JSON)
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


def encode_map(region: int, nbits: int, bits: bytes) -> dict[str, Any]:
    """A change map for a JSON reply: its geometry, zlib'd bits, crc32 of the raw bits."""
    import base64

    return {"region": region, "nbits": nbits, "crc": zlib.crc32(bits),
            "data": base64.b64encode(zlib.compress(bits, 1)).decode()}


def decode_map(obj: Any, size: int) -> tuple[int, bytes]:
    """(region, raw bits) of a map from encode_map, checked against a volume of `size`."""
    import base64
    import binascii

    if not isinstance(obj, dict):
        raise ProtocolError("the reply carries no change map")
    try:
        region, nbits, crc = int(obj["region"]), int(obj["nbits"]), int(obj["crc"])
        packed = base64.b64decode(obj["data"], validate=True)
    except (KeyError, TypeError, ValueError, binascii.Error) as e:
        raise ProtocolError(f"malformed change map: {e!r}") from None
    if region <= 0 or nbits != -(-size // region):
        raise ProtocolError(f"change map of {nbits} regions of {region} bytes does not fit a "
                            f"volume of {size} bytes")
    want = -(-nbits // 8)
    d = zlib.decompressobj()
    try:
        raw = d.decompress(packed, want + 1)
    except zlib.error as e:
        raise ProtocolError(f"damaged change map: {e}") from None
    if len(raw) != want or not d.eof or zlib.crc32(raw) != crc:
        raise ProtocolError("damaged change map (length or checksum)")
    return region, raw
