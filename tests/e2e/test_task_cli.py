"""``conductor task``: a whole explore executed by an agent that only runs shell commands.

The acceptance test of issue 10: the engine runs ``explore --executor handoff`` in the background, and
the "agent" drives every step with two ``conductor task`` calls — ``claim --json`` and ``complete`` —
looking at the workspace with ``git status`` and running the project's checks there in between, exactly
as Claude Code, Codex or Cursor would from their shell tool.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conductor.audit import AuditLog
from conductor.errors import LeaseLost, NotFound, StateConflict
from conductor.layout import ProjectLayout
from tests.e2e.project import FIXED_CALC, all_chains_verify, cli_env, conductor, make_project, spawn

TEST_MORE = "from calc import add\n\n\ndef test_zero():\n    assert add(0, 0) == 0\n"


def write_plan(root: Path, strategies: list[dict]) -> Path:
    path = root / "plan.yaml"
    path.write_text(yaml.safe_dump({"goal": "Fix add", "strategies": strategies}))
    return path


def git_status(workspace: Path) -> str:
    return subprocess.run(["git", "status", "--porcelain"], cwd=workspace, capture_output=True, text=True,
                          check=True, timeout=60).stdout


def fork_events(root: Path, plan_id: str, type_: str) -> list[dict]:
    layout = ProjectLayout(root)
    events = []
    for fork in sorted(layout.plan_dir(plan_id).glob("fork_*")):
        events += [e.data | {"fork": fork.name} for e in AuditLog(fork / "audit.log").events() if e.type == type_]
    return events


def do_the_work(task: dict) -> None:
    """What the agent's own file tools would do for each instruction of the plan below."""
    workspace = Path(task["workspace"])
    if task["instruction"].startswith("Add test_more.py"):
        (workspace / "test_more.py").write_text(TEST_MORE)
    elif "a + b" in task["instruction"]:
        calc = workspace / "calc.py"
        calc.write_text(calc.read_text().replace("a - b", "a + b"))
    else:
        raise AssertionError(f"unexpected task {task['ref']}: {task['instruction']}")


@pytest.mark.slow
def test_a_whole_explore_driven_only_through_conductor_task(tmp_path: Path) -> None:
    root = make_project(tmp_path / "proj", config={"executor": {"kind": "handoff", "poll_seconds": 0.5}})
    plan = write_plan(root, [
        {"name": "edit", "steps": [
            {"id": "fix", "instruction": "In calc.py, make add(a, b) return a + b instead of a - b.",
             "allowed_files": ["calc.py"], "confidence": 0.9},
            {"id": "more", "instruction": "Add test_more.py with a test that add(0, 0) == 0.",
             "allowed_files": ["test_more.py"], "depends_on": ["fix"], "confidence": 0.9},
        ]},
        {"name": "rewrite", "steps": [
            {"id": "fix", "instruction": "Rewrite add in calc.py so that it returns a + b.",
             "allowed_files": ["calc.py"], "confidence": 0.9},
        ]},
    ])
    engine = spawn(root, "explore", "--plan", str(plan), "--executor", "handoff", "--json")
    calls, done = 0, []
    try:
        for _ in range(3):  # three steps in all: two calls each
            claimed = conductor(root, "task", "claim", "--json", "--wait", "240", timeout=300)
            calls += 1
            assert claimed.returncode == 0, (claimed.stderr, engine.poll())
            task = json.loads(claimed.stdout)
            workspace = Path(task["workspace"])
            assert workspace.is_absolute() and workspace.is_relative_to(root / ".conductor" / "scratch")
            assert task["attempt"] == 1 and task["deadline"] and task["allowed_files"]
            assert git_status(workspace) == ""  # a clean checkout of the fork's state
            do_the_work(task)
            assert git_status(workspace).strip().endswith(tuple(task["allowed_files"]))
            for check in task["checks"]:  # the project's verification commands, run where Conductor will
                run = subprocess.run(check, shell=True, cwd=workspace, capture_output=True, text=True, timeout=300)
                assert run.returncode == 0, run.stdout + run.stderr
            # from inside the workspace, where the agent's shell now is: the project is found by walking up
            completed = subprocess.run([sys.executable, "-m", "conductor", "task", "complete", task["ref"], "--summary",
                                        f"did {task['title']}", "--json"], cwd=workspace, env=cli_env(),
                                       capture_output=True, text=True, timeout=300)
            calls += 1
            assert completed.returncode == 0, completed.stderr
            outcome = json.loads(completed.stdout)
            assert outcome["status"] == "completed" and outcome["warnings"] == []
            assert [c["path"] for c in outcome["files_changed"]] == task["allowed_files"]
            done.append(task["ref"])
        out, err = engine.communicate(timeout=600)
    finally:
        if engine.poll() is None:
            engine.kill()
            engine.communicate(timeout=30)
    assert engine.returncode == 0, err
    report = json.loads(out)
    assert report["status"] == "succeeded"
    assert {(r["fork_id"], r["steps_verified"], r["steps_total"]) for r in report["ranking"]} == {("1", 2, 2), ("2", 1, 1)}
    assert (root / "calc.py").read_text() == FIXED_CALC
    assert calls == 2 * len(done) == 6  # two `conductor task` calls per step, nothing else
    plan_id = report["plan_id"]
    claims = fork_events(root, plan_id, "task.claimed")
    assert len(claims) == 3 and all(e["pid"] == 0 and e["holder"].startswith("conductor-task@") for e in claims)
    verified = fork_events(root, plan_id, "step.verified")
    assert len(verified) == 3 and all(e["accepted"] for e in verified)
    assert fork_events(root, plan_id, "task.lease_expired") == []
    all_chains_verify(root)
    assert conductor(root, "task", "claim").returncode == NotFound.exit_code  # nothing left


@pytest.mark.slow
def test_an_agent_that_stops_renewing_loses_the_task_to_the_running_engine(tmp_path: Path) -> None:
    # Long enough for the second attempt's claim-to-complete (two process starts) on a loaded machine.
    root = make_project(tmp_path / "proj", config={"executor": {"kind": "handoff", "poll_seconds": 0.2,
                                                                "lease_seconds": 8, "heartbeat_seconds": 2}})
    plan = write_plan(root, [{"name": "only", "steps": [
        {"id": "fix", "instruction": "In calc.py, make add(a, b) return a + b.", "allowed_files": ["calc.py"],
         "confidence": 0.9}]}])
    engine = spawn(root, "explore", "--plan", str(plan), "--executor", "handoff", "--json")
    try:
        first = json.loads(conductor(root, "task", "claim", "--json", "--wait", "240", timeout=300).stdout)
        do_the_work(first)
        deadline = time.monotonic() + 240
        while not fork_events(root, first["plan_id"], "task.lease_expired"):  # the agent went quiet
            assert time.monotonic() < deadline and engine.poll() is None, "the engine never reaped the lease"
            time.sleep(0.2)
        (expired,) = fork_events(root, first["plan_id"], "task.lease_expired")
        assert (expired["holder"], expired["reason"]) == (first["holder"], "not_renewed")
        late = conductor(root, "task", "complete", first["ref"], "--attempt", "1")
        assert late.returncode in (StateConflict.exit_code, LeaseLost.exit_code), late.stderr
        assert late.stdout == "" and late.stderr.startswith("conductor: error: ")
        assert not list((root / ".conductor" / "handoff").glob("plan_*/fork_1/completed/*"))  # nothing written
        second = json.loads(conductor(root, "task", "claim", "--json", "--wait", "240", timeout=300).stdout)
        assert second["attempt"] == 2 and second["workspace"] != first["workspace"]
        assert git_status(Path(second["workspace"])) == ""  # the late edit stayed in the old folder
        do_the_work(second)
        assert conductor(root, "task", "complete", second["ref"], "--attempt", "2").returncode == 0
        out, err = engine.communicate(timeout=600)
    finally:
        if engine.poll() is None:
            engine.kill()
            engine.communicate(timeout=30)
    assert engine.returncode == 0, err
    assert json.loads(out)["status"] == "succeeded"
    assert (root / "calc.py").read_text() == FIXED_CALC


LONG = ("Make add(a, b) in calc.py return the sum a + b; keep the signature, do not touch any other file, and keep "
        "the function a single expression so that the diff stays one line long for the reviewer.")


def test_plain_output_is_one_fact_per_line_and_errors_have_exit_codes(tmp_path: Path) -> None:
    root = make_project(tmp_path / "proj", config={"executor": {"kind": "handoff"}})
    plan = write_plan(root, [{"name": "only", "steps": [
        {"id": "fix", "title": "fix the sum " * 10, "instruction": LONG, "allowed_files": ["calc.py"],
         "confidence": 0.9}]}])
    halted = conductor(root, "explore", "--plan", str(plan), "--executor", "handoff", "--no-wait")
    assert halted.returncode == 11, halted.stderr

    listed = conductor(root, "task", "list")
    assert listed.returncode == 0 and len(listed.stdout.splitlines()) == 1 and "pending" in listed.stdout
    claimed = conductor(root, "task", "claim")
    assert claimed.returncode == 0, claimed.stderr
    lines = claimed.stdout.splitlines()
    assert f"  {LONG}" in lines  # never wrapped at 80 columns
    assert any(line.startswith("workspace:") and line.split(None, 1)[1].startswith(str(root)) for line in lines)
    assert any(line.startswith("deadline") or "deadline" in line for line in lines)
    ref = next(line.split()[1] for line in lines if line.startswith("claimed "))

    again = conductor(root, "task", "claim")
    assert again.returncode == NotFound.exit_code
    assert again.stderr.startswith("conductor: error: nothing to claim") and len(again.stderr.splitlines()) == 1

    workspace = Path(json.loads(conductor(root, "task", "show", ref, "--json").stdout)["workspace"])
    (workspace / "calc.py").write_text(FIXED_CALC)
    (workspace / "notes.txt").write_text("scratch\n")
    stranger = conductor(root, "task", "complete", ref, "--holder", "someone-else")
    assert stranger.returncode == LeaseLost.exit_code and "not by someone-else" in stranger.stderr
    explanation = tmp_path / "why.md"
    explanation.write_text("# Fixed\n\nThe sum was a difference.\n")
    completed = conductor(root, "task", "complete", ref, "--explanation-file", str(explanation))
    assert completed.returncode == 0, completed.stderr
    assert "warning: changed outside allowed_files (calc.py): notes.txt" in completed.stdout
    assert completed.stdout.splitlines()[0].endswith(": Fixed")  # the summary defaults to the explanation's first line
    assert "provenance: unsigned" in completed.stdout

    twice = conductor(root, "task", "complete", ref)
    assert twice.returncode == StateConflict.exit_code and "not in progress (it is completed)" in twice.stderr
    shown = conductor(root, "task", "show", ref, "--json")
    assert json.loads(shown.stdout)["state"] == "completed"
    resumed = conductor(root, "resume", "--executor", "handoff", "--no-wait", "--json")
    assert resumed.returncode in (1, 11), resumed.stderr  # notes.txt is outside allowed_files: rejected
    events = json.loads(conductor(root, "events", "--json", "--type", "step.verified").stdout)
    assert events and events[0]["data"]["accepted"] is False
    assert any("notes.txt" in reason for reason in events[0]["data"]["reasons"])


def test_the_project_key_is_refused_for_an_agents_provenance(tmp_path: Path) -> None:
    from conductor.keys import generate_signing_key

    root = make_project(tmp_path / "proj", config={"executor": {"kind": "handoff"}})
    plan = write_plan(root, [{"name": "only", "steps": [
        {"id": "fix", "instruction": "fix it", "allowed_files": ["calc.py"], "confidence": 0.9}]}])
    assert conductor(root, "explore", "--plan", str(plan), "--executor", "handoff", "--no-wait").returncode == 11
    ref = json.loads(conductor(root, "task", "claim", "--json").stdout)["ref"]
    keys = tmp_path / "lookalike"
    key = generate_signing_key(keys)
    (root / ".conductor" / "keys").mkdir(exist_ok=True)
    (root / ".conductor" / "keys" / "signing.pub").write_bytes(key.public_pem())  # as if it were the project key
    refused = conductor(root, "task", "complete", ref, "--signing-key", str(keys / "signing.key"))
    assert refused.returncode == 3 and "project's own key" in refused.stderr
    assert json.loads(conductor(root, "task", "show", ref, "--json").stdout)["state"] == "in_progress"
    own = generate_signing_key(tmp_path / "agent")
    signed = conductor(root, "task", "complete", ref, "--signing-key", str(tmp_path / "agent" / "signing.key"), "--json")
    assert signed.returncode == 0, signed.stderr
    assert json.loads(signed.stdout)["provenance"] == {"signed": True, "key_id": own.key_id}
