"""The one shape of the daemon's long-lived jobs (after S3QL's mount.py:
`CommitTask` has `run()` and `stop()`, the mount starts it and registers
`cm.callback(commit_task.stop)` on its exit stack).

A `Task` is an object with `async run(task_status)` and `async stop()`:

    task = Sender(link)
    await nursery.start(task.run)                # returns once it really runs
    stops.push_async_callback(task.stop)         # the daemon's stop stack

`run` calls `task_status.started()` once the job serves (what "started" means
is the job's: rolled back its journal, bound its socket...); an error before
that fails the `start`, the daemon's start with it. `stop` ends the job and
returns once it has ended, its clean-up done (by default: cancel, and wait).
A `TaskGroup` is a task that runs others: a feature's periodic tasks and the
`Job`s its admin verbs start on demand, stopped together; `call(job)` starts
a job and hands its result (or its error) to the verb that waits for it.

The engine's own tasks (a volume's DRL committer and cleaner, its resync)
have the same shape and are started and stopped by their volume.
"""

from __future__ import annotations

import logging
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import trio

from .errors import VmdError

log = logging.getLogger(__name__)

T = TypeVar("T")
STOPPING = "the daemon is stopping"


@runtime_checkable
class Stoppable(Protocol):
    """What the daemon needs of a long-lived job."""

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None: ...

    async def stop(self) -> None: ...


class Task:
    """A long-lived job: subclasses write `main`; `stop` cancels it and waits
    (override it for a gentler end, e.g. telling the kernel to unmount)."""

    name = "task"

    def __init__(self) -> None:
        self._scope = trio.CancelScope()
        self._began = False
        self._ended = trio.Event()

    async def main(self, task_status: Any) -> None:
        """The job: call `task_status.started()` once it really runs."""
        raise NotImplementedError

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        if self._began:
            raise RuntimeError(f"{self.name}: a task runs once")
        self._began = True
        try:
            with self._scope:
                await self.main(task_status)
        finally:
            self._ended.set()

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    @property
    def cancelled(self) -> bool:
        """Its stop (or cancel) was called: it is ending or has ended by it."""
        return self._scope.cancel_called

    def cancel(self) -> None:
        """End it without waiting: for a caller the task may be waiting on."""
        self._scope.cancel()

    async def wait_ended(self) -> None:
        if self._began:
            await self._ended.wait()

    async def stop(self) -> None:
        self.cancel()
        await self.wait_ended()


class Job(Task, Generic[T]):
    """A task with a result, started on demand (an admin verb) and waited for
    by `TaskGroup.call`. Its error is its caller's, not the group's: one
    failed update does not take the daemon down."""

    def __init__(self) -> None:
        super().__init__()
        self._value: T | None = None
        self._error: Exception | None = None

    async def work(self) -> T:
        raise NotImplementedError

    async def main(self, task_status: Any) -> None:
        task_status.started()
        try:
            self._value = await self.work()
        except Exception as e:  # trio.Cancelled is no Exception: the scope takes it
            self._error = e

    def result(self) -> T:
        if self._error is not None:
            raise self._error
        if self.cancelled and self._value is None:
            raise VmdError(f"cancelled: {STOPPING}")
        return self._value  # type: ignore[return-value]


class TaskGroup(Task):
    """Tasks started and stopped together. `stop` refuses new tasks, stops
    every running one (at once: each waits for its own clean-up, e.g. a
    receiver rolling its update back) and returns when all have ended."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.tasks: set[Task] = set()
        self.stopping = False
        self._nursery: trio.Nursery | None = None

    async def starting(self) -> None:
        """Work done before the group counts as started (its first tasks)."""

    async def main(self, task_status: Any) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self.starting()
            task_status.started()
            await trio.sleep_forever()

    def refuse_if_stopping(self) -> None:
        if self.stopping or self._nursery is None:
            raise VmdError(STOPPING)

    async def start(self, task: Task) -> None:
        """Start `task` in the group; returns once it runs."""
        self.refuse_if_stopping()
        assert self._nursery is not None
        self.tasks.add(task)
        try:
            await self._nursery.start(self._member, task, name=f"{self.name}: {task.name}")
        except BaseException:
            self.tasks.discard(task)
            raise

    async def _member(self, task: Task, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await task.run(task_status=task_status)
        finally:
            self.tasks.discard(task)

    async def call(self, job: Job[T]) -> T:
        """Run `job` in the group and return its result. A caller cancelled
        while it waits takes its job with it (as if the job ran in the
        caller), once the job's clean-up is done."""
        await self.start(job)
        try:
            await job.wait_ended()
        finally:
            if not job.ended:
                job.cancel()
                with trio.CancelScope(shield=True):
                    await job.wait_ended()
        return job.result()

    async def stop(self) -> None:
        self.stopping = True
        async with trio.open_nursery() as nursery:
            for task in list(self.tasks):
                nursery.start_soon(task.stop)
        await super().stop()
