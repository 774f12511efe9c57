"""One connection to an NBD export: a libnbd handle driven from trio.

libnbd's asynchronous API does the protocol; this module only moves its
socket: `aio_get_direction` says what the handle waits for, trio's
`wait_readable` / `wait_writable` wait for it, `aio_notify_read` /
`aio_notify_write` hand it on. One pump task per connection does that, so any
number of requests are in flight at once without a thread each. Every
request gets an answer or an error within `timeout` seconds: a request with
no reply by then (a hung server or link) kills the connection, and every
request still in flight fails with it.

The few blocking calls (connecting, and the reads that check an export's
identity before a reattach) poll the socket themselves with the same
deadline, so they never block longer than `timeout` either.
"""

from __future__ import annotations

import errno
import logging
import math
import select
import socket
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import trio

log = logging.getLogger(__name__)

READ, WRITE = 1, 2  # libnbd's AIO_DIRECTION_READ / _WRITE
SCHEMES = ("nbd", "nbd+unix", "nbds", "nbds+unix")


def is_remote(path: object) -> bool:
    """An NBD URI (a remote plex), not an image path."""
    return isinstance(path, str) and "://" in path and path.split(":", 1)[0] in SCHEMES


def check_uri(uri: str) -> str | None:
    """What is wrong with an NBD URI, or None."""
    u = urlsplit(uri)
    if u.scheme.endswith("+unix"):
        if not parse_qs(u.query).get("socket"):
            return f"{uri}: a {u.scheme}:// URI needs ?socket=PATH"
    elif not u.hostname:
        return f"{uri}: no host (use nbd://HOST[:PORT]/EXPORT)"
    try:
        u.port
    except ValueError:
        return f"{uri}: bad port"
    return None


def libnbd() -> Any:
    """The `nbd` module (python3-libnbd), imported only when a remote plex
    is used: local volumes need no libnbd."""
    try:
        import nbd  # noqa: PLC0415
    except ImportError as e:
        raise OSError(errno.ENOSYS, f"remote plexes need libnbd's Python binding "
                                    f"(Debian package python3-libnbd; `make setup` links it "
                                    f"into the virtualenv): {e}") from None
    return nbd


def _oserror(e: Any, what: str) -> OSError:
    """An nbd.Error as an OSError that says what failed."""
    return OSError(getattr(e, "errno", None) or errno.EIO, f"{what}: {getattr(e, 'string', e)}")


class Unreachable(OSError):
    """The export could not be reached (connect, handshake): not an error of
    its data, so a map kept for it stays good."""


class NbdLink:
    def __init__(self, uri: str, timeout: float):
        self.uri = uri
        self.timeout = timeout
        self._nbd = libnbd()
        self.h: Any = self._nbd.NBD()
        self.fd = -1
        self.size = 0
        self.can_flush = False
        self.can_zero = False
        self.error: str | None = None  # why the connection is dead; None while it lives
        self.errno = 0  # and its errno
        # cookie → [done event, the buffer libnbd uses, the error, deadline, what, offset],
        # oldest first (so the first one's deadline is the nearest)
        self._pending: dict[int, list[Any]] = {}
        self._scope: trio.CancelScope | None = None
        self._pumping = False
        self.on_lost: Callable[[str], None] | None = None

    # -- blocking (connect, identity checks) --------------------------------

    def connect(self) -> None:
        """Connect and finish the handshake; at most `timeout` seconds."""
        deadline = time.monotonic() + self.timeout
        try:
            self.h.aio_connect_uri(self.uri)
            self._poll_until(self.h.aio_is_ready, deadline, "connecting")
            self.size = self.h.get_size()
            self.can_flush = bool(self.h.can_flush())
            self.can_zero = bool(self.h.can_zero())
        except OSError as e:
            self.close()
            raise Unreachable(e.errno, f"cannot connect to {self.uri}: {e.strerror}") from None
        except self._nbd.Error as e:
            self.close()
            raise Unreachable(getattr(e, "errno", None) or errno.ECONNREFUSED,
                              f"cannot connect to {self.uri}: {e.string}") from None
        self.fd = self.h.aio_get_fd()

    def pread_blocking(self, off: int, n: int) -> bytearray:
        """Read [off, off+n) outside trio (a check before a reattach)."""
        buf = bytearray(n)
        try:
            cookie = self.h.aio_pread(self._nbd.Buffer.from_buffer(buf), off)
            self._poll_until(lambda: self.h.aio_command_completed(cookie),
                             time.monotonic() + self.timeout, f"reading offset {off}")
        except self._nbd.Error as e:
            raise _oserror(e, f"reading offset {off} of {self.uri}") from None
        return buf

    def _poll_until(self, done: Callable[[], bool], deadline: float, what: str) -> None:
        while not done():
            if self.h.aio_is_dead() or self.h.aio_is_closed():
                raise OSError(errno.ECONNRESET, f"{what}: the connection was closed")
            left = deadline - time.monotonic()
            if left <= 0:
                raise OSError(errno.ETIMEDOUT, f"{what}: no answer in {self.timeout:g} s")
            d = self.h.aio_get_direction()
            poller = select.poll()
            poller.register(self.h.aio_get_fd(), (select.POLLIN if d & READ else 0)
                            | (select.POLLOUT if d & WRITE else 0))
            for _, ev in poller.poll(left * 1000):
                if ev & select.POLLOUT and d & WRITE:
                    self.h.aio_notify_write()
                elif ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                    self.h.aio_notify_read()

    # -- trio ----------------------------------------------------------------

    def start(self) -> None:
        """Start the pump (in trio): it also notices a server that closes
        the connection while no request is in flight."""
        if not self._pumping and self.error is None:
            self._pumping = True
            trio.lowlevel.spawn_system_task(self._pump, name=f"nbd-pump {self.uri}")

    async def pread(self, off: int, n: int) -> bytearray:
        buf = bytearray(n)
        await self._request("read", off, lambda b: self.h.aio_pread(b, off),
                            self._nbd.Buffer.from_buffer(buf))
        return buf

    async def pwrite(self, off: int, data: bytes | memoryview | bytearray) -> None:
        # Shared, not copied: the caller's buffer lives until the reply.
        await self._request("write", off, lambda b: self.h.aio_pwrite(b, off),
                            self._nbd.Buffer.from_buffer(data))

    async def zero(self, off: int, n: int) -> None:
        """NBD_CMD_WRITE_ZEROES, letting the server punch a hole."""
        await self._request("write-zeroes", off, lambda _: self.h.aio_zero(n, off), None)

    async def flush(self) -> None:
        await self._request("flush", 0, lambda _: self.h.aio_flush(), None)

    async def _request(self, what: str, off: int, issue: Callable[[Any], int], buf: Any) -> None:
        if self.error is not None:
            raise OSError(errno.ENOTCONN, f"{what} at offset {off}: {self.error}")
        try:
            cookie = issue(buf)
        except self._nbd.Error as e:
            err = _oserror(e, f"{what} at offset {off}")
            if self.h.aio_is_dead() or self.h.aio_is_closed():
                self.lost(str(err))
            raise err from None
        self.start()
        deadline = trio.current_time() + self.timeout
        slot: list[Any] = [trio.Event(), buf, None, deadline, what, off]
        if not self._pending and self._scope is not None:
            self._scope.deadline = deadline  # the pump's wait ends there (_expire)
        self._pending[cookie] = slot
        self._kick()
        await slot[0].wait()
        if slot[2] is not None:
            raise slot[2]

    def _kick(self) -> None:
        """A new request may have left bytes to send: make the pump look again
        (it may be waiting for the socket to be readable only)."""
        if self._scope is not None and self.h.aio_get_direction() & WRITE:
            self._scope.cancel()

    async def _pump(self) -> None:
        try:
            while self.error is None:
                d = self.h.aio_get_direction()
                ready = 0
                # The pump keeps the requests' deadlines: one timer, not one per request.
                oldest = next(iter(self._pending.values()), None)
                with trio.CancelScope(deadline=math.inf if oldest is None else oldest[3]
                                      ) as self._scope:
                    if d & WRITE and d & READ:
                        ready = await self._either()
                    elif d & WRITE:
                        await trio.lowlevel.wait_writable(self.fd)
                        ready = WRITE
                    else:
                        await trio.lowlevel.wait_readable(self.fd)
                        ready = READ
                self._scope = None
                if not ready:
                    self._expire()  # or kicked: look at the direction again
                    continue
                if ready == WRITE:
                    self.h.aio_notify_write()
                else:
                    self.h.aio_notify_read()
                self._reap()
                if self.h.aio_is_dead() or self.h.aio_is_closed():
                    self.lost("the server closed the connection")
        except trio.ClosedResourceError:
            pass  # lost() or close() let go of the socket
        except self._nbd.Error as e:
            self.lost(f"connection failed: {getattr(e, 'string', e)}")
        except Exception as e:  # a system task must not raise: that ends trio.run
            log.exception("nbd pump for %s failed", self.uri)
            self.lost(f"connection failed: {e}")
        finally:
            self._scope = None
            self._pumping = False

    def _expire(self) -> None:
        """A request without a reply by its deadline: the server or the link
        hangs, and the connection is given up."""
        oldest = next(iter(self._pending.values()), None)
        if oldest is not None and trio.current_time() >= oldest[3]:
            self.lost(f"no reply to a {oldest[4]} at offset {oldest[5]} in {self.timeout:g} s "
                      f"(remote_timeout)", errno.ETIMEDOUT)

    async def _either(self) -> int:
        """Wait until the socket is readable or writable, whichever first
        (a server busy sending replies may read nothing until we read)."""
        got = 0

        async def one(wait: Callable[[int], Any], tag: int, cancel: trio.CancelScope) -> None:
            nonlocal got
            await wait(self.fd)
            got = got or tag
            cancel.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, trio.lowlevel.wait_writable, WRITE, nursery.cancel_scope)
            nursery.start_soon(one, trio.lowlevel.wait_readable, READ, nursery.cancel_scope)
        return got

    def _reap(self) -> None:
        """Hand every finished request its result."""
        while self._pending:
            cookie = self.h.aio_peek_command_completed()
            if cookie <= 0:
                return
            slot = self._pending.pop(cookie)
            try:
                self.h.aio_command_completed(cookie)
            except self._nbd.Error as e:
                slot[2] = _oserror(e, "the server answered")
            slot[0].set()

    def lost(self, why: str, err: int = errno.ECONNRESET) -> None:
        """The connection is dead: fail every request in flight, let go of
        the socket, tell the owner."""
        if self.error is not None:
            return
        self.error = why
        self.errno = err
        for slot in self._pending.values():
            slot[2] = OSError(err, why)
            slot[0].set()
        self._pending.clear()
        self._release()
        if self.on_lost is not None:
            self.on_lost(why)

    def _release(self) -> None:
        if self.fd >= 0:
            try:
                trio.lowlevel.notify_closing(self.fd)
            except RuntimeError:
                pass  # outside trio: nothing waits on it
            try:
                # Shut down, not closed: libnbd closes its own descriptor when
                # the handle goes. The server sees the end now, though.
                s = socket.socket(fileno=self.fd)
                try:
                    s.shutdown(socket.SHUT_RDWR)
                finally:
                    s.detach()
            except OSError:
                pass
            self.fd = -1

    def close(self) -> None:
        if self.error is None:
            self.error = "closed by vmd"
            for slot in self._pending.values():
                slot[2] = OSError(errno.ENOTCONN, self.error)
                slot[0].set()
            self._pending.clear()
        self._release()
