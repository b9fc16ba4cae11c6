"""``conductor cost``: what the ledger's calls cost, by plan, fork, step and model, and what replays saved.

Folds the lines of ``.conductor/ledger.jsonl`` (``conductor.llm.ledger``): a ``call`` line is spending
(its tokens, and its USD when the model had a price), a ``cached`` line is a replay (free; its tokens and
``saved_usd`` are what it saved), and a ``reserve`` line that nothing settled is *held*: a call in flight,
or one whose process died mid-call (the budget counts it at its worst case).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from conductor.llm.ledger import Ledger


@dataclass
class Spend:
    """Totals of a group of ledger lines. Tokens are counts; USD is ``None`` when no line had a price."""

    calls: int = 0
    cached_calls: int = 0
    failed_calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    usd: float | None = None
    saved_tokens: int = 0
    saved_usd: float | None = None
    held_calls: int = 0
    held_tokens: int = 0
    held_usd: float | None = None

    def add(self, entry: dict[str, Any]) -> None:
        kind = entry.get("kind")
        if kind == "call":
            self.calls += 1
            self.failed_calls += bool(entry.get("error"))
            self.input_tokens += _int(entry.get("input_tokens"))
            self.output_tokens += _int(entry.get("output_tokens"))
            self.usd = _plus(self.usd, entry.get("usd"))
        elif kind == "cached":
            self.cached_calls += 1
            self.saved_tokens += _int(entry.get("input_tokens")) + _int(entry.get("output_tokens"))
            self.saved_usd = _plus(self.saved_usd, entry.get("saved_usd"))
        elif kind == "reserve":
            self.held_calls += 1
            self.held_tokens += _int(entry.get("tokens"))
            self.held_usd = _plus(self.held_usd, entry.get("usd"))

    def to_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls, "cached_calls": self.cached_calls, "failed_calls": self.failed_calls,
            "input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
            "tokens": self.input_tokens + self.output_tokens, "usd": _round(self.usd),
            "saved_tokens": self.saved_tokens, "saved_usd": _round(self.saved_usd),
            "held_calls": self.held_calls, "held_tokens": self.held_tokens, "held_usd": _round(self.held_usd),
        }


@dataclass
class _Plan:
    total: Spend = field(default_factory=Spend)
    forks: dict[str, Spend] = field(default_factory=dict)
    steps: dict[tuple[str, str], Spend] = field(default_factory=dict)
    models: dict[tuple[str, str], Spend] = field(default_factory=dict)


def cost_report(ledger: Ledger, plan_id: str | None = None) -> dict[str, Any]:
    """Spending by plan, and within each plan by fork, by step (of a fork) and by provider/model.

    Args:
        plan_id: only this plan; ``None``: every plan in the ledger (calls made outside any plan are
            grouped under ``plan_id`` ``null``).

    Returns:
        ``{"plans": [{"plan_id", **totals, "forks": [{"fork_id", **totals}], "steps": [{"fork_id",
        "step_id", **totals}], "models": [{"provider", "model", **totals}]}], "total": totals}`` where
        ``totals`` is :meth:`Spend.to_dict` (``usd`` and ``saved_usd`` in USD, ``None`` without prices).
        The planner's call belongs to the plan but to no fork or step.
    """
    entries = ledger.entries()
    settled = {str(e.get("reservation")) for e in entries if e.get("kind") in ("call", "release")}
    plans: dict[str | None, _Plan] = {}
    total = Spend()
    for entry in entries:
        if entry.get("kind") not in ("call", "cached", "reserve"):
            continue
        if entry.get("kind") == "reserve" and entry.get("id") in settled:
            continue  # a settled reservation is counted by its call line
        if plan_id is not None and entry.get("plan_id") != plan_id:
            continue
        group = plans.setdefault(entry.get("plan_id"), _Plan())
        for spend in _groups(group, entry):
            spend.add(entry)
        total.add(entry)
    return {"plans": [_plan_dict(pid, group) for pid, group in plans.items()], "total": total.to_dict()}


def _groups(group: _Plan, entry: dict[str, Any]) -> list[Spend]:
    found = [group.total, group.models.setdefault((str(entry.get("provider")), str(entry.get("model"))), Spend())]
    fork_id, step_id = entry.get("fork_id"), entry.get("step_id")
    if fork_id is not None:
        found.append(group.forks.setdefault(str(fork_id), Spend()))
        if step_id is not None:
            found.append(group.steps.setdefault((str(fork_id), str(step_id)), Spend()))
    return found


def _plan_dict(plan_id: str | None, group: _Plan) -> dict[str, Any]:
    def number(text: str) -> tuple[int, str]:
        return (len(text), text)  # fork "10" after fork "9"

    return {
        "plan_id": plan_id, **group.total.to_dict(),
        "forks": [{"fork_id": f, **s.to_dict()} for f, s in sorted(group.forks.items(), key=lambda i: number(i[0]))],
        "steps": [{"fork_id": f, "step_id": st, **s.to_dict()}
                  for (f, st), s in sorted(group.steps.items(), key=lambda i: (number(i[0][0]), i[0][1]))],
        "models": [{"provider": p, "model": m, **s.to_dict()} for (p, m), s in sorted(group.models.items())],
    }


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _plus(total: float | None, value: object) -> float | None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return total
    return (total or 0.0) + float(value)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 9)
