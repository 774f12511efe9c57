"""Which bytes a repair writes, and which a crash during it keeps: the repair's
source survives a SIGKILL midway (its regions are recovered from it, not from
the plex being repaired), and without --from the plexes that agree win where a
strict majority does. Real daemon, real images, real SIGKILL."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO, MiB, VmdDaemon, pwrite_file, sha, volume_spec, wait_for
from test_verify import MISMATCH_LOG, flip, read_at, verify
from vmd.verify import Verify

DATA = 32 * MiB


def _read(path: os.PathLike[str], n: int = DATA) -> bytes:
    return read_at(path, 0, n)  # type: ignore[arg-type]


def _kill_during_repair(d: VmdDaemon, *args: str) -> None:
    """Start the daemon, run `vmd verify vol0 --repair ARGS`, and SIGKILL the
    daemon once the repair is under way (its rate limit slows it down so the
    kill lands midway: waited for in status, not guessed)."""
    d.start()
    job = subprocess.Popen([sys.executable, "-m", "vmd", "-c", str(d.config_path), "verify",
                            "vol0", "--repair", *args],
                           cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def repairing() -> bool:
            v = d.status("vol0").get("verify_running") or {}
            return v.get("done_bytes", 0) >= 10 * MiB and v.get("mismatched_bytes", 0) > 0

        wait_for(repairing, what="the repair to be under way")
        d.kill()  # a crash (OOM, power loss) in the middle of the repair
        job.communicate(timeout=30)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert "finished" not in d.stderr(), "the kill came after the repair"


@pytest.mark.mount
@pytest.mark.allow_log(MISMATCH_LOG, r"was not stopped cleanly: recovering",
                       r"verify.* (stopped|finished)")
def test_crash_during_repair_is_recovered_from_the_repairs_source(
        vmd_factory: Callable[..., VmdDaemon]) -> None:
    """p0 is damaged, the admin repairs from p1; the daemon is SIGKILLed midway.
    The regions the repair dirtied are recovered from p1: p1, the only good
    copy, must not take p0's damaged bytes (the DRL's "one copy wins")."""
    # The rate limit slows the repair so that the kill lands midway; a long
    # clean delay keeps every repaired region dirty in the DRL until the kill.
    d = vmd_factory(rate_limit="4MiB", clean_delay=3600).start()
    ref = os.urandom(DATA)
    pwrite_file(d.volume_file(), [(0, ref)])
    d.stop()
    p0, p1 = d.plex_paths()
    pwrite_file(p0, [(4 * MiB, os.urandom(DATA - 4 * MiB))])  # p0 damaged: the admin knows

    _kill_during_repair(d, "--from", "p1")

    d.set_rate_limit(None)
    d.start()
    d.wait_resync()
    assert _read(p1) == ref, "the repair's source took the damaged plex's bytes"
    assert "from plex p1 (the source of the repair the crash interrupted)" in d.stderr(), \
        d.stderr()
    # Run again, as the docs say of an interrupted verify: it completes.
    rc, out, r = verify(d, "--repair", "--from", "p1")
    assert rc == 0 and r["complete"] and r["source"] == "p1", out
    assert "repair" not in d.logged_state().extra, "the repair's record outlived it"
    d.stop()
    assert _read(p0) == _read(p1) == ref


@pytest.mark.mount
@pytest.mark.allow_log(MISMATCH_LOG, r"was not stopped cleanly: recovering",
                       r"verify.* (stopped|finished)")
def test_crash_during_a_majority_repair_never_undoes_a_majority(
        vmd_factory: Callable[..., VmdDaemon]) -> None:
    """Three plexes, in every 4 MiB region p0 wrong at +0.5 MiB and p1 wrong at
    +2.5 MiB: each range has a majority, and the majorities differ inside one
    DRL region. A SIGKILL during `verify --repair` (no --from) recovered each
    dirty region from the repair's current source, overwriting the ranges
    not yet repaired where that plex was the lone dissenter: the good bytes
    were gone from all three plexes, and verify saw nothing there."""
    d = vmd_factory(volumes={"vol0": volume_spec("vol0", size="32MiB", nplex=3)},
                    rate_limit="4MiB", clean_delay=3600).start()
    ref = os.urandom(DATA)
    pwrite_file(d.volume_file(), [(0, ref)])
    d.stop()
    p0, p1, p2 = d.plex_paths()
    for r in range(0, DATA, 4 * MiB):
        pwrite_file(p0, [(r + MiB // 2, os.urandom(64 * 1024))])
        pwrite_file(p1, [(r + 5 * MiB // 2, os.urandom(64 * 1024))])
    _kill_during_repair(d)
    d.set_rate_limit(None)
    d.start()
    d.wait_resync()
    images = [_read(p) for p in (p0, p1, p2)]
    for off in range(0, DATA, 64 * 1024):
        agree = sum(img[off:off + 64 * 1024] == ref[off:off + 64 * 1024] for img in images)
        assert agree >= 2, f"at {off}: the majority's bytes were lost ({agree} of 3 plexes)"
    rc, out, r = verify(d, "--repair")  # the rest of the repair, as the docs say
    assert rc == 0 and r["complete"], out
    d.stop()
    assert _read(p0) == _read(p1) == _read(p2) == ref


@pytest.mark.mount
@pytest.mark.allow_log(MISMATCH_LOG)
def test_verify_names_the_plexes_that_agree_and_repair_keeps_the_majority(
        vmd_factory: Callable[..., VmdDaemon]) -> None:
    """Three plexes: a range where p0 alone differs, one where p2 alone does,
    one where all three differ. verify says which agree; --repair without
    --from keeps the majority's bytes (not p0's over two good copies), and
    p0's, the documented default, where there is no majority, and says so."""
    d = vmd_factory(volumes={"vol0": volume_spec("vol0", nplex=3)}).start()
    pwrite_file(d.volume_file(), [(0, os.urandom(8 * MiB))])
    d.stop()
    p0, p1, p2 = d.plex_paths()
    good = read_at(p0, 0, 8 * MiB)
    flip(p0, 2 * MiB, 4096)  # p0 the lone dissenter
    flip(p2, 5 * MiB + 512, 512)  # p2 the lone dissenter
    flip(p1, 6 * MiB, 512)  # three versions: no majority
    pwrite_file(p2, [(6 * MiB, b"\1" * 512)])

    d.start()
    rc, out, r = verify(d)
    assert rc == 1, out
    assert r["ranges"] == [[2 * MiB, 4096], [5 * MiB + 512, 512], [6 * MiB, 512]], r
    assert r["range_versions"] == [[["p1", "p2"], ["p0"]], [["p0", "p1"], ["p2"]],
                                   [["p0"], ["p1"], ["p2"]]], r
    assert f"offset {2 * MiB} (2MiB), 4096 bytes: p1, p2 agree; p0 differs" in out, out
    assert "p0, p1 agree; p2 differs" in out and "p0, p1, p2 all differ" in out, out

    rc, out, r = verify(d, "--repair")
    assert rc == 0, out
    assert r["range_sources"] == ["p1", "p0", "p0"], r
    assert r["repaired_from"] == {"p1": 4096, "p0": 512 + 512} and r["no_majority_bytes"] == 512
    assert "p1, p2 agree; p0 differs; repaired from p1" in out, out
    assert ("no strict majority of the plexes agreed on 512B: repaired there from plex p0, "
            "the first ACTIVE plex") in out, out
    d.stop()
    assert sha(p0) == sha(p1) == sha(p2)
    now = read_at(p0, 0, 8 * MiB)
    assert now[:6 * MiB] == good[:6 * MiB] and now[6 * MiB + 512:] == good[6 * MiB + 512:]
    assert now[6 * MiB:6 * MiB + 512] == good[6 * MiB:6 * MiB + 512]  # p0's, the default


async def test_only_a_repair_from_a_named_plex_names_it_in_the_log(tmp_path: Path) -> None:
    """--from p1: every repair write finds its source named in the log on
    disk (what a crash recovery copies from), and the name is gone once the
    repair is. Without --from each range keeps its own majority (p1, p2
    agree; then p0, p2): nothing is named and no region marked dirty, so a
    crash leaves the repair partial instead of copying one plex over ranges
    whose majority is another."""
    from enginekit import running_volume, volume_config
    from vmd.sidecar import read_log

    vc = volume_config(tmp_path, size=8 * MiB, nplex=3)
    async with running_volume(vc, clean_delay=3600) as vol:
        await vol.pwrite(0, os.urandom(4 * MiB))
        await vol.flush()
        p0, p1, p2 = (vol.plex(f"p{i}") for i in range(3))
        events: list[tuple[str, ...]] = []

        def watch(p: Any) -> None:
            write = p.pwrite

            async def pwrite(off: int, data: Any) -> None:
                st = read_log(vc.log)[0].state
                events.append((p.name, str(off // MiB), st.extra.get("repair", {}).get("source"),
                               str(st.drl.count())))
                await write(off, data)

            p.pwrite = pwrite

        for p in (p0, p1, p2):
            watch(p)

        def damage() -> None:
            os.pwrite(p0.fd, b"x" * 4096, 1 * MiB)  # p0 alone differs: from p1
            os.pwrite(p1.fd, b"y" * 4096, 3 * MiB)  # p1 alone differs: from p0 (p2 agrees)

        damage()
        dirty = str(read_log(vc.log)[0].state.drl.count())  # the writes' above, not yet clean
        result = await Verify(vol, repair=True).work()
        assert result["range_sources"] == ["p1", "p0"], result
        assert [e[:3] for e in events] == [("p0", "1", None), ("p2", "1", None),
                                           ("p1", "3", None), ("p2", "3", None)], events
        assert all(e[3] == dirty for e in events), (dirty, events)  # none dirtied by the repair
        assert os.pread(p0.fd, 4096, 1 * MiB) == os.pread(p1.fd, 4096, 1 * MiB) != b"x" * 4096
        assert os.pread(p1.fd, 4096, 3 * MiB) == os.pread(p0.fd, 4096, 3 * MiB) != b"y" * 4096

        events.clear()
        damage()
        result = await Verify(vol, repair=True, source="p1").work()
        assert result["range_sources"] == ["p1", "p1"], result
        assert all(e[2] == "p1" for e in events) and len(events) == 4, events
        assert "repair" not in read_log(vc.log)[0].state.extra
