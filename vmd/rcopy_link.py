"""Remote Copy's link: the command (`ssh HOST vmd rcopy receive VOLUME`, or any
other) run for one update, whose stdin/stdout carry the stream. How it ended
and what it said on its stderr are the cause of a failed update, for the CLI,
`rcopy status` and the log alike."""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

from .errors import VmdError

EXIT_GRACE = 2.0  # seconds to wait for the ack after the link command exited


class Refused(VmdError):
    """The target answered with an error: the link itself worked."""


async def aclose_quietly(stream: Any) -> None:
    try:
        await stream.aclose()
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass


class LinkCommand:
    """Runs the link command of one source volume, one update at a time."""

    def __init__(self) -> None:
        self.stderr: deque[str] = deque(maxlen=8)  # the link command's last lines

    async def run(self, argv: Sequence[str], speak: Callable[[Any], Awaitable[int]]
                  ) -> tuple[int | None, str]:
        """Start the command and `speak(proc)` over its pipes: (the acknowledged
        sequence, "") or (None, why the update failed). The process is gone on return."""
        self.stderr.clear()
        proc = await trio.lowlevel.open_process(
            list(argv), stdin=-1, stdout=-1, stderr=-1)  # -1: subprocess.PIPE
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
                    result["ack"] = await speak(proc)
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
                    await aclose_quietly(proc.stdin)
                    with trio.move_on_after(EXIT_GRACE):
                        await stderr_done.wait()
                finished.set()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                for s in (proc.stdin, proc.stdout, proc.stderr):
                    await aclose_quietly(s)
                with trio.move_on_after(10):
                    await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
        if "ack" in result:
            return result["ack"], ""
        err = result.get("error") or "the transfer was interrupted"
        if result.get("link_fault"):
            err += self._link_said(proc.returncode)
        return None, err

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
