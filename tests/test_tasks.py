"""The one shape of a background task (vmd/tasks.py): started with
`nursery.start` once it really runs, `stop` returns once it has ended (its
clean-up done), a group stops its tasks together and refuses new ones, and a
job's result or error goes to the verb that waits for it."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from vmd.daemon import FuseSession
from vmd.errors import VmdError
from vmd.manager import VolumeWork
from vmd.notify import Notifier
from vmd.rcopy_tasks import Receive, Sender, Update
from vmd.rcopy_verbs import Engine
from vmd.resync import Resync
from vmd.tasks import Job, Stoppable, Task, TaskGroup
from vmd.verify import Verify
from vmd.verify_verbs import Verifies


class Worker(Task):
    """Logs what it does; its clean-up takes a checkpoint, shielded, like a
    receiver rolling an update back."""

    def __init__(self, log: list[str], name: str = "w"):
        super().__init__()
        self.log = log
        self.name = name

    async def main(self, task_status: Any) -> None:
        self.log.append(f"{self.name} set up")
        await trio.sleep(0)
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await trio.sleep(0)
                self.log.append(f"{self.name} cleaned up")


class Answer(Job[int]):
    def __init__(self, gate: trio.Event, value: int | Exception):
        super().__init__()
        self.gate = gate
        self.value = value
        self.cleaned = False

    async def work(self) -> int:
        try:
            await self.gate.wait()
        finally:
            self.cleaned = True
        if isinstance(self.value, Exception):
            raise self.value
        return self.value


def test_daemon_tasks_have_the_shape() -> None:
    for cls in (Task, TaskGroup, Engine, Sender, Update, Receive, VolumeWork, FuseSession, Resync,
                Notifier, Verify, Verifies):
        assert issubclass(cls, Stoppable), f"{cls.__name__} lacks run(task_status)/stop()"
    # The verbs' on-demand work runs in its feature's group, as a job.
    assert issubclass(Verify, Job) and issubclass(Verifies, TaskGroup)
    assert issubclass(Update, Job) and issubclass(Receive, Job) and issubclass(Engine, TaskGroup)


async def test_start_returns_once_running_and_stop_once_ended() -> None:
    log: list[str] = []
    async with trio.open_nursery() as nursery:
        w = Worker(log)
        await nursery.start(w.run)
        assert log == ["w set up"]
        await w.stop()
        assert log == ["w set up", "w cleaned up"] and w.ended
        await w.stop()  # a second stop is harmless
    await Worker(log).stop()  # so is the stop of a task that never ran


async def test_group_stops_its_tasks_together_and_refuses_new_ones() -> None:
    log: list[str] = []
    async with trio.open_nursery() as nursery:
        group = TaskGroup("g")
        await nursery.start(group.run)
        for n in ("a", "b"):
            await group.start(Worker(log, n))
        with trio.fail_after(5):
            await group.stop()
        assert sorted(log) == ["a cleaned up", "a set up", "b cleaned up", "b set up"]
        assert group.ended and not group.tasks
        with pytest.raises(VmdError, match="the daemon is stopping"):
            await group.start(Worker(log, "c"))


async def test_call_hands_the_job_result_or_error_to_its_caller() -> None:
    async with trio.open_nursery() as nursery:
        group = TaskGroup("g")
        await nursery.start(group.run)
        go = trio.Event()
        go.set()
        assert await group.call(Answer(go, 7)) == 7
        with pytest.raises(VmdError, match="refused"):
            await group.call(Answer(go, VmdError("refused")))
        assert not group.ended  # a failed job is its caller's, not the group's
        group.cancel()


async def test_group_stop_ends_a_waiting_call_with_an_error() -> None:
    async with trio.open_nursery() as nursery:
        group = TaskGroup("g")
        await nursery.start(group.run)
        job = Answer(trio.Event(), 1)
        out: list[BaseException] = []

        async def caller() -> None:
            try:
                await group.call(job)
            except VmdError as e:
                out.append(e)

        nursery.start_soon(caller)
        await trio.testing.wait_all_tasks_blocked()
        await group.stop()
        await trio.testing.wait_all_tasks_blocked()
        assert job.cleaned and [str(e) for e in out] == ["cancelled: the daemon is stopping"]


async def test_a_cancelled_caller_takes_its_job_with_it() -> None:
    async with trio.open_nursery() as nursery:
        group = TaskGroup("g")
        await nursery.start(group.run)
        job = Answer(trio.Event(), 1)
        scope = trio.CancelScope()

        async def caller() -> None:
            with scope:
                await group.call(job)

        nursery.start_soon(caller)
        await trio.testing.wait_all_tasks_blocked()
        scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert job.ended and job.cleaned and not group.tasks
        group.cancel()
