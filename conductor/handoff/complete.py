"""Completing a claimed task: result files first, the task file last.

The task file's arrival in ``completed/`` or ``failed/`` is the commit point. Before anything is written
the holder's fencing token is checked under the fork lock, so a zombie executor whose lease expired and
whose task was re-queued cannot overwrite the new attempt's work.
"""

from __future__ import annotations

from conductor.faults import crash_point
from conductor.fsutil import atomic_write, durable_rename
from conductor.handoff.documents import write_document
from conductor.handoff.lease import (
    Claim,
    EventSink,
    _no_events,
    assert_holder,
    fork_lock,
)
from conductor.layout import EXPLANATION_SUFFIX, PROVENANCE_SUFFIX, RESULT_SUFFIX
from conductor.models import Result, parse_time


def complete_task(
    claim: Claim,
    result: Result,
    *,
    explanation: str,
    provenance: bytes | None = None,
    on_event: EventSink = _no_events,
) -> Result:
    """Commit the outcome of ``claim``: write result, explanation and provenance, then move the task.

    Args:
        claim: the held claim.
        result: the executor's result; ``status`` picks ``completed/`` or ``failed/``.
        explanation: Markdown for a human reviewer (``<step>.explanation.md``).
        provenance: the provenance file's bytes (``<step>.provenance.json``), if any.

    Returns:
        The sealed result.

    Raises:
        LeaseLost: the claim's fencing token is stale; nothing was written.
    """
    fork, task_id = claim.fork, claim.task.task_id
    state = "completed" if result.status == "completed" else "failed"
    with fork_lock(fork):
        assert_holder(claim)
        sealed = write_document(fork.sidecar(state, task_id, RESULT_SUFFIX), result)
        crash_point("complete.after_result")
        atomic_write(fork.sidecar(state, task_id, EXPLANATION_SUFFIX), explanation.encode("utf-8"))
        crash_point("complete.after_explanation")
        if provenance is not None:
            atomic_write(fork.sidecar(state, task_id, PROVENANCE_SUFFIX), provenance)
        crash_point("complete.before_task_move")
        durable_rename(claim.task_path, fork.task_file(state, task_id))
        crash_point("complete.after_task_move")
        fork.lease_file(task_id).unlink(missing_ok=True)
    crash_point("complete.before_event")
    duration = (parse_time(result.finished_at) - parse_time(result.started_at)).total_seconds()
    data = {"step_id": task_id, "attempt": claim.task.attempt, "executor": result.executor.id, "duration_seconds": duration}
    if result.status == "completed":
        on_event("task.completed", data)
    else:
        error = result.error
        on_event("task.failed", {**data, "reason": error.kind if error else "failed", "message": error.message if error else ""})
    return sealed
