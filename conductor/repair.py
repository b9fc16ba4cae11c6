"""Self-repair from evidence: a rejected or failed attempt is archived with its evidence, then retried.

When an attempt of a step ends in ``failed/`` — rejected by the verifier (a verification command failed,
the policy was broken), failed by its executor's own word (``status: failed``), or untrustworthy (a
malformed result, a tampered task file) — and the step has attempts left (policy
``behavior.max_attempts``, shared with lease-expiry re-queues), the engine retries it from the same
``base_commit`` as attempt + 1. Nothing of the earlier attempt is lost; under the fork lock:

1. its **evidence** (:class:`~conductor.models.PreviousAttempt`: outcome, the verifier's reasons, the first
   failing verification command with the tail of its output, the diff it made against the base, the
   files it touched, the paths the policy forbade) is written to ``attempts/<step>.a<N>.evidence.json``
   — once: a crash after this keeps the first evidence, so a redo never builds different evidence;
2. its sidecars (result, explanation, provenance, verdict, attestation) are moved to
   ``attempts/<step>.a<N><suffix>``, then its task file, last (``attempts/<step>.a<N>.task.json``):
   ``attempts/`` is no state folder, so no claimer, reaper or recovery pass lists it;
3. ``task.retried`` is logged and the retry is published (``task.published {reason: "repair"}``), carrying
   the evidence of every earlier attempt in ``previous_attempts``.

A crash between any two of these leaves either the task still in ``failed/`` (the next pass archives the
rest) or the task archived and no retry published (the next pass logs and publishes it); recovery's
agreement check accepts both (``conductor.recovery``). Archive names hold the attempt number, so an
attempt is archived once and never overwritten.

Bounds: the output tail is the last 4 KiB, the diff the first 8 KiB (cut at a line end), both with
secrets redacted (``conductor.redact``) and the attempt folder's absolute path replaced by ``.`` (run
times in the output are masked too): evidence, and so a repair prompt, is the same on a re-run, which
``fork --from`` and ``resume`` need to replay recorded repair calls.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from conductor.attempts import attempt_changes, state_store, task_workspace
from conductor.canonical import check_checksum, pretty_bytes, seal, strict_loads
from conductor.errors import ConductorError
from conductor.faults import crash_point
from conductor.fsutil import atomic_write, durable_rename, fsync_dir
from conductor.handoff.documents import read_document
from conductor.handoff.failures import REJECTION_KINDS
from conductor.layout import (
    ATTESTATION_SUFFIX,
    EXPLANATION_SUFFIX,
    PROVENANCE_SUFFIX,
    RESULT_SUFFIX,
    TASK_SUFFIX,
    VERDICT_SUFFIX,
    ForkLayout,
    ProjectLayout,
)
from conductor.models import (
    MAX_DIFF_EVIDENCE_BYTES,
    MAX_OUTPUT_TAIL_BYTES,
    Event,
    PreviousAttempt,
    Result,
    Task,
    Verdict,
)
from conductor.redact import redact

ARCHIVE_DIR = "attempts"
EVIDENCE_SUFFIX = ".evidence.json"
ARCHIVED_SIDECARS = (RESULT_SUFFIX, EXPLANATION_SUFFIX, PROVENANCE_SUFFIX, VERDICT_SUFFIX, ATTESTATION_SUFFIX)
# Verdict reasons that say the executor's files could not be trusted, not that its work was wrong.
MALFORMED_REASONS = ("invalid_result", "result_mismatch", "checksum_mismatch")
MAX_SUMMARY_CHARS = 500


def archive_path(fork: ForkLayout, step_id: str, attempt: int, suffix: str) -> Path:
    """``fork_<id>/attempts/<step>.a<attempt><suffix>``: where an earlier attempt's file is kept."""
    return fork.dir / ARCHIVE_DIR / archive_name(step_id, attempt, suffix)


def archive_name(step_id: str, attempt: int, suffix: str) -> str:
    """The name of :func:`archive_path` in ``attempts/``."""
    return f"{step_id}.a{attempt}{suffix}"


def is_archived(fork: ForkLayout, step_id: str, attempt: int) -> bool:
    """Whether attempt ``attempt`` of ``step_id`` is archived (its task file moved, the last move)."""
    return archive_path(fork, step_id, attempt, TASK_SUFFIX).exists()


def archive_attempt(layout: ProjectLayout, fork: ForkLayout, step_id: str, attempt: int, *,
                    ignore: list[str]) -> PreviousAttempt:
    """Archive the failed attempt in ``failed/``: evidence first, then sidecars, the task file last.

    Call under the fork lock. Idempotent: a redo after a crash moves what is left and keeps the evidence
    written first.

    Returns:
        The attempt's evidence.

    Raises:
        StorageError: a write, rename or fsync failed (nothing is lost: the next pass goes on from there).
    """
    folder = fork.dir / ARCHIVE_DIR
    if not folder.is_dir():
        folder.mkdir(exist_ok=True)
        fsync_dir(fork.dir)
    path = archive_path(fork, step_id, attempt, EVIDENCE_SUFFIX)
    evidence = read_evidence(path)
    if evidence is None:
        evidence = collect_evidence(layout, fork, step_id, attempt, ignore=ignore)
        atomic_write(path, pretty_bytes(seal(evidence.model_dump(mode="json"))))
        crash_point("repair.after_evidence")
    for suffix in ARCHIVED_SIDECARS:
        source = fork.sidecar("failed", step_id, suffix)
        if source.exists():
            durable_rename(source, archive_path(fork, step_id, attempt, suffix))
    crash_point("repair.before_task_archive")
    source = fork.task_file("failed", step_id)
    if source.exists():
        durable_rename(source, archive_path(fork, step_id, attempt, TASK_SUFFIX))
    return evidence


def read_evidence(path: Path) -> PreviousAttempt | None:
    """The evidence file at ``path``, or None when it is missing or damaged (it is then rebuilt)."""
    try:
        document = strict_loads(path.read_bytes(), source=str(path))
        check_checksum(document, source=str(path))
        document.pop("checksum", None)
        return PreviousAttempt.model_validate(document)
    except (OSError, ConductorError, ValueError, AttributeError):
        return None


def previous_attempts(fork: ForkLayout, step_id: str, upto: int, events: list[Event]) -> list[PreviousAttempt]:
    """The evidence of attempts 1..``upto`` of a step, oldest first: archived evidence, and a short entry
    for an attempt whose lease expired (its task was re-queued, so nothing of it was archived)."""
    expired = {e.data.get("attempt"): e.data for e in events
               if e.type == "task.lease_expired" and e.data.get("step_id") == step_id}
    found = []
    for attempt in range(1, upto + 1):
        evidence = read_evidence(archive_path(fork, step_id, attempt, EVIDENCE_SUFFIX))
        if evidence is not None:
            found.append(evidence)
        elif attempt in expired:
            why = expired[attempt].get("reason") or "its holder stopped renewing it"
            found.append(PreviousAttempt(attempt=attempt, outcome="lease_expired",
                                         reasons=[f"the lease expired ({why})"]))
    return found


def archived_attempts(fork: ForkLayout, step_id: str) -> list[int]:
    """Numbers of the archived attempts of a step, in order."""
    folder = fork.dir / ARCHIVE_DIR
    prefix = f"{step_id}.a"
    numbers = []
    for path in folder.glob(f"{prefix}*{TASK_SUFFIX}") if folder.is_dir() else []:
        middle = path.name[len(prefix): -len(TASK_SUFFIX)]
        if middle.isdigit():
            numbers.append(int(middle))
    return sorted(numbers)


# --- evidence -------------------------------------------------------------------------------------


def collect_evidence(layout: ProjectLayout, fork: ForkLayout, step_id: str, attempt: int, *,
                     ignore: list[str]) -> PreviousAttempt:
    """Build the evidence of the attempt in ``failed/`` from its verdict, result and task (each read
    strictly; what cannot be read is itself evidence) and Conductor's capture of its workspace."""
    verdict = _read(fork.sidecar("failed", step_id, VERDICT_SUFFIX), Verdict)
    result = _read(fork.sidecar("failed", step_id, RESULT_SUFFIX), Result)
    task = _read(fork.task_file("failed", step_id), Task)
    workspace = _workspace(layout, task.value) if task.value is not None else None
    outcome, reasons = _outcome(verdict, result, task)
    files = [c.path for c in verdict.value.files_changed] if verdict.value is not None else \
        [c.path for c in result.value.files_changed] if result.value is not None else []
    command, tail = _failing_command(verdict.value, workspace)
    diff, truncated = _diff(layout, task.value, verdict.value, workspace, ignore)
    summary = redact(result.value.summary)[:MAX_SUMMARY_CHARS] if result.value is not None else ""
    return PreviousAttempt(
        attempt=attempt, outcome=outcome, reasons=[redact(r) for r in reasons], summary=summary, files=files,
        failed_command=command, output_tail=tail, diff=diff, diff_truncated=truncated,
        forbidden=_forbidden(task.value, files, result.value),
    )


class _Read:
    """A document read strictly, or why it could not be."""

    def __init__(self, value: Any = None, error: str | None = None) -> None:
        self.value, self.error = value, error


def _read(path: Path, model: type) -> _Read:
    try:
        return _Read(read_document(path, model))
    except FileNotFoundError:
        return _Read(error=f"no {path.name}")
    except (ConductorError, OSError) as exc:
        return _Read(error=str(exc))


def _workspace(layout: ProjectLayout, task: Task) -> Path | None:
    try:
        return task_workspace(layout, task)
    except (ConductorError, OSError):
        return None


def _outcome(verdict: _Read, result: _Read, task: _Read) -> tuple[str, list[str]]:
    if verdict.value is not None:
        reasons = list(verdict.value.reasons) or ["rejected by the verifier"]
        malformed = any(r.startswith(MALFORMED_REASONS) for r in reasons)
        return ("malformed" if malformed else "rejected"), reasons
    if result.value is None:
        return "malformed", [f"invalid_result: {result.error}"]
    error = result.value.error
    reason = f"{error.kind}: {error.message}" if error is not None else "the executor reported failure"
    if task.value is None or (error is not None and error.kind in REJECTION_KINDS):
        return "malformed", [reason]  # a task file its claimer rejected unexecuted (docs/protocol.md 6.6)
    return "failed", [reason]


def _tail(text: str, limit: int) -> str:
    data = text.encode("utf-8")
    return data[-limit:].decode("utf-8", errors="ignore") if len(data) > limit else text


def _unrooted(text: str, workspace: Path | None) -> str:
    """Replace the attempt folder's absolute path by ``.``: it differs per attempt and fork, and a prompt
    that differs only there would miss its recording."""
    return text.replace(str(workspace), ".") if workspace is not None else text


_DURATION = re.compile(r"\b(in|took) \d+(?:\.\d+)?\s?(s|ms|sec|seconds)\b")


def _timeless(text: str) -> str:
    """Mask run times (pytest's ``1 failed in 0.03s``, unittest's ``Ran 1 test in 0.001s``): they differ on
    every run, and a repair prompt that differs only there would miss its recording on a re-run."""
    return _DURATION.sub(r"\1 <time>", text)


def _failing_command(verdict: Verdict | None, workspace: Path | None) -> tuple[str | None, str]:
    for evidence in verdict.verification if verdict is not None else []:
        if evidence.exit_code != 0:
            output = _timeless(_unrooted(evidence.output_tail, workspace))
            return evidence.command, _tail(redact(output), MAX_OUTPUT_TAIL_BYTES)
    return None, ""


def _diff(layout: ProjectLayout, task: Task | None, verdict: Verdict | None, workspace: Path | None,
          ignore: list[str]) -> tuple[str, bool]:
    """The attempt's change against its base as a unified diff (bounded), from the verifier's capture or,
    when there is none (a malformed result, an executor failure), from a capture made now."""
    if task is None:
        return "", False
    try:
        store = state_store(layout)
        tree = verdict.tree if verdict is not None else None
        if tree is None and workspace is not None:
            tree, _ = attempt_changes(layout, workspace, task.base_commit, ignore)
        if tree is None:
            return "", False
        raw = store.git.run(["diff-tree", "-p", "-r", "--no-color", "--no-ext-diff", "--no-renames",
                             store.tree_of(task.base_commit), tree])
    except (ConductorError, OSError):
        return "", False
    text = redact(_unrooted(raw.decode("utf-8", errors="replace"), workspace))
    data = text.encode("utf-8")
    if len(data) <= MAX_DIFF_EVIDENCE_BYTES:
        return text, False
    cut = data[:MAX_DIFF_EVIDENCE_BYTES]
    cut = cut[: cut.rfind(b"\n") + 1] or cut
    return cut.decode("utf-8", errors="ignore"), True


def _forbidden(task: Task | None, files: list[str], result: Result | None) -> list[str]:
    """Paths the attempt changed, or asked to change, that its policy does not allow."""
    from conductor.policy import matches_allowed, matches_protected

    if task is None:
        return []
    paths = list(files)
    error = result.error if result is not None else None
    if error is not None and error.kind == "disallowed_edit":  # the llm executor refused these edits
        paths += [part.partition(": ")[0] for part in error.message.split("; ") if ": " in part]
    forbidden = []
    for path in paths:
        try:
            refused = not matches_allowed(path, task.allowed_files) or matches_protected(path, task.protected_patterns)
        except (ConductorError, ValueError):
            refused = True  # an unsafe path is forbidden whatever the patterns say
        if refused and path not in forbidden:
            forbidden.append(path)
    return forbidden


def forbidden_constraint(path: str) -> str:
    """The constraint a retry gets for a path an earlier attempt was rejected for touching."""
    return f"Do NOT modify {path}: an earlier attempt was rejected for changing it (outside allowed_files or protected)"


def history(layout: ProjectLayout, fork: ForkLayout, step_id: str) -> list[dict[str, Any]]:
    """Every archived attempt of a step, oldest first, for ``conductor explain``: ``[{attempt, outcome,
    reasons, summary, files, failed_command, output_tail, forbidden, executor, explanation}]``."""
    attempts = []
    for number in archived_attempts(fork, step_id):
        evidence = read_evidence(archive_path(fork, step_id, number, EVIDENCE_SUFFIX))
        entry: dict[str, Any] = {"attempt": number, "archived": True}
        if evidence is not None:
            entry.update(evidence.model_dump(mode="json", exclude={"diff"}))
            entry["diff_lines"] = evidence.diff.count("\n") if evidence.diff else 0
        result = _read(archive_path(fork, step_id, number, RESULT_SUFFIX), Result).value
        entry["executor"] = result.executor.id if result is not None else None
        explanation = archive_path(fork, step_id, number, EXPLANATION_SUFFIX)
        entry["explanation"] = explanation.read_text("utf-8", errors="replace") if explanation.exists() else None
        attempts.append(entry)
    return attempts
