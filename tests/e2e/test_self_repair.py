"""Self-repair from evidence, end to end (issue 11, part 1; issue 10, malformed results).

The real CLI runs in a subprocess against the sample project (a real pytest suite as the verification
command). A rejected attempt is archived and retried from the same base with the evidence of every earlier
attempt: the ``llm`` executor puts it in its prompt (the scripted server answers correctly only when the
prompt holds the failing test's output), a ``command`` executor reads it from ``$CONDUCTOR_TASK_FILE``.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import yaml

from conductor.audit import AuditLog
from conductor.handoff.documents import read_document
from conductor.layout import ProjectLayout
from conductor.models import Task
from tests.e2e.project import FIXED_CALC, all_chains_verify, cli_env, conductor, make_project, spawn
from tests.helpers.llm_server import ScriptedLLM, scripted_llm_server

WRONG_CALC = "def add(a, b):\n    return a * b\n"
FAILING_OUTPUT = "assert 6 == 5"  # what pytest prints for the wrong answer: add(2, 3) == 6
EVIDENCE = "Earlier attempts at this step were rejected"  # the prompt's evidence section
PLAN = {"strategies": [{"name": "fix", "description": "fix add", "steps": [
    {"id": "fix", "title": "Fix add", "instruction": "FIX: make add() in calc.py correct",
     "allowed_files": ["calc.py"], "depends_on": [], "confidence": 0.9}]}]}


def answer(content: str, summary: str) -> dict:
    return {"summary": summary, "explanation": f"{summary}.", "edits": [{"path": "calc.py", "action": "write",
                                                                        "content": content}]}


# The sample project's test, made to pass on the unfixed project too, so steps before the fix verify.
PATIENT_TEST = ("from calc import add\n\n\ndef test_add():\n    if add(2, 3) == -1:\n        return  # not fixed yet\n"
                "    assert add(2, 3) == 5\n")


def llm_project(root: Path, llm: ScriptedLLM, **config: dict) -> Path:
    root = make_project(root, config={"planner": {"provider": "openai", "model": "m-1"},
                                      "llm": {"openai_base_url": llm.openai_base_url}, **config})
    (root / "test_calc.py").write_text(PATIENT_TEST)
    return root


def fork_events(root: Path, plan_id: str, fork_id: str = "1") -> list:
    return AuditLog(ProjectLayout(root).fork(plan_id, fork_id).audit_log).events()


def first_plan(root: Path) -> str:
    (plan,) = ProjectLayout(root).plan_ids()
    return plan


def env() -> dict[str, str]:
    """The CLI's environment, built inside a test: an autouse fixture gives each test its own home."""
    return cli_env(OPENAI_API_KEY="sk-test-not-real")


THREE_STEPS = {"strategies": [{"name": "fix", "description": "note, fix, note", "steps": [
    {"id": "before", "title": "Note", "instruction": "BEFORE: write notes.txt", "allowed_files": ["notes.txt"],
     "depends_on": [], "confidence": 0.9},
    *[{**s, "depends_on": ["before"]} for s in PLAN["strategies"][0]["steps"]],
    {"id": "after", "title": "Note", "instruction": "AFTER: write done.txt", "allowed_files": ["done.txt"],
     "depends_on": ["fix"], "confidence": 0.9}]}]}


def note(path: str, text: str) -> dict:
    return {"summary": f"write {path}", "explanation": "as asked", "edits": [{"path": path, "action": "write",
                                                                              "content": text}]}


def test_a_step_whose_first_answer_fails_the_tests_is_repaired_from_the_test_output(tmp_path: Path) -> None:
    with scripted_llm_server() as llm:
        llm.reply("# Goal", THREE_STEPS)
        llm.reply("BEFORE:", note("notes.txt", "before\n"))
        llm.reply("AFTER:", note("done.txt", "after\n"))
        llm.reply(FAILING_OUTPUT, answer(FIXED_CALC, "Use + in add"))  # only a prompt holding the evidence
        llm.reply("FIX:", answer(WRONG_CALC, "Multiply in add"))
        root = llm_project(tmp_path / "proj", llm)
        run = conductor(root, "build", "Make add() correct", "--json", env=env())
        assert run.returncode == 0, run.stdout + run.stderr
        first_answers, repairs = llm.count("FIX:") - llm.count(EVIDENCE), llm.count(EVIDENCE)
        assert (first_answers, repairs) == (1, 1)
        repair_prompt = next(r.prompt for r in llm.requests if EVIDENCE in r.prompt)
        assert len(llm.requests) == 5  # plan, before, first answer, repair, after

        # A fork from the repaired step asks nothing new: what follows it is replayed from the recordings.
        forked = conductor(root, "fork", "--from", "step_002", "--fork", "1", "--json", env=env())
        assert forked.returncode == 0, forked.stdout + forked.stderr
        assert len(llm.requests) == 5
        # A fork from the step before runs the repair again, and builds the very same evidence (its prompt
        # differs only by the lesson fork 1's rejection taught: conductor.lessons).
        forked = conductor(root, "fork", "--from", "step_001", "--fork", "1", "--json", env=env())
        assert forked.returncode == 0, forked.stdout + forked.stderr

    report = json.loads(run.stdout)
    assert (root / "calc.py").read_text() == FIXED_CALC
    # The repair prompt carried the failing command, its output and the rejected diff.
    assert "pytest" in repair_prompt and "-    return a - b" in repair_prompt and "+    return a * b" in repair_prompt
    fork = ProjectLayout(root).fork(report["plan_id"], "1")
    accepted = read_document(fork.task_file("completed", "step_002"), Task)
    assert accepted.attempt == 2
    (evidence,) = accepted.previous_attempts
    assert evidence.attempt == 1 and evidence.outcome == "rejected" and evidence.files == ["calc.py"]
    assert evidence.reasons == [f"verification failed: {evidence.failed_command} exited 1"]
    assert FAILING_OUTPUT in evidence.output_tail and "+    return a * b" in evidence.diff
    first = read_document(fork.dir / "attempts" / "step_002.a1.task.json", Task)
    assert first.attempt == 1 and first.base_commit == accepted.base_commit  # the same base
    for suffix in (".result.json", ".verdict.json", ".explanation.md", ".provenance.json", ".evidence.json"):
        assert (fork.dir / "attempts" / f"step_002.a1{suffix}").is_file(), suffix
    rerun = read_document(ProjectLayout(root).fork(report["plan_id"], "3").task_file("completed", "step_002"), Task)
    assert rerun.attempt == 2 and rerun.previous_attempts == accepted.previous_attempts
    events = fork_events(root, report["plan_id"])
    (retried,) = [e for e in events if e.type == "task.retried"]
    assert retried.data["attempt"] == 1 and retried.data["next_attempt"] == 2 and retried.data["outcome"] == "rejected"
    assert [e.data.get("reason") for e in events if e.type == "task.published" and e.data["step_id"] == "step_002"] == [
        None, "repair"]
    calls = [e for e in events if e.type == "llm.call" and e.data["step_id"] == "step_002"]
    assert [(c.data["attempt"], c.data["cached"]) for c in calls] == [(1, False), (2, False)]
    cached = [e.data["cached"] for e in fork_events(root, report["plan_id"], "2") if e.type == "llm.call"]
    assert cached == [True]  # fork 2 ran only the last step, from its recording

    story = json.loads(conductor(root, "explain", "step_002", "--fork", "1", "--json").stdout)[0]
    assert [(a["attempt"], a["outcome"]) for a in story["attempts"]] == [(1, "rejected"), (2, "accepted")]
    assert story["attempts"][0]["summary"] == "Multiply in add"
    assert story["attempts"][0]["reasons"][0].startswith("verification failed")
    text = conductor(root, "explain", "step_002", "--fork", "1").stdout
    assert "attempt 1" in text and "attempt 2 (current)" in text and "Multiply in add" in text
    assert FAILING_OUTPUT in text
    replayed = json.loads(conductor(root, "replay", "--json").stdout)
    assert replayed["problems"] == []
    checked = conductor(root, "verify")
    assert checked.returncode == 0, checked.stdout
    all_chains_verify(root)


def test_resume_after_a_kill_during_the_repair_asks_nothing_twice(tmp_path: Path) -> None:
    with scripted_llm_server() as llm:
        llm.reply("# Goal", THREE_STEPS)
        llm.reply("BEFORE:", note("notes.txt", "before\n"))
        llm.reply("AFTER:", note("done.txt", "after\n"))
        # The first repair request hangs until the process is killed; the next one is answered at once.
        llm.reply(FAILING_OUTPUT, answer(FIXED_CALC, "Use + in add"), times=1, delay_seconds=60)
        llm.reply(FAILING_OUTPUT, answer(FIXED_CALC, "Use + in add"))
        llm.reply("FIX:", answer(WRONG_CALC, "Multiply in add"))
        root = llm_project(tmp_path / "proj", llm)
        proc = spawn(root, "build", "Make add() correct", "--json", env=env())
        try:
            killed_request = llm.wait_for(EVIDENCE, timeout=120)
            time.sleep(0.5)
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=30)
        assert (llm.count("# Goal"), llm.count("FIX:")) == (1, 2)

        resumed = conductor(root, "resume", "--json", env=env())
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        # The plan and the first answer were never asked again; the repair request, cut off unanswered by
        # the kill, was asked once more with the very same prompt (so it would have replayed a recording).
        assert (llm.count("# Goal"), llm.count("BEFORE:"), llm.count("FIX:") - llm.count(EVIDENCE),
                llm.count(EVIDENCE), llm.count("AFTER:")) == (1, 1, 1, 2, 1)
        again = [r for r in llm.requests if EVIDENCE in r.prompt]
        assert again[0].prompt == again[1].prompt == killed_request.prompt
        before = len(llm.requests)
        forked = conductor(root, "fork", "--from", "step_002", "--fork", "1", "--json", env=env())
        assert forked.returncode == 0, forked.stdout + forked.stderr
        assert len(llm.requests) == before

    assert (root / "calc.py").read_text() == FIXED_CALC
    plan_id = first_plan(root)
    fork = ProjectLayout(root).fork(plan_id, "1")
    accepted = read_document(fork.task_file("completed", "step_002"), Task)
    # attempt 2 died with its holder (its lease expired: a re-queue), attempt 3 carried the same evidence
    assert accepted.attempt == 3
    assert [(p.attempt, p.outcome) for p in accepted.previous_attempts] == [(1, "rejected")]
    events = [e for e in fork_events(root, plan_id) if e.data.get("step_id") == "step_002"]
    assert [e.data["attempt"] for e in events if e.type == "task.retried"] == [1]
    assert [e.data["attempt"] for e in events if e.type == "task.lease_expired"] == [2]
    assert [(e.data["attempt"], e.data.get("reason")) for e in events if e.type == "task.published"] == [
        (1, None), (2, "repair"), (3, "lease_expired")]
    all_chains_verify(root)


FIXER = """\
import json, os, pathlib
task = json.loads(pathlib.Path(os.environ["CONDUCTOR_TASK_FILE"]).read_text())
seen = {"attempt": task["attempt"], "previous": task["previous_attempts"], "constraints": task["constraints"]}
with open(os.environ["REPAIR_SEEN"], "a") as handle:
    handle.write(json.dumps(seen) + "\\n")
calc = pathlib.Path("calc.py")
if not task["previous_attempts"]:
    calc.write_text("def add(a, b):\\n    return a * b\\n")
    pathlib.Path("poetry.lock").write_text("relocked\\n")
else:
    calc.write_text("def add(a, b):\\n    return a + b\\n")
"""


def test_a_command_executor_reads_previous_attempts_from_its_task_file_and_fixes_the_step(tmp_path: Path) -> None:
    seen = tmp_path / "seen.jsonl"
    root = make_project(tmp_path / "proj", policy={"file_rules": {"protected_patterns": ["*.lock"]},
                                                   "sandbox": {"mode": "off"}})
    (tmp_path / "fixer.py").write_text(FIXER)
    (root / ".conductor" / "config.yaml").write_text(yaml.safe_dump({
        **yaml.safe_load((root / ".conductor" / "config.yaml").read_text()),
        "executor": {"kind": "command", "command": f"{sys.executable} {tmp_path / 'fixer.py'}", "poll_seconds": 0.5,
                     "env": ["REPAIR_SEEN"]}}))
    plan = root / "plan.yaml"
    plan.write_text(yaml.safe_dump({"goal": "Fix add", "strategies": [{"name": "fix", "steps": [
        {"id": "fix", "instruction": "fix add()", "allowed_files": ["calc.py"], "confidence": 0.9}]}]}))

    run = conductor(root, "build", "--plan", str(plan), "--json", env=cli_env(REPAIR_SEEN=str(seen)))

    assert run.returncode == 0, run.stdout + run.stderr
    assert (root / "calc.py").read_text() == FIXED_CALC and (root / "poetry.lock").read_text() == "locked\n"
    first, second = [json.loads(line) for line in seen.read_text().splitlines()]
    assert (first["attempt"], first["previous"]) == (1, [])
    assert second["attempt"] == 2
    (evidence,) = second["previous"]
    # Attempt 1 broke the policy (a protected file) before any test ran: told what it may not touch.
    assert evidence["outcome"] == "rejected" and evidence["forbidden"] == ["poetry.lock"]
    assert evidence["files"] == ["calc.py", "poetry.lock"]
    assert any("poetry.lock" in reason and "protected" in reason for reason in evidence["reasons"])
    assert any(c.startswith("Do NOT modify poetry.lock") for c in second["constraints"])
    assert "+relocked" in evidence["diff"]


def test_a_step_that_keeps_failing_fails_the_fork_after_max_attempts_with_every_attempt_explained(tmp_path: Path) -> None:
    with scripted_llm_server() as llm:
        llm.reply("# Goal", PLAN)
        llm.reply("FIX:", answer(WRONG_CALC, "Multiply in add"))
        root = llm_project(tmp_path / "proj", llm)
        (root / ".conductor" / "policy.yaml").write_text(yaml.safe_dump({
            "file_rules": {"protected_patterns": ["*.lock"]}, "behavior": {"max_attempts": 3}}))
        run = conductor(root, "build", "Make add() correct", "--json", env=env())
        assert llm.count("FIX:") == 3  # each repair prompt holds more evidence: a new request
        assert llm.count(EVIDENCE) == 2

    assert run.returncode == 1, run.stdout + run.stderr
    report = json.loads(run.stdout)
    assert report["status"] == "failed" and report["applied_fork"] is None
    assert (root / "calc.py").read_text() != FIXED_CALC
    fork = ProjectLayout(root).fork(report["plan_id"], "1")
    last = read_document(fork.task_file("failed", "step_001"), Task)
    assert last.attempt == 3 and last.max_attempts == 3
    assert [(p.attempt, p.outcome) for p in last.previous_attempts] == [(1, "rejected"), (2, "rejected")]
    events = fork_events(root, report["plan_id"])
    assert [e.data["attempt"] for e in events if e.type == "task.retried"] == [1, 2]
    assert [e.data for e in events if e.type == "fork.finished"][-1]["status"] == "failed"
    story = json.loads(conductor(root, "explain", "step_001", "--json").stdout)[0]
    assert [(a["attempt"], a["outcome"], a["archived"]) for a in story["attempts"]] == [
        (1, "rejected", True), (2, "rejected", True), (3, "rejected", False)]
    assert all(a["reasons"] and a["reasons"][0].startswith("verification failed") for a in story["attempts"])
    assert all(a["files"] == ["calc.py"] for a in story["attempts"])
    text = conductor(root, "explain", "step_001").stdout
    for n in (1, 2):
        assert f"attempt {n}: rejected" in text
    assert "attempt 3 (current): rejected" in text
    assert json.loads(conductor(root, "replay", "--json").stdout)["problems"] == []


def external_executor_with_a_bad_checksum(root: Path, plan_id: str) -> None:
    """An external executor that does the work but seals its result as ``json.dumps(sort_keys=True)`` would
    (issue 10): the result's checksum is wrong."""
    from conductor.canonical import pretty_bytes
    from conductor.handoff.lease import claim_task
    from conductor.layout import EXPLANATION_SUFFIX, RESULT_SUFFIX
    from conductor.models import ExecutorInfo, Result, utc_now

    fork = ProjectLayout(root).fork(plan_id, "1")
    claim = claim_task(fork, "step_001", holder="outsider", lease_seconds=60)
    assert claim is not None
    (root / claim.task.workspace / "calc.py").write_text(FIXED_CALC)
    now = utc_now()
    result = Result(task_id="step_001", plan_id=plan_id, fork_id="1", attempt=1, fencing_token=1,
                    task_checksum=claim.task.checksum, status="completed",
                    executor=ExecutorInfo(id="outsider", kind="outsider"), summary="fixed add", started_at=now,
                    finished_at=now).to_document()
    result["checksum"] = "sha256:" + hashlib.sha256(json.dumps(result, sort_keys=True).encode()).hexdigest()
    fork.sidecar("completed", "step_001", RESULT_SUFFIX).write_bytes(pretty_bytes(result))
    fork.sidecar("completed", "step_001", EXPLANATION_SUFFIX).write_text("fixed\n")
    os.rename(claim.task_path, fork.task_file("completed", "step_001"))
    fork.lease_file("step_001").unlink()


def test_a_malformed_result_is_a_failed_attempt_with_its_reason_and_is_retried(tmp_path: Path) -> None:
    from tests.e2e.test_handoff_and_errors import FIX, write_plan

    root = make_project(tmp_path / "proj", config={"executor": {"kind": "handoff", "poll_seconds": 0.5}})
    plan = write_plan(root, [{"id": "fix", "instruction": FIX, "allowed_files": ["calc.py"], "confidence": 0.9}])
    halted = conductor(root, "build", "--plan", str(plan), "--no-wait", "--json")
    assert halted.returncode == 11, halted.stdout + halted.stderr
    plan_id = json.loads(halted.stdout)["plan_id"]
    external_executor_with_a_bad_checksum(root, plan_id)

    resumed = conductor(root, "resume", "--no-wait", "--json")
    assert resumed.returncode == 11, resumed.stdout + resumed.stderr  # attempt 2 waits for an executor
    fork = ProjectLayout(root).fork(plan_id, "1")
    retry = read_document(fork.task_file("pending", "step_001"), Task)
    assert retry.attempt == 2
    (evidence,) = retry.previous_attempts
    assert evidence.outcome == "malformed" and evidence.reasons[0].startswith("invalid_result:")
    assert "checksum" in evidence.reasons[0]
    assert "+    return a + b" in evidence.diff  # the work itself was captured as evidence
    events = fork_events(root, plan_id)
    verified = [e.data for e in events if e.type == "step.verified"]
    assert [(v["attempt"], v["accepted"]) for v in verified] == [(1, False)]
    assert verified[0]["reasons"][0].startswith("invalid_result:")
    assert [(e.data["attempt"], e.data["outcome"]) for e in events if e.type == "task.retried"] == [(1, "malformed")]

    worker = conductor(root, "worker", "--burst", "--command", 'sh -c "$CONDUCTOR_INSTRUCTION"')
    assert worker.returncode == 0, worker.stderr
    finished = conductor(root, "resume", "--no-wait", "--json")
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert (root / "calc.py").read_text() == FIXED_CALC
    assert read_document(fork.task_file("completed", "step_001"), Task).attempt == 2
    story = json.loads(conductor(root, "explain", "step_001", "--json").stdout)[0]
    assert [(a["attempt"], a["outcome"]) for a in story["attempts"]] == [(1, "malformed"), (2, "accepted")]
    assert json.loads(conductor(root, "replay", "--json").stdout)["problems"] == []


def test_verify_checks_the_attempts_a_repair_archived(tmp_path: Path) -> None:
    """An archived attempt is a record like any other: verify reads it back, and names an altered result
    or evidence file of it (exit 5)."""
    seen = tmp_path / "seen.jsonl"
    root = make_project(tmp_path / "proj", policy={"file_rules": {"protected_patterns": ["*.lock"]},
                                                   "sandbox": {"mode": "off"}})
    (tmp_path / "fixer.py").write_text(FIXER)
    (root / ".conductor" / "config.yaml").write_text(yaml.safe_dump({
        **yaml.safe_load((root / ".conductor" / "config.yaml").read_text()),
        "executor": {"kind": "command", "command": f"{sys.executable} {tmp_path / 'fixer.py'}", "poll_seconds": 0.5,
                     "env": ["REPAIR_SEEN"]}}))
    plan = root / "plan.yaml"
    plan.write_text(yaml.safe_dump({"goal": "Fix add", "strategies": [{"name": "fix", "steps": [
        {"id": "fix", "instruction": "fix add()", "allowed_files": ["calc.py"], "confidence": 0.9}]}]}))
    assert conductor(root, "build", "--plan", str(plan), "--json", env=cli_env(REPAIR_SEEN=str(seen))).returncode == 0
    witness = str(tmp_path / "witness.json")

    clean = conductor(root, "verify", "--json", "--witness", witness)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert json.loads(clean.stdout)["checked"]["archived_attempts"] == 1

    (archived,) = (root / ".conductor" / "handoff").glob("plan_*/fork_1/attempts/step_001.a1.result.json")
    result = json.loads(archived.read_text())
    archived.write_text(json.dumps({**result, "summary": "nothing to see here"}))
    evidence = archived.with_name("step_001.a1.evidence.json")
    evidence.write_text(evidence.read_text().replace("poetry.lock", "poetry.lokc"))
    tampered = conductor(root, "verify", "--json", "--witness", witness)
    assert tampered.returncode == 5
    named = {finding["where"].rsplit("/", 1)[-1] for finding in json.loads(tampered.stdout)["findings"]}
    assert named == {"step_001.a1.result.json", "step_001.a1.evidence.json"}, tampered.stdout
