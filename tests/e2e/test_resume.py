"""`conductor resume` after kill -9 of `conductor` mid-plan: the plan finishes, nothing done is redone."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import yaml

from conductor.audit import AuditLog
from conductor.layout import ProjectLayout
from tests.e2e.project import FIXED_CALC, TEST_CALC, all_chains_verify, cli_env, conductor, make_project, spawn
from tests.handoff.support import wait_for
from tests.helpers.llm_server import scripted_llm_server

PLAN = {"strategies": [
    {"name": "two-steps", "description": "", "steps": [
        {"id": "a", "title": "Fix", "instruction": "ONE-A: fix add", "allowed_files": ["calc.py"],
         "depends_on": [], "confidence": 0.9},
        {"id": "b", "title": "Test", "instruction": "ONE-B: add a test", "allowed_files": ["test_calc.py"],
         "depends_on": ["a"], "confidence": 0.9},
    ]},
    {"name": "one-step", "description": "", "steps": [
        {"id": "a", "title": "Fix", "instruction": "TWO-A: fix add", "allowed_files": ["calc.py"],
         "depends_on": [], "confidence": 0.9},
    ]},
]}
MORE_TESTS = TEST_CALC + "\n\ndef test_zero():\n    assert add(0, 0) == 0\n"
MARKS = ("# Goal", "ONE-A:", "ONE-B:", "TWO-A:")


def edit(path: str, content: str) -> dict:
    return {"summary": f"write {path}", "explanation": "as asked",
            "edits": [{"path": path, "action": "write", "content": content}]}


@pytest.mark.slow
def test_resume_after_kill_9_finishes_without_repeating_completed_llm_calls(tmp_path: Path) -> None:
    with scripted_llm_server() as llm:
        llm.reply("# Goal", PLAN)
        llm.reply("ONE-A:", edit("calc.py", FIXED_CALC))
        llm.reply("TWO-A:", edit("calc.py", FIXED_CALC))
        llm.reply("ONE-B:", edit("test_calc.py", MORE_TESTS), times=1, delay_seconds=60)  # hangs: killed here
        llm.reply("ONE-B:", edit("test_calc.py", MORE_TESTS))
        root = make_project(tmp_path / "proj", config={"llm": {"openai_base_url": llm.openai_base_url}})
        env = cli_env(OPENAI_API_KEY="sk-test")

        proc = spawn(root, "explore", "Fix add", "--forks", "2", "--json", env=env)
        try:
            llm.wait_for("ONE-B:", timeout=60)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL

        layout = ProjectLayout(root)
        [plan_id] = layout.plan_ids()
        fork1 = layout.fork(plan_id, "1")
        assert fork1.task_ids("in_progress") == ["step_002"]  # held by the dead process
        # The LLM executor works inside the engine: nothing of its work outlives it, and its lease says so.
        lease = json.loads(fork1.lease_file("step_002").read_text())
        assert lease["contained"] is True
        interrupted = layout.scratch_dir(plan_id, "1", "step_002", 1)
        inode = interrupted.stat().st_ino
        done_at_kill = {(f, s) for f in ("1", "2") for s in layout.fork(plan_id, f).task_ids("completed")}
        assert ("1", "step_001") in done_at_kill
        calls_at_kill = {mark: llm.count(mark) for mark in MARKS}

        resumed = conductor(root, "resume", "--json", "--keep-workspaces", env=env)
        assert resumed.returncode == 0, resumed.stderr
        report = json.loads(resumed.stdout)
        calls_after = {mark: llm.count(mark) for mark in MARKS}

    # The planner and every step completed before the kill were not asked again.
    assert calls_after["# Goal"] == calls_at_kill["# Goal"] == 1
    assert calls_after["ONE-A:"] == calls_at_kill["ONE-A:"] == 1
    if ("2", "step_001") in done_at_kill:
        assert calls_after["TWO-A:"] == calls_at_kill["TWO-A:"]
    # Only the interrupted step was asked again, once.
    assert calls_after["ONE-B:"] == calls_at_kill["ONE-B:"] + 1 == 2
    assert report["status"] == "succeeded"
    assert (root / "calc.py").read_text() == FIXED_CALC
    # The interrupted attempt was re-queued as attempt 2 and completed; attempt 1 left no trace but events.
    task = json.loads(fork1.task_file("completed", "step_002").read_text())
    assert task["attempt"] == 2
    # Its retry ran in the interrupted attempt's folder, taken over and reset, not a new checkout.
    assert not interrupted.exists() and layout.scratch_dir(plan_id, "1", "step_002", 2).stat().st_ino == inode
    for fork_id in ("1", "2"):
        fork = layout.fork(plan_id, fork_id)
        assert not fork.task_ids("pending") and not fork.task_ids("in_progress") and not fork.task_ids("failed")
    events = json.loads(conductor(root, "events", "--json", "--fork", "1", env=env).stdout)
    expired = [e for e in events if e["type"] == "task.lease_expired"]
    assert [(e["data"]["step_id"], e["data"]["attempt"]) for e in expired] == [("step_002", 1)]
    merged = [e["data"]["step_id"] for e in events if e["type"] == "step.merged"]
    assert merged == ["step_001", "step_002"]  # each step's effect merged exactly once
    plan_events = json.loads(conductor(root, "events", "--json", "--type", "plan", env=env).stdout)
    assert [e["type"] for e in plan_events].count("plan.resumed") == 1
    all_chains_verify(root)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["Ctrl-C", "SIGTERM"])
def test_ctrl_c_stops_a_running_step_gives_its_task_back_and_resume_finishes(tmp_path: Path, sig: int,
                                                                             code: int) -> None:
    """Ctrl-C (or SIGTERM) during a step's long command: `explore` stops the command and gives its task back
    (exit 130, or 143) instead of waiting the command out; `resume` then runs the step again and the plan
    finishes."""
    root = make_project(tmp_path / "proj", config={"executor": {
        "kind": "command", "command": 'sh -c "$CONDUCTOR_INSTRUCTION"', "poll_seconds": 0.5}})
    slow = ('if [ "$CONDUCTOR_ATTEMPT" = 1 ]; then echo started > started; sleep 600; fi; '
            "python -c \"import pathlib; p = pathlib.Path('calc.py'); p.write_text(p.read_text().replace('a - b', 'a + b'))\"")
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"goal": "Fix add", "strategies": [{"name": "one", "steps": [
        {"id": "fix", "instruction": slow, "allowed_files": ["calc.py", "started"], "confidence": 0.9}]}]}))
    proc = spawn(root, "explore", "--plan", str(plan), "--json")
    try:
        layout = ProjectLayout(root)
        wait_for(lambda: any(layout.scratch_root.glob("plan_*/fork_1/step_001.a1/started")), timeout=60,
                 what="the step's command to start")
        proc.send_signal(sig)
        _out, err = proc.communicate(timeout=60)  # the command would sleep 600 s: it was stopped, not waited for
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == code, err

    [plan_id] = layout.plan_ids()
    fork = layout.fork(plan_id, "1")
    retry = json.loads(fork.task_file("pending", "step_001").read_text())
    assert retry["attempt"] == 2
    published = [e.data.get("reason") for e in AuditLog(fork.audit_log).events() if e.type == "task.published"]
    assert published == [None, "given_back"]

    resumed = conductor(root, "resume", "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["status"] == "succeeded"
    assert (root / "calc.py").read_text() == FIXED_CALC
    all_chains_verify(root)
