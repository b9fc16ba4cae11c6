"""Conductor's own check of every task that arrives in ``completed/``, and the merge of accepted work.

Nothing the executor says is trusted. The verifier re-reads the task (its checksum must equal the one
published), reads the result (strictly; it must name this attempt and this task checksum), captures the
attempt's working tree into Conductor's private repository and diffs it against the attempt's base
commit to find what really changed, evaluates the changes against the merged policy, runs the
verification commands, and only then merges the captured tree into the fork's state: a new commit whose
parent is the fork's head. What is merged is the tree captured *before* any verification command ran,
so a command (or a test the executor wrote) that writes files afterwards changes nothing that is merged.
The verdict file, written last, records the attempt's tree and the new commit; a crash before it is
redone on resume (a redone commit gets a new id, harmless: nothing recorded the first one).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from pathspec import GitIgnoreSpec

from conductor.attempts import attempt_changes, state_store, task_workspace
from conductor.errors import GitError, IntegrityError, MergeConflict, UnsafePath
from conductor.faults import crash_point
from conductor.fsutil import durable_rename, file_sha256
from conductor.handoff.documents import read_document, write_document
from conductor.layout import (
    EXPLANATION_SUFFIX,
    PROVENANCE_SUFFIX,
    RESULT_SUFFIX,
    VERDICT_SUFFIX,
    ForkLayout,
    ProjectLayout,
)
from conductor.models import Check, FileChange, Result, Task, Verdict, utc_now
from conductor.keys import TrustStore
from conductor.paths import check_link_target
from conductor.policy import MergedPolicy, evaluate_changes
from conductor.provenance import read_provenance
from conductor.sandbox import for_step
from conductor.verification import all_passed, run_verification
from conductor.workspace import diff_lines
from conductor.workspace.store import MODE_LINK


@dataclass(frozen=True)
class VerifySettings:
    commands: list[str]
    timeout_seconds: float
    ignore: list[str]
    trust: TrustStore | None = None  # None: provenance signatures are not checked (only its digests)
    require_signatures: bool = False
    env_names: tuple[str, ...] = ()  # executor.env: variables passed on to verification commands


def _reject_early(fork: ForkLayout, task_id: str, attempt: int, reason: str, policy: MergedPolicy) -> Verdict:
    return _finish(fork, Verdict(
        task_id=task_id, plan_id=fork.plan_id, fork_id=fork.fork_id, attempt=attempt, accepted=False,
        reasons=[reason], diff_lines=0, policy_digest=policy.digest, decided_at=utc_now(),
    ))


def verify_step(
    layout: ProjectLayout,
    fork: ForkLayout,
    task_id: str,
    *,
    published_checksum: str | None,
    published_attempt: int = 1,
    policy: MergedPolicy,
    confidence_level: str,
    settings: VerifySettings,
    head_commit: str,
) -> Verdict:
    """Verify the completed task ``task_id`` of ``fork`` and merge it when accepted.

    Args:
        head_commit: the fork's state now (from its audit log); an accepted attempt becomes its child.
        published_checksum: the checksum the engine published for this attempt (from the audit log).
        published_attempt: that attempt's number (used when the task file itself cannot be read).
        policy: the step's merged policy now.
        confidence_level: "medium" adds the check that the executor's reported files match the truth.

    Returns:
        The verdict, already written (``completed/`` if accepted, else the task moved to ``failed/``).
    """
    task_path = fork.task_file("completed", task_id)
    try:
        task = read_document(task_path, Task)
    except IntegrityError as exc:
        return _reject_early(fork, task_id, published_attempt, f"checksum_mismatch: {exc}", policy)
    if published_checksum is not None and task.checksum != published_checksum:
        return _reject_early(fork, task_id, task.attempt,
                             f"checksum_mismatch: task file is not the one published ({published_checksum})", policy)
    try:
        result = read_document(fork.sidecar("completed", task_id, RESULT_SUFFIX), Result)
    except (FileNotFoundError, IntegrityError) as exc:
        return _reject_early(fork, task_id, task.attempt, f"invalid_result: {exc}", policy)
    mismatched = [name for name, got, want in (
        ("task_id", result.task_id, task.task_id), ("plan_id", result.plan_id, task.plan_id),
        ("fork_id", result.fork_id, task.fork_id), ("attempt", result.attempt, task.attempt),
        ("fencing_token", result.fencing_token, task.attempt), ("task_checksum", result.task_checksum, task.checksum),
    ) if got != want]
    if mismatched:
        return _reject_early(fork, task_id, task.attempt,
                             f"result_mismatch: the result's {', '.join(mismatched)} do not match the task", policy)
    store = state_store(layout)
    try:
        workspace = task_workspace(layout, task)
        tree, changes = attempt_changes(layout, workspace, task.base_commit, settings.ignore)
        # Keep the attempt (accepted or not) reachable: its diff is evidence.
        store.set_ref(f"plans/{fork.plan_id}/attempts/{fork.fork_id}/{task_id}/{task.attempt}",
                      store.commit(tree, [task.base_commit], f"{task_id} attempt {task.attempt}\n"))
    except (UnsafePath, FileNotFoundError, IntegrityError, GitError) as exc:
        return _reject_early(fork, task_id, task.attempt, f"workspace_error: {exc}", policy)

    links = store.symlinks_after(store.tree_of(task.base_commit), tree, changes) if changes else {}
    decision = evaluate_changes(policy, task.allowed_files, changes, symlinks=links)
    reasons, checks = list(decision.reasons), list(decision.checks)
    reasons += _unsafe_links(store, tree, changes)
    ignored = ignore_matcher(settings.ignore)
    reported = _reported_check(result, changes, ignored)
    checks.append(reported)
    provenance_check = _provenance_check(fork, task_id, result, changes, settings, ignored)
    checks.append(provenance_check)
    if not provenance_check.passed and (settings.require_signatures or not provenance_check.detail.startswith("unsigned:")):
        reasons.append(f"provenance: {provenance_check.detail}")
    if confidence_level == "medium" and not reported.passed:
        reasons.append(f"medium confidence: {reported.detail}")
    evidence = []
    if not reasons and settings.commands:
        sandbox = for_step(writable=(workspace,), keys_dir=layout.keys_dir, environ=os.environ,
                           mode=policy.effective.sandbox_mode, network=policy.effective.network)
        evidence = run_verification(settings.commands, workspace, timeout_seconds=settings.timeout_seconds,
                                    sandbox=sandbox, env_names=settings.env_names,
                                    temp_parent=layout.fork_scratch_dir(task.plan_id, task.fork_id))
        passed = all_passed(evidence)
        checks.append(Check(name="verification_commands", passed=passed,
                            detail=", ".join(f"{e.command} → {e.exit_code}" for e in evidence)))
        reasons += [f"verification failed: {e.command} exited {e.exit_code}" + (" (timeout)" if e.timed_out else "")
                    for e in evidence if e.exit_code != 0]
    commit = None
    if not reasons:
        try:
            merged = tree if head_commit == task.base_commit else \
                store.merge(store.tree_of(task.base_commit), store.tree_of(head_commit), tree)
            commit = store.commit(merged, [head_commit], f"{task_id} (attempt {task.attempt}): {task.title or task_id}\n")
            crash_point("verify.after_merge")
        except MergeConflict as exc:
            reasons.append(f"merge_conflict: {exc}")
    verdict = Verdict(
        task_id=task_id, plan_id=fork.plan_id, fork_id=fork.fork_id, attempt=task.attempt,
        accepted=not reasons, reasons=reasons, checks=checks, files_changed=changes,
        diff_lines=diff_lines(changes), verification=evidence, policy_digest=policy.digest,
        tree=tree, commit=commit if not reasons else None, decided_at=utc_now(),
    )
    return _finish(fork, verdict)


def _unsafe_links(store, tree: str, changes: list[FileChange]) -> list[str]:
    """A new or changed symlink must point inside the workspace and never into ``.git``: the path rules
    judge the link's own name only, and a merged link would let a later step write through it. The
    target is read from the captured tree, not from the folder (which the executor may still change)."""
    links = [c.path for c in changes if c.mode == MODE_LINK]
    entries = store.entries(tree, links)
    targets = store.read_blobs(e.oid for e in entries.values())
    reasons = []
    for path in links:
        try:
            check_link_target(path, os.fsdecode(targets[entries[path].oid]))
        except UnsafePath as exc:
            reasons.append(f"unsafe_symlink: {exc}")
    return reasons


def ignore_matcher(ignore: list[str]) -> Callable[[str], bool]:
    """Whether a workspace path matches a ``workspace.ignore`` pattern (gitignore syntax, as the capture
    applies them): such a path is never part of what an attempt changed."""
    if not ignore:
        return lambda path: False
    return GitIgnoreSpec.from_lines(ignore).match_file


def _reported_check(result: Result, changes: list[FileChange], ignored: Callable[[str], bool]) -> Check:
    """The executor's ``files_changed`` against the captured changes. Reported paths matching
    ``workspace.ignore`` are left out first: the capture leaves them out too, so an executor that truthfully
    reports a cache file it wrote (``__pycache__/x.pyc``) is not contradicted."""
    reported = {c.path for c in result.files_changed if not ignored(c.path)}
    dropped = sorted({c.path for c in result.files_changed} - reported)
    observed = {c.path for c in changes}
    note = f"; not counted (workspace.ignore): {dropped}" if dropped else ""
    if reported == observed:
        return Check(name="reported_changes_match", passed=True, detail=note.removeprefix("; "))
    detail = f"executor reported {sorted(reported)}, workspace shows {sorted(observed)}{note}"
    return Check(name="reported_changes_match", passed=False, detail=detail)


def _provenance_check(
    fork: ForkLayout, task_id: str, result: Result, changes: list[FileChange], settings: VerifySettings,
    ignored: Callable[[str], bool],
) -> Check:
    """The executor's provenance: a DSSE envelope whose statement names the result and the changed files
    with their true digests, signed by a key trusted for the executor (or unsigned, unless required).
    Subjects matching ``workspace.ignore`` are not compared: they are never captured nor merged."""
    path = fork.sidecar("completed", task_id, PROVENANCE_SUFFIX)
    if not path.exists():
        return Check(name="provenance", passed=False, detail="unsigned: no provenance file")
    trust = settings.trust if settings.trust is not None else TrustStore()
    try:
        read = read_provenance(path, trust, executor_id=result.executor.id, require_signature=False)
    except (IntegrityError, OSError) as exc:
        return Check(name="provenance", passed=False, detail=str(exc))
    result_name = f"{task_id}{RESULT_SUFFIX}"
    wrong = [] if read.subjects.get(result_name) == file_sha256(fork.sidecar("completed", task_id, RESULT_SUFFIX)) \
        else [result_name]
    truth = {c.path: c.sha256 for c in changes}
    wrong += [name for name, hex_digest in read.subjects.items()
              if name != result_name and not ignored(name) and truth.get(name) != hex_digest]
    if wrong:
        return Check(name="provenance", passed=False,
                     detail=f"subject digests do not match the files: {', '.join(sorted(wrong))}")
    if not read.signed_by:
        return Check(name="provenance", passed=False, detail="unsigned: no signature by a trusted key")
    return Check(name="provenance", passed=True, detail=f"signed by {', '.join(k[:16] for k in read.signed_by)}")


def _finish(fork: ForkLayout, verdict: Verdict) -> Verdict:
    task_id = verdict.task_id
    if verdict.accepted:
        return write_document(fork.sidecar("completed", task_id, VERDICT_SUFFIX), verdict)
    sealed = write_document(fork.sidecar("failed", task_id, VERDICT_SUFFIX), verdict)
    crash_point("verify.after_reject_verdict")
    for suffix in (RESULT_SUFFIX, EXPLANATION_SUFFIX, PROVENANCE_SUFFIX):
        source = fork.sidecar("completed", task_id, suffix)
        if source.exists():
            durable_rename(source, fork.sidecar("failed", task_id, suffix))
    crash_point("verify.before_reject_move")
    durable_rename(fork.task_file("completed", task_id), fork.task_file("failed", task_id))  # commit point
    return sealed


