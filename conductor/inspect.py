"""Read-only views of plans for people and scripts: status, events, the story of one step.

Everything here is derived from the folders and the audit logs; nothing is written.
"""

from __future__ import annotations

from typing import Any

from conductor.canonical import strict_loads
from conductor.errors import ConductorError, NotFound
from conductor.layout import (
    EXPLANATION_SUFFIX,
    RESULT_SUFFIX,
    STATES,
    VERDICT_SUFFIX,
    ProjectLayout,
)
from conductor.models import Event
from conductor.plan_store import fork_log, load_plan, plan_log


def _safe_events(log: Any) -> list[Event]:
    try:
        return log.events()
    except ConductorError:
        return []


def step_state(layout: ProjectLayout, plan_id: str, fork_id: str, step_id: str, events: list[Event]) -> str:
    """The step's state as people see it: a folder name, ``accepted``, ``awaiting_approval`` or ``not_published``."""
    fork = layout.fork(plan_id, fork_id)
    found = fork.find_task(step_id)
    if found is not None:
        state = found[0]
        if state == "completed" and fork.sidecar("completed", step_id, VERDICT_SUFFIX).exists():
            return "accepted"
        return state
    requested = any(e.type == "approval.requested" and e.data.get("step_id") == step_id for e in events)
    granted = any(e.type == "approval.granted" and e.data.get("step_id") == step_id for e in events)
    return "awaiting_approval" if requested and not granted else "not_published"


def plan_status(layout: ProjectLayout, plan_id: str) -> dict[str, Any]:
    """One plan's status: goal, whether it finished, and each fork's steps with their states.

    Returns:
        ``{"plan_id", "goal", "created_at", "status", "forks": [{"fork_id", "strategy", "status",
        "counts": {state: n}, "steps": [{"step_id", "title", "state", "attempt", "confidence"}]}]}``
    """
    plan = load_plan(layout, plan_id)
    plan_events = _safe_events(plan_log(layout, plan_id, cut_torn_tail=False))
    finished = [e for e in plan_events if e.type == "plan.finished"]
    forks = []
    for spec in plan.forks:
        events = _safe_events(fork_log(layout, plan_id, spec.fork_id, cut_torn_tail=False))
        steps = []
        for step in spec.steps:
            published = [e for e in events if e.type == "task.published" and e.data.get("step_id") == step.step_id]
            scored = [e for e in events if e.type == "confidence.scored" and e.data.get("step_id") == step.step_id]
            steps.append({
                "step_id": step.step_id, "title": step.title,
                "state": step_state(layout, plan_id, spec.fork_id, step.step_id, events),
                "attempt": published[-1].data.get("attempt") if published else None,
                "confidence": scored[-1].data.get("level") if scored else None,
            })
        counts = {state: 0 for state in ("not_published", "awaiting_approval", *STATES, "accepted")}
        for step in steps:
            counts[step["state"]] += 1
        done = [e for e in events if e.type == "fork.finished"]
        forks.append({
            "fork_id": spec.fork_id, "strategy": spec.strategy.name,
            "status": done[-1].data.get("status") if done else "running",
            "counts": counts, "steps": steps,
        })
    return {
        "plan_id": plan_id, "goal": plan.goal, "created_at": plan.created_at,
        "status": finished[-1].data.get("status") if finished else "unfinished",
        "forks": forks,
    }


def list_events(
    layout: ProjectLayout, plan_id: str, *, fork_id: str | None = None, step_id: str | None = None,
    types: tuple[str, ...] = (),
) -> list[dict[str, Any]]:
    """The plan's audit events, oldest first, filtered.

    Args:
        types: event types or prefixes (``task`` matches ``task.claimed``…); empty = all.

    Returns:
        ``[{"index", "log", "seq", "ts", "type", "data"}]`` in timeline order; ``index`` is the event's
        position in the plan's merged timeline (what ``conductor replay --to`` takes), ``log`` is
        ``"plan"`` or ``"fork <id>"``.
    """
    from conductor.replay import timeline

    rows = []
    for entry in timeline(layout, load_plan(layout, plan_id)):
        event = entry.event
        if fork_id is not None and entry.log != fork_id:
            continue
        if step_id is not None and event.data.get("step_id") != step_id:
            continue
        if types and not any(event.type == t or event.type.startswith(t + ".") for t in types):
            continue
        label = "plan" if entry.log == "plan" else f"fork {entry.log}"
        rows.append({"index": entry.index, "log": label, "seq": event.seq, "ts": event.ts, "type": event.type,
                     "data": event.data})
    return rows


def _read_json(path: Any) -> Any:
    try:
        return strict_loads(path.read_bytes(), source=str(path))
    except (OSError, ConductorError):
        return None


def _signatures(fork: Any, folder: str, step_id: str, result: Any, trust: Any) -> dict[str, Any]:
    """Which trusted keys signed the step's provenance and attestation, or why they do not verify."""
    from conductor.layout import ATTESTATION_SUFFIX, PROVENANCE_SUFFIX
    from conductor.provenance import read_provenance

    executor = result.get("executor", {}).get("id") if isinstance(result, dict) else None
    checked: dict[str, Any] = {}
    for name, suffix, who in (("provenance", PROVENANCE_SUFFIX, executor), ("attestation", ATTESTATION_SUFFIX, None)):
        path = fork.sidecar(folder, step_id, suffix)
        if not path.exists():
            checked[name] = {"present": False}
            continue
        try:
            read = read_provenance(path, trust, executor_id=who, require_signature=False)
            checked[name] = {"present": True, "signed_by": read.signed_by, "subjects": read.subjects}
        except (ConductorError, OSError) as exc:
            checked[name] = {"present": True, "error": str(exc)}
    return checked


def _content_checksum(path: Any) -> str | None:
    """The checksum of a task file's content (section 3), whatever its ``checksum`` field claims: a
    tampered file keeps the published value in that field. None when the file does not parse."""
    from conductor.canonical import compute_checksum

    document = _read_json(path)
    if not isinstance(document, dict):
        return None
    try:
        return compute_checksum(document)
    except ConductorError:
        return None


def _rejection(events: list[Event]) -> dict[str, Any] | None:
    """The ``task.rejected`` event of the newest attempt (its data, with ``seq`` and ``ts``), or None."""
    for event in reversed(events):
        if event.type == "task.published":
            return None
        if event.type == "task.rejected":
            return {"seq": event.seq, "ts": event.ts, **event.data}
    return None


def _attempts(layout: ProjectLayout, fork: Any, step_id: str, found: Any, result: Any) -> list[dict[str, Any]]:
    """The step's attempts, oldest first: each archived one (``conductor.repair.history``: what it tried,
    why it was rejected) and the current one (``archived: false``, from the folders)."""
    from conductor.repair import history

    attempts = history(layout, fork, step_id)
    task = _read_json(found[1]) if found else None
    if isinstance(task, dict) and isinstance(task.get("attempt"), int):
        verdict = _read_json(fork.sidecar(found[0], step_id, VERDICT_SUFFIX))
        verdict = verdict if isinstance(verdict, dict) else None
        result = result if isinstance(result, dict) else None
        outcome = {"pending": "pending", "in_progress": "in progress", "completed": "awaiting verification"}.get(found[0])
        if verdict is not None:
            outcome = "accepted" if verdict.get("accepted") else "rejected"
        elif found[0] == "failed":
            outcome = "failed"
        attempts.append({
            "attempt": task["attempt"], "archived": False, "outcome": outcome,
            "reasons": list(verdict.get("reasons", [])) if verdict else
            [f"{result['error'].get('kind')}: {result['error'].get('message')}"]
            if result and isinstance(result.get("error"), dict) else [],
            "summary": result.get("summary", "") if result else "",
            "files": [c.get("path") for c in (verdict or result or {}).get("files_changed", []) if isinstance(c, dict)],
            "executor": (result.get("executor") or {}).get("id") if result else None,
        })
    return attempts


def _lessons(layout: ProjectLayout, plan_id: str, fork_id: str, step_id: str, found: Any) -> dict[str, Any]:
    """``{"received": [constraint lines], "taught": [lesson objects]}``: the lessons of earlier rejections
    the step's task carries, and those its own rejected attempts left (``conductor.lessons``)."""
    from conductor.lessons import lessons_of_step, received_lessons

    task = _read_json(found[1]) if found else None
    constraints = task.get("constraints", []) if isinstance(task, dict) else []
    return {"received": received_lessons(constraints if isinstance(constraints, list) else []),
            "taught": lessons_of_step(layout.lessons_file, plan_id, fork_id, step_id)}


def explain_step(
    layout: ProjectLayout, plan_id: str, step_id: str, fork_id: str | None = None, *, trust: Any = None,
) -> list[dict[str, Any]]:
    """The whole decision trail of one step in each fork (or one fork).

    Each story holds: the task as it is now (``task``, and ``task_content_checksum``, the checksum of its
    content, which a tampered file no longer matches whatever its ``checksum`` field says) and the
    checksum the log recorded at publication, the effective policy and where each value came from, the confidence and its reasons,
    the claims and leases (events, and the live lease if the task is in progress), the result, the
    verdict with its checks and verification evidence, the ``task.rejected`` event if a claimer refused
    the newest attempt's task file (``rejection``), every attempt of the step, archived ones first
    (``attempts``: outcome, reasons, summary, files; see ``conductor.repair``), the lessons its task
    received and those it taught (``lessons``: ``conductor.lessons``), the executor's explanation, and the signatures
    checked on ``provenance.json`` and ``attestation.json`` against ``trust`` (a ``TrustStore``; None
    skips that check).

    Raises:
        NotFound: no fork of the plan has that step.
    """
    plan = load_plan(layout, plan_id)
    stories = []
    for spec in plan.forks:
        if fork_id is not None and spec.fork_id != fork_id:
            continue
        step = next((s for s in spec.steps if s.step_id == step_id), None)
        if step is None:
            continue
        fork = layout.fork(plan_id, spec.fork_id)
        events = _safe_events(fork_log(layout, plan_id, spec.fork_id, cut_torn_tail=False))
        found = fork.find_task(step_id)
        state = found[0] if found else None
        folder = state or "pending"
        explanation = fork.sidecar(folder, step_id, EXPLANATION_SUFFIX)
        mine = [e for e in events if e.data.get("step_id") == step_id]
        last = {e.type: e.data for e in mine}
        result = _read_json(fork.sidecar(folder, step_id, RESULT_SUFFIX))
        stories.append({
            "fork_id": spec.fork_id, "strategy": spec.strategy.name, "step": step.model_dump(mode="json"),
            "state": step_state(layout, plan_id, spec.fork_id, step_id, events),
            "task": _read_json(found[1]) if found else None,
            "task_content_checksum": _content_checksum(found[1]) if found else None,
            "published_checksum": last.get("task.published", {}).get("checksum"),
            "policy": last.get("policy.merged"),
            "confidence": last.get("confidence.scored"),
            "claims": [{"type": e.type, "ts": e.ts, **e.data} for e in mine
                       if e.type in ("task.claimed", "task.lease_expired", "task.abandoned", "task.published")],
            "lease": _read_json(fork.lease_file(step_id)) if state == "in_progress" else None,
            "result": result,
            "verdict": _read_json(fork.sidecar(folder, step_id, VERDICT_SUFFIX)),
            "explanation": explanation.read_text("utf-8", errors="replace") if explanation.exists() else None,
            "events": [{"seq": e.seq, "ts": e.ts, "type": e.type, "data": e.data} for e in mine],
            "rejection": _rejection(mine),
            "lessons": _lessons(layout, plan_id, spec.fork_id, step_id, found),
            "signatures": _signatures(fork, folder, step_id, result, trust) if trust is not None else None,
            "attempts": _attempts(layout, fork, step_id, found, result),
        })
    if not stories:
        raise NotFound(f"no step {step_id!r} in plan {plan_id}" + (f" fork {fork_id}" if fork_id else ""))
    return stories
