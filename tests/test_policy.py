"""Policy: loading, tighten-only merge with sources and notes, and evaluation of changes."""

from __future__ import annotations

from pathlib import Path

import pytest

from conductor.canonical import digest
from conductor.errors import ConfigError, UnsafePath
from conductor.models import Behavior, FileChange, FileRules, PolicyLayer
from conductor.policy import (
    DEFAULT_MAX_DIFF_LINES,
    DEFAULT_TIMEOUT_SECONDS,
    MergedPolicy,
    evaluate_changes,
    load_policy,
    matches_allowed,
    matches_protected,
    merge_policies,
    validate_allowed_files,
)


def layer(
    constraints: list[str] | None = None,
    patterns: list[str] | None = None,
    max_diff_lines: int | None = None,
    timeout_seconds: int | None = None,
) -> PolicyLayer:
    return PolicyLayer(
        global_constraints=constraints or [],
        file_rules=FileRules(protected_patterns=patterns or []),
        behavior=Behavior(max_diff_lines=max_diff_lines, timeout_seconds=timeout_seconds),
    )


def change(path: str, added: int = 1, removed: int = 0, kind: str = "modified") -> FileChange:
    return FileChange(path=path, change=kind, lines_added=added, lines_removed=removed)  # type: ignore[arg-type]


PROJECT = layer(["Always include tests"], ["*.lock", ".conductor/"], max_diff_lines=500, timeout_seconds=300)


# --- load ---------------------------------------------------------------------------------------


def test_missing_policy_file_is_empty_layer(tmp_path: Path) -> None:
    assert load_policy(tmp_path / "policy.yaml") == PolicyLayer()


def test_load_policy_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        "global_constraints: ['Never modify files in /core']\n"
        "file_rules:\n  protected_patterns: ['*.lock', 'migrations/*']\n"
        "behavior:\n  max_diff_lines: 200\n",
        encoding="utf-8",
    )
    policy = load_policy(path)
    assert policy.file_rules.protected_patterns == ["*.lock", "migrations/*"]
    assert policy.behavior.max_diff_lines == 200
    assert policy.behavior.timeout_seconds is None


def test_load_policy_error_names_file_key_and_line(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("behavior:\n  max_diff_lines: 500\n  timeout: 30\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"policy\.yaml:3: behavior\.timeout: unknown key \(known: max_diff_lines"):
        load_policy(path)


def test_load_policy_rejects_invalid_pattern(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("file_rules:\n  protected_patterns:\n    - ok\n    - '\\'\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"policy\.yaml:4: file_rules\.protected_patterns\[1\]: invalid gitignore"):
        load_policy(path)


# --- merge --------------------------------------------------------------------------------------


def test_no_layers_gives_defaults() -> None:
    merged = merge_policies([])
    assert merged.effective.max_diff_lines == DEFAULT_MAX_DIFF_LINES == 500
    assert merged.effective.timeout_seconds == DEFAULT_TIMEOUT_SECONDS == 300
    assert merged.sources == {"max_diff_lines": "default", "timeout_seconds": "default", "max_diff_bytes": "default",
                              "max_attempts": "default", "sandbox.mode": "default", "sandbox.network": "default"}
    assert (merged.effective.sandbox_mode, merged.effective.network) == ("auto", False)
    assert merged.notes == []


def test_unset_numbers_fall_back_to_defaults() -> None:
    merged = merge_policies([("project", layer(max_diff_lines=100))])
    assert merged.effective.max_diff_lines == 100
    assert merged.effective.timeout_seconds == 300
    assert merged.sources["max_diff_lines"] == "project"
    assert merged.sources["timeout_seconds"] == "default"


def test_plan_cannot_loosen_max_diff_lines() -> None:
    merged = merge_policies([("project", PROJECT), ("plan", layer(max_diff_lines=900))])
    assert merged.effective.max_diff_lines == 500
    assert merged.sources["max_diff_lines"] == "project"
    assert merged.notes == ["plan asked behavior.max_diff_lines=900, looser than 500 from project: ignored"]


def test_plan_cannot_loosen_the_default_when_project_is_silent() -> None:
    merged = merge_policies([("project", PolicyLayer()), ("plan", layer(timeout_seconds=3600))])
    assert merged.effective.timeout_seconds == 300
    assert merged.sources["timeout_seconds"] == "default"
    assert merged.notes == ["plan asked behavior.timeout_seconds=3600, looser than 300 from default: ignored"]


def test_project_may_set_looser_than_default() -> None:
    merged = merge_policies([("project", layer(max_diff_lines=2000))])
    assert merged.effective.max_diff_lines == 2000
    assert merged.sources["max_diff_lines"] == "project"


def test_step_tightens_further_and_sources_name_layers() -> None:
    plan = layer(["Keep the public API"], ["migrations/*", "*.lock"], max_diff_lines=300, timeout_seconds=600)
    step = layer(["Always include tests", "No new dependencies"], ["docs/"], max_diff_lines=50)
    merged = merge_policies([("project", PROJECT), ("plan", plan), ("step", step)])
    effective = merged.effective
    assert effective.max_diff_lines == 50
    assert effective.timeout_seconds == 300
    assert effective.global_constraints == ["Always include tests", "Keep the public API", "No new dependencies"]
    assert effective.protected_patterns == ["*.lock", ".conductor/", "migrations/*", "docs/"]
    assert merged.sources == {
        "global_constraints[0]": "project",
        "global_constraints[1]": "plan",
        "global_constraints[2]": "step",
        "protected_patterns[0]": "project",
        "protected_patterns[1]": "project",
        "protected_patterns[2]": "plan",
        "protected_patterns[3]": "step",
        "max_diff_lines": "step",
        "timeout_seconds": "project",
        "max_diff_bytes": "default",
        "max_attempts": "default",
        "sandbox.mode": "default",
        "sandbox.network": "default",
    }
    assert merged.notes == ["plan asked behavior.timeout_seconds=600, looser than 300 from project: ignored"]


def test_equal_value_keeps_the_earlier_source() -> None:
    merged = merge_policies([("project", PROJECT), ("plan", layer(max_diff_lines=500))])
    assert merged.sources["max_diff_lines"] == "project"
    assert merged.notes == []


def test_plan_cannot_remove_a_protected_pattern() -> None:
    # A plan without the pattern, and one that tries to negate it, both leave it protected.
    plan = layer(patterns=["!*.lock", "!poetry.lock"])
    merged = merge_policies([("project", PROJECT), ("plan", plan), ("step", PolicyLayer())])
    assert merged.effective.protected_patterns == ["*.lock", ".conductor/"]
    assert merged.notes == [
        "plan asked protected pattern '!*.lock', which would unprotect files: ignored",
        "plan asked protected pattern '!poetry.lock', which would unprotect files: ignored",
    ]
    decision = evaluate_changes(merged, ["poetry.lock"], [change("poetry.lock")])
    assert not decision.allowed


def test_project_negation_is_honoured() -> None:
    merged = merge_policies([("project", layer(patterns=["*.lock", "!docs/*.lock"]))])
    assert evaluate_changes(merged, ["docs/x.lock"], [change("docs/x.lock")]).allowed
    assert not evaluate_changes(merged, ["x.lock"], [change("x.lock")]).allowed


def test_comment_patterns_are_noted_not_added() -> None:
    merged = merge_policies([("project", layer(patterns=["#secret", "  "]))])
    assert merged.effective.protected_patterns == []
    assert len(merged.notes) == 2


def test_invalid_plan_pattern_names_the_layer() -> None:
    with pytest.raises(ConfigError, match="plan policy: file_rules.protected_patterns: invalid gitignore pattern"):
        merge_policies([("project", PROJECT), ("plan", layer(patterns=["\\"]))])


def test_digest_is_over_effective_policy() -> None:
    merged = merge_policies([("project", PROJECT)])
    assert merged.digest == digest(merged.effective.to_document())
    assert merged.digest.startswith("sha256:")
    tighter = merge_policies([("project", PROJECT), ("step", layer(max_diff_lines=10))])
    assert tighter.digest != merged.digest


def test_merged_policy_is_frozen() -> None:
    merged = merge_policies([])
    with pytest.raises(AttributeError):
        merged.notes = []  # type: ignore[misc]
    assert isinstance(merged, MergedPolicy)


# --- allowed files ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "allowed", "expected"),
    [
        ("hello.py", ["hello.py"], True),
        ("sub/hello.py", ["hello.py"], False),  # anchored: a plain path is exactly that file
        ("hello.pyc", ["hello.py"], False),
        ("docs/a/b.md", ["docs/"], True),
        ("docs", ["docs/"], False),
        ("docsx/a.md", ["docs/"], False),
        ("src/a.py", ["src/**/*.py"], True),
        ("src/x/y/a.py", ["src/**/*.py"], True),
        ("src/a.txt", ["src/**/*.py"], False),
        ("lib/src/a.py", ["src/**/*.py"], False),
        ("a.py", ["*.py"], True),
        ("deep/a.py", ["*.py"], False),  # anchored: '*' does not cross '/'
        ("#notes.md", ["#notes.md"], True),  # anchoring makes '#' literal, not a comment
        ("!bang", ["!bang"], True),
        ("../hello.py", ["hello.py"], False),
        ("x.py", [], False),
    ],
)
def test_matches_allowed(path: str, allowed: list[str], expected: bool) -> None:
    assert matches_allowed(path, allowed) is expected


def test_validate_allowed_files_normalises_and_rejects() -> None:
    assert validate_allowed_files(["./a.py", "docs/", "a.py", "src//b.py"]) == ["a.py", "docs/", "src/b.py"]
    for bad in ["", "/etc/passwd", "../x", ".git/config", "a\\b", "a\0b", "x.py "]:
        with pytest.raises(UnsafePath):
            validate_allowed_files(["ok.py", bad])


@pytest.mark.parametrize("entry", ["a.py ", " a.py", "src/ a.py", "src /a.py", "docs/ ", "a.py\u00a0", "\u3000a.py",
                                   "a.py\u2003"])
def test_allowed_files_entry_with_whitespace_at_either_end_of_a_part_is_refused(entry: str) -> None:
    """Attack: ``"a.py "`` loads, but gitignore drops the trailing space, so the step could never change
    ``a.py`` (and a leading space names a different file): refused, naming the entry."""
    with pytest.raises(UnsafePath) as info:
        validate_allowed_files(["ok.py", entry])
    assert str(info.value) == (f"unsafe path {entry!r}: starts or ends a part with whitespace, which an "
                               "allowed_files entry may not (a stray space would never match the file meant)")
    decision = evaluate_changes(project_only(), [entry], [change("a.py")])
    assert not decision.allowed and decision.reasons[0] == f"allowed_files: {info.value}"


def test_inner_spaces_in_an_allowed_file_name_are_fine() -> None:
    assert validate_allowed_files(["my notes.md", "a b/c d.txt"]) == ["my notes.md", "a b/c d.txt"]
    assert matches_allowed("a b/c d.txt", ["a b/"])


# --- bounds -------------------------------------------------------------------------------------


def test_policy_limits_load_at_their_upper_bounds_and_not_past_them(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("behavior:\n  max_diff_lines: 1000000\n  timeout_seconds: 86400\n")
    assert load_policy(path).behavior == Behavior(max_diff_lines=1_000_000, timeout_seconds=86_400)
    for key, past in (("max_diff_lines", 1_000_001), ("timeout_seconds", 86_401)):
        path.write_text(f"behavior:\n  {key}: {past}\n")
        with pytest.raises(ConfigError, match=rf":2: behavior\.{key}: Input should be less than or equal to"):
            load_policy(path)


# --- evaluate -----------------------------------------------------------------------------------


def project_only() -> MergedPolicy:
    return merge_policies([("project", PROJECT)])


def check_map(decision) -> dict[str, bool]:  # type: ignore[no-untyped-def]
    return {check.name: check.passed for check in decision.checks}


def test_allowed_change_passes_every_check() -> None:
    decision = evaluate_changes(project_only(), ["hello.py"], [change("hello.py", 10, 2, "added")])
    assert decision.allowed
    assert decision.reasons == []
    assert check_map(decision) == {
        "paths_safe": True,
        "within_allowed_files": True,
        "outside_protected_patterns": True,
        "diff_size": True,
    }


def test_empty_change_list_is_allowed() -> None:
    decision = evaluate_changes(project_only(), [], [])
    assert decision.allowed
    assert all(check.passed for check in decision.checks)


def test_change_outside_allowed_files() -> None:
    decision = evaluate_changes(project_only(), ["hello.py"], [change("hello.py"), change("other.py")])
    assert not decision.allowed
    assert decision.reasons == ["other.py: outside allowed_files"]
    assert check_map(decision)["within_allowed_files"] is False


def test_protected_match_names_pattern_and_layer() -> None:
    merged = merge_policies([("project", PROJECT), ("step", layer(patterns=["config/"]))])
    changes = [change("config/settings.lock"), change("config/app.ini")]
    decision = evaluate_changes(merged, ["config/"], changes)
    assert decision.reasons == [
        "config/settings.lock: matches protected pattern '*.lock' (project)",
        "config/app.ini: matches protected pattern 'config/' (step)",
    ]
    assert check_map(decision)["outside_protected_patterns"] is False
    assert check_map(decision)["within_allowed_files"] is True


def test_protected_match_is_case_insensitive() -> None:
    decision = evaluate_changes(project_only(), ["POETRY.LOCK"], [change("POETRY.LOCK")])
    assert decision.reasons == ["POETRY.LOCK: matches protected pattern '*.lock' (project)"]


def test_deleting_a_protected_file_is_a_violation() -> None:
    decision = evaluate_changes(project_only(), ["a.lock"], [change("a.lock", 0, 3, "deleted")])
    assert not decision.allowed


def test_diff_too_large() -> None:
    merged = merge_policies([("project", PROJECT), ("step", layer(max_diff_lines=20))])
    decision = evaluate_changes(merged, ["a.py", "b.py"], [change("a.py", 10, 5), change("b.py", 4, 2)])
    assert decision.reasons == ["diff of 21 lines (added + removed) exceeds max_diff_lines 20 (step)"]
    assert check_map(decision) == {
        "paths_safe": True,
        "within_allowed_files": True,
        "outside_protected_patterns": True,
        "diff_size": False,
    }
    exact = evaluate_changes(merged, ["a.py"], [change("a.py", 15, 5)])
    assert exact.allowed  # 20 lines is at the limit, not over it


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        (".git/hooks/pre-commit", ".git component"),
        (".GIT/config", ".git component"),
        ("../x", "'..' component"),
        ("/etc/passwd", "is absolute"),
        ("cafe\u0301.py", "NFC"),
        ("a\0b", "NUL"),
    ],
)
def test_unsafe_change_is_a_violation_not_an_exception(path: str, reason: str) -> None:
    # Even an allowed_files entry that would match as a pattern does not rescue an unsafe path.
    decision = evaluate_changes(project_only(), ["**"], [change(path), change("fine.py")])
    assert not decision.allowed
    assert len(decision.reasons) == 1
    assert reason in decision.reasons[0]
    assert repr(path) in decision.reasons[0]
    assert check_map(decision)["paths_safe"] is False
    assert check_map(decision)["within_allowed_files"] is True  # unsafe paths are not pattern-matched


def test_unsafe_allowed_entry_is_a_violation() -> None:
    decision = evaluate_changes(project_only(), ["../x", "a.py"], [change("a.py")])
    assert not decision.allowed
    assert decision.reasons[0].startswith("allowed_files: unsafe path '../x'")


def test_several_violations_are_all_reported() -> None:
    merged = merge_policies([("project", PROJECT), ("step", layer(max_diff_lines=1))])
    changes = [change("x.lock", 5), change(".git/HEAD"), change("stray.txt")]
    decision = evaluate_changes(merged, ["x.lock"], changes)
    assert len(decision.reasons) == 4
    assert not any(check.passed for check in decision.checks)


def test_matches_protected() -> None:
    patterns = ["*.lock", "migrations/*", "!migrations/README"]
    assert matches_protected("deep/poetry.lock", patterns)
    assert matches_protected("Poetry.LOCK", patterns)
    assert matches_protected("migrations/001.sql", patterns)
    assert not matches_protected("migrations/README", patterns)
    assert not matches_protected("src/app.py", patterns)
    assert matches_protected(".git/config", [])  # unsafe: never writable


def test_sandbox_settings_only_tighten_after_the_project() -> None:
    project = PolicyLayer.model_validate({"sandbox": {"mode": "off", "network": True}})
    plan = PolicyLayer.model_validate({"sandbox": {"mode": "required"}})
    step = PolicyLayer.model_validate({"sandbox": {"mode": "off", "network": False}})
    merged = merge_policies([("project", project), ("plan", plan), ("step", step)])
    assert (merged.effective.sandbox_mode, merged.effective.network) == ("required", False)
    assert merged.sources["sandbox.mode"] == "plan" and merged.sources["sandbox.network"] == "step"
    assert merged.notes == ["step asked sandbox.mode=off, looser than required from plan: ignored"]
    # A plan (which an LLM may write) cannot switch the sandbox off or the network on by itself.
    loose = merge_policies([("project", PolicyLayer()),
                            ("plan", PolicyLayer.model_validate({"sandbox": {"mode": "off", "network": True}}))])
    assert (loose.effective.sandbox_mode, loose.effective.network) == ("auto", False)
    assert len(loose.notes) == 2
