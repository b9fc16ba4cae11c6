"""``conductor worker``: the reference external executor, a separate process watching the handoff folder.

Each pass (``process_once``) claims one pending task by atomic rename and runs the configured command on
it. ``run(burst=True)`` drains the queue and returns; ``run()`` waits for new tasks until ``stop`` is set.

The pending folders are listed once and the list is worked through until it is empty (a task another
worker took meanwhile costs one failed rename), then listed again: a pass never rescans a folder of
thousands of tasks. An idle worker sleeps until a task file appears in a ``pending/`` folder (watchdog),
with a fallback poll every ``poll_seconds``; it reaps expired leases when it starts and then at most once
per ``poll_seconds`` while idle, never between a wake-up and its claim.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from conductor.attempts import RetryFolders, prepare_retry
from conductor.audit import AuditLog
from conductor.executors.base import StepRunner, execute_claim
from conductor.fsutil import entry_names
from conductor.handoff.lease import claim_task, holder_name
from conductor.handoff.reaper import reap_expired
from conductor.handoff.watcher import FolderWatcher, task_arrival
from conductor.keys import SigningKey
from conductor.layout import TASK_SUFFIX, ForkLayout, ProjectLayout
from conductor.recovery import recover_project


@dataclass(frozen=True)
class WorkerSettings:
    """How a worker behaves (seconds throughout)."""

    lease_seconds: float = 60.0
    heartbeat_seconds: float = 10.0
    max_attempts: int = 3
    poll_seconds: float = 2.0
    plan_id: str | None = None  # only this plan's tasks; None = every plan


class Worker:
    """Claims and runs tasks from every fork of a project's handoff folder."""

    def __init__(self, layout: ProjectLayout, runner: StepRunner, settings: WorkerSettings, *, ignore: list[str],
                 signer: SigningKey | None = None) -> None:
        self.layout = layout
        self.runner = runner
        self.settings = settings
        self.signer = signer  # signs each task's provenance envelope; None leaves it unsigned
        self.ignore = ignore
        self.holder = holder_name("conductor-worker")
        self.processed = 0
        self._stop = threading.Event()
        self._watcher: FolderWatcher | None = None
        self._logs: dict[Path, AuditLog] = {}
        self._queue: deque[tuple[ForkLayout, str]] = deque()
        self._reaped_at = float("-inf")  # time.monotonic() of the last reap

    def forks(self) -> list[ForkLayout]:
        """Every fork folder this worker serves (listed now)."""
        if self.settings.plan_id:
            plans = [self.settings.plan_id]
        else:  # as ProjectLayout.plan_ids, without a glob
            plans = sorted(name[len("plan_"):] for name in entry_names(self.layout.handoff_dir, dirs=True)
                           if name.startswith("plan_") and (self.layout.handoff_dir / name / "plan.json").is_file())
        return [self.layout.fork(plan_id, name[len("fork_"):]) for plan_id in plans
                for name in sorted(entry_names(self.layout.plan_dir(plan_id), dirs=True)) if name.startswith("fork_")]

    def _log(self, fork: ForkLayout) -> AuditLog:
        if fork.audit_log not in self._logs:
            self._logs[fork.audit_log] = AuditLog(fork.audit_log, cut_torn_tail=True)
        return self._logs[fork.audit_log]

    def reap(self) -> None:
        """Re-queue (or fail) the tasks of every fork whose lease is over."""
        self._reaped_at = time.monotonic()
        for fork in self.forks():
            reap_expired(
                fork,
                max_attempts=self.settings.max_attempts,
                lease_seconds=self.settings.lease_seconds,
                on_event=self._log(fork).append,
                prepare_retry=RetryFolders(self.layout),
            )

    def process_once(self) -> int:
        """Claim and run at most one pending task. Returns 1 if it claimed one, else 0.

        Candidates come from the last listing of the pending folders; when it is used up the folders are
        listed again, once per call.
        """
        listed = False
        while True:
            if not self._queue:
                if listed:
                    return 0
                self._queue.extend(self._pending())
                listed = True
                continue
            fork, task_id = self._queue.popleft()
            log = self._log(fork)
            claim = claim_task(fork, task_id, holder=self.holder, lease_seconds=self.settings.lease_seconds,
                               on_event=log.append)
            if claim is None:
                continue
            result = execute_claim(self.layout, claim, self.runner, ignore=self.ignore,
                                   lease_seconds=self.settings.lease_seconds,
                                   heartbeat_seconds=self.settings.heartbeat_seconds, on_event=log.append,
                                   stop=self._stop, prepare_retry=lambda task: prepare_retry(self.layout, task),
                                   signer=self.signer)
            if result is not None:  # released or abandoned tasks were not run to the end
                self.processed += 1
            return 1

    def _pending(self) -> list[tuple[ForkLayout, str]]:
        """Every pending task of every fork, in name order from a random starting point: racing workers
        that all started at the first name would collide on every claim."""
        candidates = [(fork, name[: -len(TASK_SUFFIX)]) for fork in self.forks()
                      for name in sorted(entry_names(fork.state_dir("pending"))) if name.endswith(TASK_SUFFIX)]
        if candidates:
            start = random.randrange(len(candidates))
            candidates = candidates[start:] + candidates[:start]
        return candidates

    @property
    def stop_requested(self) -> bool:
        """True once :meth:`request_stop` was called (or the ``stop`` event given to :meth:`run` is set)."""
        return self._stop.is_set()

    def request_stop(self) -> None:
        """Ask the worker to stop (safe from a signal handler): a running command's process group is
        killed and its task released; an idle wait ends at once."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.notify()

    def run(self, *, burst: bool = False, stop: threading.Event | None = None, max_tasks: int | None = None) -> int:
        """Work until stopped (or, with ``burst``, until no pending task is left).

        Returns:
            The number of tasks this worker ran.
        """
        stop = self._stop = stop or self._stop
        recover_project(self.layout, plan_id=self.settings.plan_id)
        self.reap()
        if burst:  # it never waits: no watcher (its thread would handle every event of every worker)
            while not stop.is_set() and (max_tasks is None or self.processed < max_tasks) and self.process_once():
                pass
            return self.processed
        # Only creations and moves are asked of the kernel: the writes, opens and closes of every other
        # worker's files would otherwise be delivered to this one, each handled in Python.
        with FolderWatcher([self.layout.handoff_dir], relevant=task_arrival, kinds=("created", "moved")) as watcher:
            self._watcher = watcher
            while not stop.is_set():
                if max_tasks is not None and self.processed >= max_tasks:
                    break
                if self.process_once():
                    continue
                if time.monotonic() - self._reaped_at >= self.settings.poll_seconds:
                    self.reap()  # idle: the moment to look for expired leases
                    continue
                watcher.wait(max(0.0, self._reaped_at + self.settings.poll_seconds - time.monotonic()))
        return self.processed
