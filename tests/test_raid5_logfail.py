"""A RAID-5 log that fails (its filesystem full) on a real daemon: the
volume refuses writes and has lost the acknowledged writes not yet in the
log, and the admin is told so — `vmd status` (text and --json health), one
`raid5-log-failed` event, one daemon log line for the lazy cleaner — and the
documented way back (space for the log, `vmd stop`, start) works."""

from __future__ import annotations

import errno
import logging
import os
import re
from pathlib import Path

import pytest
import trio
import trio.testing

from conftest import MiB, SysResources, run, wait_for
from raid5kit import raid5_config, raid5_spec
from test_events import EventStream
from vmd import drl as drl_mod
from vmd.drl import DirtyRegionLog
from vmd.sidecar import new_state


CLEAN_DELAY = 0.4  # the lazy cleaner runs every 0.2 s


def _write_until_refused(path: Path) -> OSError:
    """Write 1 MiB pieces and fsync each until the volume refuses one."""
    fd = os.open(path, os.O_WRONLY)
    try:
        for off in range(0, 32 * MiB, MiB):
            try:
                os.pwrite(fd, os.urandom(MiB), off)
                os.fsync(fd)
            except OSError as e:
                return e
    finally:
        os.close(fd)
    raise AssertionError(f"32 MiB written to {path} and no write or fsync failed")


@pytest.mark.allow_log(r"RAID-5 log .* failed", r"acknowledged write\(s\) lost")
@pytest.mark.mount
def test_a_full_raid5_log_is_shown_announced_logged_once_and_a_restart_recovers(
        vmd_factory, sysres: SysResources, tmp_path: Path) -> None:
    tiny = sysres.mount("tmpfs", tmp_path / "tiny", "-t", "tmpfs", "-o", "size=2m")
    r5log = f"{tiny}/r5.r5log"
    d = vmd_factory(volumes={"r5": raid5_spec(size="32MiB", r5log=False, raid5_log=r5log)},
                    clean_delay=CLEAN_DELAY).start()
    ev = EventStream(d, "--new")
    try:
        wait_for(ev.following.is_set, 30, "`vmd events` following")
        e = _write_until_refused(d.volume_file("r5"))
        assert e.errno == errno.EIO, e

        got = ev.wait("raid5-log-failed")
        assert got["volume"] == "r5" and "No space left" in got["details"]["error"], got
        assert got["details"]["path"] == r5log and got["details"]["lost_entries"] >= 1, got
        st = wait_for(lambda: (s := d.status("r5"))["raid5_log"]["lost_entries"] and s, 30,
                      "the lost entries counted")
        assert st["health"] == "failed", st
        assert st["problem"].startswith(f"RAID-5 log {r5log} failed: "), st
        assert "No space left" in st["problem"] and "writes refused" in st["problem"], st
        assert f"{st['raid5_log']['lost_entries']} acknowledged write" in st["problem"], st

        text = d.cli("status", "r5").stdout
        assert re.search(r"^volume r5 .* FAILED", text, re.M), text
        assert f"  problem: RAID-5 log {r5log} failed" in text, text
        assert re.search(rf"^  raid5_log {re.escape(r5log)}  .*FAILED", text, re.M), text

        # Lost writes never reached a column: the lazy cleaner's flush goes on.
        assert "lazy clean failed" not in d.stderr(), d.stderr()
        assert len([x for x in ev.events if x["kind"] == "raid5-log-failed"]) == 1, ev.events
    finally:
        ev.close()

    # docs/operations.md: room for the log, then stop and start the daemon.
    run(["mount", "-o", "remount,size=80m", tiny])
    d.stop()
    d.start()
    st = d.status("r5")
    assert st["health"] == "ok" and st["raid5_log"]["failed"] is None, st
    fd = os.open(d.volume_file("r5"), os.O_WRONLY)
    try:
        os.pwrite(fd, os.urandom(4 * MiB), 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    text = d.cli("status", "r5").stdout
    assert re.search(rf"^  raid5_log {re.escape(r5log)}  \S+ / 64MiB", text, re.M), text
    assert "FAILED" not in text, text
    d.stop()



async def test_a_lazy_clean_that_keeps_failing_is_logged_once_until_it_works_again(
        autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture) -> None:
    """C8 of tester 3: the cleaner retries every period, and a failure that
    lasts (a failed log, a full disk) filled the daemon log every 2 s."""
    drl = DirtyRegionLog(new_state("v", 8 * MiB, MiB, MiB), None,  # type: ignore[arg-type]
                         enabled=True, clean_delay=4.0, flush_plexes=_nothing,
                         fmr_bits=lambda regs: {})
    failing = [True]

    async def clean_idle(*, everything: bool = False) -> int:
        if failing[0]:
            raise OSError(errno.EIO, "injected: the log failed")
        return 1

    drl.clean_idle = clean_idle  # type: ignore[method-assign]

    def said(what: str) -> int:
        return sum(what in r.getMessage() for r in caplog.records)

    caplog.set_level(logging.INFO, "vmd.drl")
    period = 2.0  # min(clean_delay / 2, 2 s)
    async with trio.open_nursery() as nursery:
        await nursery.start(drl.run_cleaner, lambda: False)
        await trio.sleep(100 * period)
        assert said("lazy clean failed: [Errno 5] injected") == 1, caplog.text
        await trio.sleep(drl_mod.CLEAN_FAILURE_LOG_SECONDS)  # once more after so long
        assert said("lazy clean failed") == 2 and said("time(s) in a row") == 2, caplog.text
        failing[0] = False
        await trio.sleep(10 * period)
        assert said("lazy clean works again after") == 1, caplog.text
        failing[0] = True  # a new failure is said at once
        await trio.sleep(10 * period)
        assert said("lazy clean failed") == 3, caplog.text
        nursery.cancel_scope.cancel()


async def _nothing() -> None:
    pass


def test_a_crc32c_that_cannot_run_refuses_the_log_at_open(tmp_path, monkeypatch):
    """CRC32C_SW_MODE=none on a CPU without SSE 4.2 makes the crc32c package
    raise at every call (this CPU has the instruction: the call is made to
    fail). The volume was served and its log failed at the first write, the
    writes refused (review 13); now the open says why, naming the variable."""
    import crc32c

    from vmd.manager import open_volume

    def no_crc(*a, **kw):
        raise RuntimeError("no hardware crc32c and CRC32C_SW_MODE=none")

    monkeypatch.setattr(crc32c, "crc32c", no_crc)
    cfg = raid5_config(tmp_path, raid5_log=tmp_path / "r5.r5log")
    with pytest.raises(Exception) as e:
        open_volume(cfg, tmp_path / "test.yaml")
    why = str(e.value)
    for s in (str(tmp_path / "r5.r5log"), "crc32c", "CRC32C_SW_MODE", "RuntimeError"):
        assert s in why, why
