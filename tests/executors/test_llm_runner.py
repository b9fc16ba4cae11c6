"""The llm executor's own guards, with a stub client standing in for the provider (the wire formats are
tested against the scripted server in tests/llm and tests/e2e)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from conductor.executors.llm import LLMRunner, StepAnswer, render_prompt
from conductor.llm.base import LLMReply, LLMSettings
from conductor.models import Confidence, Task, Usage


@dataclass
class FixedAnswer:
    answer: dict
    settings: LLMSettings = LLMSettings("openai", "fixed")

    def generate(self, *, system: str, prompt: str, schema: type) -> LLMReply:
        self.prompt = prompt
        return LLMReply(parsed=schema.model_validate(self.answer), usage=Usage(input_tokens=3, output_tokens=2),
                        model="fixed", raw_text="{}", duration_seconds=0.01)


def task(allowed: list[str], protected: list[str] = ()) -> Task:  # type: ignore[assignment]
    return Task(task_id="step_001", plan_id="p1", fork_id="1", attempt=1, instruction="do it",
                allowed_files=allowed, protected_patterns=list(protected), workspace="ws", timeout_seconds=5,
                max_diff_lines=100, policy_digest="sha256:" + "0" * 64, base_commit="0" * 40,
                confidence=Confidence(score=0.9, level="high"), created_at="2026-11-22T00:00:00Z")


def answer(*edits: dict) -> dict:
    return {"summary": "s", "explanation": "e", "edits": list(edits)}


def test_writes_allowed_files_and_reports_usage(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("old\n")
    client = FixedAnswer(answer({"path": "a.py", "action": "write", "content": "new\n"},
                                {"path": "pkg/b.py", "action": "write", "content": "b\n"}))
    outcome = LLMRunner(client).run(task(["a.py", "pkg/"]), tmp_path, lambda: False)
    assert outcome.status == "completed" and outcome.usage.input_tokens == 3
    assert (tmp_path / "a.py").read_text() == "new\n" and (tmp_path / "pkg" / "b.py").read_text() == "b\n"
    assert "old" in client.prompt  # the current content of allowed files is sent


@pytest.mark.parametrize("path, reason", [
    ("other.py", "not in allowed_files"),
    ("../escape.py", ".."),
    ("/etc/passwd", "absolute"),
    (".git/hooks/pre-commit", ".git"),
    ("deps.lock", "protected"),
])
def test_any_refused_edit_fails_the_step_and_writes_nothing(tmp_path: Path, path: str, reason: str) -> None:
    client = FixedAnswer(answer({"path": "a.py", "action": "write", "content": "new\n"},
                                {"path": path, "action": "write", "content": "x"}))
    outcome = LLMRunner(client).run(task(["a.py", "deps.lock"], ["*.lock"]), tmp_path,
                                    lambda: False)
    assert outcome.status == "failed" and outcome.error is not None
    assert outcome.error.kind == "disallowed_edit" and reason in outcome.error.message
    assert not (tmp_path / "a.py").exists()


def test_deleting_a_symlink_removes_the_link_not_its_target(tmp_path: Path) -> None:
    (tmp_path / "target.txt").write_text("keep me\n")
    (tmp_path / "link.txt").symlink_to("target.txt")
    client = FixedAnswer(answer({"path": "link.txt", "action": "delete", "content": ""}))
    outcome = LLMRunner(client).run(task(["link.txt"]), tmp_path, lambda: False)
    assert outcome.status == "completed"
    assert not (tmp_path / "link.txt").is_symlink() and (tmp_path / "target.txt").read_text() == "keep me\n"


def test_prompt_lists_constraints_and_protected_patterns() -> None:
    t = task(["a.py"], ["*.lock"]).model_copy(update={"constraints": ["Always add tests"]})
    prompt = render_prompt(t, {"a.py": "print(1)\n"})
    assert "Always add tests" in prompt and "*.lock" in prompt and "print(1)" in prompt
    assert StepAnswer.model_json_schema()["required"] == ["summary", "explanation", "edits"]
