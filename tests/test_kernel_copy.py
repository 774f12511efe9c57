"""Resync copies in the kernel (copy_file_range) between image files on one
filesystem (vmd/plex.py `Plex._kernel_copy_sync`): one page-cache copy instead
of a pread and a pwrite through a buffer. Holes are still skipped and punched;
an error of the kernel copy, which cannot say whether the source or the target
failed, is met again by the buffered copy, which fails the right plex; another
filesystem falls back to the buffered copy. All on real files: ext4 under the
test directory, a tiny ext4 of its own that really runs out of space, tmpfs.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import MiB, SysResources
from enginekit import running_volume, volume_config
from fastresynckit import Ref, assert_plexes_identical
from test_holes import assert_sparse_copy, data_bytes, garbage, tmpfs, write_scattered
from vmd.resync import COPIES
from vmd.sidecar import ACTIVE, IOFAIL


class CopySpy:
    """Wraps os.copy_file_range: the bytes it copied and the errors it raised,
    and (with `fail`) an error injected into chosen calls after a partial copy."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch,
                 fail: Callable[[int], bool] = lambda call: False):
        self.real = os.copy_file_range
        self.fail = fail
        self.calls = 0
        self.copied = 0
        self.errors: list[int] = []
        monkeypatch.setattr(os, "copy_file_range", self)

    def __call__(self, src: int, dst: int, count: int, offset_src: int, offset_dst: int) -> int:
        self.calls += 1
        try:
            if self.fail(self.calls):
                # Half of it reaches the target first, as a real error may.
                self.real(src, dst, count // 2, offset_src, offset_dst)
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            n = self.real(src, dst, count, offset_src, offset_dst)
        except OSError as e:
            self.errors.append(e.errno or 0)
            raise
        self.copied += n
        return n


async def test_full_resync_copies_in_the_kernel_and_keeps_holes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    size = 64 * MiB
    vc = volume_config(tmp_path, size=size, nplex=2)
    ref = write_scattered(vc.plexes[0], size, random.Random(1801), 30)
    garbage(vc.plexes[1], size)  # old data where p0 has holes: punched
    spy = CopySpy(monkeypatch)
    async with running_volume(vc, recover_all=True, recover_from="p0") as vol:
        await vol.resync.wait_idle()
        assert [p.state for p in vol.plexes] == [ACTIVE, ACTIVE]
        copied = vol.resync.copied_bytes
    assert copied == data_bytes(vc.plexes[0])
    assert spy.errors == []
    assert spy.copied == copied, "not every allocated byte was copied in the kernel"
    assert_sparse_copy(vc.plexes[0], vc.plexes[1], ref)


async def test_kernel_copy_error_is_copied_again_through_the_buffer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An error the kernel copy cannot attribute fails no plex when the
    buffered copy of the same range succeeds, and its half-copied range is
    rewritten whole."""
    size = 32 * MiB
    vc = volume_config(tmp_path, size=size, nplex=2)
    ref = write_scattered(vc.plexes[0], size, random.Random(1802), 20)
    garbage(vc.plexes[1], size)
    spy = CopySpy(monkeypatch, fail=lambda call: call % 2 == 0)
    async with running_volume(vc, recover_all=True, recover_from="p0") as vol:
        await vol.resync.wait_idle()
        assert [p.state for p in vol.plexes] == [ACTIVE, ACTIVE]
    assert spy.errors and set(spy.errors) == {errno.EIO}, spy.errors
    assert_sparse_copy(vc.plexes[0], vc.plexes[1], ref)


@pytest.mark.mount
@pytest.mark.allow_log(r"plex p1 .* is now IOFAIL", r"No space left on device")
async def test_target_out_of_space_mid_kernel_copy_fails_it_not_the_source(
        tmp_path: Path, sysres: SysResources, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both images on one tiny ext4 (a kernel copy needs one filesystem): the
    new plex runs out of space in the middle of the copy. It is failed with
    ENOSPC; the source stays ACTIVE and intact."""
    small = tmp_path / "small"
    sysres.make_ext4_image(tmp_path / "small.img", 40 * MiB, small)
    size = 32 * MiB
    # The sidecar log elsewhere: the full filesystem must fail the plex only.
    vc = dataclasses.replace(volume_config(small, size=size, nplex=1), log=tmp_path / "vol0.log")
    data = random.Random(1803).randbytes(20 * MiB)  # with the copy, more than fits
    with open(vc.plexes[0], "wb") as f:
        f.write(data)
        f.truncate(size)
    ref = Ref(size)
    ref.write(0, data)
    spy = CopySpy(monkeypatch)
    async with running_volume(vc, recover_all=True, recover_from="p0") as vol:
        await vol.add_plex(str(small / "new.img"))
        await vol.resync.wait_idle()
        p0, p1 = vol.plexes
        assert (p0.state, p1.state) == (ACTIVE, IOFAIL), [p0.state, p1.state]
        assert "No space left" in p1.record.reason, p1.record.reason
        assert await vol.pread(0, len(data)) == data
    assert errno.ENOSPC in spy.errors, "the kernel copy never met the full filesystem"
    assert spy.copied > 0
    assert_plexes_identical([vc.plexes[0]], ref)


@pytest.mark.mount
async def test_target_on_another_filesystem_is_copied_through_the_buffer(
        tmp_path: Path, sysres: SysResources, monkeypatch: pytest.MonkeyPatch) -> None:
    fs = tmpfs(sysres, tmp_path / "tmpfs")
    size = 32 * MiB
    vc = volume_config(tmp_path, size=size, nplex=1)
    ref = write_scattered(vc.plexes[0], size, random.Random(1804), 10)
    spy = CopySpy(monkeypatch)
    target = fs / "copy.img"
    async with running_volume(vc, recover_all=True, recover_from="p0") as vol:
        await vol.add_plex(str(target))
        await vol.resync.wait_idle()
        assert [p.state for p in vol.plexes] == [ACTIVE, ACTIVE]
        assert not vol.plexes[1]._kernel_copy  # EXDEV: not tried again
    # Chunks copied at once may each meet EXDEV before the first one says so.
    assert 1 <= spy.calls <= COPIES and set(spy.errors) == {errno.EXDEV}, spy.errors
    assert spy.copied == 0
    assert_sparse_copy(vc.plexes[0], target, ref)
