"""`VmdDaemon`: one vmd daemon in a subprocess, its config, its CLI and its
stderr (conftest.py re-exports it; the fixtures that make daemons are there)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from syskit import CMD_TIMEOUT, REPO, SysResources, admin_request, is_mounted, run

START_TIMEOUT = 20.0


# -- the daemon ------------------------------------------------------------------

def volume_spec(name: str = "vol0", *, size: str | int = "64MiB", nplex: int = 2,
                **kw: Any) -> dict[str, Any]:
    """One volume's config mapping, plex and log paths relative to the config."""
    spec: dict[str, Any] = {"size": size,
                            "plexes": [f"{name}-p{i}.img" for i in range(nplex)],
                            "log": f"{name}.log"}
    spec.update(kw)
    return spec


class VmdDaemon:
    """One vmd daemon and its config, in directory `base`.

    `config` is the dict written as YAML (edit it, then `write_config()`);
    relative paths in it are relative to `base`. Nothing runs until `start()`.
    """

    def __init__(self, base: Path, *, volumes: dict[str, dict[str, Any]] | None = None,
                 mountpoint: str = "mnt", socket_path: str | None = None,
                 rate_limit: int | str | None = None, clean_delay: float | None = None,
                 extra: dict[str, Any] | None = None, env: dict[str, str] | None = None,
                 daemon_args: tuple[str, ...] = (), res: SysResources | None = None):
        self.base = Path(base)
        self.base.mkdir(parents=True, exist_ok=True)
        self.config_path = self.base / "vmd.yaml"
        if socket_path is None:
            socket_path = "vmd.sock"
            if len(str(self.base / socket_path)) > 100:  # sun_path is 108 bytes
                socket_path = str(Path(tempfile.mkdtemp(prefix="vmds-", dir="/tmp")) / "vmd.sock")
        cfg: dict[str, Any] = {"mountpoint": mountpoint, "socket": socket_path,
                               "volumes": volumes if volumes is not None else
                               {"vol0": volume_spec("vol0")}}
        if rate_limit is not None:
            cfg["resync"] = {"rate_limit": rate_limit}
        if clean_delay is not None:
            cfg["clean_delay"] = clean_delay
        cfg.update(extra or {})
        self.config: dict[str, Any] = cfg
        self.env = dict(env or {})
        self.daemon_args = tuple(daemon_args)
        self.res = res or SysResources()
        self.proc: subprocess.Popen[bytes] | None = None
        self.stderr_path = self.base / "daemon.stderr"
        self._log_start = 0  # offset in stderr_path where the current run began
        self.starts = 0
        self.write_config()

    # paths
    def path(self, p: str | os.PathLike[str]) -> Path:
        p = Path(p)
        return p if p.is_absolute() else Path(os.path.normpath(self.base / p))

    @property
    def mountpoint(self) -> Path:
        return self.path(self.config.get("mountpoint", "mnt"))

    @property
    def socket(self) -> Path:
        return self.path(self.config.get("socket", "vmd.sock"))

    def volume_file(self, volume: str = "vol0") -> Path:
        return self.mountpoint / volume

    def plex_paths(self, volume: str = "vol0") -> list[Path]:
        return [self.path(p) for p in self.config["volumes"][volume]["plexes"]]

    def log_path(self, volume: str = "vol0") -> Path:
        return self.path(self.config["volumes"][volume]["log"])

    def volume_size(self, volume: str = "vol0") -> int:
        from vmd.config import parse_size

        return parse_size(self.config["volumes"][volume]["size"])

    def write_config(self, text: str | None = None) -> None:
        self.config_path.write_text(text if text is not None else
                                    yaml.safe_dump(self.config, sort_keys=False))

    def set_rate_limit(self, rate: int | str | None) -> None:
        """Set (None: remove) `resync: rate_limit:` in the config; it applies
        from the next start. Tests slow a resync this way to catch it midway,
        then lift the limit on a restart instead of waiting for it."""
        if rate is None:
            self.config.pop("resync", None)
        else:
            self.config["resync"] = {"rate_limit": rate}
        self.write_config()

    def logged_state(self, volume: str = "vol0") -> Any:
        """The volume state (a `vmd.sidecar.VolumeState`) its sidecar log holds
        now: what a restart after a SIGKILL at this moment would replay. Safe
        while the daemon runs (compaction renames a new file into place)."""
        from vmd.sidecar import read_log

        return read_log(self.log_path(volume))[0].state

    # process
    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _popen(self) -> subprocess.Popen[bytes]:
        env = {**os.environ, **self.env}
        env.pop("NOTIFY_SOCKET", None)
        env.pop("JOURNAL_STREAM", None)
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.stderr_path, "ab") as err:
            self._log_start = err.tell()
            return subprocess.Popen(
                [sys.executable, "-m", "vmd", "daemon", "-c", str(self.config_path),
                 *self.daemon_args],
                cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=err, stderr=err)

    def start(self) -> "VmdDaemon":
        assert not self.running, "daemon already running"
        self.proc = self._popen()
        self.starts += 1
        deadline = time.monotonic() + START_TIMEOUT
        mp = str(self.mountpoint)
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise AssertionError(f"vmd daemon exited with {rc} before it was ready; "
                                     f"stderr:\n{self.stderr()}")
            if is_mounted(mp) and self._status_ok():
                return self
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"vmd daemon not ready after {START_TIMEOUT} s "
                                     f"(mounted: {is_mounted(mp)}); stderr:\n{self.stderr()}")
            time.sleep(0.05)

    def _status_ok(self) -> bool:
        try:
            return bool(admin_request(self.socket, {"cmd": "status"}, timeout=5).get("ok"))
        except (OSError, ValueError):
            return False

    def run_foreground(self, timeout: float = START_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """Run `vmd daemon` expecting it to exit by itself (bad config cases).
        If it starts serving instead, it is killed and the test fails."""
        assert not self.running
        self.proc = self._popen()
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"vmd daemon did not exit within {timeout} s; "
                                 f"stderr:\n{self.stderr()}") from None
        return subprocess.CompletedProcess(self.proc.args, rc, "", self.stderr())

    def stderr(self, whole: bool = False) -> str:
        """The daemon's stderr, of the current (or last) run unless `whole`."""
        try:
            data = self.stderr_path.read_bytes()
        except FileNotFoundError:
            return ""
        return data[0 if whole else self._log_start:].decode(errors="replace")

    def cli(self, *args: str, check: bool = True, timeout: float = CMD_TIMEOUT,
            config: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "vmd"]
        if config:
            cmd += ["-c", str(self.config_path)]
        cmd += list(args)
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                           stdin=subprocess.DEVNULL)
        if check and p.returncode != 0:
            raise AssertionError(f"vmd {' '.join(args)} exited {p.returncode}\n"
                                 f"stdout: {p.stdout}\nstderr: {p.stderr}\n"
                                 f"daemon stderr:\n{self.stderr()}")
        return p

    def status(self, volume: str | None = None) -> dict[str, Any]:
        """`vmd status --json`; with `volume`, that volume's object."""
        p = self.cli("status", *([volume] if volume else []), "--json")
        st = json.loads(p.stdout)
        if volume is None:
            return st
        (v,) = [v for v in st["volumes"] if v["name"] == volume]
        return v

    def plex_states(self, volume: str = "vol0") -> dict[str, str]:
        return {p["name"]: p["state"] for p in self.status(volume)["plexes"]}

    def request(self, req: dict[str, Any], **kw: Any) -> dict[str, Any]:
        return admin_request(self.socket, req, **kw)

    def wait_resync(self, volume: str = "vol0", timeout: float = 120.0, *,
                    redundant: bool = True) -> dict[str, Any]:
        """`vmd wait VOLUME`, then the volume's status (no plex SYNCING).
        `redundant=False`: a plex is meant to be out then, and `vmd wait`
        must say so (exit 5, "not redundant in full")."""
        if redundant:
            self.cli("wait", volume, timeout=timeout)
        else:
            p = self.cli("wait", volume, timeout=timeout, check=False)
            assert p.returncode == 5 and "but not redundant in full" in p.stderr, \
                (p.returncode, p.stdout, p.stderr)
        st = self.status(volume)
        assert not st["resync"]["running"], st
        assert all(p["state"] != "SYNCING" for p in st["plexes"]), st
        return st

    def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"vmd daemon still running after {timeout} s; "
                                 f"stderr:\n{self.stderr()}") from None

    def stop(self, force: bool = False, timeout: float = 30.0) -> None:
        """`vmd stop`; the daemon exits 0 and the mount is gone."""
        self.cli("stop", *(["--force"] if force else []), timeout=timeout)
        rc = self.wait_exit(timeout)
        assert rc == 0, f"daemon exited {rc} after stop; stderr:\n{self.stderr()}"
        assert not is_mounted(self.mountpoint), f"{self.mountpoint} still mounted after stop"

    def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def kill(self) -> None:
        """SIGKILL the daemon (a crash) and lazily unmount its dead mount."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.lazy_unmount()

    def lazy_unmount(self) -> None:
        mp = str(self.mountpoint)
        if is_mounted(mp):
            if shutil.which("fusermount3"):
                run(["fusermount3", "-u", "-z", mp], check=False, timeout=20)
            if is_mounted(mp):
                run(["umount", "-l", mp], check=False, timeout=20)

    def restart(self, *, kill: bool = False) -> "VmdDaemon":
        if self.running:
            if kill:
                self.kill()
            else:
                self.stop()
        return self.start()

    # loop devices and mounts on the volume file (tracked for teardown)
    def losetup(self, volume: str = "vol0") -> str:
        return self.res.losetup(self.volume_file(volume))

    def cleanup(self) -> None:
        """Teardown: kill the daemon and remove its mount (the caller releases
        loop devices and mounts on top of it first)."""
        self.kill()
        sock = self.socket
        if sock.parent.name.startswith("vmds-"):
            shutil.rmtree(sock.parent, ignore_errors=True)


# -- stderr check -------------------------------------------------------------------

_BAD_LINE = re.compile(r"^\S+ \S+ (WARNING|ERROR|CRITICAL) |^<[0-4]>|Traceback \(most recent")


def unexpected_log_lines(text: str, allowed: list[str]) -> list[str]:
    pats = [re.compile(a) for a in allowed]
    return [line for line in text.splitlines()
            if _BAD_LINE.search(line) and not any(p.search(line) for p in pats)]
