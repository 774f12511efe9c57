"""Remote Copy, receiving side: applies an update stream to a volume of this
daemon (through the Volume API, so its plexes stay mirrored) with an undo
journal, so that B always holds one consistent point.

Apply: for each batch of data frames, the old contents of the bytes about to
be overwritten are appended to the journal `<log>.rcopy-journal` and fsync'd,
then the new data is written. A zero range (a hole of the source) is the same
as a write of zeros: the old contents of its allocated parts are journaled
(its holes read as zeros before and after), then it is punched (zeros written
where the plexes cannot punch). Commit: fdatasync the plexes, record the new
consistent point (sequence, time) in the sidecar log (a checkpoint), then
delete the journal. A failed update, or one cut off by `vmd stop`, is rolled
back at once (newest record first: the volume returns to its previous point);
a journal found at start (the daemon was killed) is rolled back then.

While an update is applied (and while the volume holds no consistent point at
all) reads of the volume fail with EBUSY; a target volume refuses writes
(EROFS) until `vmd rcopy promote`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import struct
import time
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from . import rcopy_proto as P
from .access import OPEN, Refusal
from .errors import VmdError
from .faults import rcopy_commit_fault
from .sidecar import fsync_dir
from .volume import Volume, Zeros

if TYPE_CHECKING:
    from .manager import VolumeManager

log = logging.getLogger(__name__)

BATCH = 4 * 1024 * 1024  # bytes applied per journal fsync
_JREC = struct.Struct("<QII")  # offset, length, crc32(offset|length|data)
JMAGIC = b"VMDRCJ01"
STOPPING = "the receiving daemon is stopping"
REPLY_SECONDS = 2.0  # bound on telling the sender why an update failed


def journal_path(vol: Volume) -> Path:
    return Path(vol.sidecar.path).with_name(Path(vol.sidecar.path).name + ".rcopy-journal")


def target_info(vol: Volume) -> dict[str, Any] | None:
    return vol.state.extra.get("rcopy_target")


class TargetRules:
    """Remote Copy's access rules for a volume it overwrites: a target refuses
    writes until promoted (EROFS), and reads while an update applies or before
    its first consistent point (EBUSY); a source taking a reverse refuses both."""

    def __init__(self, vol: Volume, syncing: bool):
        self.vol = vol
        self.syncing = syncing  # an update (or a reverse) is being applied

    def refuse_read(self) -> Refusal | None:
        if self.syncing or not (target_info(self.vol) or {}).get("seq"):
            return Refusal(errno.EBUSY, f"volume {self.vol.name} is syncing (remote copy "
                                        f"target)")
        return None

    def refuse_write(self) -> Refusal | None:
        name = self.vol.name
        if target_info(self.vol) is None:  # a source taking a reverse
            return Refusal(errno.EROFS, f"volume {name} is being overwritten by a remote copy "
                                        f"reverse")
        return Refusal(errno.EROFS, f"volume {name} is a remote copy target: `vmd rcopy "
                                    f"promote {name}` to write to it")


def syncing(vol: Volume) -> bool:
    return isinstance(vol.access, TargetRules) and vol.access.syncing


def set_access(vol: Volume, *, syncing_now: bool | None = None) -> None:
    """Make the volume's user I/O follow its remote copy state: writes refused
    unless promoted; reads refused while syncing or never consistent.
    `syncing_now`: whether an update is being applied (None: as it was)."""
    if syncing_now is None:
        syncing_now = syncing(vol)
    info = target_info(vol)
    if not syncing_now and (info is None or info.get("promoted")):
        vol.access = OPEN
    else:
        vol.access = TargetRules(vol, syncing_now)


def _write_all(fd: int, data: bytes, path: Path) -> None:
    """A short write (a nearly full filesystem) is an error: an undo record that
    is not wholly on disk would be dropped at rollback as a torn tail while
    its data write went ahead."""
    n = os.write(fd, data)
    if n != len(data):
        raise OSError(errno.ENOSPC, f"short write to undo journal {path} ({n} of {len(data)} "
                                    f"bytes): filesystem full?")


class Journal:
    def __init__(self, path: Path):
        self.path = path
        self.fd = -1

    def create(self, meta: dict[str, Any]) -> None:
        js = json.dumps(meta).encode()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        _write_all(fd, JMAGIC + struct.pack("<II", len(js), zlib.crc32(js)) + js, self.path)
        os.fsync(fd)
        fsync_dir(self.path.parent)
        self.fd = fd

    def append(self, pieces: list[tuple[int, bytes]]) -> None:
        buf = bytearray()
        for off, data in pieces:
            head = struct.pack("<QI", off, len(data))
            buf += _JREC.pack(off, len(data), zlib.crc32(data, zlib.crc32(head))) + data
        _write_all(self.fd, bytes(buf), self.path)
        os.fdatasync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def remove(self) -> None:
        self.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        fsync_dir(self.path.parent)


class BadJournalHeader(VmdError):
    pass


def read_journal(path: Path) -> tuple[dict[str, Any], list[tuple[int, bytes]]]:
    """(meta, undo records); a torn tail is dropped (its data write never began)."""
    data = path.read_bytes()
    if data[:8] != JMAGIC or len(data) < 16:
        raise BadJournalHeader(f"{path}: not an rcopy undo journal (empty or torn header)")
    n, crc = struct.unpack_from("<II", data, 8)
    js = data[16:16 + n]
    if len(js) != n or zlib.crc32(js) != crc:
        raise BadJournalHeader(f"{path}: damaged journal header")
    meta = json.loads(js)
    recs = []
    off = 16 + n
    while off + _JREC.size <= len(data):
        roff, length, rcrc = _JREC.unpack_from(data, off)
        body = data[off + _JREC.size: off + _JREC.size + length]
        head = struct.pack("<QI", roff, length)
        if len(body) < length or zlib.crc32(body, zlib.crc32(head)) != rcrc:
            break
        recs.append((roff, body))
        off += _JREC.size + length
    return meta, recs


async def rollback(m: "VolumeManager", vol: Volume, why: str) -> None:
    """Restore the last consistent point from the journal, if there is one."""
    path = journal_path(vol)
    if not path.exists():
        return
    try:
        meta, recs = await trio.to_thread.run_sync(read_journal, path)
    except BadJournalHeader as e:
        # The header is fsync'd before the first data write: without a whole
        # header, no byte of the volume changed under this journal.
        log.warning("volume %s: %s; no data was written under it: removed", vol.name, e)
        await trio.to_thread.run_sync(Journal(path).remove)
        return
    info = target_info(vol) or {}
    if info.get("seq") == meta.get("seq"):
        log.info("volume %s: update %s had committed; dropping its journal", vol.name,
                 meta.get("seq"))
    elif not meta.get("undo"):
        info["seq"], info["time"] = 0, None
        vol.state.extra["rcopy_target"] = info
        await vol.checkpoint()
        log.warning("volume %s: update %s (a full one onto a volume with no consistent point) "
                    "did not complete (%s): the volume holds no consistent point until the "
                    "next full update", vol.name, meta.get("seq"), why)
    else:
        for off, data in reversed(recs):
            await vol.pwrite_unguarded(off, data)
        await vol.flush()
        log.warning("volume %s: %s %s did not complete (%s): rolled back %d record(s) to %s",
                    vol.name, "reverse" if meta.get("reverse") else "update", meta.get("seq"),
                    why, len(recs), "this volume's own data (still the primary)"
                    if meta.get("reverse") else f"consistent point {info.get('seq')}")
    await trio.to_thread.run_sync(Journal(path).remove)
    await trio.to_thread.run_sync(m.on_changed, vol.name)


async def _abandon(m: "VolumeManager", vol: Volume, journal: Journal, why: str,
                   tell: trio.abc.SendStream) -> None:
    """An update that will not commit (bad stream, link dropped, or `vmd stop`): back
    to the last consistent point now. Shielded, and the daemon's stop waits for it; a
    crash in the middle leaves the journal, rolled back again (idempotent: each
    record restores old bytes) at the next start. Then the sender is told why."""
    journal.close()
    with trio.CancelScope(shield=True):
        await rollback(m, vol, why)
        set_access(vol, syncing_now=False)
        with trio.move_on_after(REPLY_SECONDS):  # a sender that reads no more
            await _reply(tell, {"t": "error", "error": f"{why} (volume {vol.name} rolled back)",
                                "need_full": False})


class _Undecided(Exception):
    """The checkpoint recording a new consistent point failed: it may have
    reached the disk (a rename done, its directory fsync failed) or not."""


# Volumes whose last commit is undecided: only the log read back at the next
# start can say which point they are at.
_undecided: set[str] = set()


async def _leave_undecided(vol: Volume, journal: Journal, seq: int, why: str,
                           tell: trio.abc.SendStream) -> None:
    """Neither roll back nor commit: rolling back data under a log that may
    already name the new point would label old data with it after a crash. The
    journal stays; at the next start `rollback` compares it with the durable
    log and does the right one. Until then the volume stays unreadable."""
    journal.close()
    _undecided.add(vol.name)
    log.error("volume %s: update %d: the new consistent point could not be recorded (%s); "
              "journal %s kept, the volume is unreadable until the daemon restarts",
              vol.name, seq, why, journal.path)
    with trio.CancelScope(shield=True), trio.move_on_after(REPLY_SECONDS):
        await _reply(tell, {"t": "error", "error": f"volume {vol.name}: update {seq} could not "
                            f"be recorded ({why})", "need_full": False})


def _why(e: BaseException) -> str:
    if isinstance(e, trio.Cancelled):
        return STOPPING
    if isinstance(e, (VmdError, OSError)):
        return str(e)
    return f"the link failed ({type(e).__name__}: {e})" if str(e) else \
        f"the link failed ({type(e).__name__})"


async def startup(m: "VolumeManager", vol: Volume) -> None:
    """At the volume's start: roll back an update a crash left unfinished."""
    if journal_path(vol).exists():
        await rollback(m, vol, "found at start")
    set_access(vol)


async def receive(m: "VolumeManager", vol: Volume, rfd: int, wfd: int,
                  active: set[str], source: Any = None) -> dict[str, Any]:
    """Apply one update stream. `source` is the volume's rcopy.Link when it is a
    source here: then only a reverse (from its promoted secondary) is taken."""
    rstream = trio.lowlevel.FdStream(rfd)
    wstream = trio.lowlevel.FdStream(wfd)
    info = target_info(vol) or {}
    why = ""
    if info.get("promoted"):
        why = (f"volume {vol.name} was promoted (it is writable and has its own changes); it "
               f"does not take updates")
    elif vol.name in active:
        why = f"volume {vol.name} is already receiving an update"
    elif vol.name in _undecided:
        why = (f"volume {vol.name}: the commit of its last update could not be recorded; "
               f"restart its daemon to settle which consistent point it holds")
    if why:
        await _reply(wstream, {"t": "error", "error": why, "need_full": False})
        with trio.CancelScope(shield=True):
            await rstream.aclose()
            await wstream.aclose()
        raise VmdError(why)
    active.add(vol.name)
    try:
        return await _receive(m, vol, P.Reader(rstream), wstream, info, source)
    finally:
        active.discard(vol.name)
        with trio.CancelScope(shield=True):
            for s in (rstream, wstream):
                try:
                    await s.aclose()
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                    pass


async def _reply(w: trio.abc.SendStream, obj: dict[str, Any]) -> None:
    try:
        await w.send_all(P.line(obj))
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def _receive(m: "VolumeManager", vol: Volume, r: P.Reader, w: trio.abc.SendStream,
                   info: dict[str, Any], source: Any) -> dict[str, Any]:
    committed = int(info.get("seq") or 0)
    try:
        await r.preamble()
        kind, payload = await r.frame()
        if kind != P.HEADER:
            raise P.ProtocolError("the stream does not start with a header frame")
        h = P.decode_json(payload, "header")
        if h.get("reverse") is not None:
            if r.version < 2:
                raise P.ProtocolError("a reverse needs protocol version 2")
            if source is None:
                raise P.ProtocolError(f"volume {vol.name} is not a remote copy source here: a "
                                      f"reverse goes to the volume the sender replicated")
            _check_reverse(vol, h, source)
        elif source is not None:
            raise P.ProtocolError(f"volume {vol.name} is a remote copy source here; it cannot "
                                  f"receive (only a reverse from its promoted target)")
        else:
            _check_header(vol, h, info, committed)
    except VmdError as e:
        need_full = getattr(e, "need_full", False)
        await _reply(w, {"t": "error", "error": str(e), "need_full": need_full})
        raise VmdError(f"volume {vol.name}: update rejected, volume unchanged: {e}") from None
    if h.get("reverse") is not None:
        async with source.lock:  # no update of ours runs while we are overwritten
            return await _receive_reverse(m, vol, r, w, h, source)
    seq, full = int(h["seq"]), bool(h["full"])
    await _reply(w, {"t": "ready", "committed": committed})

    # From here the volume is syncing until commit or rollback.
    if not info:
        info = {"seq": 0, "time": None}
    info.update(source=h["volume"], source_uuid=h["uuid"])
    vol.state.extra["rcopy_target"] = info
    set_access(vol, syncing_now=True)
    await vol.checkpoint()
    if journal_path(vol).exists():  # never truncate undo records not yet rolled back
        await rollback(m, vol, "left by an earlier update")
    journal = Journal(journal_path(vol))
    undo = committed > 0
    t0 = time.monotonic()
    try:
        await trio.to_thread.run_sync(journal.create, {"seq": seq, "base": committed,
                                                       "undo": undo, "started": time.time()})
        records, nbytes, pit = await _take_data(vol, r, journal, undo, h)
        # Commit: data durable, then the new consistent point, then no journal. Shielded:
        # a stop either comes before it (and rolls back) or waits for all of it.
        with trio.CancelScope(shield=True):
            await vol.flush()
            info.update(seq=seq, time=pit, committed_at=time.time(), full=full)
            vol.state.extra["rcopy_target"] = info
            try:
                rcopy_commit_fault(vol.name)
                await vol.checkpoint()
            except BaseException as e:
                raise _Undecided(str(e)) from e
            await trio.to_thread.run_sync(journal.remove)
    except _Undecided as e:
        await _leave_undecided(vol, journal, seq, str(e), w)
        raise VmdError(f"volume {vol.name}: update {seq}: its commit could not be recorded "
                       f"({e}); the volume stays unreadable until a restart settles it") from None
    except BaseException as e:
        # Cancelled: `vmd stop`. The update is given up like any failed one (a
        # link that broke mid-stream included), and the error reaches `vmd
        # rcopy receive`, whose stderr the sender reports.
        why = _why(e)
        await _abandon(m, vol, journal, why, w)
        if not isinstance(e, (Exception, trio.Cancelled)):
            raise  # KeyboardInterrupt, SystemExit: not ours to turn into an error
        raise VmdError(f"volume {vol.name}: update {seq} rejected, consistent point "
                       f"{committed} kept: {why}") from None
    set_access(vol, syncing_now=False)
    await trio.to_thread.run_sync(m.on_changed, vol.name)
    secs = time.monotonic() - t0
    log.info("volume %s: remote copy update %d committed (%d records, %d bytes, %.2f s)",
             vol.name, seq, records, nbytes, secs)
    await _reply(w, {"t": "ack", "seq": seq, "time": pit})
    return {"volume": vol.name, "seq": seq, "records": records, "bytes": nbytes, "seconds": secs}


async def _take_data(vol: Volume, r: P.Reader, journal: Journal, undo: bool,
                     h: dict[str, Any]) -> tuple[int, int, float]:
    """Read and apply the data frames up to the end frame: (records, bytes, time)."""
    records = nbytes = zbytes = 0
    batch: list[tuple[int, bytes | Zeros]] = []
    batch_bytes = 0
    while True:
        kind, payload = await r.frame()
        if kind in (P.DATA, P.ZERO):
            pieces = _pieces(vol, kind, payload)
            records += 1
            for off, data in pieces:
                if isinstance(data, Zeros):
                    zbytes += data
                else:
                    nbytes += len(data)
                batch.append((off, data))
                # A zero range counts at its length: its old bytes may all go to the journal.
                batch_bytes += len(data)
                if batch_bytes >= BATCH:
                    await _apply(vol, journal, batch, undo)
                    batch, batch_bytes = [], 0
        elif kind == P.END:
            e = P.decode_json(payload, "end frame")
            if (e.get("records") != records or e.get("bytes") != nbytes
                    or e.get("zero_bytes", 0) != zbytes):
                raise P.ProtocolError(f"end frame says {e.get('records')} records / "
                                      f"{e.get('bytes')} bytes / {e.get('zero_bytes', 0)} zero "
                                      f"bytes, the stream held {records} / {nbytes} / {zbytes}")
            pit = e.get("time", h["time"])
            if isinstance(pit, bool) or not isinstance(pit, (int, float)):
                raise P.ProtocolError(f"end frame has a malformed time {pit!r}")
            await _apply(vol, journal, batch, undo)
            return records, nbytes, float(pit)
        else:
            raise P.ProtocolError("a second header frame inside the stream")


def _pieces(vol: Volume, kind: int, payload: bytes) -> list[tuple[int, bytes | Zeros]]:
    """A data frame's (offset, bytes), or a zero frame's range cut into pieces
    of at most BATCH (the old bytes of one piece are read into memory)."""
    what = "data"
    if kind == P.DATA:
        if len(payload) < P.OFFSET.size:
            raise P.ProtocolError("data frame without an offset")
        (off,) = P.OFFSET.unpack_from(payload)
        data = payload[P.OFFSET.size:]
        n = len(data)
    else:
        what = "zero-range"
        if len(payload) != P.ZERO_RANGE.size:
            raise P.ProtocolError(f"zero-range frame of {len(payload)} bytes (not "
                                  f"{P.ZERO_RANGE.size})")
        off, n = P.ZERO_RANGE.unpack(payload)
    if off + n > vol.size or not n:
        raise P.ProtocolError(f"{what} frame at offset {off} of {n} bytes is outside volume "
                              f"{vol.name} ({vol.size} bytes)")
    if kind == P.DATA:
        return [(off, data)]
    return [(a, Zeros(min(BATCH, off + n - a))) for a in range(off, off + n, BATCH)]


def _check_reverse(vol: Volume, h: dict[str, Any], source: Any) -> None:
    try:
        seq, base, size = int(h["seq"]), int(h["base"]), int(h["size"])
        name, uid = str(h["volume"]), str(h["uuid"])
        float(h["time"])
        rev = h["reverse"]
        rev_uuid, rev_seq = str(rev["source_uuid"]), int(rev["seq"])
    except (KeyError, TypeError, ValueError) as e:
        raise P.ProtocolError(f"malformed reverse header: {e!r}") from None
    if size != vol.size:
        raise P.ProtocolError(f"the stream is for a volume of {size} bytes, {vol.name} has "
                              f"{vol.size}")
    if rev_uuid != vol.state.uuid:
        raise P.ProtocolError(f"the reverse from {name} ({uid}) is for volume {rev_uuid}, not "
                              f"{vol.name} ({vol.state.uuid})")
    if vol.openers:
        # As `snap back --from-snapshot`: a filesystem mounted on the old
        # primary keeps blocks in memory and writes them over the new bytes
        # (trial 10, T-A: its journal aborted, readers got a mix).
        raise P.ProtocolError(
            f"volume {vol.name} is open on the old primary (a loop device attached, or a "
            f"process holding its file): a reverse overwrites its bytes under the filesystem "
            f"on it. Unmount it there and detach its loop device (umount, losetup -d), then "
            f"run the reverse again")
    acked = int(source.ext.get("acked", 0))
    if seq <= max(acked, rev_seq) or base != rev_seq:
        raise P.ProtocolError(f"replayed or stale reverse: sequence {seq} on {rev_seq}, but "
                              f"{vol.name} sent up to sequence {acked}")


async def _receive_reverse(m: "VolumeManager", vol: Volume, r: P.Reader,
                           w: trio.abc.SendStream, h: dict[str, Any],
                           source: Any) -> dict[str, Any]:
    """This volume (the old primary) is overwritten with the promoted target's
    image: its own changes that the target never received are reported to the
    sender (which sends those regions too) and overwritten. On commit it
    becomes the target of the sender; on failure it is rolled back and stays
    the primary (its change map untouched)."""
    seq = int(h["seq"])
    rev_seq = int(h["reverse"]["seq"])
    async with vol.gate.hold():  # from here: no more writes of our own
        set_access(vol, syncing_now=True)
        unsent, why_full = source.unsent_map(rev_seq)
    if why_full:
        log.warning("volume %s: reverse from %s: %s: every region is sent back", vol.name,
                    h["volume"], why_full)
    unsent_bytes = unsent.bytes_covered()
    await _reply(w, {"t": "ready", "committed": int(source.ext.get("acked", 0)),
                     "unsent_bytes": unsent_bytes,
                     "map": P.encode_map(unsent.region, unsent.nbits, unsent.bits.tobytes())})
    if journal_path(vol).exists():  # as in _receive
        await rollback(m, vol, "left by an earlier update")
    journal = Journal(journal_path(vol))
    t0 = time.monotonic()
    try:
        await trio.to_thread.run_sync(journal.create, {"seq": seq, "base": rev_seq, "undo": True,
                                                       "reverse": True, "started": time.time()})
        records, nbytes, pit = await _take_data(vol, r, journal, True, h)
        with trio.CancelScope(shield=True):  # the commit, as in _receive
            await vol.flush()
            info = {"seq": seq, "time": pit, "committed_at": time.time(), "full": False,
                    "source": h["volume"], "source_uuid": h["uuid"], "reversed": True}
            try:
                await source.demote(info)  # one checkpoint: a target of the sender from now on
            except BaseException as e:
                raise _Undecided(str(e)) from e
            await trio.to_thread.run_sync(journal.remove)
    except _Undecided as e:  # as in _receive
        await _leave_undecided(vol, journal, seq, str(e), w)
        raise VmdError(f"volume {vol.name}: reverse {seq}: its commit could not be recorded "
                       f"({e}); the volume stays unreadable until a restart settles it") from None
    except BaseException as e:  # as in _receive
        why = _why(e)
        await _abandon(m, vol, journal, why, w)
        if not isinstance(e, (Exception, trio.Cancelled)):
            raise
        raise VmdError(f"volume {vol.name}: reverse {seq} rejected, volume unchanged (still "
                       f"the primary): {why}") from None
    set_access(vol, syncing_now=False)
    await trio.to_thread.run_sync(m.on_changed, vol.name)
    secs = time.monotonic() - t0
    log.log(logging.WARNING if unsent_bytes else logging.INFO,
            "volume %s: reversed: now the remote copy target of %s at sequence %d (%d bytes "
            "received in %.2f s); %d bytes of this volume's changes that were never sent were "
            "overwritten", vol.name, h["volume"], seq, nbytes, secs, unsent_bytes)
    await _reply(w, {"t": "ack", "seq": seq, "time": pit, "unsent_bytes": unsent_bytes})
    return {"volume": vol.name, "seq": seq, "records": records, "bytes": nbytes, "seconds": secs,
            "reverse": True, "overwritten_bytes": unsent_bytes}


class _NeedFull(P.ProtocolError):
    need_full = True


def _check_header(vol: Volume, h: dict[str, Any], info: dict[str, Any], committed: int) -> None:
    try:
        seq, base, size = int(h["seq"]), int(h["base"]), int(h["size"])
        full, name, uid = bool(h["full"]), str(h["volume"]), str(h["uuid"])
        float(h["time"])
    except (KeyError, TypeError, ValueError) as e:
        raise P.ProtocolError(f"malformed header: {e!r}") from None
    if size != vol.size:
        raise P.ProtocolError(f"the stream is for a volume of {size} bytes, {vol.name} has "
                              f"{vol.size}")
    src = info.get("source_uuid")
    if src and src != uid:
        raise P.ProtocolError(f"the stream comes from volume {name} ({uid}) but {vol.name} "
                              f"replicates {info.get('source')} ({src})")
    if seq <= committed:
        raise P.ProtocolError(f"replayed or stale update: sequence {seq}, but {vol.name} already "
                              f"holds sequence {committed}")
    if not committed and not full:
        raise _NeedFull(f"{vol.name} holds no consistent point: it needs a full update, got "
                        f"an incremental one on sequence {base}")
    if base > committed and not full:
        raise _NeedFull(f"the update applies on sequence {base} but {vol.name} holds sequence "
                        f"{committed}: it needs a full update")


async def _apply(vol: Volume, journal: Journal, batch: list[tuple[int, bytes | Zeros]],
                 undo: bool) -> None:
    if not batch:
        return
    if undo:
        old = []
        for off, data in batch:
            # A zero range: only what is allocated needs restoring at rollback
            # (what is a hole here reads as zeros before and after the punch).
            for a, n in (await vol.data_ranges(off, data) if isinstance(data, Zeros)
                         else [(off, len(data))]):
                old.append((a, await vol.pread_unguarded(a, n)))
        if old:
            await trio.to_thread.run_sync(journal.append, old)
    for off, data in batch:
        await vol.pwrite_unguarded(off, data)
