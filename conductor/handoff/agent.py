"""The handoff protocol in a few calls, for IDE agents and scripts (``conductor task``, ``conductor mcp``).

An agent that has a shell but no process living as long as its work claims a task, works in the task's
workspace with its own tools, and completes it; Conductor does the protocol's file work for it:

- :func:`claim` renames the next pending task (oldest plan first, then fork, then step) or the one named
  into ``in_progress/`` and writes a lease **held by time alone**: its ``pid`` is 0 (no process: the
  reaper never takes it for a dead holder) and it expires at min(``executor.lease_seconds``, the step's
  ``timeout_seconds``) from the claim. Every call on the task by its holder renews it (:func:`show`,
  :func:`heartbeat`), never past claim + ``timeout_seconds``;
- :func:`complete` checks the fence under the fork lock, computes ``files_changed`` itself from the
  workspace (the same capture as the verifier's), and writes result, explanation and provenance through
  :func:`conductor.handoff.complete.complete_task` (signed when the agent has a key of its own);
- :func:`release` gives the task back: ``task.released`` in the fork's audit log, and the next attempt
  is published with a fresh workspace (or, on the last allowed attempt, the step fails: a release uses
  up its attempt, so claim/release can never loop).

A holder is a name the agent keeps across calls: ``holder=`` here, ``--holder`` or ``$CONDUCTOR_HOLDER``
in the CLI, else ``conductor-task@<host>``. The fence is the holder named in the lease plus the task's
attempt (pass ``attempt=`` to pin the one you claimed). Errors are :class:`~conductor.errors.ConductorError`
subclasses: ``NotFound`` (exit 9) when there is nothing to claim or no such task, ``LeaseLost`` /
``StateConflict`` (exit 10) when the task is not yours or not in progress, :class:`AmbiguousTask` (exit 2)
when a task id names tasks in several plans or forks.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from conductor.errors import ConductorError, IntegrityError, LeaseLost, NotFound, StateConflict
from conductor.fsutil import StorageError
from conductor.layout import RESULT_SUFFIX, STATES, VERDICT_SUFFIX, ForkLayout, ProjectLayout
from conductor.models import FileChange, Lease, Task, parse_time, step_number, utc_now

HOLDER_ENV = "CONDUCTOR_HOLDER"
EXECUTOR_KIND = "agent"
ACTIVE_STATES = ("pending", "in_progress")
_IDENTIFIER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_STEP = re.compile(r"^step_[0-9]{3,}$")
_OWN_FIELDS = ("task_id", "plan_id", "fork_id", "attempt", "title", "instruction", "workspace", "allowed_files",
               "protected_patterns", "constraints", "timeout_seconds", "base_commit")


class BadRequest(ConductorError):
    """An argument no task operation can take (an unknown state or status); exit 2, as a usage error."""

    exit_code = 2


class AmbiguousTask(BadRequest):
    """A task id names tasks in more than one plan or fork: name the plan and fork (or ``PLAN/FORK/STEP``)."""


@dataclass(frozen=True)
class AgentTask:
    """One task as an agent sees it.

    Attributes:
        state: ``pending``, ``in_progress``, ``completed`` or ``failed`` (where its task file is).
        workspace: the attempt's folder, absolute.
        deadline: claim + ``timeout_seconds`` (RFC 3339 UTC) once claimed; None while pending.
        lease_expires_at: the lease's ``expires_at`` while in progress (None without a readable lease).
        holder: the lease's holder while in progress.
        checks: the project's ``verification.commands``: what Conductor runs in the workspace afterwards.
        extra: every other field of the task file (``depends_on``, ``max_diff_lines``, ``confidence``,
            ``checksum``…, and any field a newer task model adds), plus ``verdict`` once verified.
    """

    task_id: str
    plan_id: str
    fork_id: str
    attempt: int
    state: str
    title: str
    instruction: str
    workspace: str
    allowed_files: tuple[str, ...]
    protected_patterns: tuple[str, ...]
    constraints: tuple[str, ...]
    deadline: str | None
    timeout_seconds: int
    base_commit: str
    lease_expires_at: str | None = None
    holder: str | None = None
    checks: tuple[str, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        """``PLAN/FORK/STEP``: names this task unambiguously wherever a task id is taken."""
        return f"{self.plan_id}/{self.fork_id}/{self.task_id}"

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: the attributes above (``extra`` merged in), plus ``ref``."""
        own = {
            "task_id": self.task_id, "plan_id": self.plan_id, "fork_id": self.fork_id, "ref": self.ref,
            "attempt": self.attempt, "state": self.state, "title": self.title, "instruction": self.instruction,
            "workspace": self.workspace, "allowed_files": list(self.allowed_files),
            "protected_patterns": list(self.protected_patterns), "constraints": list(self.constraints),
            "deadline": self.deadline, "timeout_seconds": self.timeout_seconds,
            "lease_expires_at": self.lease_expires_at, "holder": self.holder, "base_commit": self.base_commit,
            "checks": list(self.checks),
        }
        return {**own, **{k: v for k, v in self.extra.items() if k not in own}}


@dataclass(frozen=True)
class AgentCompletion:
    """What :func:`complete` committed.

    Attributes:
        task: the task in its new state (``completed`` or ``failed``).
        status: the result's status, ``completed`` or ``failed``.
        files_changed: the change set Conductor captured from the workspace (the result's ``files_changed``).
        warnings: what the verifier will reject, found already (paths outside ``allowed_files``, protected
            paths, a diff over ``max_diff_lines``, a workspace that could not be captured).
        signed_by: key id of the provenance signature; None when unsigned.
    """

    task: AgentTask
    status: str
    summary: str
    files_changed: tuple[FileChange, ...]
    warnings: tuple[str, ...]
    signed_by: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            **self.task.to_json(),
            "status": self.status,
            "summary": self.summary,
            "files_changed": [c.model_dump(mode="json") for c in self.files_changed],
            "warnings": list(self.warnings),
            "provenance": {"signed": self.signed_by is not None, "key_id": self.signed_by},
        }


@dataclass(frozen=True)
class _Settings:
    lease_seconds: float
    max_attempts: int
    ignore: list[str]
    checks: tuple[str, ...]


def _settings(layout: ProjectLayout, environ: Mapping[str, str]) -> _Settings:
    from conductor.project import load_project

    config, _ = load_project(layout, environ)
    return _Settings(float(config.executor.lease_seconds), config.executor.max_attempts,
                     list(config.workspace.ignore), tuple(config.verification.commands))


def default_holder(environ: Mapping[str, str] = os.environ) -> str:
    """The holder name of this caller: ``$CONDUCTOR_HOLDER``, else ``conductor-task@<host>``."""
    from conductor.handoff.lease import HOST

    return environ.get(HOLDER_ENV, "").strip() or f"conductor-task@{HOST}"


# --- finding tasks ------------------------------------------------------------------------------


def _split_ref(task_id: str, plan_id: str | None, fork_id: str | None) -> tuple[str, str | None, str | None]:
    """``PLAN/FORK/STEP`` or ``STEP``; a plan or fork given both ways must agree."""
    parts = task_id.split("/")
    if len(parts) == 3:
        ref_plan, ref_fork, task_id = parts
        for given, named, what in ((plan_id, ref_plan, "plan"), (fork_id, ref_fork, "fork")):
            if given is not None and given != named:
                raise AmbiguousTask(f"task {'/'.join(parts)} names {what} {named}, but --{what} says {given}")
        plan_id, fork_id = ref_plan, ref_fork
    elif len(parts) != 1:
        raise NotFound(f"no task {task_id!r}: give a step id such as step_001, or PLAN/FORK/STEP")
    if not _STEP.match(task_id):
        raise NotFound(f"no task {task_id!r}: a task id is a step id such as step_001")
    return task_id, plan_id, fork_id


def _forks(layout: ProjectLayout, plan_id: str | None, fork_id: str | None) -> list[ForkLayout]:
    """The forks in scope, oldest plan first, forks in number order.

    Raises:
        NotFound: the plan or fork named does not exist.
    """
    if plan_id is not None:
        if not _IDENTIFIER.match(plan_id) or not (layout.plan_dir(plan_id) / "plan.json").is_file():
            raise NotFound(f"no plan {plan_id!r} in {layout.root}")
        plans = [plan_id]
    else:
        plans = layout.plan_ids()
    forks = []
    for plan in plans:
        names = sorted((p.name[len("fork_"):] for p in layout.plan_dir(plan).glob("fork_*") if p.is_dir()),
                       key=lambda name: (not name.isdigit(), int(name) if name.isdigit() else 0, name))
        forks += [layout.fork(plan, name) for name in names if fork_id is None or name == fork_id]
    if fork_id is not None and not forks:
        where = f"plan {plan_id}" if plan_id else "any plan"
        raise NotFound(f"no fork {fork_id!r} in {where}")
    return forks


def _scope(plan_id: str | None, fork_id: str | None) -> str:
    if plan_id and fork_id:
        return f"plan {plan_id}, fork {fork_id}"
    if plan_id:
        return f"plan {plan_id}"
    return f"fork {fork_id} of any plan" if fork_id else "any plan"


def _locate(layout: ProjectLayout, task_id: str, plan_id: str | None, fork_id: str | None,
            ) -> list[tuple[ForkLayout, str]]:
    """Every (fork, state) holding a task file of ``task_id`` in scope.

    Raises:
        NotFound: none does.
    """
    task_id, plan_id, fork_id = _split_ref(task_id, plan_id, fork_id)
    found = []
    for fork in _forks(layout, plan_id, fork_id):
        where = fork.find_task(task_id)
        if where is not None:
            found.append((fork, where[0]))
    if not found:
        raise NotFound(f"no task {task_id} in {_scope(plan_id, fork_id)}")
    return found


def _one(found: list[tuple[ForkLayout, str]], task_id: str, what: str) -> tuple[ForkLayout, str]:
    if len(found) > 1:
        names = ", ".join(f"{f.plan_id}/{f.fork_id}/{task_id} ({state})" for f, state in found)
        raise AmbiguousTask(f"{task_id} {what} in {len(found)} places: {names}; name one as PLAN/FORK/STEP "
                            "or with --plan and --fork")
    return found[0]


def _task_id(task_id: str) -> str:
    return task_id.rsplit("/", 1)[-1]


# --- reading one task ---------------------------------------------------------------------------


def _read_task(fork: ForkLayout, state: str, task_id: str) -> Task:
    from conductor.handoff.documents import read_document

    return read_document(fork.task_file(state, task_id), Task)


def _deadline(task: Task, lease: Lease | None, claimed_at: float | None) -> str | None:
    starts = []
    if lease is not None:
        try:
            starts.append(parse_time(lease.acquired_at))
        except ValueError:
            pass
    if claimed_at is not None:
        starts.append(datetime.fromtimestamp(claimed_at, UTC))
    if not starts:
        return None
    return _stamp(min(starts) + timedelta(seconds=task.timeout_seconds))


def _stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _agent_task(layout: ProjectLayout, fork: ForkLayout, state: str, task: Task, *, checks: Sequence[str] = (),
                lease: Lease | None = None, claimed_at: float | None = None) -> AgentTask:
    document = task.to_document()
    extra = {k: v for k, v in document.items() if k not in _OWN_FIELDS and k != "schema"}
    if state in ("completed", "failed"):
        extra.update(_outcome(fork, state, task.task_id))
    in_progress = state == "in_progress"
    return AgentTask(
        task_id=task.task_id, plan_id=task.plan_id, fork_id=task.fork_id, attempt=task.attempt, state=state,
        title=task.title, instruction=task.instruction, workspace=str((layout.root / task.workspace).resolve()),
        allowed_files=tuple(task.allowed_files), protected_patterns=tuple(task.protected_patterns),
        constraints=tuple(task.constraints),
        deadline=_deadline(task, lease, claimed_at) if in_progress else None,
        timeout_seconds=task.timeout_seconds, base_commit=task.base_commit,
        lease_expires_at=lease.expires_at if in_progress and lease is not None else None,
        holder=lease.holder if in_progress and lease is not None else None,
        checks=tuple(checks), extra=extra,
    )


def _outcome(fork: ForkLayout, state: str, task_id: str) -> dict[str, Any]:
    """The result's status and summary, and the verdict once Conductor decided."""
    from conductor.handoff.documents import read_document
    from conductor.models import Result, Verdict

    outcome: dict[str, Any] = {}
    try:
        result = read_document(fork.sidecar(state, task_id, RESULT_SUFFIX), Result)
        outcome["result"] = {"status": result.status, "summary": result.summary,
                             "error": result.error.model_dump(mode="json") if result.error else None}
    except (FileNotFoundError, IntegrityError):
        pass
    try:
        verdict = read_document(fork.sidecar(state, task_id, VERDICT_SUFFIX), Verdict)
        outcome["verdict"] = {"accepted": verdict.accepted, "reasons": list(verdict.reasons)}
    except (FileNotFoundError, IntegrityError):
        outcome["verdict"] = None
    return outcome


def _view(layout: ProjectLayout, fork: ForkLayout, state: str, task_id: str, settings: _Settings) -> AgentTask:
    from conductor.handoff.lease import read_lease

    path = fork.task_file(state, task_id)
    try:
        claimed_at = path.stat().st_ctime if state == "in_progress" else None
        task = _read_task(fork, state, task_id)
    except FileNotFoundError as exc:
        raise StateConflict(f"{fork.plan_id}/{fork.fork_id}/{task_id}: moved while being read; try again") from exc
    lease = read_lease(fork, task_id) if state == "in_progress" else None
    return _agent_task(layout, fork, state, task, checks=settings.checks, lease=lease, claimed_at=claimed_at)


# --- the operations -----------------------------------------------------------------------------


def list_tasks(
    layout: ProjectLayout,
    *,
    plan_id: str | None = None,
    fork_id: str | None = None,
    states: Iterable[str] = ACTIVE_STATES,
    environ: Mapping[str, str] = os.environ,
) -> list[AgentTask]:
    """The tasks in ``states``, oldest plan first, then fork, then step (read only: nothing is renewed).

    Raises:
        NotFound: the plan or fork named does not exist.
        BadRequest: an unknown state.
    """
    states = tuple(states)
    unknown = [s for s in states if s not in STATES]
    if unknown:
        raise BadRequest(f"unknown task state(s) {', '.join(unknown)}: choose from {', '.join(STATES)}")
    settings = _settings(layout, environ)
    tasks = []
    for fork in _forks(layout, plan_id, fork_id):
        for task_id in sorted({t for s in states for t in fork.task_ids(s)}, key=step_number):
            for state in states:
                if fork.task_file(state, task_id).exists():
                    try:
                        tasks.append(_view(layout, fork, state, task_id, settings))
                    except (IntegrityError, StateConflict):
                        continue  # tampered or moving: the engine's reaper and verifier deal with it
                    break
    return tasks


def claim(
    layout: ProjectLayout,
    *,
    plan_id: str | None = None,
    fork_id: str | None = None,
    task_id: str | None = None,
    holder: str | None = None,
    wait_seconds: float = 0.0,
    environ: Mapping[str, str] = os.environ,
) -> AgentTask:
    """Claim the next pending task in scope (or ``task_id``) for ``holder`` with a time-only lease.

    Expired leases in scope are reaped first (as ``conductor worker`` does), so a task whose holder went
    away is offered again. Candidates go oldest plan first, then fork, then step; a task another claimer
    takes first is skipped. A task file that fails its checksum is rejected to ``failed/`` unexecuted.

    Args:
        wait_seconds: with nothing to claim, wait up to this long for a task to be published.

    Returns:
        The claimed task (``state`` ``in_progress``, ``deadline`` and ``lease_expires_at`` set).

    Raises:
        NotFound: nothing to claim in scope (exit 9), or no such task, plan or fork.
        StateConflict: the task named is not pending (claimed by someone, or finished).
        AmbiguousTask: the task named is pending in several forks.
    """
    holder = holder or default_holder(environ)
    settings = _settings(layout, environ)
    if task_id is not None:
        task_id, plan_id, fork_id = _split_ref(task_id, plan_id, fork_id)
    forks = _forks(layout, plan_id, fork_id)
    until = time.monotonic() + max(0.0, wait_seconds)
    with ExitStack() as stack:
        watcher = None
        while True:
            _reap(layout, forks, settings)
            if task_id is not None:
                got = _claim_named(layout, forks, task_id, holder, settings, plan_id, fork_id)
            else:
                got = _claim_next(layout, forks, holder, settings)
            if got is not None:
                return got
            if time.monotonic() >= until:
                what = task_id or "pending task"
                raise NotFound(f"nothing to claim: no {what} in {_scope(plan_id, fork_id)}" + _busy(forks))
            if watcher is None:  # watching starts before the next listing, so no arrival is missed
                watcher = stack.enter_context(_task_watcher(layout))
            else:  # a task file arriving in pending/ wakes it; 1 s is the fallback poll
                watcher.wait(max(0.0, min(1.0, until - time.monotonic())))
            forks = _forks(layout, plan_id, fork_id)


def _busy(forks: list[ForkLayout]) -> str:
    held = sum(len(f.task_ids("in_progress")) for f in forks)
    return f" ({held} task(s) in progress)" if held else ""


def _task_watcher(layout: ProjectLayout):  # type: ignore[no-untyped-def]
    from conductor.handoff.watcher import FolderWatcher, task_arrival

    return FolderWatcher([layout.handoff_dir], relevant=task_arrival, kinds=("created", "moved"))


def _reap(layout: ProjectLayout, forks: list[ForkLayout], settings: _Settings) -> None:
    from conductor.attempts import RetryFolders
    from conductor.handoff.reaper import reap_expired

    for fork in forks:
        if fork.task_ids("in_progress") or any(fork.state_dir("in_progress").glob("*.requeue")):
            reap_expired(fork, max_attempts=settings.max_attempts, lease_seconds=settings.lease_seconds,
                         on_event=_log(fork).append, prepare_retry=RetryFolders(layout))


def _log(fork: ForkLayout):  # type: ignore[no-untyped-def]
    from conductor.audit import AuditLog

    return AuditLog(fork.audit_log, cut_torn_tail=True)


def _claim_next(layout: ProjectLayout, forks: list[ForkLayout], holder: str, settings: _Settings) -> AgentTask | None:
    for fork in forks:
        for task_id in sorted(fork.task_ids("pending"), key=step_number):
            got = _try_claim(layout, fork, task_id, holder, settings)
            if got is not None:
                return got
    return None


def _claim_named(layout: ProjectLayout, forks: list[ForkLayout], task_id: str, holder: str, settings: _Settings,
                 plan_id: str | None, fork_id: str | None) -> AgentTask | None:
    found = [(fork, where[0]) for fork in forks if (where := fork.find_task(task_id)) is not None]
    if not found:
        return None  # not published (yet): claim() waits for it, or says so
    pending = [(fork, state) for fork, state in found if state == "pending"]
    if not pending:
        fork, state = _one(found, task_id, "is not pending but exists")
        return _not_claimable(fork, state, task_id)
    fork, _ = _one(pending, task_id, "is pending")
    got = _try_claim(layout, fork, task_id, holder, settings)
    if got is None:
        where = fork.find_task(task_id)
        return _not_claimable(fork, where[0] if where else "gone", task_id)
    return got


def _not_claimable(fork: ForkLayout, state: str, task_id: str) -> AgentTask:
    from conductor.handoff.lease import read_lease

    ref = f"{fork.plan_id}/{fork.fork_id}/{task_id}"
    if state == "in_progress":
        lease = read_lease(fork, task_id)
        raise StateConflict(f"{ref} is already claimed (held by {lease.holder if lease else 'unknown'})")
    raise StateConflict(f"{ref} cannot be claimed: it is {state}")


def _try_claim(layout: ProjectLayout, fork: ForkLayout, task_id: str, holder: str, settings: _Settings) -> AgentTask | None:
    from conductor.handoff.lease import claim_task

    held = claim_task(fork, task_id, holder=holder, lease_seconds=settings.lease_seconds, on_event=_log(fork).append,
                      pid=0, bounded_by_timeout=True)
    if held is None:
        return None  # another claimer won, or the task file was rejected unexecuted
    path = held.task_path
    try:
        claimed_at = path.stat().st_ctime
    except FileNotFoundError:
        claimed_at = None
    return _agent_task(layout, fork, "in_progress", held.task, checks=settings.checks, lease=held.lease,
                       claimed_at=claimed_at)


def show(
    layout: ProjectLayout,
    task_id: str,
    *,
    plan_id: str | None = None,
    fork_id: str | None = None,
    holder: str | None = None,
    environ: Mapping[str, str] = os.environ,
) -> AgentTask:
    """One task in whatever state it is; renews the lease when the caller holds it.

    A task id found in several places resolves to the one in progress held by ``holder``, else the one
    pending or in progress, else it is ambiguous. Finished tasks carry ``result`` and ``verdict`` in
    ``extra``.

    Raises:
        NotFound: no such task in scope.
        AmbiguousTask: it is in several plans or forks.
    """
    holder = holder or default_holder(environ)
    settings = _settings(layout, environ)
    found = _locate(layout, task_id, plan_id, fork_id)
    mine = [(f, s) for f, s in found if s == "in_progress" and _holder_of(f, _task_id(task_id)) == holder]
    active = [(f, s) for f, s in found if s in ACTIVE_STATES]
    fork, state = _one(mine or active or found, _task_id(task_id), "exists")
    if mine:
        try:
            return heartbeat(layout, f"{fork.plan_id}/{fork.fork_id}/{_task_id(task_id)}", holder=holder, environ=environ)
        except LeaseLost:
            pass  # time ran out or it moved: show it as it is
    found_now = fork.find_task(_task_id(task_id))
    return _view(layout, fork, found_now[0] if found_now else state, _task_id(task_id), settings)


def _holder_of(fork: ForkLayout, task_id: str) -> str | None:
    from conductor.handoff.lease import read_lease

    lease = read_lease(fork, task_id)
    return lease.holder if lease is not None else None


@dataclass
class _Held:
    layout: ProjectLayout
    claim: Any  # conductor.handoff.lease.Claim
    deadline: datetime
    settings: _Settings

    @property
    def ref(self) -> str:
        return f"{self.claim.fork.plan_id}/{self.claim.fork.fork_id}/{self.claim.task.task_id}"


def _held(layout: ProjectLayout, task_id: str, *, plan_id: str | None, fork_id: str | None, holder: str,
          attempt: int | None, settings: _Settings, now: datetime | None = None) -> _Held:
    """The caller's claim of ``task_id``: in progress, its lease naming ``holder`` at the task's attempt
    (and ``attempt``, when given), before its deadline.

    Raises:
        NotFound / AmbiguousTask: as :func:`show`.
        StateConflict: the task is not in progress.
        LeaseLost: the lease names someone else or a stale attempt, or the time ran out.
    """
    from conductor.handoff.documents import parse_document, read_limited
    from conductor.handoff.lease import Claim, read_lease

    step = _task_id(task_id)
    found = _locate(layout, task_id, plan_id, fork_id)
    active = [(f, s) for f, s in found if s == "in_progress"]
    if not active:
        fork, state = _one(found, step, "exists")
        raise StateConflict(f"{fork.plan_id}/{fork.fork_id}/{step} is not in progress (it is {state}): "
                            "only a claimed task can be renewed, completed or released")
    mine = [(f, s) for f, s in active if _holder_of(f, step) == holder]
    fork, _ = _one(mine or active, step, "is in progress")
    ref = f"{fork.plan_id}/{fork.fork_id}/{step}"
    path = fork.task_file("in_progress", step)
    try:
        claimed_at = path.stat().st_ctime
        data = read_limited(path)
    except FileNotFoundError as exc:
        raise LeaseLost(f"{ref}: no longer in progress (re-queued or finished)") from exc
    task = parse_document(data, Task, source=path)
    lease = read_lease(fork, step)
    if lease is None:
        raise LeaseLost(f"{ref}: it has no readable lease, so it is not held by {holder}")
    if lease.holder != holder:
        raise LeaseLost(f"{ref} is held by {lease.holder}, not by {holder}")
    if lease.fencing_token != task.attempt or (attempt is not None and attempt != task.attempt):
        mine_attempt = attempt if attempt is not None else lease.fencing_token
        raise LeaseLost(f"{ref}: attempt {mine_attempt} is stale, the task is at attempt {task.attempt} now "
                        "(your lease expired and the task was re-queued)")
    deadline = parse_time(_deadline(task, lease, claimed_at) or utc_now())
    if (now or datetime.now(UTC)) >= deadline:
        raise LeaseLost(f"{ref}: attempt {task.attempt} ran out of time at {_stamp(deadline)} "
                        f"(timeout_seconds {task.timeout_seconds}); Conductor re-queues it")
    held = Claim(fork=fork, task=task, lease=lease, task_seen=(task, data), lease_seen=None)
    return _Held(layout, held, deadline, settings)


def heartbeat(
    layout: ProjectLayout,
    task_id: str,
    *,
    plan_id: str | None = None,
    fork_id: str | None = None,
    holder: str | None = None,
    attempt: int | None = None,
    environ: Mapping[str, str] = os.environ,
) -> AgentTask:
    """Renew the caller's lease of ``task_id``: ``lease_seconds`` more, never past the deadline.

    Raises:
        LeaseLost: not held by ``holder`` (or not at ``attempt``), or its time ran out (exit 10).
        StateConflict: it is not in progress.
    """
    from conductor.handoff.lease import renew_lease

    holder = holder or default_holder(environ)
    settings = _settings(layout, environ)
    held = _held(layout, task_id, plan_id=plan_id, fork_id=fork_id, holder=holder, attempt=attempt, settings=settings)
    renew_lease(held.claim, lease_seconds=settings.lease_seconds, not_after=held.deadline)
    return _view(layout, held.claim.fork, "in_progress", held.claim.task.task_id, settings)


def complete(
    layout: ProjectLayout,
    task_id: str,
    *,
    plan_id: str | None = None,
    fork_id: str | None = None,
    status: str = "success",
    summary: str = "",
    explanation: str | None = None,
    holder: str | None = None,
    attempt: int | None = None,
    signer: Any = None,
    environ: Mapping[str, str] = os.environ,
) -> AgentCompletion:
    """Complete the caller's claim of ``task_id`` with what its workspace now holds.

    ``files_changed`` is Conductor's own capture of the workspace against the task's ``base_commit``
    (the verifier's ground truth, ``workspace.ignore`` left out), never the agent's word. Changes the
    verifier will reject (outside ``allowed_files``, protected, too large) are still committed, and
    named in ``warnings``. A workspace that cannot be captured (a nested repository, say) fails the task
    with ``error.kind`` ``workspace_error``.

    Args:
        status: ``success`` (or ``completed``): the step is done; ``failed``: the agent gives up on the
            step for good (``error.kind`` ``reported_failure``; use :func:`release` to let it be retried).
        summary: one line; default: the first line of ``explanation``, else a count of changed files.
        explanation: Markdown for the reviewer; default: the summary and the changed files.
        signer: a :class:`conductor.keys.SigningKey` of the agent's own (trusted for its holder name in
            ``trust.keys``) to sign the provenance; None writes it unsigned. Never the project key: it is
            trusted only for Conductor's own identities, so its signature on an agent's work is rejected.

    Raises:
        LeaseLost: not held by ``holder`` (or not at ``attempt``), its time ran out, or it was re-queued
            meanwhile (checked again under the fork lock; nothing is written).
        StateConflict: it is not in progress.
        BadRequest: an unknown ``status``.
    """
    from conductor.handoff.complete import complete_task
    from conductor.models import ErrorInfo, Result
    from conductor.redact import redact

    holder = holder or default_holder(environ)
    result_status = {"success": "completed", "completed": "completed", "failed": "failed"}.get(status)
    if result_status is None:
        raise BadRequest(f"unknown status {status!r}: use success or failed")
    settings = _settings(layout, environ)
    held = _held(layout, task_id, plan_id=plan_id, fork_id=fork_id, holder=holder, attempt=attempt, settings=settings)
    task = held.claim.task
    changes, warnings, capture_error = _changes(layout, task, settings)
    summary = redact(_one_line(summary) or _one_line(explanation or "").lstrip("#").strip()
                     or _default_summary(changes, result_status))
    error = None
    if capture_error is not None:
        result_status, error = "failed", ErrorInfo(kind="workspace_error", message=redact(capture_error))
    elif result_status == "failed":
        error = ErrorInfo(kind="reported_failure", message=summary)
    explanation_text = redact(explanation if explanation is not None else _default_explanation(task, summary, changes))
    from conductor.executors.base import executor_info

    info = executor_info(EXECUTOR_KIND, holder)
    result = Result(
        task_id=task.task_id, plan_id=task.plan_id, fork_id=task.fork_id, attempt=task.attempt,
        fencing_token=held.claim.lease.fencing_token, task_checksum=task.checksum or "", status=result_status,
        executor=info, files_changed=changes, summary=summary, error=error,
        started_at=held.claim.lease.acquired_at, finished_at=utc_now(),
    )
    complete_task(held.claim, result, explanation=explanation_text,
                  provenance=_provenance(task, held.claim.task_seen[1], result, changes, info, signer),
                  on_event=_log(held.claim.fork).append)
    state = "completed" if result_status == "completed" else "failed"
    view = _agent_task(layout, held.claim.fork, state, task, checks=settings.checks)
    return AgentCompletion(task=view, status=result_status, summary=summary, files_changed=tuple(changes),
                           warnings=tuple(warnings), signed_by=signer.key_id if signer is not None else None)


def _changes(layout: ProjectLayout, task: Task, settings: _Settings) -> tuple[list[FileChange], list[str], str | None]:
    """The captured change set, the policy problems it shows already, and a capture error (if any)."""
    from conductor.attempts import attempt_changes, task_workspace
    from conductor.policy import matches_allowed, matches_protected
    from conductor.workspace import diff_lines

    try:
        workspace = task_workspace(layout, task)
        _tree, changes = attempt_changes(layout, workspace, task.base_commit, settings.ignore)
    except StorageError:
        raise
    except (ConductorError, OSError) as exc:
        return [], [f"the workspace cannot be captured: {exc}"], str(exc)
    warnings = []
    outside = [c.path for c in changes if not matches_allowed(c.path, task.allowed_files)]
    if outside:
        warnings.append(f"changed outside allowed_files ({', '.join(task.allowed_files) or 'none'}): "
                        f"{', '.join(outside)} — the verifier will reject this step")
    protected = [c.path for c in changes if matches_protected(c.path, task.protected_patterns)]
    if protected:
        warnings.append(f"changed protected paths: {', '.join(protected)} — the verifier will reject this step")
    lines = diff_lines(changes)
    if lines > task.max_diff_lines:
        warnings.append(f"{lines} changed lines, more than max_diff_lines {task.max_diff_lines} — "
                        "the verifier will reject this step")
    return changes, warnings, None


def _one_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")[:500]


def _default_summary(changes: Sequence[FileChange], status: str) -> str:
    if status == "failed":
        return "the executor gave up on this step"
    return f"changed {len(changes)} file(s)" if changes else "no file changed"


def _default_explanation(task: Task, summary: str, changes: Sequence[FileChange]) -> str:
    lines = [f"# {task.task_id} (attempt {task.attempt}): {task.title or task.task_id}", "", summary, ""]
    if changes:
        lines += ["Files changed (as Conductor captured the workspace):", ""]
        lines += [f"- `{c.path}` {c.change} (+{c.lines_added} −{c.lines_removed})" for c in changes]
    else:
        lines.append("No file changed.")
    return "\n".join(lines) + "\n"


def _provenance(task: Task, task_bytes: bytes, result: Any, changes: Sequence[FileChange], info: Any,
                signer: Any) -> bytes:
    """The provenance envelope, stating the task document exactly as its file holds it.

    The model's dump would add every field a newer Conductor defaults (a task published before an upgrade
    lacks them), and its recomputed checksum would no longer be the one published: the file's own
    document, whose checksum was verified when it was read, is what was executed.
    """
    from conductor.canonical import sha256_hex, strict_loads
    from conductor.handoff.documents import sealed_bytes
    from conductor.provenance import build_statement, envelope_for

    _, result_bytes = sealed_bytes(result)
    statement = build_statement(
        task=task.model_copy(update={"checksum": None}), result_digest_hex=sha256_hex(result_bytes),
        result_name=f"{task.task_id}{RESULT_SUFFIX}", changed=list(changes), executor=info,
        started_at=result.started_at, finished_at=result.finished_at, usage=result.usage,
        policy_digest=task.policy_digest,
    )
    definition = statement["predicate"]["buildDefinition"]
    definition["externalParameters"]["task"] = strict_loads(task_bytes)
    definition["internalParameters"]["task_checksum"] = task.checksum
    return envelope_for(statement, signer)


def release(
    layout: ProjectLayout,
    task_id: str,
    *,
    plan_id: str | None = None,
    fork_id: str | None = None,
    reason: str = "",
    holder: str | None = None,
    attempt: int | None = None,
    environ: Mapping[str, str] = os.environ,
) -> AgentTask:
    """Give the caller's claim of ``task_id`` back.

    Under the fork lock, after the fencing check: ``task.released {step_id, attempt, holder, reason}`` is
    appended to the fork's audit log, then the task is re-queued as attempt + 1 in a fresh workspace at
    the same ``base_commit`` (``task.published {reason: "released"}``); the released attempt's folder is
    never reused (its writer may still be at work). A release uses up its attempt: on the last one (the
    task's ``max_attempts``, else ``executor.max_attempts``, as the reaper counts) the step fails instead
    (``error.kind`` ``released``), so claiming and releasing cannot loop forever.

    Returns:
        The new pending attempt, or the failed task.

    Raises:
        LeaseLost / StateConflict: as :func:`complete`; nothing is written.
    """
    from conductor.attempts import prepare_retry
    from conductor.handoff.lease import assert_holder, fork_lock
    from conductor.handoff.reaper import requeue_task

    holder = holder or default_holder(environ)
    settings = _settings(layout, environ)
    held = _held(layout, task_id, plan_id=plan_id, fork_id=fork_id, holder=holder, attempt=attempt, settings=settings)
    fork, task = held.claim.fork, held.claim.task
    log = _log(fork)
    reason = _one_line(reason) or "released by its holder"
    with fork_lock(fork):
        assert_holder(held.claim)
        log.append("task.released", {"step_id": task.task_id, "attempt": task.attempt, "holder": holder, "reason": reason})
        if task.attempt >= (task.max_attempts or settings.max_attempts):
            _fail_released(fork, task, holder, reason, log.append)
            return _agent_task(layout, fork, "failed", task, checks=settings.checks)
        retry = requeue_task(fork, task, prepare_retry=lambda t: prepare_retry(layout, t), on_event=log.append,
                             reason="released")
    return _agent_task(layout, fork, "pending", retry, checks=settings.checks)


def _fail_released(fork: ForkLayout, task: Task, holder: str, reason: str, on_event: Callable[[str, dict], Any]) -> None:
    """Fail the last allowed attempt its holder released (call under the fork lock)."""
    from conductor.fsutil import durable_rename
    from conductor.handoff.documents import write_document
    from conductor.models import ErrorInfo, ExecutorInfo, Result

    now = utc_now()
    message = f"released on attempt {task.attempt}, the last allowed: {reason}"
    result = Result(
        task_id=task.task_id, plan_id=task.plan_id, fork_id=task.fork_id, attempt=task.attempt,
        fencing_token=task.attempt, task_checksum=task.checksum or "", status="failed",
        executor=ExecutorInfo(id=holder, kind=EXECUTOR_KIND), summary="released on its last attempt",
        error=ErrorInfo(kind="released", message=message), started_at=now, finished_at=now,
    )
    write_document(fork.sidecar("failed", task.task_id, RESULT_SUFFIX), result)
    durable_rename(fork.task_file("in_progress", task.task_id), fork.task_file("failed", task.task_id))
    fork.lease_file(task.task_id).unlink(missing_ok=True)
    on_event("task.failed", {"step_id": task.task_id, "attempt": task.attempt, "reason": "released", "message": message})

