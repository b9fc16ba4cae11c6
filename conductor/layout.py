"""Where everything lives inside a project's ``.conductor/`` folder.

::

    .conductor/
      config.yaml  policy.yaml  keys/signing.key  keys/signing.pub
      git/                           Conductor's private git repository: project snapshots, attempt trees,
                                     each fork's history (objects borrowed from the project's own .git)
      recordings/ab/cdef….json       recorded LLM requests and responses, by request hash
      checkpoints/plan_<plan>/<log>/000001.note   signed audit checkpoints (where executors do not write)
      handoff/
        metrics.json
        plan_<plan>/
          plan.json  audit.log                      plan-level events (planning, ranking, apply)
          fork_<fork>/
            pending/ in_progress/ completed/ failed/
            audit.log                               every event of this fork
      scratch/plan_<plan>/fork_<fork>/<step>.a<n>/  one attempt's working folder (with a .git of its own)
      scratch/plan_<plan>/fork_<fork>/<step>.a<n>.index   Conductor's stat cache of that folder
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from conductor.errors import NotFound

CONDUCTOR_DIR = ".conductor"
STATES = ("pending", "in_progress", "completed", "failed")
TASK_SUFFIX = ".task.json"
LEASE_SUFFIX = ".lease.json"
RESULT_SUFFIX = ".result.json"
EXPLANATION_SUFFIX = ".explanation.md"
PROVENANCE_SUFFIX = ".provenance.json"
VERDICT_SUFFIX = ".verdict.json"
ATTESTATION_SUFFIX = ".attestation.json"  # Conductor's signed statement about an accepted step
PARKED_SUFFIX = ".requeue"  # in_progress/<step>.task.json.requeue: an attempt being re-queued


@dataclass(frozen=True)
class ProjectLayout:
    """Paths of one project. ``root`` is the project folder (the one holding ``.conductor/``)."""

    root: Path

    @classmethod
    def find(cls, start: Path) -> ProjectLayout:
        """Find the project holding ``start`` by walking up to the first ``.conductor/`` folder.

        Raises:
            NotFound: no ``.conductor/`` folder in ``start`` or above it.
        """
        start = start.resolve()
        for folder in (start, *start.parents):
            if (folder / CONDUCTOR_DIR).is_dir():
                return cls(folder)
        raise NotFound(f"no Conductor project in {start} or above it (run `conductor init` first)")

    @property
    def conductor_dir(self) -> Path:
        return self.root / CONDUCTOR_DIR

    @property
    def config_file(self) -> Path:
        return self.conductor_dir / "config.yaml"

    @property
    def policy_file(self) -> Path:
        return self.conductor_dir / "policy.yaml"

    @property
    def keys_dir(self) -> Path:
        return self.conductor_dir / "keys"

    @property
    def recordings_dir(self) -> Path:
        """Recorded LLM calls, one file per request hash (see ``conductor.llm.recording``)."""
        return self.conductor_dir / "recordings"

    def checkpoint_dir(self, plan_id: str, log_label: str) -> Path:
        """Signed checkpoints of one audit log; ``log_label`` is ``"plan"`` or ``"fork_<id>"``."""
        return self.conductor_dir / "checkpoints" / f"plan_{plan_id}" / log_label

    @property
    def handoff_dir(self) -> Path:
        return self.conductor_dir / "handoff"

    @property
    def metrics_file(self) -> Path:
        return self.handoff_dir / "metrics.json"

    @property
    def history_file(self) -> Path:
        """Outcome history the confidence scorer learns from (JSON lines)."""
        return self.conductor_dir / "history.jsonl"

    @property
    def lessons_file(self) -> Path:
        """Lessons of rejected attempts, given to later tasks that touch the same files (JSON lines)."""
        return self.conductor_dir / "lessons.jsonl"

    def plan_dir(self, plan_id: str) -> Path:
        return self.handoff_dir / f"plan_{plan_id}"

    def plan_ids(self) -> list[str]:
        """Ids of every plan, oldest first.

        Plan ids start with a UTC timestamp to the second; plans started in the same second are ordered by
        ``plan.json``'s ``created_at`` (microseconds), not by their random suffix. An unreadable ``plan.json``
        sorts first among its second's plans (commands that load it report it).
        """
        if not self.handoff_dir.is_dir():
            return []
        ids = [p.name[5:] for p in self.handoff_dir.glob("plan_*") if (p / "plan.json").is_file()]
        seconds = Counter(plan_id.partition("-")[0] for plan_id in ids)

        def order(plan_id: str) -> tuple[str, str, str]:
            second = plan_id.partition("-")[0]  # plan.json is read only for a second shared by several plans
            return second, self._created_at(plan_id) if seconds[second] > 1 else "", plan_id

        return sorted(ids, key=order)

    def _created_at(self, plan_id: str) -> str:
        try:
            created = json.loads((self.plan_dir(plan_id) / "plan.json").read_bytes()).get("created_at")
        except (OSError, ValueError, AttributeError):
            return ""
        return created if isinstance(created, str) else ""

    def fork(self, plan_id: str, fork_id: str) -> ForkLayout:
        return ForkLayout(
            project=self,
            plan_id=plan_id,
            fork_id=fork_id,
            dir=self.plan_dir(plan_id) / f"fork_{fork_id}",
        )

    @property
    def scratch_root(self) -> Path:
        """``scratch/``: every plan's attempt folders; nothing else may be an executor's workspace."""
        return self.conductor_dir / "scratch"

    def plan_scratch_dir(self, plan_id: str) -> Path:
        """``scratch/plan_<plan>/``: every attempt folder of a plan (removed when it finishes)."""
        return self.scratch_root / f"plan_{plan_id}"

    def fork_scratch_dir(self, plan_id: str, fork_id: str) -> Path:
        """``scratch/plan_<plan>/fork_<fork>/``: a fork's attempt folders, their stat caches, the folders made
        ahead for retries and launched commands' private ``TMPDIR`` folders (temp names: recovery sweeps them)."""
        return self.plan_scratch_dir(plan_id) / f"fork_{fork_id}"

    def scratch_dir(self, plan_id: str, fork_id: str, task_id: str, attempt: int) -> Path:
        """One attempt's folder, ``scratch/plan_<plan>/fork_<fork>/<step>.a<attempt>/``."""
        return self.fork_scratch_dir(plan_id, fork_id) / f"{task_id}.a{attempt}"

    def relative(self, path: Path) -> str:
        """``path`` relative to the project root, in POSIX form (as task files record it)."""
        return path.resolve().relative_to(self.root.resolve()).as_posix()


@dataclass(frozen=True)
class ForkLayout:
    """Paths of one fork's handoff folder."""

    project: ProjectLayout
    plan_id: str
    fork_id: str
    dir: Path

    def state_dir(self, state: str) -> Path:
        return self.dir / state

    def task_file(self, state: str, task_id: str) -> Path:
        return self.dir / state / f"{task_id}{TASK_SUFFIX}"

    def lease_file(self, task_id: str) -> Path:
        return self.dir / "in_progress" / f"{task_id}{LEASE_SUFFIX}"

    def sidecar(self, state: str, task_id: str, suffix: str) -> Path:
        return self.dir / state / f"{task_id}{suffix}"

    @property
    def audit_log(self) -> Path:
        return self.dir / "audit.log"

    def task_ids(self, state: str) -> list[str]:
        """Task ids whose task file is in ``state``, sorted."""
        folder = self.state_dir(state)
        if not folder.is_dir():
            return []
        return sorted(p.name[: -len(TASK_SUFFIX)] for p in folder.glob(f"*{TASK_SUFFIX}"))

    def find_task(self, task_id: str) -> tuple[str, Path] | None:
        """The state and path of the task file of ``task_id``, or None if it is in no folder."""
        for state in STATES:
            path = self.task_file(state, task_id)
            if path.exists():
                return state, path
            if state == "in_progress":
                # A task being re-queued is parked under this name; it is still in progress, not gone.
                parked = path.with_name(path.name + PARKED_SUFFIX)
                if parked.exists():
                    return state, parked
        return None
