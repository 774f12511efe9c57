"""Remote Copy failures as an administrator sees them (issue 16, item 8): a link
that fails names its cause (the link command's stderr) in the CLI error and in
`rcopy status`, and a status after a failed first update says that a full
update is pending. Real links: a receive of a volume B does not have, a
command that is not installed, and ssh to a port where nothing listens."""

from __future__ import annotations

import json
import shlex
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import VmdDaemon, volume_spec
from test_rcopy import FAILED, SIZE


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
