"""The scheduler: runs every fork of a plan to the end, step by step, in dependency order.

One pass (``process_once``) looks at each fork's folders and decides what to do next: reap expired
leases, verify arrivals in ``completed/``, publish steps whose dependencies are merged (after scoring
their confidence and merging their policy; a low-confidence step waits for approval), and hand pending
tasks to the in-process executor (``llm`` or ``command``) if there is one. ``run`` repeats passes,
sleeping on filesystem events, until every fork is finished or only approvals are left.

State is never kept only in memory: each pass re-derives it from the folders (where the task file is;
whether a verdict exists) and the audit log (what was published, approved, finished), so a restart after
a crash at any instant continues where the files say.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from conductor.attempts import RetryFolders, prepare_retry, prepare_workspace, remove_plan_workspaces, state_store
from conductor.audit import AuditLog
from conductor.confidence import kind_of, learn, predicted_score, read_outcomes, score_step
from conductor.config import Config
from conductor.errors import ConductorError, MergeConflict, StateConflict
from conductor.executors.base import GIVEN_BACK, StepRunner, execute_claim, starts_no_process
from conductor.recovery import sweep_fork_leftovers
from conductor.faults import crash_point
from conductor.handoff.documents import read_document
from conductor.handoff.failures import settled_since_publish, unlogged_failure
from conductor.handoff.lease import claim_task, fork_lock, holder_name
from conductor.handoff.publish import publish_task
from conductor.handoff.reaper import reap_expired
from conductor.handoff.watcher import FolderWatcher
from conductor.layout import VERDICT_SUFFIX, ForkLayout, ProjectLayout
from conductor.lessons import learn_from_events, learn_from_verdict, task_constraints
from conductor.models import (
    Confidence,
    Event,
    ForkSpec,
    Plan,
    PolicyLayer,
    StepSpec,
    Task,
    Verdict,
    utc_now,
)
from conductor.repair import (
    EVIDENCE_SUFFIX,
    archive_attempt,
    archive_path,
    forbidden_constraint,
    is_archived,
    previous_attempts,
    read_evidence,
)
from conductor.plan_store import base_commit, ensure_forks, fork_log, plan_log, policy_layers
from conductor.policy import MergedPolicy, evaluate_changes, merge_policies
from conductor.ranking import (
    ForkEvidence,
    apply_winner,
    fork_changes,
    fork_checks,
    fork_tokens,
    rank,
)
from conductor.attestation import write_attestation
from conductor.checkpoint import audit_origin, write_checkpoint
from conductor.keys import SigningKey, TrustStore
from conductor.verifier import VerifySettings, verify_step
from conductor.workspace import diff_lines

RunnerFactory = Callable[[AuditLog], StepRunner]

WAITING, AWAITING_APPROVAL, PENDING, IN_PROGRESS, COMPLETED, ACCEPTED, FAILED, BLOCKED = (
    "waiting", "awaiting_approval", "pending", "in_progress", "completed", "accepted", "failed", "blocked",
)
REPAIRING = "repairing"  # a failed attempt is being archived and retried (conductor.repair)


@dataclass(frozen=True)
class EngineOptions:
    auto_approve: bool = False
    apply: bool = True
    wait: bool = True  # False: return as soon as nothing can progress without an external executor
    keep_workspaces: bool = False  # True: leave attempt folders in place when the plan finishes


@dataclass
class RunReport:
    """How a run ended."""

    plan_id: str
    status: str  # "succeeded" | "failed" | "halted"
    ranking: list[ForkEvidence] = field(default_factory=list)
    applied_fork: str | None = None
    applied_files: list[str] = field(default_factory=list)
    awaiting_approval: list[tuple[str, str]] = field(default_factory=list)  # (fork_id, step_id)
    waiting_for_executor: list[tuple[str, str]] = field(default_factory=list)
    message: str = ""


class _ForkView:
    """One fork's events, read once per pass."""

    def __init__(self, layout: ProjectLayout, plan: Plan, spec: ForkSpec) -> None:
        self.spec = spec
        self.fork: ForkLayout = layout.fork(plan.plan_id, spec.fork_id)
        self.log = fork_log(layout, plan.plan_id, spec.fork_id)
        self.events: list[Event] = self.log.events()
        created = self.last("fork.created")
        # Steps a fork made by `fork --from` took over from its parent: done, never run again here.
        self.reused: set[str] = set(created.data.get("reused_steps", [])) if created else set()

    def last(self, type_: str, **match: object) -> Event | None:
        """The newest event of ``type_`` whose data holds every ``match`` item, or None."""
        return next((e for e in reversed(self.events)
                     if e.type == type_ and all(e.data.get(k) == v for k, v in match.items())), None)

    def has(self, type_: str, **match: object) -> bool:
        return self.last(type_, **match) is not None

    @property
    def head(self) -> str:
        """The fork's state: the commit of its newest ``step.merged``, else the one it was created at.

        Read from the audit log, never from a ref or a folder an executor could write.
        """
        for event in reversed(self.events):
            if event.type in ("step.merged", "fork.created") and isinstance(event.data.get("commit"), str):
                return event.data["commit"]
        raise StateConflict(f"fork {self.spec.fork_id}: its audit log records no commit (fork.created is missing)")

    def append(self, type_: str, data: dict) -> None:
        self.events.append(self.log.append(type_, data))

    def append_many(self, items: list[tuple[str, dict]]) -> None:
        self.events.extend(self.log.append_many(items))

    def refresh(self) -> None:
        """Re-read the log (other processes append to it too)."""
        self.events = self.log.events()


class Engine:
    """Runs one plan. ``runner_factory`` makes the in-process executor for a fork (None = handoff)."""

    def __init__(
        self,
        layout: ProjectLayout,
        config: Config,
        project_policy: PolicyLayer,
        plan: Plan,
        *,
        runner_factory: RunnerFactory | None,
        options: EngineOptions,
        on_progress: Callable[[], None] = lambda: None,
        signer: SigningKey | None = None,
    ) -> None:
        """Prepare to run ``plan``.

        Args:
            signer: the project key; it signs the executors' provenance (in-process executors), every
                accepted step's attestation and the audit checkpoints. None signs nothing.
        """
        self.layout, self.config, self.project_policy, self.plan = layout, config, project_policy, plan
        self.runner_factory = runner_factory
        self.options = options
        self.on_progress = on_progress
        self.ignore = list(config.workspace.ignore)
        self.plan_log = plan_log(layout, plan.plan_id)
        self.holder = holder_name("conductor-engine")
        self._inflight: dict[tuple[str, str], Future] = {}
        self._runners: dict[str, StepRunner] = {}
        self._pool = ThreadPoolExecutor(max_workers=config.executor.parallel, thread_name_prefix="conductor-exec")
        self._stopping = threading.Event()  # set when the run ends abruptly: in-flight steps give their tasks back
        self._wake: Callable[[], None] = lambda: None
        self.signer = signer
        self._checkpointed: dict[Path, int] = {}  # log -> its size in bytes when last checkpointed
        self._verify_settings = VerifySettings(
            commands=list(config.verification.commands),
            timeout_seconds=config.verification.timeout_seconds,
            ignore=self.ignore,
            trust=TrustStore.for_project(layout.keys_dir, config.trust, layout.conductor_dir,
                                         own_key=signer.public_key if signer is not None else None),
            require_signatures=config.trust.require_signatures,
            env_names=tuple(config.executor.env),
        )

    # --- policy and confidence ------------------------------------------------------------------

    @property
    def _plan_policy(self) -> MergedPolicy:
        """The policy of the plan as a whole (no step layer): what the final fork checks run under."""
        return merge_policies(policy_layers(self.plan, self.project_policy))

    def merged_policy(self, step: StepSpec) -> MergedPolicy:
        return merge_policies(policy_layers(self.plan, self.project_policy, step), defaults=self._policy_defaults)

    @property
    def _policy_defaults(self) -> dict[str, int]:
        """config.yaml's ``executor.max_attempts`` is the project's default ``behavior.max_attempts``."""
        return {"max_attempts": self.config.executor.max_attempts}

    def _executor_kind(self) -> str:
        return self.config.executor.kind

    def _runs_here(self) -> bool:
        """Whether this process runs the steps itself (an ``llm`` or ``command`` executor), rather than an
        external executor that watches the handoff folder."""
        return self.config.executor.kind != "handoff"

    def _executor_model(self) -> str | None:
        """``provider/model`` of an ``llm`` executor (what the confidence history groups by), else None."""
        if self.config.executor.kind != "llm":
            return None
        return f"{self.config.executor_provider}/{self.config.executor_model}"

    # --- one pass -------------------------------------------------------------------------------

    def process_once(self) -> dict[str, dict[str, str]]:
        """Advance every fork as far as the files allow. Returns step states per fork.

        Raises:
            StorageError (or any error an executor thread died of): re-raised here, on the next pass after
                it happened, never swallowed until the same step happens to be dispatched again.
        """
        self._raise_executor_errors()
        states = {}
        try:
            for spec in self.plan.forks:
                view = _ForkView(self.layout, self.plan, spec)
                self._reap(view)
                states[spec.fork_id] = self._advance(view)
        except Exception:
            # An executor thread's error (a full disk, say) is the cause of what this pass then tripped
            # over: report the cause.
            self._raise_executor_errors()
            raise
        return states

    def _raise_executor_errors(self) -> None:
        for key, future in list(self._inflight.items()):
            if future.done():
                del self._inflight[key]
                future.result()

    def _reap(self, view: _ForkView) -> None:
        reap_expired(view.fork, max_attempts=self.config.executor.max_attempts,
                     lease_seconds=self.config.executor.lease_seconds, on_event=view.append,
                     prepare_retry=RetryFolders(self.layout, watch=self._runs_here()))

    def _advance(self, view: _ForkView) -> dict[str, str]:
        # Log verdicts a crash left unlogged first: the fork's head must include them before any other
        # step is merged on top of it.
        for step in view.spec.steps:
            found = view.fork.find_task(step.step_id)
            if found is not None and found[0] in ("completed", "failed"):
                self._log_unlogged_verdict(view, step, FAILED if found[0] == "failed" else ACCEPTED)
            if found is not None and found[0] == "failed" and not self._running(view, step):
                self._log_unlogged_failure(view, step)  # (an executor thread still running logs its own)
        states: dict[str, str] = {}
        for step in view.spec.steps:
            state = self._state_of(view, step, states)
            if state == COMPLETED:
                state = self._verify(view, step)
            if state in (FAILED, REPAIRING):
                state = self._repair(view, step)
            if state == WAITING and all(states.get(d) == ACCEPTED for d in step.depends_on):
                state = self._publish(view, step)
            if state == PENDING:
                self._dispatch(view, step)
            states[step.step_id] = state
        self._finish_fork(view, states)
        return states

    def _state_of(self, view: _ForkView, step: StepSpec, states: dict[str, str]) -> str:
        found = view.fork.find_task(step.step_id)
        if found is None and step.step_id in view.reused:
            return ACCEPTED
        if found is None and self._archived_unpublished(view, step):
            return REPAIRING
        if found is None:
            if any(states.get(d) in (FAILED, BLOCKED) for d in step.depends_on):
                return BLOCKED
            if view.has("approval.requested", step_id=step.step_id) and not self._approved(view, step):
                return AWAITING_APPROVAL
            return WAITING
        state = found[0]
        if state == "completed":
            return ACCEPTED if view.fork.sidecar("completed", step.step_id, VERDICT_SUFFIX).exists() else COMPLETED
        return {"pending": PENDING, "in_progress": IN_PROGRESS, "failed": FAILED}[state]

    def _approved(self, view: _ForkView, step: StepSpec) -> bool:
        return self.options.auto_approve or view.has("approval.granted", step_id=step.step_id)

    def _publish(self, view: _ForkView, step: StepSpec) -> str:
        policy = self.merged_policy(step)
        scored = view.last("confidence.scored", step_id=step.step_id)
        if scored is not None:  # scored once: an approved step runs with the confidence it was approved at
            confidence = Confidence.model_validate({k: v for k, v in scored.data.items() if k != "step_id"})
        else:
            learned = learn(read_outcomes(self.layout.history_file), executor=self._executor_kind(),
                            model=self._executor_model(), kind=kind_of(step))
            confidence = score_step(estimate=step.confidence_estimate, allowed_files=step.allowed_files, learned=learned)
        if scored is None:
            view.append("confidence.scored", {"step_id": step.step_id, **confidence.model_dump(mode="json")})
            view.append("policy.merged", {"step_id": step.step_id, "effective": policy.effective.model_dump(mode="json"),
                                          "sources": policy.sources, "notes": policy.notes, "digest": policy.digest})
        if confidence.level == "low" and not self._approved(view, step):
            if not view.has("approval.requested", step_id=step.step_id):
                view.append("approval.requested", {"step_id": step.step_id, "score": confidence.score})
            return AWAITING_APPROVAL
        if confidence.level == "low" and self.options.auto_approve and not view.has("approval.granted", step_id=step.step_id):
            view.append("approval.granted", {"step_id": step.step_id, "by": "--auto-approve"})
        base = view.head
        folder = prepare_workspace(self.layout, self.plan.plan_id, view.spec.fork_id, step.step_id, 1, base,
                                   watch=self._runs_here())
        task = self._new_task(view, step, policy, confidence, attempt=1, base=base, folder=folder)
        sealed = publish_task(view.fork, task)
        crash_point("publish.before_event")
        view.append("task.published", {"step_id": step.step_id, "attempt": 1, "checksum": sealed.checksum,
                                       "base_commit": base})
        return PENDING

    def _new_task(self, view: _ForkView, step: StepSpec, policy: MergedPolicy, confidence: Confidence, *,
                  attempt: int, base: str, folder: Path) -> Task:
        effective = policy.effective
        return Task(
            task_id=step.step_id, plan_id=self.plan.plan_id, fork_id=view.spec.fork_id, attempt=attempt,
            title=step.title, instruction=step.instruction, allowed_files=step.allowed_files,
            protected_patterns=effective.protected_patterns,
            constraints=task_constraints(self.layout, effective.global_constraints, step.allowed_files),
            depends_on=step.depends_on, workspace=self.layout.relative(folder), base_commit=base,
            timeout_seconds=effective.timeout_seconds, max_diff_lines=effective.max_diff_lines,
            max_diff_bytes=effective.max_diff_bytes,
            sandbox_mode=effective.sandbox_mode, network=effective.network, ignore=self.ignore,
            policy_digest=policy.digest, confidence=confidence, max_attempts=effective.max_attempts,
            created_at=utc_now(),
        )

    def _dispatch(self, view: _ForkView, step: StepSpec) -> None:
        if self.runner_factory is None:
            return
        key = (view.spec.fork_id, step.step_id)
        if key in self._inflight:
            future = self._inflight[key]
            if not future.done():
                return
            future.result()  # an executor thread's unexpected exception is a bug: surface it here
        runner = self._runners.get(view.spec.fork_id)
        if runner is None:
            runner = self._runners[view.spec.fork_id] = self.runner_factory(view.log)
        fork, log = view.fork, view.log
        self._inflight[key] = self._pool.submit(self._execute, fork, log, step.step_id, runner)

    def _execute(self, fork: ForkLayout, log: AuditLog, task_id: str, runner: StepRunner) -> None:
        try:
            claim = claim_task(fork, task_id, holder=self.holder, lease_seconds=self.config.executor.lease_seconds,
                               on_event=log.append, contained=starts_no_process(runner))
            if claim is not None:
                execute_claim(self.layout, claim, runner, ignore=self.ignore,
                              lease_seconds=self.config.executor.lease_seconds,
                              heartbeat_seconds=self.config.executor.heartbeat_seconds, on_event=log.append,
                              signer=self.signer, stop=self._stopping,
                              prepare_retry=lambda task: prepare_retry(self.layout, task, watch=True),
                              verified_here=True)
        finally:
            self._wake()

    def _verify(self, view: _ForkView, step: StepSpec) -> str:
        # Another process (a worker's reaper) may have re-queued the task and a worker completed the retry
        # since this pass read the log: judge it against the newest task.published, not a stale one.
        view.refresh()
        attempt = self._completed_attempt(view, step)
        published = view.last("task.published", step_id=step.step_id, attempt=attempt)
        scored = view.last("confidence.scored", step_id=step.step_id)
        verdict = verify_step(
            self.layout, view.fork, step.step_id,
            published_checksum=published.data.get("checksum") if published else None,
            published_attempt=attempt,
            policy=self.merged_policy(step),
            confidence_level=scored.data.get("level", "high") if scored else "high",
            settings=self._verify_settings,
            head_commit=view.head,
        )
        crash_point("verify.after_verdict")
        return self._log_verdict(view, step, verdict)

    def _log_unlogged_verdict(self, view: _ForkView, step: StepSpec, state: str) -> None:
        """Log a verdict written just before a crash (the verdict file is written before its events)."""
        if step.step_id in view.reused:
            return
        folder = "completed" if state == ACCEPTED else "failed"
        path = view.fork.sidecar(folder, step.step_id, VERDICT_SUFFIX)
        if not path.exists():
            return
        verdict = read_document(path, Verdict)
        if not view.has("step.verified", step_id=step.step_id, attempt=verdict.attempt):
            self._log_verdict(view, step, verdict)

    def _log_unlogged_failure(self, view: _ForkView, step: StepSpec) -> None:
        """Log a failure or rejection only the folders know (an external executor writes no events)."""
        if step.step_id in view.reused or settled_since_publish(view.events, step.step_id):
            return
        view.append(*unlogged_failure(view.fork, step.step_id, self._completed_attempt(view, step)))

    def _log_verdict(self, view: _ForkView, step: StepSpec, verdict: Verdict) -> str:
        view.append("step.verified", {
            "step_id": step.step_id, "attempt": verdict.attempt, "accepted": verdict.accepted,
            "reasons": verdict.reasons, "diff_lines": verdict.diff_lines,
            "files": [c.path for c in verdict.files_changed],
            "checks": [c.model_dump(mode="json") for c in verdict.checks],
            "verification": [{"command": e.command, "exit_code": e.exit_code, "output_sha256": e.output_sha256}
                             for e in verdict.verification],
            "verdict_checksum": verdict.checksum,
        })
        crash_point("verify.after_logged")
        learn_from_verdict(self.layout, verdict, step, executor=self._executor_kind(), model=self._executor_model(),
                           predicted=predicted_score(view.events, step.step_id))
        if verdict.accepted and verdict.commit is not None:
            state_store(self.layout).set_ref(f"plans/{self.plan.plan_id}/forks/{view.spec.fork_id}", verdict.commit)
            if self.signer is not None:
                write_attestation(self.layout, view.fork, verdict, verdict.commit, self.signer)
            view.append("step.merged", {"step_id": step.step_id, "attempt": verdict.attempt,
                                        "files": [c.path for c in verdict.files_changed], "commit": verdict.commit})
            return ACCEPTED
        view.append("task.failed", {"step_id": step.step_id, "attempt": verdict.attempt,
                                    "reason": "verification_rejected", "message": "; ".join(verdict.reasons)})
        return FAILED

    def _completed_attempt(self, view: _ForkView, step: StepSpec) -> int:
        published = view.last("task.published", step_id=step.step_id)
        return int(published.data.get("attempt", 1)) if published else 1

    # --- self-repair (conductor.repair) ---------------------------------------------------------

    def _archived_unpublished(self, view: _ForkView, step: StepSpec) -> bool:
        """A crash mid-repair: the step's last published attempt is archived and its retry not yet out."""
        published = view.last("task.published", step_id=step.step_id)
        return published is not None and is_archived(view.fork, step.step_id, int(published.data.get("attempt", 1)))

    def _running(self, view: _ForkView, step: StepSpec) -> bool:
        """Is this engine's executor thread for the step still at work (committing, logging)?"""
        future = self._inflight.get((view.spec.fork_id, step.step_id))
        return future is not None and not future.done()

    def _attempt_budget(self, view: _ForkView, step: StepSpec) -> int:
        """The step's ``max_attempts``, plus one for each attempt given back before any work was done."""
        given_back = sum(1 for e in view.events if e.type == "task.published"
                         and e.data.get("step_id") == step.step_id and e.data.get("reason") == GIVEN_BACK)
        return self.merged_policy(step).effective.max_attempts + given_back

    def _repair(self, view: _ForkView, step: StepSpec) -> str:
        """Retry a step whose last attempt failed or was rejected, while its attempts last: archive that
        attempt with its evidence, log ``task.retried``, publish attempt + 1 from the same base with the
        evidence of every earlier attempt. Every move is idempotent, so a crash anywhere is finished by
        the next pass (``conductor.repair``)."""
        if step.step_id in view.reused or view.has("fork.finished"):
            return FAILED
        if self._running(view, step):
            return REPAIRING  # its executor thread is still committing (and logging) the failure
        attempt = self._completed_attempt(view, step)
        if attempt >= self._attempt_budget(view, step):
            return FAILED
        if view.fork.find_task(step.step_id) is not None and not settled_since_publish(view.events, step.step_id):
            return REPAIRING  # the failure is logged first (by its executor, or by the next pass)
        with fork_lock(view.fork):
            view.refresh()
            found = view.fork.find_task(step.step_id)
            if found is not None and found[0] != "failed":
                return REPAIRING  # moved meanwhile: the next pass looks again
            if found is not None:
                archive_attempt(self.layout, view.fork, step.step_id, attempt, ignore=self.ignore)
            elif not is_archived(view.fork, step.step_id, attempt):
                return FAILED  # nothing to retry from: recovery's agreement check names the disagreement
            crash_point("repair.after_archive")
            if not view.has("task.retried", step_id=step.step_id, attempt=attempt):
                evidence = read_evidence(archive_path(view.fork, step.step_id, attempt, EVIDENCE_SUFFIX))
                view.append("task.retried", {
                    "step_id": step.step_id, "attempt": attempt, "next_attempt": attempt + 1,
                    "outcome": evidence.outcome if evidence else "failed",
                    "reasons": evidence.reasons if evidence else [], "files": evidence.files if evidence else [],
                })
            crash_point("repair.before_publish")
            sealed = publish_task(view.fork, self._retry_task(view, step, attempt))
            crash_point("repair.after_publish")
            view.append("task.published", {"step_id": step.step_id, "attempt": sealed.attempt, "checksum": sealed.checksum,
                                           "base_commit": sealed.base_commit, "reason": "repair"})
        return PENDING

    def _retry_task(self, view: _ForkView, step: StepSpec, attempt: int) -> Task:
        """Attempt + 1 of ``step``: the archived attempt's task (so whatever it carried is kept) with a new
        folder at the same base, the evidence of attempts 1..``attempt``, and a constraint per path an
        earlier attempt was rejected for touching. A task file that is not the one published (tampered,
        even if resealed) is never a template: the newest that is, else one rebuilt from the plan."""
        published = {e.data.get("attempt"): e.data.get("checksum") for e in view.events
                     if e.type == "task.published" and e.data.get("step_id") == step.step_id}
        template = None
        for number in range(attempt, 0, -1):
            try:
                candidate = read_document(archive_path(view.fork, step.step_id, number, ".task.json"), Task)
            except (ConductorError, OSError):
                continue
            if candidate.checksum == published.get(number) and candidate.attempt == number:
                template = candidate  # Conductor's own task as published, not one an executor resealed
                break
        policy = self.merged_policy(step)
        base = template.base_commit if template is not None else self._first_base(view, step)
        folder = prepare_workspace(self.layout, self.plan.plan_id, view.spec.fork_id, step.step_id, attempt + 1, base,
                                   watch=self._runs_here())
        if template is None:
            scored = view.last("confidence.scored", step_id=step.step_id)
            confidence = Confidence.model_validate({k: v for k, v in scored.data.items() if k != "step_id"}) \
                if scored is not None else Confidence(score=0.5, level="medium", reasons=["rebuilt for a retry"])
            template = self._new_task(view, step, policy, confidence, attempt=attempt + 1, base=base, folder=folder)
        previous = previous_attempts(view.fork, step.step_id, attempt, view.events)
        constraints = list(template.constraints)
        for path in (p for evidence in previous for p in evidence.forbidden):
            if forbidden_constraint(path) not in constraints:
                constraints.append(forbidden_constraint(path))
        return template.model_copy(update={
            "attempt": attempt + 1, "workspace": self.layout.relative(folder), "previous_attempts": previous,
            "constraints": constraints, "max_attempts": self._attempt_budget(view, step), "created_at": utc_now(),
            "checksum": None,
        })

    def _first_base(self, view: _ForkView, step: StepSpec) -> str:
        """The base every attempt of ``step`` shares, from the log (the fork's head if none recorded it)."""
        for event in view.events:
            if event.type == "task.published" and event.data.get("step_id") == step.step_id \
                    and isinstance(event.data.get("base_commit"), str):
                return event.data["base_commit"]
        return view.head

    def _finish_fork(self, view: _ForkView, states: dict[str, str]) -> None:
        if view.has("fork.finished"):
            return
        values = set(states.values())
        if values == {ACCEPTED} or (values <= {ACCEPTED, FAILED, BLOCKED} and FAILED in values):
            # Every attempt counts in the confidence history, also those that never reached the verifier
            # (expired leases, executor failures); recorded before fork.finished, so a crash records them again.
            learn_from_events(self.layout, self.plan.plan_id, view.spec.fork_id, view.spec.steps, view.events,
                              executor=self._executor_kind(), model=self._executor_model())
        if values == {ACCEPTED}:
            view.append("fork.finished", {"fork_id": view.spec.fork_id, "status": "succeeded"})
        elif values <= {ACCEPTED, FAILED, BLOCKED} and FAILED in values:
            failed = [s for s, v in states.items() if v == FAILED]
            view.append("fork.finished", {"fork_id": view.spec.fork_id, "status": "failed", "failed_steps": failed})

    # --- the loop -------------------------------------------------------------------------------

    def run(self, stop: threading.Event | None = None) -> RunReport:
        """Run passes until every fork has finished, or only approvals/external work remain.

        ``stop`` ends the run after the current pass, once the steps in flight are done. An exception
        (Ctrl-C's ``KeyboardInterrupt`` included) ends it at once: a command still running is stopped and
        its task given back to ``pending/`` (``task.published {reason: "given_back"}``), for ``resume``.

        Returns:
            The run's report; the plan is ranked and (with ``apply``) the winner applied when all forks
            finished.
        """
        stop = stop or threading.Event()
        ensure_forks(self.layout, self.plan)
        try:
            with FolderWatcher([self.layout.plan_dir(self.plan.plan_id)]) as watcher:
                self._wake = watcher.notify
                while True:
                    states = self.process_once()
                    self.checkpoint()
                    self.on_progress()
                    report = self._halt_report(states)
                    if report is not None or stop.is_set():
                        return report or RunReport(self.plan.plan_id, "halted", message="stopped")
                    watcher.wait(self.config.executor.poll_seconds)
        except BaseException:
            # Ctrl-C, or a failure: a step's command still running is stopped (SIGTERM, then SIGKILL) and its
            # task given back for `resume`, rather than waited for, which could take the step's whole timeout.
            self._stopping.set()
            raise
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _halt_report(self, states: dict[str, dict[str, str]]) -> RunReport | None:
        # After a pass, a WAITING step waits on a dependency that is active or awaiting approval: only
        # active states (an executor or the verifier has work) keep the loop going.
        values = [v for fork in states.values() for v in fork.values()]
        active = COMPLETED in values or REPAIRING in values
        if active or (self.runner_factory is not None and (PENDING in values or IN_PROGRESS in values)):
            return None
        if PENDING in values or IN_PROGRESS in values:
            if self.options.wait:
                return None
            waiting = [(f, s) for f, fork in states.items() for s, v in fork.items() if v in (PENDING, IN_PROGRESS)]
            return RunReport(self.plan.plan_id, "halted", waiting_for_executor=waiting,
                             message="tasks wait for an external executor")
        awaiting = [(f, s) for f, fork in states.items() for s, v in fork.items() if v == AWAITING_APPROVAL]
        if awaiting:
            return RunReport(self.plan.plan_id, "halted", awaiting_approval=awaiting,
                             message="low-confidence steps wait for approval")
        return self.conclude()

    def checkpoint(self) -> None:
        """Sign a checkpoint of every log of the plan that grew (see ``conductor.checkpoint``)."""
        if self.signer is None:
            return
        labels = [("plan", self.plan_log.path)]
        labels += [(f"fork_{spec.fork_id}", self.layout.fork(self.plan.plan_id, spec.fork_id).audit_log)
                   for spec in self.plan.forks]
        for label, path in labels:
            size = path.stat().st_size if path.exists() else 0
            if self._checkpointed.get(path) == size:
                continue  # unchanged since this engine's last checkpoint: skip re-reading the whole log
            write_checkpoint(path, self.layout.checkpoint_dir(self.plan.plan_id, label),
                             origin=audit_origin(self.plan.plan_id, label), key=self.signer)
            self._checkpointed[path] = size

    def conclude(self) -> RunReport:
        """Rank the finished forks, apply the winner (unless told not to) and record the plan's end."""
        evidence = [self._evidence(spec) for spec in self.plan.forks]
        ranking = rank(evidence)
        self.plan_log.append("plan.ranked", {"ranking": [e.to_dict() for e in ranking]})
        crash_point("rank.after_ranked")
        report = RunReport(self.plan.plan_id, "failed", ranking=ranking)
        winner = ranking[0]
        applied = next((e for e in reversed(self.plan_log.events()) if e.type == "plan.applied"), None)
        if winner.status == "succeeded" and winner.checks_passed:
            report.status = "succeeded"
            if applied is not None:  # a plan is applied once; later forks (fork --from) are ranked only
                report.message = f"fork {applied.data.get('fork_id')} was applied earlier; nothing applied now"
            elif self.options.apply:
                self._apply(winner.fork_id, report)
        else:
            report.message = "no fork was fully verified"
        crash_point("plan.before_finished")
        # Attempt folders go before the plan is recorded as finished: a kill during their removal leaves an
        # unfinished plan, whose recovery sweeps what is left and whose resume removes the rest.
        if not self.options.keep_workspaces:
            remove_plan_workspaces(self.layout, self.plan.plan_id)
        for spec in self.plan.forks:  # what a worker killed mid-write left while the plan ran
            view = _ForkView(self.layout, self.plan, spec)
            sweep_fork_leftovers(view.fork, view.log)
        self.plan_log.append("plan.finished", {"status": report.status, "winner": winner.fork_id
                                               if report.status == "succeeded" else None,
                                               "applied": report.applied_fork is not None})
        self.checkpoint()
        return report

    def _apply(self, fork_id: str, report: RunReport) -> None:
        head = _ForkView(self.layout, self.plan, self.plan.fork(fork_id)).head
        refused = self._final_policy_reasons(fork_id, head)
        if refused:
            reason = "the final diff breaks the policy: " + "; ".join(refused)
            self.plan_log.append("plan.apply_failed", {"fork_id": fork_id, "reason": reason})
            report.status = "failed"
            report.message = f"the winner's changes were not applied: {reason}"
            return
        try:
            changes = apply_winner(self.layout, self.plan.plan_id, fork_id, base_commit=base_commit(self.plan),
                                   winner_commit=head, ignore=self.ignore)
        except MergeConflict as exc:
            self.plan_log.append("plan.apply_failed", {"fork_id": fork_id, "reason": str(exc)})
            report.status = "failed"
            report.message = f"the winner's changes were not applied: {exc}"
            return
        crash_point("apply.before_event")
        report.applied_fork = fork_id
        report.applied_files = [c.path for c in changes]
        self.plan_log.append("plan.applied", {"fork_id": fork_id, "files": report.applied_files, "commit": head})

    def _final_policy_reasons(self, fork_id: str, head: str) -> list[str]:
        """The policy judged once more on the winner's whole diff, just before it touches the project: every
        path allowed by some step of the fork, none protected (under any name a symlink gives it), within
        the plan's limits. Each step passed on its own; this catches what only their sum, or a policy made
        stricter since, refuses."""
        store = state_store(self.layout)
        tree = store.tree_of(head)
        changes = store.changes(store.tree_of(base_commit(self.plan)), tree)
        allowed = sorted({entry for step in self.plan.fork(fork_id).steps for entry in step.allowed_files})
        plan_policy = self._plan_policy
        # Size limits are per step: a fork of many steps may add more than one step may.
        decision = evaluate_changes(plan_policy, allowed, changes, symlinks=store.symlinks(tree) if changes else {})
        return [r for r in decision.reasons if "max_diff_" not in r]

    def _evidence(self, spec: ForkSpec) -> ForkEvidence:
        view = _ForkView(self.layout, self.plan, spec)
        finished = view.last("fork.finished")
        status = finished.data.get("status", "failed") if finished else "failed"
        verified = sum(1 for s in spec.steps if s.step_id in view.reused or view.has("step.merged", step_id=s.step_id))
        changes = fork_changes(self.layout, base_commit(self.plan), view.head)
        checks = status == "succeeded" and fork_checks(
            self.layout, self.plan.plan_id, spec.fork_id, view.head, view.log,
            commands=list(self.config.verification.commands),
            timeout_seconds=self.config.verification.timeout_seconds,
            sandbox_mode=self._plan_policy.effective.sandbox_mode, network=self._plan_policy.effective.network,
            env_names=self.config.executor.env,
        )
        return ForkEvidence(
            fork_id=spec.fork_id, strategy=spec.strategy.name, status=status, steps_verified=verified,
            steps_total=len(spec.steps), checks_passed=bool(checks), changed_lines=diff_lines(changes),
            changed_files=len(changes), tokens=fork_tokens(view.log),
        )
