"""Pre-execution confidence of a step: the planner's estimate, tempered by this project's history.

The scorer (documented in docs/confidence.md):

1. ``prior`` = the planner's own estimate for the step, or 0.7 when it gave none.
2. ``history`` = the smoothed success rate of earlier steps in this project run by the same kind of
   executor: ``(accepted + 1) / (n + 2)`` (Laplace's rule of succession).
3. The two are blended by how much history there is: ``w = n / (n + 10)``, so ten recorded outcomes
   weigh as much as the planner; ``score = (1 - w) * prior + w * history``.
4. A wide scope costs confidence: minus 0.03 for each allowed-file entry beyond three, and minus 0.1 for
   any wildcard entry, at most 0.2 in all; the score is clamped to [0, 1] and rounded to 3 decimals.

Levels: high ≥ 0.8 (runs autonomously), medium ≥ 0.5 (runs with extra verification), low below 0.5
(waits for ``conductor approve``). History lives in ``.conductor/history.jsonl``, one JSON object per
verified step: ``{"ts", "plan_id", "fork_id", "step_id", "executor", "accepted"}``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from filelock import FileLock

from conductor.models import Confidence, ConfidenceLevel, utc_now

DEFAULT_PRIOR = 0.7
HISTORY_WEIGHT_HALF = 10  # outcomes at which history weighs as much as the planner
HIGH, MEDIUM = 0.8, 0.5


def level_for(score: float) -> ConfidenceLevel:
    """The level of a score: high ≥ 0.8, medium ≥ 0.5, low otherwise."""
    if score >= HIGH:
        return "high"
    if score >= MEDIUM:
        return "medium"
    return "low"


def read_history(path: Path, executor: str) -> tuple[int, int]:
    """(accepted, total) outcomes recorded for ``executor``; unreadable lines are skipped."""
    if not path.exists():
        return 0, 0
    accepted = total = 0
    for line in path.read_text("utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("executor") == executor:
            total += 1
            accepted += bool(entry.get("accepted"))
    return accepted, total


def record_outcome(path: Path, *, plan_id: str, fork_id: str, step_id: str, executor: str, accepted: bool) -> None:
    """Append one verified outcome to the history file (cross-process safe, fsynced)."""
    line = json.dumps({"ts": utc_now(), "plan_id": plan_id, "fork_id": fork_id, "step_id": step_id,
                       "executor": executor, "accepted": accepted}) + "\n"
    with FileLock(str(path) + ".lock"):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)


def score_step(
    *, estimate: float | None, allowed_files: list[str], accepted: int, total: int
) -> Confidence:
    """Score one step before it runs (see the module docstring for the formula).

    Args:
        estimate: the planner's probability that the step succeeds, in [0, 1], or None.
        allowed_files: the step's allowed-file entries.
        accepted: accepted outcomes in this project's history for the executor kind.
        total: all outcomes in that history.

    Returns:
        The confidence with the reasons for its value.
    """
    prior = DEFAULT_PRIOR if estimate is None else estimate
    reasons = [f"planner estimate {prior:.2f}" + (" (default)" if estimate is None else "")]
    weight = total / (total + HISTORY_WEIGHT_HALF)
    history = (accepted + 1) / (total + 2)
    score = (1 - weight) * prior + weight * history
    if total:
        reasons.append(f"history {accepted}/{total} accepted → {history:.2f}, weight {weight:.2f}")
    else:
        reasons.append("no history yet")
    penalty = 0.03 * max(0, len(allowed_files) - 3)
    if any(ch in entry for entry in allowed_files for ch in "*?[") or any(e.endswith("/") for e in allowed_files):
        penalty += 0.1
    penalty = min(penalty, 0.2)
    if penalty:
        reasons.append(f"wide scope −{penalty:.2f}")
    score = round(min(1.0, max(0.0, score - penalty)), 3)
    return Confidence(score=score, level=level_for(score), reasons=reasons)
