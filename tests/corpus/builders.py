"""Builders shared by the bad-input corpus: tamper with a published file, complete a task by hand, verify it.

Everything here drives the real code paths (``publish_task``, ``claim_task``, ``complete_task``,
``verify_step``); the helpers only prepare inputs and check that nothing else was lost.
"""

from __future__ import annotations

from conductor.audit import AuditLog

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conductor.canonical import pretty_bytes, seal
from conductor.handoff.complete import complete_task
from conductor.handoff.lease import Claim, claim_task
from conductor.llm.base import LLMReply, LLMSettings
from conductor.models import ExecutorInfo, FileChange, PolicyLayer, Result, Task, Usage, Verdict, utc_now
from conductor.policy import MergedPolicy, merge_policies
from conductor.verifier import VerifySettings, verify_step
from tests.handoff.support import Handoff

HOLDER = "corpus@here:1"
Document = dict[str, Any]


# --- editing JSON files ---------------------------------------------------------------------------


def load(path: Path) -> Document:
    """The file's JSON object (a lenient read: the corpus edits files, Conductor then reads them strictly)."""
    return json.loads(path.read_bytes())


def rewrite(path: Path, edit: Callable[[Document], None], *, reseal: bool) -> None:
    """Apply ``edit`` to the JSON object in ``path``; with ``reseal`` the checksum is recomputed, so only the
    edit itself is wrong."""
    document = load(path)
    edit(document)
    if reseal:
        document = seal(document)
    path.write_bytes(pretty_bytes(document))


def resealed(edit: Callable[[Document], None]) -> Callable[[Path], None]:
    return lambda path: rewrite(path, edit, reseal=True)


def unsealed(edit: Callable[[Document], None]) -> Callable[[Path], None]:
    return lambda path: rewrite(path, edit, reseal=False)


def setting(key: str, value: Any) -> Callable[[Document], None]:
    """An edit setting ``key`` (dotted for nested objects) to ``value``."""
    *parents, last = key.split(".")

    def edit(document: Document) -> None:
        target = document
        for part in parents:
            target = target[part]
        target[last] = value

    return edit


def removing(key: str) -> Callable[[Document], None]:
    return lambda document: document.pop(key)


def text_edit(old: str, new: str) -> Callable[[Path], None]:
    """Replace the first ``old`` in the file's text (for inputs no JSON library writes)."""

    def tamper(path: Path) -> None:
        text = path.read_text("utf-8")
        assert old in text, f"{old!r} not in {path}"
        path.write_text(text.replace(old, new, 1), "utf-8")

    return tamper


def raw(data: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data)


# --- handoff checks -------------------------------------------------------------------------------


def claim(handoff: Handoff, task_id: str = "step_001") -> Claim | None:
    return claim_task(handoff.fork, task_id, holder=HOLDER, lease_seconds=60)


def assert_others_untouched(handoff: Handoff, bad: str = "step_001") -> None:
    """Every other published task is still pending, intact and claimable: nothing was lost."""
    others = [task_id for task_id in handoff.step_ids if task_id != bad]
    assert handoff.where()["pending"] == others
    for task_id in others:
        taken = claim(handoff, task_id)
        assert taken is not None, f"{task_id} could not be claimed after {bad} was rejected"
        assert taken.task.task_id == task_id and taken.task.checksum


# --- completing and verifying a task by hand ------------------------------------------------------


def hand_result(claimed: Claim, files: list[FileChange] | None = None, **overrides: Any) -> Result:
    """The result an external (handoff) executor writes for ``claimed``; ``files`` is what it reports."""
    now = utc_now()
    fields: dict[str, Any] = {
        "task_id": claimed.task.task_id, "plan_id": claimed.task.plan_id, "fork_id": claimed.task.fork_id,
        "attempt": claimed.task.attempt, "fencing_token": claimed.lease.fencing_token,
        "task_checksum": claimed.task.checksum, "status": "completed",
        "executor": ExecutorInfo(id="ide-agent", kind="handoff"), "files_changed": files or [],
        "summary": "done by hand", "started_at": now, "finished_at": now,
    }
    fields.update(overrides)
    return Result(**fields)


def reported(*paths: str) -> list[FileChange]:
    """What an executor claims it changed (content digests do not matter to the comparison)."""
    return [FileChange(path=path, change="modified", sha256="0" * 64) for path in paths]


def workspace(handoff: Handoff, claimed: Claim) -> Path:
    return handoff.root / claimed.task.workspace


def policy(**behavior: Any) -> MergedPolicy:
    layer = PolicyLayer.model_validate({"behavior": behavior}) if behavior else PolicyLayer()
    return merge_policies([("project", layer)])


def policy_protecting(*patterns: str) -> MergedPolicy:
    return merge_policies([("project", PolicyLayer.model_validate({"file_rules": {"protected_patterns": list(patterns)}}))])


def verify(
    handoff: Handoff,
    claimed: Claim,
    *,
    merged: MergedPolicy | None = None,
    level: str = "high",
    ignore: list[str] | None = None,
    commands: tuple[str, ...] = (),
) -> Verdict:
    """Conductor's check of the completed task, as the engine runs it (an accepted step moves the fork's
    state: its ``step.merged`` event is logged, as the engine logs it); ``commands`` are the verification
    commands."""
    verdict = verify_step(
        handoff.layout, handoff.fork, claimed.task.task_id,
        published_checksum=claimed.task.checksum, published_attempt=claimed.task.attempt,
        policy=merged or policy(), confidence_level=level,
        settings=VerifySettings(commands=list(commands), timeout_seconds=30, ignore=ignore or []),
        head_commit=handoff.head,
    )
    if verdict.accepted:
        AuditLog(handoff.fork.audit_log).append("step.merged", {
            "step_id": verdict.task_id, "attempt": verdict.attempt, "commit": verdict.commit,
            "files": [c.path for c in verdict.files_changed]})
    return verdict


def do_and_complete(
    handoff: Handoff,
    work: Callable[[Path], None],
    *,
    step: str = "step_001",
    files: list[FileChange] | None = None,
    publish: Mapping[str, Any] | None = None,
    result: Mapping[str, Any] | None = None,
) -> Claim:
    """Publish and claim ``step``, let ``work`` change its workspace, and commit a hand-written result.

    Args:
        files: what the result reports as changed.
        publish: task fields to override when publishing.
        result: result fields to override (to make the result lie about its identity).
    """
    handoff.publish(step, **dict(publish or {}))
    claimed = claim(handoff, step)
    assert claimed is not None
    work(workspace(handoff, claimed))
    complete_task(claimed, hand_result(claimed, files, **dict(result or {})), explanation="by hand")
    return claimed


def nothing(_: Path) -> None:
    return None


# --- an LLM that answers with fixed edits ---------------------------------------------------------


@dataclass
class FixedEdits:
    """An ``LLMClient`` whose answer is the given edits (the wire formats are tested in tests/llm)."""

    edits: list[dict[str, str]]
    settings: LLMSettings = LLMSettings("openai", "fixed")

    def generate(self, *, system: str, prompt: str, schema: type) -> LLMReply:
        answer = {"summary": "s", "explanation": "e", "edits": self.edits}
        return LLMReply(parsed=schema.model_validate(answer), usage=Usage(), model="fixed", raw_text="{}",
                        duration_seconds=0.0)


def write_edit(path: str, content: str = "x\n") -> dict[str, str]:
    return {"path": path, "action": "write", "content": content}


def bare_task(allowed: list[str], protected: list[str] | None = None) -> Task:
    """A valid task for the LLM runner (which needs only its fields, not a handoff folder)."""
    from conductor.models import Confidence

    return Task(task_id="step_001", plan_id="p1", fork_id="1", attempt=1, instruction="do it",
                allowed_files=allowed, protected_patterns=protected or [], workspace="ws", timeout_seconds=5,
                max_diff_lines=100, policy_digest="sha256:" + "0" * 64, base_commit="0" * 40,
                confidence=Confidence(score=0.9, level="high"), created_at="2026-11-22T00:00:00Z")


# --- running a snippet in a child interpreter -----------------------------------------------------


def run_python(code: str, *, timeout: float, cwd: Path) -> subprocess.CompletedProcess[str] | None:
    """Run ``code`` in a fresh interpreter; None if it was still running after ``timeout`` seconds (a hang)."""
    try:
        return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                              timeout=timeout, cwd=cwd)
    except subprocess.TimeoutExpired:
        return None
