"""`conductor explore` end to end against an in-test server speaking the OpenAI and Gemini wire formats.

The real CLI runs in a subprocess; the real openai / google-genai clients talk to the scripted server;
the forks' steps run through the file handoff; verification runs the sample project's real pytest suite.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from conductor.handoff.documents import read_document
from conductor.layout import ProjectLayout
from conductor.models import Task
from tests.helpers.fork_state import fork_text
from tests.e2e.project import FIXED_CALC, TEST_CALC, all_chains_verify, cli_env, conductor, make_project
from tests.helpers.llm_server import ScriptedLLM, scripted_llm_server

PLAN = {"strategies": [
    {"name": "minimal-fix", "description": "fix the operator", "steps": [
        {"id": "fix", "title": "Fix add", "instruction": "MINIMAL: fix add() in calc.py",
         "allowed_files": ["calc.py"], "depends_on": [], "confidence": 0.9},
    ]},
    {"name": "rewrite-and-test", "description": "rewrite and add tests", "steps": [
        {"id": "rewrite", "title": "Rewrite calc", "instruction": "REWRITE: rewrite calc.py with docstrings",
         "allowed_files": ["calc.py"], "depends_on": [], "confidence": 0.85},
        {"id": "tests", "title": "More tests", "instruction": "TESTS: add a test for negative numbers",
         "allowed_files": ["test_calc.py"], "depends_on": ["rewrite"], "confidence": 0.85},
    ]},
]}
REWRITTEN = '"""Arithmetic."""\n\n\ndef add(a, b):\n    """Return a + b."""\n    return a + b\n'
MORE_TESTS = TEST_CALC + "\n\ndef test_negative():\n    assert add(-2, -3) == -5\n"


def edit(path: str, content: str, summary: str) -> dict:
    return {"summary": summary, "explanation": f"{summary}, because the tests expect it.",
            "edits": [{"path": path, "action": "write", "content": content}]}


def script(llm: ScriptedLLM) -> None:
    llm.reply("# Goal", PLAN, input_tokens=300, output_tokens=120)
    llm.reply("MINIMAL:", edit("calc.py", FIXED_CALC, "Use + in add"))
    llm.reply("REWRITE:", edit("calc.py", REWRITTEN, "Rewrite calc.py"))
    llm.reply("TESTS:", edit("test_calc.py", MORE_TESTS, "Add a negative test"))


def provider_setup(provider: str, llm: ScriptedLLM) -> tuple[dict, dict[str, str]]:
    if provider == "openai":
        return {"openai_base_url": llm.openai_base_url}, cli_env(OPENAI_API_KEY="sk-test-not-real")
    return {"gemini_base_url": llm.gemini_base_url}, cli_env(GEMINI_API_KEY="gemini-test-not-real")


@pytest.mark.parametrize("provider", ["openai", "gemini"])
def test_explore_plans_forks_verifies_ranks_and_applies(tmp_path: Path, provider: str) -> None:
    with scripted_llm_server() as llm:
        script(llm)
        llm_config, env = provider_setup(provider, llm)
        root = make_project(tmp_path / "proj", config={"planner": {"provider": provider, "model": "m-1"},
                                                       "llm": llm_config})
        run = conductor(root, "explore", "Make add() correct", "--forks", "2", "--json", env=env)
        assert run.returncode == 0, run.stderr
        report = json.loads(run.stdout)
        wires = {r.wire for r in llm.requests}

    assert wires == {provider}
    assert llm.count("# Goal") == 1 and llm.count("MINIMAL:") == 1 and llm.count("REWRITE:") == 1
    assert llm.count("TESTS:") == 1
    # Ranking by evidence: both forks verified and pass; the minimal fix changed fewer lines.
    assert [r["fork_id"] for r in report["ranking"]] == ["1", "2"]
    assert all(r["status"] == "succeeded" and r["checks_passed"] for r in report["ranking"])
    assert report["ranking"][0]["changed_lines"] < report["ranking"][1]["changed_lines"]
    assert report["applied_fork"] == "1" and report["applied_files"] == ["calc.py"]
    assert (root / "calc.py").read_text() == FIXED_CALC
    assert (root / "test_calc.py").read_text() == TEST_CALC  # fork 2's tests were not applied

    layout = ProjectLayout(root)
    plan_id = report["plan_id"]
    for fork_id, steps in (("1", ["step_001"]), ("2", ["step_001", "step_002"])):
        fork = layout.fork(plan_id, fork_id)
        assert fork.task_ids("completed") == steps
        assert not fork.task_ids("pending") and not fork.task_ids("in_progress") and not fork.task_ids("failed")
        for step in steps:
            assert read_document(fork.task_file("completed", step), Task).attempt == 1
            verdict = json.loads(fork.sidecar("completed", step, ".verdict.json").read_text())
            assert verdict["accepted"] is True
            assert [e["exit_code"] for e in verdict["verification"]] == [0]
            assert "pytest" in verdict["verification"][0]["command"]
            envelope = json.loads(fork.sidecar("completed", step, ".provenance.json").read_text())
            assert envelope["payloadType"] == "application/vnd.in-toto+json" and len(envelope["signatures"]) == 1
            provenance = json.loads(base64.b64decode(envelope["payload"]))
            assert provenance["_type"] == "https://in-toto.io/Statement/v1"
    # Fork 2 really ran its step 2 on top of step 1, in its own workspace.
    assert fork_text(layout, plan_id, "2", "test_calc.py") == MORE_TESTS

    logs = all_chains_verify(root)
    assert len(logs) == 3  # the plan's log and one per fork
    events = json.loads(conductor(root, "events", "--json", env=env).stdout)
    types = [e["type"] for e in events]
    for expected in ("plan.created", "fork.created", "confidence.scored", "policy.merged", "task.published",
                     "task.claimed", "task.completed", "step.verified", "step.merged", "plan.ranked",
                     "plan.applied", "plan.finished"):
        assert expected in types, expected
    calls = [e for e in events if e["type"] == "llm.call"]
    assert len(calls) == 4
    assert sum(e["data"]["input_tokens"] for e in calls) == 300 + 3 * 11


def test_model_writing_outside_allowed_files_fails_the_step_and_nothing_reaches_the_project(tmp_path: Path) -> None:
    plan = {"strategies": [{"name": "sneaky", "description": "", "steps": [
        {"id": "fix", "title": "Fix", "instruction": "SNEAKY: fix add", "allowed_files": ["calc.py"],
         "depends_on": [], "confidence": 0.9}]}]}
    with scripted_llm_server() as llm:
        llm.reply("# Goal", plan)
        llm.reply("SNEAKY:", {"summary": "fix", "explanation": "fix", "edits": [
            {"path": "calc.py", "action": "write", "content": FIXED_CALC},
            {"path": "poetry.lock", "action": "write", "content": "hacked\n"},
        ]})
        root = make_project(tmp_path / "proj", config={"llm": {"openai_base_url": llm.openai_base_url}})
        run = conductor(root, "build", "Fix add", "--json", env=cli_env(OPENAI_API_KEY="sk-test"))

    assert run.returncode == 1, run.stderr
    report = json.loads(run.stdout)
    assert report["applied_fork"] is None
    fork = ProjectLayout(root).fork(report["plan_id"], "1")
    assert fork.task_ids("failed") == ["step_001"]
    result = json.loads(fork.sidecar("failed", "step_001", ".result.json").read_text())
    assert result["error"]["kind"] == "disallowed_edit"
    assert "poetry.lock" in result["error"]["message"]
    assert (root / "poetry.lock").read_text() == "locked\n"
    assert (root / "calc.py").read_text() != FIXED_CALC
