"""The audit event of a task that reached ``failed/`` without one.

External executors write no events (docs/protocol.md, section 10): when one fails a task by its own
result, or rejects a task file it will not execute (6.6), only the folders know. The engine logs what
the result says, once, so that ``conductor replay``, ``explain`` and ``verify`` tell the same story as the
folders: ``task.rejected`` for a rejection (``error.kind`` ``checksum_mismatch`` or ``invalid_task``),
``task.failed`` for any other failure.
"""

from __future__ import annotations

from typing import Any

from conductor.errors import IntegrityError
from conductor.handoff.documents import read_document
from conductor.handoff.lease import rejection_event
from conductor.layout import RESULT_SUFFIX, ForkLayout
from conductor.models import Event, Result, parse_time

REJECTION_KINDS = frozenset({"checksum_mismatch", "invalid_task"})
"""``error.kind`` values of a claimer's rejection of a task file (docs/protocol.md, 6.6)."""


def settled_since_publish(events: list[Event], step_id: str) -> bool:
    """Whether the log records an outcome of ``step_id`` after its newest ``task.published``.

    An outcome is ``task.failed``, ``task.rejected`` or ``step.verified``. A rejection may carry an
    attempt salvaged from a damaged file (1), so any attempt counts.
    """
    for event in reversed(events):
        if event.data.get("step_id") != step_id:
            continue
        if event.type in ("task.failed", "task.rejected", "step.verified"):
            return True
        if event.type == "task.published":
            return False
    return False


def unlogged_failure(fork: ForkLayout, step_id: str, attempt: int) -> tuple[str, dict[str, Any]]:
    """The event to log for ``failed/<step_id>.task.json`` whose failure no event records.

    Args:
        attempt: the attempt the log published last (used when the result cannot say).

    Returns:
        ``("task.rejected", {step_id, attempt, kind, message, by, task_checksum})`` when the result is a
        rejection; else ``("task.failed", {step_id, attempt, reason, message, executor?})``, with reason
        ``error.kind`` (or ``failed``), or ``invalid_result`` when the result is missing or unreadable
        (``executor`` and ``duration_seconds``, from the result's times, when it is readable).
    """
    try:
        result = read_document(fork.sidecar("failed", step_id, RESULT_SUFFIX), Result)
    except (FileNotFoundError, IntegrityError) as exc:
        reason = "no result file" if isinstance(exc, FileNotFoundError) else str(exc)
        return "task.failed", {"step_id": step_id, "attempt": attempt, "reason": "invalid_result",
                               "message": f"the task is in failed/ but its result cannot be read: {reason}"}
    error = result.error
    if error is not None and error.kind in REJECTION_KINDS:
        return "task.rejected", rejection_event(step_id, result.attempt, error.kind, error.message,
                                                by=result.executor.id, task_checksum=result.task_checksum)
    try:
        duration = max((parse_time(result.finished_at) - parse_time(result.started_at)).total_seconds(), 0.0)
    except (ValueError, TypeError):  # an external executor's times are free text to the schema
        duration = 0.0
    return "task.failed", {"step_id": step_id, "attempt": result.attempt, "reason": error.kind if error else "failed",
                           "message": (error.message if error else "") or result.summary,
                           "executor": result.executor.id, "duration_seconds": duration}
