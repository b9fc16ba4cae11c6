"""Handoff planning: a planning task published, claimed, answered, judged, re-offered with reasons, given up.

The planning folder follows the step tasks' discipline (checksummed documents, claims by rename, leases,
fencing under a lock); these tests play the agent (and the attacker) against Conductor's waiting side,
`PlanningRound`, and finally against the real `conductor explore --planner handoff` in a subprocess.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import jsonschema
import pytest
import yaml

from conductor.audit import verify_chain
from conductor.errors import ChecksumMismatch, ConfigError, LeaseLost, NotFound
from conductor.handoff.documents import read_document
from conductor.handoff.planning import (
    PlanningFailed,
    PlanningLayout,
    PlanningRound,
    PlanningTask,
    PlanningVerdict,
    answer_planning,
    claim_planning,
    planning_tasks,
    project_facts,
    read_verdict,
    release_planning,
    renew_planning,
    show_planning,
)
from conductor.layout import ProjectLayout
from conductor.models import PolicyLayer
from conductor.project import init_project
from tests.e2e.project import cli_env, conductor, make_project, spawn

GOOD = {"strategies": [
    {"name": "fix", "description": "fix the operator", "steps": [
        {"id": "fix", "title": "Fix add", "instruction": "Make add return a + b", "allowed_files": ["calc.py"],
         "confidence": 0.9}]},
    {"name": "rewrite", "steps": [
        {"instruction": "Rewrite add with sum()", "allowed_files": ["calc.py"]}]},
]}
POLICY = PolicyLayer.model_validate({"file_rules": {"protected_patterns": ["*.lock"]}})


@pytest.fixture
def project(tmp_path: Path) -> ProjectLayout:
    (tmp_path / "calc.py").write_text("def add(a, b):\n    return a - b\n")
    (tmp_path / "poetry.lock").write_text("locked\n")
    init_project(tmp_path)
    return ProjectLayout(tmp_path)


def new_round(project: ProjectLayout, **options: object) -> PlanningRound:
    settings: dict = {"max_attempts": 3, "lease_seconds": 60, "timeout_seconds": 600, "strategies": 2}
    settings.update(options)
    facts = project_facts(project.root, policy=POLICY, verification=["pytest -q"])
    return PlanningRound(project, plan_id="20261126T100000-abcd", goal="Fix add", facts=facts, project_policy=POLICY,
                         **settings)  # type: ignore[arg-type]


def answer(project: ProjectLayout, plan: object, *, holder: str = "agent-a", fmt: str = "json") -> int:
    data = json.dumps(plan).encode() if fmt == "json" else yaml.safe_dump(plan).encode()
    return answer_planning(project, "20261126T100000-abcd", holder=holder, answer=data, fmt=fmt)


def events(round_: PlanningRound) -> list[str]:
    return [e.type for e in round_.layout.audit_log.events()]


def test_the_published_task_carries_goal_schema_facts_and_a_checksum(project: ProjectLayout) -> None:
    round_ = new_round(project)
    task = round_.publish(1)
    path = round_.layout.task_file("pending", 1)
    assert read_document(path, PlanningTask) == task  # strict read, checksum verified
    assert task.goal == "Fix add" and task.strategies == 2 and task.max_attempts == 3
    assert task.facts.files == ["calc.py", "poetry.lock"] and task.facts.languages == ["Python"]
    assert task.facts.verification_commands == ["pytest -q"]
    assert task.facts.policy.protected_patterns == ["*.lock"]
    assert task.plan_schema["properties"]["strategies"]["type"] == "array"
    # the schema an agent gets describes the plans Conductor accepts
    jsonschema.Draft202012Validator.check_schema(task.plan_schema)
    jsonschema.validate(GOOD, task.plan_schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"strategies": [{"name": "x", "steps": [{"instruction": "y", "allowed": []}]}]}, task.plan_schema)
    assert "conductor task complete planning" in task.instruction
    # A task file edited by hand fails its checksum: the agent's claim refuses it and it fails, audited.
    document = json.loads(path.read_text())
    document["goal"] = "Delete everything"
    path.write_text(json.dumps(document))
    with pytest.raises(ChecksumMismatch):
        read_document(path, PlanningTask)
    assert claim_planning(project, holder="agent-a", lease_seconds=60) is None
    assert round_.layout.attempts("failed") == [1]
    verdict = read_verdict(project, round_.layout.plan_id, 1)
    assert verdict is not None and "invalid planning task" in verdict.reasons[0]
    assert events(round_)[-1] == "planning.failed"


def test_a_plan_outside_policy_is_rejected_with_reasons_and_the_next_attempt_accepted(project: ProjectLayout) -> None:
    round_ = new_round(project)
    round_.publish(1)
    claim = claim_planning(project, holder="agent-a", lease_seconds=60)
    assert claim is not None and claim.task.attempt == 1 and claim.to_json()["kind"] == "planning"
    bad = {"strategies": [{"name": "escape", "steps": [
        {"instruction": "edit it", "allowed_files": ["../outside.py"]}]}]}
    assert answer(project, bad) == 1
    assert round_.process_once() is None
    # attempt 1: failed with its answer and its reasons; attempt 2 pending, carrying them
    verdict = read_document(round_.layout.verdict_file("failed", 1), PlanningVerdict)
    assert not verdict.accepted and verdict.next_attempt == 2 and verdict.holder == "agent-a"
    assert verdict.reasons == ["a1.answer.json:1: strategies[0].steps[0].allowed_files[0]: unsafe path '../outside.py': "
                               "has a '..' component (escapes the workspace) (strategy 'escape', step 1)"]
    assert round_.layout.answer_file("failed", 1) is not None
    assert round_.layout.attempts("pending") == [2]
    offered = read_document(round_.layout.task_file("pending", 2), PlanningTask)
    assert [r.attempt for r in offered.previous_rejections] == [1]
    assert offered.previous_rejections[0].reasons == verdict.reasons
    # a protected path (poetry.lock under '*.lock') is a policy rejection
    claim_planning(project, holder="agent-a", lease_seconds=60)
    protected = {"strategies": [{"name": "lock", "steps": [{"instruction": "bump", "allowed_files": ["poetry.lock"]}]}]}
    answer(project, protected, fmt="yaml")
    assert round_.process_once() is None
    third = read_document(round_.layout.task_file("pending", 3), PlanningTask)
    assert "'poetry.lock' is protected by the policy" in third.previous_rejections[1].reasons[0]
    # the third answer is good: accepted, the plan built from it
    assert claim_planning(project, holder="agent-b", lease_seconds=60) is not None
    answer(project, GOOD, holder="agent-b")
    plan = round_.process_once()
    assert plan is not None and plan.plan_id == round_.layout.plan_id and plan.goal == "Fix add"
    assert plan.planner.kind == "handoff" and plan.planner.source.endswith("completed/a3.answer.json")
    assert [f.strategy.name for f in plan.forks] == ["fix", "rewrite"]
    assert plan.forks[0].steps[0].allowed_files == ["calc.py"] and plan.forks[0].steps[0].confidence_estimate == 0.9
    assert read_verdict(project, round_.layout.plan_id, 3).accepted  # type: ignore[union-attr]
    assert round_.accepted is not None and round_.accepted[0] == 3
    assert events(round_) == [
        "planning.published", "planning.claimed", "planning.answered", "planning.rejected",
        "planning.published", "planning.claimed", "planning.answered", "planning.rejected",
        "planning.published", "planning.claimed", "planning.answered", "planning.accepted"]
    assert verify_chain(round_.layout.dir / "audit.log").ok


def test_a_schema_error_names_the_key_and_line(project: ProjectLayout) -> None:
    round_ = new_round(project)
    round_.publish(1)
    text = b"strategies:\n  - name: one\n    stepz:\n      - instruction: x\n"
    answer_planning(project, round_.layout.plan_id, holder="agent-a", answer=text, fmt="yaml")  # no claim needed
    assert round_.process_once() is None
    reasons = read_verdict(project, round_.layout.plan_id, 1).reasons  # type: ignore[union-attr]
    assert "a1.answer.yaml:3: strategies[0].stepz: unknown key (known: name, description, steps)" in reasons, reasons
    assert any("steps" in r for r in reasons), reasons
    # not JSON at all, as JSON
    answer_planning(project, round_.layout.plan_id, holder="agent-a", answer=b"{not json", fmt="json")
    assert round_.process_once() is None
    assert read_verdict(project, round_.layout.plan_id, 2).reasons  # type: ignore[union-attr]


def test_every_attempt_rejected_is_a_clear_error_listing_the_reasons(project: ProjectLayout) -> None:
    round_ = new_round(project, max_attempts=2)
    round_.publish(1)
    absolute = {"strategies": [{"name": "x", "steps": [{"instruction": "y", "allowed_files": ["/etc/passwd"]}]}]}
    answer(project, absolute)
    assert round_.process_once() is None  # the first rejection re-offers
    answer(project, absolute)
    with pytest.raises(PlanningFailed) as info:
        round_.process_once()
    message = str(info.value)
    assert "every answer was rejected (2 of 2 attempts)" in message
    assert message.count("absolute") == 2 and "attempt 1:" in message and "attempt 2:" in message
    assert info.value.exit_code == 8
    assert round_.layout.live() is None and round_.layout.attempts("failed") == [1, 2]
    assert events(round_)[-2:] == ["planning.rejected", "planning.failed"]


def test_nobody_answering_times_out_and_withdraws_the_task(project: ProjectLayout) -> None:
    now = [0.0]
    round_ = new_round(project, timeout_seconds=30, clock=lambda: now[0])
    round_.publish(1)
    assert claim_planning(project, holder="agent-a", lease_seconds=60) is not None
    assert round_.process_once() is None
    now[0] = 31.0
    with pytest.raises(PlanningFailed, match="no acceptable plan within 30 s"):
        round_.process_once()
    assert round_.layout.live() is None and round_.layout.attempts("failed") == [1]
    assert not round_.layout.lease_file(1).exists()
    # the agent that still held it learns so, and writes nothing
    with pytest.raises(NotFound, match="no planning task waits"):
        answer(project, GOOD)
    assert round_.layout.answer_file("completed", 1) is None
    assert events(round_)[-1] == "planning.failed"


def test_leases_fence_answers_and_an_expired_one_is_re_offered(project: ProjectLayout) -> None:
    round_ = new_round(project, lease_seconds=1)
    round_.publish(1)
    assert claim_planning(project, holder="agent-a", lease_seconds=60) is not None  # long: fencing first
    with pytest.raises(LeaseLost, match="held by agent-a, not agent-b"):
        answer(project, GOOD, holder="agent-b")
    with pytest.raises(LeaseLost):
        release_planning(project, round_.layout.plan_id, holder="agent-b")
    assert renew_planning(project, round_.layout.plan_id, holder="agent-a", lease_seconds=0.2).holder == "agent-a"
    time.sleep(0.4)
    assert round_.process_once() is None  # the reaper: back to pending, same attempt
    assert round_.layout.attempts("pending") == [1]
    assert events(round_)[-1] == "planning.lease_expired"
    assert round_.layout.audit_log.events()[-1].data == {"attempt": 1, "holder": "agent-a", "why": "lease_expired"}
    # agent-b claims it now; agent-a's late answer is refused (a zombie writes nothing)
    assert claim_planning(project, holder="agent-b", lease_seconds=60) is not None
    with pytest.raises(LeaseLost, match="held by agent-b"):
        answer(project, GOOD, holder="agent-a")
    assert release_planning(project, round_.layout.plan_id, holder="agent-b") == 1
    assert events(round_)[-1] == "planning.released"
    assert [row["state"] for row in planning_tasks(project)] == ["pending"]
    # a lapsed claim nobody took over is taken back by its holder's answer
    answer(project, GOOD, holder="agent-a")
    assert round_.process_once() is not None
    assert show_planning(project, round_.layout.plan_id)[1] == "completed"


def test_an_answer_is_bounded_and_its_format_known(project: ProjectLayout) -> None:
    round_ = new_round(project)
    round_.publish(1)
    with pytest.raises(ConfigError, match="expected json or yaml"):
        answer_planning(project, round_.layout.plan_id, holder="a", answer=b"{}", fmt="toml")
    with pytest.raises(ConfigError, match="larger than"):
        answer_planning(project, round_.layout.plan_id, holder="a", answer=b" " * (4 * 1024 * 1024 + 1), fmt="json")
    assert round_.layout.attempts("pending") == [1] and not list((round_.layout.dir / "completed").iterdir())
    with pytest.raises(NotFound):
        claim_planning(project, "no-such-plan", holder="a", lease_seconds=60)


def test_layout_paths(project: ProjectLayout) -> None:
    layout = PlanningLayout(project, "p1")
    assert layout.dir == project.root / ".conductor" / "handoff" / "planning_p1"
    assert layout.task_file("pending", 2).name == "a2.planning.json"
    assert project.plan_ids() == []  # a planning folder is not a plan


# --- the real CLI ---------------------------------------------------------------------------------


def test_explore_with_the_handoff_planner_answered_through_conductor_task(tmp_path: Path) -> None:
    """The agent's side through the real CLI only: `conductor task claim` offers the planning task first,
    `conductor task complete planning --plan-file F` answers it (exit 1 and the reasons when rejected)."""
    root = make_project(tmp_path / "proj")
    layout = ProjectLayout(root)
    env = cli_env(CONDUCTOR_HOLDER="cli-agent")
    process = spawn(root, "explore", "Fix add so the tests pass", "--planner", "handoff", "--executor", "handoff",
                    "--forks", "2", "--no-wait", "--planner-timeout", "300", env=env)
    try:
        claimed = conductor(root, "task", "claim", "planning", "--wait", "120", "--json", env=env)
        assert claimed.returncode == 0, claimed.stderr
        task = json.loads(claimed.stdout)
        assert (task["kind"], task["task_id"], task["attempt"], task["holder"]) == ("planning", "planning", 1, "cli-agent")
        assert task["strategies"] == 2 and task["goal"] == "Fix add so the tests pass"
        plan_id = task["plan_id"]
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"polcy": {}, "strategies": [
            {"name": "escape", "steps": [{"instruction": "x", "allowed_files": ["../../etc/passwd"]}]}]}))
        answered = conductor(root, "task", "complete", "planning", "--plan-file", str(bad), env=env)
        assert answered.returncode == 1, answered.stderr
        assert f"plan {plan_id}, planning attempt 1: rejected" in answered.stdout
        assert "polcy: unknown key" in answered.stdout and "next: attempt 2 waits" in answered.stdout
        verdict = read_verdict(layout, plan_id, 1)
        assert verdict is not None and not verdict.accepted and verdict.next_attempt == 2
        listed = json.loads(conductor(root, "task", "list", "--json", env=env).stdout)
        assert [(r["plan_id"], r["state"], r["attempt"]) for r in listed["planning"]] == [(plan_id, "pending", 2)]
        assert listed["tasks"] == []
        again = conductor(root, "task", "claim", "--json", env=env)  # no TASK: the planning task is offered first
        assert again.returncode == 0, again.stderr
        task = json.loads(again.stdout)
        assert task["attempt"] == 2 and task["previous_rejections"][0]["reasons"] == verdict.reasons
        shown = conductor(root, "task", "show", "planning", env=env)
        assert shown.returncode == 0 and "attempt 1 was rejected:" in shown.stdout, shown.stderr
        good = tmp_path / "plan.yaml"
        good.write_text(yaml.safe_dump(GOOD))
        answered = conductor(root, "task", "complete", "planning", "--plan", plan_id, "--plan-file", str(good), "--json",
                             env=env)
        assert answered.returncode == 0, answered.stderr
        assert json.loads(answered.stdout) == {"kind": "planning", "task_id": "planning", "plan_id": plan_id,
                                               "attempt": 2, "verdict": "accepted", "reasons": [], "next_attempt": None}
        out, err = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 11, err  # planned; the steps wait for an external executor (--no-wait)
    assert "planning task published" in err
    plan = json.loads((layout.plan_dir(plan_id) / "plan.json").read_text())
    assert plan["planner"] == {"kind": "handoff", "model": None, "provider": None,
                               "source": f".conductor/handoff/planning_{plan_id}/completed/a2.answer.yaml"}
    assert [f["strategy"]["name"] for f in plan["forks"]] == ["fix", "rewrite"]
    plan_events = [json.loads(line) for line in (layout.plan_dir(plan_id) / "audit.log").read_text().splitlines()]
    assert [e["type"] for e in plan_events][:2] == ["plan.created", "planning.accepted"]
    assert plan_events[1]["data"]["rejected_attempts"] == [1] and plan_events[1]["data"]["holder"] == "cli-agent"
    for log in (layout.plan_dir(plan_id) / "audit.log", PlanningLayout(layout, plan_id).dir / "audit.log"):
        assert verify_chain(log).ok
    assert os.listdir(layout.fork(plan_id, "1").state_dir("pending")) == ["step_001.task.json"]
    # nothing left to answer: a late answer is refused, writing nothing
    late = conductor(root, "task", "complete", "planning", "--plan", plan_id, "--plan-file", str(good), env=env)
    assert late.returncode == 9 and "no planning task waits" in late.stderr
    # verify reads the planning log too, and names an edited line of it
    witness = str(tmp_path / "witness.json")
    checked = json.loads(conductor(root, "verify", "--json", "--witness", witness, env=env).stdout)["checked"]
    assert checked["planning_logs"] == 1
    planning_log = PlanningLayout(layout, plan_id).dir / "audit.log"
    planning_log.write_text(planning_log.read_text().replace('"holder":"cli-agent"', '"holder":"someone-else"', 1))
    edited = conductor(root, "verify", "--json", "--witness", witness, env=env)
    assert edited.returncode == 5
    assert any(f["where"].endswith(f"planning_{plan_id}/audit.log") for f in json.loads(edited.stdout)["findings"])


def test_explore_with_the_handoff_planner_fails_clearly_when_nobody_answers(tmp_path: Path) -> None:
    root = make_project(tmp_path / "proj")
    run = conductor(root, "build", "Fix add", "--planner", "handoff", "--executor", "handoff", "--planner-timeout", "1")
    assert run.returncode == 8, run.stderr
    assert "handoff planning of plan" in run.stderr and "no acceptable plan within 1 s" in run.stderr
    layout = ProjectLayout(root)
    assert layout.plan_ids() == []
    (plan_id,) = [p.name.removeprefix("planning_") for p in layout.handoff_dir.glob("planning_*")]
    verdict = read_verdict(layout, plan_id, 1)
    assert verdict is not None and verdict.reasons == ["timeout: no acceptable plan within 1 s"]


def test_a_planning_task_whose_conductor_died_is_withdrawn_not_offered(tmp_path: Path) -> None:
    root = make_project(tmp_path / "proj")
    layout = ProjectLayout(root)
    process = spawn(root, "explore", "Fix add", "--planner", "handoff", "--executor", "handoff", env=cli_env())
    try:
        deadline = time.monotonic() + 120
        while not planning_tasks(layout):
            assert time.monotonic() < deadline and process.poll() is None, process.communicate()
            time.sleep(0.05)
        (row,) = planning_tasks(layout)
        process.kill()  # as a crash would: no withdrawal of its own
        process.communicate()
        assert claim_planning(layout, holder="late-agent", lease_seconds=60) is None
        assert planning_tasks(layout) == []
        verdict = read_verdict(layout, row["plan_id"], 1)
        assert verdict is not None and verdict.reasons == [
            f"abandoned: the conductor process waiting for it (pid {process.pid}) is gone"]
        log = PlanningLayout(layout, row["plan_id"]).audit_log.events()
        assert (log[-1].type, log[-1].data["reason"]) == ("planning.failed", "abandoned")
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
