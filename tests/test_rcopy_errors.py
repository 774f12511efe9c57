"""Remote Copy failures as an administrator sees them (issue 16, item 8): a link
that fails names its cause (the link command's stderr) in the CLI error and in
`rcopy status`, and a status after a failed first update says that a full
update is pending. Real links: a receive of a volume B does not have, a
command that is not installed, and ssh to a port where nothing listens."""

from __future__ import annotations

import errno
import json
import shlex
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import VmdDaemon, volume_spec
from conftest import MiB, pwrite_file
from test_rcopy import BLK, FAILED, SIZE, assert_b_equals, image, journal, make_pair, rstatus, sync


def closed_port() -> int:
    """A local TCP port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.allow_log(*FAILED)
def test_link_errors_name_their_cause(vmd_factory: Callable[..., VmdDaemon],
                                      tmp_path: Path) -> None:
    b = vmd_factory("b", volumes={"vol0": volume_spec("vol0", size=SIZE)}).start()
    receive = [sys.executable, "-m", "vmd", "-c", str(b.config_path), "rcopy", "receive"]
    links = {  # volume on A: (link command, what its failure must say)
        "novol": ([*receive, "vol9"], "no volume named 'vol9'"),
        "nocmd": (["sh", "-c", "vmd-not-installed rcopy receive vol0"],
                  "vmd-not-installed: not found"),
        "refused": (["ssh", "-o", "BatchMode=yes", "-p", str(closed_port()), "127.0.0.1",
                     shlex.join([*receive, "vol0"])], "Connection refused"),
    }
    a = vmd_factory("a", volumes={v: volume_spec(v, size=SIZE, rcopy={"target": cmd,
                                                                       "period": "1h"})
                                  for v, (cmd, _) in links.items()}).start()
    for vol, (_, cause) in links.items():
        p = a.cli("rcopy", "sync", vol, check=False)
        assert p.returncode != 0 and cause in p.stderr, (vol, p.stderr)
        st = json.loads(a.cli("rcopy", "status", vol, "--json").stdout)
        assert st["last_update"]["state"] == "failed", (vol, st)
        assert cause in st["last_update"]["error"], (vol, st)
        text = a.cli("rcopy", "status", vol).stdout
        assert cause in text, (vol, text)
        # The first update failed: the next one sends the whole volume, and status says so.
        assert st["next_full"] and st["pending_bytes"] == SIZE, (vol, st)
        assert "a full update is pending" in text, (vol, text)


@pytest.mark.allow_log(*FAILED, r"could not be recorded", r"found at start",
                       r"was not stopped cleanly", r"dead mount")
def test_commit_that_cannot_be_recorded_is_settled_at_restart(
        vmd_factory: Callable[..., VmdDaemon], tmp_path: Path) -> None:
    """The checkpoint naming an update's new consistent point fails: it may or may not
    have reached the disk, so B neither rolls back (old data under a log that may name
    the new point) nor claims the point. It refuses reads and updates until a restart
    reads its log back and rolls back to the point that log names."""
    a, b = make_pair(vmd_factory, tmp_path)
    pwrite_file(a.volume_file(), [(0, b"1" * BLK), (5 * MiB, b"1" * BLK)])
    first = sync(a)
    point1 = image(a)
    b.stop()
    b.env["VMD_TEST_FAULT"] = "rcopy-commit:vol0"
    b.start()
    pwrite_file(a.volume_file(), [(0, b"2" * BLK), (9 * MiB, b"2" * BLK)])
    reply = sync(a, check=False)
    assert not reply["ok"] and "could not be recorded" in reply["error"], reply
    with pytest.raises(OSError) as e, open(b.volume_file(), "rb") as f:
        f.read(BLK)
    assert e.value.errno == errno.EBUSY, e.value
    again = sync(a, check=False)
    assert not again["ok"] and "restart its daemon" in again["error"], again
    assert journal(b).exists(), "the undo journal was dropped before the point was settled"

    # A crash now: the durable log still names point 1 (the failed checkpoint wrote
    # nothing), so the journal rolls the volume back to it. (A clean stop would
    # record point 2 instead, equally true: its data was flushed before the commit.)
    b.kill()
    del b.env["VMD_TEST_FAULT"]
    b.start()
    assert not journal(b).exists()
    assert rstatus(b)["sequence"] == first["seq"]
    assert_b_equals(b, point1)
    sync(a)
    assert_b_equals(b, image(a))
