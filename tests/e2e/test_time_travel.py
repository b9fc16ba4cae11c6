"""Time travel end to end: replay from the logs, checkout of every step, and `fork --from` that reuses
recorded LLM answers (the in-test server sees zero new requests) and reproduces the workspace."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest

from conductor.layout import ProjectLayout
from tests.helpers.fork_state import fork_files, fork_text
from tests.e2e.project import FIXED_CALC, TEST_CALC, all_chains_verify, cli_env, conductor, make_project
from tests.helpers.llm_server import scripted_llm_server

PLAN = {"strategies": [{"name": "careful", "description": "fix, test, document", "steps": [
    {"id": "fix", "title": "Fix add", "instruction": "STEP-A: fix add() in calc.py",
     "allowed_files": ["calc.py"], "depends_on": [], "confidence": 0.95},
    {"id": "test", "title": "More tests", "instruction": "STEP-B: add a negative test",
     "allowed_files": ["test_calc.py"], "depends_on": ["fix"], "confidence": 0.95},
    {"id": "notes", "title": "Notes", "instruction": "STEP-C: write NOTES.md",
     "allowed_files": ["NOTES.md"], "depends_on": ["test"], "confidence": 0.95},
]}]}
MORE_TESTS = TEST_CALC + "\n\ndef test_negative():\n    assert add(-2, -3) == -5\n"
NOTES = "add() used - instead of +.\n"
IGNORE = [".venv/", "__pycache__/", ".pytest_cache/", "*.pyc", "node_modules/"]


def _edit(path: str, content: str) -> dict:
    return {"summary": f"write {path}", "explanation": f"Wrote {path}.",
            "edits": [{"path": path, "action": "write", "content": content}]}


def statement_files(statement: dict) -> set[str]:
    """The files the step itself changed (its attestation's file subjects)."""
    return {s["name"] for s in statement["subject"] if s["name"] != "workspace" and not s["name"].startswith("step_")}


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file() and ".git" not in p.relative_to(root).parts}


@pytest.fixture(scope="module")
def explored(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    with scripted_llm_server() as llm:
        llm.reply("# Goal", PLAN)
        llm.reply("ANOTHER WAY", _edit("NOTES.md", "rewritten notes\n"))  # first: its prompt holds STEP-C too
        llm.reply("STEP-A:", _edit("calc.py", FIXED_CALC))
        llm.reply("STEP-B:", _edit("test_calc.py", MORE_TESTS))
        llm.reply("STEP-C:", _edit("NOTES.md", NOTES))
        env = cli_env(OPENAI_API_KEY="sk-test-not-real")
        root = make_project(tmp_path_factory.mktemp("tt") / "proj",
                            config={"planner": {"provider": "openai", "model": "m-1"},
                                    "llm": {"openai_base_url": llm.openai_base_url}})
        run = conductor(root, "explore", "Make add() correct", "--forks", "1", "--json", env=env)
        assert run.returncode == 0, run.stderr
        yield root, json.loads(run.stdout)["plan_id"], llm, env


def test_replay_rebuilds_each_point_and_agrees_with_the_folders(explored) -> None:  # type: ignore[no-untyped-def]
    root, plan_id, _, env = explored
    now = conductor(root, "replay", "--json", env=env)
    assert now.returncode == 0, now.stderr
    report = json.loads(now.stdout)
    assert report["at_present"] and report["problems"] == []
    steps = report["state"]["forks"]["1"]["steps"]
    assert [s["state"] for s in steps.values()] == ["accepted"] * 3
    assert report["state"]["status"] == "succeeded" and report["state"]["applied"] == "1"

    after_first = json.loads(conductor(root, "replay", "--to-step", "step_001", "--json", env=env).stdout)
    states = {k: v["state"] for k, v in after_first["state"]["forks"]["1"]["steps"].items()}
    assert states == {"step_001": "accepted", "step_002": "waiting", "step_003": "waiting"}
    assert after_first["at_present"] is False and after_first["state"]["status"] == "running"

    start = json.loads(conductor(root, "replay", "--to", "0", "--json", env=env).stdout)
    assert start["state"]["events"] == 1 and start["state"]["last"]["type"] == "plan.created"

    missing = conductor(root, "replay", "--to", "99999", env=env)
    assert missing.returncode == 9 and "no timeline position" in missing.stderr


def test_replay_names_a_task_file_the_log_does_not_explain(explored, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root, plan_id, _, env = explored
    fork = ProjectLayout(root).fork(plan_id, "1")
    moved = fork.task_file("pending", "step_002")
    fork.task_file("completed", "step_002").rename(moved)
    try:
        run = conductor(root, "replay", "--json", env=env)
        assert run.returncode == 10
        problems = json.loads(run.stdout)["problems"]
        assert problems == ["fork 1 step_002: the log says accepted but the task file is in pending/"]
    finally:
        moved.rename(fork.task_file("completed", "step_002"))


def test_checkout_of_every_step_reproduces_the_recorded_workspace(explored, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root, plan_id, _, env = explored
    expected = {"step_001": {"calc.py": FIXED_CALC, "test_calc.py": TEST_CALC},
                "step_002": {"calc.py": FIXED_CALC, "test_calc.py": MORE_TESTS},
                "step_003": {"calc.py": FIXED_CALC, "test_calc.py": MORE_TESTS, "NOTES.md": NOTES}}
    for step_id, files in expected.items():
        run = conductor(root, "checkout", step_id, "--into", str(tmp_path / step_id), "--json", env=env)
        assert run.returncode == 0, run.stderr
        out = json.loads(run.stdout)
        target = Path(out["path"])
        for name, text in files.items():
            assert (target / name).read_text() == text
        assert not (step_id == "step_001" and (target / "NOTES.md").exists())
        assert set(_hashes(target)) == set(files) | {"poetry.lock"}
        # ...and equal to what the step's signed attestation recorded.
        attestation = ProjectLayout(root).fork(plan_id, "1").sidecar("completed", step_id, ".attestation.json")
        statement = json.loads(base64.b64decode(json.loads(attestation.read_text())["payload"]))
        recorded = {s["name"]: s["digest"] for s in statement["subject"]}
        assert recorded["workspace"] == {"gitCommit": out["commit"]}
        changed = statement_files(statement)
        assert changed == {"step_001": {"calc.py"}, "step_002": {"test_calc.py"}, "step_003": {"NOTES.md"}}[step_id]
        for name in changed:
            assert recorded[name]["sha256"] == _hashes(target)[name]
    again = conductor(root, "checkout", "step_001", "--into", str(tmp_path / "step_001"), env=env)
    assert again.returncode == 2 and "not empty" in again.stderr


def test_fork_from_an_early_step_reuses_recordings_and_reproduces_the_workspace(explored) -> None:  # type: ignore[no-untyped-def]
    root, plan_id, llm, env = explored
    layout = ProjectLayout(root)
    before = len(llm.requests)
    run = conductor(root, "fork", "--from", "step_001", "--json", env=env)
    assert run.returncode == 0, run.stderr
    assert len(llm.requests) == before  # every later step's answer came from a recording

    assert fork_files(layout, plan_id, "2") == fork_files(layout, plan_id, "1")
    events = [json.loads(line) for line in layout.fork(plan_id, "2").audit_log.read_text().splitlines()]
    created = events[0]
    assert created["type"] == "fork.created" and created["data"]["reused_steps"] == ["step_001"]
    parent = created["data"]["parent"]
    parent_events = [json.loads(line) for line in layout.fork(plan_id, "1").audit_log.read_text().splitlines()]
    assert parent_events[parent["event_seq"]]["hash"] == parent["event_hash"]
    assert parent_events[parent["event_seq"]]["type"] == "step.merged"
    calls = [e["data"] for e in events if e["type"] == "llm.call"]
    assert len(calls) == 2 and all(c["cached"] for c in calls)
    assert not any(e["type"] == "task.published" and e["data"]["step_id"] == "step_001" for e in events)
    all_chains_verify(root)


def test_fork_from_with_an_instruction_calls_the_model_again(explored) -> None:  # type: ignore[no-untyped-def]
    root, plan_id, llm, env = explored
    before = llm.count("ANOTHER WAY")
    run = conductor(root, "fork", "--from", "step_002", "--fork", "1", "--instruction", "ANOTHER WAY", "--json",
                    env=env)
    assert run.returncode == 0, run.stderr
    assert llm.count("ANOTHER WAY") == before + 1
    report = json.loads(run.stdout)
    fork_id = max((r["fork_id"] for r in report["ranking"]), key=int)
    assert fork_text(ProjectLayout(root), plan_id, fork_id, "NOTES.md") == "rewritten notes\n"
    assert (root / "NOTES.md").read_text() == NOTES  # the plan was applied once, earlier
