"""LLM budgets end to end: three forks call a slow server at once, and together they never overspend.

The real CLI runs in subprocesses; the real openai client talks to a threaded in-test server (requests run
concurrently). Every call reports the worst case of its answer (``max_output_tokens``), so real spending
is close to what is reserved and the budget decides exactly how many calls are made.
"""

from __future__ import annotations

import json
from pathlib import Path

from conductor.layout import ProjectLayout
from conductor.llm.ledger import Ledger
from tests.e2e.project import FIXED_CALC, TEST_CALC, all_chains_verify, cli_env, conductor, make_project
from tests.helpers.llm_server import scripted_llm_server

MAX_OUT = 1_000_000  # llm.max_output_tokens: each call's worst case is this plus its prompt bound (< 10,000)
INPUT = 500
PER_CALL = INPUT + MAX_OUT  # what the server reports for every call
# Four calls fit (the planner's, then three first steps at once, each reserved at < PER_CALL + 10,000);
# a fifth does not (4 * PER_CALL spent + another worst case > BUDGET).
BUDGET = 4 * PER_CALL + 30_000
MARKS = ("# Goal", "F1-A:", "F1-B:", "F2-A:", "F2-B:", "F3-A:", "F3-B:")
MORE_TESTS = TEST_CALC + "\n\ndef test_zero():\n    assert add(0, 0) == 0\n"


def strategy(number: int) -> dict:
    return {"name": f"way-{number}", "description": "", "steps": [
        {"id": "a", "title": "Fix", "instruction": f"F{number}-A: fix add", "allowed_files": ["calc.py"],
         "depends_on": [], "confidence": 0.9},
        {"id": "b", "title": "Test", "instruction": f"F{number}-B: add a test", "allowed_files": ["test_calc.py"],
         "depends_on": ["a"], "confidence": 0.9},
    ]}


def edit(path: str, content: str) -> dict:
    return {"summary": f"write {path}", "explanation": "as asked",
            "edits": [{"path": path, "action": "write", "content": content}]}


def test_parallel_forks_stop_at_the_budget_and_a_resume_with_more_makes_only_the_calls_not_made(tmp_path: Path) -> None:
    with scripted_llm_server() as llm:
        usage = {"input_tokens": INPUT, "output_tokens": MAX_OUT}
        llm.reply("# Goal", {"strategies": [strategy(1), strategy(2), strategy(3)]}, **usage)
        for number in (1, 2, 3):
            llm.reply(f"F{number}-A:", edit("calc.py", FIXED_CALC), delay_seconds=2.0, **usage)
            llm.reply(f"F{number}-B:", edit("test_calc.py", MORE_TESTS), delay_seconds=0.5, **usage)
        root = make_project(tmp_path / "proj", config={
            "llm": {"openai_base_url": llm.openai_base_url, "max_output_tokens": MAX_OUT},
            "executor": {"parallel": 4},
        })
        env = cli_env(OPENAI_API_KEY="sk-test")

        halted = conductor(root, "explore", "Fix add", "--forks", "3", "--budget-tokens", str(BUDGET), "--json", env=env)
        assert halted.returncode == 14, halted.stderr
        report = json.loads(halted.stdout)
        calls_at_halt = {mark: llm.count(mark) for mark in MARKS}
        assert len(llm.requests) <= 4
        # The planner and the three first steps fit; no second step did.
        assert calls_at_halt == {"# Goal": 1, "F1-A:": 1, "F2-A:": 1, "F3-A:": 1, "F1-B:": 0, "F2-B:": 0, "F3-B:": 0}
        assert report["status"] == "halted" and report["reason"] == "budget"
        assert report["budget"]["unit"] == "tokens" and report["budget"]["limit"] == BUDGET

        layout = ProjectLayout(root)
        [plan_id] = layout.plan_ids()
        ledger = Ledger(layout.conductor_dir / "ledger.jsonl")
        spent = sum(e["input_tokens"] + e["output_tokens"] for e in ledger.entries() if e["kind"] == "call")
        assert spent == 4 * PER_CALL <= BUDGET
        # Nothing half-done: no step failed; a refused step waits in pending/ for the resume.
        refused = []
        for fork_id in ("1", "2", "3"):
            fork = layout.fork(plan_id, fork_id)
            assert not fork.task_ids("failed") and not fork.task_ids("in_progress")
            refused += [(fork_id, step) for step in fork.task_ids("pending")]
        assert refused and all(step == "step_002" for _, step in refused)
        events = json.loads(conductor(root, "events", "--json", env=env).stdout)
        exceeded = [e for e in events if e["type"] == "budget.exceeded"]
        assert exceeded and all(e["data"]["step_id"] == "step_002" for e in exceeded)
        assert [e["data"]["plan_tokens"] for e in events if e["type"] == "budget.set"] == [BUDGET]

        # The plan remembers its budget: a bare resume stops again at once, without a call.
        again = conductor(root, "resume", "--json", env=env)
        assert again.returncode == 14, again.stderr
        assert len(llm.requests) == 4

        resumed = conductor(root, "resume", "--budget-tokens", str(10 * PER_CALL), "--json", env=env)
        assert resumed.returncode == 0, resumed.stderr
        calls_after = {mark: llm.count(mark) for mark in MARKS}

    assert json.loads(resumed.stdout)["status"] == "succeeded"
    assert calls_after == dict.fromkeys(MARKS, 1)  # each call made once, over both runs
    for fork_id in ("1", "2", "3"):
        fork = layout.fork(plan_id, fork_id)
        assert fork.task_ids("completed") == ["step_001", "step_002"] and not fork.task_ids("failed")
    cost = json.loads(conductor(root, "cost", "--json", env=env).stdout)
    [plan] = cost["plans"]
    assert plan["plan_id"] == plan_id and plan["calls"] == 7 and plan["tokens"] == 7 * PER_CALL
    assert plan["held_calls"] == 0 and plan["budget"]["plan_tokens"] == 10 * PER_CALL
    assert [f["calls"] for f in plan["forks"]] == [2, 2, 2]  # the planner's call is the plan's, no fork's
    text = conductor(root, "cost", "--plan", plan_id, env={**env, "COLUMNS": "200"})
    assert text.returncode == 0 and "fork 3 step_002" in text.stdout, text.stdout
    print(text.stdout)
    all_chains_verify(root)


def test_a_usd_budget_without_a_price_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    root = make_project(tmp_path / "proj", config={"llm": {"openai_base_url": "http://127.0.0.1:9/v1"}})
    run = conductor(root, "build", "Fix add", "--budget-usd", "1", env=cli_env(OPENAI_API_KEY="sk-test"))
    assert run.returncode == 3, run.stderr
    assert "llm.prices.gpt-4.1-mini" in run.stderr
    assert ProjectLayout(root).plan_ids() == []


def test_a_planner_call_over_budget_is_not_made_and_no_plan_is_written(tmp_path: Path) -> None:
    # Port 9 (discard) would refuse the connection: a call made would be exit 6, not 14.
    root = make_project(tmp_path / "proj", config={"llm": {"openai_base_url": "http://127.0.0.1:9/v1"}})
    run = conductor(root, "build", "Fix add", "--budget-tokens", "1000", env=cli_env(OPENAI_API_KEY="sk-test"))
    assert run.returncode == 14, run.stderr
    assert "LLM budget of plan" in run.stderr and "the call was not made" in run.stderr
    assert ProjectLayout(root).plan_ids() == []
    assert not (root / ".conductor" / "ledger.jsonl").exists()
