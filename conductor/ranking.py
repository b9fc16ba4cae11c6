"""Ranking the forks of a plan by evidence, and applying the winner's changes to the project.

Order (best first): every step verified; the verification commands pass on the fork's final workspace;
fewer changed lines; fewer LLM tokens; then the fork id. A fork that is not fully verified never wins.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from conductor.audit import AuditLog
from conductor.blobs import BlobStore
from conductor.canonical import pretty_bytes, seal
from conductor.errors import MergeConflict
from conductor.faults import crash_point
from conductor.fsutil import atomic_write, remove_durably, write_scope
from conductor.layout import ProjectLayout
from conductor.models import FileChange, utc_now
from conductor.plan_store import load_base
from conductor.verification import all_passed, run_verification
from conductor.verifier import merge_changes
from conductor.workspace import diff, snapshot


@dataclass(frozen=True)
class ForkEvidence:
    """What a fork achieved, as the ranking sees it."""

    fork_id: str
    strategy: str
    status: str              # "succeeded" | "failed"
    steps_verified: int
    steps_total: int
    checks_passed: bool
    changed_lines: int
    changed_files: int
    tokens: int

    def sort_key(self) -> tuple:
        # fork ids are numbers as text: compare by length first so fork 10 follows fork 2
        return (self.status != "succeeded", not self.checks_passed, self.changed_lines, self.tokens,
                len(self.fork_id), self.fork_id)

    def to_dict(self) -> dict:
        return asdict(self)


def fork_changes(layout: ProjectLayout, plan_id: str, fork_id: str, *, ignore: list[str]) -> list[FileChange]:
    """The changes of a fork's workspace against the project as it was when the plan began."""
    workspace = layout.workspace_dir(plan_id, fork_id)
    return diff(load_base(layout, plan_id), snapshot(workspace, ignore=ignore),
                before_store=BlobStore(layout.objects_dir), after_root=workspace)


def fork_checks(
    layout: ProjectLayout, plan_id: str, fork_id: str, log: AuditLog, *, commands: list[str], timeout_seconds: float
) -> bool:
    """Run the verification commands once on the fork's final workspace (reusing a recorded run)."""
    for event in log.events():
        if event.type == "fork.verified":
            return bool(event.data.get("passed"))
    evidence = run_verification(commands, layout.workspace_dir(plan_id, fork_id), timeout_seconds=timeout_seconds)
    passed = all_passed(evidence)
    log.append("fork.verified", {
        "fork_id": fork_id, "passed": passed,
        "verification": [{"command": e.command, "exit_code": e.exit_code, "output_sha256": e.output_sha256}
                         for e in evidence],
    })
    return passed


def fork_tokens(log: AuditLog) -> int:
    """Tokens of every LLM call of the fork, recorded answers included: the ranking weighs what a
    strategy costs, not whether this run happened to find it in the recordings."""
    return sum(int(e.data.get("input_tokens", 0)) + int(e.data.get("output_tokens", 0))
               for e in log.events() if e.type == "llm.call")


def rank(evidence: list[ForkEvidence]) -> list[ForkEvidence]:
    """Best fork first (see the module docstring)."""
    return sorted(evidence, key=ForkEvidence.sort_key)


APPLY_INTENT = "apply.intent.json"
APPLY_INTENT_SCHEMA = "conductor.apply_intent/v1"


def apply_intent_file(layout: ProjectLayout, plan_id: str) -> Path:
    """``handoff/plan_<id>/apply.intent.json``: present only while a winner is being applied."""
    return layout.plan_dir(plan_id) / APPLY_INTENT


def apply_winner(
    layout: ProjectLayout, plan_id: str, fork_id: str, changes: list[FileChange], *, ignore: list[str]
) -> None:
    """Apply a fork's changes to the project itself (skipping any already applied).

    Crash safety: before the first project file changes, an intent record (``apply.intent.json``:
    ``{schema: "conductor.apply_intent/v1", plan_id, fork_id, changes, created_at, checksum}``, the
    checksum as in docs/protocol.md section 3) is written durably; it is removed once every file is in
    place. A crash in between leaves a half-applied project *and* the intent, from which
    ``conductor.recovery`` finishes the apply on the next start. Finishing is idempotent: changes already
    in place are skipped.

    Raises:
        MergeConflict: a project file changed since the plan began; nothing was written (the intent is
            removed again).
        StorageError: a write failed; the intent stays, so recovery finishes the apply later.
    """
    intent = apply_intent_file(layout, plan_id)
    document = seal({"schema": APPLY_INTENT_SCHEMA, "plan_id": plan_id, "fork_id": fork_id,
                     "changes": [c.to_document() for c in changes], "created_at": utc_now()})
    atomic_write(intent, pretty_bytes(document))
    crash_point("apply.after_intent")
    try:
        with write_scope("apply"):
            merge_changes(changes, src_root=layout.workspace_dir(plan_id, fork_id), dst_root=layout.root,
                          base=load_base(layout, plan_id), ignore=ignore)
    except MergeConflict:
        remove_durably(intent)  # the conflict check runs before any write: nothing to finish
        raise
    crash_point("apply.after_files")
    remove_durably(intent)
