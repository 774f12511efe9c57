"""A link command for the Remote Copy tests: runs the real link command as a
child, relays its stdin to the child and the child's stdout back, and can hold
the transfer at a known point so that a test interrupts it there, however busy
the machine.

usage: rcopy_relay.py DIR -- COMMAND...

DIR holds the relay's files: `pid` (written by the relay, so that a test can kill
"the link"), `hold` (written by the test: after that many bytes of stdin the relay
stops forwarding until the file goes or names a larger count) and `held` (written
by the relay when it has stopped). The test's side is the Relay class.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
from pathlib import Path

CHUNK = 65536


def _write_atomically(path: Path, text: str) -> None:
    # The other side polls the file: it must never see it empty or half written.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _hold_limit(d: Path) -> int | None:
    try:
        return int((d / "hold").read_text())
    except FileNotFoundError:
        return None


class Relay:
    """A test's handle on the relays it puts into a link command: one relay process
    per transfer, each steered by the files in `dir`."""

    def __init__(self, dir: Path):
        self.dir = dir
        dir.mkdir(exist_ok=True)

    def command(self, cmd: list[str]) -> list[str]:
        return [sys.executable, os.path.abspath(__file__), str(self.dir), "--", *cmd]

    def hold_after(self, nbytes: int) -> None:
        """The next transfers stop after `nbytes` until release() or a kill."""
        (self.dir / "held").unlink(missing_ok=True)
        _write_atomically(self.dir / "hold", str(nbytes))

    def release(self) -> None:
        (self.dir / "hold").unlink(missing_ok=True)
        (self.dir / "held").unlink(missing_ok=True)

    def wait_held(self, proc: subprocess.Popen[str] | None = None, timeout: float = 60) -> int:
        """Wait until a relay holds (`proc`, the transfer's CLI, still running);
        returns the bytes it forwarded."""
        from conftest import wait_for

        def held() -> str | None:
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"the transfer ended (exit {proc.returncode}) before the "
                                     f"relay held it: {proc.communicate()}")
            try:
                return (self.dir / "held").read_text()
            except FileNotFoundError:
                return None

        return int(wait_for(held, timeout, f"the relay in {self.dir} to hold the transfer"))

    def kill(self) -> None:
        """SIGKILL the relay that ran last: the link drops."""
        os.kill(int((self.dir / "pid").read_text()), signal.SIGKILL)


def _hold(d: Path, child: subprocess.Popen[bytes], forwarded: int) -> str:
    """Forward nothing until released; return why the hold ended. The child or
    the input can go meanwhile (a killed receiver or sender): that ends the hold
    too, or the transfer would hang instead of failing."""
    _write_atomically(d / "held", str(forwarded))
    stdin = select.poll()
    stdin.register(0, 0)  # POLLHUP and POLLERR are reported anyway; data is not wanted
    while True:
        if stdin.poll(50):  # the tick bounds how late a release or the child's exit is seen
            return "input gone"
        if child.poll() is not None:
            return "child gone"
        limit = _hold_limit(d)
        if limit is None or limit > forwarded:
            return "released"


def main() -> None:
    d = Path(sys.argv[1])
    cmd = sys.argv[sys.argv.index("--") + 1:]
    _write_atomically(d / "pid", str(os.getpid()))
    child = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert child.stdin is not None and child.stdout is not None

    def back() -> None:
        assert child.stdout is not None
        while chunk := os.read(child.stdout.fileno(), CHUNK):
            os.write(1, chunk)

    t = threading.Thread(target=back, daemon=True)
    t.start()
    forwarded = 0
    pending = b""
    input_gone = False  # no more holding: what is left goes through, then EOF
    try:
        while chunk := pending or os.read(0, CHUNK):
            limit = None if input_gone else _hold_limit(d)
            n = len(chunk) if limit is None else max(0, min(len(chunk), limit - forwarded))
            child.stdin.write(chunk[:n])
            child.stdin.flush()
            forwarded += n
            pending = chunk[n:]
            if pending:
                why = _hold(d, child, forwarded)
                if why == "child gone":
                    break
                input_gone = why == "input gone"
    except BrokenPipeError:
        pass
    try:
        child.stdin.close()
    except BrokenPipeError:
        pass
    rc = child.wait()
    t.join()
    sys.exit(rc)


if __name__ == "__main__":
    main()
