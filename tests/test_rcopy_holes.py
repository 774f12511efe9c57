"""Remote Copy full updates skip holes (issue 17): the source's holes go as
zero-range frames, the receiver punches them under the same undo journal as
data, and an update killed mid-transfer rolls punched ranges back too."""

from __future__ import annotations

import os
import random
import struct
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import MiB, VmdDaemon, pwrite_file, wait_for
from rcopy_relay import Relay
from test_rcopy import (FAILED, R, SIZE, assert_b_equals, image, journal, make_pair, receive,
                        rstatus, start_sync, sync)
from vmd import rcopy_proto as P
from vmd.errors import EXIT_ERROR
from vmd.plex import punch_hole

pytestmark = pytest.mark.mount

# A source's allocation may differ from the bytes it holds by a block or so per
# range (ext4 allocates whole blocks): the frames' headers and that slack.
SLACK = 64 * 1024


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def write_regions(d: VmdDaemon, rng: random.Random, regions: list[int]) -> None:
    pwrite_file(d.volume_file(), [(r * R, rng.randbytes(R)) for r in regions])


def punch_offline(a: VmdDaemon, off: int, length: int) -> None:
    """Holes where A held data: punched into both of A's (stopped) plex images,
    which stay identical; A's change map is then dropped (fastresync off), so
    that the next update is a full one."""
    for p in a.plex_paths():
        fd = os.open(p, os.O_RDWR)
        try:
            punch_hole(fd, off, length)
            os.fsync(fd)
        finally:
            os.close(fd)


def full_update_next(a: VmdDaemon) -> None:
    a.config["volumes"]["vol0"]["fastresync"] = False  # the change map goes: full updates
    a.write_config()


def assert_b_sparse(a: VmdDaemon, b: VmdDaemon) -> None:
    src = allocated(a.plex_paths()[0])
    for p in b.plex_paths():
        assert allocated(p) <= src * 1.05 + R, (f"B plex {p.name} allocates {allocated(p)} "
                                                 f"bytes, A's {src}")


@pytest.mark.allow_log(*FAILED)
def test_full_update_of_mostly_empty_volume(vmd_factory: Callable[..., VmdDaemon],
                                            tmp_path: Path) -> None:
    a, b = make_pair(vmd_factory, tmp_path)
    rng = random.Random(17)
    nreg = SIZE // R
    picks = rng.sample(range(nreg), nreg // 20)  # 5 % of the volume
    write_regions(a, rng, picks)
    # B held data of its own (before it was a target) where A has holes: zeros after.
    b_own = [r for r in rng.sample(range(nreg), 64) if r not in picks]
    write_regions(b, rng, b_own)
    src = allocated(a.plex_paths()[0])
    t0 = time.monotonic()
    reply = sync(a)
    secs = time.monotonic() - t0
    print(f"\nfull update of a {SIZE >> 20} MiB volume, {src} bytes allocated: "
          f"{reply['sent_bytes']} bytes sent, {reply['zero_bytes']} as zero ranges, {secs:.2f} s")
    assert reply["full"], reply
    assert len(picks) * R <= reply["sent_bytes"] <= src + SLACK, (reply, src)
    assert reply["sent_bytes"] + reply["zero_bytes"] == SIZE, reply
    assert_b_equals(b, image(a))
    assert_b_sparse(a, b)
    last = rstatus(a)["last_update"]
    assert last["sent_bytes"] == reply["sent_bytes"] and last["zero_bytes"] == reply["zero_bytes"]

    # An incremental update sends whole changed regions, as before.
    more = rng.sample([r for r in range(nreg) if r not in picks], 8)
    write_regions(a, rng, more)
    reply = sync(a)
    assert not reply["full"] and reply["sent_bytes"] == len(more) * R and not reply["zero_bytes"]
    assert_b_equals(b, image(a))


def test_dense_switch(vmd_factory: Callable[..., VmdDaemon], tmp_path: Path,
                      monkeypatch: pytest.MonkeyPatch) -> None:
    """VMD_RCOPY_DENSE=1 on the sender: every byte is sent (benchmarks compare it)."""
    monkeypatch.setenv("VMD_RCOPY_DENSE", "1")
    a, b = make_pair(vmd_factory, tmp_path)
    write_regions(a, random.Random(3), [5, 700])
    reply = sync(a)
    assert reply["full"] and reply["sent_bytes"] == SIZE and reply["zero_bytes"] == 0, reply
    assert_b_equals(b, image(a))


@pytest.mark.allow_log(*FAILED, r"was not stopped cleanly", r"closed the connection",
                       r"change map was dropped")
def test_full_update_punches_and_rolls_back(vmd_factory: Callable[..., VmdDaemon],
                                            tmp_path: Path) -> None:
    relay = Relay(tmp_path / "relay")
    a, b = make_pair(vmd_factory, tmp_path, relay)
    rng = random.Random(29)
    # [0, 1 MiB) and [9, 40 MiB) stay data; [1, 9 MiB) becomes a hole on A.
    pwrite_file(a.volume_file(), [(0, rng.randbytes(40 * MiB))])
    sync(a)
    good = image(a)
    assert_b_equals(b, good)
    seq = rstatus(b)["sequence"]
    a.stop()
    punch_offline(a, 1 * MiB, 8 * MiB)
    full_update_next(a)
    a.start()
    want = image(a)
    assert want[MiB:9 * MiB] == bytes(8 * MiB) and want[:MiB] == good[:MiB]

    # SIGKILL of B once it punched [1, 9 MiB) and took some data after it: at its
    # start the undo journal puts the old bytes back, the punched ones included.
    relay.hold_after(6 * MiB)
    p = start_sync(a)
    relay.wait_held(p)
    wait_for(lambda: image(b)[MiB:9 * MiB] == bytes(8 * MiB),
             what="B to punch the holes of the full update")
    assert journal(b).exists()
    b.kill()
    out, err = p.communicate(timeout=60)
    assert p.returncode != 0, (out, err)
    b.start()
    wait_for(lambda: not rstatus(b)["syncing"], what="B to settle after its restart")
    assert rstatus(b)["sequence"] == seq
    assert_b_equals(b, good)
    assert not journal(b).exists()

    relay.release()
    reply = sync(a)
    assert reply["full"] and reply["zero_bytes"] >= 8 * MiB, reply
    assert reply["sent_bytes"] <= allocated(a.plex_paths()[0]) + SLACK, reply
    assert_b_equals(b, want)
    assert_b_sparse(a, b)


@pytest.mark.allow_log(*FAILED)
def test_zero_frames_checked(vmd_factory: Callable[..., VmdDaemon], tmp_path: Path) -> None:
    """A zero-range frame is refused clearly in a version-2 stream, outside the
    volume, or with a bad length; B is unchanged. A good one is punched."""
    a, b = make_pair(vmd_factory, tmp_path)
    pwrite_file(a.volume_file(), [(0, random.Random(1).randbytes(4 * MiB))])
    sync(a)
    before = image(b)
    seq = rstatus(b)["sequence"]
    uuid = a.status("vol0")["uuid"]

    def stream(version: int, *frames: bytes, zero_bytes: int = 0, records: int = 1) -> bytes:
        h = {"volume": "vol0", "uuid": uuid, "size": SIZE, "region": R, "seq": seq + 1,
             "base": seq, "full": True, "time": time.time()}
        end = {"records": records, "bytes": 0, "zero_bytes": zero_bytes}
        return (P.preamble(version) + P.json_frame(P.HEADER, h) + b"".join(frames)
                + P.json_frame(P.END, end))

    z = P.zero_frame(MiB, MiB)
    cases = {
        "in a stream of protocol version 2": stream(2, z, zero_bytes=MiB),
        "outside volume": stream(3, P.zero_frame(SIZE - MiB, 2 * MiB), zero_bytes=2 * MiB),
        "zero-range frame of 8 bytes": stream(3, P.frame(P.ZERO, struct.pack("<Q", 0))),
        "zero bytes, the stream held": stream(3, z, zero_bytes=1),
    }
    for what, data in cases.items():
        p = receive(b, data)
        assert p.returncode == EXIT_ERROR, (what, p)
        assert what in p.stderr.decode(), (what, p.stderr)
        assert image(b) == before and image(b, 1) == before, f"B changed after {what!r}"
    p = receive(b, stream(3, z, zero_bytes=MiB))
    assert p.returncode == 0, p.stderr
    want = before[:MiB] + bytes(MiB) + before[2 * MiB:]
    assert_b_equals(b, want)
    assert rstatus(b)["sequence"] == seq + 1
