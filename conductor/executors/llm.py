"""The ``llm`` executor: send the task and the allowed files to a model, write the files it returns.

The model answers with structured output (``StepAnswer``). Every edit is checked before anything is
written: a path that is unsafe, outside ``allowed_files`` or protected fails the whole step, and no file
is touched.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import BaseModel, Field

from conductor.errors import BudgetExceeded, UnsafePath
from conductor.executors.base import Outcome, executor_info
from conductor.fsutil import atomic_write
from conductor.handoff.lease import EventSink, _no_events
from conductor.llm.base import LLMClient
from conductor.llm.ledger import call_scope
from conductor.models import ErrorInfo, Task
from conductor.paths import check_relpath, resolve_inside
from conductor.policy import matches_allowed

MAX_CONTEXT_BYTES = 256 * 1024  # allowed-file content sent to the model, in bytes

SYSTEM_PROMPT = (
    "You are a careful software engineer executing one step of a plan inside a code repository. "
    "Change only the files listed as allowed. Return the complete new content of every file you write. "
    "Explain what you did and why for a human reviewer."
)


class StepEdit(BaseModel):
    """One file the model writes or deletes."""

    path: str = Field(description="path relative to the repository root")
    action: Literal["write", "delete"]
    content: str = Field(description="the complete new file content; empty for delete")


class StepAnswer(BaseModel):
    """The model's structured answer to one step."""

    summary: str = Field(description="one line: what was done")
    explanation: str = Field(description="what was done and why, for a human reviewer (Markdown)")
    edits: list[StepEdit]


def _allowed_contents(task: Task, workspace: Path) -> dict[str, str]:
    contents: dict[str, str] = {}
    budget = MAX_CONTEXT_BYTES
    for path in sorted(p for p in workspace.rglob("*") if p.is_file() and not p.is_symlink()):
        relative = path.relative_to(workspace).as_posix()
        if relative.startswith(".git/") or not matches_allowed(relative, task.allowed_files):
            continue
        data = path.read_bytes()[:budget]
        budget -= len(data)
        contents[relative] = data.decode("utf-8", errors="replace")
        if budget <= 0:
            break
    return contents


def render_prompt(task: Task, contents: dict[str, str]) -> str:
    """The user prompt for one step: instruction, constraints, allowed files and their content."""
    lines = [f"# Step {task.task_id}: {task.title}".rstrip(": "), "", task.instruction, "", "## Allowed files"]
    lines += [f"- {entry}" for entry in task.allowed_files] or ["- (none)"]
    if task.constraints:
        lines += ["", "## Constraints"] + [f"- {c}" for c in task.constraints]
    if task.protected_patterns:
        lines += ["", "## Never touch files matching"] + [f"- {p}" for p in task.protected_patterns]
    lines += ["", "## Current content of the allowed files"]
    for path, text in contents.items():
        lines += [f"### {path}", "```", text, "```"]
    if not contents:
        lines.append("(none of the allowed files exist yet)")
    lines += render_evidence(task)
    return "\n".join(lines)


def render_evidence(task: Task) -> list[str]:
    """The prompt's section on earlier attempts of this step that were rejected (none on attempt 1).

    Attempts are numbered among the rejected ones only, and attempts whose lease expired are left out:
    neither the real attempt numbers nor a crash in between change the prompt, so a resumed or forked
    plan asks the same question and replays its recording.
    """
    rejected = [p for p in task.previous_attempts if p.outcome != "lease_expired"]
    if not rejected:
        return []
    lines = ["", "## Earlier attempts at this step were rejected",
             "Each started from the same files you see above; none of their changes were kept. "
             "Find out from this evidence what went wrong and do not repeat it."]
    for number, attempt in enumerate(rejected, start=1):
        lines += ["", f"### Rejected attempt {number} ({attempt.outcome})"]
        lines += [f"- {reason}" for reason in attempt.reasons]
        if attempt.summary:
            lines.append(f"Its summary: {attempt.summary}")
        if attempt.files:
            lines.append("Files it changed: " + ", ".join(attempt.files))
        if attempt.forbidden:
            lines.append("It changed files it may not touch; leave these alone: " + ", ".join(attempt.forbidden))
        if attempt.failed_command:
            lines += [f"Failing check: `{attempt.failed_command}`; the end of its output:", "```",
                      attempt.output_tail.rstrip("\n"), "```"]
        if attempt.diff:
            cut = " (cut short)" if attempt.diff_truncated else ""
            lines += [f"Its change{cut}:", "```diff", attempt.diff.rstrip("\n"), "```"]
    return lines


class LLMRunner:
    """Runs a task by asking an LLM for the files to write."""

    starts_processes = False  # it writes the files itself: nothing of its work outlives this process

    def __init__(self, client: LLMClient, *, on_event: EventSink = _no_events) -> None:
        self.client = client
        self.on_event = on_event
        settings = client.settings
        self.info = executor_info("llm", f"llm:{settings.provider}/{settings.model}", model=settings.model)

    def run(self, task: Task, workspace: Path, should_stop: Callable[[], bool]) -> Outcome:
        """Ask the model and write its files.

        Raises:
            BudgetExceeded: the call does not fit the LLM budget and was not made (``budget.exceeded`` is
                logged); ``execute_claim`` gives the task back instead of failing it.
        """
        try:
            # The ledger files the call (and checks the budget) under this step's plan, fork and attempt.
            with call_scope(plan_id=task.plan_id, fork_id=task.fork_id, step_id=task.task_id, attempt=task.attempt,
                            purpose="step"):
                reply = self.client.generate(
                    system=SYSTEM_PROMPT, prompt=render_prompt(task, _allowed_contents(task, workspace)),
                    schema=StepAnswer,
                )
        except BudgetExceeded as exc:
            self.on_event("budget.exceeded", {
                "step_id": task.task_id, "attempt": task.attempt, "purpose": "step", "scope": exc.scope,
                "unit": exc.unit, "limit": exc.limit, "used": exc.used, "needed": exc.needed, "message": str(exc)})
            raise
        self.on_event("llm.call", {
            "purpose": "step",
            "step_id": task.task_id,
            "attempt": task.attempt,
            "provider": self.client.settings.provider,
            "model": reply.model,
            "input_tokens": reply.usage.input_tokens,
            "output_tokens": reply.usage.output_tokens,
            "cost_usd": reply.usage.cost_usd,
            "duration_seconds": round(reply.duration_seconds, 6),
            # a replay (cached) repeats the recorded usage: totals of new spending skip it
            "cached": reply.cached,
            **({"recording": reply.recording} if reply.recording else {}),
        })
        answer: StepAnswer = reply.parsed
        refused = _refused_edits(task, answer.edits)
        if refused:
            message = "; ".join(refused)
            return Outcome("failed", "the model asked to change files it may not change", message,
                           ErrorInfo(kind="disallowed_edit", message=message), reply.usage, contained=True)
        for edit in answer.edits:
            target = _entry_path(workspace, edit.path)
            if edit.action == "delete":
                target.unlink(missing_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(target, edit.content.encode("utf-8"))
        written = "\n".join(f"- {e.action} `{e.path}`" for e in answer.edits) or "- (no files)"
        explanation = f"{answer.explanation.strip()}\n\n## Files\n{written}\n"
        # Written by this process alone, which starts no process: nothing else can write the folder now.
        return Outcome("completed", answer.summary, explanation, usage=reply.usage, contained=True)


def _entry_path(workspace: Path, path: str) -> Path:
    """The directory entry ``path`` names, with only its parent resolved: a write or delete acts on a
    symlink itself, never on what it points to."""
    relative = PurePosixPath(check_relpath(path))
    parent = workspace if str(relative.parent) == "." else resolve_inside(workspace, str(relative.parent))
    return parent / relative.name


def _refused_edits(task: Task, edits: list[StepEdit]) -> list[str]:
    from conductor.policy import matches_protected

    refused = []
    for edit in edits:
        try:
            path = check_relpath(edit.path)
        except UnsafePath as exc:
            refused.append(str(exc))
            continue
        if not matches_allowed(path, task.allowed_files):
            refused.append(f"{path}: not in allowed_files")
        elif matches_protected(path, task.protected_patterns):
            refused.append(f"{path}: matches a protected pattern")
    return refused
