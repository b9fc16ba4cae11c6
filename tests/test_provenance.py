"""The in-toto Statement v1 / SLSA Provenance v1 of one step attempt."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from conductor import __version__
from conductor.canonical import canonical_bytes, compute_checksum, seal, sha256_hex
from conductor.errors import ChecksumMismatch, InvalidDocument
from conductor.models import CommandEvidence, Confidence, ExecutorInfo, FileChange, Task, Usage
from conductor.provenance import (
    BUILD_TYPE,
    PREDICATE_TYPE,
    STATEMENT_TYPE,
    build_statement,
    invocation_id,
    statement_bytes,
)

POLICY = "sha256:" + "ab" * 32


def _task(**overrides: object) -> Task:
    document = {
        "schema": "conductor.task/v1",
        "task_id": "step_002",
        "plan_id": "20260101-hello",
        "fork_id": "minimal",
        "attempt": 2,
        "instruction": "Create hello.py printing Hello, World!",
        "allowed_files": ["hello.py", "old.py", "README.md"],
        "workspace": ".conductor/scratch/plan_20260101-hello/fork_minimal/step_002.a2",
        "base_commit": "4b825dc642cb6eb9a060e54bf8d69288fbee4904",
        "timeout_seconds": 300,
        "max_diff_lines": 500,
        "policy_digest": POLICY,
        "confidence": Confidence(score=0.9, level="high").to_document(),
        "created_at": "2026-01-01T00:00:00.000000Z",
        **overrides,
    }
    # Seal the model's full dump (defaults included), as the engine publishes it.
    return Task.model_validate(seal(Task.model_validate(document).to_document()))


def _workspace(tmp_path: Path) -> tuple[Path, list[FileChange]]:
    workspace = tmp_path / "workspace"
    workspace.mkdir(parents=True)
    (workspace / "hello.py").write_text('print("Hello, World!")\n')
    (workspace / "README.md").write_text("# hello\n")
    changed = [
        FileChange(path=name, change=kind, sha256=sha256_hex((workspace / name).read_bytes()), lines_added=1)
        for name, kind in (("hello.py", "added"), ("README.md", "modified"))
    ]
    changed.append(FileChange(path="old.py", change="deleted", sha256=None, lines_removed=3))
    return workspace, changed


def _statement(tmp_path: Path, **overrides: object) -> tuple[dict, Path, Path]:
    workspace, changed = _workspace(tmp_path)
    result = tmp_path / "step_002.result.json"
    result.write_bytes(b'{"status":"completed"}\n')
    arguments = {
        "task": _task(),
        "result_digest_hex": hashlib.sha256(result.read_bytes()).hexdigest(),
        "result_name": result.name,
        "changed": changed,
        "executor": ExecutorInfo(id="llm:openai/gpt-4.1-mini", kind="llm", model="gpt-4.1-mini"),
        "started_at": "2026-01-01T00:00:01.000000Z",
        "finished_at": "2026-01-01T00:00:09.500000Z",
        **overrides,
    }
    return build_statement(**arguments), workspace, result


def test_statement_shape(tmp_path: Path) -> None:
    statement, _, _ = _statement(
        tmp_path,
        usage=Usage(input_tokens=120, output_tokens=30, cost_usd=0.001),
        verification=[
            CommandEvidence(command="pytest -q", exit_code=0, duration_seconds=1.5,
                            output_sha256="cd" * 32, output_tail="1 passed"),
        ],
    )
    assert set(statement) == {"_type", "subject", "predicateType", "predicate"}
    assert statement["_type"] == STATEMENT_TYPE and statement["predicateType"] == PREDICATE_TYPE
    build = statement["predicate"]["buildDefinition"]
    assert build["buildType"] == BUILD_TYPE
    assert build["externalParameters"] == {"task": _task().to_document()}
    assert build["internalParameters"]["task_checksum"] == _task().checksum
    assert build["internalParameters"]["policy_digest"] == POLICY
    assert build["internalParameters"]["executor"]["kind"] == "llm"
    assert build["resolvedDependencies"] == [{"name": "base", "digest": {"gitCommit": _task().base_commit}}]
    run = statement["predicate"]["runDetails"]
    assert run["builder"] == {"id": "llm:openai/gpt-4.1-mini", "version": {"conductor": __version__, "model": "gpt-4.1-mini"}}
    assert run["metadata"] == {
        "invocationId": "20260101-hello/minimal/step_002#2",
        "startedOn": "2026-01-01T00:00:01.000000Z",
        "finishedOn": "2026-01-01T00:00:09.500000Z",
    }
    evidence, usage = run["byproducts"]
    assert evidence["name"] == "verification/0" and evidence["digest"] == {"sha256": "cd" * 32}
    assert evidence["annotations"]["command"] == "pytest -q" and evidence["annotations"]["exit_code"] == 0
    assert usage["annotations"] == {"input_tokens": 120, "output_tokens": 30, "cost_usd": 0.001}
    assert usage["digest"]["sha256"] == sha256_hex(canonical_bytes(usage["annotations"]))


def test_subject_digests_match_the_files(tmp_path: Path) -> None:
    statement, workspace, result = _statement(tmp_path)
    subjects = {s["name"]: s["digest"]["sha256"] for s in statement["subject"]}
    assert subjects == {
        "README.md": hashlib.sha256((workspace / "README.md").read_bytes()).hexdigest(),
        "hello.py": hashlib.sha256((workspace / "hello.py").read_bytes()).hexdigest(),
        result.name: hashlib.sha256(result.read_bytes()).hexdigest(),
    }
    assert [s["name"] for s in statement["subject"]] == sorted(subjects)


def test_deleted_files_are_not_subjects(tmp_path: Path) -> None:
    statement, _, _ = _statement(tmp_path)
    assert "old.py" not in {s["name"] for s in statement["subject"]}


def test_explicit_policy_digest_and_no_byproducts(tmp_path: Path) -> None:
    other = "sha256:" + "ef" * 32
    statement, _, _ = _statement(tmp_path, policy_digest=other)
    assert statement["predicate"]["buildDefinition"]["internalParameters"]["policy_digest"] == other
    assert statement["predicate"]["runDetails"]["byproducts"] == []


def test_statement_bytes_are_canonical_and_stable(tmp_path: Path) -> None:
    statement, _, _ = _statement(tmp_path)
    data = statement_bytes(statement)
    assert data == canonical_bytes(json.loads(data))
    again, _, _ = _statement(tmp_path / "again")
    assert statement_bytes(again) == data


def test_unsealed_task_gets_its_checksum_computed(tmp_path: Path) -> None:
    task = _task().model_copy(update={"checksum": None})
    statement, _, _ = _statement(tmp_path, task=task)
    expected = compute_checksum(task.to_document())
    assert statement["predicate"]["buildDefinition"]["internalParameters"]["task_checksum"] == expected


def test_tampered_task_is_refused(tmp_path: Path) -> None:
    task = _task()
    task.instruction = "Delete everything"  # checksum no longer matches
    with pytest.raises(ChecksumMismatch):
        _statement(tmp_path, task=task)


def test_malformed_digest_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidDocument, match="step_002.result.json"):
        _statement(tmp_path, result_digest_hex="sha256:" + "0" * 64)


def test_invocation_id() -> None:
    assert invocation_id(_task(attempt=3)) == "20260101-hello/minimal/step_002#3"
