"""Real NBD servers for the remote-plex tests: qemu-nbd and nbdkit (file
plugin) on a Unix socket or 127.0.0.1, and a TCP proxy that can stop
forwarding without closing (a hung link)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

START_TIMEOUT = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie until init reaps it: dead all the same.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


class NbdServer:
    """One server process serving `image`. `kind`: "qemu-nbd" or "nbdkit";
    `tcp`: on 127.0.0.1 (a free port), else on a Unix socket in `dir`.
    Both fork into the background once they listen (so `start` returns
    when a client can connect) and write a pid file."""

    def __init__(self, kind: str, image: Path, dir: Path, *, tcp: bool = False):
        if shutil.which(kind) is None:
            pytest.skip(f"{kind} is not installed (make test installs it)")
        self.kind, self.image, self.dir, self.tcp = kind, image, dir, tcp
        dir.mkdir(parents=True, exist_ok=True)
        self.sock = dir / f"{kind}.sock"
        self.pidfile = dir / f"{kind}.pid"
        self.port = free_port() if tcp else 0
        self.pid = 0

    @property
    def uri(self) -> str:
        if self.tcp:
            return f"nbd://127.0.0.1:{self.port}/vmd"
        return f"nbd+unix:///vmd?socket={self.sock}"

    def argv(self) -> list[str]:
        if self.kind == "qemu-nbd":
            where = ["-b", "127.0.0.1", "-p", str(self.port)] if self.tcp else ["-k", str(self.sock)]
            # -t: keep serving after a client leaves (vmd reconnects).
            return ["qemu-nbd", "-f", "raw", "-x", "vmd", "-t", "--shared=4", "--fork",
                    "--pid-file", str(self.pidfile), *where, str(self.image)]
        where = ["-i", "127.0.0.1", "-p", str(self.port)] if self.tcp else ["-U", str(self.sock)]
        return ["nbdkit", "-P", str(self.pidfile), *where, "file", str(self.image)]

    def start(self) -> "NbdServer":
        self.pidfile.unlink(missing_ok=True)
        if not self.tcp:
            self.sock.unlink(missing_ok=True)
        subprocess.run(self.argv(), check=True, timeout=START_TIMEOUT,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + START_TIMEOUT
        while not (self.pidfile.exists() and self.pidfile.read_text().strip()):
            assert time.monotonic() < deadline, f"{self.kind} wrote no pid file"
            time.sleep(0.01)
        self.pid = int(self.pidfile.read_text())
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.pid and not _gone(self.pid):
            os.kill(self.pid, sig)
            deadline = time.monotonic() + START_TIMEOUT
            while not _gone(self.pid):
                assert time.monotonic() < deadline, f"{self.kind} {self.pid} did not die"
                time.sleep(0.01)
        self.pid = 0


class HoldProxy:
    """127.0.0.1 TCP proxy to `port`. `hold()` stops forwarding in both
    directions but keeps every connection open: to the client, a server
    that stopped answering."""

    def __init__(self, port: int):
        self.target = port
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.port = self.lsock.getsockname()[1]
        self._open = threading.Event()
        self._open.set()
        self._socks: list[socket.socket] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/vmd"

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._stop = True
        self._open.set()
        for s in [self.lsock, *self._socks]:
            try:
                s.close()
            except OSError:
                pass

    def _accept(self) -> None:
        while not self._stop:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            u = socket.create_connection(("127.0.0.1", self.target))
            self._socks += [c, u]
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                self._open.wait()
                if self._stop:
                    break
                b.sendall(data)
        except OSError:
            pass
        finally:
            try:
                b.shutdown(socket.SHUT_WR)
            except OSError:
                pass


Make = Callable[..., NbdServer]


@pytest.fixture
def nbd_server(tmp_path: Path) -> Iterator[Make]:
    """make(kind, tcp, size) → a started server of a new sparse image; all
    are killed at the end."""
    made: list[NbdServer] = []

    def make(kind: str = "qemu-nbd", tcp: bool = False, size: int = 16 * 1024 * 1024) -> NbdServer:
        image = tmp_path / f"export{len(made)}.img"
        with open(image, "wb") as f:
            f.truncate(size)
        srv = NbdServer(kind, image, tmp_path / f"srv{len(made)}", tcp=tcp)
        made.append(srv)
        return srv.start()

    yield make
    for srv in made:
        srv.kill()
