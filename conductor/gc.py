"""``conductor gc``: remove what finished plans no longer need, never what a record still names.

- Attempt folders (``.conductor/scratch/plan_<id>/``) of plans that have a ``plan.finished`` event: the
  engine removes them itself at the end of a plan unless told to keep them (``--keep-workspaces``), so
  this finds the ones kept, or left by a plan that was killed after finishing.
- Objects of ``.conductor/git`` that no ref reaches and that are older than an hour (a running plan may
  be writing new ones): loose objects are then packed (``git repack -d -l``: only objects the store owns,
  never the project's own, which it borrows).

Every commit a ``step.merged`` event, a verdict, an attestation or ``conductor checkout`` names is kept
alive by a ref under ``refs/conductor/plans/<id>/`` (fork states, every attempt's tree, the plan's
base), so after ``gc`` every ``verify`` and ``checkout`` still succeeds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from conductor.attempts import remove_plan_workspaces, state_store
from conductor.audit import AuditLog
from conductor.layout import ProjectLayout

PRUNE_EXPIRY = "1.hour.ago"


@dataclass
class GcReport:
    """What ``gc`` removed. Sizes are bytes on disk before and after."""

    plans_cleaned: list[str] = field(default_factory=list)
    folders_removed: int = 0
    store_bytes_before: int = 0
    store_bytes_after: int = 0
    scratch_bytes_before: int = 0
    scratch_bytes_after: int = 0


def collect_garbage(layout: ProjectLayout) -> GcReport:
    """Remove finished plans' attempt folders and unreachable store objects (see the module docstring).

    Raises:
        GitError: git failed on the store.
    """
    scratch = layout.scratch_root
    store = state_store(layout)
    report = GcReport(store_bytes_before=disk_usage(store.dir), scratch_bytes_before=disk_usage(scratch))
    for plan_id in layout.plan_ids():
        _pin_recorded_commits(layout, store, plan_id)
        if not layout.plan_scratch_dir(plan_id).exists():
            continue
        if any(e.type == "plan.finished" for e in AuditLog(layout.plan_dir(plan_id) / "audit.log").events()):
            report.folders_removed += remove_plan_workspaces(layout, plan_id)
            report.plans_cleaned.append(plan_id)
    store.git.run(["prune", f"--expire={PRUNE_EXPIRY}"])
    store.git.run(["repack", "-d", "-l", "-q"])
    store.git.run(["pack-refs", "--all"])
    report.store_bytes_after, report.scratch_bytes_after = disk_usage(store.dir), disk_usage(scratch)
    return report


def _pin_recorded_commits(layout: ProjectLayout, store, plan_id: str) -> None:  # type: ignore[no-untyped-def]
    """Point a ref at every commit and tree the plan's records name, before anything is pruned.

    The engine keeps these refs as it goes, but a crash between a record and its ref (recovery restores
    the record, not the ref) must not let ``gc`` prune what ``verify`` and ``checkout`` need.
    """
    refs: dict[str, str] = {}
    plan_log = AuditLog(layout.plan_dir(plan_id) / "audit.log")
    for event in plan_log.events():
        if event.type == "plan.created" and isinstance(event.data.get("base_commit"), str):
            refs[f"plans/{plan_id}/base"] = event.data["base_commit"]
    for folder in sorted(layout.plan_dir(plan_id).glob("fork_*")):
        fork_id = folder.name[len("fork_"):]
        for event in AuditLog(folder / "audit.log").events():
            commit = event.data.get("commit")
            if event.type in ("fork.created", "step.merged") and isinstance(commit, str):
                refs[f"plans/{plan_id}/forks/{fork_id}"] = commit  # each later one descends from the earlier
    for name, commit in refs.items():
        if store.has_object(commit):
            store.set_ref(name, commit)


def disk_usage(folder: Path) -> int:
    """Bytes of every file under ``folder`` (symlinks not followed; 0 if absent)."""
    total = 0
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:
                continue
    return total
