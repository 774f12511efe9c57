"""Events and the notify hook (issue 15, part 2): plex state changes,
resyncs, snapshots, Remote Copy updates and refused volumes appear in
`vmd events --json` and reach the `notify:` command; a hook that hangs does
not hold up writes and is killed after its timeout."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from conftest import MiB, REPO, SysResources, VmdDaemon, volume_spec, wait_for
from vmd import events
from vmd.config import load_config
from vmd.errors import EXIT_NO_DAEMON, ConfigError

SIZE = 64 * MiB


class EventStream:
    """A running `vmd events --json`, its lines collected by a thread."""

    def __init__(self, d: VmdDaemon, *args: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vmd", "-c", str(d.config_path), "events", "--json", *args],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.events: list[dict[str, Any]] = []
        self.following = threading.Event()
        self.said: list[str] = []  # its stderr
        threading.Thread(target=self._read, args=(self.proc.stdout, self.events.append),
                         daemon=True).start()
        threading.Thread(target=self._read, args=(self.proc.stderr, self._said),
                         daemon=True).start()

    @staticmethod
    def _read(stream: Any, take: Callable[[Any], None]) -> None:
        for line in stream:
            take(json.loads(line) if line.startswith("{") else line)

    def _said(self, line: str) -> None:
        self.said.append(line)
        if "following" in line:
            self.following.set()

    def wait(self, kind: str, plex: str | None = None, **details: Any) -> dict[str, Any]:
        return wait_for(lambda: find(self.events, kind, plex, **details), 60,
                        f"event {kind} {plex or ''} {details} in `vmd events --json` "
                        f"(seen: {[(e['kind'], e['plex']) for e in self.events]})")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


def find(evs: list[dict[str, Any]], kind: str, plex: str | None = None,
         **details: Any) -> dict[str, Any] | None:
    for e in evs:
        if e["kind"] == kind and (plex is None or e["plex"] == plex) and all(
                e["details"].get(k) == v for k, v in details.items()):
            return e
    return None


def hook_lines(out: Path) -> list[dict[str, Any]]:
    """What the notify script wrote: per run, its environment and its stdin."""
    if not out.exists():
        return []
    runs = []
    for line in out.read_text().splitlines():
        env, _, stdin = line.partition(" ")
        kind, volume, plex = env.split("|")
        runs.append({"env": {"VMD_EVENT": kind, "VMD_VOLUME": volume, "VMD_PLEX": plex},
                     **json.loads(stdin)})
    return runs


# One line per run: VMD_EVENT|VMD_VOLUME|VMD_PLEX, a space, the JSON from stdin.
RECORD = 'printf "%s|%s|%s %s\\n" "$VMD_EVENT" "$VMD_VOLUME" "$VMD_PLEX" "$(cat)" >> {out}'


def wait_hook(out: Path, kind: str, plex: str | None = None, **details: Any) -> dict[str, Any]:
    ev = wait_for(lambda: find(hook_lines(out), kind, plex, **details), 60,
                  f"the notify hook to get {kind} {plex or ''} {details} "
                  f"(got: {[(e['kind'], e['plex']) for e in hook_lines(out)]})")
    assert ev["env"] == {"VMD_EVENT": kind, "VMD_VOLUME": ev["volume"] or "",
                         "VMD_PLEX": ev["plex"] or ""}, ev
    return ev


@pytest.fixture
def streams() -> Iterator[list[EventStream]]:
    made: list[EventStream] = []
    yield made
    for s in made:
        s.close()


@pytest.mark.mount
@pytest.mark.allow_log(r"plex p1 .* is now IOFAIL", r"No space left on device")
def test_detach_resync_and_failed_plex_reach_events_and_notify(
        vmd_factory: Callable[..., VmdDaemon], sysres: SysResources, tmp_path: Path,
        streams: list[EventStream]) -> None:
    # p1 on a filesystem of 8 MiB: a real ENOSPC once 24 MiB are written.
    small = tmp_path / "small"
    sysres.make_ext4_image(tmp_path / "small.img", 8 * MiB, small)
    out = tmp_path / "notified"
    vmd = vmd_factory(volumes={"vol0": volume_spec(plexes=["vol0-p0.img",
                                                           str(small / "vol0-p1.img")])},
                      extra={"notify": RECORD.format(out=out)}).start()
    es = EventStream(vmd, "--new")
    streams.append(es)
    assert es.following.wait(30), "vmd events did not start following"

    vmd.cli("plex", "detach", "vol0", "p1")
    for found in (es.wait(events.PLEX_STATE, "p1", state="DETACHED"),
                  wait_hook(out, events.PLEX_STATE, "p1", state="DETACHED")):
        assert found["volume"] == "vol0" and found["details"]["was"] == "ACTIVE", found
        assert "detached by the administrator" in found["details"]["reason"], found

    fd = os.open(vmd.volume_file(), os.O_RDWR)
    try:
        os.pwrite(fd, b"x" * MiB, 3 * MiB)
        os.fsync(fd)
        vmd.cli("plex", "attach", "vol0", "p1")
        vmd.wait_resync()
        for seen in (es.wait, lambda *a, **k: wait_hook(out, *a, **k)):
            assert seen(events.PLEX_STATE, "p1", state="SYNCING")["details"]["was"] == "DETACHED"
            assert seen(events.RESYNC_STARTED)["details"]["targets"] == ["p1"]
            done = seen(events.RESYNC_FINISHED)
            assert done["details"]["targets"] == ["p1"] and done["details"]["copied_bytes"] > 0
            assert seen(events.PLEX_STATE, "p1", state="ACTIVE")["details"]["was"] == "SYNCING"

        # 24 MiB of data: p1's filesystem fills up and p1 fails.
        rng = random.Random(5)
        for off in range(0, 48 * MiB, 2 * MiB):
            os.pwrite(fd, rng.randbytes(MiB), off)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert vmd.plex_states() == {"p0": "ACTIVE", "p1": "IOFAIL"}
    for failed in (es.wait(events.PLEX_STATE, "p1", state="IOFAIL"),
                   wait_hook(out, events.PLEX_STATE, "p1", state="IOFAIL")):
        assert "No space left on device" in failed["details"]["reason"], failed
    vmd.stop()


@pytest.mark.mount
@pytest.mark.allow_log(r"ERROR vmd.notify: notify hook 'sh .*hook.sh' \(event plex-state of "
                       r"volume vol0\) ran past 10 s: killed")
def test_hanging_hook_does_not_hold_writes_and_is_killed(
        vmd_factory: Callable[..., VmdDaemon], tmp_path: Path) -> None:
    out, hung, pids = tmp_path / "notified", tmp_path / "hung", tmp_path / "pids"
    hook = tmp_path / "hook.sh"
    # The first event's run hangs (in a child, as a stuck `mail` would); the rest record.
    hook.write_text(f"""#!/bin/sh
{RECORD.format(out=out)}
if [ ! -e {hung} ]; then
    touch {hung}
    sleep 1000 &
    echo "$$ $!" > {pids}
    wait
fi
""")
    timeout = 10
    vmd = vmd_factory(extra={"notify": ["sh", str(hook)]},
                      env={"VMD_NOTIFY_TIMEOUT": str(timeout)}).start()
    data = random.Random(7).randbytes(MiB)

    def write(n: int) -> float:
        t0 = time.monotonic()
        fd = os.open(vmd.volume_file(), os.O_RDWR)
        try:
            for i in range(n):
                os.pwrite(fd, data, i * MiB)
            os.fsync(fd)
        finally:
            os.close(fd)
        return time.monotonic() - t0

    baseline = write(32)
    vmd.cli("plex", "detach", "vol0", "p1")
    shell, child = map(int, wait_for(lambda: pids.exists() and pids.read_text().split(),
                                     what="the hook to hang"))
    # While the hook hangs: writes (each dirtying regions) and more events.
    hung_at = time.monotonic()
    during = write(32)
    vmd.cli("plex", "attach", "vol0", "p1")
    vmd.wait_resync()
    still_hanging = os.path.exists(f"/proc/{shell}") and "ran past" not in vmd.stderr()
    assert still_hanging and time.monotonic() - hung_at < timeout, (
        f"writes took {during:.2f} s while the hook hung (baseline {baseline:.2f} s), "
        f"not done before the hook's {timeout} s timeout")

    # Killed after the timeout, its child too, and logged; the queued events follow.
    wait_for(lambda: "ran past" in vmd.stderr(), timeout + 30, "the hook to be killed")
    line = [ln for ln in vmd.stderr().splitlines() if "ran past" in ln][0]
    assert "ERROR" in line and "event plex-state of volume vol0" in line, line
    for pid in (shell, child):
        wait_for(lambda: not _alive(pid), what=f"hook process {pid} to be gone")
    wait_hook(out, events.PLEX_STATE, "p1", state="SYNCING")
    wait_hook(out, events.RESYNC_FINISHED)
    first = hook_lines(out)[0]
    assert (first["kind"], first["details"]["state"]) == (events.PLEX_STATE, "DETACHED"), first
    vmd.stop()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        # ProcessLookupError: it was reaped between the open and the read.
        return False


@pytest.mark.mount
@pytest.mark.allow_log(r"volume bad refused", r"notify hook .* exited with status 3")
def test_refused_volume_and_failing_hook(vmd_factory: Callable[..., VmdDaemon], tmp_path: Path,
                                         streams: list[EventStream]) -> None:
    """A volume refused at start reaches the hook (it subscribes before the
    volumes open) and a later `vmd events` (the daemon keeps recent events);
    a hook that fails is logged with what it printed."""
    out = tmp_path / "notified"
    vmd = vmd_factory(volumes={"vol0": volume_spec("vol0"), "bad": volume_spec("bad")},
                      extra={"notify": RECORD.format(out=out) + "; echo 'no mail today'; exit 3"})
    # An image with data and no log: vmd will not guess that the mirrors agree.
    with open(vmd.path("bad-p0.img"), "wb") as f:
        f.truncate(SIZE)
        f.write(b"data")
    vmd.start()
    ev = wait_hook(out, events.VOLUME_REFUSED)
    assert ev["volume"] == "bad" and "holds data" in ev["details"]["error"], ev
    es = EventStream(vmd)
    streams.append(es)
    assert es.wait(events.VOLUME_REFUSED)["volume"] == "bad"
    wait_for(lambda: "exited with status 3: no mail today" in vmd.stderr(),
             what="the failed hook run in the log")
    vmd.stop()


@pytest.mark.mount
def test_snapshot_taken_and_merged(vmd_factory: Callable[..., VmdDaemon],
                                   streams: list[EventStream]) -> None:
    vmd = vmd_factory().start()
    es = EventStream(vmd, "--new")
    streams.append(es)
    assert es.following.wait(30)
    vmd.cli("snap", "start", "vol0")
    vmd.cli("snap", "wait", "vol0")
    vmd.cli("snap", "take", "vol0", "nightly")
    taken = es.wait(events.SNAPSHOT_TAKEN)
    assert taken["volume"] == "vol0" and taken["details"]["snapshot"] == "nightly", taken
    vmd.cli("snap", "back", "nightly")
    merged = es.wait(events.SNAPSHOT_MERGED)
    assert merged["details"]["snapshot"] == "nightly", merged
    es.wait(events.PLEX_STATE, merged["plex"], state="SNAPDONE")
    vmd.stop()
    # The daemon's stop ends `vmd events`, non-zero: the events stopped coming.
    assert es.proc.wait(timeout=30) == EXIT_NO_DAEMON, es.said
    wait_for(lambda: "vmd events: the daemon stopped\n" in es.said, what="the end of vmd events")


def test_events_cli_text_line() -> None:
    ev = events.make_event(events.PLEX_STATE, "vol0", "p1", state="IOFAIL", reason="EIO")
    line = events.format_event(ev)
    assert line.endswith(' vol0 plex-state plex=p1 state="IOFAIL" reason="EIO"'), line


def test_full_queue_drops_oldest_and_says_so() -> None:
    """emit never waits for a reader: a full queue loses its oldest events,
    and the reader's next event is a `dropped` one with the count."""
    bus = events.EventBus()

    async def main() -> list[dict[str, Any]]:
        sub = bus.subscribe("test", maxlen=3)
        for i in range(5):
            bus.emit(events.RESYNC_STARTED, "vol0", n=i)
        got = []
        sub.close()
        while (ev := await sub.get()) is not None:
            got.append(ev)
        return got

    got = trio.run(main)
    assert [(e["kind"], e["details"]) for e in got] == [
        (events.DROPPED, {"count": 2, "reader": "test"}),
        (events.RESYNC_STARTED, {"n": 2}), (events.RESYNC_STARTED, {"n": 3}),
        (events.RESYNC_STARTED, {"n": 4})]
    assert bus.subscribers == []


@pytest.mark.parametrize("value, message", [
    (5, "notify: expected a command"), ([], "notify: expected a command"),
    (["mail", ""], "notify: expected a command"), ("  ", "notify: expected a command")])
def test_notify_config_errors_name_the_key(tmp_path: Path, value: Any, message: str) -> None:
    cfg = tmp_path / "vmd.yaml"
    cfg.write_text(json.dumps({"mountpoint": "mnt", "socket": "s", "notify": value,
                               "volumes": {"vol0": volume_spec()}}))
    with pytest.raises(ConfigError, match=f"{cfg}: {message}"):
        load_config(cfg)


def test_notify_config_forms(tmp_path: Path) -> None:
    cfg = tmp_path / "vmd.yaml"
    for value, argv in (("mail -s x root", ("sh", "-c", "mail -s x root")),
                        (["logger", "-t", "vmd"], ("logger", "-t", "vmd")), (None, None)):
        cfg.write_text(json.dumps({"mountpoint": "mnt", "socket": "s", "notify": value,
                                   "volumes": {"vol0": volume_spec()}}))
        assert load_config(cfg).notify == argv


@pytest.mark.mount
@pytest.mark.allow_log(r"plex p1 is IOFAIL: cannot open image")
def test_readme_mail_example_mails_a_failed_plex(vmd_factory: Callable[..., VmdDaemon],
                                                 tmp_path: Path) -> None:
    """The README's notify example, as printed there, with a `mail` that
    keeps what it is given: a plex whose image is gone at start fails, and
    only that event is mailed."""
    import re

    import yaml

    readme = (REPO / "README.md").read_text()
    block = re.search(r"```yaml\n(notify: .*?)```", readme, re.S)
    assert block, "README.md has no notify example"
    notify = yaml.safe_load(block.group(1))["notify"]
    bin_dir, mailbox = tmp_path / "bin", tmp_path / "mailbox"
    bin_dir.mkdir()
    (bin_dir / "mail").write_text(f'#!/bin/sh\n{{ echo "$*"; cat; }} >> {mailbox}\n')
    (bin_dir / "mail").chmod(0o755)
    vmd = vmd_factory(extra={"notify": notify},
                      env={"PATH": f"{bin_dir}:{os.environ['PATH']}"}).start()
    vmd.stop()
    vmd.plex_paths()[1].unlink()
    vmd.start()
    assert vmd.plex_states() == {"p0": "ACTIVE", "p1": "IOFAIL"}
    mail = wait_for(lambda: mailbox.exists() and mailbox.read_text(), what="the mail")
    subject, body = mail.split("\n", 1)
    assert subject == "-s vmd: plex p1 of vol0 failed root", mail
    ev = json.loads(body)
    assert ev["kind"] == "plex-state" and ev["details"]["state"] == "IOFAIL", ev
    assert "cannot open image" in ev["details"]["reason"], ev
    vmd.stop()
    assert mailbox.read_text() == mail, "an event other than the failure was mailed"


@pytest.mark.mount
def test_rcopy_update_committed_and_failed(vmd_factory: Callable[..., VmdDaemon], tmp_path: Path,
                                           streams: list[EventStream],
                                           allow_log: Callable[..., None]) -> None:
    from test_rcopy import FAILED, make_pair, sync

    allow_log(*FAILED)
    a, b = make_pair(vmd_factory, tmp_path)
    es = EventStream(a, "--new")
    streams.append(es)
    assert es.following.wait(30)
    sync(a)
    done = es.wait(events.RCOPY_COMMITTED)
    assert done["volume"] == "vol0" and done["details"]["seq"] == 1, done
    b.stop()  # the receiver's daemon is gone: the next update fails
    assert not sync(a, check=False)["ok"]
    failed = es.wait(events.RCOPY_FAILED)
    assert failed["details"]["seq"] == 2, failed
    assert "no vmd daemon answers" in failed["details"]["error"], failed
    a.stop()


@pytest.mark.mount
@pytest.mark.allow_log(r"notify hook: stopping: 2 event\(s\) left undelivered after 5 s")
def test_stop_is_not_held_by_a_hanging_hook(vmd_factory: Callable[..., VmdDaemon],
                                            tmp_path: Path) -> None:
    """A hook that hangs at a stop gets the grace period, then is killed:
    `vmd stop` still ends well before the hook's own timeout."""
    started = tmp_path / "started"
    vmd = vmd_factory(extra={"notify": f"echo >> {started}; exec sleep 1000"},
                      env={"VMD_NOTIFY_TIMEOUT": "600"}).start()
    vmd.cli("plex", "detach", "vol0", "p1")
    vmd.cli("plex", "attach", "vol0", "p1")  # queued behind the hanging run
    wait_for(lambda: started.exists(), what="the hook to run")
    t0 = time.monotonic()
    vmd.stop(timeout=60)
    took = time.monotonic() - t0
    assert took < 30, f"vmd stop took {took:.1f} s with a hanging notify hook"
    assert started.read_text() == "\n", "a second run began after the stop's grace period"
    assert "2 event(s) left undelivered" in vmd.stderr(), vmd.stderr()


@pytest.mark.mount
@pytest.mark.allow_log(r"verify.* mismatched in \d+ range")
def test_verify_finished(vmd_factory: Callable[..., VmdDaemon],
                         streams: list[EventStream]) -> None:
    vmd = vmd_factory().start()
    vmd.stop()
    with open(vmd.plex_paths()[1], "r+b") as f:  # one sector p0 does not have
        f.seek(4096)
        f.write(b"\xff" * 512)
    vmd.start()
    es = EventStream(vmd, "--new")
    streams.append(es)
    assert es.following.wait(30)
    vmd.cli("verify", "vol0", check=False)
    found = es.wait(events.VERIFY_FINISHED)["details"]
    assert found == {"checked_bytes": SIZE, "mismatched_bytes": 512, "repaired_bytes": 0,
                     "ranges": [[4096, 512]], "complete": True}, found
    result = vmd.status("vol0")["verify"]  # the event has the result's names
    assert all(result[k] == v for k, v in found.items()), (found, result)
    vmd.cli("verify", "vol0", "--repair")
    assert es.wait(events.VERIFY_FINISHED, repaired_bytes=512)["details"]["mismatched_bytes"] == 512
    vmd.stop()
