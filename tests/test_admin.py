"""The admin socket and the CLI: bad requests, peer credentials, stop while
busy, plex membership round trips, config/state mismatch."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from conftest import (REPO, MiB, SysResources, VmdDaemon, admin_raw, admin_request, is_mounted,
                      pwrite_file, sha, volume_spec, wait_for)
from vmd.errors import EXIT_BROKEN_PIPE, EXIT_ERROR, EXIT_NO_DAEMON, EXIT_USAGE

pytestmark = pytest.mark.mount

SIZE = 64 * MiB


def _assert_alive(vmd: VmdDaemon) -> None:
    assert vmd.running, f"daemon died; stderr:\n{vmd.stderr()}"
    r = admin_request(vmd.socket, {"cmd": "status"})
    assert r["ok"] is True and [v["name"] for v in r["volumes"]] == ["vol0"]


def _one_error_line(p) -> str:  # type: ignore[no-untyped-def]
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{p.stderr}"
    assert "Traceback" not in p.stderr
    return lines[0]


# -- bad requests over the raw socket ----------------------------------------------

BAD_REQUESTS = {
    "too-large-line": (b'{"cmd": "status", "pad": "' + b"x" * (70 * 1024) + b'"}\n', "too large"),
    "too-large-no-newline": (b"y" * (70 * 1024), "too large"),
    "not-json": (b"status please\n", "JSON"),
    "empty-line": (b"\n", "JSON"),
    "bad-utf8": (b'{"cmd": "\xff\xfe"}\n', ""),
    "json-list": (b'["status"]\n', "cmd"),
    "json-string": (b'"status"\n', "cmd"),
    "no-cmd": (b'{"volume": "vol0"}\n', "cmd"),
    "cmd-not-string": (b'{"cmd": 42}\n', "cmd"),
    "unknown-cmd": (b'{"cmd": "frobnicate"}\n', "frobnicate"),
    "detach-no-volume": (b'{"cmd": "plex.detach", "plex": "p1"}\n', "volume"),
    "detach-no-plex": (b'{"cmd": "plex.detach", "volume": "vol0"}\n', "plex"),
    "attach-volume-not-string": (b'{"cmd": "plex.attach", "volume": ["vol0"], "plex": "p1"}\n',
                                 "volume"),
    "add-no-path": (b'{"cmd": "plex.add", "volume": "vol0"}\n', "path"),
    "remove-unknown-volume": (b'{"cmd": "plex.remove", "volume": "nosuch", "plex": "p1"}\n',
                              "nosuch"),
    "wait-no-volume": (b'{"cmd": "wait"}\n', "volume"),
    "fastresync-no-on": (b'{"cmd": "fastresync", "volume": "vol0"}\n', "on"),
    "status-unknown-volume": (b'{"cmd": "status", "volume": "nosuch"}\n', "nosuch"),
}


def test_bad_requests_get_error_replies(vmd: VmdDaemon) -> None:
    for case, (payload, needle) in BAD_REQUESTS.items():
        replies = admin_raw(vmd.socket, payload)
        assert len(replies) == 1, f"{case}: no reply"
        r = replies[0]
        assert r.get("ok") is False, f"{case}: {r}"
        assert isinstance(r.get("error"), str) and r["error"], f"{case}: {r}"
        assert needle.lower() in r["error"].lower(), f"{case}: {needle!r} not in {r['error']!r}"
        # The command as the CLI spells it, not the request's internal name.
        assert not re.search(r"request '|'\w+\.\w+'", r["error"]), f"{case}: {r['error']!r}"
        _assert_alive(vmd)
    # Nothing changed on the volume.
    assert vmd.plex_states() == {"p0": "ACTIVE", "p1": "ACTIVE"}


def test_several_requests_on_one_connection(vmd: VmdDaemon) -> None:
    replies = admin_raw(vmd.socket, b'{"cmd": "status"}\nnot json\n{"cmd": "status", '
                        b'"volume": "vol0"}\n', replies=3)
    assert [r["ok"] for r in replies] == [True, False, True], replies
    assert replies[2]["volumes"][0]["name"] == "vol0"


def test_client_hanging_up_midway(vmd: VmdDaemon) -> None:
    for payload in (b'{"cmd": "sta', b"", b"x" * 100_000):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(vmd.socket))
            try:
                s.sendall(payload)
            except BrokenPipeError:
                pass
    # A wait whose client goes away while it runs does not hurt either.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(vmd.socket))
        s.sendall(b'{"cmd": "wait", "volume": "vol0"}\n')
    # Alive after it has seen every hang-up, not merely soon after them.
    wait_for(lambda: _admin_connections(vmd) == 0, what="the daemon to close the connections "
             "whose clients hung up")
    _assert_alive(vmd)


def _admin_connections(vmd: VmdDaemon) -> int:
    """Connections to the admin socket that the daemon has not closed yet, accepted or
    still queued: both carry the listener's path in /proc/net/unix (columns: Num
    RefCount Protocol Flags Type St Inode Path); the listener's state is 01."""
    rows = [ln.split() for ln in Path("/proc/net/unix").read_text().splitlines()[1:]]
    return sum(1 for r in rows if len(r) == 8 and r[7] == str(vmd.socket) and r[5] != "01")


def test_socket_mode(vmd: VmdDaemon) -> None:
    st = os.stat(vmd.socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600


@pytest.mark.allow_log(r"admin socket: refused peer uid 65534")
def test_non_root_peer_refused(vmd_factory: Callable[..., VmdDaemon], sysres: SysResources) -> None:
    """SO_PEERCRED, not file permissions, refuses a non-root peer: the socket
    is made world-writable first, in a world-traversable directory."""
    world = sysres.world_dir()
    vmd = vmd_factory(socket_path=str(world / "vmd.sock")).start()
    os.chmod(vmd.socket, 0o666)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: become nobody, connect, report what the daemon said
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                replies = admin_raw(world / "vmd.sock",
                                    b'{"cmd": "plex.detach", "volume": "vol0", "plex": "p1"}\n')
                out = json.dumps({"replies": replies})
            except OSError as e:
                out = json.dumps({"oserror": e.errno})
            os.write(w, out.encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        got = json.loads(f.read() or b"{}")
    os.waitpid(pid, 0)
    assert "oserror" not in got, f"the child could not even connect: {got}"
    (reply,) = got["replies"]
    assert reply["ok"] is False and "permission denied" in reply["error"], reply
    assert vmd.plex_states() == {"p0": "ACTIVE", "p1": "ACTIVE"}, "a refused peer changed state"
    assert "refused peer uid 65534" in vmd.stderr()


# -- CLI errors ------------------------------------------------------------------

def test_cli_errors_are_one_line(vmd: VmdDaemon, tmp_path: Path) -> None:
    cases = [
        (("plex", "detach", "vol0", "nosuch"), ["nosuch"]),
        (("plex", "attach", "vol0", "p1"), ["p1", "ACTIVE"]),
        (("status", "nosuch"), ["nosuch"]),
        (("wait", "nosuch"), ["nosuch"]),
        (("plex", "remove", "nosuch", "p0"), ["nosuch"]),
        (("plex", "add", "vol0", str(vmd.plex_paths()[0])), ["p0"]),  # already a plex
    ]
    wrong = tmp_path / "wrong-size.img"
    wrong.write_bytes(b"z" * 4096)
    cases.append((("plex", "add", "vol0", str(wrong)), [str(wrong), "4096"]))
    for args, needles in cases:
        p = vmd.cli(*args, check=False)
        assert p.returncode not in (0, 2), f"vmd {' '.join(args)}: exit {p.returncode}"
        line = _one_error_line(p)
        assert line.startswith("vmd: "), line
        for n in needles:
            assert n in line, f"vmd {' '.join(args)}: {n!r} not in {line!r}"
    assert wrong.read_bytes() == b"z" * 4096, "plex add changed an image of the wrong size"
    assert vmd.plex_states() == {"p0": "ACTIVE", "p1": "ACTIVE"}
    _assert_alive(vmd)


def test_cli_empty_argument_is_a_usage_error(vmd: VmdDaemon) -> None:
    """An empty argument is refused by the CLI in its own words: the command
    and the argument as the usage line shows them, exit 2."""
    cases = [(("snap", "take", "vol0", ""), "vmd snap take", "argument name"),
             (("plex", "add", "vol0", ""), "vmd plex add", "argument PATH"),
             (("plex", "detach", "", "p1"), "vmd plex detach", "argument volume"),
             (("snap", "start", "vol0", "--path", ""), "vmd snap start", "argument --path")]
    for args, command, argument in cases:
        p = vmd.cli(*args, check=False)
        assert p.returncode == EXIT_USAGE, f"vmd {' '.join(args)}: exit {p.returncode}: {p.stderr}"
        assert f"{command}: error: {argument}: must not be empty" in p.stderr, p.stderr
        assert "request" not in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert vmd.plex_states() == {"p0": "ACTIVE", "p1": "ACTIVE"}


def _run_into_closed_pipe(vmd: VmdDaemon, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI with its stdout a pipe nobody reads any more (`| head -0`)."""
    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.run([sys.executable, "-m", "vmd", "-c", str(vmd.config_path), *args],
                              stdout=w, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(w)


def test_cli_output_into_closed_pipe_is_quiet(vmd: VmdDaemon) -> None:
    for args in (("status",), ("status", "--json"), ("inspect-log", str(vmd.log_path()))):
        p = _run_into_closed_pipe(vmd, *args)
        assert p.stderr == "", f"vmd {' '.join(args)}: {p.stderr}"
        # As a command killed by SIGPIPE: 128 + 13.
        assert p.returncode == EXIT_BROKEN_PIPE, f"vmd {' '.join(args)}: exit {p.returncode}"


def test_relative_paths_are_relative_to_the_cli(vmd: VmdDaemon, tmp_path: Path) -> None:
    """`plex add` and `snap start --path` run from another directory than the
    daemon's (which runs in the repository) put their images there."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    name = f"rel-{os.getpid()}"
    assert Path.cwd() != cwd

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "vmd", "-c", str(vmd.config_path), *args],
                              cwd=cwd, capture_output=True, text=True, timeout=60, check=True)

    try:
        cli("plex", "add", "vol0", f"{name}-p2.img")
        cli("snap", "start", "vol0", "--path", f"{name}-snap.img")
        paths = {p["name"]: p["path"] for p in vmd.status("vol0")["plexes"]}
        assert paths["p2"] == str(cwd / f"{name}-p2.img"), paths
        assert str(cwd / f"{name}-snap.img") in paths.values(), paths
        assert (cwd / f"{name}-snap.img").exists()
        vmd.cli("snap", "abort", "vol0")
    finally:
        for daemon_cwd in (REPO, Path.cwd()):  # where the daemon would have put them
            for suffix in ("p2", "snap"):
                (daemon_cwd / f"{name}-{suffix}.img").unlink(missing_ok=True)


def test_image_under_own_mountpoint_is_refused(vmd: VmdDaemon, tmp_path: Path) -> None:
    """An image in the daemon's own mount would be served by the daemon: the
    stat of it from the event loop deadlocked the daemon. Refused, by name,
    without the daemon looking at anything under its mount."""
    (tmp_path / "into-mount").symlink_to(vmd.mountpoint)
    for args in (("plex", "add", "vol0", str(vmd.volume_file())),
                 ("plex", "add", "vol0", str(vmd.mountpoint / "new-p2.img")),
                 ("plex", "add", "vol0", str(tmp_path / "into-mount" / "vol0")),
                 ("snap", "start", "vol0", "--path", str(vmd.mountpoint / "snap.img"))):
        p = vmd.cli(*args, check=False, timeout=20)
        assert p.returncode == EXIT_ERROR, p
        msg = _one_error_line(p)
        assert args[3 if args[0] == "plex" else 4] in msg and str(vmd.mountpoint) in msg, msg
        assert "mountpoint" in msg, msg
    _assert_alive(vmd)
    assert vmd.plex_states() == {"p0": "ACTIVE", "p1": "ACTIVE"}
    vmd.stop()


def test_a_mistyped_nbd_uri_is_refused_as_such(vmd: VmdDaemon) -> None:
    """`nbd:/host...` (one slash) or `NBD://...` is no URI: taken as a path it
    was made absolute under the current directory and either created as a
    local image or, beside a remote plex, reported as "already plex pN"."""
    for uri in ("nbd:/127.0.0.1:10809/vol0", "NBD://127.0.0.1:10809/vol0",
                "nbd+unix:/vol0?socket=/tmp/x.sock"):
        p = vmd.cli("plex", "add", "vol0", uri, check=False, timeout=20)
        assert p.returncode == EXIT_ERROR, p
        msg = _one_error_line(p)
        assert uri in msg and "starts like an NBD URI" in msg and "nbd://" in msg, msg
        # The daemon refuses it too (a client that made it a path is not needed).
        reply = vmd.request({"cmd": "plex.add", "volume": "vol0", "path": uri})
        assert "starts like an NBD URI" in reply.get("error", ""), reply
    assert vmd.plex_states() == {"p0": "ACTIVE", "p1": "ACTIVE"}
    vmd.stop()


@pytest.mark.allow_log(r"full rebuild: it is a new image", r"columns differs from")
def test_raid5_status_text_start_warning_and_resize_refusal(
        vmd_factory: Callable[..., VmdDaemon]) -> None:
    """A RAID-5 volume's text status shows layout, stripe_unit and degraded (as
    the README says); the start warning names `columns`, its key; resize is
    refused, as the README's resize row says."""
    from raid5kit import raid5_spec  # noqa: PLC0415

    vmd = vmd_factory(volumes={"r5": raid5_spec()}).start()
    assert "  layout raid5  stripe_unit 64KiB  degraded no" in vmd.cli("status").stdout
    vmd.cli("plex", "detach", "r5", "c1")
    assert "degraded yes" in vmd.cli("status", "r5").stdout
    p = vmd.cli("resize", "r5", "8MiB", check=False)
    assert p.returncode == EXIT_ERROR and "mirrors only" in _one_error_line(p), p
    readme = (REPO / "README.md").read_text()
    row = next(ln for ln in readme.splitlines() if ln.startswith("| `vmd resize"))
    assert "RAID-5" in row, row
    vmd.cli("plex", "replace", "r5", "c1", str(vmd.path("r5-c1-new.img")))
    vmd.cli("wait", "r5")
    vmd.stop()
    vmd.start()  # the config still lists the old c1
    log = vmd.stderr()
    assert "volumes.r5.columns differs from the columns sidecar log" in log, log
    assert ".plexes" not in log, log
    vmd.stop()


@pytest.mark.allow_log(r"gets a full resync: its image .* changed while it was away")
def test_attach_of_an_image_of_another_size_is_one_clean_line(vmd: VmdDaemon) -> None:
    """The refusal named the image and both sizes, after a raw "[Errno 22]"."""
    vmd.cli("plex", "detach", "vol0", "p1")
    image = vmd.plex_paths()[1]
    os.truncate(image, SIZE // 2)
    p = vmd.cli("plex", "attach", "vol0", "p1", check=False)
    assert p.returncode == EXIT_ERROR, p
    msg = _one_error_line(p)
    assert "Errno" not in msg, msg
    assert str(image) in msg and str(SIZE // 2) in msg and str(SIZE) in msg, msg
    os.truncate(image, SIZE)
    vmd.cli("plex", "attach", "vol0", "p1")
    vmd.wait_resync()
    vmd.stop()


def test_cannot_detach_last_in_sync_plex(vmd: VmdDaemon) -> None:
    vmd.cli("plex", "detach", "vol0", "p1")
    p = vmd.cli("plex", "detach", "vol0", "p0", check=False)
    assert p.returncode == EXIT_ERROR
    assert "last in-sync plex" in _one_error_line(p)
    p = vmd.cli("plex", "remove", "vol0", "p0", check=False)
    assert p.returncode == EXIT_ERROR
    assert vmd.plex_states() == {"p0": "ACTIVE", "p1": "DETACHED"}
    with open(vmd.volume_file(), "r+b") as f:  # still serving
        f.write(b"still here")
        f.seek(0)
        assert f.read(10) == b"still here"


def test_a_refused_plex_command_leaves_the_resync_pass_alone(
        vmd_factory: Callable[..., VmdDaemon]) -> None:
    """A refused detach, remove or attach paused the resync to check, and its
    pass started over: status's progress fell back to 0 of a smaller total
    (new-user trial 10, T-D)."""
    vmd = vmd_factory(rate_limit="1MiB").start()
    pwrite_file(vmd.volume_file(), [(0, os.urandom(32 * MiB))])  # half a minute to copy
    vmd.cli("plex", "add", "vol0", str(vmd.path("vol0-p2.img")))
    before = wait_for(lambda: (r := vmd.status("vol0")["resync"])["done_bytes"] > 0 and r,
                      30, "the resync copying")
    for args in (("detach", "vol0", "p9"), ("remove", "vol0", "p9"), ("attach", "vol0", "p0"),
                 ("attach", "vol0", "p2")):
        p = vmd.cli("plex", *args, check=False)
        assert p.returncode != 0, args
    passes = re.findall(r"resync of .* to plex p2 started", vmd.stderr())
    assert len(passes) == 1, passes
    r = vmd.status("vol0")["resync"]
    assert r["total_bytes"] == before["total_bytes"], (before, r)
    assert r["done_bytes"] >= before["done_bytes"], (before, r)


def test_cli_without_daemon_exits_4(tmp_path: Path, vmd_factory: Callable[..., VmdDaemon]) -> None:
    d = vmd_factory()  # config written, daemon never started
    for args in (("status",), ("stop",), ("plex", "detach", "vol0", "p1"), ("wait", "vol0")):
        p = d.cli(*args, check=False)
        assert p.returncode == EXIT_NO_DAEMON, (args, p.stderr)
        assert str(d.socket) in _one_error_line(p)
    # A stale socket file nobody listens on.
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()
    p = d.cli("--socket", str(stale), "status", check=False, config=False)
    assert p.returncode == EXIT_NO_DAEMON, p.stderr
    assert str(stale) in _one_error_line(p)


def test_cli_times_out_on_a_stopped_daemon(vmd_factory: Callable[..., VmdDaemon]) -> None:
    """With the daemon stopped (SIGSTOP), `vmd status` hung for ever: it gives
    up after --timeout, exit 4, naming the socket. A verb that waits by
    design is not cut by the timeout while the daemon works."""
    vmd = vmd_factory(rate_limit="16MiB").start()  # a full resync of 64 MiB: about 4 s
    os.kill(vmd.proc.pid, signal.SIGSTOP)
    try:
        for args in (("status",), ("wait", "vol0"), ("verify", "vol0")):
            t0 = time.monotonic()
            p = vmd.cli("--timeout", "1.5", *args, check=False, timeout=30)
            assert p.returncode == EXIT_NO_DAEMON, (args, p)
            msg = _one_error_line(p)
            assert f"daemon at {vmd.socket} did not answer in 1.5 s" in msg, msg
            assert "may still carry the request out" in msg, msg
            assert time.monotonic() - t0 < 15, args
    finally:
        os.kill(vmd.proc.pid, signal.SIGCONT)
    _assert_alive(vmd)
    vmd.cli("plex", "add", "vol0", str(vmd.path("vol0-p2.img")))
    p = vmd.cli("--timeout", "1", "wait", "vol0", timeout=60)
    assert "in sync" in p.stdout, p
    assert vmd.plex_states() == {"p0": "ACTIVE", "p1": "ACTIVE", "p2": "ACTIVE"}
    p = vmd.cli("--timeout", "-1", "status", check=False)
    assert p.returncode == EXIT_USAGE and "--timeout" in p.stderr, p


def test_cli_after_stop_exits_4(vmd: VmdDaemon) -> None:
    vmd.stop()
    p = vmd.cli("status", check=False)
    assert p.returncode == EXIT_NO_DAEMON, p.stderr
    _one_error_line(p)


# -- stop while busy ---------------------------------------------------------------

def test_stop_refused_while_loop_device_attached(vmd: VmdDaemon, sysres: SysResources) -> None:
    dev = vmd.losetup()
    p = vmd.cli("stop", check=False)
    assert p.returncode == EXIT_ERROR, p.stderr
    line = _one_error_line(p)
    assert "vol0" in line and "--force" in line, line
    _assert_alive(vmd)
    assert is_mounted(vmd.mountpoint)
    # Once the loop device is gone, stop works.
    sysres.detach_loop(dev)
    vmd.stop()


def test_stop_refused_while_a_process_holds_the_file(vmd: VmdDaemon) -> None:
    with open(vmd.volume_file(), "rb"):
        p = vmd.cli("stop", check=False)
        assert p.returncode == EXIT_ERROR
        assert "vol0" in _one_error_line(p)
        assert vmd.status("vol0")["open"] == 1
    assert vmd.status("vol0")["open"] == 0
    vmd.stop()


def test_stop_refused_with_several_volumes_open_names_each_file(
        vmd_factory: Callable[..., VmdDaemon]) -> None:
    """Trial 9, F6: it said "volume a, b is open (... holding .../a)"."""
    d = vmd_factory(volumes={n: volume_spec(n, size="16MiB") for n in ("va", "vb", "vc")})
    d.start()
    with open(d.volume_file("va"), "rb"), open(d.volume_file("vc"), "rb"):
        line = _one_error_line(d.cli("stop", check=False))
        assert line.startswith("vmd: volumes va, vc are open (a loop device attached, or a "
                               f"process holding {d.volume_file('va')}, {d.volume_file('vc')}); "
                               "unmount what is on them"), line
    with open(d.volume_file("vb"), "rb"):
        line = _one_error_line(d.cli("stop", check=False))
        assert line.startswith("vmd: volume vb is open ("), line
    d.stop()


def test_stop_force_with_loop_device_attached(vmd: VmdDaemon, sysres: SysResources) -> None:
    dev = vmd.losetup()
    with open(dev, "r+b") as f:
        f.write(b"forced" * 1000)
        f.flush()
        os.fsync(f.fileno())
    vmd.stop(force=True)
    assert not vmd.socket.exists()
    for p in vmd.plex_paths():
        with open(p, "rb") as f:
            assert f.read(6000) == b"forced" * 1000, p
    # (the loop device is detached by the fixture teardown)


# -- plex membership -------------------------------------------------------------

def _fast_status(vmd: VmdDaemon) -> dict:  # type: ignore[type-arg]
    return admin_request(vmd.socket, {"cmd": "status", "volume": "vol0"})["volumes"][0]


def _fill(path: Path, ref: bytearray, rng: random.Random, n: int = 20) -> None:
    with open(path, "r+b") as f:
        for _ in range(n):
            off = rng.randrange(0, len(ref) - 300_000)
            data = rng.randbytes(rng.randrange(1, 300_000))
            f.seek(off)
            f.write(data)
            ref[off:off + len(data)] = data


@pytest.mark.allow_log(r"WARNING vmd.manager: volume vol0: .*volumes\.vol0\.plexes differs")
def test_plex_detach_attach_add_remove_roundtrip(vmd_factory: Callable[..., VmdDaemon],
                                                 tmp_path: Path) -> None:
    # Rate-limited so that SYNCING is observable: a full resync takes ~2 s.
    vmd = vmd_factory(rate_limit="32MiB").start()
    rng = random.Random(5)
    ref = bytearray(SIZE)
    vol = vmd.volume_file()
    _fill(vol, ref, rng)

    # detach → DETACHED, writes go on; attach → FastResync copies only what it missed.
    p = vmd.cli("plex", "detach", "vol0", "p1")
    assert "p1 is DETACHED" in p.stdout
    assert vmd.plex_states() == {"p0": "ACTIVE", "p1": "DETACHED"}
    with open(vol, "r+b") as f:
        f.seek(10 * MiB)
        f.write(b"M" * 100_000)
    ref[10 * MiB:10 * MiB + 100_000] = b"M" * 100_000
    st = vmd.status("vol0")
    missing = [x for x in st["plexes"] if x["name"] == "p1"][0]["missing_bytes"]
    assert 100_000 <= missing < SIZE // 4, st
    p = vmd.cli("plex", "attach", "vol0", "p1")
    assert "p1 is SYNCING" in p.stdout or "p1 is ACTIVE" in p.stdout, p.stdout
    st = vmd.wait_resync("vol0")
    assert [x["state"] for x in st["plexes"]] == ["ACTIVE", "ACTIVE"]
    assert 100_000 <= st["resync"]["copied_bytes"] < SIZE // 4, st["resync"]

    # add → SYNCING with progress, then ACTIVE after a full copy. Holes cost
    # no copy: 48 MiB of data keep it SYNCING for ~1.5 s at the rate limit.
    bulk = rng.randbytes(48 * MiB)
    with open(vol, "r+b") as f:
        f.seek(8 * MiB)
        f.write(bulk)
    ref[8 * MiB:56 * MiB] = bulk
    new = tmp_path / "p2.img"
    p = vmd.cli("plex", "add", "vol0", str(new))
    assert "p2 is SYNCING" in p.stdout, p.stdout
    assert new.exists() and os.path.getsize(new) == SIZE
    st = _fast_status(vmd)
    p2 = [x for x in st["plexes"] if x["name"] == "p2"][0]
    assert p2["state"] == "SYNCING" and p2["path"] == str(new), st
    assert st["resync"]["running"] is True and "p2" in st["resync"]["targets"], st["resync"]
    assert st["resync"]["span_bytes"] == SIZE  # all of it, holes skipped
    assert st["resync"]["total_bytes"] <= SIZE
    # Writes during the resync reach the new plex and survive the copy.
    with open(vol, "r+b") as f:
        for off in (1 * MiB, 40 * MiB, SIZE - 70_000):
            data = rng.randbytes(70_000)
            f.seek(off)
            f.write(data)
            ref[off:off + len(data)] = data
    st = vmd.wait_resync("vol0")
    assert [x["state"] for x in st["plexes"]] == ["ACTIVE", "ACTIVE", "ACTIVE"]
    assert st["resync"]["synced_bytes"] == SIZE, st["resync"]
    # resync.rate_limit (32 MiB/s) is honoured for the bytes copied.
    assert st["resync"]["seconds"] >= 0.75 * st["resync"]["copied_bytes"] / (32 * MiB), \
        st["resync"]
    assert st["resync"]["done_bytes"] == st["resync"]["total_bytes"]

    # remove → gone from the volume, image kept.
    p = vmd.cli("plex", "remove", "vol0", "p0")
    assert "p0 removed" in p.stdout
    assert vmd.plex_states() == {"p1": "ACTIVE", "p2": "ACTIVE"}
    assert vmd.plex_paths()[0].exists()
    with open(vol, "rb") as f:
        assert f.read() == ref

    # Membership and states survive a restart on the unchanged config file.
    vmd.cli("plex", "detach", "vol0", "p1")
    vmd.restart()
    assert vmd.plex_states() == {"p1": "DETACHED", "p2": "ACTIVE"}
    with open(vol, "rb") as f:
        assert f.read() == ref
    with open(vol, "r+b") as f:  # p1 misses this: FastResync copies it at attach
        f.seek(20 * MiB)
        f.write(b"R" * 5000)
    ref[20 * MiB:20 * MiB + 5000] = b"R" * 5000
    vmd.cli("plex", "attach", "vol0", "p1")
    st = vmd.wait_resync("vol0")
    assert 5000 <= st["resync"]["copied_bytes"] < SIZE // 4, st["resync"]
    vmd.stop()
    digest = hashlib.sha256(ref).hexdigest()
    assert sha(new) == digest, "added plex p2 differs from the reference"
    assert sha(vmd.plex_paths()[1]) == digest, "reattached plex p1 differs from the reference"


def test_reattach_without_missed_writes_becomes_active(vmd: VmdDaemon) -> None:
    vmd.cli("plex", "detach", "vol0", "p1")
    vmd.cli("plex", "attach", "vol0", "p1")  # nothing was written meanwhile
    st = vmd.wait_resync("vol0")
    assert [(p["name"], p["state"]) for p in st["plexes"]] == [("p0", "ACTIVE"), ("p1", "ACTIVE")]
    assert st["resync"]["copied_bytes"] == 0, st["resync"]


def _refusal_lines(vmd: VmdDaemon) -> list[str]:
    """The ERROR lines refusing vol0; exactly one, not repeating the volume's name."""
    lines = [ln for ln in vmd.stderr().splitlines() if " ERROR " in ln and "refused" in ln]
    assert len(lines) == 1, f"expected one refusal line:\n{vmd.stderr()}"
    assert "refused: volume vol0" not in lines[0], lines[0]
    return lines


@pytest.mark.allow_log(r"volume vol0 refused: .*volumes\.vol0\.plexes differs")
def test_config_state_mismatch_refuses_volume(vmd_factory: Callable[..., VmdDaemon],
                                              tmp_path: Path) -> None:
    vmd = vmd_factory()
    vmd.start()
    with open(vmd.volume_file(), "r+b") as f:
        f.write(b"data")
    vmd.cli("plex", "add", "vol0", str(tmp_path / "p2.img"))
    vmd.wait_resync("vol0")
    vmd.stop()
    # The config now names a plex set that is neither the one it was created
    # with nor the one the sidecar log records.
    vmd.config["volumes"]["vol0"]["plexes"] = ["vol0-p0.img", "other.img"]
    vmd.write_config()
    vmd.start()
    st = vmd.status()
    assert st["volumes"] == []
    (ref,) = st["refused"]
    assert ref["name"] == "vol0"
    for needle in (str(vmd.config_path), str(vmd.log_path()), "volumes.vol0.plexes",
                   f"lacks {vmd.base / 'vol0-p1.img'}, {tmp_path / 'p2.img'}",
                   f"lists {vmd.base / 'other.img'}, not recorded"):
        assert needle in ref["error"], (needle, ref["error"])
    (line,) = _refusal_lines(vmd)
    assert ref["error"] in line
    assert not vmd.volume_file().exists()
    p = vmd.cli("plex", "detach", "vol0", "p1", check=False)
    assert p.returncode == EXIT_ERROR and "refused" in _one_error_line(p)
    assert not (vmd.base / "other.img").exists(), "a refused volume created a plex image"
    vmd.stop()
    # Bringing the config up to date with the recorded plexes is accepted.
    vmd.config["volumes"]["vol0"]["plexes"] = ["vol0-p0.img", "vol0-p1.img", str(tmp_path / "p2.img")]
    vmd.write_config()
    vmd.start()
    assert vmd.plex_states() == {"p0": "ACTIVE", "p1": "ACTIVE", "p2": "ACTIVE"}
    with open(vmd.volume_file(), "rb") as f:
        assert f.read(4) == b"data"
    vmd.stop()


@pytest.mark.allow_log(r"volume vol0 refused: .*volumes\.vol0\.size is .* but sidecar log .* says")
def test_size_changed_in_config_refuses_volume(vmd_factory: Callable[..., VmdDaemon]) -> None:
    vmd = vmd_factory()
    vmd.start()
    vmd.stop()
    # New images would be created at the new size, so only the log can tell.
    for p in vmd.plex_paths():
        os.unlink(p)
    vmd.config["volumes"]["vol0"]["size"] = "128MiB"
    vmd.write_config()
    vmd.start()
    (ref,) = vmd.status()["refused"]
    assert str(vmd.config_path) in ref["error"] and str(vmd.log_path()) in ref["error"]
    vmd.stop()


@pytest.mark.allow_log(r"WARNING vmd.manager: volume vol0: .*volumes\.vol0\.plexes differs .*"
                       r"it lacks .*p2\.img")
def test_restart_with_same_config_keeps_added_plex(vmd_factory: Callable[..., VmdDaemon],
                                                   tmp_path: Path) -> None:
    """After `plex add`, the unchanged config file (a strict subset of the
    recorded plexes) does not stop a restart, as after a crash or at boot: the
    admin's membership change stands, and a warning names the config file, the
    key and the plex it lacks until the config lists it."""
    vmd = vmd_factory()
    vmd.start()
    vmd.cli("plex", "add", "vol0", str(tmp_path / "p2.img"))
    vmd.wait_resync("vol0")
    vmd.restart(kill=True)
    assert vmd.plex_states() == {"p0": "ACTIVE", "p1": "ACTIVE", "p2": "ACTIVE"}
    assert yaml.safe_load(vmd.config_path.read_text())["volumes"]["vol0"]["plexes"] == \
        ["vol0-p0.img", "vol0-p1.img"]
    (warning,) = [ln for ln in vmd.stderr().splitlines() if " WARNING " in ln]
    for needle in (str(vmd.config_path), "volumes.vol0.plexes", f"it lacks {tmp_path / 'p2.img'}"):
        assert needle in warning, (needle, warning)
    # Once the config lists it, the warning is gone.
    vmd.config["volumes"]["vol0"]["plexes"].append(str(tmp_path / "p2.img"))
    vmd.write_config()
    vmd.restart()
    assert " WARNING " not in vmd.stderr(), vmd.stderr()
    vmd.stop()


@pytest.mark.allow_log(r"volume vol0 refused: .*volumes\.vol0\.plexes differs")
def test_config_edited_to_a_subset_of_recorded_plexes_is_refused(
        vmd_factory: Callable[..., VmdDaemon]) -> None:
    """A plex dropped from an edited config is not dropped from the volume:
    the volume is refused, once, naming the config file, the key and the plex."""
    vmd = vmd_factory(volumes={"vol0": volume_spec("vol0", nplex=3)})
    vmd.start()
    vmd.stop()
    vmd.config["volumes"]["vol0"]["plexes"] = ["vol0-p0.img", "vol0-p1.img"]
    vmd.write_config()
    vmd.start()
    (ref,) = vmd.status()["refused"]
    for needle in (str(vmd.config_path), "volumes.vol0.plexes", str(vmd.log_path()),
                   f"it lacks {vmd.base / 'vol0-p2.img'}"):
        assert needle in ref["error"], (needle, ref["error"])
    (line,) = _refusal_lines(vmd)
    assert ref["error"] in line
    assert not vmd.volume_file().exists()
    vmd.stop()


@pytest.mark.allow_log(r"does not load, nothing changed")
def test_sighup_rereads_the_rate_limit_and_never_kills_the_daemon(
        vmd_factory: Callable[..., VmdDaemon]) -> None:
    """SIGHUP's default action killed the daemon on the spot, with no stop
    and no log line (every filesystem above its volumes lost its disk). It
    re-reads `resync.rate_limit`, which otherwise needed a restart."""
    vmd = vmd_factory(rate_limit="1MiB").start()
    pwrite_file(vmd.volume_file(), [(0, os.urandom(32 * MiB))])  # half a minute to copy
    vmd.cli("plex", "add", "vol0", str(vmd.path("vol0-p2.img")))
    wait_for(lambda: vmd.status("vol0")["resync"]["done_bytes"] > 0, 30, "the resync copying")
    vmd.write_config("volumes: [")  # a config that does not load: nothing changes
    os.kill(vmd.proc.pid, signal.SIGHUP)
    wait_for(lambda: "does not load, nothing changed" in vmd.stderr(), 30, "the SIGHUP logged")
    vmd.write_config()  # (the CLI reads the socket's path there)
    assert vmd.status("vol0")["resync"]["rate_limit"] == MiB
    vmd.set_rate_limit(0)
    os.kill(vmd.proc.pid, signal.SIGHUP)
    wait_for(lambda: "resync.rate_limit is unlimited" in vmd.stderr(), 30, "the reload logged")
    p = vmd.cli("wait", "vol0", timeout=60)
    assert "in sync" in p.stdout, p
    _assert_alive(vmd)
    vmd.stop()
