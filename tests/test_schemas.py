"""The JSON Schemas in docs/schemas: generated from the models, and true of the documents Conductor writes.

Documents are checked twice: by ``jsonschema`` (a dev dependency, the reference implementation of draft
2020-12) and by :func:`validate`, a small validator of the draft 2020-12 keywords the generated schemas use,
which refuses any other keyword, so a schema that grows a new one makes this test fail instead of silently
passing.
"""

from __future__ import annotations

import json
import re

import jsonschema
from pathlib import Path
from typing import Any

import pytest

from conductor import schemas
from conductor.audit import AuditLog
from conductor.canonical import compute_checksum, seal
from conductor.handoff.documents import sealed_bytes
from conductor.models import (
    CONTRACT_MODELS,
    Check,
    CommandEvidence,
    Confidence,
    ErrorInfo,
    ExecutorInfo,
    FileChange,
    ForkSpec,
    Lease,
    Plan,
    PlannerInfo,
    PolicyLayer,
    Result,
    StepSpec,
    Strategy,
    Task,
    Usage,
    Verdict,
)

NOW = "2026-11-22T10:00:00.000000Z"
DIGEST = "sha256:" + "ab" * 32
HEX = "cd" * 32

# --- a small draft 2020-12 validator ------------------------------------------------------------

_ANNOTATIONS = {"title", "description", "default", "$schema", "$id", "$defs", "examples"}
_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def validate(instance: Any, schema: dict[str, Any], root: dict[str, Any] | None = None, at: str = "$") -> list[str]:
    """Every way ``instance`` breaks ``schema`` (empty when it is valid)."""
    root = root if root is not None else schema
    errors: list[str] = []
    for keyword, value in schema.items():
        if keyword in _ANNOTATIONS:
            continue
        check = _KEYWORDS.get(keyword)
        if check is None:
            raise AssertionError(f"{at}: the test validator does not know the keyword {keyword!r}")
        errors += check(instance, value, schema, root, at)
    return errors


def _ref(instance, value, schema, root, at):  # type: ignore[no-untyped-def]
    assert value.startswith("#/$defs/"), value
    return validate(instance, root["$defs"][value[len("#/$defs/"):]], root, at)


def _type(instance, value, schema, root, at):  # type: ignore[no-untyped-def]
    names = value if isinstance(value, list) else [value]
    return [] if any(_TYPES[name](instance) for name in names) else [f"{at}: not of type {value}"]


def _properties(instance, value, schema, root, at):  # type: ignore[no-untyped-def]
    if not isinstance(instance, dict):
        return []
    errors = []
    for key, sub in value.items():
        if key in instance:
            errors += validate(instance[key], sub, root, f"{at}.{key}")
    return errors


def _required(instance, value, schema, root, at):  # type: ignore[no-untyped-def]
    if not isinstance(instance, dict):
        return []
    return [f"{at}: missing required key {key!r}" for key in value if key not in instance]


def _additional(instance, value, schema, root, at):  # type: ignore[no-untyped-def]
    if not isinstance(instance, dict):
        return []
    extra = [key for key in instance if key not in schema.get("properties", {})]
    if value is False:
        return [f"{at}: unknown key {key!r}" for key in extra]
    if value is True:
        return []
    return [error for key in extra for error in validate(instance[key], value, root, f"{at}.{key}")]


def _items(instance, value, schema, root, at):  # type: ignore[no-untyped-def]
    if not isinstance(instance, list):
        return []
    return [error for index, item in enumerate(instance) for error in validate(item, value, root, f"{at}[{index}]")]


def _any_of(instance, value, schema, root, at):  # type: ignore[no-untyped-def]
    if any(not validate(instance, option, root, at) for option in value):
        return []
    return [f"{at}: matches none of anyOf"]


def _compare(name, test):  # type: ignore[no-untyped-def]
    def check(instance, value, schema, root, at):  # type: ignore[no-untyped-def]
        if _TYPES["number"](instance) and not test(instance, value):
            return [f"{at}: {instance!r} breaks {name} {value!r}"]
        return []
    return check


def _length(name, kind, measure):  # type: ignore[no-untyped-def]
    def check(instance, value, schema, root, at):  # type: ignore[no-untyped-def]
        if isinstance(instance, kind) and measure(instance) < value:
            return [f"{at}: shorter than {name} {value}"]
        return []
    return check


_KEYWORDS = {
    "$ref": _ref,
    "type": _type,
    "properties": _properties,
    "required": _required,
    "additionalProperties": _additional,
    "items": _items,
    "anyOf": _any_of,
    "enum": lambda i, v, s, r, at: [] if i in v else [f"{at}: {i!r} not one of {v}"],
    "const": lambda i, v, s, r, at: [] if i == v else [f"{at}: {i!r} is not {v!r}"],
    "pattern": lambda i, v, s, r, at: [] if not isinstance(i, str) or re.search(v, i) else [f"{at}: {i!r} !~ {v}"],
    "minimum": _compare("minimum", lambda i, v: i >= v),
    "maximum": _compare("maximum", lambda i, v: i <= v),
    "exclusiveMinimum": _compare("exclusiveMinimum", lambda i, v: i > v),
    "minLength": _length("minLength", str, len),
    "minItems": _length("minItems", list, len),
}


def assert_valid(document: Any, name: str) -> None:
    schema = schemas.generate()[name]
    assert validate(document, schema) == []
    jsonschema.Draft202012Validator(schema).validate(document)


# --- drift ------------------------------------------------------------------------------------------


def test_schema_files_match_the_models() -> None:
    assert schemas.drift(schemas.SCHEMA_DIR) == [], "run `python -m conductor.schemas` to regenerate docs/schemas"


def test_one_schema_per_contract_model() -> None:
    generated = schemas.generate()
    assert set(generated) == set(CONTRACT_MODELS)
    for name, schema in generated.items():
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert schema["$id"] == f"https://conductor.dev/schemas/{name}.v1.json"
        assert schema["title"] and schema["description"]
        assert (schemas.SCHEMA_DIR / f"{name}.v1.json").is_file()


def test_files_are_sorted_indented_and_end_with_a_newline() -> None:
    data = (schemas.SCHEMA_DIR / "task.v1.json").read_bytes()
    assert data.endswith(b"}\n")
    assert data == (json.dumps(json.loads(data), indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def test_check_mode_names_drifted_missing_and_stray_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert schemas.main(["--dir", str(tmp_path)]) == 0
    assert schemas.main(["--check", "--dir", str(tmp_path)]) == 0
    (tmp_path / "task.v1.json").write_text("{}\n")
    (tmp_path / "lease.v1.json").unlink()
    (tmp_path / "old.v1.json").write_text("{}\n")
    capsys.readouterr()
    assert schemas.main(["--check", "--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "task.v1.json: differs from the models" in err
    assert "lease.v1.json: missing" in err
    assert "old.v1.json: not generated from any model" in err
    assert (tmp_path / "task.v1.json").read_text() == "{}\n"  # --check writes nothing


def test_reader_rules_require_schema_and_checksum() -> None:
    generated = schemas.generate()
    for name in schemas.CHECKSUMMED:
        assert "checksum" in generated[name]["required"]
        assert generated[name]["properties"]["checksum"]["type"] == "string"
    for name in ("plan", "task", "lease", "result", "verdict"):
        assert "schema" in generated[name]["required"]
    assert "hash" in generated["event"]["required"]


# --- real documents -----------------------------------------------------------------------------


def _task() -> Task:
    return Task(
        task_id="step_001", plan_id="20261122T100000-3fa2", fork_id="1", attempt=1, title="greet",
        instruction="Fix the greeting", allowed_files=["greet.py", "docs/"], protected_patterns=["*.lock"],
        constraints=["Always include tests"], workspace=".conductor/scratch/plan_20261122T100000-3fa2/fork_1/step_001.a1",
        base_commit="4b825dc642cb6eb9a060e54bf8d69288fbee4904", timeout_seconds=300, max_diff_lines=500, policy_digest=DIGEST,
        confidence=Confidence(score=0.89, level="high", reasons=["planner estimate 0.89"]), created_at=NOW,
    )


def _change() -> FileChange:
    return FileChange(path="greet.py", change="modified", sha256=HEX, lines_added=1, lines_removed=1)


def _sealed(model: Any) -> dict[str, Any]:
    sealed, data = sealed_bytes(model)
    document = json.loads(data)
    assert document == sealed
    assert document["checksum"] == compute_checksum(document)
    return document


def test_a_sealed_task_validates() -> None:
    assert_valid(_sealed(_task()), "task")


def test_a_sealed_lease_validates() -> None:
    lease = Lease(task_id="step_001", attempt=2, fencing_token=2, holder="conductor-worker@host:12", pid=12,
                  host="host", acquired_at=NOW, renewed_at=NOW, expires_at=NOW)
    assert_valid(_sealed(lease), "lease")


def test_sealed_results_validate_completed_and_failed() -> None:
    task = _sealed(_task())
    common = dict(task_id="step_001", plan_id=task["plan_id"], fork_id="1", attempt=1, fencing_token=1,
                  task_checksum=task["checksum"], executor=ExecutorInfo(id="mini@host:1", kind="mini"),
                  started_at=NOW, finished_at=NOW)
    completed = Result(status="completed", files_changed=[_change()], summary="fixed",
                       usage=Usage(input_tokens=10, output_tokens=5, cost_usd=0.001), **common)
    failed = Result(status="failed", error=ErrorInfo(kind="checksum_mismatch", message="tampered"), **common)
    assert_valid(_sealed(completed), "result")
    assert_valid(_sealed(failed), "result")


def test_a_sealed_verdict_validates() -> None:
    verdict = Verdict(
        task_id="step_001", plan_id="p1", fork_id="1", attempt=1, accepted=False,
        reasons=["other.py: outside allowed_files"],
        checks=[Check(name="within_allowed_files", passed=False, detail="other.py: outside allowed_files")],
        files_changed=[_change()], diff_lines=2,
        verification=[CommandEvidence(command="pytest -q", exit_code=None, duration_seconds=0.5, timed_out=True,
                                      output_sha256=HEX, output_tail="")],
        policy_digest=DIGEST, decided_at=NOW,
    )
    assert_valid(_sealed(verdict), "verdict")


def test_a_sealed_plan_validates() -> None:
    step = StepSpec(step_id="step_001", title="fix", instruction="Fix it", allowed_files=["greet.py"],
                    confidence_estimate=0.9, policy=PolicyLayer.model_validate({"behavior": {"max_diff_lines": 50}}))
    plan = Plan(plan_id="20261122T100000-3fa2", goal="Fix the greeting", created_at=NOW,
                planner=PlannerInfo(kind="file", source="plan.yaml"),
                forks=[ForkSpec(fork_id="1", strategy=Strategy(name="sed"), steps=[step])])
    assert_valid(_sealed(plan), "plan")


def test_audit_lines_validate(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log", clock=lambda: NOW)
    log.append("task.published", {"step_id": "step_001", "attempt": 1, "checksum": DIGEST})
    log.append("plan.resumed")
    for line in (tmp_path / "audit.log").read_text().splitlines():
        assert_valid(json.loads(line), "event")


def test_policy_layers_validate() -> None:
    assert_valid(PolicyLayer().to_document(), "policy")
    assert_valid({"global_constraints": ["x"], "file_rules": {"protected_patterns": ["*.lock"]},
                  "behavior": {"max_diff_lines": 10, "timeout_seconds": 60}}, "policy")
    assert_valid({}, "policy")  # every key of a policy file is optional


# --- the schemas reject what the reader rejects -------------------------------------------------


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d.update(extra=1), "unknown key 'extra'"),
    (lambda d: d.pop("checksum"), "missing required key 'checksum'"),
    (lambda d: d.pop("schema"), "missing required key 'schema'"),
    (lambda d: d.update(schema="conductor.task/v2"), "is not 'conductor.task/v1'"),
    (lambda d: d.update(task_id="task-1"), "!~"),
    (lambda d: d.update(attempt=0), "breaks minimum"),
    (lambda d: d.update(attempt=True), "not of type"),
    (lambda d: d.update(timeout_seconds=0), "breaks exclusiveMinimum"),
    (lambda d: d["confidence"].update(level="certain"), "not one of"),
    (lambda d: d.update(checksum=None), "not of type"),
])
def test_the_task_schema_rejects_broken_documents(mutate: Any, expected: str) -> None:
    document = _sealed(_task())
    mutate(document)
    errors = validate(document, schemas.generate()["task"])
    assert any(expected in error for error in errors), errors


def test_the_validator_refuses_unknown_keywords() -> None:
    with pytest.raises(AssertionError, match="oneOf"):
        validate(1, {"oneOf": []})


def test_a_document_sealed_by_hand_matches_the_model_seal() -> None:
    document = _task().to_document()
    document.pop("checksum")
    assert seal(document) == _sealed(_task())
