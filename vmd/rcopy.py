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
import time
from collections import deque
from typing import Any

import trio
from bitarray import bitarray

from . import rcopy_proto as P
from . import rcopy_recv
from .commands import CommandTable, req_str
from .config import RcopyConfig, format_size, parse_duration
from .errors import VmdError
from .manager import VolumeManager
from .regionmap import RegionMap
from .sidecar import SNAPLINK, PlexRecord
from .volume import Volume

log = logging.getLogger(__name__)

TRACKER = "rcopy:link"
EXIT_GRACE = 2.0  # seconds to wait for the ack after the link command exited
READY_TIMEOUT = 60.0


def _tracker(vol: Volume) -> PlexRecord | None:
    return vol.state.plex(TRACKER)


def _add_tracker(vol: Volume, full: bool) -> PlexRecord:
    from .plex import Plex

    rec = PlexRecord(name=TRACKER, path="", state=SNAPLINK, missing=vol.state.new_map(fill=full),
                     role="rcopy")
    vol.state.plexes.append(rec)
    vol.plexes.append(Plex(rec, vol.size))  # never opened: it only tracks writes
    return rec


def _drop_tracker(vol: Volume) -> None:
    for p in list(vol.plexes):
        if p.state == SNAPLINK and p.name == TRACKER:
            vol.plexes.remove(p)
            vol.state.plexes.remove(p.record)


def _enc(m: RegionMap) -> str:
    return base64.b64encode(m.to_bytes()).decode()


def _dec(vol: Volume, s: str) -> RegionMap:
    return RegionMap.from_bytes(vol.size, vol.state.fmr_region, base64.b64decode(s))


class Refused(VmdError):
    """The target answered with an error: the link itself worked."""


async def _aclose_quietly(stream: Any) -> None:
    try:
        await stream.aclose()
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass


class Transfer:
    """One update in flight: its map, what was sent, and the copy-on-write saves."""

    def __init__(self, m: RegionMap):
        self.map = m
        self.done = bitarray(m.nbits)
        self.done.setall(0)
        self.saves: dict[int, list[tuple[int, bytes]]] = {}
        self.saved_bytes = 0
        self.sent_bytes = 0
        self.broken = ""  # a copy-on-write read failed: this update cannot be trusted
        self.total_bytes = m.bytes_covered()


class Link:
    """The Remote Copy of one source volume."""

    def __init__(self, vol: Volume, cfg: RcopyConfig):
        self.vol = vol
        self.cfg = cfg
        self.engine: Engine | None = None
        self.scope: trio.CancelScope | None = None
        self.lock = trio.Lock()
        self.xfer: Transfer | None = None
        self.wake = trio.Event()
        self.last: dict[str, Any] = {}
        self.stderr: deque[str] = deque(maxlen=8)  # the link command's last lines

    @property
    def ext(self) -> dict[str, Any]:
        return self.vol.state.extra.setdefault("rcopy", {"acked": 0, "next_seq": 1})

    # -- setup ---------------------------------------------------------------

    async def setup(self) -> None:
        vol, ext = self.vol, self.ext
        rec = _tracker(vol)
        if rec is None:
            _add_tracker(vol, full=True)
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
                _tracker(vol).missing.union(m)  # type: ignore[union-attr]
            except (ValueError, TypeError) as e:
                _tracker(vol).missing.fill()  # type: ignore[union-attr]
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
            return await self._update(why)

    async def _take(self, extra: RegionMap | None = None) -> tuple[Transfer, float]:
        """The point in time: M = tracker ∪ failed update ∪ extra, recorded durably."""
        vol, ext = self.vol, self.ext
        async with vol.gate.hold():
            rec = _tracker(vol)
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
        self.last.update(state="done", sent_bytes=x.sent_bytes, cow_bytes=x.saved_bytes,
                         total_bytes=x.total_bytes, seconds=secs, error=None)
        out = {"volume": vol.name, "seq": ack, "time": pit, "sent_bytes": x.sent_bytes,
               "full": full, "seconds": secs, "cow_bytes": x.saved_bytes}
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
            log.info("volume %s: remote copy update %d committed by the target: %s sent%s in "
                     "%.2f s", vol.name, seq, format_size(x.sent_bytes),
                     " (full)" if full else "", secs)
        return out

    async def _send(self, st: dict[str, Any], seq: int, base: int, full: bool,
                    rev: dict[str, Any] | None) -> int:
        self.stderr.clear()
        proc = await trio.lowlevel.open_process(
            list(self.cfg.target), stdin=-1, stdout=-1, stderr=-1)  # -1: subprocess.PIPE
        result: dict[str, Any] = {}
        try:
            async with trio.open_nursery() as nursery:
                stderr_done = trio.Event()
                nursery.start_soon(self._drain_stderr, proc.stderr, stderr_done)
                finished = trio.Event()

                async def watch() -> None:
                    rc = await proc.wait()
                    with trio.move_on_after(EXIT_GRACE):
                        await finished.wait()
                    if not finished.is_set():
                        result.update(error=f"the link command exited with status {rc}",
                                      link_fault=True)
                        nursery.cancel_scope.cancel()

                nursery.start_soon(watch)
                try:
                    result["ack"] = await self._speak(st, proc, seq, base, full, rev)
                except Refused as e:
                    result["error"] = str(e)  # the target's own words: the link worked
                    finished.set()
                except (VmdError, OSError, trio.BrokenResourceError, trio.ClosedResourceError,
                        trio.TooSlowError) as e:
                    result["error"] = str(e) or (
                        "the link closed (broken pipe)" if isinstance(e, trio.BrokenResourceError)
                        else type(e).__name__)
                    result["link_fault"] = True
                    finished.set()
                    # Why the link failed is on its stderr ("no volume named ...", "Connection
                    # refused", "vmd: not found"), often written just before it exits: read
                    # it to the end. Closing its stdin ends a link still waiting for data.
                    await _aclose_quietly(proc.stdin)
                    with trio.move_on_after(EXIT_GRACE):
                        await stderr_done.wait()
                finished.set()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                for s in (proc.stdin, proc.stdout, proc.stderr):
                    await _aclose_quietly(s)
                with trio.move_on_after(10):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
        x = st.get("x")
        if x is not None and x.broken:
            raise VmdError(x.broken)
        if "ack" in result:
            return result["ack"]
        err = result.get("error") or "the transfer was interrupted"
        if result.get("link_fault"):
            err += self._link_said(proc.returncode)
        raise VmdError(err)

    def _link_said(self, rc: int | None) -> str:
        """What the link command left on its stderr, and how it ended: the cause of
        a link failure, for the CLI, `rcopy status` and the log alike."""
        said = "; ".join(self.stderr)
        how = "" if rc is None else f"exit status {rc}" if rc >= 0 else f"killed by signal {-rc}"
        if said:
            return f"; the link command said: {said}" + (f" [{how}]" if how else "")
        return f"; the link command ended ({how or 'still running'}) with nothing on its stderr"

    def _stderr_line(self, ln: bytes) -> None:
        ln = ln.strip()  # ssh ends its lines with \r\n
        if ln:
            self.stderr.append(ln.decode(errors="replace")[:300])

    async def _drain_stderr(self, stream: Any, done: trio.Event) -> None:
        buf = b""
        try:
            while chunk := await stream.receive_some(65536):
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for ln in lines:
                    self._stderr_line(ln)
            self._stderr_line(buf)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            done.set()

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
        await out.send_all(P.preamble() + P.json_frame(P.HEADER, h))
        with trio.fail_after(READY_TIMEOUT):
            msg = await replies.line(P.MAX_MAP_LINE if rev is not None else P.MAX_LINE)
        self._check_reply(msg, "ready")
        assert msg is not None
        if rev is not None:
            theirs = self._their_map(msg)
            own = _tracker(vol)
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
        for start, count in m.runs(max(1, P.CHUNK // R)):
            off = start * R
            n = min(count * R, vol.size - off)
            data = bytearray(await Volume.pread(vol, off, n))
            x.done[start:start + count] = 1
            for r in range(start, start + count):
                # Newest save first, so that the oldest (the point in time) wins.
                for a, saved in reversed(x.saves.pop(r, [])):
                    data[a - off:a - off + len(saved)] = saved
            await out.send_all(P.data_frame(off, data))
            records += 1
            x.sent_bytes += n
            self.last["sent_bytes"] = x.sent_bytes
        await out.send_all(P.json_frame(P.END, {"records": records, "bytes": x.sent_bytes,
                                                "time": st["pit"]}))
        msg = await replies.line()
        self._check_reply(msg, "ack")
        if msg.get("seq") != seq:  # type: ignore[union-attr]
            raise P.ProtocolError(f"the target acknowledged sequence {msg.get('seq')}, "  # type: ignore[union-attr]
                                  f"not {seq}")
        return seq

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
        rec = _tracker(vol)
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
            _drop_tracker(vol)
            vol.state.extra.pop("rcopy", None)
            vol.state.extra["rcopy_target"] = info
            await vol.checkpoint()
        if self.engine is not None:
            self.engine.remove(self)

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

    # -- periodic ------------------------------------------------------------

    async def run(self) -> None:
        period = self.cfg.period
        while True:
            with trio.move_on_after(period if period > 0 else float("inf")):
                await self.wake.wait()
            self.wake = trio.Event()
            if self.ext.get("paused"):
                continue
            try:
                await self.update("periodic")
            except VmdError:
                pass  # logged; retried next period

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


class Engine:
    def __init__(self, manager: VolumeManager):
        self.manager = manager
        self.links: dict[str, Link] = {}
        self.receiving: set[str] = set()
        self.scopes: set[trio.CancelScope] = set()
        self.idle = trio.Event()
        self.idle.set()
        self.stopping = False
        self.nursery: trio.Nursery | None = None

    @staticmethod
    def link_config(vol: Volume) -> RcopyConfig | None:
        """The volume's role from its sidecar log first: a target (promoted or not)
        is no source; a source from a reverse has its link in the log."""
        if rcopy_recv.target_info(vol) is not None:
            return None
        ext = vol.state.extra.get("rcopy") or {}
        if ext.get("target"):
            return RcopyConfig(target=tuple(ext["target"]), period=float(ext.get("period", 300)))
        return vol.cfg.rcopy

    def add(self, link: Link) -> None:
        assert self.nursery is not None
        link.engine = self
        self.links[link.vol.name] = link

        async def run() -> None:
            with trio.CancelScope() as scope:
                link.scope = scope
                await self.background(link.run)

        self.nursery.start_soon(run, name=f"rcopy-{link.vol.name}")

    def remove(self, link: Link) -> None:
        if self.links.get(link.vol.name) is link:
            del self.links[link.vol.name]
        if link.scope is not None:
            link.scope.cancel()

    async def background(self, fn: Any, *args: Any) -> None:
        try:
            await self.guarded(fn, *args)
        except VmdError:
            pass

    async def guarded(self, fn: Any, *args: Any) -> Any:
        if self.stopping:
            raise VmdError("the daemon is stopping")
        with trio.CancelScope() as scope:
            self.scopes.add(scope)
            self.idle = trio.Event() if len(self.scopes) == 1 else self.idle
            try:
                return await fn(*args)
            finally:
                self.scopes.discard(scope)
                if not self.scopes:
                    self.idle.set()
        raise VmdError("cancelled: the daemon is stopping")

    async def startup(self, nursery: trio.Nursery) -> None:
        m = self.manager
        self.nursery = nursery
        await rcopy_recv.startup(m)
        for vol in list(m.volumes.values()):
            cfg = self.link_config(vol)
            info = rcopy_recv.target_info(vol)
            if cfg is not None:
                link = Link(vol, cfg)
                await link.setup()
                self.add(link)
            elif info is not None:
                if vol.cfg.rcopy is not None:
                    log.info("volume %s: a remote copy target of %s since a reverse: the "
                             "config's rcopy target is not used (`vmd rcopy promote` and "
                             "`vmd rcopy reverse` restore this direction)", vol.name,
                             info.get("source"))
                if not info.get("promoted") and _tracker(vol) is not None:
                    _drop_tracker(vol)
                    await vol.checkpoint()
                # promoted: the tracker holds its own changes since the promote
            elif _tracker(vol) is not None:
                _drop_tracker(vol)
                vol.state.extra.pop("rcopy", None)
                await vol.checkpoint()
                log.info("volume %s: no rcopy in the config any more: change map dropped",
                         vol.name)

    async def shutdown(self) -> None:
        """Cancel every transfer and wait for them: a receiver cut off rolls its
        update back before the volumes close (the daemon bounds the whole stop)."""
        self.stopping = True
        for s in list(self.scopes):
            s.cancel()
        await self.idle.wait()

    def link(self, name: str) -> Link:
        vol = self.manager.get(name)
        link = self.links.get(vol.name)
        if link is not None:
            return link
        info = rcopy_recv.target_info(vol)
        if info is None:
            raise VmdError(f"volume {name} has no remote copy (add `rcopy: {{target: COMMAND}}` "
                           f"to it in {self.manager.cfg.path})")
        src = f"volume {info.get('source')} ({info.get('source_uuid')})"
        if info.get("promoted"):
            raise VmdError(f"volume {vol.name} is a promoted remote copy target of {src}: it "
                           f"sends no updates until `vmd rcopy reverse {vol.name}` makes it the "
                           f"source")
        unused = (f"; its config's rcopy entry is not used until the original direction is "
                  f"restored (`vmd rcopy promote {vol.name}`, then `vmd rcopy reverse "
                  f"{vol.name}`)" if vol.cfg.rcopy is not None else "")
        raise VmdError(f"volume {vol.name} is the remote copy target of {src}"
                       f"{' since a reverse' if info.get('reversed') else ''}: it receives "
                       f"updates and sends none (run this on the source's host){unused}")

    def summary(self, vol: Volume) -> dict[str, Any] | None:
        """The volume's remote copy role for `vmd status` (None: it takes no part)."""
        link = self.links.get(vol.name)
        if link is not None:
            return {"role": "source", "sequence": int(link.ext.get("acked", 0)),
                    "target": " ".join(link.cfg.target), "paused": bool(link.ext.get("paused"))}
        info = rcopy_recv.target_info(vol)
        if info is None:
            return None
        return {"role": "target", "sequence": int(info.get("seq") or 0),
                "source": info.get("source"), "promoted": bool(info.get("promoted")),
                "syncing": rcopy_recv.syncing(vol)}


def register(table: CommandTable, m: VolumeManager) -> Engine:
    """Add the `rcopy.*` verbs (and the remote copy role to `status`); the
    daemon starts and stops the returned engine."""
    from .admin import PASSED_FDS

    eng = Engine(m)

    def name(req: dict[str, Any]) -> str:
        return req_str(req, "volume")

    volume_status = table["status"]

    async def status_with_role(req: dict[str, Any], progress: Any) -> dict[str, Any]:
        reply = await volume_status(req, progress)
        for v in reply["volumes"]:
            role = eng.summary(m.get(v["name"]))
            if role is not None:
                v["rcopy"] = role
        return reply

    async def status(req: dict[str, Any], progress: Any) -> dict[str, Any]:
        n = name(req)
        if n in eng.links:
            return {"rcopy": eng.links[n].status()}
        vol = m.get(n)
        info = rcopy_recv.target_info(vol)
        if info is None:
            raise VmdError(f"volume {n} takes no part in a remote copy")
        t = info.get("time")
        return {"rcopy": {"volume": n, "role": "target", "sequence": int(info.get("seq") or 0),
                          "time": t, "lag_seconds": None if t is None else time.time() - t,
                          "syncing": rcopy_recv.syncing(vol), "source": info.get("source"),
                          "promoted": bool(info.get("promoted"))}}

    async def sync(req: dict[str, Any], progress: Any) -> dict[str, Any]:
        link = eng.link(name(req))
        if link.ext.get("paused"):
            raise VmdError(f"remote copy of {link.vol.name} is paused: `vmd rcopy resume "
                           f"{link.vol.name}` first")
        return await eng.guarded(link.update, "sync")

    async def pause(req: dict[str, Any], progress: Any) -> dict[str, Any]:
        link = eng.link(name(req))
        link.ext["paused"] = True
        await link.vol.checkpoint()
        return {"paused": True}

    async def resume(req: dict[str, Any], progress: Any) -> dict[str, Any]:
        link = eng.link(name(req))
        link.ext["paused"] = False
        await link.vol.checkpoint()
        return {"paused": False}

    async def receive(req: dict[str, Any], progress: Any) -> dict[str, Any]:
        fds = req.get(PASSED_FDS) or []  # type: ignore[call-overload]
        if len(fds) != 2:
            raise VmdError("rcopy receive needs the stream's two file descriptors (use "
                           "`vmd rcopy receive VOLUME`)")
        vol = m.get(name(req))
        if eng.stopping:
            raise VmdError("the daemon is stopping")
        rfd, wfd = fds.pop(0), fds.pop(0)  # from here rcopy_recv.receive owns (closes) them
        return await eng.guarded(rcopy_recv.receive, m, vol, rfd, wfd, eng.receiving,
                                 eng.links.get(vol.name))

    async def promote(req: dict[str, Any], progress: Any) -> dict[str, Any]:
        vol = m.get(name(req))
        info = rcopy_recv.target_info(vol)
        if info is None:
            raise VmdError(f"volume {vol.name} is not a remote copy target")
        if vol.name in eng.receiving:
            raise VmdError(f"volume {vol.name} is receiving an update; try again when it ends")
        if not info.get("seq"):
            raise VmdError(f"volume {vol.name} holds no consistent point yet")
        async with vol.gate.hold():
            info["promoted"] = True
            if _tracker(vol) is None:
                _add_tracker(vol, full=False)  # B's own changes from this point on
            await vol.checkpoint()
            rcopy_recv.guard(vol)
        log.info("volume %s: promoted: writable, consistent point %s", vol.name, info.get("seq"))
        return {"volume": vol.name, "sequence": info.get("seq"), "time": info.get("time")}

    async def reverse(req: dict[str, Any], progress: Any) -> dict[str, Any]:
        vol = m.get(name(req))
        target = req.get("target")
        if target is not None and (not isinstance(target, list) or not target
                                   or not all(isinstance(a, str) and a for a in target)):
            raise VmdError("reverse: --target must be a command")
        period = req.get("period")
        if period is not None:
            try:
                period = parse_duration(period)
            except (ValueError, TypeError) as e:
                raise VmdError(f"reverse: bad --period: {e}") from None
        link = eng.links.get(vol.name)
        if link is not None:
            if not link.ext.get("reverse"):
                raise VmdError(f"volume {vol.name} is already the remote copy source; "
                               f"`vmd rcopy reverse` runs on a promoted target")
            if target is not None or period is not None:  # a retry with another link
                if target is not None:
                    link.ext["target"] = target
                if period is not None:
                    link.ext["period"] = period
                link.cfg = RcopyConfig(target=tuple(target or link.cfg.target),
                                       period=link.cfg.period if period is None else period)
                await vol.checkpoint()
        else:
            info = rcopy_recv.target_info(vol)
            if info is None:
                raise VmdError(f"volume {vol.name} is not a remote copy target")
            if not info.get("promoted"):
                raise VmdError(f"volume {vol.name} is not promoted: `vmd rcopy promote "
                               f"{vol.name}` first")
            if not info.get("source_uuid") or not info.get("seq"):
                raise VmdError(f"volume {vol.name} does not know which volume it replicated")
            if target is None and vol.cfg.rcopy is None:
                raise VmdError(f"reverse: which command reaches {info.get('source')}? Give "
                               f"--target 'ssh HOST vmd -c CONFIG rcopy receive VOLUME'")
            seq = int(info["seq"])
            async with vol.gate.hold():
                ext: dict[str, Any] = {
                    "acked": seq, "next_seq": seq + 1, "time": info.get("time"),
                    "reverse": {"source": info.get("source"), "source_uuid": info["source_uuid"],
                                "seq": seq}}
                if target is not None:
                    ext["target"] = target
                    ext["period"] = 300.0 if period is None else period
                vol.state.extra["rcopy"] = ext
                del vol.state.extra["rcopy_target"]
                if _tracker(vol) is None:
                    _add_tracker(vol, full=True)
                    log.warning("volume %s: no change map since the promote: the reverse sends "
                                "the whole volume", vol.name)
                await vol.checkpoint()
                rcopy_recv.guard(vol)
            cfg = eng.link_config(vol)
            assert cfg is not None
            if target is None and period is not None:
                cfg = RcopyConfig(target=cfg.target, period=period)
            link = Link(vol, cfg)
            await link.setup()
            eng.add(link)
            log.info("volume %s: reversing: now the remote copy source to %s (%s)", vol.name,
                     info.get("source"), " ".join(cfg.target))
        return await eng.guarded(link.update, "reverse")

    table.update({"status": status_with_role, "rcopy.status": status, "rcopy.sync": sync,
                  "rcopy.pause": pause, "rcopy.resume": resume, "rcopy.receive": receive,
                  "rcopy.promote": promote, "rcopy.reverse": reverse})
    return eng


# -- CLI ------------------------------------------------------------------------

def add_rcopy_parsers(sub: Any) -> None:
    r = sub.add_parser("rcopy", help="remote copy (asynchronous periodic replication)")
    rs = r.add_subparsers(dest="rcopy_cmd", required=True, metavar="ACTION")
    for action, what in (("status", "show the last consistent point, bytes sent, lag"),
                         ("sync", "run an update now and wait for it"),
                         ("pause", "stop periodic updates"), ("resume", "restart them"),
                         ("receive", "receive an update stream on stdin (the link command)"),
                         ("promote", "make a target volume writable (failover)"),
                         ("reverse", "on a promoted target: send its changes back to the old "
                                     "primary, which becomes its target (return)")):
        p = rs.add_parser(action, help=what)
        p.add_argument("volume")
        if action == "status":
            p.add_argument("--json", action="store_true")
        if action == "reverse":
            p.add_argument("--target", metavar="COMMAND",
                           help="the command that reaches the old primary, e.g. 'ssh hostA vmd "
                                "-c /etc/vmd/vmd.yaml rcopy receive vol0' (kept in the log as "
                                "this volume's link; default: the volume's configured target)")
            p.add_argument("--period", help="period of the later updates (default 5min)")


def describe(r: dict[str, Any]) -> str:
    """One line of `vmd status` for a volume's remote copy role (Engine.summary)."""
    if r["role"] == "source":
        return (f"source, consistent point {r['sequence']} on the target; target: "
                f"{r['target']}{'  PAUSED' if r['paused'] else ''}")
    state = ("PROMOTED (writable, takes no updates)" if r["promoted"] else
             "syncing (an update is being applied)" if r["syncing"] else "read-only")
    return f"target of {r['source']}, consistent point {r['sequence']}, {state}"


def run_rcopy_command(args: Any, client: Any) -> int:
    import json
    import sys

    c = args.rcopy_cmd
    req: dict[str, Any] = {"cmd": f"rcopy.{c}", "volume": args.volume}
    if c == "reverse":
        import shlex

        if args.target is not None:
            req["target"] = shlex.split(args.target)
        if args.period is not None:
            req["period"] = args.period
    if c == "receive":
        # The stream is our stdin/stdout; the daemon reads and answers them itself.
        client.timeout = None
        reply = client.request(req, fds=[sys.stdin.fileno(), sys.stdout.fileno()])
        print(f"{args.volume}: update {reply['seq']} committed ({format_size(reply['bytes'])})",
              file=sys.stderr)
        return 0
    if c in ("sync", "reverse"):
        client.timeout = None
    reply = client.request(req)
    reply.pop("ok", None)
    if c == "status":
        s = reply["rcopy"]
        if args.json:
            print(json.dumps(s, indent=2))
            return 0
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["time"])) if s.get("time") \
            else "never"
        print(f"{s['volume']}: remote copy {s['role']}, consistent point {s['sequence']} "
              f"({when})" + (f", lag {s['lag_seconds']:.0f} s" if s.get("lag_seconds") else ""))
        if s["role"] == "source":
            print(f"  target: {s['target']}  period {s['period']:.0f} s"
                  f"{'  PAUSED' if s['paused'] else ''}  {s['state']}")
            print(f"  changed since: {format_size(s['pending_bytes'] or 0)}  sent in all: "
                  f"{format_size(s['bytes_sent_total'])}")
            if s.get("next_full"):
                print(f"  a full update is pending: {s['next_full_why']}")
            last = s.get("last_update") or {}
            if last.get("error"):
                print(f"  last update {last['seq']} failed: {last['error']}")
        elif s.get("syncing"):
            print("  syncing: an update is being applied (reads refused)")
    elif c == "sync":
        print(f"{args.volume}: update {reply['seq']} committed: {format_size(reply['sent_bytes'])}"
              f" sent in {reply['seconds']:.2f} s" + (" (full)" if reply["full"] else ""))
    elif c in ("pause", "resume"):
        print(f"{args.volume}: remote copy {'paused' if reply['paused'] else 'resumed'}")
    elif c == "reverse":
        print(f"{args.volume}: reverse {reply['seq']} committed: {format_size(reply['sent_bytes'])}"
              f" sent of {format_size(reply['size'])} in {reply['seconds']:.2f} s; "
              f"{format_size(reply['overwritten_bytes'])} of the old primary's unsent changes "
              f"overwritten; this volume is now the remote copy source")
    elif c == "promote":
        print(f"{args.volume}: promoted at consistent point {reply['sequence']}")
    return 0
