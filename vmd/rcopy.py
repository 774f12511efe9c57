"""Remote Copy: asynchronous periodic replication of a volume (HP 3PAR
asynchronous periodic mode) over a command's stdin/stdout.

Sending side. A SNAPLINK-like tracker `rcopy:link` (role "rcopy") records every
region written, with FastResync durability (DRL clean records carry its bits,
crash recovery adds the dirty regions). An update:

1. holds the volume's gate (no write in flight): M = tracker ∪ the last failed
   update's map; the tracker starts empty; M is kept in the sidecar log as
   `inflight` (a checkpoint) — so a crash or a failed transfer retries
   M ∪ new changes. Nothing is forgotten before the receiver acknowledges.
2. sends the regions of M, reading them from the volume. A write to a region
   of M not yet sent first saves the bytes it overwrites (copy-on-write,
   through `Volume.before_write`): the sent region is the current data with
   those saved bytes laid over it, i.e. the image at step 1, never a mixture.
   A full update sends the holes of the volume (`Volume.data_ranges`) as zero
   ranges ('Z' frames, protocol version 3), not their bytes (a hole that a
   copy-on-write save overlaps goes as zeros only if the saved bytes are
   zeros). VMD_RCOPY_DENSE=1 sends every byte (for comparisons).
3. on the receiver's ack: the acknowledged sequence and time become the last
   consistent point and `inflight` is dropped.

Failover and return: `promote` on the target makes it writable and starts its
own tracker; `reverse` on it turns it into a source (of a link kept in its
sidecar log, the command given with --target) whose first update is a
reverse: the old primary reports the regions it changed that the target never
got (its tracker + unacknowledged update), the target sends the union of those
and of its own changes, and the old primary, once it committed, is the target.
Which role a volume has is in its sidecar log: a target (`rcopy_target`, also
when promoted) takes no role from the config; a source from the log's link
target, else from the config.

The receiving side is in rcopy_recv.py; the wire format in rcopy_proto.py.
"""

from __future__ import annotations

import base64
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import trio
from bitarray import bitarray

from . import events
from . import rcopy_proto as P
from .config import RcopyConfig, format_size
from .errors import VmdError
from .rcopy_link import LinkCommand, Refused
from .regionmap import RegionMap
from .sidecar import SNAPLINK, PlexRecord
from .volume import Volume

log = logging.getLogger(__name__)

TRACKER = "rcopy:link"
READY_TIMEOUT = 60.0
DENSE_ENV = "VMD_RCOPY_DENSE"  # "1": a full update sends holes as bytes too
WINDOW = 64 * 1024 * 1024  # the span whose allocation one lseek walk asks for


def tracker(vol: Volume) -> PlexRecord | None:
    return vol.state.plex(TRACKER)


def add_tracker(vol: Volume, full: bool) -> PlexRecord:
    from .plex import Plex

    rec = PlexRecord(name=TRACKER, path="", state=SNAPLINK, missing=vol.state.new_map(fill=full),
                     role="rcopy")
    vol.state.plexes.append(rec)
    vol.plexes.append(Plex(rec, vol.size))  # never opened: it only tracks writes
    return rec


def drop_tracker(vol: Volume) -> None:
    for p in list(vol.plexes):
        if p.state == SNAPLINK and p.name == TRACKER:
            vol.plexes.remove(p)
            vol.state.plexes.remove(p.record)


def _enc(m: RegionMap) -> str:
    return base64.b64encode(m.to_bytes()).decode()


def _dec(vol: Volume, s: str) -> RegionMap:
    return RegionMap.from_bytes(vol.size, vol.state.fmr_region, base64.b64decode(s))


class Transfer:
    """One update in flight: its map, what was sent, and the copy-on-write saves."""

    def __init__(self, m: RegionMap):
        self.map = m
        self.done = bitarray(m.nbits)
        self.done.setall(0)
        self.saves: dict[int, list[tuple[int, bytes]]] = {}
        self.saved_bytes = 0
        self.sent_bytes = 0  # bytes of data frames
        self.zero_bytes = 0  # bytes sent as zero ranges (holes), not as data
        self.broken = ""  # a copy-on-write read failed: this update cannot be trusted
        self.total_bytes = m.bytes_covered()


class _Allocation:
    """The volume's allocated ranges, asked for WINDOW bytes at a time (one lseek
    walk per window, not per chunk). A range that was a hole when asked reads
    as zeros at the point in time too: a write since then saved those zeros
    (copy-on-write), and nothing punches a source's plexes."""

    def __init__(self, vol: Volume):
        self.vol = vol
        self.start = self.end = 0
        self.ranges: list[tuple[int, int]] = []

    async def within(self, off: int, n: int) -> list[tuple[int, int]]:
        end = off + n
        if off < self.start or end > self.end:
            self.start, self.end = off, min(self.vol.size, off + max(n, WINDOW))
            self.ranges = await self.vol.data_ranges(self.start, self.end - self.start)
        return [(max(a, off), min(a + k, end) - max(a, off)) for a, k in self.ranges
                if a < end and a + k > off]


Piece = tuple[int, bytes | memoryview | int]  # (offset, data) or (offset, length of zeros)


class Link:
    """The Remote Copy of one source volume."""

    def __init__(self, vol: Volume, cfg: RcopyConfig):
        self.vol = vol
        self.cfg = cfg
        self.on_demoted: Callable[[], None] | None = None  # it leaves the daemon's links
        self.lock = trio.Lock()
        self.xfer: Transfer | None = None
        self.last: dict[str, Any] = {}
        self.command = LinkCommand()

    @property
    def ext(self) -> dict[str, Any]:
        return self.vol.state.extra.setdefault("rcopy", {"acked": 0, "next_seq": 1})

    # -- setup ---------------------------------------------------------------

    async def setup(self) -> None:
        vol, ext = self.vol, self.ext
        rec = tracker(vol)
        if rec is None:
            add_tracker(vol, full=True)
            if ext.get("acked"):
                log.warning("volume %s: remote copy change map is missing: the next update is "
                            "a full one", vol.name)
            else:
                log.info("volume %s: remote copy to %s: the first update sends the whole volume",
                         vol.name, " ".join(self.cfg.target))
        elif rec.missing is None:
            rec.missing = vol.state.new_map(fill=True)
            log.warning("volume %s: remote copy change map was dropped (FastResync off or a "
                        "log rebuilt): the next update is a full one", vol.name)
        if ext.get("inflight"):
            try:
                m = _dec(vol, ext["inflight"])
                tracker(vol).missing.union(m)  # type: ignore[union-attr]
            except (ValueError, TypeError) as e:
                tracker(vol).missing.fill()  # type: ignore[union-attr]
                log.warning("volume %s: remote copy map of the unfinished update cannot be read "
                            "(%s): the next update is a full one", vol.name, e)
            ext["inflight"] = None
        await vol.checkpoint()
        vol.before_write = self.before_write

    # -- copy-on-write -------------------------------------------------------

    async def before_write(self, off: int, n: int) -> None:
        x = self.xfer
        if x is None:
            return
        m = x.map
        span = m.span(off, n)
        if not (m.bits[span.start:span.stop] & ~x.done[span.start:span.stop]).any():
            return
        R = m.region
        for r in span:
            if not m.bits[r] or x.done[r]:
                continue
            a, b = max(off, r * R), min(off + n, (r + 1) * R)
            # Under this write's range lock: the bytes it is about to overwrite.
            try:
                data = await self.vol._read_any(a, b - a)
            except OSError as e:
                x.broken = f"copy-on-write read at offset {a} failed: {e}"
                return
            if self.xfer is x and not x.done[r]:
                x.saves.setdefault(r, []).append((a, data))
                x.saved_bytes += len(data)

    # -- an update -----------------------------------------------------------

    async def update(self, why: str = "") -> dict[str, Any]:
        async with self.lock:
            try:
                return await self._update(why)
            except VmdError:
                if not self.ext.get("need_full") or self.ext.get("reverse") is not None:
                    raise
            # The target refused an incremental update and asked for a full
            # one (another target volume, or one that lost its consistent
            # point): send it now, rather than fail a `vmd rcopy sync` that
            # the next one would then have to repeat.
            log.info("volume %s: sending a full update, as the target asked", self.vol.name)
            return await self._update(why)

    async def _take(self, extra: RegionMap | None = None) -> tuple[Transfer, float]:
        """The point in time: M = tracker ∪ failed update ∪ extra, recorded durably."""
        vol, ext = self.vol, self.ext
        async with vol.gate.hold():
            rec = tracker(vol)
            assert rec is not None
            if rec.missing is None:
                rec.missing = vol.state.new_map(fill=True)
                log.warning("volume %s: remote copy change map was dropped: full update", vol.name)
            m = rec.missing.copy()
            if ext.get("inflight"):
                m.union(_dec(vol, ext["inflight"]))
            if ext.pop("need_full", None):
                m.fill()
            if extra is not None:
                m.union(extra)
            rec.missing = vol.state.new_map()
            ext["inflight"] = _enc(m)
            pit = time.time()
            await vol.checkpoint()
            x = self.xfer = Transfer(m)
        return x, pit

    async def _update(self, why: str) -> dict[str, Any]:
        vol, ext = self.vol, self.ext
        rev = ext.get("reverse")
        seq = int(ext.get("next_seq", 1))
        ext["next_seq"] = seq + 1
        st: dict[str, Any] = {}
        if rev is None:
            st["x"], st["pit"] = await self._take()
            base = int(ext.get("acked", 0))
        else:
            await vol.checkpoint()  # the sequence number is used
            base = int(rev["seq"])
        x: Transfer | None = st.get("x")
        full = bool(x is not None and x.map.bits.all())
        t0 = time.monotonic()
        self.last = {"seq": seq, "base": base, "full": full, "started": st.get("pit", time.time()),
                     "state": "sending", "total_bytes": x.total_bytes if x else None,
                     "reverse": rev is not None}
        try:
            ack = await self._send(st, seq, base, full, rev)
        except (VmdError, OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
            msg = str(e) or type(e).__name__
            x = st.get("x")
            self.last.update(state="failed", error=msg, sent_bytes=x.sent_bytes if x else 0,
                             seconds=time.monotonic() - t0)
            what = "reverse" if rev is not None else "update"
            log.warning("volume %s: remote copy %s %d failed (retried at the next one): %s",
                        vol.name, what, seq, msg)
            events.emit(events.RCOPY_FAILED, vol.name, seq=seq, reverse=rev is not None, error=msg)
            raise VmdError(f"volume {vol.name}: remote copy {what} {seq} failed: {msg}") from None
        finally:
            self.xfer = None
        x, pit = st["x"], st["pit"]
        ext["acked"], ext["time"] = seq, pit
        ext["inflight"] = None
        ext.pop("reverse", None)
        ext["bytes_total"] = int(ext.get("bytes_total", 0)) + x.sent_bytes
        await vol.checkpoint()
        secs = time.monotonic() - t0
        self.last.update(state="done", sent_bytes=x.sent_bytes, zero_bytes=x.zero_bytes,
                         cow_bytes=x.saved_bytes, total_bytes=x.total_bytes, seconds=secs,
                         error=None)
        out = {"volume": vol.name, "seq": ack, "time": pit, "sent_bytes": x.sent_bytes,
               "zero_bytes": x.zero_bytes, "full": full, "seconds": secs,
               "cow_bytes": x.saved_bytes}
        events.emit(events.RCOPY_COMMITTED, vol.name, seq=ack, point_in_time=pit, full=full,
                    sent_bytes=x.sent_bytes, seconds=round(secs, 3), reverse=rev is not None)
        if rev is not None:
            out.update(reverse=True, own_bytes=st["own_bytes"],
                       overwritten_bytes=st["overwritten_bytes"], size=vol.size)
            self.last.update(overwritten_bytes=st["overwritten_bytes"])
            log.log(logging.WARNING if st["overwritten_bytes"] else logging.INFO,
                    "volume %s: reverse %d committed by %s, now its remote copy target: %s sent "
                    "(%s changed here since the promote) in %.2f s; %s of changes made there "
                    "and never sent here were overwritten", vol.name, seq,
                    rev.get("source") or "the old primary", format_size(x.sent_bytes),
                    format_size(st["own_bytes"]), secs, format_size(st["overwritten_bytes"]))
        else:
            log.info("volume %s: remote copy update %d committed by the target: %s sent%s%s in "
                     "%.2f s", vol.name, seq, format_size(x.sent_bytes),
                     f" and {format_size(x.zero_bytes)} of holes as zero ranges"
                     if x.zero_bytes else "", " (full)" if full else "", secs)
        return out

    async def _send(self, st: dict[str, Any], seq: int, base: int, full: bool,
                    rev: dict[str, Any] | None) -> int:
        ack, err = await self.command.run(
            self.cfg.target, lambda proc: self._speak(st, proc, seq, base, full, rev))
        x = st.get("x")
        if x is not None and x.broken:
            raise VmdError(x.broken)
        if ack is None:
            raise VmdError(err)
        return ack

    async def _speak(self, st: dict[str, Any], proc: Any, seq: int, base: int, full: bool,
                     rev: dict[str, Any] | None) -> int:
        vol = self.vol
        out = proc.stdin
        replies = P.Reader(proc.stdout)
        h = {"volume": vol.name, "uuid": vol.state.uuid, "size": vol.size,
             "region": vol.state.fmr_region, "seq": seq, "base": base, "full": full,
             "time": st.get("pit", time.time())}
        if rev is not None:
            h["reverse"] = {"source_uuid": rev["source_uuid"], "seq": int(rev["seq"])}
        sparse = full and os.environ.get(DENSE_ENV, "") != "1"
        await out.send_all(P.preamble(P.VERSION if sparse else P.NO_ZEROS)
                           + P.json_frame(P.HEADER, h))
        with trio.fail_after(READY_TIMEOUT):
            msg = await replies.line(P.MAX_MAP_LINE if rev is not None else P.MAX_LINE)
        self._check_reply(msg, "ready")
        assert msg is not None
        if rev is not None:
            theirs = self._their_map(msg)
            own = tracker(vol)
            own_m = own.missing.copy() if own is not None and own.missing is not None else \
                vol.state.new_map(fill=True)
            if self.ext.get("inflight"):
                own_m.union(_dec(vol, self.ext["inflight"]))
            st["own_bytes"] = own_m.bytes_covered()
            st["overwritten_bytes"] = msg["unsent_bytes"]  # checked by _their_map
            st["x"], st["pit"] = await self._take(theirs)
        x: Transfer = st["x"]
        m = x.map
        R = m.region
        records = 0
        alloc = _Allocation(vol) if sparse else None
        zeros = [0, 0]  # a zero range not sent yet: adjacent holes go as one frame

        async def send_zeros() -> None:
            nonlocal records
            if zeros[1]:
                await out.send_all(P.zero_frame(*zeros))
                records += 1
                zeros[1] = 0

        for start, count in m.runs(max(1, P.CHUNK // R)):
            for a, piece in await self._read_run(x, alloc, start, count):
                if isinstance(piece, int):
                    if zeros[0] + zeros[1] != a:
                        await send_zeros()
                        zeros[0] = a
                    zeros[1] += piece
                    x.zero_bytes += piece
                else:
                    await send_zeros()
                    await out.send_all(P.data_frame(a, piece))
                    records += 1
                    x.sent_bytes += len(piece)
            self.last.update(sent_bytes=x.sent_bytes, zero_bytes=x.zero_bytes)
        await send_zeros()
        end = {"records": records, "bytes": x.sent_bytes, "time": st["pit"]}
        if sparse:
            end["zero_bytes"] = x.zero_bytes
        await out.send_all(P.json_frame(P.END, end))
        msg = await replies.line()
        self._check_reply(msg, "ack")
        if msg.get("seq") != seq:  # type: ignore[union-attr]
            raise P.ProtocolError(f"the target acknowledged sequence {msg.get('seq')}, "  # type: ignore[union-attr]
                                  f"not {seq}")
        return seq

    async def _read_run(self, x: Transfer, alloc: _Allocation | None, start: int,
                        count: int) -> list[Piece]:
        """Regions [start, start+count) as they were at the point in time: data
        pieces, and (with `alloc`) the holes as lengths of zeros."""
        vol, R = self.vol, x.map.region
        off = start * R
        n = min(count * R, vol.size - off)
        ranges = await alloc.within(off, n) if alloc is not None else [(off, n)]
        data = bytearray(n)
        if ranges:  # one read from the first allocated byte to the last
            a, b = ranges[0][0], ranges[-1][0] + ranges[-1][1]
            data[a - off:b - off] = await vol.pread_unguarded(a, b - a)
        x.done[start:start + count] = 1
        saved = False
        for r in range(start, start + count):
            # Newest save first, so that the oldest (the point in time) wins.
            for a, old in reversed(x.saves.pop(r, [])):
                data[a - off:a - off + len(old)] = old
                saved = True
        if alloc is None:
            return [(off, data)]
        view = memoryview(data)
        kinds: list[tuple[int, int, bool]] = []  # (offset, length, zeros)
        pos = off
        for a, k in ranges + [(off + n, 0)]:
            if a > pos:
                zero = not saved or data.count(0, pos - off, a - off) == a - pos
                kinds.append((pos, a - pos, zero))
            if k:
                kinds.append((a, k, False))
            pos = a + k
        out: list[Piece] = []
        i = 0
        while i < len(kinds):  # adjacent pieces of one kind in one
            a, k, z = kinds[i]
            while i + 1 < len(kinds) and kinds[i + 1][2] == z:
                i += 1
                k += kinds[i][1]
            out.append((a, k) if z else (a, view[a - off:a - off + k]))
            i += 1
        return out

    def _their_map(self, msg: dict[str, Any]) -> RegionMap:
        """The old primary's unsent changes (its `ready` of a reverse), in our regions."""
        vol = self.vol
        region, raw = P.decode_map(msg.get("map"), vol.size)
        unsent = msg.get("unsent_bytes")
        if isinstance(unsent, bool) or not isinstance(unsent, int) or not 0 <= unsent <= vol.size:
            raise P.ProtocolError(f"the old primary reported {unsent!r} unsent bytes")
        bits = bitarray()
        bits.frombytes(raw)
        theirs = RegionMap(vol.size, region)
        theirs.bits = bits[:theirs.nbits]
        if theirs.bytes_covered() != unsent:
            raise P.ProtocolError(f"the old primary reported {unsent} unsent bytes but its map "
                                  f"covers {theirs.bytes_covered()}")
        out = vol.state.new_map()
        if region == out.region:
            out.union(theirs)
        else:
            out.mark_regions_of(theirs, theirs.set_indices())
        self.last["overwritten_bytes"] = unsent
        return out

    def changed_map(self) -> tuple[RegionMap, str]:
        """The regions changed since the target's consistent point (the tracker and
        the unacknowledged update), and why that is every region (or "")."""
        vol, ext = self.vol, self.ext
        rec = tracker(vol)
        if rec is None or rec.missing is None:
            return vol.state.new_map(fill=True), "the change map is missing"
        if ext.get("need_full"):
            return vol.state.new_map(fill=True), "the target needed a full update"
        m = rec.missing.copy()
        if ext.get("inflight"):
            try:
                m.union(_dec(vol, ext["inflight"]))
            except (ValueError, TypeError) as e:
                return vol.state.new_map(fill=True), f"the unfinished update's map is bad ({e})"
        return m, ""

    # -- seen from the receiving side of a reverse (this volume is the old primary) --

    def unsent_map(self, rev_seq: int) -> tuple[RegionMap, str]:
        """The regions changed here that a target holding `rev_seq` may lack, and why
        that is every region (or "")."""
        acked = int(self.ext.get("acked", 0))
        if rev_seq < acked:
            return self.vol.state.new_map(fill=True), (f"the target holds sequence {rev_seq}, "
                                                       f"older than the acknowledged {acked}")
        return self.changed_map()

    async def demote(self, info: dict[str, Any]) -> None:
        """The reverse committed here: this volume is now a target (one checkpoint)."""
        vol = self.vol
        async with vol.gate.hold():
            vol.before_write = None
            drop_tracker(vol)
            vol.state.extra.pop("rcopy", None)
            vol.state.extra["rcopy_target"] = info
            await vol.checkpoint()
        if self.on_demoted is not None:
            self.on_demoted()

    def _check_reply(self, msg: dict[str, Any] | None, want: str) -> None:
        if msg is None:
            raise P.ProtocolError(f"the link closed before the target's {want}")
        if msg.get("t") == "error":
            if msg.get("need_full"):
                self.ext["need_full"] = True
                log.warning("volume %s: the target needs a full update: %s", self.vol.name,
                            msg.get("error"))
            raise Refused(f"the target refused the update: {msg.get('error')}")
        if msg.get("t") != want:
            raise P.ProtocolError(f"expected {want!r} from the target, got {msg!r}")

    def status(self) -> dict[str, Any]:
        ext = self.ext
        changed, why_full = self.changed_map()
        if not why_full and changed.bits.all():
            why_full = ("no update has reached the target yet" if not ext.get("acked") else
                        "every region is marked changed (a new or dropped change map)")
        t = ext.get("time")
        x = self.xfer
        return {
            "volume": self.vol.name, "role": "source", "target": " ".join(self.cfg.target),
            "period": self.cfg.period, "paused": bool(ext.get("paused")),
            "state": "sending" if x is not None else "idle",
            "sequence": int(ext.get("acked", 0)), "time": t,
            "lag_seconds": None if t is None else time.time() - t,
            # What the next update sends at least (the whole volume when it is a full one).
            "pending_bytes": self.vol.size if why_full else changed.bytes_covered(),
            "next_full": bool(why_full), "next_full_why": why_full or None,
            "unacknowledged": bool(ext.get("inflight")),
            "bytes_sent_total": int(ext.get("bytes_total", 0)),
            "last_update": self.last or None,
            "reverse_pending": bool(ext.get("reverse")),
        }
