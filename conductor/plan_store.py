"""Plans on disk: creating a plan's folders and workspaces, loading it back, its base snapshot.

``plan.json`` is written once (checksummed, never overwritten) and is the commit point of a plan's
existence. Each fork's workspace copy is made afterwards; the ``fork.created`` event in the fork's audit
log says it is complete, so a crash in the middle of a copy is redone on resume.
"""

from __future__ import annotations

import shutil

from conductor.audit import AuditLog
from conductor.blobs import BlobStore
from conductor.canonical import pretty_bytes, strict_loads
from conductor.errors import NotFound, StateConflict
from conductor.faults import crash_point
from conductor.fsutil import atomic_write
from conductor.handoff.documents import read_document, write_document
from conductor.handoff.publish import ensure_fork_dirs
from conductor.layout import ProjectLayout
from conductor.models import ForkRecord, Plan
from conductor.snapshots import restore_workspace
from conductor.workspace import (
    Snapshot,
    copy_tree,
    snapshot,
    snapshot_from_document,
    snapshot_to_document,
)

BASE_SNAPSHOT = "base.snapshot.json"
FORK_RECORD = "fork.json"


def plan_log(layout: ProjectLayout, plan_id: str) -> AuditLog:
    """The plan-level audit log (planning, ranking, apply)."""
    return AuditLog(layout.plan_dir(plan_id) / "audit.log")


def fork_log(layout: ProjectLayout, plan_id: str, fork_id: str) -> AuditLog:
    return AuditLog(layout.fork(plan_id, fork_id).audit_log)


def create_plan(layout: ProjectLayout, plan: Plan, *, ignore: list[str]) -> Plan:
    """Write a new plan: its base snapshot of the project, ``plan.json``, and the plan's first events.

    Returns:
        The sealed plan.
    """
    plan_dir = layout.plan_dir(plan.plan_id)
    plan_dir.mkdir(parents=True, exist_ok=False)
    base = snapshot(layout.root, ignore=ignore, store=BlobStore(layout.objects_dir))
    atomic_write(plan_dir / BASE_SNAPSHOT, pretty_bytes(snapshot_to_document(base)))
    sealed = write_document(plan_dir / "plan.json", plan, exclusive=True)
    crash_point("plan.after_plan_file")
    plan_log(layout, plan.plan_id).append("plan.created", {
        "plan_id": plan.plan_id,
        "goal": plan.goal,
        "planner": plan.planner.model_dump(mode="json"),
        "forks": [f.fork_id for f in plan.forks],
        "plan_checksum": sealed.checksum,
    })
    return sealed


def load_plan(layout: ProjectLayout, plan_id: str) -> Plan:
    """Read ``plan.json`` strictly (checksum verified), with the forks added later by ``fork --from``.

    Returns:
        The plan; its ``checksum`` is that of ``plan.json``, its ``forks`` are the planned ones followed
        by the recorded ones in fork-id order.

    Raises:
        NotFound: no such plan.
        IntegrityError: ``plan.json`` or a ``fork.json`` was altered or is malformed.
    """
    path = layout.plan_dir(plan_id) / "plan.json"
    if not path.is_file():
        raise NotFound(f"no plan {plan_id!r} (known: {', '.join(layout.plan_ids()) or 'none'})")
    plan = read_document(path, Plan)
    added = [record.fork for record in fork_records(layout, plan_id).values()]
    if not added:
        return plan
    return plan.model_copy(update={"forks": [*plan.forks, *added]})


def fork_records(layout: ProjectLayout, plan_id: str) -> dict[str, ForkRecord]:
    """Fork id → record of every fork added to the plan after planning, in numeric id order.

    Raises:
        IntegrityError: a ``fork.json`` was altered or is malformed.
    """
    records = {}
    for path in layout.plan_dir(plan_id).glob(f"fork_*/{FORK_RECORD}"):
        record = read_document(path, ForkRecord)
        records[record.fork.fork_id] = record
    return dict(sorted(records.items(), key=lambda item: (len(item[0]), item[0])))


def add_fork(layout: ProjectLayout, record: ForkRecord) -> ForkRecord:
    """Write the record of a new fork (never overwriting one); its workspace is made by ``ensure_forks``.

    Raises:
        StateConflict: a fork with that id exists already.
    """
    fork = layout.fork(record.plan_id, record.fork.fork_id)
    try:
        fork.dir.mkdir(parents=True, exist_ok=False)
    except FileExistsError:
        raise StateConflict(f"fork {record.fork.fork_id} of plan {record.plan_id} exists already") from None
    return write_document(fork.dir / FORK_RECORD, record, exclusive=True)


def load_base(layout: ProjectLayout, plan_id: str) -> Snapshot:
    """The snapshot of the project taken when the plan was created."""
    path = layout.plan_dir(plan_id) / BASE_SNAPSHOT
    return snapshot_from_document(strict_loads(path.read_bytes(), source=str(path)))


def ensure_forks(layout: ProjectLayout, plan: Plan, *, ignore: list[str]) -> None:
    """Create each fork's folders and workspace copy, unless its ``fork.created`` event says it is done.

    A planned fork starts from a copy of the project; a fork added by ``fork --from`` starts from the
    workspace snapshot recorded after its parent's step, and its ``fork.created`` event links to the
    parent's ``step.merged`` event.
    """
    records = fork_records(layout, plan.plan_id)
    for spec in plan.forks:
        fork = layout.fork(plan.plan_id, spec.fork_id)
        ensure_fork_dirs(fork)
        log = AuditLog(fork.audit_log)
        if any(e.type == "fork.created" for e in log.events()):
            continue
        workspace = fork.workspace
        if workspace.exists():
            shutil.rmtree(workspace)  # a copy a crash interrupted
        workspace.parent.mkdir(parents=True, exist_ok=True)
        record = records.get(spec.fork_id)
        extra = {}
        if record is None:
            copy_tree(layout.root, workspace, ignore=ignore)
        else:
            restore_workspace(layout, record.parent.workspace, workspace)
            extra = {"parent": record.parent.model_dump(mode="json"), "reused_steps": record.reused_steps,
                     "fork_checksum": record.checksum}
        crash_point("fork.after_workspace")
        log.append("fork.created", {
            "plan_id": plan.plan_id,
            "fork_id": spec.fork_id,
            "plan_checksum": plan.checksum,
            "strategy": spec.strategy.model_dump(mode="json"),
            "steps": [s.step_id for s in spec.steps],
            "workspace": layout.relative(workspace),
            **extra,
        })


def latest_plan_id(layout: ProjectLayout, *, unfinished: bool = False) -> str:
    """The newest plan's id (with ``unfinished``, the newest plan without a ``plan.finished`` event).

    Raises:
        NotFound: there is no such plan.
    """
    for plan_id in reversed(layout.plan_ids()):
        if not unfinished or not any(e.type == "plan.finished" for e in plan_log(layout, plan_id).events()):
            return plan_id
    raise NotFound("no unfinished plan to resume" if unfinished else "no plan yet (run `conductor explore` first)")
