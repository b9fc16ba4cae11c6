"""The evidence a retried step carries, its bounds, the attempt budget in the policy, and crashes mid-repair.

The scenario runs the real CLI with a ``command`` executor (a small script) whose first attempt is wrong and
whose retry, seeing ``previous_attempts`` in its task file, is right; verification is a script too.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from conductor.audit import AuditLog
from conductor.executors.llm import render_prompt
from conductor.faults import CRASH_EXIT_CODE, CRASH_POINTS
from conductor.handoff.documents import read_document
from conductor.layout import ProjectLayout
from conductor.models import (
    MAX_DIFF_EVIDENCE_BYTES,
    MAX_OUTPUT_TAIL_BYTES,
    Behavior,
    Confidence,
    PolicyLayer,
    PreviousAttempt,
    Task,
)
from conductor.policy import merge_policies
from conductor.recovery import recover_project
from tests.e2e.project import cli_env, conductor

# --- the attempt budget is policy ------------------------------------------------------------------


def test_max_attempts_is_tighten_only_and_defaults_to_the_config() -> None:
    layers = [("project", PolicyLayer()), ("plan", PolicyLayer(behavior=Behavior(max_attempts=5)))]
    merged = merge_policies(layers, defaults={"max_attempts": 4})
    assert merged.effective.max_attempts == 4 and merged.sources["max_attempts"] == "config"
    assert any("plan asked behavior.max_attempts=5" in note for note in merged.notes)
    merged = merge_policies([("project", PolicyLayer(behavior=Behavior(max_attempts=6))),
                             ("step", PolicyLayer(behavior=Behavior(max_attempts=2)))], defaults={"max_attempts": 4})
    assert merged.effective.max_attempts == 2 and merged.sources["max_attempts"] == "step"
    assert merge_policies([]).effective.max_attempts == 3  # no config: the built-in default


# --- the prompt ---------------------------------------------------------------------------------


def _task(previous: list[PreviousAttempt]) -> Task:
    return Task(task_id="step_001", plan_id="p", fork_id="1", attempt=len(previous) + 1, instruction="fix add",
                allowed_files=["calc.py"], workspace="w", base_commit="0" * 40, timeout_seconds=60, max_diff_lines=10,
                policy_digest="sha256:" + "0" * 64, confidence=Confidence(score=0.9, level="high"),
                created_at="2026-01-01T00:00:00.000000Z", previous_attempts=previous)


def test_the_prompt_shows_rejected_attempts_and_nothing_that_changes_between_runs() -> None:
    rejected = PreviousAttempt(attempt=1, outcome="rejected", reasons=["verification failed: pytest exited 1"],
                               summary="multiply", files=["calc.py", "poetry.lock"], failed_command="pytest -q",
                               output_tail="E   assert 6 == 5\n", diff="+    return a * b\n", forbidden=["poetry.lock"])
    expired = PreviousAttempt(attempt=2, outcome="lease_expired", reasons=["the lease expired (holder_dead)"])
    prompt = render_prompt(_task([rejected, expired]), {"calc.py": "def add(a, b):\n    return a - b\n"})
    for expected in ("Rejected attempt 1 (rejected)", "verification failed: pytest exited 1", "`pytest -q`",
                     "assert 6 == 5", "+    return a * b", "leave these alone: poetry.lock", "Its summary: multiply"):
        assert expected in prompt, expected
    assert "lease expired" not in prompt and "attempt 2" not in prompt.lower()
    # A crash that cost an attempt (a lease that expired) does not change the question.
    assert prompt == render_prompt(_task([rejected]), {"calc.py": "def add(a, b):\n    return a - b\n"})
    assert "Earlier attempts" not in render_prompt(_task([]), {})


# --- evidence from a real run -----------------------------------------------------------------------

SECRET = "tok-3f9a61c0ffee1234"
EXECUTOR = """\
import json, os, pathlib
task = json.loads(pathlib.Path(os.environ["CONDUCTOR_TASK_FILE"]).read_text())
with open(os.environ["REPAIR_EXECUTIONS"], "a") as log:
    log.write(f"{task['attempt']}\\n")
body = "".join(f"    x{i} = {i}  # padding line {i}\\n" for i in range(400)) if not task["previous_attempts"] else ""
pathlib.Path("calc.py").write_text("def add(a, b):\\n" + body + "    return a + b\\n")
"""
CHECK = """\
import os, sys
if len(open("calc.py").read()) < 1000:
    sys.exit(0)
for i in range(300):
    print(f"noise line {i:04d} " + "." * 40)
print("workspace:", os.getcwd())
print("token:", os.environ.get("REPAIR_API_TOKEN"))
print("1 failed in 0.42s")
print("LAST LINE: calc.py is too long")
sys.exit(1)
"""


def _project(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    root = tmp_path / "proj"
    root.mkdir()
    (root / "calc.py").write_text("def add(a, b):\n    return a - b\n")
    (root / "check.py").write_text(CHECK)
    (tmp_path / "executor.py").write_text(EXECUTOR)
    from conductor.project import init_project

    init_project(root)
    (root / ".conductor" / "config.yaml").write_text(yaml.safe_dump({
        "executor": {"kind": "command", "command": f"{sys.executable} {tmp_path / 'executor.py'}", "poll_seconds": 0.2,
                     "env": ["REPAIR_EXECUTIONS", "REPAIR_API_TOKEN"], "max_attempts": 3},
        "verification": {"commands": [f"{sys.executable} check.py"], "timeout_seconds": 60}}))
    (root / ".conductor" / "policy.yaml").write_text(yaml.safe_dump({"sandbox": {"mode": "off"},
                                                                      "behavior": {"max_diff_lines": 2000}}))
    (root / "plan.yaml").write_text(yaml.safe_dump({"goal": "fix add", "strategies": [{"name": "fix", "steps": [
        {"id": "fix", "instruction": "fix add()", "allowed_files": ["calc.py"], "confidence": 0.9}]}]}))
    return root, cli_env(REPAIR_EXECUTIONS=str(tmp_path / "executions"), REPAIR_API_TOKEN=SECRET)


def _build(root: Path, env: dict[str, str], **extra: str):  # type: ignore[no-untyped-def]
    return conductor(root, "build", "--plan", "plan.yaml", "--json", env={**env, **extra})


def test_evidence_is_bounded_redacted_and_unrooted(tmp_path: Path) -> None:
    root, env = _project(tmp_path)
    run = _build(root, env)
    assert run.returncode == 0, run.stdout + run.stderr
    (plan_id,) = ProjectLayout(root).plan_ids()
    fork = ProjectLayout(root).fork(plan_id, "1")
    task = read_document(fork.task_file("completed", "step_001"), Task)
    (evidence,) = task.previous_attempts
    tail = evidence.output_tail
    assert len(tail.encode()) <= MAX_OUTPUT_TAIL_BYTES and tail.rstrip().endswith("LAST LINE: calc.py is too long")
    assert "noise line 0000" not in tail  # the head was cut, the tail kept
    assert SECRET not in tail and "[REDACTED]" in tail
    assert ".conductor/scratch" not in tail and "workspace: .\n" in tail  # the folder's path is ./
    assert "1 failed in <time>" in tail  # run times are masked: a re-run builds the same evidence
    assert evidence.diff_truncated and len(evidence.diff.encode()) <= MAX_DIFF_EVIDENCE_BYTES
    assert evidence.diff.startswith("diff --git a/calc.py b/calc.py") and evidence.diff.endswith("\n")
    assert evidence.failed_command == f"{sys.executable} check.py" and evidence.files == ["calc.py"]
    assert SECRET not in fork.dir.joinpath("attempts", "step_001.a1.evidence.json").read_text()


# --- crashes in the middle of a repair ------------------------------------------------------------

REPAIR_POINTS = [p for p in CRASH_POINTS if p.startswith("repair.")]


def test_the_repair_points_are_registered() -> None:
    assert REPAIR_POINTS == ["repair.after_evidence", "repair.before_task_archive", "repair.after_archive",
                             "repair.before_publish", "repair.after_publish"]


@pytest.mark.parametrize("point", REPAIR_POINTS)
def test_a_crash_mid_repair_is_finished_by_resume_losing_and_duplicating_nothing(tmp_path: Path, point: str) -> None:
    root, env = _project(tmp_path)
    crashed = _build(root, env, CONDUCTOR_CRASH_AT=point)
    assert crashed.returncode == CRASH_EXIT_CODE, crashed.stdout + crashed.stderr
    layout = ProjectLayout(root)
    (plan_id,) = layout.plan_ids()
    fork = layout.fork(plan_id, "1")
    # Another process's recovery (not the engine's) finds nothing to refuse in the half-done repair.
    recover_project(layout, plan_id=plan_id)
    assert json.loads(conductor(root, "replay", "--json", env=env).stdout)["problems"] == []

    resumed = conductor(root, "resume", "--json", env=env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert read_document(fork.task_file("completed", "step_001"), Task).attempt == 2
    assert (root / "calc.py").read_text() == "def add(a, b):\n    return a + b\n"
    events = AuditLog(fork.audit_log).events()
    assert [e.data["attempt"] for e in events if e.type == "task.retried"] == [1]
    assert [e.data["attempt"] for e in events if e.type == "task.published"] == [1, 2]
    assert (tmp_path / "executions").read_text().split() == ["1", "2"]  # each attempt ran once
    archived = sorted(p.name for p in (fork.dir / "attempts").iterdir())
    assert archived == ["step_001.a1.evidence.json", "step_001.a1.explanation.md", "step_001.a1.provenance.json",
                        "step_001.a1.result.json", "step_001.a1.task.json", "step_001.a1.verdict.json"]
    evidence = read_document(fork.task_file("completed", "step_001"), Task).previous_attempts
    assert [(e.attempt, e.outcome, e.failed_command is not None) for e in evidence] == [(1, "rejected", True)]
    assert not list(fork.state_dir("failed").iterdir())
    assert json.loads(conductor(root, "replay", "--json", env=env).stdout)["problems"] == []


def test_a_retry_whose_publication_a_crash_left_unlogged_may_be_executed_before_recovery(tmp_path: Path) -> None:
    """The engine dies after publishing a retry's file, before logging it; an executor already running
    (here: `conductor task`, which runs no recovery) claims and completes that retry. Recovery must read the
    completed file instead of trusting the log's last published attempt, restore the lost publication and
    let the plan finish (it refused with exit 10: "task.completed attempt 2, but … (attempt 1)")."""
    root, env = _project(tmp_path)
    assert _build(root, env, CONDUCTOR_CRASH_AT="repair.after_publish").returncode == CRASH_EXIT_CODE
    claimed = json.loads(conductor(root, "task", "claim", "--json", env=env).stdout)
    assert claimed["attempt"] == 2
    (Path(claimed["workspace"]) / "calc.py").write_text("def add(a, b):\n    return a + b\n")
    assert conductor(root, "task", "complete", claimed["ref"], "--attempt", "2", env=env).returncode == 0

    resumed = conductor(root, "resume", "--json", env=env)

    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert (root / "calc.py").read_text() == "def add(a, b):\n    return a + b\n"
    layout = ProjectLayout(root)
    (plan_id,) = layout.plan_ids()
    events = AuditLog(layout.fork(plan_id, "1").audit_log).events()
    assert [(e.data["attempt"], e.data.get("reason")) for e in events if e.type == "task.published"] == [
        (1, None), (2, "recovered")]
