"""The invariants every fault-injection trial checks, written once.

:func:`state_problems` holds at any moment after a recovery pass, whether or not the plan finished:

- each task file is in exactly one state folder (and no parked re-queue is left beside a finished plan);
- no partial JSON is visible: every ``*.json`` under ``.conductor/handoff`` parses strictly;
- no temp file (``.tmp.*``) is left anywhere in the project;
- every task, lease, result and verdict has a valid checksum (and schema);
- no completed task lacks its result and provenance, no failed task its result; a lease lies beside its
  in-progress task only;
- every audit log's hash chain verifies (``conductor.audit.verify_chain``).

:func:`outcome_problems` adds, once the plan should have finished: it finished and succeeded with fork 1
applied once; the project and fork 1's workspace hold exactly the expected content (no effect applied
twice); each step of fork 1 was merged exactly once; no attempt was executed twice and no attempt
completed twice.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from tests.helpers.fork_state import fork_files
from conductor.audit import AuditLog, verify_chain
from conductor.canonical import strict_loads
from conductor.errors import ConductorError
from conductor.fsutil import TEMP_PREFIX
from conductor.handoff.documents import read_document
from conductor.layout import PARKED_SUFFIX, STATES, ProjectLayout
from conductor.models import Lease, Result, Task, Verdict
from tests.fault.harness import ABSENT, EXPECTED, GOOD_STEPS, Trial

DOCUMENTS = ((".task.json", Task), (".lease.json", Lease), (".result.json", Result), (".verdict.json", Verdict))

def state_problems(root: Path, *, finished: bool = False, recovered: bool = True) -> list[str]:
    """Every broken state invariant of the project at ``root`` (empty when all hold).

    Args:
        finished: the plan should have ended (no parked re-queue, no lease may be left).
        recovered: a recovery pass has run since the last crash or failure. Without one, these kinds of
            damage are expected and left out: a torn last audit line, a completed task whose sidecars
            an interrupted rejection already moved to ``failed/``, a failed task whose sidecars an
            interrupted repair already moved to ``attempts/`` (none is a partial file; recovery or the next
            pass finishes each), and a lease left beside a task that has already moved on.
    """
    layout = ProjectLayout(root)
    problems = [f"temp file left: {p.relative_to(root)}" for p in _temps(root)]
    handoff = layout.handoff_dir
    for path in sorted(handoff.rglob("*.json")):
        try:
            strict_loads(path.read_bytes(), source=str(path))
        except ConductorError as exc:
            problems.append(f"partial or invalid JSON visible: {exc}")
    for fork_dir in sorted(handoff.glob("plan_*/fork_*")):
        problems += _fork_problems(layout, fork_dir, finished=finished, recovered=recovered)
    for log in sorted(handoff.rglob("audit.log")):
        report = verify_chain(log)
        damage = [p for p in report.problems if recovered or "unterminated last line (torn write)" not in p]
        if damage:
            problems.append(f"audit chain broken: {log.relative_to(root)}: {damage[:3]}")
    return problems


def _temps(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob(f"{TEMP_PREFIX}*"))


def _fork_problems(layout: ProjectLayout, fork_dir: Path, *, finished: bool, recovered: bool) -> list[str]:
    problems = []
    where: dict[str, list[str]] = {}
    for state in STATES:
        folder = fork_dir / state
        for path in sorted(folder.glob("*")) if folder.is_dir() else []:
            problems += _document_problems(path)
            if path.name.endswith(".task.json"):
                where.setdefault(path.name[: -len(".task.json")], []).append(state)
            if finished and path.name.endswith(PARKED_SUFFIX):
                problems.append(f"parked re-queue left after the plan finished: {path}")
    for task_id, states in where.items():
        if len(states) > 1:
            problems.append(f"{fork_dir.name}/{task_id} is in {len(states)} state folders: {states}")
        state = states[0]
        rejecting = state == "completed" and (fork_dir / "failed" / f"{task_id}.verdict.json").exists()
        # A repair moves a failed attempt's sidecars to attempts/ first and its task file last (conductor.repair).
        archiving = state == "failed" and _archiving(fork_dir, task_id)
        needed = {"completed": (".result.json", ".provenance.json"), "failed": (".result.json",)}.get(state, ())
        for suffix in () if (rejecting or archiving) and not recovered else needed:
            if not (fork_dir / state / f"{task_id}{suffix}").exists():
                problems.append(f"{fork_dir.name}/{state}/{task_id} has no {suffix}")
    for lease in sorted((fork_dir / "in_progress").glob("*.lease.json")) if (fork_dir / "in_progress").is_dir() else []:
        task_id = lease.name[: -len(".lease.json")]
        if finished or (recovered and "in_progress" not in where.get(task_id, [])):
            problems.append(f"lease without its in-progress task: {lease}")
    return problems


def _archiving(fork_dir: Path, task_id: str) -> bool:
    """Is the failed task's own attempt half archived (its result already in ``attempts/``)?"""
    try:
        attempt = read_document(fork_dir / "failed" / f"{task_id}.task.json", Task).attempt
    except (ConductorError, OSError):
        return False
    return (fork_dir / "attempts" / f"{task_id}.a{attempt}.result.json").exists()


def _document_problems(path: Path) -> list[str]:
    for suffix, model in DOCUMENTS:
        if path.name.endswith(suffix):
            try:
                read_document(path, model)
            except ConductorError as exc:
                return [f"invalid document: {exc}"]
    return []


def outcome_problems(trial: Trial) -> list[str]:
    """Every way the finished trial differs from one plan run once, cleanly, to success."""
    problems = state_problems(trial.root, finished=True)
    layout = ProjectLayout(trial.root)
    plans = trial.plan_ids()
    if len(plans) != 1:
        return problems + [f"expected exactly one plan, found {plans}"]
    plan_id = plans[0]
    plan_events = AuditLog(layout.plan_dir(plan_id) / "audit.log").events()
    types = Counter(e.type for e in plan_events)
    finished = [e for e in plan_events if e.type == "plan.finished"]
    if not finished or finished[-1].data.get("status") != "succeeded" or finished[-1].data.get("winner") != "1":
        problems.append(f"plan did not finish with fork 1 winning: {[e.data for e in finished]}")
    if types["plan.finished"] != 1:
        problems.append(f"plan.finished logged {types['plan.finished']} times")
    applied = [e.data.get("fork_id") for e in plan_events if e.type == "plan.applied"]
    if applied != ["1"]:
        problems.append(f"plan.applied events name forks {applied}, expected exactly ['1']")
    fork_state = fork_files(layout, plan_id, "1")
    for name, text in EXPECTED.items():
        actual = (trial.root / name).read_text() if (trial.root / name).exists() else None
        if actual != text:
            problems.append(f"{trial.root / name}: {actual!r}, expected {text!r} (an effect applied twice or lost)")
        in_fork = fork_state.get(name, b"").decode() if name in fork_state else None
        if in_fork != text:
            problems.append(f"fork 1's state {name}: {in_fork!r}, expected {text!r} (an effect applied twice or lost)")
    problems += [f"{trial.root / name} exists: a rejected fork's change reached the project"
                 for name in ABSENT if (trial.root / name).exists()]
    problems += _fork_outcome(layout, plan_id, trial)
    return problems


def _fork_outcome(layout: ProjectLayout, plan_id: str, trial: Trial) -> list[str]:
    problems = []
    executions = trial.executions()
    problems += [f"attempt executed {n} times: {key}" for key, n in executions.items() if n > 1]
    for fork_id, steps in (("1", GOOD_STEPS), ("2", ("step_001",))):
        fork = layout.fork(plan_id, fork_id)
        events = AuditLog(fork.audit_log).events()
        completions = Counter((e.data["step_id"], e.data["attempt"]) for e in events if e.type == "task.completed")
        problems += [f"fork {fork_id}: {key} completed {n} times" for key, n in completions.items() if n > 1]
        for state in ("pending", "in_progress"):
            if fork.task_ids(state):
                problems.append(f"fork {fork_id}: tasks left in {state}/: {fork.task_ids(state)}")
        problems += _stale_publish_rejections(layout, plan_id, fork_id, events)
        merged = Counter(e.data["step_id"] for e in events if e.type == "step.merged")
        accepted = Counter(e.data["step_id"] for e in events if e.type == "step.verified" and e.data["accepted"])
        for step_id in steps:
            if fork_id == "1":
                problems += _good_step(fork, step_id, merged[step_id], accepted[step_id], executions, plan_id)
            elif fork.task_ids("failed") != [step_id] or merged[step_id]:
                problems.append(f"fork 2: {step_id} should be rejected into failed/ (merged {merged[step_id]}x)")
    return problems


def _stale_publish_rejections(layout: ProjectLayout, plan_id: str, fork_id: str, events: list) -> list[str]:
    """Rejections 'not the one published' of a task whose own attempt was published with exactly its checksum."""
    fork = layout.fork(plan_id, fork_id)
    published = {(e.data["step_id"], e.data["attempt"]): e.data["checksum"] for e in events if e.type == "task.published"}
    found = []
    for path in sorted(fork.state_dir("failed").glob("*.verdict.json")):
        verdict = read_document(path, Verdict)
        task_path = fork.task_file("failed", verdict.task_id)
        if any(r.startswith("checksum_mismatch: task file is not the one published") for r in verdict.reasons) \
                and task_path.exists():
            task = read_document(task_path, Task)
            if published.get((task.task_id, task.attempt)) == task.checksum:
                found.append(f"fork {fork_id}: {task.task_id} attempt {task.attempt} rejected as "
                             f"'not the one published', but its own publish event has its checksum")
    return found


def _good_step(fork, step_id: str, merged: int, accepted: int, executions: Counter, plan_id: str) -> list[str]:  # type: ignore[no-untyped-def]
    problems = []
    if merged != 1 or accepted != 1:
        problems.append(f"fork 1: {step_id} merged {merged}x, accepted {accepted}x (expected once each)")
    path = fork.task_file("completed", step_id)
    if not path.exists() or not fork.sidecar("completed", step_id, ".verdict.json").exists():
        return problems + [f"fork 1: {step_id} is not accepted in completed/"]
    attempt = read_document(path, Task).attempt
    if executions[(plan_id, "1", step_id, str(attempt))] != 1:
        problems.append(f"fork 1: the accepted attempt {attempt} of {step_id} ran "
                        f"{executions[(plan_id, '1', step_id, str(attempt))]} times")
    return problems
