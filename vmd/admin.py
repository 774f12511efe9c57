"""Admin socket: a Unix stream socket, one JSON object per line each way.

Requests are {"cmd": NAME, ...args}; replies are {"ok": true, ...} or
{"ok": false, "error": MESSAGE}. Only root and the daemon's own uid may
connect (SO_PEERCRED). Long operations (`wait`) send progress lines
{"progress": {...}} before the final reply.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

import trio

from .errors import NotRunningError, VmdError
from .exclusive import check_socket_free, still_our_socket

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024
MAX_FDS = 4
# Key under which a request carries the file descriptors passed with it
# (SCM_RIGHTS). Not a string, so no JSON request can forge it. A handler takes
# the fds it keeps out of the list; the server closes the rest.
PASSED_FDS = ("passed-fds",)
Handler = Callable[[dict[str, Any], Callable[[dict[str, Any]], Awaitable[None]]],
                   Awaitable[dict[str, Any]]]


def command_words(cmd: Any) -> str:
    """A request's command as the CLI spells it: "snap.take" → "snap take"."""
    return str(cmd).replace(".", " ")


def _peer_uid(sock: trio.socket.SocketType) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


class AdminServer:
    def __init__(self, path: Path, handler: Handler):
        self.path = path
        self.handler = handler
        self._listener: trio.SocketListener | None = None

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        # Never take over a socket a live daemon listens on: only a stale one
        # (its daemon died) is removed.
        check_socket_free(self.path, "socket")
        if self.path.is_socket():
            self.path.unlink()
        elif self.path.exists():
            raise VmdError(f"socket: {self.path} exists and is not a socket; vmd will not "
                           f"remove it")
        self.path.parent.mkdir(parents=True, exist_ok=True)  # /run/vmd after a reboot
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            await sock.bind(str(self.path))
        finally:
            os.umask(old)
        bound = os.stat(self.path)
        os.chmod(self.path, 0o600)
        sock.listen(16)
        listener = trio.SocketListener(sock)
        self._listener = listener
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    stream = await listener.accept()
                    nursery.start_soon(self._serve, stream)
        finally:
            with trio.CancelScope(shield=True):
                await listener.aclose()
            if still_our_socket(self.path, bound):  # not one a later daemon bound
                try:
                    self.path.unlink()
                except OSError:
                    pass

    async def _serve(self, stream: trio.SocketStream) -> None:
        async with stream:
            fds: list[int] = []
            try:
                uid = _peer_uid(stream.socket)
                if uid not in (0, os.getuid()):
                    log.warning("admin socket: refused peer uid %d", uid)
                    # Take its request first, so that the refusal is what it
                    # reads (closing on an unread request resets the stream).
                    with trio.move_on_after(1):
                        await stream.receive_some(MAX_REQUEST)
                    await self._send(stream, {"ok": False, "error": "permission denied: only root "
                                              "or the daemon's user may use the admin socket"})
                    return
                buf = b""
                while True:
                    while b"\n" not in buf:
                        if len(buf) > MAX_REQUEST:
                            await self._send(stream, {"ok": False, "error": f"request too large "
                                                      f"(over {MAX_REQUEST} bytes)"})
                            return
                        chunk, got = await _receive_with_fds(stream)
                        fds.extend(got)
                        if not chunk:
                            return
                        buf += chunk
                    line, buf = buf.split(b"\n", 1)
                    if len(line) > MAX_REQUEST:
                        await self._send(stream, {"ok": False, "error": f"request too large "
                                                  f"(over {MAX_REQUEST} bytes)"})
                        return
                    passed, fds = fds, []
                    try:
                        reply = await self._dispatch(line, stream, passed)
                    finally:
                        for fd in passed:
                            os.close(fd)
                    await self._send(stream, reply)
            except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
                pass  # the client went away; nothing to answer
            finally:
                for fd in fds:
                    os.close(fd)

    async def _dispatch(self, line: bytes, stream: trio.SocketStream,
                        fds: list[int]) -> dict[str, Any]:
        try:
            req = json.loads(line)
        except (ValueError, UnicodeDecodeError) as e:
            return {"ok": False, "error": f"malformed request (not JSON): {e}"}
        if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
            return {"ok": False, "error": "malformed request: expected an object with \"cmd\""}

        async def progress(p: dict[str, Any]) -> None:
            await self._send(stream, {"progress": p})

        if fds:
            req[PASSED_FDS] = fds  # type: ignore[index]
        try:
            reply = await self.handler(req, progress)
        except VmdError as e:
            return {"ok": False, "error": str(e)}
        except (KeyError, TypeError, ValueError) as e:
            return {"ok": False, "error": f"{command_words(req['cmd'])}: bad argument: {e}"}
        except OSError as e:
            # Its text without the "[Errno N]" prefix: the messages name what failed.
            what = f"{e.strerror}: {e.filename}" if e.filename else e.strerror or str(e)
            return {"ok": False, "error": f"{command_words(req['cmd'])}: {what}"}
        return {"ok": True, **reply}

    @staticmethod
    async def _send(stream: trio.SocketStream, obj: dict[str, Any]) -> None:
        await stream.send_all(json.dumps(obj).encode() + b"\n")


async def _receive_with_fds(stream: trio.SocketStream) -> tuple[bytes, list[int]]:
    """receive_some, also collecting file descriptors passed with SCM_RIGHTS."""
    sock = stream.socket
    data, anc, flags, _addr = await sock.recvmsg(65536, socket.CMSG_SPACE(MAX_FDS * 4))
    fds: list[int] = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            n = len(payload) - len(payload) % 4
            fds.extend(struct.unpack(f"{n // 4}i", payload[:n]))
    for fd in fds:
        os.set_inheritable(fd, False)
    if flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise ConnectionError("too many file descriptors passed")
    return data, fds


class AdminClient:
    """Blocking client used by the CLI.

    `timeout` (None: none) bounds the connect, and then as `bound` says:
    "all": each line of the answer (a verb the daemon answers at once);
    "first": its first line only (a verb that waits by design but says at
    once that it has begun: `vmd wait`, `vmd verify`, `vmd events`), so that
    it is not cut however long the daemon works on it; "connect": nothing
    more (a long verb that says nothing until it is done)."""

    def __init__(self, path: Path, timeout: float | None = 30.0,
                 bound: Literal["all", "first", "connect"] = "all"):
        self.path = path
        self.timeout = timeout
        self.bound = bound

    def _no_answer(self, seconds: float | None, sent: bool) -> NotRunningError:
        maybe = "; it may still carry the request out" if sent else ""
        return NotRunningError(f"the daemon at {self.path} did not answer in {seconds:g} s "
                               f"(stopped, or stuck?{maybe}); `vmd --timeout SECONDS` waits "
                               f"longer")

    def request(self, req: dict[str, Any],
                on_progress: Callable[[dict[str, Any]], None] | None = None,
                fds: list[int] | None = None) -> dict[str, Any]:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(str(self.path))
        except (FileNotFoundError, ConnectionRefusedError) as e:
            s.close()
            raise NotRunningError(f"no vmd daemon answers on {self.path} ({e.strerror})") from None
        except TimeoutError:
            s.close()
            raise self._no_answer(self.timeout, sent=False) from None
        except OSError as e:
            s.close()
            raise NotRunningError(f"cannot connect to {self.path}: {e.strerror}") from None
        with s:
            if self.bound == "connect":
                s.settimeout(None)
            f = s.makefile("rb")
            try:
                data = json.dumps(req).encode() + b"\n"
                if fds:
                    sent = socket.send_fds(s, [data], fds)
                    data = data[sent:]
                s.sendall(data)
                while True:
                    line = f.readline()
                    if not line:
                        raise VmdError("the daemon closed the connection without answering")
                    msg = json.loads(line)
                    if self.bound == "first":
                        s.settimeout(None)
                    if "progress" in msg:
                        if on_progress is not None:
                            on_progress(msg["progress"])
                        continue
                    if not msg.get("ok"):
                        raise VmdError(msg.get("error", "unknown error"))
                    return msg
            except TimeoutError:
                raise self._no_answer(self.timeout, sent=True) from None
