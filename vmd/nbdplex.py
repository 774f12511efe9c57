"""Remote plexes: a plex that is an export of an NBD server on another machine.

`NbdPlex` has the interface of a local `Plex`, so the mirror engine writes it
in parallel with the local plexes, fails it, tracks what it misses and
resyncs it like any other. Its I/O goes through one `NbdLink` (libnbd, driven
by trio); the blocking calls of the resync's worker threads come back to the
event loop (`trio.from_thread`).

**Is it the export that left?** There is no inode or mtime over NBD. vmd
keeps, per remote plex, the last few writes the server acknowledged: offset,
length (at most SAMPLE bytes) and crc32 of their first bytes. That list is
the plex's `identity` in the sidecar log (also while it is ACTIVE, so that it
survives a restart). Before a reattach trusts the FastResync map, vmd reads
those blocks back: the export that left holds exactly them (nothing but vmd
writes it), while an empty or different export, or an older copy of the same
one restored from a backup, misses the latest of them. A mismatch, an export
of another size, or no write to compare (nothing vmd wrote is known) means a
full resync. docs/design.md ("Remote plexes") says why this test and not
another.

`RemoteWatch` (one per volume, in `Volume.run`) fails a remote plex whose
connection dropped while idle, and with `auto_attach` reconnects a failed one
with backoff and reattaches it.
"""

from __future__ import annotations

import errno
import logging
import math
import time
import zlib
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import trio

from .errors import VmdError
from .nbdlink import NbdLink, Request, Unreachable, is_remote
from .plex import Alone, Plex, PlexIOError
from .regionmap import RegionMap
from .sidecar import ACTIVE, IOFAIL, WRITABLE, PlexRecord, VolumeState

log = logging.getLogger(__name__)

RING = 8  # acknowledged writes remembered to recognise the export
SAMPLE = 4096  # bytes of each remembered write that are checked
FIRST_BACKOFF = 1.0  # seconds before the first reconnect attempt, doubling up to:
MAX_BACKOFF = 30.0


class NbdPlex(Plex):
    remote = True

    def __init__(self, record: PlexRecord, size: int, *, timeout: float = 10.0,
                 clean: bool = True):
        """`clean`: the volume was stopped cleanly, so an ACTIVE plex's recorded
        writes are its last ones (after a crash they may be older: forgotten)."""
        super().__init__(record, size)
        self.timeout = timeout
        self.inline = False  # every request is a network round trip: never on the loop
        self.link: NbdLink | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        # (offset, length, crc32) of the last writes the server acknowledged.
        known = clean or record.state not in WRITABLE  # recorded when it left: exact
        self._ring: deque[tuple[int, int, int]] = deque(
            _samples(record.identity, size) if known else (), maxlen=RING)
        self.last_error = ""
        self.last_attempt: float | None = None  # wall clock, of the last reconnect attempt
        self.retry_at = 0.0  # monotonic
        self.backoff = 0.0
        self.reattached = ""  # how the last automatic reattach went
        self.on_lost: Callable[[], None] | None = None
        # (link, why_changed) from prepare_attach, for the attach that follows.
        self._prepared: tuple[NbdLink, str] | None = None

    @property
    def path(self) -> str:  # type: ignore[override]
        return self.record.path  # a URI, not a file

    @property
    def connected(self) -> bool:
        return self.link is not None and self.link.error is None

    def open(self, *, create: bool = False) -> None:
        """Connect (blocking, at most `timeout` s) and check the export's size;
        an ACTIVE plex's remembered writes must read back (else it is not the
        export vmd left, and open fails: a full resync). An attach connected
        already, in a worker thread (`prepare_attach`)."""
        link = self._prepared[0] if self._prepared else self._connect()
        self._prepared = None
        if self.state == ACTIVE and self._ring:
            try:
                why = self._mismatch(link)
            except OSError as e:
                link.close()
                raise self._fail_open(Unreachable(e.errno, str(e)))
            if why:
                link.close()
                raise self._fail_open(OSError(errno.ESTALE, why))
        try:
            self._token = trio.lowlevel.current_trio_token()
        except RuntimeError:
            self._token = None
        self.link = link
        self.fd = link.fd  # "open" to the engine; vmd never uses it as a file
        link.on_lost = self._lost
        if self._token is not None:
            link.start()
        self.last_error = ""

    def start_on_loop(self) -> None:
        if self.link is not None and self._token is None:
            self._token = trio.lowlevel.current_trio_token()
            self.link.start()

    def _fail_open(self, e: OSError) -> OSError:
        self.last_error = str(e)
        return e

    def _connect(self) -> NbdLink:
        link = NbdLink(self.record.path, self.timeout)
        try:
            link.connect()
        except OSError as e:
            raise self._fail_open(e) from None
        if link.size != self.size:
            link.close()
            raise self._fail_open(OSError(
                errno.EINVAL, f"export {self.path} is {link.size} bytes, the volume is "
                              f"{self.size} bytes (vmd never creates or resizes a remote image)"))
        return link

    def _lost(self, why: str) -> None:
        self.last_error = why
        log.error("plex %s (%s): %s", self.name, self.path, why)
        if self.on_lost is not None:
            self.on_lost()

    def close(self) -> None:
        self.fresh = False
        self._pool.stop()
        if self.link is not None:
            self.link.close()
            self.link = None
        self.fd = -1

    # -- identity --------------------------------------------------------------

    def identity(self) -> list[int]:
        """The size and the remembered writes, flattened (the sidecar's list of ints)."""
        return [self.size, *(v for s in self._ring for v in s)]

    async def prepare_attach(self) -> None:
        """Connect and read back the remembered writes in a worker thread
        (at most 2 × `timeout`: a hung server), before the attach takes the
        write gate: the volume, and every other, serves meanwhile. An export
        that cannot be reached or read fails the attach here, naming it."""
        self.reattached = ""  # what an earlier reattach did says nothing of this one

        def connect_and_check() -> tuple[NbdLink, str]:
            link = self._connect()
            try:
                return link, self._mismatch(link) if self._ring else (
                    f"no write vmd made to export {self.path} is known to check it by, so "
                    f"the map cannot be trusted")
            except OSError as e:
                link.close()
                raise self._fail_open(e) from None

        self.drop_prepared()
        self._prepared = await trio.to_thread.run_sync(connect_and_check)

    def drop_prepared(self) -> None:
        if self._prepared is not None:
            self._prepared[0].close()
            self._prepared = None

    def why_changed(self) -> str:
        """Why the FastResync map cannot be trusted: another export, or one
        that does not read back what vmd last wrote to it (found by
        `prepare_attach`)."""
        if self._prepared is None:  # not prepared: trust nothing
            return f"export {self.path} was not checked before the attach"
        return self._prepared[1]

    def _mismatch(self, link: NbdLink) -> str:
        for off, n, crc in self._ring:
            if zlib.crc32(link.pread_blocking(off, n)) != crc:
                return (f"export {self.path} does not hold what vmd last wrote to it at offset "
                        f"{off}: another export (or an older copy of it)")
        return ""

    def _remember(self, off: int, data: bytes | memoryview | None, n: int) -> None:
        """A write of [off, off+n) went (or goes) out: forget remembered writes
        it covers; if `data`, remember it once acknowledged."""
        end = off + n
        for s in [s for s in self._ring if s[0] < end and off < s[0] + s[1]]:
            self._ring.remove(s)
        if data is not None:
            k = min(n, SAMPLE)
            self._ring.append((off, k, zlib.crc32(memoryview(data)[:k])))

    # -- I/O ---------------------------------------------------------------------

    def _live(self) -> NbdLink:
        if self.link is None:
            raise OSError(errno.ENOTCONN, f"not connected to {self.path}")
        return self.link

    async def pread(self, off: int, size: int, *,  # type: ignore[override]
                    alone: Alone = None, ahead: tuple[int, int] | None = None) -> bytearray:
        # `alone` and `ahead` are about a local page cache: not here.
        try:
            data = await self._live().pread(off, size)
        except OSError as e:
            raise PlexIOError(self, "read", off, e) from e
        self.reads += 1
        return data

    def write_inline(self) -> bool:
        return False

    async def pwrite(self, off: int, data: bytes | memoryview) -> None:
        await self.pwrite_async(off, data)

    async def _write(self, off: int, data: bytes | memoryview) -> None:
        self._remember(off, None, len(data))
        await self._live().pwrite(off, data)
        self._remember(off, data, len(data))

    async def _zero(self, off: int, size: int) -> None:
        self._remember(off, None, size)
        link = self._live()
        if link.can_zero:
            await link.zero(off, size)
            return
        zeros = bytes(min(size, 1024 * 1024))
        for at in range(off, off + size, len(zeros)):
            await link.pwrite(at, memoryview(zeros)[:min(len(zeros), off + size - at)])

    async def pwrite_async(self, off: int, data: bytes | memoryview) -> None:
        await self.write_end(self.write_begin(off, data), off, data)

    # A write in two halves, so that the mirror's fan-out sends it, writes its
    # local plexes inline meanwhile, then waits for the reply: no task per
    # remote write (a task and its nursery cost more CPU than the write).

    def write_begin(self, off: int, data: bytes | memoryview) -> Request:
        """Send the write; `write_end` must follow (it counts it in flight)."""
        self._remember(off, None, len(data))
        try:
            req = self._live().issue_write(off, data)
        except OSError as e:
            raise PlexIOError(self, "write", off, e) from e
        self.inflight += 1
        return req

    async def write_end(self, req: Request, off: int, data: bytes | memoryview) -> None:
        """Wait for the reply of `write_begin`'s write."""
        try:
            await req.wait()
        except OSError as e:
            raise PlexIOError(self, "write", off, e) from e
        finally:
            self.inflight -= 1
        self._remember(off, data, len(data))
        self.writes += 1
        self.bytes_written += len(data)

    async def punch(self, off: int, size: int) -> None:
        with self._in_flight("write-zeroes", off):
            await self._zero(off, size)
        self.writes += 1

    async def flush(self) -> None:
        if self.link is None:
            return
        try:
            if self.link.can_flush:
                await self.link.flush()
            elif self.link.error is not None:
                raise OSError(errno.ENOTCONN, self.link.error)
        except OSError as e:
            raise PlexIOError(self, "flush", 0, e) from e
        if self.state in WRITABLE:
            # In the record while ACTIVE too, so that the checkpoint of a clean
            # stop keeps it for the next start.
            self.record.identity = self.identity()

    async def allocated(self, off: int, size: int) -> list[tuple[int, int]]:
        return [(off, size)]

    def data_ranges(self, off: int, length: int) -> list[tuple[int, int]]:
        return [(off, length)]

    def will_read(self, off: int, size: int) -> None:
        pass

    # The resync copies in a worker thread (Plex.copy_to): these hand its
    # blocking calls to the event loop, where the connection lives.

    def _on_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._token is None:
            raise OSError(errno.ENOTCONN, f"not connected to {self.path}")
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def _pread_sync(self, off: int, size: int, into: memoryview | None = None
                    ) -> bytes | memoryview:
        data = self._on_loop(self._live().pread, off, size)
        if into is None:
            return bytes(data)
        into[:size] = data
        return into[:size]

    def _pwrite_sync(self, off: int, data: bytes | memoryview) -> None:
        self._on_loop(self._write, off, bytes(data))

    def _punch_sync(self, off: int, length: int) -> None:
        self._on_loop(self._zero, off, length)

    def _flush_sync(self, fd: int | None = None) -> None:
        self._on_loop(self.flush)

    # -- status ------------------------------------------------------------------

    def status_extra(self) -> dict[str, Any]:
        at = self.last_attempt
        return {"remote": True, "uri": self.path, "connected": self.connected,
                "last_error": self.last_error,
                "last_reconnect_attempt": None if at is None else
                time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(at)),
                "reattached": "" if self.state == IOFAIL else self.reattached}


def _samples(identity: list[int] | None, size: int) -> list[tuple[int, int, int]]:
    """The remembered writes of a remote plex's recorded identity."""
    if not identity or identity[0] != size or (len(identity) - 1) % 3:
        return []
    return [(identity[i], identity[i + 1], identity[i + 2]) for i in range(1, len(identity), 3)]


def remote_aware(factory: Callable[[PlexRecord, int], Plex], vc: _Settings, clean: bool = True
                 ) -> Callable[[PlexRecord, int], Plex]:
    """A plex factory that makes an NbdPlex for an NBD URI and asks `factory`
    for the rest (tests pass theirs, with faults)."""

    def make(rec: PlexRecord, size: int) -> Plex:
        if is_remote(rec.path):
            return NbdPlex(rec, size, timeout=vc.remote_timeout, clean=clean)
        return factory(rec, size)

    return make


def map_after_open_error(p: Plex, err: OSError, state: VolumeState) -> RegionMap | None:
    """The map of a plex that could not be opened at start: none (a full
    resync) for an image, but an export that is only out of reach keeps an
    empty one: reattaching it copies what it misses from now on, once its
    remembered writes read back."""
    if isinstance(p, NbdPlex) and isinstance(err, Unreachable) and state.fastresync:
        return p.record.missing or state.new_map()
    return None


class _Settings(Protocol):
    remote_timeout: float
    auto_attach: bool


class _Volume(Protocol):
    """What the watch needs of the volume it serves (volume.Volume is one)."""

    name: str
    plexes: list[Plex]
    cfg: _Settings
    stopped: bool

    async def fail_plex(self, p: Plex, err: OSError, off: int, length: int) -> bool: ...

    async def attach_plex(self, name: str) -> dict[str, Any]: ...


class RemoteWatch:
    """Per volume: fail remote plexes whose connection dropped, and with
    `auto_attach` reconnect failed ones (backoff FIRST_BACKOFF … MAX_BACKOFF)."""

    def __init__(self, vol: _Volume):
        self.vol = vol
        self._wake = trio.Event()

    def wake(self) -> None:
        self._wake.set()

    def remotes(self) -> list[NbdPlex]:
        return [p for p in self.vol.plexes if isinstance(p, NbdPlex)]

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        vol = self.vol
        while not vol.stopped:
            next_at = math.inf
            for p in self.remotes():
                p.on_lost = self.wake
                if p.state in WRITABLE and p.link is not None and p.link.error is not None:
                    await vol.fail_plex(p, OSError(p.link.errno, p.link.error), 0, 0)
                if p.state == IOFAIL and vol.cfg.auto_attach:
                    if time.monotonic() >= p.retry_at:
                        await self._try(p)
                    if p.state == IOFAIL:
                        next_at = min(next_at, p.retry_at)
            with trio.move_on_at(next_at):
                await self._wake.wait()
            self._wake = trio.Event()

    async def _try(self, p: NbdPlex) -> None:
        p.last_attempt = time.time()
        try:
            # Connects in a worker thread first (prepare_attach): a dead host
            # may take remote_timeout to say so, and the volume serves meanwhile.
            res = await self.vol.attach_plex(p.name)
        except (OSError, VmdError) as e:
            p.last_error = str(e)
            p.backoff = min(MAX_BACKOFF, 2 * p.backoff) if p.backoff else FIRST_BACKOFF
            p.retry_at = time.monotonic() + p.backoff
            log.info("volume %s: plex %s (%s) not reattached (next try in %g s): %s",
                     self.vol.name, p.name, p.path, p.backoff, e)
            return
        p.backoff = 0.0
        p.reattached = ("full resync: " + res["why"]) if res.get("full_resync") else "FastResync"
        log.info("volume %s: plex %s (%s) reconnected and reattached (%s)",
                 self.vol.name, p.name, p.path, p.reattached)
