"""`vmd start VOLUME`: a volume the daemon refused at its start is brought up
in the running daemon, through the start's own open and recovery, while the
other volume keeps serving a process that writes to it all along."""

from __future__ import annotations

import errno
import mmap
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import MiB, VmdDaemon, sha, volume_spec
from nbdservers import Make, nbd_server  # noqa: F401 (a fixture)
from test_events import EventStream
from vmd import events
from vmd.errors import EXIT_CONFIG, EXIT_ERROR

pytestmark = pytest.mark.mount

SIZE = 16 * MiB
CHUNK = 64 * 1024


def _two_volumes(vmd_factory: Callable[..., VmdDaemon]) -> VmdDaemon:
    """`good`, and `bad` whose images are in their own directory `disk/`."""
    bad = {"size": "16MiB", "plexes": ["disk/bad-p0.img", "disk/bad-p1.img"], "log": "bad.log",
           "region_size": "1MiB"}
    return vmd_factory(volumes={"good": volume_spec("good", size="16MiB"), "bad": bad})


def _fill(path: Path) -> str:
    """Write recognizable data over the whole volume file; its sha256."""
    fd = os.open(path, os.O_RDWR)
    try:
        for off in range(0, SIZE, MiB):
            os.pwrite(fd, (f"bad@{off:09d}:".encode() * (MiB // 14 + 1))[:MiB], off)
        os.fsync(fd)
    finally:
        os.close(fd)
    return sha(path)


class _Writer:
    """Writes the good volume through one fd held open the whole test, and
    records any error (there must be none): the other volume keeps serving."""

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_RDWR)
        self.errors: list[OSError] = []
        self.writes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            off = (self.writes * CHUNK) % SIZE
            try:
                os.pwrite(self.fd, self._block(off, self.writes), off)
                if self.writes % 16 == 0:
                    os.fsync(self.fd)
            except OSError as e:
                self.errors.append(e)
                return
            self.writes += 1

    @staticmethod
    def _block(off: int, n: int) -> bytes:
        return (f"good {off} {n};".encode() * CHUNK)[:CHUNK]

    def wait_writes(self, more: int) -> None:
        """Until `more` further writes went through (the writer is running now)."""
        target = self.writes + more
        while self.writes < target and not self.errors and self._thread.is_alive():
            self._stop.wait(0.01)
        assert not self.errors, self.errors

    def finish(self) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self.errors, f"the serving volume's fd got an error: {self.errors}"
        # The last write of each offset is what the volume holds.
        last = {}
        for n in range(self.writes):
            last[(n * CHUNK) % SIZE] = n
        for off, n in list(last.items())[-64:]:
            assert os.pread(self.fd, CHUNK, off) == self._block(off, n), off
        os.close(self.fd)


@contextmanager
def _writing(d: VmdDaemon) -> Iterator[_Writer]:
    w = _Writer(d.volume_file("good"))
    try:
        w.wait_writes(50)
        yield w
        w.wait_writes(50)  # still served after the start
    finally:
        w.finish()


def _refused(d: VmdDaemon) -> dict[str, str]:
    """The refused volumes and why (over the socket: the config may not load)."""
    return {r["name"]: r["error"] for r in d.request({"cmd": "status"}).get("refused", [])}


def _start_fails(d: VmdDaemon, *args: str, before: tuple[str, ...] = ()) -> str:
    """`vmd [BEFORE] start ARGS` fails with one line on stderr; that line."""
    p = d.cli(*before, "start", *args, check=False)
    assert p.returncode == EXIT_ERROR, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    return p.stderr


def test_start_a_refused_volume_while_the_other_is_written(
        vmd_factory: Callable[..., VmdDaemon], allow_log: Callable[..., None]) -> None:
    allow_log(r"volume bad refused: ", r"--recover-all", r"not stopped cleanly")
    d = _two_volumes(vmd_factory)
    d.start()
    expect = _fill(d.volume_file("bad"))
    d.stop()
    disk, away = d.path("disk"), d.path("disk.away")
    disk.rename(away)  # its disk is not mounted yet

    d.start()
    assert "none of its in-sync images can be opened" in _refused(d)["bad"]
    bad = d.volume_file("bad")
    with _writing(d) as w:
        with pytest.raises(FileNotFoundError):
            os.stat(bad)  # a failed lookup of the name, before the start
        err = _start_fails(d, "bad")
        assert "volume bad is still refused: none of its in-sync images can be opened" in err
        assert "none of its in-sync images" in _refused(d)["bad"]
        w.wait_writes(20)

        # The disk is back, but the log was lost: refused again, for the new reason.
        away.rename(disk)
        d.log_path("bad").unlink()
        err = _start_fails(d, "bad")
        assert "sidecar log" in err and "is missing but plex image" in err, err
        assert "is missing but plex image" in _refused(d)["bad"]
        assert not d.log_path("bad").exists(), "a refused start wrote a log"
        with pytest.raises(FileNotFoundError):
            os.stat(bad)

        err = _start_fails(d, "--recover-all", "bad=p7")  # `vmd daemon`'s spelling
        assert "--recover-all bad=p7: not one of its plexes" in err, err
        assert "not one of its plexes" in _refused(d)["bad"]

        p1 = d.plex_paths("bad")[1]
        out = d.cli("start", "bad", f"--recover-all={p1}").stdout
        assert f"bad: started, served at {d.mountpoint}/bad" in out, out
        # At once: the name is found, the file opens, the data is the images'.
        assert os.stat(bad).st_size == SIZE
        assert "bad" in os.listdir(d.mountpoint)
        assert sha(bad) == expect
        st = d.status()
        assert "bad" not in _refused(d) and {v["name"] for v in st["volumes"]} == {"good", "bad"}
        d.wait_resync("bad")
        assert sha(d.plex_paths("bad")[0]) == expect
        es = EventStream(d)
        try:
            ev = es.wait(events.VOLUME_STARTED)
            assert ev["volume"] == "bad" and ev["details"]["recover_all"] is True, ev
        finally:
            es.close()

        err = _start_fails(d, "good")
        assert "volume good is already serving" in err, err
        err = _start_fails(d, "nosuch")
        assert "volume nosuch is neither served nor refused" in err and "good, bad" in err, err
    d.stop()
    d.start()  # the new log is a log like any other
    assert not _refused(d) and sha(d.volume_file("bad")) == expect
    d.stop()


def test_start_reads_the_fixed_config_and_a_config_that_does_not_load_changes_nothing(
        vmd_factory: Callable[..., VmdDaemon], allow_log: Callable[..., None]) -> None:
    """The cause was in the config (its plexes differ from the log's): a config
    that does not parse changes nothing; the fixed one is what `vmd start` uses."""
    allow_log(r"volume bad refused: ")
    d = _two_volumes(vmd_factory)
    d.start()
    expect = _fill(d.volume_file("bad"))
    d.stop()
    good_cfg = dict(d.config["volumes"]["bad"])
    d.config["volumes"]["bad"]["plexes"] = ["disk/bad-p0.img", "disk/other.img"]
    d.write_config()
    d.start()
    why = _refused(d)["bad"]
    assert "volumes.bad.plexes differs" in why, why
    with _writing(d):
        text = d.config_path.read_text()
        d.write_config(text + "volumes: [\n")  # a half-finished edit
        p = d.cli("start", "bad", check=False)  # the CLI reads the socket's path there
        assert p.returncode == EXIT_CONFIG and "not valid YAML" in p.stderr, p.stderr
        err = _start_fails(d, "bad", before=("--socket", str(d.socket)))
        assert "the config does not load, so nothing was changed" in err, err
        assert str(d.config_path) in err and "line" in err, err
        assert _refused(d)["bad"] == why

        d.config["volumes"]["bad"] = good_cfg
        d.write_config()
        d.cli("--timeout", "60", "start", "bad")
        assert sha(d.volume_file("bad")) == expect
        assert not _refused(d)
        assert not d.path("disk/other.img").exists()
    d.stop()


def test_start_brings_up_the_snapshots_of_the_volume_too(
        vmd_factory: Callable[..., VmdDaemon], allow_log: Callable[..., None]) -> None:
    """A refused volume's snapshot volumes are not even known to the daemon;
    the start opens them after it, as the daemon's start does; one refused on
    its own account comes up with `vmd start` of its name."""
    allow_log(r"volume (bad|nightly) refused: ")
    d = _two_volumes(vmd_factory)
    d.start()
    expect = _fill(d.volume_file("bad"))
    d.path("snapdisk").mkdir()
    d.cli("snap", "start", "bad", "--path", str(d.path("snapdisk/bad-snap.img")))
    d.cli("snap", "wait", "bad", timeout=120)
    d.cli("snap", "take", "bad", "nightly")
    d.stop()
    d.path("disk").rename(d.path("disk.away"))
    d.path("snapdisk").rename(d.path("snapdisk.away"))
    d.start()
    assert set(_refused(d)) == {"bad"}
    assert {v["name"] for v in d.status()["volumes"]} == {"good"}
    with _writing(d):
        with pytest.raises(FileNotFoundError):
            os.stat(d.volume_file("nightly"))
        d.path("disk.away").rename(d.path("disk"))
        # The origin comes up; its snapshot is refused on its own account.
        out = d.cli("start", "bad").stdout
        assert "bad: started" in out and "nightly" not in out, out
        assert sha(d.volume_file("bad")) == expect
        assert "none of its in-sync images" in _refused(d)["nightly"]
        d.path("snapdisk.away").rename(d.path("snapdisk"))
        out = d.cli("start", "nightly").stdout
        assert "nightly: started" in out, out
        assert sha(d.volume_file("nightly")) == expect
        assert d.status("nightly")["snapshot"]["of"] == "bad"
        assert not _refused(d)
    d.stop()
    d.path("disk").rename(d.path("disk.away"))
    d.start()
    assert set(_refused(d)) == {"bad"}
    with _writing(d):
        d.path("disk.away").rename(d.path("disk"))
        out = d.cli("start", "bad").stdout  # both at once
        assert "bad: started" in out and "nightly: started" in out, out
        assert sha(d.volume_file("nightly")) == expect == sha(d.volume_file("bad"))
        assert not _refused(d)
    d.stop()


def test_start_a_volume_added_to_the_config_while_running(
        vmd_factory: Callable[..., VmdDaemon], allow_log: Callable[..., None]) -> None:
    allow_log(r"volume new refused: ")
    d = _two_volumes(vmd_factory)
    d.start()
    with _writing(d):
        # Its images' directory cannot be made (a file is in the way): refused, listed.
        d.path("blocked").write_text("")
        d.config["volumes"]["new"] = {"size": "8MiB", "plexes": ["blocked/new-p0.img"],
                                      "log": "new.log"}
        d.write_config()
        err = _start_fails(d, "new")
        assert "volume new is refused:" in err and "volumes.new.plexes[0]" in err, err
        assert "blocked" in _refused(d)["new"]

        d.config["volumes"]["new"]["plexes"] = ["new-p0.img", "new-p1.img"]
        d.write_config()
        d.cli("start", "new")
        assert os.stat(d.volume_file("new")).st_size == 8 * MiB
        assert not _refused(d)
        fd = os.open(d.volume_file("new"), os.O_RDWR)
        try:
            os.pwrite(fd, b"new volume" * 100, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        err = _start_fails(d, "new")
        assert "already serving" in err
    d.stop()
    d.start()
    assert {v["name"] for v in d.status()["volumes"]} == {"good", "bad", "new"}
    with open(d.volume_file("new"), "rb") as f:
        assert f.read(1000) == b"new volume" * 100
    d.stop()


@pytest.mark.parametrize("argv, volume, image", [
    (["start", "vol0"], "vol0", None),
    (["start", "vol0", "--recover-all"], "vol0", None),
    (["start", "vol0", "--recover-all=p1"], "vol0", "p1"),
    (["start", "vol0", "--recover-all=vol0=/srv/a=b.img"], "vol0", "/srv/a=b.img"),
    (["start", "--recover-all", "vol0"], "vol0", None),
    (["start", "--recover-all", "vol0=/srv/x.img"], "vol0", "/srv/x.img"),
    (["start", "--force-degraded", "r5"], "r5", None),
])
def test_start_options_in_both_spellings(argv: list[str], volume: str, image: str | None) -> None:
    from vmd import cli, start_cli

    args = cli._parser().parse_args(argv)
    assert start_cli._volume_and_source(args) == (volume, image)


def test_start_force_degraded_raid5_while_the_other_is_written(
        vmd_factory: Callable[..., VmdDaemon], allow_log: Callable[..., None]) -> None:
    """A dirty RAID-5 volume that lost a column and has no RAID-5 log: refused
    by `vmd start` as by the daemon's start, served with --force-degraded."""
    allow_log(r"volume r5 refused: ", r"write hole", r"not stopped cleanly", r"IOFAIL",
              r"cannot open image")
    r5 = {"size": "4MiB", "layout": "raid5", "log": "r5.log", "stripe_unit": "64KiB",
          "columns": [f"r5-c{i}.img" for i in range(3)]}
    d = vmd_factory(volumes={"good": volume_spec("good", size="16MiB"), "r5": r5})
    d.start()
    data = os.urandom(4 * MiB)
    fd = os.open(d.volume_file("r5"), os.O_RDWR)
    try:
        os.pwrite(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    d.kill()  # dirty
    c2 = d.path("r5-c2.img")
    c2.rename(d.path("r5-c2.img.away"))
    d.start()
    assert "write hole" in _refused(d)["r5"]
    with _writing(d):
        err = _start_fails(d, "r5")
        assert "volume r5 is still refused:" in err and "write hole" in err, err
        out = d.cli("start", "r5", "--force-degraded").stdout
        assert "r5: started" in out, out
        assert d.status("r5")["degraded"] and not _refused(d)
        with open(d.volume_file("r5"), "rb") as f:
            assert f.read() == data
    d.stop()


def test_start_a_volume_with_a_remote_plex_serves_it(
        vmd_factory: Callable[..., VmdDaemon], nbd_server: Make) -> None:
    """`vmd start` opens the volume in a worker thread: the remote plex's link
    is started on the event loop afterwards, and writes reach the export."""
    srv = nbd_server("qemu-nbd", size=SIZE)
    vmd = vmd_factory(volumes={"good": volume_spec("good", size="16MiB")}).start()
    vmd.config["volumes"]["new"] = {"size": "16MiB", "log": "new.log", "remote_timeout": "5s",
                                    "plexes": ["new-p0.img", srv.uri]}
    vmd.write_config()
    vmd.cli("start", "new")
    vmd.cli("wait", "new")
    data = os.urandom(MiB)
    fd = os.open(vmd.volume_file("new"), os.O_RDWR)
    try:
        os.pwrite(fd, data, 3 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    st = vmd.status("new")
    assert [p["state"] for p in st["plexes"]] == ["ACTIVE", "ACTIVE"], st
    with open(srv.image, "rb") as f:
        f.seek(3 * MiB)
        assert f.read(MiB) == data, "the write did not reach the export"
    vmd.stop()


@pytest.mark.allow_log(r"volume new: plex p1 is IOFAIL|cannot connect|timed out|Unreachable|"
                       r"not connected|unreachable")
def test_start_of_a_volume_whose_export_never_answers_does_not_stall_the_others(
        vmd_factory: Callable[..., VmdDaemon], tmp_path: Path) -> None:
    """An NBD server that accepts and never answers: the handshake of `vmd
    start new` takes remote_timeout. It ran on the event loop, and every
    read of `good` waited for it (6 s)."""
    sock_path = f"/tmp/vmd-silent-{os.getpid()}.sock"  # short: sun_path holds 108 bytes
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(sock_path)
    srv.listen(8)
    try:
        vmd = vmd_factory(volumes={"good": volume_spec("good", size="16MiB")}).start()
        vmd.config["volumes"]["new"] = {
            "size": "16MiB", "log": "new.log", "remote_timeout": "4s",
            "plexes": ["new-p0.img", f"nbd+unix:///x?socket={sock_path}"]}
        vmd.write_config()
        worst, done = [0.0], threading.Event()

        def reader() -> None:
            fd = os.open(vmd.volume_file("good"), os.O_RDONLY | os.O_DIRECT)
            buf = mmap.mmap(-1, 4096)
            try:
                while not done.is_set():
                    t0 = time.monotonic()
                    os.preadv(fd, [buf], 0)
                    worst[0] = max(worst[0], time.monotonic() - t0)
            finally:
                os.close(fd)

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        try:
            vmd.cli("start", "new", check=False, timeout=60)
        finally:
            done.set()
            t.join(30)
        assert worst[0] < 2.0, f"reads of good waited {worst[0]:.1f} s during `vmd start new`"
        vmd.stop()
    finally:
        srv.close()
        os.unlink(sock_path)
