"""The sidecar log: one file per volume holding everything vmd must remember.

Layout: a 4 KiB header (volume identity and geometry, written twice: at 0 and
at 2 KiB), then records. Each
record is framed as (magic, length, seq, crc32) + payload; the payload is a JSON
object followed by binary blobs (compressed bitmaps). The first record after
the header is always a checkpoint (`ckpt`, the whole `VolumeState`); the
following records are small deltas:

    dirty   regions of the DRL made dirty (implies: volume not clean)
    clean   DRL regions cleaned, plus the FastResync bits of detached plexes for
            them (invariant 3: the same durable record that forgets a dirty
            region remembers who missed it)
    copied  resync progress: bits of a plex's `missing` map now copied

Replay takes every valid record up to the first bad one. A bad record that
valid records follow is damage, not a torn tail: the volume is refused
(invariant 4). Compaction writes a new file holding the checkpoint twice
(`copy` 1 and 2, identical but for that field), fsyncs it, renames it over the
log and fsyncs the directory, so a crash at any step leaves either the old log
or the new one; and one damaged checkpoint copy costs nothing: replay uses the
other, and `SidecarLog.open` rewrites the log (the damaged one kept aside).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import struct
import time
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import trio

from .errors import SidecarError
from .exclusive import close_locked, lock_exclusive, open_locked
from .regionmap import RegionMap

log = logging.getLogger(__name__)

HEADER_SIZE = 4096
HEADER_COPY = 2048  # offset of the header's second copy
HEADER_MAGIC = b"VMDSIDE1"
_HDR = struct.Struct("<8sII")  # magic, json length, crc32 of json
REC_MAGIC = 0x52444D56  # "VMDR"
_REC = struct.Struct("<IIQI")  # magic, payload length, seq, crc32(seq|length|payload)
_U32 = struct.Struct("<I")
MAX_RECORD = 256 * 1024 * 1024
# Above this size the log is compacted into a single checkpoint.
DEFAULT_COMPACT_BYTES = 4 * 1024 * 1024

# Plex states (DESIGN.md).
ACTIVE = "ACTIVE"
SYNCING = "SYNCING"
DETACHED = "DETACHED"
IOFAIL = "IOFAIL"
STALE = "STALE"
SNAPATT = "SNAPATT"
SNAPDONE = "SNAPDONE"
# Not a plex: the link a volume keeps to a snapshot broken off it. It never
# takes writes, so its `missing` map records every region written since the
# break-off, with the same durability as a detached plex's FastResync map.
SNAPLINK = "SNAPLINK"
PLEX_STATES = (ACTIVE, SYNCING, DETACHED, IOFAIL, STALE, SNAPATT, SNAPDONE, SNAPLINK)
# States that take every write; all others miss writes and track them.
WRITABLE = frozenset({ACTIVE, SYNCING, SNAPATT, SNAPDONE})
# States whose `missing` map shrinks as resync copies regions to them
# (SNAPDONE too: after a crash it may lack the regions that were dirty).
RESYNC_TARGETS = frozenset({ACTIVE, SYNCING, SNAPATT, SNAPDONE})


@dataclass
class PlexRecord:
    name: str
    path: str
    state: str
    # Regions this plex lacks (FastResync granularity). None = unknown: the
    # whole plex must be copied.
    missing: RegionMap | None
    # (st_dev, st_ino, st_size, st_mtime_ns) when it left, to trust `missing`.
    identity: list[int] | None = None
    # (st_dev, st_ino, generation) of an in-sync local image, to recognise it at open
    # (imageid.py); None: not recorded (away, remote, a block device, or a
    # log written before it was kept).
    inode: list[int] | None = None
    created: bool = False  # vmd created the image (deleted on snapshot abort)
    reason: str = ""  # why it is in its state (shown by status)
    role: str = ""  # "" or "snapshot"


@dataclass
class VolumeState:
    uuid: str
    name: str
    size: int
    region_size: int
    fmr_region: int
    clean: bool = True
    fastresync: bool = True
    drl: RegionMap = field(default=None)  # type: ignore[assignment]
    plexes: list[PlexRecord] = field(default_factory=list)
    config_plexes: list[str] = field(default_factory=list)
    next_plex: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # snapshot relationships etc.
    # The data layout (None: a log from before vmd recorded it). A RAID-5
    # volume's stripe unit and column count place every byte: never changed.
    layout: str | None = None
    stripe_unit: int | None = None
    columns: int | None = None

    def __post_init__(self) -> None:
        if self.drl is None:
            self.drl = RegionMap(self.size, self.region_size)

    def plex(self, name: str) -> PlexRecord | None:
        return next((p for p in self.plexes if p.name == name), None)

    def new_map(self, fill: bool = False) -> RegionMap:
        return RegionMap(self.size, self.fmr_region, fill=fill)

    def apply(self, rec: dict[str, Any], blobs: bytes) -> None:
        """Apply one replayed record."""
        t = rec.get("t")
        if t == "dirty":
            self.clean = False
            for r in rec.get("r", ()):
                self.drl.bits[r] = 1
        elif t == "clean":
            for r in rec.get("r", ()):
                self.drl.bits[r] = 0
            for name, bits in rec.get("fmr", {}).items():
                p = self.plex(name)
                if p is not None and p.missing is not None:
                    for b in bits:
                        p.missing.bits[b] = 1
            if rec.get("volume"):
                self.clean = True
        elif t == "copied":
            for name, runs in rec["p"].items():
                p = self.plex(name)
                # A plex that failed after the copy keeps its bits (its failure
                # checkpoint came first in the log, so it is no longer a target).
                if p is not None and p.state in RESYNC_TARGETS and p.missing is not None:
                    for start, count in runs:
                        p.missing.bits[start:start + count] = 0
        else:
            raise SidecarError(f"unknown record type {t!r}")

    # -- checkpoint encoding ------------------------------------------------

    def encode(self) -> tuple[dict[str, Any], bytes]:
        blobs = bytearray()

        def blob(m: RegionMap) -> list[int]:
            data = m.to_bytes()
            ref = [len(blobs), len(data)]
            blobs.extend(data)
            return ref

        rec = {
            "t": "ckpt", "clean": self.clean, "fastresync": self.fastresync,
            "drl": blob(self.drl), "config_plexes": self.config_plexes,
            "next_plex": self.next_plex, "extra": self.extra,
            "plexes": [{
                "name": p.name, "path": p.path, "state": p.state,
                "missing": None if p.missing is None else blob(p.missing),
                "identity": p.identity, "inode": p.inode, "created": p.created, "reason": p.reason,
                "role": p.role,
            } for p in self.plexes],
        }
        return rec, bytes(blobs)

    def load_checkpoint(self, rec: dict[str, Any], blobs: bytes) -> None:
        def unblob(ref: list[int], region: int) -> RegionMap:
            off, n = ref
            return RegionMap.from_bytes(self.size, region, blobs[off:off + n])

        self.clean = bool(rec["clean"])
        self.fastresync = bool(rec["fastresync"])
        self.drl = unblob(rec["drl"], self.region_size)
        self.config_plexes = list(rec["config_plexes"])
        self.next_plex = int(rec["next_plex"])
        self.extra = dict(rec.get("extra", {}))
        self.plexes = []
        for p in rec["plexes"]:
            if p["state"] not in PLEX_STATES:
                raise SidecarError(f"unknown plex state {p['state']!r}")
            self.plexes.append(PlexRecord(
                name=p["name"], path=p["path"], state=p["state"],
                missing=None if p["missing"] is None else unblob(p["missing"], self.fmr_region),
                identity=p.get("identity"), inode=p.get("inode"), created=bool(p.get("created")),
                reason=p.get("reason", ""), role=p.get("role", "")))


def _frame(seq: int, rec: dict[str, Any], blobs: bytes = b"") -> bytes:
    js = json.dumps(rec, separators=(",", ":")).encode()
    payload = _U32.pack(len(js)) + js + blobs
    crc = zlib.crc32(payload, zlib.crc32(struct.pack("<QI", seq, len(payload))))
    return _REC.pack(REC_MAGIC, len(payload), seq, crc) + payload


def _unframe(buf: bytes | memoryview, off: int) -> tuple[int, int, bytes] | None:
    """(seq, end offset, payload) of a valid record at off, else None."""
    if off + _REC.size > len(buf):
        return None
    magic, length, seq, crc = _REC.unpack_from(buf, off)
    if magic != REC_MAGIC or length > MAX_RECORD or off + _REC.size + length > len(buf):
        return None
    payload = bytes(buf[off + _REC.size: off + _REC.size + length])
    if zlib.crc32(payload, zlib.crc32(struct.pack("<QI", seq, length))) != crc:
        return None
    return seq, off + _REC.size + length, payload


def _decode(payload: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = _U32.unpack_from(payload, 0)
    return json.loads(payload[4:4 + n]), payload[4 + n:]


def _header_bytes(state: VolumeState) -> bytes:
    """The 4 KiB header: the volume's identity and geometry, twice (at 0 and at
    HEADER_COPY), so that one damaged byte in it does not cost the log."""
    js = json.dumps({
        "version": 1, "uuid": state.uuid, "name": state.name, "size": state.size,
        "region_size": state.region_size, "fmr_region": state.fmr_region,
        **{k: v for k, v in (("layout", state.layout), ("stripe_unit", state.stripe_unit),
                              ("columns", state.columns)) if v is not None},
    }).encode()
    hdr = _HDR.pack(HEADER_MAGIC, len(js), zlib.crc32(js)) + js
    if len(hdr) > HEADER_COPY:
        raise SidecarError("sidecar header too large")
    return hdr.ljust(HEADER_COPY, b"\0") + hdr.ljust(HEADER_SIZE - HEADER_COPY, b"\0")


def _header_at(data: bytes, off: int) -> dict[str, Any] | None:
    """The header copy at `off` if it is whole (magic, length, crc), else None."""
    if len(data) < off + _HDR.size:
        return None
    magic, n, crc = _HDR.unpack_from(data, off)
    js = data[off + _HDR.size:off + _HDR.size + n]
    if magic != HEADER_MAGIC or _HDR.size + n > HEADER_COPY or zlib.crc32(js) != crc:
        return None
    try:
        h = json.loads(js)
    except ValueError:
        return None
    return h if isinstance(h, dict) else None


def _read_header(path: Path, data: bytes, repairs: list[str]) -> VolumeState:
    """The state the header describes, from its first whole copy (logs written
    before the header was doubled have only the first)."""
    if len(data) < _HDR.size:
        raise SidecarError(f"{path}: sidecar log is truncated ({len(data)} bytes, no header)")
    h = _header_at(data, 0)
    if h is None:
        h = _header_at(data, HEADER_COPY)
        if h is None:
            raise SidecarError(f"{path}: bad sidecar header (not a vmd log, or damaged)")
        repairs.append(f"the header is damaged; its copy at offset {HEADER_COPY} was read")
    elif any(data[HEADER_COPY:HEADER_SIZE]) and _header_at(data, HEADER_COPY) != h:
        # Rewritten now, while the first copy is whole: left alone, one more
        # damaged byte in the first copy would refuse the volume. (Zeros
        # there: a log from before the header was doubled.)
        repairs.append(f"the header's copy at offset {HEADER_COPY} is damaged")
    try:
        return VolumeState(uuid=h["uuid"], name=h["name"], size=int(h["size"]),
                           region_size=int(h["region_size"]), fmr_region=int(h["fmr_region"]),
                           layout=h.get("layout"), stripe_unit=_int_or_none(h.get("stripe_unit")),
                           columns=_int_or_none(h.get("columns")))
    except (ValueError, KeyError, TypeError) as e:
        raise SidecarError(f"{path}: bad sidecar header: {e}") from None


def _int_or_none(v: Any) -> int | None:
    return None if v is None else int(v)


def read_log_header(path: Path) -> VolumeState:
    """The identity and geometry the header of the log at `path` holds."""
    with open(path, "rb") as f:
        return _read_header(path, f.read(HEADER_SIZE), [])


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Replay:
    state: VolumeState
    records: int  # records replayed, checkpoint copies included
    torn_bytes: int  # bytes of torn tail dropped
    # Damage replay read around (a damaged copy of the checkpoint): the log
    # should be rewritten. With `upto_damage`, also the damage it stopped at.
    repairs: list[str] = field(default_factory=list)


def _checkpoint_copy(data: bytes, off: int) -> int | None:
    """The `copy` number of a valid checkpoint record at off (1 for an old
    log's single checkpoint), else None."""
    got = _unframe(data, off)
    if got is None:
        return None
    try:
        rec, _ = _decode(got[2])
        return int(rec.get("copy", 1)) if rec.get("t") == "ckpt" else None
    except (ValueError, TypeError, AttributeError, struct.error):
        return None


def read_log(path: Path, *, upto_damage: bool = False) -> tuple[Replay, int, int]:
    """Replay the log at `path`. Returns (replay, valid end offset, last seq).

    Raises SidecarError naming the file and offset on any damage other than a
    torn tail or one damaged copy of the checkpoint; with `upto_damage`, damage
    after a checkpoint ends the replay instead (what `--recover-all` salvages:
    the plexes and their states, not which regions are dirty).
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SidecarError(f"{path}: cannot read sidecar log: {e.strerror}") from None
    repairs: list[str] = []
    state = _read_header(path, data, repairs)
    off = HEADER_SIZE
    seq = -1
    count = 0
    copy_end = -1  # where the second copy of the checkpoint ends (a new log's)
    while off < len(data):
        got = _unframe(data, off)
        if got is None or (seq >= 0 and got[0] != seq + 1):
            if count == 0:
                # The first checkpoint copy is damaged: its twin stands in.
                later = _find_valid_after(data, off + 1, seq)
                if later is not None and _checkpoint_copy(data, later) == 2:
                    repairs.append(f"checkpoint at offset {off} is damaged; using its copy at "
                                   f"offset {later}")
                    off = later
                    continue
            elif count == 1 and off < copy_end <= len(data):
                # The second copy is damaged; the first was whole, and the
                # copies have one length, so the records after it are found.
                repairs.append(f"the checkpoint's copy at offset {off} is damaged; the first "
                               f"copy was read")
                seq, off, count = seq + 1, copy_end, count + 1
                continue
            # Torn tail, or damage? Damage if any valid later record exists.
            later = _find_valid_after(data, off + 1, seq)
            if later is not None:
                msg = (f"{path}: record at offset {off} is damaged (bad checksum or framing) but "
                       f"valid records follow at offset {later}: the log cannot be trusted")
                if upto_damage and count:
                    repairs.append(msg)
                    return Replay(state=state, records=count, torn_bytes=0,
                                  repairs=repairs), off, seq
                raise SidecarError(msg)
            break
        rseq, end, payload = got
        try:
            rec, blobs = _decode(payload)
            if count == 0:
                if rec.get("t") != "ckpt":
                    raise SidecarError(f"{path}: log does not start with a checkpoint")
                state.load_checkpoint(rec, blobs)
                if rec.get("copy") == 1:
                    copy_end = end + (end - off)
            elif count == 1 and rec.get("t") == "ckpt" and rec.get("copy") == 2:
                pass  # the twin of the checkpoint just loaded
            else:
                state.apply(rec, blobs)
        except (ValueError, KeyError, TypeError, IndexError, zlib.error) as e:
            raise SidecarError(f"{path}: record at offset {off} (seq {rseq}) is invalid: {e}") from None
        seq, off, count = rseq, end, count + 1
    if count == 0:
        raise SidecarError(f"{path}: sidecar log holds no checkpoint (damaged or never finished)")
    return Replay(state=state, records=count, torn_bytes=len(data) - off, repairs=repairs), off, seq


def _find_valid_after(data: bytes, start: int, seq: int) -> int | None:
    magic = _REC.pack(REC_MAGIC, 0, 0, 0)[:4]
    i = data.find(magic, start)
    while i != -1:
        got = _unframe(data, i)
        if got is not None and got[0] > seq:
            return i
        i = data.find(magic, i + 1)
    return None


class SidecarLog:
    """Appends records to an open log; compacts it into a checkpoint."""

    def __init__(self, path: Path, fd: int, offset: int, seq: int,
                 compact_bytes: int = DEFAULT_COMPACT_BYTES):
        self.path = path
        self._fd = fd
        self._offset = offset
        self._seq = seq
        self.compact_bytes = compact_bytes
        self.lock = trio.Lock()
        self.syncs = 0  # fdatasync calls on the log (group-commit test counts them)
        self.appends = 0
        self.checkpoints = 0  # compactions done (tests check one happened)

    @classmethod
    def open(cls, path: Path) -> tuple["SidecarLog", Replay]:
        """Replay an existing log and open it for appending (drops a torn tail)."""
        # Lock first: another daemon's unfinished compaction is not ours to remove.
        fd = open_locked(path, os.O_RDWR | os.O_CLOEXEC, "sidecar log")
        try:
            tmp = path.with_name(path.name + ".new")
            if tmp.exists():
                # A compaction that did not reach its rename: the old log is whole.
                log.warning("%s: removing unfinished compaction %s", path, tmp)
                tmp.unlink()
            replay, end, seq = read_log(path)
            if replay.repairs:
                # Rewrite now, so that the log has two good copies again.
                fd, end, seq = _rewrite_damaged(path, fd, replay, seq)
            elif replay.torn_bytes:
                log.info("%s: dropping %d bytes of torn tail", path, replay.torn_bytes)
                os.ftruncate(fd, end)
                os.fsync(fd)
        except BaseException:
            close_locked(fd)
            raise
        return cls(path, fd, end, seq), replay

    @classmethod
    def create(cls, path: Path, state: VolumeState) -> "SidecarLog":
        """Write a new log holding `state` (crash-safe: via rename)."""
        data = _encode_file(state, 0)
        fd = _write_new(path, data, replace=False)
        try:
            fsync_dir(path.parent)
        except BaseException:
            close_locked(fd)
            raise
        return cls(path, fd, len(data), 1)

    def close(self) -> None:
        if self._fd >= 0:
            close_locked(self._fd)
            self._fd = -1

    @property
    def closed(self) -> bool:
        return self._fd < 0

    @property
    def size(self) -> int:
        return self._offset

    def needs_compaction(self) -> bool:
        return self._offset > self.compact_bytes

    async def append(self, build: Callable[[], dict[str, Any] | None], *, sync: bool) -> bool:
        """Append the record `build()` returns; `build` runs under the log lock
        with no checkpoint in between, so it may update in-memory state that
        the record describes. Returns False if build returned None."""
        async with self.lock:
            rec = build()
            if rec is None:
                return False
            await self._write_locked(_frame(self._seq + 1, rec), sync)
            return True

    async def sync(self) -> None:
        async with self.lock:
            await trio.to_thread.run_sync(os.fdatasync, self._fd)
            self.syncs += 1

    async def _write_locked(self, frame: bytes, sync: bool) -> None:
        fd, off = self._fd, self._offset

        def write() -> None:
            n = os.pwrite(fd, frame, off)
            if n != len(frame):  # a full disk: the record is not on disk
                raise OSError(28, f"short write to sidecar log {self.path} ({n} of {len(frame)})")
            if sync:
                os.fdatasync(fd)

        await trio.to_thread.run_sync(write)
        self._seq += 1
        self._offset += len(frame)
        self.appends += 1
        if sync:
            self.syncs += 1

    async def checkpoint(self, build: Callable[[], VolumeState]) -> None:
        """Compact: the log becomes one checkpoint of `build()` (run under the lock)."""
        async with self.lock:
            # Encode here, in the event loop: writers may change the state as
            # soon as we yield, and the checkpoint must be one moment's truth.
            seq = self._seq + 1
            data = _encode_file(build(), seq)
            fd = await trio.to_thread.run_sync(partial(_write_new, self.path, data, replace=True))
            # Once renamed, the old fd is an unlinked file: appends go to the new
            # one (already locked, so the lock never lapses) even if the
            # directory fsync fails.
            close_locked(self._fd)
            self._fd, self._seq, self._offset = fd, seq + 1, len(data)
            await trio.to_thread.run_sync(fsync_dir, self.path.parent)
            self.syncs += 1
            self.checkpoints += 1


def _encode_file(state: VolumeState, seq: int) -> bytes:
    """Header and the checkpoint twice (seq and seq + 1): one damaged copy
    leaves the other. The copies differ only in `copy`, so they are of one
    length and replay can step over a damaged second copy."""
    rec, blobs = state.encode()
    return (_header_bytes(state) + _frame(seq, {**rec, "copy": 1}, blobs)
            + _frame(seq + 1, {**rec, "copy": 2}, blobs))


def _rewrite_damaged(path: Path, fd: int, replay: Replay, seq: int) -> tuple[int, int, int]:
    """Replace a log that replay read around damage with a fresh one holding
    its state; the damaged log is kept as `<log>.damaged-<time>`. Returns the
    new (fd, end offset, last seq); `fd` (the old log's) is closed."""
    for why in replay.repairs:
        log.warning("%s: %s", path, why)
    aside = _keep_aside(path)
    data = _encode_file(replay.state, seq + 1)
    new_fd = _write_new(path, data, replace=True)
    try:
        fsync_dir(path.parent)
    except BaseException:
        close_locked(new_fd)  # the caller closes the old one
        raise
    close_locked(fd)
    log.warning("%s: rewritten from the state it holds; the damaged log is kept as %s",
                path, aside)
    return new_fd, len(data), seq + 2


def _keep_aside(path: Path) -> Path:
    """A copy of the damaged log at `<log>.damaged-<time>[.N]`: a hard link,
    or a copy where the filesystem has none. Its state replayed fine, so
    nothing here may refuse the volume but a failure to keep that copy."""
    stamp = time.strftime('%Y%m%d-%H%M%S')
    for n in range(100):
        aside = path.with_name(f"{path.name}.damaged-{stamp}" + (f".{n}" if n else ""))
        try:
            os.link(path, aside)
            return aside
        except FileExistsError:
            continue  # a second repair within the second
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            shutil.copy2(path, aside)  # no hard links here
            return aside
    raise OSError(errno.EEXIST, f"{path}: too many damaged copies kept this second")


def _write_new(path: Path, data: bytes, *, replace: bool) -> int:
    """data → path.new, fsync, then rename it over path (`replace`: a
    checkpoint of our own log) or link it to path, failing if a log appeared
    there meanwhile (a new log: never one that another daemon just made).
    Returns the new file open and locked, locked before it is truncated or
    published so that no other daemon can take it; the caller fsyncs the
    directory."""
    tmp = path.with_name(path.name + ".new")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        lock_exclusive(fd, tmp, "sidecar log")
        os.ftruncate(fd, 0)  # only now: it might have been another daemon's half-written file
        if os.write(fd, data) != len(data):
            raise OSError(28, f"short write to {tmp}")
        os.fsync(fd)
        if replace:
            os.rename(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                os.unlink(tmp)  # ours, locked: no one else's
                raise SidecarError(f"sidecar log {path} appeared while vmd was creating it "
                                   f"(another daemon starting the same volume?); not "
                                   f"overwritten") from None
            os.unlink(tmp)
    except BaseException:
        close_locked(fd)
        raise
    return fd


def new_state(name: str, size: int, region_size: int, fmr_region: int) -> VolumeState:
    return VolumeState(uuid=str(uuid.uuid4()), name=name, size=size,
                       region_size=region_size, fmr_region=fmr_region)
