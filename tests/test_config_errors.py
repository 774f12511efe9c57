"""Bad configurations: one clear error naming the file and the key, exit code 3,
and nothing mounted or created."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import MiB, SysResources, VmdDaemon, is_mounted, sha, volume_spec
from vmd.errors import EXIT_CONFIG

pytestmark = pytest.mark.mount


def _expect_config_error(d: VmdDaemon, *needles: str) -> str:
    """Run the daemon on d's config; it must exit 3 with one stderr line naming
    the config file and every needle, having mounted and created nothing."""
    before = sorted(os.listdir(d.base))
    p = d.run_foreground()
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == EXIT_CONFIG, f"exit {p.returncode}, stderr:\n{p.stderr}"
    assert len(lines) == 1, f"expected one error line, got:\n{p.stderr}"
    msg = lines[0]
    assert str(d.config_path) in msg, msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    assert "Traceback" not in p.stderr
    assert not is_mounted(d.mountpoint, "fuse.vmd")
    assert not d.socket.exists()
    after = sorted(x for x in os.listdir(d.base) if x != d.stderr_path.name)
    assert after == [x for x in before if x != d.stderr_path.name], \
        f"files created despite the error: {set(after) - set(before)}"
    return msg


def _with(cfg: dict[str, Any], path: list[Any], value: Any) -> dict[str, Any]:
    node = cfg
    for k in path[:-1]:
        node = node[k]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return cfg


_DELETE = object()

CASES = {
    # id: (path into the config, value, strings the message must name)
    "unknown-top-key": (["colour"], "blue", ["colour", "unknown key"]),
    "unknown-volume-key": (["volumes", "vol0", "sise"], "64MiB", ["volumes.vol0.sise", "unknown key"]),
    "unknown-resync-key": (["resync"], {"rate": 5}, ["resync.rate"]),
    "size-garbage": (["volumes", "vol0", "size"], "12 parsecs", ["volumes.vol0.size"]),
    "size-unit-typo": (["volumes", "vol0", "size"], "64MiBs", ["volumes.vol0.size"]),
    "size-negative": (["volumes", "vol0", "size"], -512, ["volumes.vol0.size"]),
    "size-zero": (["volumes", "vol0", "size"], 0, ["volumes.vol0.size"]),
    "size-not-sector-multiple": (["volumes", "vol0", "size"], 1000, ["volumes.vol0.size"]),
    "size-float": (["volumes", "vol0", "size"], 1.5, ["volumes.vol0.size"]),
    "size-bool": (["volumes", "vol0", "size"], True, ["volumes.vol0.size"]),
    "region-size-bad": (["volumes", "vol0", "region_size"], "1000", ["volumes.vol0.region_size"]),
    # SI units are powers of ten: 1 kB is not a whole number of sectors or pages.
    "size-si-not-sector-multiple": (["volumes", "vol0", "size"], "1kB",
                                    ["volumes.vol0.size", "1000", "multiple of 512", "KiB"]),
    "region-size-si": (["volumes", "vol0", "region_size"], "4MB",
                       ["volumes.vol0.region_size", "4000000", "multiple of 4096", "MiB"]),
    "rate-limit-bad": (["resync"], {"rate_limit": "fast"}, ["resync.rate_limit"]),
    "rate-limit-negative": (["resync"], {"rate_limit": -1}, ["resync.rate_limit"]),
    "per-device-negative": (["resync"], {"per_device": -1}, ["resync.per_device", "-1"]),
    "per-device-garbage": (["resync"], {"per_device": "one"}, ["resync.per_device", "'one'"]),
    "per-device-float": (["resync"], {"per_device": 1.5}, ["resync.per_device", "1.5"]),
    "clean-delay-bad": (["clean_delay"], "soon", ["clean_delay"]),
    "missing-mountpoint": (["mountpoint"], _DELETE, ["mountpoint", "missing"]),
    "missing-socket": (["socket"], _DELETE, ["socket", "missing"]),
    "missing-volumes": (["volumes"], _DELETE, ["volumes", "missing"]),
    "empty-volumes": (["volumes"], {}, ["volumes"]),
    "missing-size": (["volumes", "vol0", "size"], _DELETE, ["volumes.vol0.size", "missing"]),
    "missing-plexes": (["volumes", "vol0", "plexes"], _DELETE, ["volumes.vol0.plexes", "missing"]),
    "missing-log": (["volumes", "vol0", "log"], _DELETE, ["volumes.vol0.log", "missing"]),
    "plexes-empty": (["volumes", "vol0", "plexes"], [], ["volumes.vol0.plexes"]),
    "plexes-not-list": (["volumes", "vol0", "plexes"], "a.img", ["volumes.vol0.plexes"]),
    "bad-volume-name": (["volumes", "../evil"], volume_spec("x"), ["volumes.../evil"]),
    "volume-not-mapping": (["volumes", "vol0"], "64MiB", ["volumes.vol0"]),
    "plex-twice-in-volume": (["volumes", "vol0", "plexes"], ["a.img", "./a.img"],
                             ["volumes.vol0.plexes[1]", "a.img"]),
    "log-is-a-plex": (["volumes", "vol0", "log"], "vol0-p0.img", ["volumes.vol0.log"]),
    "drl-not-bool": (["volumes", "vol0", "drl"], "yes please", ["volumes.vol0.drl"]),
    "direct-io-not-bool": (["volumes", "vol0", "direct_io"], "sometimes", ["volumes.vol0.direct_io"]),
    "writeback-cache-not-bool": (["writeback_cache"], "always", ["writeback_cache"]),
    "remote-timeout-zero": (["volumes", "vol0", "remote_timeout"], 0,
                            ["volumes.vol0.remote_timeout", "more than 0"]),
    "remote-timeout-garbage": (["volumes", "vol0", "remote_timeout"], "a while",
                               ["volumes.vol0.remote_timeout", "not a duration"]),
    "auto-attach-not-bool": (["volumes", "vol0", "auto_attach"], "maybe",
                             ["volumes.vol0.auto_attach"]),
    "nbd-unix-uri-without-socket": (["volumes", "vol0", "plexes"], ["a.img", "nbd+unix:///x"],
                                    ["volumes.vol0.plexes[1]", "nbd+unix:///x", "socket=PATH"]),
    "nbd-uri-without-host": (["volumes", "vol0", "plexes"], ["a.img", "nbd:///x"],
                             ["volumes.vol0.plexes[1]", "no host"]),
    # A mistyped URI would be taken as an image path (a file named `nbd:/...`).
    "nbd-uri-one-slash": (["volumes", "vol0", "plexes"], ["a.img", "nbd:/host:10809/x"],
                          ["volumes.vol0.plexes[1]", "starts like an NBD URI"]),
    "nbd-uri-upper-case": (["volumes", "vol0", "plexes"], ["a.img", "NBD://host/x"],
                           ["volumes.vol0.plexes[1]", "starts like an NBD URI"]),
    # An image or log in the daemon's own mount would be served by the daemon itself.
    "plex-under-mountpoint": (["volumes", "vol0", "plexes"], ["mnt/p0.img", "p1.img"],
                              ["volumes.vol0.plexes[0]", "mnt/p0.img", "mountpoint"]),
    "log-under-mountpoint": (["volumes", "vol0", "log"], "mnt/sub/vol0.log",
                             ["volumes.vol0.log", "mnt/sub/vol0.log", "mountpoint"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_value(vmd_factory: Callable[..., VmdDaemon], case: str) -> None:
    path, value, needles = CASES[case]
    d = vmd_factory()
    _with(d.config, path, value)
    d.write_config()
    _expect_config_error(d, *needles)


def test_plex_path_shared_by_two_volumes(vmd_factory: Callable[..., VmdDaemon]) -> None:
    d = vmd_factory(volumes={"vol0": volume_spec("vol0"),
                             "vol1": {**volume_spec("vol1"), "plexes": ["vol1-p0.img", "vol0-p1.img"]}})
    msg = _expect_config_error(d, "volumes.vol1.plexes[1]", "volumes.vol0.plexes[1]")
    assert "vol0-p1.img" in msg


def test_image_under_mountpoint_through_a_symlink(vmd_factory: Callable[..., VmdDaemon]) -> None:
    """A symlink outside the mount that leads into it is followed (and the
    mount itself never looked at): columns and the RAID-5 log are checked too."""
    d = vmd_factory(volumes={"r5": {**volume_spec("r5", size="64MiB", nplex=3), "layout": "raid5",
                                    "raid5_log": "ln/r5.r5log"}})
    d.config["volumes"]["r5"]["columns"] = d.config["volumes"]["r5"].pop("plexes")
    d.write_config()
    (d.base / "ln").symlink_to(d.base / "mnt")
    _expect_config_error(d, "volumes.r5.raid5_log", "ln/r5.r5log", "mountpoint")
    d.config["volumes"]["r5"]["raid5_log"] = "r5.r5log"
    d.config["volumes"]["r5"]["columns"][2] = "ln/../mnt/./c2.img"
    d.write_config()
    _expect_config_error(d, "volumes.r5.columns[2]", "mountpoint")


def test_an_image_or_log_at_the_socket_path_is_refused(vmd_factory: Callable[..., VmdDaemon]) -> None:
    """Accepted, the daemon created the RAID-5 log at the socket's path, then
    refused to start ("exists and is not a socket") and left the file."""
    d = vmd_factory(volumes={"r5": {**volume_spec("r5", size="64MiB", nplex=3), "layout": "raid5",
                                    "raid5_log": "vmd.sock"}})
    d.config["volumes"]["r5"]["columns"] = d.config["volumes"]["r5"].pop("plexes")
    d.config["socket"] = "vmd.sock"
    d.write_config()
    _expect_config_error(d, "volumes.r5.raid5_log", "is already used by socket")
    assert not (d.base / "vmd.sock").exists()


_VOL = "    size: 64MiB\n    plexes: [{n}-p0.img, {n}-p1.img]\n    log: {n}.log\n"
DUPLICATES = {
    # id: (the volumes' YAML, what the message names)
    "two-volume-blocks": ("  vol0:\n" + _VOL.format(n="a") + "  vol0:\n" + _VOL.format(n="b"),
                          ["line 8,", "'vol0'", "first on line 4"]),
    "key-twice-in-a-volume": ("  vol0:\n    size: 32MiB\n" + _VOL.format(n="a"),
                              ["line 6,", "'size'", "first on line 5"]),
}


@pytest.mark.parametrize("case", list(DUPLICATES))
def test_duplicate_key_is_refused(vmd_factory: Callable[..., VmdDaemon], case: str) -> None:
    """YAML keeps the last of two equal keys: a second volume block (or a
    second `size:` in one) silently won. Refused, naming the line and key."""
    volumes, needles = DUPLICATES[case]
    d = vmd_factory()
    d.write_config(f"mountpoint: mnt\nsocket: {d.config['socket']}\nvolumes:\n{volumes}")
    msg = _expect_config_error(d, "given twice", *needles)
    assert "not valid YAML" not in msg, msg


@pytest.mark.parametrize("text, needle", [
    ("- just\n- a list\n", "mapping"),
    ("42\n", "mapping"),
])
def test_config_not_a_mapping(vmd_factory: Callable[..., VmdDaemon], text: str, needle: str) -> None:
    d = vmd_factory()
    d.write_config(text)
    _expect_config_error(d, needle)


@pytest.mark.parametrize("text, line", [
    ("mountpoint: [unclosed\n", 1),
    ("volumes:\n  vol0:\n    size: 1MiB\n   plexes: x\n", 4),
])
def test_invalid_yaml(vmd_factory: Callable[..., VmdDaemon], text: str, line: int) -> None:
    d = vmd_factory()
    d.write_config(text)
    msg = _expect_config_error(d, "YAML", f"line {line}")
    assert "<unicode string>" not in msg


def test_invalid_yaml_exit_code(vmd_factory: Callable[..., VmdDaemon]) -> None:
    """Exit 3, the file named, no traceback, nothing mounted."""
    d = vmd_factory()
    d.write_config("mountpoint: [unclosed\n")
    p = d.run_foreground()
    assert p.returncode == EXIT_CONFIG, p.stderr
    assert f"{d.config_path}: line " in p.stderr and "not valid YAML" in p.stderr
    assert "Traceback" not in p.stderr
    assert not is_mounted(d.mountpoint) and not d.socket.exists()


def test_config_file_missing(vmd_factory: Callable[..., VmdDaemon]) -> None:
    d = vmd_factory()
    d.config_path.unlink()
    p = d.run_foreground()
    assert p.returncode == EXIT_CONFIG, p.stderr
    assert str(d.config_path) in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


@pytest.mark.parametrize("what", ["plex", "log", "mountpoint", "socket"])
def test_unwritable_directory(vmd_factory: Callable[..., VmdDaemon], sysres: SysResources,
                              tmp_path: Path, what: str) -> None:
    ro = sysres.mount_ro_tmpfs(tmp_path / "ro")
    d = vmd_factory()
    key = {"plex": "volumes.vol0.plexes[1]", "log": "volumes.vol0.log",
           "mountpoint": "mountpoint", "socket": "socket"}[what]
    if what == "plex":
        d.config["volumes"]["vol0"]["plexes"][1] = f"{ro}/p1.img"
    elif what == "log":
        d.config["volumes"]["vol0"]["log"] = f"{ro}/vol0.log"
    elif what == "mountpoint":
        d.config["mountpoint"] = f"{ro}/mnt"
    else:
        d.config["socket"] = f"{ro}/vmd.sock"
    d.write_config()
    msg = _expect_config_error(d, key, ro)
    assert "writable" in msg or "cannot be created" in msg, msg
    assert os.listdir(ro) == []


def test_unwritable_parent_of_missing_directory(vmd_factory: Callable[..., VmdDaemon],
                                                sysres: SysResources, tmp_path: Path) -> None:
    ro = sysres.mount_ro_tmpfs(tmp_path / "ro")
    d = vmd_factory()
    d.config["volumes"]["vol0"]["plexes"][0] = f"{ro}/sub/dir/p0.img"
    d.write_config()
    _expect_config_error(d, "volumes.vol0.plexes[0]", f"{ro}/sub/dir")


@pytest.mark.parametrize("actual", [1 * MiB, 64 * MiB + 512, 0])
def test_existing_image_of_wrong_size_is_untouched(vmd_factory: Callable[..., VmdDaemon],
                                                   allow_log: Callable[..., None],
                                                   actual: int) -> None:
    """A volume's own files, not the config: that volume is refused, the
    daemon serves the others (an image it did not expect touches nothing)."""
    allow_log(r"volume vol0 refused: ")
    d = vmd_factory(volumes={"vol0": volume_spec("vol0"), "vol1": volume_spec("vol1", size="8MiB")})
    img = d.plex_paths()[1]
    with open(img, "wb") as f:
        f.write(os.urandom(min(actual, 4096)))
        f.truncate(actual)
    before_sha, before_st = sha(img), os.stat(img)
    d.start()
    refused = {r["name"]: r["error"] for r in d.status()["refused"]}
    msg = refused["vol0"]
    for needle in (str(d.config_path), "volumes.vol0.plexes[1]", str(img), f"{actual} bytes"):
        assert needle in msg, (needle, msg)
    assert ("`vmd resize vol0`" in msg) == (actual > 64 * MiB), msg
    assert [v["name"] for v in d.status()["volumes"]] == ["vol1"]
    d.stop()
    after = os.stat(img)
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == \
        (before_st.st_size, before_st.st_mtime_ns, before_st.st_ino), "image was modified"
    assert sha(img) == before_sha
    assert not d.plex_paths()[0].exists(), "the other plex was created despite the error"
    assert not d.log_path().exists()


def test_image_is_a_directory(vmd_factory: Callable[..., VmdDaemon]) -> None:
    d = vmd_factory()
    d.plex_paths()[0].mkdir()
    _expect_config_error(d, "volumes.vol0.plexes[0]")


def test_socket_path_that_cannot_be_bound(vmd_factory: Callable[..., VmdDaemon]) -> None:
    """A file where the socket goes, or a path longer than sun_path: exit 3 with one
    line before anything is mounted (both crashed the daemon with SIGSEGV once: the
    FUSE session was closed under a running pyfuse3.main)."""
    d = vmd_factory("file", socket_path="not-a-socket")
    (d.base / "not-a-socket").write_text("mine\n")
    p = d.run_foreground()
    assert p.returncode == EXIT_CONFIG, f"exit {p.returncode}, stderr:\n{p.stderr}"
    assert p.stderr.strip() == (f"vmd: {d.config_path}: socket: {d.base / 'not-a-socket'} exists "
                                f"and is not a socket; vmd will not remove it"), p.stderr
    assert not is_mounted(d.mountpoint, "fuse.vmd")
    assert (d.base / "not-a-socket").read_text() == "mine\n"
    long = vmd_factory("long", socket_path="/tmp/" + "s" * 110 + ".sock")
    _expect_config_error(long, "socket", "a Unix socket's path can be at most 107")


def test_socket_directory_is_created(vmd_factory: Callable[..., VmdDaemon]) -> None:
    """`socket: run/vmd/vmd.sock` whose directory does not exist yet (/run after a
    reboot): the daemon creates it, as it does the mountpoint."""
    d = vmd_factory(socket_path="run/vmd/vmd.sock").start()
    assert d.socket.is_socket()
    d.stop()


def test_mountpoint_already_a_mount(vmd_factory: Callable[..., VmdDaemon],
                                    sysres: SysResources) -> None:
    d = vmd_factory()
    sysres.mount("tmpfs", d.mountpoint, "-t", "tmpfs", "-o", "size=1m")
    _expect_config_error(d, "mountpoint", str(d.mountpoint), "already a mount")


def test_second_daemon_on_same_config(vmd: VmdDaemon, vmd_factory: Callable[..., VmdDaemon]) -> None:
    """A second `vmd daemon` on a running config is refused and does not
    disturb the first."""
    with open(vmd.volume_file(), "r+b") as f:
        f.write(b"first")
    q = subprocess.run([sys.executable, "-m", "vmd", "daemon", "-c", str(vmd.config_path)],
                       capture_output=True, text=True, timeout=20)
    assert q.returncode == EXIT_CONFIG, q.stderr
    assert vmd.proc is not None
    # The mountpoint's lock is what refuses it first (then the socket, then the files).
    assert f"mountpoint: {vmd.mountpoint} is in use by vmd (PID {vmd.proc.pid})" in q.stderr, \
        q.stderr
    assert str(vmd.config_path) in q.stderr, q.stderr
    assert vmd.socket.exists()
    assert vmd.status("vol0")["plexes"][0]["state"] == "ACTIVE"
    with open(vmd.volume_file(), "rb") as f:
        assert f.read(5) == b"first"
    vmd.stop()


def test_config_yaml_roundtrip_sanity(vmd_factory: Callable[..., VmdDaemon]) -> None:
    """The helper's config is valid as written (guards the cases above from
    passing for the wrong reason)."""
    d = vmd_factory()
    assert yaml.safe_load(d.config_path.read_text())["volumes"]["vol0"]["size"] == "64MiB"
    d.start()
    assert d.status("vol0")["size"] == 64 * MiB
    d.stop()


def test_size_units_si_and_binary(vmd_factory: Callable[..., VmdDaemon]) -> None:
    """64MB is 64 * 10^6 bytes, 64MiB and 64M 64 * 2^20 (as `truncate -s` reads
    them); a volume whose size is not a whole number of regions serves its tail."""
    d = vmd_factory(volumes={"vol0": volume_spec("vol0", size="64MB"),
                             "vol1": volume_spec("vol1", size="64M")},
                    rate_limit="32MB")
    d.start()
    assert d.status("vol0")["size"] == 64_000_000
    assert d.status("vol1")["size"] == 64 * MiB
    assert os.path.getsize(d.volume_file("vol0")) == 64_000_000
    assert all(os.path.getsize(p) == 64_000_000 for p in d.plex_paths("vol0"))
    tail = os.urandom(4096)
    with open(d.volume_file("vol0"), "r+b") as f:
        f.seek(64_000_000 - 4096)
        f.write(tail)
    d.stop()
    for p in d.plex_paths("vol0"):
        with open(p, "rb") as f:
            f.seek(64_000_000 - 4096)
            assert f.read() == tail
