"""Ranking the forks of a plan by evidence, and applying the winner to the project.

Order (best first): every step verified (the fork succeeded); the verification commands pass on the
fork's final state; for forks that did not succeed, more steps verified, then a larger share of their
steps verified (1/2 before 1/3, and 1/2 before 0/3 whatever their diffs); fewer changed lines; fewer LLM
tokens; then the fork id. A fork that is not fully verified never wins. Among forks that succeeded the
number of steps does not count: a strategy split into more steps is not better for it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from conductor.attempts import state_store
from conductor.audit import AuditLog
from conductor.canonical import pretty_bytes, seal
from conductor.errors import MergeConflict
from conductor.faults import crash_point
from conductor.fsutil import atomic_write, remove_durably, write_scope
from conductor.layout import ProjectLayout
from conductor.models import FileChange, SandboxMode, utc_now
from conductor.sandbox import for_step
from conductor.verification import all_passed, run_verification
from conductor.workspace.apply import ApplyPlan, plan_apply, write_changes
from conductor.workspace.checkout import index_file, materialize, reset


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
        succeeded = self.status == "succeeded"
        # Progress only orders forks that failed: every fork that succeeded verified all its steps.
        progress = (0, 0.0) if succeeded else (-self.steps_verified, -self.steps_verified / max(self.steps_total, 1))
        # fork ids are numbers as text: compare by length first so fork 10 follows fork 2
        return (not succeeded, not self.checks_passed, *progress, self.changed_lines, self.tokens,
                len(self.fork_id), self.fork_id)

    def to_dict(self) -> dict:
        return asdict(self)


def fork_changes(layout: ProjectLayout, base_commit: str, head_commit: str) -> list[FileChange]:
    """The changes of a fork's state (``head_commit``) against the project as the plan began."""
    store = state_store(layout)
    return store.changes(store.tree_of(base_commit), store.tree_of(head_commit))


def fork_checks(
    layout: ProjectLayout, plan_id: str, fork_id: str, head_commit: str, log: AuditLog, *, commands: list[str],
    timeout_seconds: float, sandbox_mode: SandboxMode = "auto", network: bool = False, env_names: Sequence[str] = (),
) -> bool:
    """Run the verification commands once on a clean checkout of the fork's final state (reusing a
    recorded run). The checkout holds exactly ``head_commit``: nothing an executor left behind. With no
    commands there is nothing to run and no checkout is made (it would cost a copy of the repository)."""
    for event in log.events():
        if event.type == "fork.verified":
            return bool(event.data.get("passed"))
    if not commands:
        log.append("fork.verified", {"fork_id": fork_id, "passed": True, "commit": head_commit, "verification": []})
        return True
    folder = layout.fork_scratch_dir(plan_id, fork_id) / "final"
    store = state_store(layout)
    if folder.is_dir() and index_file(folder).is_file():
        reset(store, folder, head_commit)
    else:
        materialize(store, head_commit, folder)
    sandbox = for_step(writable=(folder,), keys_dir=layout.keys_dir, environ=os.environ, mode=sandbox_mode,
                       network=network)
    evidence = run_verification(commands, folder, timeout_seconds=timeout_seconds, sandbox=sandbox, env_names=env_names,
                                temp_parent=folder.parent)
    passed = all_passed(evidence)
    log.append("fork.verified", {
        "fork_id": fork_id, "passed": passed, "commit": head_commit,
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
APPLY_INTENT_SCHEMA = "conductor.apply_intent/v2"


def apply_intent_file(layout: ProjectLayout, plan_id: str) -> Path:
    """``handoff/plan_<id>/apply.intent.json``: present only while a winner is being applied."""
    return layout.plan_dir(plan_id) / APPLY_INTENT


def apply_winner(
    layout: ProjectLayout, plan_id: str, fork_id: str, *, base_commit: str, winner_commit: str, ignore: list[str]
) -> list[FileChange]:
    """Merge the winner's final state into the project's working tree and write the result.

    Crash safety: before the first project file changes, an intent record (``apply.intent.json``:
    ``{schema: "conductor.apply_intent/v2", plan_id, fork_id, user_tree, result_tree, changes, created_at,
    checksum}``, the checksum as in docs/protocol.md section 3) is written durably; it is removed once
    every file is in place. A crash in between leaves a half-applied project *and* the intent, from which
    ``conductor.recovery`` finishes the apply (:func:`finish_apply`) on the next start.

    Returns:
        The changes applied (project now → merged result).

    Raises:
        MergeConflict: the project and the winner changed the same paths incompatibly, or a file changed
            while being applied; nothing was written (the intent is removed again).
        StorageError: a write failed; the intent stays, so recovery finishes the apply later.
    """
    store = state_store(layout)
    plan = plan_apply(store, base_commit=base_commit, winner_commit=winner_commit, ignore=ignore)
    intent = apply_intent_file(layout, plan_id)
    document = seal({"schema": APPLY_INTENT_SCHEMA, "plan_id": plan_id, "fork_id": fork_id,
                     "user_tree": plan.user_tree, "result_tree": plan.result_tree,
                     "changes": [c.to_document() for c in plan.changes], "created_at": utc_now()})
    atomic_write(intent, pretty_bytes(document))
    crash_point("apply.after_intent")
    try:
        with write_scope("apply"):
            write_changes(store, layout.root, plan)
    except MergeConflict:
        remove_durably(intent)  # the conflict check runs before any write: nothing to finish
        raise
    crash_point("apply.after_files")
    remove_durably(intent)
    return plan.changes


def finish_apply(layout: ProjectLayout, document: dict) -> None:
    """Finish an apply a crash interrupted, from its (checksum-verified) intent document.

    Raises:
        MergeConflict: a project file is neither as before the apply nor as merged.
    """
    plan = ApplyPlan(document["user_tree"], document["result_tree"],
                     [FileChange.model_validate(c) for c in document["changes"]])
    with write_scope("apply"):
        write_changes(state_store(layout), layout.root, plan)
