"""Completing a claimed task: result files first, the task file last.

The task file's arrival in ``completed/`` or ``failed/`` is the commit point. Before anything is written
the holder's fencing token is checked under the fork lock, so a zombie executor whose lease expired and
whose task was re-queued cannot overwrite the new attempt's work.

The fork lock is held only for the renames: every file's bytes are written (all of them, then each is
fsynced: one journal commit can carry the three) before it is taken,
the three sidecar names share one folder fsync (before the commit point, so they are durable first), and
the commit rename's folders are fsynced after it is released (whoever reads the folders next sees the
rename at once; the fsyncs only make it survive a power loss).
"""

from __future__ import annotations

from pathlib import Path

from conductor.faults import crash_point
from conductor.fsutil import commit_temp, fsync_dir, rename_file, sync_rename, write_temps
from conductor.handoff.documents import sealed_bytes
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
        StorageError: a write, rename or fsync failed; the task is still in progress unless only an fsync
            after the commit rename failed.
    """
    fork, task_id = claim.fork, claim.task.task_id
    state = "completed" if result.status == "completed" else "failed"
    sealed, result_bytes = sealed_bytes(result)
    files = [(RESULT_SUFFIX, result_bytes), (EXPLANATION_SUFFIX, explanation.encode("utf-8"))]
    if provenance is not None:
        files.append((PROVENANCE_SUFFIX, provenance))
    target = fork.task_file(state, task_id)
    temps: list[tuple[str, Path, Path]] = []
    try:
        paths = [fork.sidecar(state, task_id, suffix) for suffix, _data in files]
        written = write_temps([(path, data) for path, (_suffix, data) in zip(paths, files, strict=True)])
        temps = [(suffix, temp, path) for (suffix, _data), temp, path in zip(files, written, paths, strict=True)]
        with fork_lock(fork):
            assert_holder(claim)
            for suffix, temp, path in temps:
                commit_temp(temp, path)
                if suffix == RESULT_SUFFIX:
                    crash_point("complete.after_result")
                elif suffix == EXPLANATION_SUFFIX:
                    crash_point("complete.after_explanation")
            fsync_dir(target.parent)  # the sidecars are durable before the commit point
            crash_point("complete.before_task_move")
            rename_file(claim.task_path, target)
            crash_point("complete.after_task_move")
            fork.lease_file(task_id).unlink(missing_ok=True)
    except BaseException:
        for _, temp, _ in temps:
            temp.unlink(missing_ok=True)  # those not renamed yet (a renamed temp's name is gone)
        raise
    sync_rename(claim.task_path, target)
    crash_point("complete.before_event")
    duration = (parse_time(result.finished_at) - parse_time(result.started_at)).total_seconds()
    data = {"step_id": task_id, "attempt": claim.task.attempt, "executor": result.executor.id, "duration_seconds": duration}
    if result.status == "completed":
        on_event("task.completed", data)
    else:
        error = result.error
        on_event("task.failed", {**data, "reason": error.kind if error else "failed", "message": error.message if error else ""})
    return Result.model_validate(sealed)
