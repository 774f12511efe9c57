"""One file under two names (a hard link, a bind mount) is one plex: a second
volume, or a second plex of the same volume, is refused its use wherever a
path already used is refused. And a volume whose image grew by `vmd resize`
and whose log is lost is refused alone: the daemon serves the others."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import MiB, VmdDaemon, sha, volume_spec
from vmd.errors import EXIT_ERROR

pytestmark = pytest.mark.mount

SIZE = 16 * MiB
ALIAS = "the same file under another name"


def _fill(path: Path, size: int = SIZE, off: int = 0) -> str:
    """Random data over [off, size) of a volume file, fsync'd; the file's sha256."""
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(os.urandom(size - off))
        f.flush()
        os.fsync(f.fileno())
    return sha(path)


def _refused(d: VmdDaemon) -> dict[str, str]:
    return {r["name"]: r["error"] for r in d.status().get("refused", [])}


def _fails(d: VmdDaemon, *args: str) -> str:
    """`vmd ARGS` is refused with one line on stderr; that line."""
    p = d.cli(*args, check=False)
    assert p.returncode == EXIT_ERROR, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    return p.stderr


@contextmanager
def _bind_mount(src: Path, dst: Path) -> Iterator[Path]:
    dst.mkdir()
    subprocess.run(["mount", "--bind", str(src), str(dst)], check=True)
    try:
        yield dst
    finally:
        subprocess.run(["umount", str(dst)], check=True)


def test_plex_add_and_replace_of_another_name_of_a_serving_image_are_refused(
        vmd_factory: Callable[..., VmdDaemon], tmp_path: Path) -> None:
    r5 = {"size": "4MiB", "layout": "raid5", "log": "r5.log", "stripe_unit": "64KiB",
          "columns": [f"r5-c{i}.img" for i in range(3)]}
    d = vmd_factory(volumes={"v": volume_spec("v", size="16MiB"),
                             "w": volume_spec("w", size="16MiB"), "r5": r5}).start()
    expect = _fill(d.volume_file("v"))
    b = d.plex_paths("v")[1]
    hard = d.path("bhard.img")
    os.link(b, hard)

    err = _fails(d, "plex", "add", "w", str(hard))
    assert f"{hard} is already plex p1 of volume v ({b}): {ALIAS}" in err, err
    err = _fails(d, "plex", "replace", "r5", "p1", str(hard))
    assert f"{hard} is already plex p1 of volume v ({b}): {ALIAS}" in err, err
    # A bind mount shows the same file under a path of its own.
    with _bind_mount(d.base, tmp_path / "bind") as bind:
        other = bind / b.name
        err = _fails(d, "plex", "add", "w", str(other))
        assert f"{other} is already plex p1 of volume v ({b}): {ALIAS}" in err, err
    assert d.plex_states("w") == {"p0": "ACTIVE", "p1": "ACTIVE"}
    assert sha(b) == expect and sha(d.volume_file("v")) == expect
    d.stop()


def test_a_config_volume_on_another_name_of_an_image_is_refused(
        vmd_factory: Callable[..., VmdDaemon], allow_log: Callable[..., None]) -> None:
    allow_log(r"volume [xvy] refused: ")
    d = vmd_factory(volumes={"v": volume_spec("v", size="16MiB")}).start()
    expect = _fill(d.volume_file("v"))
    b = d.plex_paths("v")[1]
    hard = d.path("bhard.img")
    os.link(b, hard)
    x0 = d.path("x0.img")
    d.config["volumes"]["x"] = {"size": "16MiB", "plexes": ["x0.img", "bhard.img"], "log": "x.log"}
    # Two plexes of one volume on one file: every write "mirrored" onto itself.
    y0 = d.path("y0.img")
    y0.write_bytes(b"")
    os.truncate(y0, SIZE)
    os.link(y0, d.path("y1.img"))
    d.config["volumes"]["y"] = {"size": "16MiB", "plexes": ["y0.img", "y1.img"], "log": "y.log"}
    d.write_config()

    err = _fails(d, "start", "x", f"--recover-all={x0}")  # as x's refusal would advise
    v_p1 = f"volumes.v.plexes[1] ({b}): {ALIAS}"
    assert f"volumes.x.plexes[1]: {hard} is {v_p1}" in err, err
    err = _fails(d, "start", "y")
    assert f"volumes.y.plexes[1]: {d.path('y1.img')} is volumes.y.plexes[0] ({y0}): {ALIAS}" \
        in err, err
    assert set(_refused(d)) == {"x", "y"}
    assert sha(b) == expect and sha(d.volume_file("v")) == expect
    assert not d.log_path("x").exists() and not d.log_path("y").exists()

    # At the daemon's start, even told to recover x: which of the two the
    # file is, only the administrator knows; neither is opened.
    d.stop()
    d.daemon_args = ("--recover-all", f"x={x0}")
    d.start()
    refused = _refused(d)
    assert set(refused) == {"v", "x", "y"}, refused
    assert f"volumes.x.plexes[1]: {hard} is {v_p1}" in refused["x"], refused
    assert f"volumes.v.plexes[1]: {b} is volumes.x.plexes[1] ({hard}): {ALIAS}" in refused["v"]
    assert sha(b) == expect

    # The config fixed, v comes up with its data.
    del d.config["volumes"]["x"]
    d.write_config()
    d.cli("start", "v")
    assert sha(d.volume_file("v")) == expect and sha(b) == expect
    d.stop()


def test_grown_volume_whose_log_is_lost_is_refused_alone(
        vmd_factory: Callable[..., VmdDaemon], allow_log: Callable[..., None]) -> None:
    """`vmd resize g`, the config not edited yet, then g's log lost: the daemon
    serves `other` and says why g is refused and how to bring it up."""
    allow_log(r"volume g refused: ", r"--recover-all", r"not stopped cleanly")
    d = vmd_factory(volumes={"g": volume_spec("g", size="16MiB"),
                             "other": volume_spec("other", size="16MiB")}).start()
    d.cli("resize", "g", "32MiB")
    expect = _fill(d.volume_file("g"), 32 * MiB)
    other = _fill(d.volume_file("other"))
    d.stop()
    d.log_path("g").unlink()

    d.start()  # before: exit 3, nothing served
    why = _refused(d)["g"]
    g0 = d.plex_paths("g")[0]
    for needle in (f"volumes.g.plexes[0]: existing image {g0} is {32 * MiB} bytes",
                   f"the volume is {16 * MiB} bytes", "`vmd resize g`",
                   "Set `size: 32MiB` for volumes.g", "`vmd start g --recover-all[=IMAGE]`"):
        assert needle in why, (needle, why)
    assert sha(d.volume_file("other")) == other
    assert [v["name"] for v in d.status()["volumes"]] == ["other"]

    # `vmd start` reads the config again: refused while it is not fixed.
    err = _fails(d, "start", "g", "--recover-all")
    assert "Set `size: 32MiB`" in err, err
    d.config["volumes"]["g"]["size"] = "32MiB"
    d.write_config()
    err = _fails(d, "start", "g")  # the size is right now: what the missing log requires
    assert "is missing but plex image" in err and "--recover-all" in err, err
    d.cli("start", "g", f"--recover-all={g0}")
    assert os.path.getsize(d.volume_file("g")) == 32 * MiB
    assert sha(d.volume_file("g")) == expect
    d.wait_resync("g")
    assert sha(d.plex_paths("g")[1]) == expect
    d.stop()
