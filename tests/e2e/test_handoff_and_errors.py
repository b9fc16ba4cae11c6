"""Handoff mode with a separate `conductor worker` process; command-executor rejections; CLI errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conductor.errors import ConfigError, CredentialsMissing, Halted, NotFound
from conductor.layout import ProjectLayout
from tests.helpers.fork_state import fork_text
from tests.e2e.project import FIXED_CALC, cli_env, conductor, make_project, spawn

FIX = f"{sys.executable} -c \"import pathlib; p = pathlib.Path('calc.py'); p.write_text(p.read_text().replace('a - b', 'a + b'))\""


def write_plan(root: Path, steps: list[dict], name: str = "plan.yaml") -> Path:
    import yaml

    path = root / name
    path.write_text(yaml.safe_dump({"goal": "Fix add", "strategies": [{"name": "only", "steps": steps}]}))
    return path


@pytest.mark.slow
def test_handoff_mode_with_a_separate_worker_process(tmp_path: Path) -> None:
    root = make_project(tmp_path / "proj", config={"executor": {"kind": "handoff", "poll_seconds": 0.5}})
    plan = write_plan(root, [
        {"id": "fix", "instruction": FIX, "allowed_files": ["calc.py"], "confidence": 0.9},
        {"id": "noop", "instruction": "true", "allowed_files": [], "depends_on": ["fix"], "confidence": 0.9},
    ])
    explore = spawn(root, "explore", "--plan", str(plan), "--json")
    worker = spawn(root, "worker", "--command", 'sh -c "$CONDUCTOR_INSTRUCTION"')
    try:
        out, err = explore.communicate(timeout=120)
    finally:
        worker.terminate()
        worker.communicate(timeout=30)
    assert explore.returncode == 0, err
    report = json.loads(out)
    assert report["applied_fork"] == "1"
    assert (root / "calc.py").read_text() == FIXED_CALC
    events = json.loads(conductor(root, "events", "--json", "--type", "task.claimed").stdout)
    holders = {e["data"]["holder"].split("@")[0] for e in events}
    assert holders == {"conductor-worker"}  # the worker process executed both steps, not conductor
    assert worker.returncode == 0


def test_executor_writing_outside_allowed_or_protected_fails_and_project_is_untouched(tmp_path: Path) -> None:
    root = make_project(tmp_path / "proj")
    plan = write_plan(root, [{"id": "fix", "instruction": f"{FIX} && echo hacked > poetry.lock && echo x > extra.py",
                              "allowed_files": ["calc.py", "poetry.lock"], "confidence": 0.9}])
    run = conductor(root, "build", "--plan", str(plan), "--executor", "command",
                    "--command", 'sh -c "$CONDUCTOR_INSTRUCTION"', "--json")
    assert run.returncode == 1, run.stderr
    plan_id = json.loads(run.stdout)["plan_id"]
    fork = ProjectLayout(root).fork(plan_id, "1")
    assert fork.task_ids("failed") == ["step_001"]
    verdict = json.loads(fork.sidecar("failed", "step_001", ".verdict.json").read_text())
    assert verdict["accepted"] is False
    reasons = " | ".join(verdict["reasons"])
    assert "poetry.lock: matches protected pattern '*.lock' (project)" in reasons
    assert "extra.py" in reasons
    assert (root / "poetry.lock").read_text() == "locked\n"
    assert not (root / "extra.py").exists()
    assert (root / "calc.py").read_text() != FIXED_CALC  # the rejected change never reached the project
    # ...nor the fork's integrated workspace
    assert fork_text(ProjectLayout(root), plan_id, "1", "extra.py") is None


def test_failing_verification_rejects_the_step(tmp_path: Path) -> None:
    root = make_project(tmp_path / "proj")
    plan = write_plan(root, [{"id": "noop", "instruction": "echo '# touched' >> calc.py",
                              "allowed_files": ["calc.py"], "confidence": 0.9}])
    run = conductor(root, "build", "--plan", str(plan), "--executor", "command",
                    "--command", 'sh -c "$CONDUCTOR_INSTRUCTION"', "--json")
    assert run.returncode == 1
    fork = ProjectLayout(root).fork(json.loads(run.stdout)["plan_id"], "1")
    verdict = json.loads(fork.sidecar("failed", "step_001", ".verdict.json").read_text())
    assert any("verification failed" in r and "pytest" in r for r in verdict["reasons"])
    assert verdict["verification"][0]["exit_code"] == 1


def test_low_confidence_step_waits_for_approval_then_resumes(tmp_path: Path) -> None:
    root = make_project(tmp_path / "proj")
    plan = write_plan(root, [{"id": "fix", "instruction": FIX, "allowed_files": ["calc.py"], "confidence": 0.2}])
    args = ["--executor", "command", "--command", 'sh -c "$CONDUCTOR_INSTRUCTION"', "--json"]
    run = conductor(root, "build", "--plan", str(plan), *args)
    assert run.returncode == Halted.exit_code, run.stderr
    report = json.loads(run.stdout)
    assert report["awaiting_approval"] == [{"fork_id": "1", "step_id": "step_001"}]
    assert (root / "calc.py").read_text() != FIXED_CALC

    assert conductor(root, "resume", *args).returncode == Halted.exit_code  # still waiting
    approve = conductor(root, "approve", "step_001")
    assert approve.returncode == 0, approve.stderr
    resumed = conductor(root, "resume", *args)
    assert resumed.returncode == 0, resumed.stderr
    assert (root / "calc.py").read_text() == FIXED_CALC
    events = json.loads(conductor(root, "events", "--json", "--type", "approval").stdout)
    assert [e["type"] for e in events] == ["approval.requested", "approval.granted"]


# --- clear one-line errors with documented exit codes ---------------------------------------------


def one_line_error(run) -> str:  # type: ignore[no-untyped-def]
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("conductor: error: ")
    return lines[0]


def test_bad_yaml_names_file_and_line(tmp_path: Path) -> None:
    root = make_project(tmp_path / "proj")
    (root / ".conductor" / "config.yaml").write_text("planner:\n  model: [unclosed\nexecutor: {}\n")
    run = conductor(root, "explore", "goal")
    assert run.returncode == ConfigError.exit_code
    line = one_line_error(run)
    assert ".conductor/config.yaml:" in line


def test_unknown_policy_key_names_file_key_and_line(tmp_path: Path) -> None:
    root = make_project(tmp_path / "proj")
    (root / ".conductor" / "policy.yaml").write_text("file_rules:\n  protected_pattern: ['*.lock']\n")
    run = conductor(root, "policy")
    assert run.returncode == ConfigError.exit_code
    line = one_line_error(run)
    assert "policy.yaml:2" in line and "file_rules.protected_pattern" in line and "unknown key" in line


def test_missing_api_key_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    root = make_project(tmp_path / "proj")
    run = conductor(root, "explore", "Fix add", env=cli_env())
    assert run.returncode == CredentialsMissing.exit_code
    assert "OPENAI_API_KEY" in one_line_error(run)
    assert ProjectLayout(root).plan_ids() == []


def test_missing_gemini_key(tmp_path: Path) -> None:
    root = make_project(tmp_path / "proj", config={"planner": {"provider": "gemini"}})
    run = conductor(root, "explore", "Fix add", env=cli_env())
    assert run.returncode == CredentialsMissing.exit_code
    line = one_line_error(run)
    assert "GEMINI_API_KEY" in line and "GOOGLE_API_KEY" in line


def test_outside_a_project_is_not_found(tmp_path: Path) -> None:
    run = conductor(tmp_path, "status")
    assert run.returncode == NotFound.exit_code
    assert "conductor init" in one_line_error(run)


def test_bad_plan_file_names_the_key(tmp_path: Path) -> None:
    root = make_project(tmp_path / "proj")
    (root / "plan.yaml").write_text("strategies:\n  - name: x\n    steps:\n      - instruction: hi\n        alowed_files: []\n")
    run = conductor(root, "build", "goal", "--plan", "plan.yaml", "--executor", "handoff")
    assert run.returncode == ConfigError.exit_code
    line = one_line_error(run)
    assert "plan.yaml:5" in line and "alowed_files" in line
