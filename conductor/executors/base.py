"""What every Conductor-run executor does around its own work on a claimed task.

``execute_claim`` renews the lease by heartbeat while the runner works, then finds what really changed
(the workspace's tree against the task's base commit, not what the runner says), builds the result, the
explanation and the provenance statement, and commits them with ``complete_task``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

from conductor import __version__
from conductor.attempts import attempt_changes, hand_over, task_workspace
from conductor.canonical import sha256_hex, strict_loads
from conductor.errors import BudgetExceeded, ConductorError, IntegrityError, LeaseLost
from conductor.faults import crash_point
from conductor.fsutil import StorageError
from conductor.handoff.complete import complete_task
from conductor.handoff.documents import sealed_bytes
from conductor.handoff.lease import (
    Claim,
    EventSink,
    _no_events,
    assert_holder,
    fork_lock,
    reject_task_file,
    renew_lease,
)
from conductor.handoff.reaper import requeue_task
from conductor.layout import ProjectLayout
from conductor.models import ErrorInfo, ExecutorInfo, Result, Task, Usage, utc_now
from conductor.keys import SigningKey
from conductor.provenance import build_statement, envelope_for
from conductor.redact import redact
from conductor.workspace.checkout import settle


@dataclass
class Outcome:
    """What a runner reports about its work on one task.

    ``contained``: nothing the runner started can still write the workspace (it started no process, or
    all it started are known to be gone); the capture after the run is then sealed for this process's
    verifier (:mod:`conductor.workspace.sealed`). False whenever in doubt.
    """

    status: Literal["completed", "failed"]
    summary: str
    explanation: str
    error: ErrorInfo | None = None
    usage: Usage = field(default_factory=Usage)
    contained: bool = False


class StepRunner(Protocol):
    """Does the actual work of a task inside its workspace.

    A runner may say ``starts_processes = False`` (read with ``getattr``, True when absent): it works in
    this process alone, so nothing of its work outlives this process (see :func:`starts_no_process`).
    """

    info: ExecutorInfo

    def run(self, task: Task, workspace: Path, should_stop: Callable[[], bool]) -> Outcome:
        """Work on ``task`` in ``workspace``; poll ``should_stop`` and give up when it turns true.

        ``execute_claim`` passes a :class:`StopCheck`: a runner that starts a child process group reports
        it with ``should_stop.process_started(pgid, contained)``.
        """
        ...


def starts_no_process(runner: StepRunner) -> bool:
    """Whether ``runner`` works in this process alone and starts no process (``starts_processes`` False):
    its claim's lease may then say ``contained`` from the start, and a task it gives back unworked (its
    LLM call refused by the budget) hands its untouched folder to the retry."""
    return getattr(runner, "starts_processes", True) is False


class StopCheck:
    """The ``should_stop`` that ``execute_claim`` hands a runner.

    Calling it polls for a stop request or a lost lease. :meth:`process_started` records a child's process
    group in the lease, so the reaper can kill that group if this executor dies (docs/protocol.md, 2.2).
    """

    def __init__(self, poll: Callable[[], bool], claim: Claim, lease_seconds: float) -> None:
        self._poll, self._claim, self._lease_seconds = poll, claim, lease_seconds

    def __call__(self) -> bool:
        return self._poll()

    def process_started(self, pgid: int, contained: bool = False) -> None:
        """Record ``pgid`` (the child's pid; call before reaping it) in the lease, and whether everything it
        starts dies with this process (``contained``: a sandbox's pid namespace, see ``Lease.contained``).

        Raises:
            LeaseLost: the task was reclaimed meanwhile; the caller must kill the group.
        """
        renew_lease(self._claim, lease_seconds=self._lease_seconds, pgid=pgid, contained=contained)


class _Heartbeat(threading.Thread):
    """Renews a lease every ``interval`` seconds; remembers when the lease was lost."""

    def __init__(self, claim: Claim, *, interval: float, lease_seconds: float) -> None:
        super().__init__(daemon=True, name=f"heartbeat-{claim.task.task_id}")
        self.claim, self.interval, self.lease_seconds = claim, interval, lease_seconds
        self.stopped = threading.Event()
        self.lost: LeaseLost | None = None
        self.storage_error: StorageError | None = None

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                renew_lease(self.claim, lease_seconds=self.lease_seconds)
            except LeaseLost as exc:
                self.lost = exc
                return
            except IntegrityError as exc:  # the task file was altered under us
                self.lost = LeaseLost(f"{self.claim.task.task_id}: {exc}")
                self.lost.__cause__ = exc
                return
            except StorageError as exc:  # re-raised by execute_claim once the runner is done
                self.storage_error = exc
                return


def execute_claim(
    layout: ProjectLayout,
    claim: Claim,
    runner: StepRunner,
    *,
    ignore: list[str],
    lease_seconds: float,
    heartbeat_seconds: float,
    on_event: EventSink = _no_events,
    stop: threading.Event | None = None,
    prepare_retry: Callable[[Task], Task] | None = None,
    signer: SigningKey | None = None,
    verified_here: bool = False,
) -> Result | None:
    """Run ``runner`` on a claimed task and commit its result files.

    Args:
        stop: when set (the worker was told to stop), the runner is asked to give up and the task is
            given back to ``pending/`` as a new attempt (``reason: "given_back"``, not counted against
            the step's ``max_attempts``) instead of being failed.
            A runner that raises ``BudgetExceeded`` (its LLM call did not fit the budget and was not
            made) has its task released the same way, and the error is re-raised.
        prepare_retry: gives a released task a fresh workspace (see ``conductor.attempts``). When the
            runner's outcome is ``contained`` (nothing it started can write the folder any more), the
            released attempt's own folder is handed to the retry instead, reset to the base
            (``attempts.hand_over``); ``prepare_retry`` is the fallback.
        signer: the executor's Ed25519 key; the provenance envelope is unsigned without one.
        verified_here: this process verifies the attempt next (the engine running its own executor). The
            result may then be committed while the folder's stat cache is still being refreshed in the
            background (``checkout.capture``); otherwise the commit waits for it, as the folder passes to
            another process.

    Returns:
        The committed result, or None when the lease was lost meanwhile (nothing is committed: the task
        belongs to a newer attempt now) or the task was released.
    """
    task = claim.task
    started = utc_now()
    try:
        workspace = task_workspace(layout, task)
    except (ConductorError, OSError) as exc:
        _raise_storage(exc)
        return _commit(claim, runner, Outcome("failed", "could not prepare the workspace", str(exc),
                                              ErrorInfo(kind="workspace_error", message=str(exc))), [], started, on_event,
                       signer)
    heartbeat = _Heartbeat(claim, interval=heartbeat_seconds, lease_seconds=lease_seconds)
    heartbeat.start()
    stop_seen = threading.Event()

    def should_stop() -> bool:
        if stop is not None and stop.is_set():
            stop_seen.set()  # only work the runner gave up on is released, never finished work
            return True
        return heartbeat.lost is not None

    over_budget: BudgetExceeded | None = None
    try:
        outcome = runner.run(task, workspace, StopCheck(should_stop, claim, lease_seconds))
    except BudgetExceeded as exc:  # nothing was done: give the task back, never fail it
        over_budget = exc
        outcome = Outcome("failed", "over budget", str(exc))
    except ConductorError as exc:
        _raise_storage(exc)
        kind = type(exc).__name__
        outcome = Outcome("failed", f"{kind}: {exc}", f"The executor failed: {exc}", ErrorInfo(kind=kind, message=str(exc)))
    finally:
        heartbeat.stopped.set()
        heartbeat.join()
    if heartbeat.storage_error is not None:
        raise heartbeat.storage_error
    if heartbeat.lost is not None and not isinstance(heartbeat.lost.__cause__, IntegrityError):
        on_event("task.abandoned", {"step_id": task.task_id, "attempt": task.attempt, "reason": str(heartbeat.lost)})
        return None
    if over_budget is not None:  # nothing ran: an in-process runner left the folder as it was
        _release(claim, _retry_folder(layout, prepare_retry, free=starts_no_process(runner)), on_event)
        raise over_budget
    if stop_seen.is_set():  # a contained run left nothing that can write the folder
        _release(claim, _retry_folder(layout, prepare_retry, free=outcome.contained), on_event)
        return None
    crash_point("execute.after_run")
    try:
        _tree, changes = attempt_changes(layout, workspace, task.base_commit, ignore, seal=outcome.contained)
        if not verified_here:
            settle(workspace)
    except (ConductorError, OSError) as exc:  # e.g. an unsafe name: fail the task, never the executor
        _raise_storage(exc)
        changes = []
        outcome = Outcome("failed", "the workspace cannot be hashed after the run", str(exc),
                          ErrorInfo(kind="workspace_error", message=str(exc)), outcome.usage)
    try:
        return _commit(claim, runner, outcome, changes, started, on_event, signer)
    except LeaseLost as exc:
        on_event("task.abandoned", {"step_id": task.task_id, "attempt": task.attempt, "reason": str(exc)})
        return None
    except IntegrityError as exc:  # the task file was altered while it ran: fail it, never the executor
        _reject_altered(claim, exc, runner, on_event)
        return None


def _retry_folder(layout: ProjectLayout, prepare_retry: Callable[[Task], Task] | None, *,
                  free: bool) -> Callable[[Task], Task] | None:
    """How a released task's retry gets its folder: ``prepare_retry``, or, when the released attempt's
    folder is nobody's now (``free``), that folder (``attempts.hand_over``, ``prepare_retry`` the fallback)."""
    if not free or prepare_retry is None:
        return prepare_retry
    fallback = prepare_retry
    return lambda retry: hand_over(layout, retry, fallback=fallback)


def _raise_storage(exc: BaseException) -> None:
    """A disk that refuses writes is no verdict on the step: stop this process (exit 74) instead of
    committing the error as the step's failure, and let recovery and resume carry on."""
    if isinstance(exc, StorageError):
        raise exc


def _reject_altered(claim: Claim, exc: IntegrityError, runner: StepRunner, on_event: EventSink) -> None:
    with fork_lock(claim.fork):
        if claim.task_path.exists():
            reject_task_file(claim.fork, claim.task.task_id, claim.task_path, exc, holder=runner.info.id,
                             on_event=on_event)
            claim.fork.lease_file(claim.task.task_id).unlink(missing_ok=True)


GIVEN_BACK = "given_back"
"""``task.published``'s reason for an attempt Conductor gave back before any work was done (the worker was
told to stop, or the budget refused the LLM call): it does not use up one of the step's attempts."""


def _release(claim: Claim, prepare_retry: Callable[[Task], Task] | None, on_event: EventSink) -> None:
    def retry(task: Task) -> Task:
        task = prepare_retry(task) if prepare_retry is not None else task
        # The attempt number must grow (it is the fencing token), so the budget grows with it instead.
        budget = claim.task.max_attempts
        return task if budget is None else task.model_copy(update={"max_attempts": budget + 1})

    with fork_lock(claim.fork):
        try:
            assert_holder(claim)
        except LeaseLost:
            return
        requeue_task(claim.fork, claim.task, prepare_retry=retry, on_event=on_event, reason=GIVEN_BACK)


def _commit(claim: Claim, runner: StepRunner, outcome: Outcome, changes: list, started: str, on_event: EventSink,
            signer: SigningKey | None = None) -> Result:
    task = claim.task
    finished = utc_now()
    # Everything stored from here on is read by people and tools: no secret of this process may be in it.
    error = None if outcome.error is None else outcome.error.model_copy(update={"message": redact(outcome.error.message)})
    outcome = replace(outcome, summary=redact(outcome.summary), explanation=redact(outcome.explanation), error=error)
    result = Result(
        task_id=task.task_id,
        plan_id=task.plan_id,
        fork_id=task.fork_id,
        attempt=task.attempt,
        fencing_token=claim.lease.fencing_token,
        task_checksum=task.checksum or "",
        status=outcome.status,
        executor=runner.info,
        files_changed=changes,
        summary=outcome.summary,
        error=outcome.error,
        started_at=started,
        finished_at=finished,
        usage=outcome.usage,
    )
    _, result_bytes = sealed_bytes(result)
    statement = build_statement(
        task=task,
        result_digest_hex=sha256_hex(result_bytes),
        result_name=f"{task.task_id}.result.json",
        changed=changes,
        executor=runner.info,
        started_at=started,
        finished_at=finished,
        usage=outcome.usage,
        policy_digest=task.policy_digest,
        task_document=_task_document(claim),
    )
    return complete_task(
        claim,
        result,
        explanation=outcome.explanation,
        provenance=envelope_for(statement, signer),
        on_event=on_event,
    )


def executor_info(kind: str, identity: str, model: str | None = None) -> ExecutorInfo:
    """An ``ExecutorInfo`` stamped with this Conductor version."""
    return ExecutorInfo(id=identity, kind=kind, version=f"conductor-runtime {__version__}", model=model)


def _task_document(claim: Claim) -> dict[str, Any] | None:
    """The claimed task file's document exactly as read (checksum verified at the claim), if still paired
    with the claim's task."""
    if claim.task_seen is None or claim.task_seen[0] is not claim.task:
        return None
    document = strict_loads(claim.task_seen[1])
    return document if isinstance(document, dict) else None
