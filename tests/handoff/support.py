"""Builders and small utilities of the handoff-protocol tests.

:func:`make_handoff` prepares a real project on disk without the engine or any LLM: ``init_project``, a
hand-built :class:`~conductor.models.Plan` with N independent steps in one fork (``create_plan`` +
``ensure_forks``), and, per step, an attempt workspace (``prepare_workspace``) and a task published
with ``publish_task`` exactly as ``Engine._publish`` builds it.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conductor.attempts import prepare_workspace
from conductor.canonical import digest
from conductor.handoff.documents import read_document
from conductor.handoff.publish import publish_task
from conductor.layout import STATES, ForkLayout, ProjectLayout
from conductor.models import (
    Confidence,
    EffectivePolicy,
    ForkSpec,
    Lease,
    Plan,
    PlannerInfo,
    PolicyLayer,
    Result,
    StepSpec,
    Strategy,
    Task,
    utc_now,
)
from conductor.plan_store import create_plan, ensure_forks
from conductor.project import init_project
from tests.helpers.fork_state import fork_head, fork_text

PLAN_ID = "20260101T000000Z-handoff"
FORK_ID = "alpha"
DEFAULT_FILES: Mapping[str, str] = {"README.md": "hello\n"}
POLICY = EffectivePolicy(global_constraints=[], protected_patterns=[], max_diff_lines=500, timeout_seconds=60)
POLICY_DIGEST = digest(POLICY.to_document())


def step_id(index: int) -> str:
    """``step_001`` … ``step_1000`` (the StepId pattern wants at least three digits)."""
    return f"step_{index:03d}"


@dataclass
class Handoff:
    """A project with one plan and one fork whose steps can be published as tasks."""

    layout: ProjectLayout
    plan: Plan
    fork: ForkLayout
    ignore: list[str]

    @property
    def root(self) -> Path:
        return self.layout.root

    @property
    def step_ids(self) -> list[str]:
        return [step.step_id for step in self.plan.forks[0].steps]

    @property
    def head(self) -> str:
        """The fork's state: the commit its audit log names last."""
        return fork_head(self.layout, self.plan.plan_id, self.fork.fork_id)

    def fork_text(self, path: str) -> str | None:
        """A file of the fork's state (None if absent)."""
        return fork_text(self.layout, self.plan.plan_id, self.fork.fork_id, path)

    def scratch(self, task_id: str, attempt: int = 1) -> Path:
        return self.layout.scratch_dir(self.plan.plan_id, self.fork.fork_id, task_id, attempt)

    def build_task(self, task_id: str, **overrides: Any) -> Task:
        """Create attempt 1's workspace of ``task_id`` and return its (unsealed) task, as the engine would."""
        spec = next(s for s in self.plan.forks[0].steps if s.step_id == task_id)
        base = self.head
        scratch = prepare_workspace(self.layout, self.plan.plan_id, self.fork.fork_id, task_id, 1, base)
        fields: dict[str, Any] = {
            "task_id": task_id,
            "plan_id": self.plan.plan_id,
            "fork_id": self.fork.fork_id,
            "attempt": 1,
            "title": spec.title,
            "instruction": spec.instruction,
            "allowed_files": spec.allowed_files,
            "protected_patterns": POLICY.protected_patterns,
            "constraints": POLICY.global_constraints,
            "depends_on": spec.depends_on,
            "workspace": self.layout.relative(scratch),
            "base_commit": base,
            "timeout_seconds": POLICY.timeout_seconds,
            "max_diff_lines": POLICY.max_diff_lines,
            # Protocol tests: their commands write oracles outside the workspace (tests/test_sandbox.py
            # covers containment).
            "sandbox_mode": "off",
            "policy_digest": POLICY_DIGEST,
            "confidence": Confidence(score=0.9, level="high", reasons=["test"]),
            "created_at": utc_now(),
        }
        fields.update(overrides)
        return Task(**fields)

    def publish(self, task_id: str, **overrides: Any) -> Task:
        """Publish attempt 1 of ``task_id``; returns the sealed task."""
        return publish_task(self.fork, self.build_task(task_id, **overrides))

    def publish_all(self, **overrides: Any) -> list[Task]:
        return [self.publish(task_id, **overrides) for task_id in self.step_ids]

    def task_path(self, state: str, task_id: str) -> Path:
        return self.fork.task_file(state, task_id)

    def read_task(self, state: str, task_id: str) -> Task:
        return read_document(self.fork.task_file(state, task_id), Task)

    def read_result(self, state: str, task_id: str) -> Result:
        return read_document(self.fork.sidecar(state, task_id, ".result.json"), Result)

    def read_lease(self, task_id: str) -> Lease:
        return read_document(self.fork.lease_file(task_id), Lease)

    def where(self) -> dict[str, list[str]]:
        """State folder → task ids whose task file is in it."""
        return {state: self.fork.task_ids(state) for state in STATES}

    def files_in(self, state: str) -> list[str]:
        """Every name in a state folder (sidecars, leases and temp files included)."""
        return sorted(p.name for p in self.fork.state_dir(state).iterdir())


def make_handoff(
    root: Path,
    *,
    steps: int = 3,
    files: Mapping[str, str] = DEFAULT_FILES,
    allowed_files: Iterable[str] = ("README.md",),
) -> Handoff:
    """A fresh project in ``root`` with one plan, one fork and ``steps`` independent steps (nothing published)."""
    layout = ProjectLayout(init_project(root).root)
    for name, text in files.items():
        (layout.root / name).parent.mkdir(parents=True, exist_ok=True)
        (layout.root / name).write_text(text, encoding="utf-8")
    ignore: list[str] = []
    plan = Plan(
        plan_id=PLAN_ID,
        goal="prove the handoff protocol",
        created_at=utc_now(),
        planner=PlannerInfo(kind="file", source="tests/handoff"),
        forks=[
            ForkSpec(
                fork_id=FORK_ID,
                strategy=Strategy(name="independent steps"),
                steps=[
                    StepSpec(step_id=step_id(i), title=f"step {i}", instruction=f"Do step {i}.",
                             allowed_files=list(allowed_files))
                    for i in range(1, steps + 1)
                ],
            )
        ],
    )
    plan = create_plan(layout, plan, ignore=ignore, project_policy=PolicyLayer())
    ensure_forks(layout, plan)
    return Handoff(layout=layout, plan=plan, fork=layout.fork(plan.plan_id, FORK_ID), ignore=ignore)


# --- processes ----------------------------------------------------------------------------------


def clean_environ(home: Path, **extra: str) -> dict[str, str]:
    """This process's environment without ``CONDUCTOR_*`` variables, with ``HOME`` in the test's tmp_path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONDUCTOR_")}
    env["HOME"] = str(home)
    env.update(extra)
    return env


def worker_argv(root: Path, command: str, *options: str) -> list[str]:
    return [sys.executable, "-m", "conductor", "worker", "-C", str(root), "--command", command, *options]


def start_worker(root: Path, command: str, *options: str, env: Mapping[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start ``conductor worker`` as a real subprocess; stdout and stderr go to ``log``."""
    handle = log.open("wb")
    try:
        return subprocess.Popen(worker_argv(root, command, *options), env=dict(env), stdout=handle,
                                stderr=subprocess.STDOUT, cwd=root)
    finally:
        handle.close()


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """Kill ``proc`` if it still runs and reap it (test cleanup)."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)


def wait_for(predicate: Callable[[], Any], *, timeout: float, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def pid_running(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (a zombie has exited: it only waits to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def kill_group_quietly(pid: int) -> None:
    """SIGKILL the process group ``pid`` (cleanup of a command orphaned by a killed worker)."""
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def dead_pid() -> int:
    """The pid of a process of ours that has exited and been reaped."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
