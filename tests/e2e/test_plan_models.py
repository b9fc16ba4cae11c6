"""A plan remembers its models: resume and fork --from call the provider and model the plan started with.

config.yaml says OpenAI (the default) and the environment has only a Gemini key: a plan explored with
``--provider gemini --model gemini-2.5-flash``, killed mid-run (SIGKILL), resumes with a bare
``conductor resume`` against the in-test Gemini server, and ``fork --from`` replays its recordings.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from conductor.config import Config
from conductor.layout import ProjectLayout
from conductor.models import ExecutorChoice, Plan
from conductor.runtime import Project, RunChoices, plan_project
from tests.e2e.project import FIXED_CALC, TEST_CALC, all_chains_verify, cli_env, conductor, make_project, spawn
from tests.helpers.llm_server import scripted_llm_server

PLAN = {"strategies": [{"name": "two-steps", "description": "", "steps": [
    {"id": "a", "title": "Fix", "instruction": "G-A: fix add", "allowed_files": ["calc.py"], "depends_on": [],
     "confidence": 0.9},
    {"id": "b", "title": "Test", "instruction": "G-B: add a test", "allowed_files": ["test_calc.py"],
     "depends_on": ["a"], "confidence": 0.9},
]}]}
MORE_TESTS = TEST_CALC + "\n\ndef test_zero():\n    assert add(0, 0) == 0\n"
MODEL = "gemini-2.5-flash"


def edit(path: str, content: str) -> dict:
    return {"summary": f"write {path}", "explanation": "as asked",
            "edits": [{"path": path, "action": "write", "content": content}]}


@pytest.mark.slow
def test_a_gemini_plan_killed_mid_run_resumes_and_forks_with_its_own_provider_and_model(tmp_path: Path) -> None:
    with scripted_llm_server() as llm:
        llm.reply("# Goal", PLAN)
        llm.reply("G-A:", edit("calc.py", FIXED_CALC))
        llm.reply("G-B:", edit("test_calc.py", MORE_TESTS), times=1, delay_seconds=60)  # hangs: killed here
        llm.reply("G-B:", edit("test_calc.py", MORE_TESTS))
        # config.yaml keeps the default provider (openai); only the Gemini server's address is set.
        root = make_project(tmp_path / "proj", config={"llm": {"gemini_base_url": llm.gemini_base_url}})
        env = cli_env(GEMINI_API_KEY="gemini-test-not-real")  # no OpenAI key: a switch would be exit 7

        proc = spawn(root, "explore", "Fix add", "--forks", "1", "--provider", "gemini", "--model", MODEL, "--json",
                     env=env)
        try:
            llm.wait_for("G-B:", timeout=90)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL

        layout = ProjectLayout(root)
        [plan_id] = layout.plan_ids()
        plan = json.loads((layout.plan_dir(plan_id) / "plan.json").read_text())
        assert plan["executor"] == {"kind": "llm", "provider": "gemini", "model": MODEL}
        assert plan["planner"]["provider"] == "gemini" and plan["planner"]["model"] == MODEL

        resumed = conductor(root, "resume", "--json", env=env)  # no provider flags
        assert resumed.returncode == 0, resumed.stderr
        assert json.loads(resumed.stdout)["status"] == "succeeded"
        assert (llm.count("# Goal"), llm.count("G-A:"), llm.count("G-B:")) == (1, 1, 2)
        assert {(r.wire, r.model) for r in llm.requests} == {("gemini", MODEL)}

        before_fork = len(llm.requests)
        forked = conductor(root, "fork", "--from", "step_001", "--json", env=env)
        assert forked.returncode == 0, forked.stderr
        assert len(llm.requests) == before_fork  # step_002 of the new fork replays fork 1's recording

        # A flag still overrides the plan's model, and the plan's log says so.
        other = conductor(root, "fork", "--from", "step_001", "--model", "gemini-2.5-pro", "--json", env=env)
        assert other.returncode == 0, other.stderr
        assert [(r.wire, r.model) for r in llm.requests[before_fork:]] == [("gemini", "gemini-2.5-pro")]

    layout = ProjectLayout(root)
    assert layout.fork(plan_id, "2").task_ids("completed") == ["step_002"]
    events = json.loads(conductor(root, "events", "--json", "--type", "plan", env=env).stdout)
    overrides = [e["data"] for e in events if e["type"] == "plan.models_overridden"]
    assert overrides == [{"role": "executor", "recorded": {"provider": "gemini", "model": MODEL},
                          "used": {"provider": "gemini", "model": "gemini-2.5-pro"}, "by": "flags"}]
    cost = json.loads(conductor(root, "cost", "--json", env=env).stdout)
    [spent] = cost["plans"]
    assert spent["calls"] == 4 and spent["cached_calls"] == 1  # plan, G-A, G-B (again after the kill), G-B pro
    assert {(m["provider"], m["model"]) for m in spent["models"]} == {("gemini", MODEL), ("gemini", "gemini-2.5-pro")}
    all_chains_verify(root)


def _plan(executor: ExecutorChoice | None) -> Plan:
    document = {"schema": "conductor.plan/v1", "plan_id": "20261126T000000-abcd", "goal": "g",
                "created_at": "2026-11-26T00:00:00Z", "planner": {"kind": "file"},
                "forks": [{"fork_id": "1", "strategy": {"name": "s"},
                           "steps": [{"step_id": "step_001", "instruction": "do"}]}]}
    if executor is not None:
        document["executor"] = executor.model_dump(mode="json")
    return Plan.model_validate(document)


def test_which_model_a_plan_runs_with(tmp_path: Path) -> None:
    project = Project(layout=ProjectLayout(tmp_path), config=Config(), policy=None, environ={})  # type: ignore[arg-type]
    # A plan written before executors were recorded (no key in plan.json) runs with config.yaml's.
    assert plan_project(project, _plan(None)) == (project, None)
    recorded = _plan(ExecutorChoice(kind="llm", provider="gemini", model=MODEL))
    running, override = plan_project(project, recorded)
    assert (running.config.executor_provider, running.config.executor_model, override) == ("gemini", MODEL, None)
    # --provider alone: the recorded model belongs to the other provider, so config.yaml's model is used.
    running, override = plan_project(project, recorded, RunChoices(provider="openai"))
    assert (running.config.executor_provider, running.config.executor_model) == ("openai", "gpt-4.1-mini")
    assert override is not None and override["used"] == {"provider": "openai", "model": "gpt-4.1-mini"}
    # A command executor chosen now ignores the recorded model.
    command = Config.model_validate({"executor": {"kind": "command", "command": "true"}})
    project = Project(layout=ProjectLayout(tmp_path), config=command, policy=None, environ={})  # type: ignore[arg-type]
    assert plan_project(project, recorded) == (project, None)
