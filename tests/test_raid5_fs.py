"""RAID-5 under a real filesystem and a real daemon: a column that runs out of
space (a real ENOSPC) under ext4 on a loop device, its replacement through the
CLI, a rebuild interrupted by SIGKILL, `vmd wait` and `resync.rate_limit`."""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import MiB, SysResources, VmdDaemon, is_mounted, run, wait_for
from syskit import processes_with_open, where_stuck
from raid5kit import decoded_sha256, raid5_spec, xor_is_zero
from test_ext4 import _check_tree, _write_tree

pytestmark = pytest.mark.mount

SU = 64 * 1024


def fsck_clean(dev: str, when: str) -> None:
    fsck = run(["fsck.ext4", "-fn", dev], check=False)
    assert fsck.returncode == 0, f"fsck.ext4 -fn {when}:\n{fsck.stdout}\n{fsck.stderr}"


def file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def column(st: dict, name: str) -> dict:
    (c,) = [c for c in st["columns"] if c["name"] == name]
    return c


@pytest.mark.allow_log(r"plex c1 .* is now IOFAIL", r"No space left on device",
                       r"column c1 gets a full rebuild: it is a new image")
def test_ext4_on_raid5_survives_a_column_enospc_and_its_replacement(
        vmd_factory: Callable[..., VmdDaemon], sysres: SysResources, tmp_path: Path) -> None:
    # Column c1 lives on an 8 MiB filesystem of its own: sparse at 48 MiB, it
    # fills up (ENOSPC) as ext4 writes its files, in the middle of a write.
    small = tmp_path / "small"
    sysres.make_ext4_image(tmp_path / "small.img", 8 * MiB, small)
    c1 = small / "r5-c1.img"
    vmd = vmd_factory(volumes={"r5": raid5_spec(size="96MiB", columns=[
        "r5-c0.img", str(c1), "r5-c2.img"])}).start()
    cols = [vmd.path("r5-c0.img"), c1, vmd.path("r5-c2.img")]
    dev = vmd.losetup("r5")
    run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=0", dev])
    mnt = sysres.mount(dev, tmp_path / "fs")
    rng = random.Random(13)
    sums = {}
    for rnd in range(8):  # ~30 MiB a round; c1 holds its ~7 MiB share only so long
        (Path(mnt) / f"r{rnd}").mkdir()
        sums.update({f"r{rnd}/{k}": v for k, v in _write_tree(Path(mnt) / f"r{rnd}", rng).items()})
        run(["sync"])
        if column(vmd.status("r5"), "c1")["state"] == "IOFAIL":
            break
        for rel in list(sums):  # make room: the volume is small
            if rel.startswith(f"r{rnd}/") and rng.random() < 0.7:
                os.unlink(Path(mnt) / rel)
                del sums[rel]
    st = vmd.status("r5")
    c1st = column(st, "c1")
    assert c1st["state"] == "IOFAIL" and "No space left" in c1st["reason"], c1st
    # Named once: it read "write of plex c1 (…) at offset A: write of plex c1 (…) at offset B: …".
    assert c1st["reason"].count("of plex c1") == 1, c1st["reason"]
    assert st["degraded"], st
    # The filesystem goes on, degraded: more files, all of them read back.
    (Path(mnt) / "after").mkdir()
    sums.update({f"after/{k}": v for k, v in
                 _write_tree(Path(mnt) / "after", random.Random(14)).items()})
    run(["sync"])
    sysres.umount(mnt)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
    fsck_clean(dev, "on the degraded volume")
    mnt = sysres.mount(dev, tmp_path / "fs", "-o", "ro")
    _check_tree(Path(mnt), sums)
    sysres.umount(mnt)

    # A new image in c1's place, through the CLI; the rebuild runs under the
    # loop device, and `vmd wait` returns once it is done.
    new = tmp_path / "new-c1.img"
    out = vmd.cli("plex", "replace", "r5", "c1", str(new)).stdout
    assert "c1" in out, out
    st = vmd.wait_resync("r5")
    assert [c["state"] for c in st["columns"]] == ["ACTIVE"] * 3 and not st["degraded"], st
    # Progress counts the volume bytes of the stripes rebuilt: all of them.
    assert st["resync"]["copied_bytes"] == 96 * MiB, st["resync"]
    fsck_clean(dev, "after the rebuild")
    sysres.detach_loop(dev)
    want = file_sha(vmd.volume_file("r5"))
    vmd.stop()
    cols[1] = new
    assert xor_is_zero(cols), "parity does not match the data after the rebuild"
    assert decoded_sha256(cols, SU) == want, "the columns do not decode to the volume"


def write_all(path: Path, size: int, rng: random.Random) -> bytes:
    data = rng.randbytes(size)
    fd = os.open(path, os.O_RDWR)
    try:
        for off in range(0, size, MiB):
            assert os.pwrite(fd, data[off:off + MiB], off) == MiB
        os.fsync(fd)
    finally:
        os.close(fd)
    return data


@pytest.mark.allow_log(r"was not stopped cleanly")
def test_rebuild_interrupted_by_sigkill_resumes_from_its_progress(
        vmd_factory: Callable[..., VmdDaemon], tmp_path: Path) -> None:
    size = 16 * MiB
    # 16 MiB of stripes at 1 MiB/s: the kill below lands well before the end.
    vmd = vmd_factory(volumes={"r5": raid5_spec(size="16MiB", r5log=False)},
                      rate_limit="1MiB").start()
    vmd.cli("plex", "detach", "r5", "c1")
    ref = write_all(vmd.volume_file("r5"), size, random.Random(21))  # c1 misses every stripe
    assert column(vmd.status("r5"), "c1")["missing_bytes"] == size
    # No log: a restart with the DRL dirty and c1 not yet rebuilt would be
    # refused (the write hole); the writes are over once the DRL is clean.
    wait_for(lambda: vmd.status("r5")["dirty_regions"] == 0, 30, "the DRL to be cleaned")
    vmd.cli("plex", "attach", "r5", "c1")
    assert column(vmd.status("r5"), "c1")["state"] == "SYNCING"
    # Past the first durable progress record: a restart replays less to do.
    wait_for(lambda: vmd.logged_state("r5").plex("c1").missing.bytes_covered() < size, 30,
             "a durable rebuild progress record")
    rs = vmd.status("r5")["resync"]
    assert rs["running"] and rs["rate_limit"] == MiB and 0 < rs["done_bytes"] < size, rs
    vmd.kill()

    vmd.start()
    c1 = column(vmd.status("r5"), "c1")
    assert c1["state"] == "SYNCING" and 0 < c1["missing_bytes"] < size, \
        f"the rebuild restarted from zero or lost its map: {c1}"
    left = c1["missing_bytes"]
    vmd.stop()  # the rest without the rate limit
    vmd.set_rate_limit(None)
    vmd.start()
    st = vmd.wait_resync("r5")
    assert [c["state"] for c in st["columns"]] == ["ACTIVE"] * 3, st
    assert st["resync"]["copied_bytes"] == left, (st["resync"], left)
    with open(vmd.volume_file("r5"), "rb") as f:
        assert f.read() == ref
    vmd.stop()
    cols = [vmd.path(f"r5-c{i}.img") for i in range(3)]
    assert xor_is_zero(cols)
    assert decoded_sha256(cols, SU) == hashlib.sha256(ref).hexdigest()


class AckedWriter:
    """Writes random bytes to fixed slots of the volume file, each write then
    an fsync, in a thread, until the daemon dies under it. Per slot it keeps
    the last acknowledged bytes and the write in flight (never acknowledged)."""

    SLOT = 24 * 1024 + 512  # straddles stripe units: partial-stripe writes

    def __init__(self, path: Path, base: int, nslots: int, seed: int):
        self.path, self.base, self.nslots = path, base, nslots
        self.rng = random.Random(seed)
        self.acked: dict[int, bytes] = {}
        self.inflight: dict[int, bytes] = {}
        self.count = 0
        import threading

        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        fd = os.open(self.path, os.O_RDWR)
        try:
            while True:
                slot = self.rng.randrange(self.nslots)
                data = self.rng.randbytes(self.SLOT)
                self.inflight[slot] = data
                os.pwrite(fd, data, self.base + slot * self.SLOT)
                os.fsync(fd)
                self.acked[slot] = self.inflight.pop(slot)
                self.count += 1
        except OSError:
            return  # the daemon was killed
        finally:
            try:
                os.close(fd)
            except OSError:
                pass  # ENOTCONN: the daemon is gone

    def check(self, path: Path) -> None:
        with open(path, "rb") as f:
            for slot, want in self.acked.items():
                f.seek(self.base + slot * self.SLOT)
                got = f.read(self.SLOT)
                assert got in (want, self.inflight.get(slot)), \
                    f"slot {slot}: an acknowledged write did not survive the SIGKILL"


def r5log_commits(vmd: VmdDaemon) -> int:
    return vmd.status("r5")["raid5_log"]["commits"]


@pytest.mark.allow_log(r"was not stopped cleanly", r"RAID-5 log replayed")
@pytest.mark.parametrize("rounds", [3, pytest.param(12, marks=pytest.mark.slow)])
def test_raid5_log_replay_after_sigkill_under_fio_load(
        vmd_factory: Callable[..., VmdDaemon], tmp_path: Path, rounds: int) -> None:
    import subprocess

    size = 32 * MiB
    tail = 2 * MiB  # the acknowledged writer's; fio writes the rest
    vmd = vmd_factory(volumes={"r5": raid5_spec(size="32MiB")}).start()
    vf = vmd.volume_file("r5")
    cols = [vmd.path(f"r5-c{i}.img") for i in range(3)]
    replayed = 0
    for rnd in range(rounds):
        fio = subprocess.Popen(
            ["fio", "--name=r5load", f"--filename={vf}", "--direct=1", "--ioengine=psync",
             "--rw=randwrite", "--bssplit=4k/50:12k/20:64k/20:1m/10", "--numjobs=2",
             f"--size={size - tail}", "--time_based=1", "--runtime=120s",
             # A job that opens the file only after the kill must fail, not
             # create a file in the bare mountpoint and write it for 120 s.
             "--allow_file_create=0",
             f"--randseed={rnd}", "--output=/dev/null"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            w = AckedWriter(vf, size - tail, tail // AckedWriter.SLOT, seed=rnd)
            start = r5log_commits(vmd)
            # Both of fio's jobs writing, not only the first: on a busy
            # machine the second one was still starting when the RAID-5
            # log had its 100 commits (CI, 2026-12-01).
            wait_for(lambda: r5log_commits(vmd) > start + 100 and w.count > 20
                     and processes_with_open(fio.pid, vf) >= 2, 60,
                     "fio's two jobs and the writer to get going")
            vmd.kill()
            try:
                fio.wait(timeout=60)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"round {rnd}: fio did not end after the daemon was "
                                     f"killed; where it waits:\n{where_stuck(fio.pid)}\n"
                                     f"mounted: {is_mounted(str(vmd.mountpoint))}") from None
            w.thread.join(timeout=60)
        finally:
            if fio.poll() is None:
                fio.kill()
                fio.wait()
        vmd.start()
        st = vmd.status("r5")
        assert not st["degraded"], st
        replayed += st["replayed_entries"]
        w.check(vf)
        # The replay left every stripe's parity matching its data (the
        # daemon is idle: the column files hold what it wrote).
        assert xor_is_zero(cols), f"round {rnd}: parity does not match the data"
        assert decoded_sha256(cols, SU) == file_sha(vf), f"round {rnd}: decode differs"
        print(f"round {rnd}: {st['replayed_entries']} log entries replayed, "
              f"{w.count} acknowledged writes")
    assert replayed > 0, "no round had a log entry to replay: the kills missed the load"
    vmd.stop()
    assert xor_is_zero(cols)


@pytest.mark.allow_log(r"plex c1 is IOFAIL: cannot open image .* it must be")
def test_column_verbs_and_sizes_are_refused_with_the_column_size(
        vmd_factory: Callable[..., VmdDaemon], tmp_path: Path) -> None:
    vmd = vmd_factory(volumes={"r5": raid5_spec(size="4MiB", r5log=False)}).start()
    wrong = tmp_path / "wrong.img"
    with open(wrong, "wb") as f:
        f.truncate(3 * MiB)
    # plex add is refused for what it is, before the image is looked at.
    p = vmd.cli("plex", "add", "r5", str(wrong), check=False)
    assert p.returncode != 0 and "RAID-5: it has columns, not plexes" in p.stderr, p.stderr
    vmd.cli("plex", "detach", "r5", "c2")
    p = vmd.cli("plex", "replace", "r5", "c2", str(wrong), check=False)
    assert p.returncode != 0, p.stderr
    assert f"{wrong} is {3 * MiB} bytes, a column of volume r5 (size / (columns - 1)) is " \
           f"{2 * MiB} bytes" in p.stderr, p.stderr
    vmd.cli("plex", "attach", "r5", "c2")
    vmd.wait_resync("r5")
    vmd.stop()
    os.truncate(vmd.path("r5-c1.img"), 4 * MiB)  # the volume's size, not a column's
    # An existing volume's image of another size fails that column at start
    # (naming both sizes) and the volume serves degraded: one bad image must
    # not keep the daemon from starting (tests/test_short_image.py).
    vmd.start()
    c1 = next(c for c in vmd.status("r5")["columns"] if c["name"] == "c1")
    assert c1["state"] == "IOFAIL" and f"is {4 * MiB} bytes, it must be {2 * MiB} bytes" in \
        c1["reason"], c1


@pytest.mark.allow_log(r"column c1 gets a full rebuild", r"is IOFAIL|is DETACHED")
def test_a_new_disk_mounted_where_the_column_was_takes_its_place_under_the_same_path(
        vmd_factory: Callable[..., VmdDaemon]) -> None:
    """The column's disk died; a new one is mounted at the same place. `plex
    replace r5 c1 SAME-PATH` was refused ("is already plex c1") and `plex
    attach` said "No such file": only an undocumented truncate worked."""
    d = vmd_factory(volumes={"r5": raid5_spec("r5", size="8MiB")})
    d.start()
    data = os.urandom(8 * MiB)
    with open(d.volume_file("r5"), "r+b") as f:
        f.write(data)
        os.fsync(f.fileno())
    c1 = d.path("r5-c1.img")
    p = d.cli("plex", "replace", "r5", "c1", str(c1), check=False)
    assert p.returncode != 0 and "not detached or failed" in p.stderr, p  # while it is in
    d.cli("plex", "detach", "r5", "c1")
    c1.unlink()  # the disk is gone; the new one, empty, is mounted there
    d.cli("plex", "replace", "r5", "c1", str(c1))
    d.cli("wait", "r5")
    assert column(d.status("r5"), "c1")["state"] == "ACTIVE"
    with open(d.volume_file("r5"), "rb") as f:
        assert f.read() == data
    d.stop()
    assert xor_is_zero([d.path(f"r5-c{i}.img") for i in range(3)])
