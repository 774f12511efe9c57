"""A damaged or lost sidecar log after `vmd plex remove`/`add`: start-up and
`--recover-all` must use the plexes the log recorded, and without a log must
not silently resync from a removed plex's stale image (the config's first)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from vmd import sidecar as sc

from conftest import VmdDaemon, volume_spec
from test_crash import flip_byte

OLD = b"OLD-DATA" * 512  # 4 KiB
NEW = b"NEW-DATA" * 512


def _write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        assert os.pwrite(fd, data, 0) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(len(OLD))


def _removed_then_added(vmd_factory: Callable[..., VmdDaemon]) -> tuple[VmdDaemon, list[Path]]:
    """The tester's steps: OLD-DATA; remove p0 (a.img kept); NEW-DATA; add
    c.img; in sync. The config still lists a.img and b.img."""
    d = vmd_factory(volumes={"vol0": volume_spec("vol0", size="8MiB", region_size="1MiB")},
                    clean_delay=30)
    a, b = d.plex_paths()
    c = d.path("vol0-c.img")
    d.start()
    _write(d.volume_file(), OLD)
    d.cli("plex", "remove", "vol0", "p0")
    _write(d.volume_file(), NEW)
    d.cli("plex", "add", "vol0", str(c))
    st = d.wait_resync()
    assert {p["name"]: p["path"] for p in st["plexes"]} == {"p1": str(b), "p2": str(c)}, st
    assert _head(a) == OLD and _head(c) == NEW
    return d, [a, b, c]


@pytest.mark.parametrize("where", ["first-copy", "second-copy"])
@pytest.mark.parametrize("stop", ["stop", "sigkill"])
def test_one_damaged_byte_after_plex_remove_and_add_keeps_the_logged_plexes(
        vmd_factory: Callable[..., VmdDaemon], allow_log: Callable[..., None],
        stop: str, where: str) -> None:
    allow_log(r"is damaged", r"rewritten from the state", r"differs from the plexes",
              r"not stopped cleanly")
    d, (a, b, c) = _removed_then_added(vmd_factory)
    if stop == "stop":
        d.stop()
    else:
        d.kill()
    log0 = d.log_path()
    data = log0.read_bytes()
    first_end = sc._unframe(data, sc.HEADER_SIZE)[1]
    # 4300: the tester's `dd seek=4300`, inside the (first) checkpoint.
    flip_byte(log0, 4300 if where == "first-copy" else first_end + 200)

    d.start()
    st = d.status()
    assert not st.get("refused"), st
    vol = d.status("vol0")
    assert {p["name"]: (p["path"], p["state"]) for p in vol["plexes"]} == \
        {"p1": (str(b), "ACTIVE"), "p2": (str(c), "ACTIVE")}, vol
    assert _head(d.volume_file()) == NEW
    assert len(list(log0.parent.glob(log0.name + ".damaged-*"))) == 1
    d.wait_resync()
    assert _head(b) == NEW and _head(c) == NEW and _head(a) == OLD  # a.img untouched
    d.stop()


def test_lost_log_recover_all_refuses_a_stale_first_plex_until_the_source_is_named(
        vmd_factory: Callable[..., VmdDaemon], allow_log: Callable[..., None]) -> None:
    allow_log(r"volume vol0 refused: ", r"--recover-all", r"not stopped cleanly")
    d, (a, b, c) = _removed_then_added(vmd_factory)
    d.stop()
    d.log_path().unlink()

    d.start()  # refused: the refusal names the images and how to choose
    err = {r["name"]: r["error"] for r in d.status().get("refused", [])}["vol0"]
    for p in (a, b):
        assert str(p) in err, err
    assert "modified" in err and "--recover-all vol0=IMAGE" in err, err
    d.stop()

    d.daemon_args = ("--recover-all", "vol0")  # a.img is older than b.img: not guessed
    d.start()
    err = {r["name"]: r["error"] for r in d.status().get("refused", [])}["vol0"]
    assert f"{b} was modified after it" in err and "the first plex in the config" in err, err
    assert "MiB, modified" in err and "--recover-all vol0=IMAGE" in err, err
    assert not list(d.log_path().parent.glob("vol0.log*")), "a refused recovery wrote a log"
    assert _head(a) == OLD and _head(b) == NEW
    d.stop()

    d.daemon_args = ("--recover-all", f"vol0={b}")
    d.start()
    assert not d.status().get("refused"), d.status()
    d.wait_resync()
    assert _head(d.volume_file()) == NEW and _head(a) == NEW and _head(b) == NEW
    d.stop()


def test_lost_log_and_a_missing_first_image_is_never_the_source(
        vmd_factory: Callable[..., VmdDaemon], allow_log: Callable[..., None]) -> None:
    """Log lost and p0's image missing (its disk not mounted): `--recover-all`
    created p0 blank, made it the source, and copied its zeros over p1. Now
    the missing image is refused as the source, the refusal says so, and
    naming p1 recovers it (p0 created and copied from p1)."""
    allow_log(r"volume vol0 refused: ", r"--recover-all", r"not stopped cleanly")
    d = vmd_factory(volumes={"vol0": volume_spec("vol0", size="8MiB", region_size="1MiB")})
    a, b = d.plex_paths()
    d.start()
    _write(d.volume_file(), NEW)
    d.stop()
    d.log_path().unlink()
    a.rename(d.path("p0-elsewhere.img"))

    d.start()
    err = {r["name"]: r["error"] for r in d.status().get("refused", [])}["vol0"]
    assert f"{a} (missing)" in err and "the first plex in the config is missing" in err, err
    d.stop()
    d.daemon_args = ("--recover-all", "vol0")
    d.start()
    err = {r["name"]: r["error"] for r in d.status().get("refused", [])}["vol0"]
    assert f"from {a}, which is missing" in err and "--recover-all vol0=IMAGE" in err, err
    assert not a.exists() and _head(b) == NEW
    d.stop()
    d.daemon_args = ("--recover-all", f"vol0={a}")  # named, but missing: the same
    d.start()
    assert "which is missing" in d.status()["refused"][0]["error"]
    assert not a.exists() and _head(b) == NEW
    d.stop()

    d.daemon_args = ("--recover-all", "vol0=p1")
    d.start()
    assert not d.status().get("refused"), d.status()
    d.wait_resync()
    assert _head(d.volume_file()) == NEW and _head(a) == NEW and _head(b) == NEW
    assert "image " + str(a) + " is missing: created empty" in d.stderr()
    d.stop()


def test_lost_log_and_a_missing_raid5_column_is_not_created_blank(
        vmd_factory: Callable[..., VmdDaemon], allow_log: Callable[..., None]) -> None:
    """A RAID-5 volume's log lost and column c1 missing: `--recover-all`
    created c1 blank and regenerated every stripe's parity over it (a third
    of the data gone). Now c1 is not created: the volume is dirty and
    degraded without a log, refused unless --force-degraded, and then served
    degraded with every byte reconstructed."""
    from raid5kit import raid5_spec  # noqa: PLC0415

    allow_log(r"volume r5 refused: ", r"--recover-all", r"not stopped cleanly", r"is IOFAIL",
              r"--force-degraded", r"write hole")
    d = vmd_factory(volumes={"r5": raid5_spec("r5", size="4MiB", r5log=False)})
    d.start()
    data = os.urandom(4 * 1024 * 1024)
    _write(d.volume_file("r5"), data)
    d.stop()
    d.log_path("r5").unlink()
    c1 = d.path("r5-c1.img")
    c1.rename(d.path("c1-elsewhere.img"))

    d.daemon_args = ("--recover-all", "r5")
    d.start()
    err = {r["name"]: r["error"] for r in d.status().get("refused", [])}["r5"]
    assert "degraded" in err and "--force-degraded r5" in err, err
    assert not c1.exists()
    d.stop()

    d.daemon_args = ("--recover-all", "r5", "--force-degraded", "r5")
    d.start()
    st = d.status("r5")
    assert {c["name"]: c["state"] for c in st["columns"]}["c1"] == "IOFAIL", st["columns"]
    assert not c1.exists()
    with open(d.volume_file("r5"), "rb") as f:
        assert f.read() == data
    d.stop()
