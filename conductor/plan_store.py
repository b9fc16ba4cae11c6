"""Plans on disk: creating a plan's folders, its base commit, loading it back.

``plan.json`` is written once (checksummed, never overwritten) and is the commit point of a plan's
existence. It pins ``base_commit``: the project as the plan began, committed to Conductor's private
repository (``conductor.workspace.store``). Each fork starts at that commit (or, for ``fork --from``, at
its parent's state after the chosen step); its ``fork.created`` event records the commit.
"""

from __future__ import annotations

from pathlib import Path

from conductor.attempts import state_store
from conductor.audit import AuditLog
from conductor.errors import ConfigError, IntegrityError, NotFound, StateConflict
from conductor.faults import crash_point
from conductor.handoff.documents import read_document, sealed_bytes, write_document
from conductor.handoff.publish import ensure_fork_dirs
from conductor.layout import ProjectLayout
from conductor.models import ForkRecord, Plan, PolicyLayer, StepSpec

FORK_RECORD = "fork.json"


def plan_log(layout: ProjectLayout, plan_id: str, *, cut_torn_tail: bool = True) -> AuditLog:
    """The plan-level audit log (planning, ranking, apply); ``cut_torn_tail`` as :class:`AuditLog` (on for
    the code that runs plans)."""
    return AuditLog(layout.plan_dir(plan_id) / "audit.log", cut_torn_tail=cut_torn_tail)


def fork_log(layout: ProjectLayout, plan_id: str, fork_id: str, *, cut_torn_tail: bool = True) -> AuditLog:
    return AuditLog(layout.fork(plan_id, fork_id).audit_log, cut_torn_tail=cut_torn_tail)


MAX_PLAN_BYTES = 16 * 1024 * 1024
"""The largest ``plan.json`` (or ``fork.json`` of a fork added by ``fork --from``) Conductor writes or reads,
in bytes: a plan is one document however many steps it has (about 400 bytes a step: 10,000 steps take
4 MiB, over the 4 MiB of a task file), and every later command reads it whole."""


def read_plan_file(path: Path) -> Plan:
    """``plan.json`` read strictly (checksum verified), up to :data:`MAX_PLAN_BYTES`.

    Raises:
        FileNotFoundError: it is missing.
        IntegrityError: it was altered, is malformed or is too large.
    """
    return read_document(path, Plan, limit=MAX_PLAN_BYTES)


def create_plan(layout: ProjectLayout, plan: Plan, *, ignore: list[str], project_policy: PolicyLayer | None = None) -> Plan:
    """Write a new plan: the project's base commit, ``plan.json`` (pinning it and ``project_policy``), and
    the plan's first event (pinning ``plan.json``'s checksum).

    Returns:
        The sealed plan.

    Raises:
        ConfigError: ``plan.json`` would be larger than :data:`MAX_PLAN_BYTES` (nothing is written).
        GitError: git is missing, too old, or cannot read the project.
    """
    _check_plan_size(plan.model_copy(update={"base_commit": "0" * 64, "project_policy": project_policy}))
    plan_dir = layout.plan_dir(plan.plan_id)
    store = state_store(layout)
    base = store.snapshot_project(ignore=ignore, message=f"conductor: the project as plan {plan.plan_id} began\n")
    store.set_ref(f"plans/{plan.plan_id}/base", base)
    plan_dir.mkdir(parents=True, exist_ok=False)
    plan = plan.model_copy(update={"base_commit": base, "project_policy": project_policy})
    sealed = write_document(plan_dir / "plan.json", plan, exclusive=True)
    crash_point("plan.after_plan_file")
    plan_log(layout, plan.plan_id).append("plan.created", {
        "plan_id": plan.plan_id,
        "goal": plan.goal,
        "planner": plan.planner.model_dump(mode="json"),
        **({"executor": plan.executor.model_dump(mode="json")} if plan.executor is not None else {}),
        "forks": [f.fork_id for f in plan.forks],
        "base_commit": base,
        "plan_checksum": sealed.checksum,
    })
    return sealed


def _check_plan_size(plan: Plan) -> None:
    size = len(sealed_bytes(plan)[1])
    if size > MAX_PLAN_BYTES:
        steps = sum(len(fork.steps) for fork in plan.forks)
        raise ConfigError(f"the plan would take {size:,} bytes as plan.json ({len(plan.forks)} fork(s), {steps} "
                          f"step(s)); the limit is {MAX_PLAN_BYTES:,} bytes: split the goal into smaller plans")


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
    plan = read_plan_file(path)
    check_plan_pinned(layout, path, plan)
    added = [record.fork for record in fork_records(layout, plan_id).values()]
    if not added:
        return plan
    return plan.model_copy(update={"forks": [*plan.forks, *added]})


def check_plan_pinned(layout: ProjectLayout, path, plan: Plan) -> None:  # type: ignore[no-untyped-def]
    """``plan.json``'s checksum must be the one its ``plan.created`` event recorded: a checksum is unkeyed,
    so a plan file edited and re-sealed by hand passes its own check but not this one.

    Raises:
        IntegrityError: the event records another checksum.
    """
    for event in plan_log(layout, plan.plan_id).events():
        if event.type == "plan.created":
            pinned = event.data.get("plan_checksum")
            if pinned != plan.checksum:
                raise IntegrityError(f"{path}: checksum {plan.checksum} is not the one plan.created (audit log seq "
                                     f"{event.seq}) recorded, {pinned}: the plan file was replaced; refusing it")
            return


def policy_layers(plan: Plan, project_now: PolicyLayer, step: StepSpec | None = None) -> list[tuple[str, PolicyLayer]]:
    """The policy layers a step of ``plan`` is judged by, in merge order (``policy.merge_policies``).

    The project's policy as the plan began (pinned in ``plan.json``), the plan's, the step's, and then the
    project's ``policy.yaml`` *now*, which as a later layer can only tighten: editing the policy file
    while a plan runs never loosens that plan.
    """
    pinned = plan.project_policy if plan.project_policy is not None else project_now
    layers = [("project", pinned), ("plan", plan.policy)]
    if step is not None:
        layers.append(("step", step.policy))
    if plan.project_policy is not None and project_now != plan.project_policy:
        layers.append(("policy.yaml now", project_now))
    return layers


def fork_records(layout: ProjectLayout, plan_id: str) -> dict[str, ForkRecord]:
    """Fork id → record of every fork added to the plan after planning, in numeric id order.

    Raises:
        IntegrityError: a ``fork.json`` was altered or is malformed.
    """
    records = {}
    for path in layout.plan_dir(plan_id).glob(f"fork_*/{FORK_RECORD}"):
        record = read_document(path, ForkRecord, limit=MAX_PLAN_BYTES)  # one fork of a plan: no larger than it
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


def base_commit(plan: Plan) -> str:
    """The commit the plan began from.

    Raises:
        StateConflict: the plan was written by a Conductor without git-backed workspaces (0.1).
    """
    if plan.base_commit is None:
        raise StateConflict(f"plan {plan.plan_id} has no base commit: it was made by Conductor 0.1 and cannot "
                            "be continued by this version (start a new plan)")
    return plan.base_commit


def ensure_forks(layout: ProjectLayout, plan: Plan) -> None:
    """Create each fork's folders and its ``fork.created`` event (with the fork's starting commit) once.

    A planned fork starts at the plan's base commit; a fork added by ``fork --from`` starts at its
    parent's state after the chosen step, and its ``fork.created`` event links to the parent's
    ``step.merged`` event.
    """
    records = fork_records(layout, plan.plan_id)
    for spec in plan.forks:
        fork = layout.fork(plan.plan_id, spec.fork_id)
        ensure_fork_dirs(fork)
        log = AuditLog(fork.audit_log)
        if any(e.type == "fork.created" for e in log.events()):
            continue
        record = records.get(spec.fork_id)
        commit, extra = base_commit(plan), {}
        if record is not None:
            commit = record.parent.commit
            extra = {"parent": record.parent.model_dump(mode="json"), "reused_steps": record.reused_steps,
                     "fork_checksum": record.checksum}
        state_store(layout).set_ref(f"plans/{plan.plan_id}/forks/{spec.fork_id}", commit)
        crash_point("fork.after_workspace")
        log.append("fork.created", {
            "plan_id": plan.plan_id,
            "fork_id": spec.fork_id,
            "plan_checksum": plan.checksum,
            "strategy": spec.strategy.model_dump(mode="json"),
            "steps": [s.step_id for s in spec.steps],
            "commit": commit,
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
