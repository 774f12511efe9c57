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
import re
import logging
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
# The send buffer asked for a Unix socket (the kernel caps it at
# net.core.wmem_max): a few of the largest FUSE writes (1 MiB).
SEND_BUFFER = 4 * 1024 * 1024


def is_remote(path: object) -> bool:
    """An NBD URI (a remote plex), not an image path."""
    return isinstance(path, str) and "://" in path and path.split(":", 1)[0] in SCHEMES


_URI_LIKE = re.compile(r"(?i)nbds?(\+unix)?:")


def uri_typo(path: str) -> str | None:
    """Why `path`, which starts like an NBD URI but is none, is refused: taken
    as an image path it would create a file named `nbd:/...` somewhere."""
    if is_remote(path) or not _URI_LIKE.match(path):
        return None
    return (f"{path} starts like an NBD URI but is not one: write nbd://HOST[:PORT]/EXPORT "
            f"or nbd+unix:///EXPORT?socket=PATH (lower case, two slashes)")


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


class Request:
    """One request in flight: the buffer libnbd uses (kept alive until the
    reply), its deadline, and the task waiting for it, woken once.

    The buffer is the caller's bytes, bytearray or memoryview itself, never an
    `nbd.Buffer`: libnbd's binding (1.14) takes a view of any contiguous
    buffer without a copy, but keeps a reference to the object an `nbd.Buffer`
    wraps for good, so every byte written or read that way stayed in memory
    (and every new 1 MiB write buffer was a fresh mmap to fault in)."""

    __slots__ = ("buf", "deadline", "what", "off", "done", "error", "task")

    def __init__(self, buf: Any, deadline: float, what: str, off: int):
        self.buf, self.deadline, self.what, self.off = buf, deadline, what, off
        self.done = False
        self.error: OSError | None = None
        self.task: trio.lowlevel.Task | None = None

    def finish(self) -> None:
        self.done = True
        if self.task is not None:
            trio.lowlevel.reschedule(self.task)
            self.task = None

    async def wait(self) -> None:
        """The reply: returns, or raises its error (or the connection's, or
        ETIMEDOUT from the watchdog after the link's `timeout`)."""
        if not self.done:
            self.task = trio.lowlevel.current_task()
            # Not cancellable: a writer that left with its write still on the
            # wire would let the DRL record the region clean and nobody would
            # read the reply's error. The watchdog ends every wait within the
            # link's timeout, so this never outlives a hung server.
            await trio.lowlevel.wait_task_rescheduled(lambda _: trio.lowlevel.Abort.FAILED)
        if self.error is not None:
            raise self.error


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
        # cookie → request, oldest first (so the first one's deadline is the nearest)
        self._pending: dict[int, Request] = {}
        self._ep: Any = None  # the pump's epoll set (select.epoll), while it runs
        self._want = 0  # the events it watches on the socket
        self._pumping = False
        self._watchdog_scope: trio.CancelScope | None = None
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
        self._widen_send_buffer()

    def _widen_send_buffer(self) -> None:
        """On a Unix socket, room for a whole large write: with the default
        (about 200 KiB) a 1 MiB write goes out in five or more rounds, each
        a wake-up of the pump once the server drained the last. TCP tunes
        its own buffers (setting one would turn that off)."""
        s = socket.socket(fileno=self.fd)
        try:
            if s.family == socket.AF_UNIX:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        except OSError:
            pass  # a smaller buffer only costs wake-ups
        finally:
            s.detach()

    def pread_blocking(self, off: int, n: int) -> bytearray:
        """Read [off, off+n) outside trio (a check before a reattach)."""
        buf = bytearray(n)
        if self.error is not None:
            raise OSError(errno.ENOTCONN, f"reading offset {off} of {self.uri}: {self.error}")
        try:
            cookie = self.h.aio_pread(buf, off)
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
        """Start the pump and its watchdog (in trio): the pump also notices a
        server that closes the connection while no request is in flight."""
        if not self._pumping and self.error is None:
            self._pumping = True
            # The pump waits on an epoll set of its own holding the socket:
            # trio sees one readable descriptor whether the socket became
            # readable or writable, and a request that leaves bytes to send
            # only adds "writable" to the set (`_want`), which wakes the pump
            # by itself: no cancel scope, no task per wait.
            self._ep = select.epoll()
            self._ep.register(self.fd, select.EPOLLIN)
            self._want = select.EPOLLIN
            trio.lowlevel.spawn_system_task(self._pump, name=f"nbd-pump {self.uri}")
            self._watchdog_scope = trio.CancelScope()
            trio.lowlevel.spawn_system_task(self._watchdog, self._watchdog_scope,
                                            name=f"nbd-watchdog {self.uri}")

    async def pread(self, off: int, n: int) -> bytearray:
        buf = bytearray(n)
        await self.issue("read", off, lambda b: self.h.aio_pread(b, off), buf).wait()
        return buf

    def issue_write(self, off: int, data: bytes | memoryview | bytearray) -> Request:
        """Send a write and return at once (`Request.wait` for the reply): the caller
        writes its local plexes meanwhile, with no task for this one."""
        # Shared, not copied: the caller's buffer lives until the reply.
        return self.issue("write", off, lambda b: self.h.aio_pwrite(b, off), data)

    async def pwrite(self, off: int, data: bytes | memoryview | bytearray) -> None:
        await self.issue_write(off, data).wait()

    async def zero(self, off: int, n: int) -> None:
        """NBD_CMD_WRITE_ZEROES, letting the server punch a hole."""
        await self.issue("write-zeroes", off, lambda _: self.h.aio_zero(n, off), None).wait()

    async def flush(self) -> None:
        await self.issue("flush", 0, lambda _: self.h.aio_flush(), None).wait()

    def issue(self, what: str, off: int, send: Callable[[Any], int], buf: Any) -> Request:
        """Hand a request to libnbd (which sends what the socket takes now)."""
        if self.error is not None:
            raise OSError(errno.ENOTCONN, f"{what} at offset {off}: {self.error}")
        try:
            cookie = send(buf)
        except self._nbd.Error as e:
            err = _oserror(e, f"{what} at offset {off}")
            if self.h.aio_is_dead() or self.h.aio_is_closed():
                self.lost(str(err))
            raise err from None
        self.start()
        req = Request(buf, trio.current_time() + self.timeout, what, off)
        self._pending[cookie] = req
        if self.h.aio_is_dead():
            # The send found the server gone: the handle has closed its
            # socket, so the pump would never hear of it.
            self._reap()
            self.lost("the server closed the connection")
        elif self._want == select.EPOLLIN and self.h.aio_get_direction() & WRITE:
            self._watch(select.EPOLLIN | select.EPOLLOUT)  # the rest goes once writable
        return req

    def _watch(self, want: int) -> None:
        self._want = want
        self._ep.modify(self.fd, want)

    async def _pump(self) -> None:
        ep, h = self._ep, self.h
        try:
            while self.error is None:
                d = h.aio_get_direction()
                want = select.EPOLLIN | (select.EPOLLOUT if d & WRITE else 0)
                if want != self._want:
                    self._watch(want)
                await trio.lowlevel.wait_readable(ep.fileno())
                if self._want == select.EPOLLIN:  # (a request may have added EPOLLOUT)
                    h.aio_notify_read()  # the only thing watched
                else:
                    for _, ev in ep.poll(0):
                        # Only what the handle waits for now: libnbd refuses an
                        # event its state does not expect.
                        d = h.aio_get_direction()
                        if ev & select.EPOLLOUT and d & WRITE:
                            h.aio_notify_write()
                        elif ev & ~select.EPOLLOUT and d & READ:
                            h.aio_notify_read()
                self._reap()
                if h.aio_is_dead() or h.aio_is_closed():
                    self.lost("the server closed the connection")
        except (trio.ClosedResourceError, ValueError) as e:
            # After lost() or close(), the closed epoll set ends the pump. Before,
            # the set failed under it: nothing would read the replies, so the
            # link is dead now, not at the watchdog's deadline.
            if self.error is None:
                self.lost(f"connection failed: the pump's epoll set failed: {e!r}")
        except self._nbd.Error as e:
            self.lost(f"connection failed: {getattr(e, 'string', e)}")
        except Exception as e:  # a system task must not raise: that ends trio.run
            log.exception("nbd pump for %s failed", self.uri)
            self.lost(f"connection failed: {e}")
        finally:
            self._pumping = False

    async def _watchdog(self, scope: trio.CancelScope) -> None:
        """Fail the connection when its oldest request has no reply by its
        deadline (a hung server or link). One timer for all requests: it
        wakes once per `timeout` while replies come, not once per request.
        `_release` cancels `scope`: the task, and so the link and its
        handle, are gone at once, not after an idle `timeout`."""
        try:
            with scope:
                while self.error is None:
                    oldest = next(iter(self._pending.values()), None)
                    if oldest is None:
                        # Idle: a request sent meanwhile is at most `timeout` old
                        # when this wakes, and waited for until its own deadline.
                        await trio.sleep(self.timeout)
                    elif trio.current_time() < oldest.deadline:
                        await trio.sleep_until(oldest.deadline)
                    else:
                        self.lost(f"no reply to a {oldest.what} at offset {oldest.off} in "
                                  f"{self.timeout:g} s (remote_timeout)", errno.ETIMEDOUT)
        except Exception as e:  # a system task must not raise: that ends trio.run
            log.exception("nbd watchdog for %s failed", self.uri)
            self.lost(f"connection failed: {e}")

    def _reap(self) -> None:
        """Hand every finished request its result."""
        h, pending = self.h, self._pending
        while pending:
            cookie = h.aio_peek_command_completed()
            if cookie <= 0:
                return
            req = pending.pop(cookie)
            try:
                h.aio_command_completed(cookie)
            except self._nbd.Error as e:
                req.error = _oserror(e, "the server answered")
            req.finish()

    def lost(self, why: str, err: int = errno.ECONNRESET) -> None:
        """The connection is dead: fail every request in flight, let go of
        the socket, tell the owner."""
        if self.error is not None:
            return
        self.error = why
        self.errno = err
        self._fail_all(OSError(err, why))
        self._release()
        if self.on_lost is not None:
            self.on_lost(why)

    def _release(self) -> None:
        """Let go of everything now: the pump ends on its closed epoll set,
        the watchdog is cancelled, and the handle (its socket, its buffers)
        is freed once the pump's frame lets go of it, a scheduler tick away."""
        if self._watchdog_scope is not None:
            self._watchdog_scope.cancel()
            self._watchdog_scope = None
        if self._ep is not None:
            try:
                trio.lowlevel.notify_closing(self._ep.fileno())
            except RuntimeError:
                pass  # outside trio: nothing waits on it
            self._ep.close()
            self._ep = None
        if self.fd >= 0 and not (self.h.aio_is_dead() or self.h.aio_is_closed()):
            # (A dead handle closed its socket: the number may be another's now.)
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
        # Freed by reference count (libnbd 1.14's binding has no close()): the
        # handle closes its socket then. Everything after checks `error` first.
        self.h = None

    def close(self) -> None:
        if self.error is None:
            self.error = "closed by vmd"
            self._fail_all(OSError(errno.ENOTCONN, self.error))
        self._release()

    def _fail_all(self, err: OSError) -> None:
        pending, self._pending = self._pending, {}
        for req in pending.values():
            req.error = err
            req.finish()
