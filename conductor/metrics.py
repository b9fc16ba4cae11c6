"""Handoff metrics: task counts per state, attempt durations, retries and LLM usage.

Sources:
    * every ``handoff/plan_*/fork_*`` folder (plan.json not required, so a half-created plan shows);
    * the state folders of each fork (``pending/``, ``in_progress/``, ``completed/``, ``failed/``):
      the number of ``*.task.json`` files in each, i.e. where every step is now;
    * each fork's ``audit.log``: an attempt is a ``(step_id, attempt)`` pair. Its duration runs from
      ``task.claimed`` to its first ``task.completed`` or ``task.failed`` (for an external executor,
      which writes no events, the ``duration_seconds`` of the ``task.failed`` the engine logs from its
      result); its outcome is its *last* terminal event — ``task.completed``, ``task.failed``, or the
      verifier's ``step.verified`` (accepted: completed, rejected: failed) — so the verifier's word
      overrides the executor's, and an external executor's accepted steps count as completed although it
      logged no ``task.completed``. ``success_rate = completed / (completed + failed)`` over attempts
      with an outcome;
    * the plan-level ``audit.log``: ``llm.call`` events of planning.

Definitions:
    * ``retries``: attempts numbered above 1 that were published or claimed (each is one retry,
      whatever caused it); ``lease_expirations`` counts ``task.lease_expired`` events separately;
    * ``verification_rejections``: ``step.verified`` events with ``accepted`` false;
    * ``task_rejections``: attempts with a ``task.rejected`` event (a claimer refused a tampered or
      malformed task file unexecuted); not an outcome of an execution, so not in ``success_rate``;
    * percentiles are nearest-rank: the p-th percentile of N sorted values is the value at rank
      ``ceil(p / 100 * N)`` (1-based), so it is always an observed duration.

Output (``handoff/metrics.json``)::

    {"generated_at": "<RFC 3339>",
     "totals": <tally>,
     "plans": {plan_id: {"planning": <llm>, "totals": <tally>, "forks": {fork_id: <tally>}}},
     "errors": [{"path": "<log>", "error": "<message>"}]}

    <tally> = {"tasks": {state: n}, "attempts": {"completed": n, "failed": n}, "success_rate": x | null,
               "duration_seconds": {"count", "mean", "p50", "p95"}, "retries", "lease_expirations",
               "verification_rejections", "task_rejections", "llm": <llm>}
    <llm>   = {"calls", "input_tokens", "output_tokens", "cost_usd"}

Durations, means and costs are rounded to microseconds; a log that fails to parse is listed under
``errors`` and contributes nothing but its fork's folder counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from conductor.audit import AuditLog
from conductor.canonical import pretty_bytes
from conductor.errors import ConductorError
from conductor.fsutil import atomic_write
from conductor.layout import STATES, ProjectLayout
from conductor.models import Event, parse_time, utc_now

_TERMINAL = {"task.completed": "completed", "task.failed": "failed"}


def percentile(values: list[float], p: float) -> float | None:
    """Nearest-rank percentile: the value at 1-based rank ``ceil(p / 100 * N)`` of the sorted values.

    Args:
        values: observations (any order).
        p: the percentile, 0 < p <= 100.

    Returns:
        An element of ``values``, or None if ``values`` is empty.
    """
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class _Llm:
    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    cached_calls: int = 0

    def add_call(self, data: dict[str, Any]) -> None:
        self.calls += 1
        if data.get("cached"):  # answered from a recording: no tokens spent, nothing paid now
            self.cached_calls += 1
            return
        self.input_tokens += int(_number(data.get("input_tokens")))
        self.output_tokens += int(_number(data.get("output_tokens")))
        self.cost_usd += _number(data.get("cost_usd"))

    def merge(self, other: _Llm) -> None:
        self.calls += other.calls
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cost_usd += other.cost_usd
        self.cached_calls += other.cached_calls

    def to_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cost_usd": round(self.cost_usd, 6),
            **({"cached_calls": self.cached_calls} if self.cached_calls else {}),
        }


@dataclass
class _Tally:
    """Additive counters of one fork, plan or project; durations stay raw so percentiles can be pooled."""

    tasks: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATES, 0))
    completed: int = 0
    failed: int = 0
    durations: list[float] = field(default_factory=list)
    retries: int = 0
    lease_expirations: int = 0
    verification_rejections: int = 0
    task_rejections: int = 0
    llm: _Llm = field(default_factory=_Llm)

    def merge(self, other: _Tally) -> None:
        for state, count in other.tasks.items():
            self.tasks[state] += count
        self.completed += other.completed
        self.failed += other.failed
        self.durations.extend(other.durations)
        self.retries += other.retries
        self.lease_expirations += other.lease_expirations
        self.verification_rejections += other.verification_rejections
        self.task_rejections += other.task_rejections
        self.llm.merge(other.llm)

    def to_dict(self) -> dict[str, Any]:
        outcomes = self.completed + self.failed
        return {
            "tasks": dict(self.tasks),
            "attempts": {"completed": self.completed, "failed": self.failed},
            "success_rate": round(self.completed / outcomes, 6) if outcomes else None,
            "duration_seconds": _duration_stats(self.durations),
            "retries": self.retries,
            "lease_expirations": self.lease_expirations,
            "verification_rejections": self.verification_rejections,
            "task_rejections": self.task_rejections,
            "llm": self.llm.to_dict(),
        }


def compute_metrics(layout: ProjectLayout, *, now: str | None = None) -> dict[str, Any]:
    """Compute handoff metrics of every plan and fork under ``handoff/``.

    Args:
        layout: the project.
        now: the ``generated_at`` timestamp (default: the current UTC time).

    Returns:
        The metrics document described in this module's docstring. Never raises for a broken
        audit log: the log is named in ``errors`` instead.
    """
    errors: list[dict[str, str]] = []
    totals = _Tally()
    plans: dict[str, Any] = {}
    for plan_dir in _subdirs(layout.handoff_dir, "plan_"):
        plan_tally, plan_entry = _plan_metrics(layout, plan_dir, errors)
        totals.merge(plan_tally)
        plans[plan_dir.name[len("plan_"):]] = plan_entry
    return {"generated_at": now or utc_now(), "totals": totals.to_dict(), "plans": plans, "errors": errors}


def write_metrics(layout: ProjectLayout, *, now: str | None = None) -> dict[str, Any]:
    """Compute the metrics and write them durably to ``handoff/metrics.json`` (temp + fsync + rename).

    Returns:
        The metrics written.

    Raises:
        OSError: the file could not be written.
    """
    metrics = compute_metrics(layout, now=now)
    layout.handoff_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(layout.metrics_file, pretty_bytes(metrics))
    return metrics


def _plan_metrics(layout: ProjectLayout, plan_dir: Path, errors: list[dict[str, str]]) -> tuple[_Tally, dict]:
    plan_id = plan_dir.name[len("plan_"):]
    plan_tally = _Tally()
    forks: dict[str, Any] = {}
    for fork_dir in _subdirs(plan_dir, "fork_"):
        fork_id = fork_dir.name[len("fork_"):]
        tally = _fork_tally(layout, plan_id, fork_id, errors)
        plan_tally.merge(tally)
        forks[fork_id] = tally.to_dict()
    planning = _Llm()
    for event in _events(plan_dir / "audit.log", layout, errors):
        if event.type == "llm.call":
            planning.add_call(event.data)
    plan_tally.llm.merge(planning)
    return plan_tally, {"planning": planning.to_dict(), "totals": plan_tally.to_dict(), "forks": forks}


def _fork_tally(layout: ProjectLayout, plan_id: str, fork_id: str, errors: list[dict[str, str]]) -> _Tally:
    fork = layout.fork(plan_id, fork_id)
    tally = _Tally(tasks={state: len(fork.task_ids(state)) for state in STATES})
    _fold_events(tally, _events(fork.audit_log, layout, errors))
    return tally


def _fold_events(tally: _Tally, events: list[Event]) -> None:
    claimed: dict[tuple[str, int], datetime] = {}
    outcome: dict[tuple[str, int], str] = {}
    retried: set[tuple[str, int]] = set()
    rejected: set[tuple[str, int]] = set()  # one per attempt, should two processes both log it
    for event in events:
        key = (str(event.data.get("step_id")), int(_number(event.data.get("attempt"))))
        if event.type in ("task.published", "task.claimed") and key[1] > 1:
            retried.add(key)
        if event.type == "task.claimed":
            claimed.setdefault(key, parse_time(event.ts))
        elif event.type in _TERMINAL:
            if key not in outcome:
                duration = _duration(event, claimed.get(key))
                if duration is not None:
                    tally.durations.append(duration)
            outcome[key] = _TERMINAL[event.type]
        elif event.type == "task.lease_expired":
            tally.lease_expirations += 1
        elif event.type == "step.verified":
            accepted = event.data.get("accepted") is True
            outcome[key] = "completed" if accepted else "failed"
            tally.verification_rejections += 0 if accepted else 1
        elif event.type == "task.rejected":
            rejected.add(key)
        elif event.type == "llm.call":
            tally.llm.add_call(event.data)
    tally.retries = len(retried)
    tally.task_rejections = len(rejected)
    tally.completed = sum(1 for value in outcome.values() if value == "completed")
    tally.failed = sum(1 for value in outcome.values() if value == "failed")


def _duration(event: Event, claimed: datetime | None) -> float | None:
    """Seconds from the claim to ``event``; without a claim (an external executor's failure, logged by
    the engine), the ``duration_seconds`` the event carries; else None."""
    if claimed is not None:
        # timedelta arithmetic keeps microseconds exact (epoch floats would not)
        return (parse_time(event.ts) - claimed).total_seconds()
    value = event.data.get("duration_seconds")
    return _number(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _events(path: Path, layout: ProjectLayout, errors: list[dict[str, str]]) -> list[Event]:
    try:
        return AuditLog(path).events()
    except (ConductorError, OSError) as exc:
        errors.append({"path": _display(path, layout), "error": str(exc)})
        return []


def _duration_stats(durations: list[float]) -> dict[str, Any]:
    def rounded(value: float | None) -> float | None:
        return None if value is None else round(value, 6)

    mean = sum(durations) / len(durations) if durations else None
    return {
        "count": len(durations),
        "mean": rounded(mean),
        "p50": rounded(percentile(durations, 50)),
        "p95": rounded(percentile(durations, 95)),
    }


def _subdirs(folder: Path, prefix: str) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(prefix))


def _number(value: Any) -> float:
    # Event data is written by the engine but read back untrusted: anything not a number counts as 0.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    return float(value) if math.isfinite(value) else 0.0


def _display(path: Path, layout: ProjectLayout) -> str:
    try:
        return path.relative_to(layout.root).as_posix()
    except ValueError:
        return str(path)
