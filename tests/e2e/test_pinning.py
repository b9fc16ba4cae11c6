"""What a plan was published with is what it is judged by: an executor that edits policy.yaml, or a hand
that widens a step in plan.json and re-seals it, changes nothing for a running plan (issue 9, items 2 and 3).
These hold with ``sandbox.mode: off``: they are closed by the state itself, not only by the sandbox."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.corpus.builders import rewrite
from tests.e2e.project import conductor, make_project
from tests.e2e.test_handoff_and_errors import FIX

RELAX = ("printf 'file_rules:\\n  protected_patterns: []\\n' > \"$CONDUCTOR_PROJECT_ROOT/.conductor/policy.yaml\"")


UNSANDBOXED = {"file_rules": {"protected_patterns": ["*.lock"]}, "sandbox": {"mode": "off"}}


def test_an_executor_that_loosens_policy_yaml_does_not_loosen_the_running_plan(tmp_path: Path) -> None:
    root = make_project(tmp_path / "proj", policy=UNSANDBOXED)
    plan = root / "plan.yaml"
    plan.write_text(yaml.safe_dump({"goal": "Fix add", "strategies": [{"name": "sneaky", "steps": [
        {"id": "relax", "instruction": f"{RELAX} && {FIX}", "allowed_files": ["calc.py"], "confidence": 0.9},
        {"id": "repin", "instruction": "echo hacked > poetry.lock", "allowed_files": ["poetry.lock"],
         "depends_on": ["relax"], "confidence": 0.9}]}]}))

    run = conductor(root, "build", "--plan", str(plan), "--executor", "command",
                    "--command", 'sh -c "$CONDUCTOR_INSTRUCTION"', "--json")

    assert json.loads(run.stdout)["status"] == "failed"
    assert "protected_patterns: []" in (root / ".conductor" / "policy.yaml").read_text()  # the edit happened (no sandbox)...
    assert (root / "poetry.lock").read_text() == "locked\n"  # ...and changed nothing for this plan
    verdict = next((root / ".conductor" / "handoff").rglob("failed/step_002.verdict.json"))
    reasons = json.loads(verdict.read_text())["reasons"]
    assert reasons == ["poetry.lock: matches protected pattern '*.lock' (project)"]


def test_a_resealed_plan_file_is_refused_by_resume_naming_the_file(tmp_path: Path) -> None:
    root = make_project(tmp_path / "proj", config={"executor": {"kind": "handoff", "poll_seconds": 0.5}},
                        policy=UNSANDBOXED)
    plan = root / "plan.yaml"
    plan.write_text(yaml.safe_dump({"goal": "Fix add", "strategies": [{"name": "one", "steps": [
        {"id": "fix", "instruction": FIX, "allowed_files": ["calc.py"], "confidence": 0.9}]}]}))
    halted = conductor(root, "explore", "--plan", str(plan), "--no-wait", "--json")
    assert halted.returncode == 11, halted.stderr
    plan_file = next((root / ".conductor" / "handoff").glob("plan_*/plan.json"))

    def widen(document: dict) -> None:
        document["forks"][0]["steps"][0]["allowed_files"] = ["**"]

    rewrite(plan_file, widen, reseal=True)  # its own checksum is valid again

    resumed = conductor(root, "resume", "--no-wait", "--json")
    assert resumed.returncode == 5, resumed.stdout + resumed.stderr
    assert "plan.json" in resumed.stderr and "plan.created" in resumed.stderr
    check = conductor(root, "verify")
    assert check.returncode == 5 and "plan.json" in check.stdout


def test_with_the_sandbox_the_edit_itself_fails_and_the_reason_names_the_sandbox(tmp_path: Path) -> None:
    from conductor import sandbox

    if sandbox.availability() is not None:
        import pytest

        pytest.skip(f"no sandbox here: {sandbox.availability()}")
    root = make_project(tmp_path / "proj")  # sandbox.mode defaults to auto
    plan = root / "plan.yaml"
    plan.write_text(yaml.safe_dump({"goal": "Fix add", "strategies": [{"name": "sneaky", "steps": [
        {"id": "relax", "instruction": f"{RELAX} && {FIX}", "allowed_files": ["calc.py"], "confidence": 0.9}]}]}))

    run = conductor(root, "build", "--plan", str(plan), "--executor", "command",
                    "--command", 'sh -c "$CONDUCTOR_INSTRUCTION"', "--json")

    assert json.loads(run.stdout)["status"] == "failed"
    assert "protected_patterns:\n  - '*.lock'" in (root / ".conductor" / "policy.yaml").read_text()
    result = json.loads(next((root / ".conductor" / "handoff").rglob("failed/step_001.result.json")).read_text())
    assert "sandboxed by bubblewrap" in result["error"]["message"]


def test_the_policy_is_judged_again_on_the_winners_whole_diff_before_it_is_applied(tmp_path: Path) -> None:
    """A policy.yaml made stricter while a plan waits (here: for an approval) holds at the apply: the step
    merged before the change is not applied to the project against the new rule."""
    root = make_project(tmp_path / "proj", policy=UNSANDBOXED)
    plan = root / "plan.yaml"
    plan.write_text(yaml.safe_dump({"goal": "Fix add", "strategies": [{"name": "one", "steps": [
        {"id": "fix", "instruction": FIX, "allowed_files": ["calc.py"], "confidence": 0.9},
        {"id": "notes", "instruction": "echo notes > NOTES.md", "allowed_files": ["NOTES.md"],
         "depends_on": ["fix"], "confidence": 0.2}]}]}))
    command = ["--executor", "command", "--command", 'sh -c "$CONDUCTOR_INSTRUCTION"']
    halted = conductor(root, "build", "--plan", str(plan), *command, "--json")
    assert halted.returncode == 11, halted.stdout + halted.stderr  # step_002 waits for approval
    (root / ".conductor" / "policy.yaml").write_text(yaml.safe_dump(
        {"file_rules": {"protected_patterns": ["*.lock", "calc.py"]}, "sandbox": {"mode": "off"}}))
    assert conductor(root, "approve", "step_002").returncode == 0

    resumed = conductor(root, "resume", *command, "--json")

    report = json.loads(resumed.stdout)
    assert resumed.returncode == 1 and report["applied_fork"] is None
    assert "calc.py: matches protected pattern 'calc.py' (policy.yaml now)" in report["message"]
    assert "a - b" in (root / "calc.py").read_text() and not (root / "NOTES.md").exists()
