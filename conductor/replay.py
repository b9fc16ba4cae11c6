"""Replay: fold a plan's audit events into its state at any point, from the logs alone.

The plan log and every fork log are merged into one timeline (ordered by ``ts``, then plan log before
fork logs in fork-id order, then ``seq``); each entry gets its position ``index`` in that timeline, which
``conductor events`` shows and ``conductor replay --to`` accepts. Folding the first ``n`` entries gives the
plan as it was after entry ``n - 1``: each step's state, attempt, holder, confidence, verdict and the
commit after it; each fork's status; the plan's ranking, winner and LLM spending.

When the point is the present, :func:`check_against_folders` compares the folded state with the task
files on disk: the log and the folders must tell the same story, except that an external executor (which
writes no events) may be ahead of the log.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from conductor.audit import AuditLog
from conductor.errors import NotFound
from conductor.layout import ProjectLayout
from conductor.models import Event, Plan
from conductor.plan_store import load_plan
from conductor.repair import is_archived

_FOLDER_RANK = {None: 0, "pending": 1, "in_progress": 2, "completed": 3, "failed": 3}


@dataclass(frozen=True)
class Entry:
    """One event in the merged timeline. ``log`` is ``"plan"`` or a fork id."""

    index: int
    log: str
    event: Event

    def to_dict(self) -> dict[str, Any]:
        e = self.event
        return {"index": self.index, "log": self.log, "seq": e.seq, "ts": e.ts, "type": e.type, "data": e.data}


def timeline(layout: ProjectLayout, plan: Plan) -> list[Entry]:
    """Every event of the plan's logs, merged and numbered.

    Raises:
        AuditChainError: a log's chain is broken (naming the file and line).
    """
    logs = [("plan", AuditLog(layout.plan_dir(plan.plan_id) / "audit.log"))]
    logs += [(spec.fork_id, AuditLog(layout.fork(plan.plan_id, spec.fork_id).audit_log)) for spec in plan.forks]
    tagged = [((event.ts, order, event.seq), label, event)
              for order, (label, log) in enumerate(logs) for event in log.events()]
    tagged.sort(key=lambda item: item[0])
    return [Entry(index, label, event) for index, (_, label, event) in enumerate(tagged)]


# --- the fold -----------------------------------------------------------------------------------


@dataclass
class StepState:
    state: str = "waiting"  # waiting | awaiting_approval | pending | in_progress | completed | accepted | failed | reused
    # | retrying (a failed attempt archived, its retry not yet published)
    attempt: int | None = None
    holder: str | None = None
    confidence: str | None = None
    checksum: str | None = None
    reasons: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    commit: str | None = None  # the fork's commit after the step was merged
    rejected: bool = False  # a claimer refused the task file unread (task.rejected): it may hold anything


@dataclass
class ForkState:
    status: str = "planned"  # planned | created | succeeded | failed
    parent: dict[str, Any] | None = None
    steps: dict[str, StepState] = field(default_factory=dict)


@dataclass
class PlanState:
    """What the plan looked like after ``events`` timeline entries."""

    plan_id: str
    goal: str
    events: int = 0
    last: dict[str, Any] | None = None
    status: str = "running"  # running | succeeded | failed
    winner: str | None = None
    applied: str | None = None
    ranking: list[dict[str, Any]] = field(default_factory=list)
    resumed: int = 0
    llm: dict[str, Any] = field(default_factory=lambda: {"calls": 0, "cached": 0, "input_tokens": 0,
                                                         "output_tokens": 0, "cost_usd": 0.0})
    forks: dict[str, ForkState] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def fold(plan: Plan, entries: list[Entry]) -> PlanState:
    """Fold ``entries`` (a timeline prefix) into the plan's state."""
    state = PlanState(plan_id=plan.plan_id, goal=plan.goal)
    for spec in plan.forks:
        state.forks[spec.fork_id] = ForkState(steps={s.step_id: StepState() for s in spec.steps})
    for entry in entries:
        _apply(state, entry)
        state.events += 1
        state.last = entry.to_dict()
    return state


def _apply(state: PlanState, entry: Entry) -> None:
    event, data = entry.event, entry.event.data
    if event.type == "llm.call":
        _count_llm(state, data)
    if entry.log == "plan":
        _apply_plan(state, event.type, data)
        return
    fork = state.forks.setdefault(entry.log, ForkState())
    if event.type == "fork.created":
        fork.status, fork.parent = "created", data.get("parent")
        for step_id in data.get("reused_steps", []):
            fork.steps.setdefault(step_id, StepState()).state = "reused"
    elif event.type == "fork.finished":
        fork.status = str(data.get("status"))
    step_id = data.get("step_id")
    if isinstance(step_id, str) and event.type != "llm.call":
        _apply_step(fork.steps.setdefault(step_id, StepState()), event.type, data)


def _apply_plan(state: PlanState, type_: str, data: dict[str, Any]) -> None:
    if type_ == "plan.ranked":
        state.ranking = list(data.get("ranking", []))
    elif type_ == "plan.applied":
        state.applied = data.get("fork_id")
    elif type_ == "plan.resumed":
        state.resumed += 1
    elif type_ == "plan.finished":
        state.status, state.winner = str(data.get("status")), data.get("winner")


def _count_llm(state: PlanState, data: dict[str, Any]) -> None:
    llm = state.llm
    llm["calls"] += 1
    if data.get("cached"):
        llm["cached"] += 1
        return  # a recorded answer reused: no tokens spent now
    llm["input_tokens"] += int(data.get("input_tokens") or 0)
    llm["output_tokens"] += int(data.get("output_tokens") or 0)
    llm["cost_usd"] += float(data.get("cost_usd") or 0.0)


def _apply_step(step: StepState, type_: str, data: dict[str, Any]) -> None:
    attempt = data.get("attempt")
    if type_ in ("task.completed", "task.failed") and isinstance(attempt, int) and isinstance(step.attempt, int) \
            and attempt < step.attempt:
        return  # a late word on an attempt already retried: history
    if type_ == "task.retried":
        step.state, step.reasons = "retrying", [str(r) for r in data.get("reasons", [])]
    elif type_ == "confidence.scored":
        step.confidence = data.get("level")
    elif type_ == "approval.requested":
        step.state = "awaiting_approval"
    elif type_ == "approval.granted" and step.state == "awaiting_approval":
        step.state = "waiting"
    elif type_ == "task.published":
        step.state, step.attempt, step.holder, step.rejected = "pending", data.get("attempt"), None, False
        step.checksum = data.get("checksum")
    elif type_ == "task.claimed":
        step.state, step.holder = "in_progress", data.get("holder")
    elif type_ == "task.completed":
        step.state = "completed"
    elif type_ == "task.failed":
        step.state, step.reasons = "failed", [str(data.get("message") or data.get("reason"))]
    elif type_ == "task.rejected":
        step.state, step.holder, step.rejected = "failed", data.get("by"), True
        step.reasons = [f"task file rejected by {data.get('by')} ({data.get('kind')}): {data.get('message')}"]
    elif type_ == "step.verified":
        step.reasons = list(data.get("reasons", []))
        if data.get("accepted"):
            step.state = "accepted"
    elif type_ == "step.merged":
        step.state, step.files, step.commit = "accepted", list(data.get("files", [])), data.get("commit")


# --- picking a point ----------------------------------------------------------------------------


def cut_at(entries: list[Entry], *, to: str | None = None, to_step: str | None = None,
           fork_id: str | None = None) -> list[Entry]:
    """The prefix of ``entries`` up to and including the chosen point (all of them when none is chosen).

    Args:
        to: a timeline index (``"42"``) or a log position ``"<log>:<seq>"`` (``"plan:3"``, ``"2:14"``).
        to_step: the point where this step was last merged or failed (in ``fork_id``, or the first fork
            where it was).

    Raises:
        NotFound: no such index, log position or finished step.
    """
    if to is not None:
        return entries[: _index_of(entries, to) + 1]
    if to_step is not None:
        ends = [e for e in entries if e.event.type in ("step.merged", "task.failed", "task.rejected")
                and e.event.data.get("step_id") == to_step and (fork_id is None or e.log == fork_id)]
        if not ends:
            where = f" in fork {fork_id}" if fork_id else ""
            raise NotFound(f"{to_step} was never merged or failed{where}")
        first_fork = ends[0].log
        return entries[: [e for e in ends if e.log == first_fork][-1].index + 1]
    return entries


def _index_of(entries: list[Entry], to: str) -> int:
    if ":" in to:
        log, _, seq = to.rpartition(":")
        found = next((e for e in entries if e.log == log and str(e.event.seq) == seq), None)
        if found is None:
            raise NotFound(f"no event {to!r} (use <log>:<seq> with log 'plan' or a fork id)")
        return found.index
    if not to.isdigit() or int(to) >= len(entries):
        raise NotFound(f"no timeline position {to!r} (the plan has {len(entries)} events, 0..{len(entries) - 1})")
    return int(to)


# --- checking the present -----------------------------------------------------------------------


def check_against_folders(layout: ProjectLayout, state: PlanState, behind: list[str] | None = None) -> list[str]:
    """Where the folded present disagrees with the task files on disk; ``[]`` when they agree.

    The log may lag the folders (an external executor moves task files without writing events), never
    lead them: a step the log calls accepted must be in ``completed/``, a failed one in ``failed/``, a
    published one must exist somewhere, with the attempt the log published last.

    Args:
        behind: if given, receives one line per step whose task file is further on than the log says
            (not a disagreement: the engine logs an external executor's outcome on its next pass).
    """
    problems = []
    for fork_id, fork in state.forks.items():
        layout_fork = layout.fork(state.plan_id, fork_id)
        for step_id, step in fork.steps.items():
            found = layout_fork.find_task(step_id)
            folder = found[0] if found else None
            problem = _disagreement(step, folder)
            if problem is not None and folder is None and isinstance(step.attempt, int) \
                    and is_archived(layout_fork, step_id, step.attempt):
                problem = None  # a repair archived it and its retry is not out yet (conductor.repair)
            if problem is None and found is not None and step.attempt is not None and not step.rejected:
                problem = _attempt_disagreement(found[1], step.attempt)
            if problem:
                problems.append(f"fork {fork_id} {step_id}: {problem}")
            elif behind is not None and _FOLDER_RANK[folder] > _FOLDER_RANK.get(step.state, 3):
                behind.append(f"fork {fork_id} {step_id}: the log says {step.state} but the task file is in "
                              f"{folder}/ (an external executor's work, logged by the engine's next pass)")
    return problems


def _disagreement(step: StepState, folder: str | None) -> str | None:
    expected = {"accepted": "completed", "failed": "failed"}.get(step.state)
    if expected is not None and folder != expected:
        return f"the log says {step.state} but the task file is {_where(folder)}"
    if step.state in ("waiting", "awaiting_approval", "reused") and folder is not None:
        return f"the log never published it but the task file is in {folder}/"
    if step.state in ("pending", "in_progress", "completed") and _FOLDER_RANK[folder] < _FOLDER_RANK[step.state]:
        return f"the log says {step.state} (attempt {step.attempt}) but the task file is {_where(folder)}"
    return None


def _attempt_disagreement(path: Any, attempt: int) -> str | None:
    from conductor.canonical import strict_loads
    from conductor.errors import ConductorError

    try:
        found = strict_loads(path.read_bytes(), source=str(path)).get("attempt")
    except (OSError, ConductorError, AttributeError):
        return f"the task file {path.name} cannot be read"
    if found != attempt:
        return f"the log published attempt {attempt} but {path.parent.name}/{path.name} holds attempt {found}"
    return None


def _where(folder: str | None) -> str:
    return "in no folder" if folder is None else f"in {folder}/"


def replay(layout: ProjectLayout, plan_id: str, *, to: str | None = None, to_step: str | None = None,
           fork_id: str | None = None) -> dict[str, Any]:
    """Rebuild the plan's state at a point from its audit logs (and check it when the point is now).

    Returns:
        ``{"state": PlanState as dict, "at_present": bool, "total_events": int, "problems": [str],
        "behind": [str]}``; ``problems`` is empty unless the point is the present and logs and folders
        disagree; ``behind`` names steps whose task files are further on than the log (at the present).

    Raises:
        NotFound: no such plan or point. AuditChainError: a log is broken.
    """
    plan = load_plan(layout, plan_id)
    entries = timeline(layout, plan)
    prefix = cut_at(entries, to=to, to_step=to_step, fork_id=fork_id)
    state = fold(plan, prefix)
    at_present = len(prefix) == len(entries)
    behind: list[str] = []
    problems = check_against_folders(layout, state, behind) if at_present else []
    return {"state": state.to_dict(), "at_present": at_present, "total_events": len(entries), "problems": problems,
            "behind": behind}
