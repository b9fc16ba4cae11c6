"""``conductor worker``: the reference external executor, a separate process watching the handoff folder.

Each pass (``process_once``) reaps expired leases, then claims one pending task by atomic rename and runs
the configured command on it. ``run(burst=True)`` drains the queue and returns; ``run()`` waits for new
tasks with watchdog and a fallback poll until ``stop`` is set.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass
from pathlib import Path

from conductor.attempts import prepare_retry
from conductor.audit import AuditLog
from conductor.executors.base import StepRunner, execute_claim
from conductor.keys import SigningKey
from conductor.handoff.lease import claim_task, holder_name
from conductor.handoff.reaper import reap_expired
from conductor.handoff.watcher import FolderWatcher
from conductor.layout import ForkLayout, ProjectLayout
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

    def forks(self) -> list[ForkLayout]:
        """Every fork folder this worker serves."""
        plans = [self.settings.plan_id] if self.settings.plan_id else self.layout.plan_ids()
        forks = []
        for plan_id in plans:
            for folder in sorted(self.layout.plan_dir(plan_id).glob("fork_*")):
                forks.append(self.layout.fork(plan_id, folder.name[5:]))
        return forks

    def _log(self, fork: ForkLayout) -> AuditLog:
        if fork.audit_log not in self._logs:
            self._logs[fork.audit_log] = AuditLog(fork.audit_log)
        return self._logs[fork.audit_log]

    def reap(self) -> None:
        for fork in self.forks():
            reap_expired(
                fork,
                max_attempts=self.settings.max_attempts,
                lease_seconds=self.settings.lease_seconds,
                on_event=self._log(fork).append,
                prepare_retry=lambda task: prepare_retry(self.layout, task),
            )

    def process_once(self) -> int:
        """Claim and run at most one pending task. Returns 1 if it claimed one, else 0."""
        candidates = [(fork, task_id) for fork in self.forks() for task_id in fork.task_ids("pending")]
        # Racing workers that all start at the first name collide on every claim; a random start spreads them.
        if candidates:
            start = random.randrange(len(candidates))
            candidates = candidates[start:] + candidates[:start]
        for fork, task_id in candidates:
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
        return 0

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
        with FolderWatcher([self.layout.handoff_dir]) as watcher:
            self._watcher = watcher
            while not stop.is_set():
                if max_tasks is not None and self.processed >= max_tasks:
                    break
                if self.process_once():
                    continue
                if burst:
                    break
                watcher.wait(self.settings.poll_seconds)
                if not stop.is_set():
                    self.reap()
        return self.processed
