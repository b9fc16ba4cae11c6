"""Time travel over a plan: the workspace as it was after any step, and new forks from that past.

``checkout`` checks out the commit a ``step.merged`` event recorded (the fork's state after that step, in
``.conductor/git``). ``fork_from`` adds a fork to the plan that starts from that commit: it takes over
every step up to and including the chosen one (they are not run again) and runs the rest, optionally
with an extra instruction. With recorded LLM outputs
(``conductor.llm.recording``) re-running unchanged steps costs no provider call.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from conductor.attempts import state_store
from conductor.audit import AuditLog
from conductor.errors import ConfigError, NotFound
from conductor.layout import ProjectLayout
from conductor.models import (
    Event,
    ForkOrigin,
    ForkRecord,
    ForkSpec,
    Plan,
    Strategy,
    utc_now,
)
from conductor.plan_store import add_fork, load_plan
from conductor.workspace.checkout import materialize

INSTRUCTION_HEADING = "Additional instruction:"


@dataclass(frozen=True)
class StepPoint:
    """Where a step was merged: the fork, its ``step.merged`` event and the commit after it."""

    plan_id: str
    fork_id: str
    step_id: str
    event: Event

    @property
    def commit(self) -> str:
        return str(self.event.data["commit"])


def find_step(layout: ProjectLayout, plan: Plan, step_id: str, fork_id: str | None = None) -> StepPoint:
    """The merge of ``step_id`` in ``fork_id`` (default: the plan's winner, else the only fork that merged it).

    Raises:
        NotFound: the step was never merged there (or no commit was recorded for it).
        ConfigError: several forks merged the step and none was chosen.
    """
    candidates = [spec.fork_id for spec in plan.forks if fork_id in (None, spec.fork_id)]
    found = {}
    for candidate in candidates:
        events = AuditLog(layout.fork(plan.plan_id, candidate).audit_log).events()
        merged = [e for e in events if e.type == "step.merged" and e.data.get("step_id") == step_id
                  and isinstance(e.data.get("commit"), str)]
        if merged:
            found[candidate] = merged[-1]
    if not found:
        where = f"fork {fork_id}" if fork_id else "any fork"
        raise NotFound(f"{step_id} was never merged in {where} of plan {plan.plan_id} (no commit recorded)")
    if len(found) > 1:
        winner = _winner(layout, plan.plan_id)
        if winner not in found:
            raise ConfigError(f"{step_id} was merged in forks {', '.join(found)}: choose one with --fork")
        return StepPoint(plan.plan_id, winner, step_id, found[winner])
    (chosen, event), = found.items()
    return StepPoint(plan.plan_id, chosen, step_id, event)


def _winner(layout: ProjectLayout, plan_id: str) -> str | None:
    events = AuditLog(layout.plan_dir(plan_id) / "audit.log").events()
    finished = [e for e in events if e.type == "plan.finished"]
    return finished[-1].data.get("winner") if finished else None


def checkout(layout: ProjectLayout, plan_id: str, step_id: str, *, fork_id: str | None = None,
             into: Path | None = None) -> tuple[StepPoint, Path]:
    """Materialise the workspace as it was after ``step_id`` into ``into``.

    Args:
        into: an absent or empty folder; default ``.conductor/checkouts/plan_<id>/fork_<id>/<step>``.

    Returns:
        The step point and the folder written.

    Raises:
        NotFound / ConfigError: see :func:`find_step`. FileExistsError: ``into`` is not empty.
        GitError: the commit or one of its objects is missing from ``.conductor/git``.
        IntegrityError: an object of the commit was altered on disk (nothing is written).
    """
    plan = load_plan(layout, plan_id)
    point = find_step(layout, plan, step_id, fork_id)
    target = into or layout.conductor_dir / "checkouts" / f"plan_{plan_id}" / f"fork_{point.fork_id}" / step_id
    if target.exists() and target.is_dir() and not any(target.iterdir()):
        target.rmdir()  # the checkout renames a built tree into place
    store = state_store(layout)
    store.verify_tree(store.tree_of(point.commit))  # only attested content, byte for byte
    materialize(store, point.commit, target, keep_index=False)
    return point, target


def fork_from(layout: ProjectLayout, plan_id: str, step_id: str, *, fork_id: str | None = None,
              instruction: str | None = None) -> ForkRecord:
    """Add a fork to the plan that starts after ``step_id`` of ``fork_id`` (see :func:`find_step`).

    The new fork copies the parent's strategy and steps. Steps up to and including ``step_id`` (in the
    parent's order) are taken over; each later step gets ``instruction`` appended, if given. The fork's
    folders and workspace are made by the engine (``ensure_forks``) on the next run.

    Returns:
        The written fork record (its ``fork.fork_id`` is the next free numeric id).

    Raises:
        NotFound / ConfigError: see :func:`find_step`; ``step_id`` is the parent's last step and there
            is nothing left to run.
    """
    plan = load_plan(layout, plan_id)
    point = find_step(layout, plan, step_id, fork_id)
    store = state_store(layout)
    store.verify_tree(store.tree_of(point.commit))  # a fork starts only from intact, attested content
    parent = plan.fork(point.fork_id)
    order = [s.step_id for s in parent.steps]
    cut = order.index(step_id) + 1
    if cut == len(order):
        raise ConfigError(f"{step_id} is the last step of fork {parent.fork_id}: a fork from it has nothing to run")
    steps = [s if i < cut or not instruction else
             s.model_copy(update={"instruction": f"{s.instruction}\n\n{INSTRUCTION_HEADING} {instruction}"})
             for i, s in enumerate(parent.steps)]
    description = parent.strategy.description + (f" {INSTRUCTION_HEADING} {instruction}" if instruction else "")
    spec = ForkSpec(fork_id=_next_fork_id(layout, plan), steps=steps,
                    strategy=Strategy(name=f"{parent.strategy.name} (from {parent.fork_id}/{step_id})",
                                      description=description.strip()))
    record = ForkRecord(
        plan_id=plan_id, fork=spec, reused_steps=order[:cut], instruction=instruction, created_at=utc_now(),
        parent=ForkOrigin(fork_id=parent.fork_id, step_id=step_id, event_seq=point.event.seq,
                          event_hash=point.event.hash, commit=point.commit),
    )
    return add_fork(layout, record)


def _next_fork_id(layout: ProjectLayout, plan: Plan) -> str:
    taken = {spec.fork_id for spec in plan.forks}
    taken |= {p.name[5:] for p in layout.plan_dir(plan.plan_id).glob("fork_*")}
    numbers = [int(t) for t in taken if t.isdigit()]
    candidate = max(numbers, default=0) + 1
    while str(candidate) in taken:
        candidate += 1
    return str(candidate)
