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

    d.start()
    job = subprocess.Popen([sys.executable, "-m", "vmd", "-c", str(d.config_path), "verify",
                            "vol0", "--repair", "--from", "p1"],
                           cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def repairing() -> bool:
            v = d.status("vol0").get("verify_running") or {}
            return v.get("done_bytes", 0) >= 12 * MiB and v.get("mismatched_bytes", 0) > 0

        wait_for(repairing, what="the repair to have repaired 8MiB")
        d.kill()  # a crash (OOM, power loss) in the middle of the repair
        job.communicate(timeout=30)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert "finished" not in d.stderr(), "the kill came after the repair"

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
    assert r["range_sources"] == ["p1", "p1", "p0"], r
    assert r["repaired_from"] == {"p1": 4096 + 512, "p0": 512} and r["no_majority_bytes"] == 512
    assert "p1, p2 agree; p0 differs; repaired from p1" in out, out
    assert ("no strict majority of the plexes agreed on 512B: repaired there from plex p0, "
            "the first ACTIVE plex") in out, out
    d.stop()
    assert sha(p0) == sha(p1) == sha(p2)
    now = read_at(p0, 0, 8 * MiB)
    assert now[:6 * MiB] == good[:6 * MiB] and now[6 * MiB + 512:] == good[6 * MiB + 512:]
    assert now[6 * MiB:6 * MiB + 512] == good[6 * MiB:6 * MiB + 512]  # p0's, the default


async def test_repair_names_each_source_in_the_log_before_writing_from_it(tmp_path: Path) -> None:
    """The majority changes between two ranges (p1, p2 agree; then p0, p2):
    every repair write finds its own source named in the log on disk (what a
    crash recovery would copy from), the first source's repairs are flushed
    before the second is named, and the name is gone once the repair is."""
    from enginekit import running_volume, volume_config
    from vmd.sidecar import read_log

    vc = volume_config(tmp_path, size=8 * MiB, nplex=3)
    async with running_volume(vc, clean_delay=3600) as vol:
        await vol.pwrite(0, os.urandom(4 * MiB))
        await vol.flush()
        p0, p1, p2 = (vol.plex(f"p{i}") for i in range(3))
        os.pwrite(p0.fd, b"x" * 4096, 1 * MiB)  # p0 alone differs: from p1
        os.pwrite(p1.fd, b"y" * 4096, 3 * MiB)  # p1 alone differs: from p0 (p2 agrees)
        events: list[tuple[str, ...]] = []

        def watch(p: Any) -> None:
            write, flush = p.pwrite, p.flush

            async def pwrite(off: int, data: Any) -> None:
                logged = read_log(vc.log)[0].state.extra.get("repair", {}).get("source")
                events.append(("write", p.name, off // MiB, logged))
                await write(off, data)

            async def flushed() -> None:
                events.append(("flush", p.name))
                await flush()

            p.pwrite, p.flush = pwrite, flushed

        for p in (p0, p1, p2):
            watch(p)
        result = await Verify(vol, repair=True).work()
        assert result["range_sources"] == ["p1", "p0"], result
        writes = [e for e in events if e[0] == "write"]
        assert writes == [("write", "p0", 1, "p1"), ("write", "p2", 1, "p1"),
                          ("write", "p1", 3, "p0"), ("write", "p2", 3, "p0")], events
        between = events[events.index(writes[1]) + 1:events.index(writes[2])]
        assert {e[1] for e in between if e[0] == "flush"} == {"p0", "p1", "p2"}, events
        assert "repair" not in read_log(vc.log)[0].state.extra
        assert os.pread(p0.fd, 4096, 1 * MiB) == os.pread(p1.fd, 4096, 1 * MiB) != b"x" * 4096
        assert os.pread(p1.fd, 4096, 3 * MiB) == os.pread(p0.fd, 4096, 3 * MiB) != b"y" * 4096
