"""Fixtures for integration tests: a real `vmd daemon` in a subprocess on a
real FUSE mount, loop devices, ext4 and tmpfs mounts — all torn down, always.

Reusable pieces (crash tests build on them), kept in syskit.py and
daemonkit.py and re-exported here (`from conftest import VmdDaemon`):

* `SysResources` (fixture `sysres`): loop devices and mounts a test makes;
  teardown lazily unmounts and detaches them and checks that nothing is left
  in /proc/mounts or `losetup -a`.
* `VmdDaemon`: writes a YAML config into a directory, starts/stops/kills/
  restarts the daemon, runs the CLI against it, reads `status --json`.
* `vmd_factory(**kw)` makes (unstarted) daemons; `vmd` is one started daemon
  with volume vol0 (64 MiB, two plexes).
* The autouse log check fails a test whose daemon wrote an unexpected
  WARNING/ERROR/CRITICAL line or a traceback to stderr. Declare expected
  ones with `@pytest.mark.allow_log(r"regex", ...)` or, at run time, the
  `allow_log` fixture: `allow_log(r"regex")`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# The helpers live in syskit.py and daemonkit.py; tests import them from here.
from daemonkit import START_TIMEOUT, VmdDaemon, unexpected_log_lines, volume_spec
from syskit import (CMD_TIMEOUT, KiB, MiB, REPO, SysResources, admin_raw, admin_request,
                    enospc_or_efbig, is_mounted, loop_devices, missing_mount_facility, mountinfo,
                    mounts_under, pwrite_file, run, sha, wait_for)

__all__ = ["CMD_TIMEOUT", "KiB", "MiB", "REPO", "START_TIMEOUT", "SysResources", "VmdDaemon",
           "admin_raw", "admin_request", "enospc_or_efbig", "is_mounted", "loop_devices",
           "missing_mount_facility", "mountinfo", "mounts_under", "pwrite_file", "run", "sha",
           "unexpected_log_lines", "volume_spec", "wait_for"]


# -- markers -----------------------------------------------------------------------

def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "allow_log(*regexes): daemon stderr lines (WARNING/ERROR) a test expects")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("mount") is not None:
        why = missing_mount_facility()
        if why:
            pytest.skip(why)


# -- stderr check -------------------------------------------------------------------

@pytest.fixture
def allow_log(request: pytest.FixtureRequest) -> Callable[..., None]:
    """Call with regexes of daemon stderr lines this test expects."""
    allowed: list[str] = request.node.stash.setdefault(_ALLOWED, [])

    def add(*regexes: str) -> None:
        allowed.extend(regexes)

    return add


_DAEMONS = pytest.StashKey[list[VmdDaemon]]()
_ALLOWED = pytest.StashKey[list[str]]()


@pytest.fixture(autouse=True)
def _daemon_log_check(request: pytest.FixtureRequest) -> Iterator[None]:
    """After the test (and after its daemons stopped), fail on unexpected
    WARNING/ERROR lines in any daemon's stderr."""
    daemons: list[VmdDaemon] = request.node.stash.setdefault(_DAEMONS, [])
    allowed: list[str] = request.node.stash.setdefault(_ALLOWED, [])
    yield
    for m in request.node.iter_markers("allow_log"):
        allowed.extend(m.args)
    bad = []
    for d in daemons:
        for line in unexpected_log_lines(d.stderr(whole=True), allowed):
            bad.append(f"{d.base}: {line}")
    if bad:
        pytest.fail("unexpected WARNING/ERROR lines in daemon stderr (declare expected ones "
                    "with @pytest.mark.allow_log):\n" + "\n".join(bad), pytrace=False)


# -- fixtures ----------------------------------------------------------------------

@pytest.fixture
def sysres() -> Iterator[SysResources]:
    res = SysResources()
    yield res
    res.release()
    problems = res.verify_released()
    assert not problems, problems


@pytest.fixture
def vmd_factory(request: pytest.FixtureRequest, tmp_path: Path,
                sysres: SysResources) -> Iterator[Callable[..., VmdDaemon]]:
    """make(subdir="d0", **VmdDaemon kwargs) → an unstarted VmdDaemon."""
    daemons: list[VmdDaemon] = request.node.stash.setdefault(_DAEMONS, [])
    mine: list[VmdDaemon] = []

    def kill_all() -> None:
        for d in mine:
            if d.proc is not None and d.proc.poll() is None:
                d.proc.kill()

    sysres.on_hang = kill_all

    def make(subdir: str | None = None, **kw: Any) -> VmdDaemon:
        d = VmdDaemon(tmp_path / (subdir or f"d{len(mine)}"), res=sysres, **kw)
        mine.append(d)
        daemons.append(d)
        return d

    yield make
    sysres.release()  # ext4 mounts and loop devices sit on top of the volume files
    for d in mine:
        d.cleanup()
    left = [str(d.mountpoint) for d in mine if is_mounted(d.mountpoint)]
    assert not left, f"FUSE mounts left behind: {left}"


@pytest.fixture
def vmd(vmd_factory: Callable[..., VmdDaemon]) -> VmdDaemon:
    """A running daemon: vol0, 64 MiB, plexes vol0-p0.img and vol0-p1.img."""
    return vmd_factory().start()
