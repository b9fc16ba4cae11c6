"""Issue 10, part 5: what an external executor does and what Conductor's views say about it agree.

Each test plays the executor (the minimal executor of docs/protocol.md, run as its own process, or a
hand-written one) or the attacker (a task file tampered while it waits), then asks ``replay``,
``explain``, ``verify`` and ``handoff-metrics`` through the real CLI.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_protocol_doc import conductor, executor, handoff_dir, project, run_executor

__all__ = ["executor", "project"]  # fixtures, imported for pytest


def _json(project: Path, *args: str, code: int = 0) -> object:
    done = conductor(project, *args, "--json")
    assert done.returncode == code, done.stdout + done.stderr
    return json.loads(done.stdout)


def _one_attempt(project: Path) -> None:
    """Make a failed or rejected attempt final (no retry), so its task file stays in failed/."""
    config = project / ".conductor" / "config.yaml"
    text = config.read_text()
    assert "max_attempts: 3" in text
    config.write_text(text.replace("max_attempts: 3", "max_attempts: 1", 1))


def _tamper_and_reject(project: Path, executor: Path) -> Path:
    """Tamper fork 1's pending task, let the external executor reject it (and run fork 2's), resume."""
    _one_attempt(project)
    task_file = handoff_dir(project) / "fork_1" / "pending" / "step_001.task.json"
    task_file.write_text(task_file.read_text().replace("sed -i", "rm -f greet.py; sed -i"))
    run_executor(project, executor)
    resumed = _json(project, "resume", "--executor", "handoff", "--no-wait")
    assert resumed["applied_fork"] == "2"
    return handoff_dir(project) / "fork_1" / "failed" / "step_001.task.json"


@pytest.mark.slow
def test_an_external_rejection_is_audited_and_replay_explain_verify_agree(project: Path, executor: Path) -> None:
    rejected = _tamper_and_reject(project, executor)
    events = _json(project, "events", "--type", "task.rejected")
    assert len(events) == 1
    data = events[0]["data"]
    assert events[0]["log"] == "fork 1"
    assert (data["step_id"], data["attempt"], data["kind"]) == ("step_001", 1, "checksum_mismatch")
    assert data["by"].startswith("mini@")

    replayed = _json(project, "replay")
    step = replayed["state"]["forks"]["1"]["steps"]["step_001"]
    assert step["state"] == "failed" and "checksum_mismatch" in step["reasons"][0]
    assert replayed["problems"] == [] and replayed["behind"] == []
    assert replayed["state"]["forks"]["1"]["status"] == "failed"

    (story,) = _json(project, "explain", "step_001", "--fork", "1")
    assert story["state"] == "failed"
    assert story["rejection"]["kind"] == "checksum_mismatch" and story["rejection"]["by"] == data["by"]
    # The tampered file still claims the published checksum in its field; its content does not match it.
    assert story["task"]["checksum"] == story["published_checksum"] != story["task_content_checksum"]
    told = conductor(project, "explain", "step_001", "--fork", "1").stdout
    assert "DIFFERS FROM the published" in told and "task file rejected by mini@" in told
    (good,) = _json(project, "explain", "step_001", "--fork", "2")
    assert good["task_content_checksum"] == good["published_checksum"]

    verified = _json(project, "verify", "--no-witness")
    assert verified["ok"] is True, verified["findings"]
    assert [n["where"] for n in verified["notices"]] == [str(rejected.relative_to(project))]
    assert "checksum_mismatch" in verified["notices"][0]["notice"]
    text = conductor(project, "verify", "--no-witness")
    assert text.returncode == 0 and "NOTE " in text.stdout and "FAIL" not in text.stdout

    # The attacker edits the rejected file afterwards: that is no longer what the log recorded.
    rejected.write_text(rejected.read_text().replace("rm -f", "rm -rf"))
    verified = _json(project, "verify", "--no-witness", code=5)
    assert any("changed since its rejection" in f["problem"] for f in verified["findings"])


@pytest.mark.slow
def test_with_retries_the_views_still_agree_after_a_rejection(project: Path, executor: Path) -> None:
    """Whatever the engine does after a rejection (retry it, or fail the step), the log and the folders
    tell one story, and verify passes."""
    task_file = handoff_dir(project) / "fork_1" / "pending" / "step_001.task.json"
    task_file.write_text(task_file.read_text().replace("sed -i", "rm -f greet.py; sed -i"))
    run_executor(project, executor)
    conductor(project, "resume", "--executor", "handoff", "--no-wait")
    assert len(_json(project, "events", "--type", "task.rejected")) == 1
    replayed = _json(project, "replay")
    assert replayed["problems"] == [] and replayed["behind"] == []
    step = replayed["state"]["forks"]["1"]["steps"]["step_001"]
    found = [state for state in ("pending", "failed") if (task_file.parent.parent / state / task_file.name).exists()]
    assert found == [step["state"]]
    (story,) = _json(project, "explain", "step_001", "--fork", "1")
    assert story["state"] == step["state"]
    assert _json(project, "verify", "--no-witness")["ok"] is True


@pytest.mark.slow
def test_a_rejection_no_event_records_fails_verify(project: Path) -> None:
    """A task file in failed/ that nobody's rejection accounts for (moved there by hand) is a finding."""
    fork = handoff_dir(project) / "fork_1"
    task_file = fork / "pending" / "step_001.task.json"
    task_file.write_text(task_file.read_text().replace("sed -i", "rm -f greet.py; sed -i"))
    task_file.rename(fork / "failed" / task_file.name)
    verified = _json(project, "verify", "--no-witness", code=5)
    assert any("no task.rejected event records its rejection" in f["problem"] for f in verified["findings"])


@pytest.mark.slow
def test_conductor_worker_rejection_is_one_task_rejected_event(project: Path) -> None:
    """Conductor's own claimer (``conductor worker``) logs the rejection itself; resume adds nothing."""
    fork = handoff_dir(project) / "fork_1"
    task_file = fork / "pending" / "step_001.task.json"
    task_file.write_text(task_file.read_text().replace('"attempt": 1,', '"attempt": 1, "attempt": 1,'))
    _one_attempt(project)
    worked = conductor(project, "worker", "--burst", "--command", "true")
    assert worked.returncode == 0, worked.stderr
    conductor(project, "resume", "--executor", "handoff", "--no-wait")  # fork 2's task ran `true`: whatever its fate
    events = _json(project, "events", "--type", "task")
    rejections = [e for e in events if e["type"] == "task.rejected"]
    assert len(rejections) == 1 and rejections[0]["data"]["kind"] == "invalid_task"
    assert rejections[0]["data"]["by"].startswith("conductor-worker@")
    assert not [e for e in events if e["type"] == "task.failed" and e["data"]["step_id"] == "step_001"
                and e["log"] == "fork 1"]
    replayed = _json(project, "replay")
    assert replayed["state"]["forks"]["1"]["steps"]["step_001"]["state"] == "failed"
    assert replayed["problems"] == []
    verified = _json(project, "verify", "--no-witness")
    assert verified["ok"] is True and len(verified["notices"]) == 1


# --- handoff-metrics counts what the verifier accepted ------------------------------------------


@pytest.mark.slow
def test_handoff_metrics_count_an_external_executors_verified_steps(project: Path, executor: Path) -> None:
    for _ in range(4):  # fork 1's second step is published once its first is verified
        run_executor(project, executor)
        resumed = conductor(project, "resume", "--executor", "handoff", "--no-wait", "--json")
        if resumed.returncode != 11:
            break
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    totals = _json(project, "handoff-metrics")["totals"]
    assert totals["attempts"] == {"completed": 3, "failed": 0}
    assert totals["success_rate"] == 1.0
    assert totals["tasks"]["completed"] == 3 and totals["task_rejections"] == 0
    table = conductor(project, "handoff-metrics")
    assert "success_rate" in table.stdout and "1.0" in table.stdout


@pytest.mark.slow
def test_handoff_metrics_after_an_external_rejection(project: Path, executor: Path) -> None:
    _tamper_and_reject(project, executor)
    plan = next(iter(_json(project, "handoff-metrics")["plans"].values()))
    rejected, accepted = plan["forks"]["1"], plan["forks"]["2"]
    assert rejected["task_rejections"] == 1 and rejected["success_rate"] is None  # nothing was executed
    assert accepted["attempts"] == {"completed": 1, "failed": 0} and accepted["success_rate"] == 1.0


def test_an_external_executors_failure_counts_as_a_failed_attempt(project: Path, tmp_path: Path) -> None:
    """An executor that fails a task by its own result: the engine logs task.failed from that result,
    and the metrics count it (with the result's duration)."""
    _one_attempt(project)
    script = tmp_path / "fail.py"
    script.write_text(FAILING_EXECUTOR)
    run_executor(project, script)
    conductor(project, "resume", "--executor", "handoff", "--no-wait")
    failed = [e for e in _json(project, "events", "--type", "task.failed") if e["log"] == "fork 1"]
    assert [(e["data"]["reason"], e["data"]["executor"], e["data"]["duration_seconds"]) for e in failed] == [
        ("command_failed", "failer@x", 2.5)]
    fork = next(iter(_json(project, "handoff-metrics")["plans"].values()))["forks"]["1"]
    assert fork["attempts"] == {"completed": 0, "failed": 1} and fork["success_rate"] == 0.0
    assert fork["duration_seconds"]["count"] == 1 and fork["duration_seconds"]["mean"] == 2.5
    replayed = _json(project, "replay")
    assert replayed["state"]["forks"]["1"]["steps"]["step_001"]["state"] == "failed"
    assert replayed["problems"] == [] and replayed["behind"] == []


# Fails fork 1's first task by the protocol (claim, result, rename), using Conductor's own sealing only
# to stay short: the point is what the engine does with it.
FAILING_EXECUTOR = '''
import json, os, sys
from pathlib import Path
from conductor.canonical import seal
root = Path(sys.argv[1])
(fork,) = root.glob(".conductor/handoff/plan_*/fork_1")
pending = fork / "pending" / "step_001.task.json"
claimed = fork / "in_progress" / pending.name
os.rename(pending, claimed)
task = json.loads(claimed.read_text())
result = {"schema": "conductor.result/v1", "task_id": "step_001", "plan_id": task["plan_id"], "fork_id": "1",
          "attempt": 1, "fencing_token": 1, "task_checksum": task["checksum"], "status": "failed",
          "executor": {"id": "failer@x", "kind": "failer"}, "files_changed": [], "summary": "gave up",
          "error": {"kind": "command_failed", "message": "tests failed"},
          "started_at": "2026-01-01T00:00:00.000000Z", "finished_at": "2026-01-01T00:00:02.500000Z",
          "usage": {"input_tokens": 0, "output_tokens": 0, "cost_usd": None}}
(fork / "failed" / "step_001.result.json").write_text(json.dumps(seal(result), indent=2))
os.rename(claimed, fork / "failed" / pending.name)
'''


# --- ranking ------------------------------------------------------------------------------------


def _evidence(fork_id: str, status: str, verified: int, total: int, *, checks: bool = False, lines: int = 10,
              tokens: int = 0):  # type: ignore[no-untyped-def]
    from conductor.ranking import ForkEvidence

    return ForkEvidence(fork_id=fork_id, strategy=f"s{fork_id}", status=status, steps_verified=verified,
                        steps_total=total, checks_passed=checks, changed_lines=lines, changed_files=1, tokens=tokens)


def test_ranking_puts_more_verified_steps_first() -> None:
    from conductor.ranking import rank

    forks = [
        _evidence("1", "failed", 0, 3, lines=0),       # nothing done: an empty diff is no merit
        _evidence("2", "failed", 1, 2, lines=50),
        _evidence("3", "failed", 1, 3, lines=5),
        _evidence("4", "failed", 2, 5, lines=500),     # more steps verified beats a larger share
        _evidence("5", "succeeded", 2, 2, checks=False, lines=1),
        _evidence("6", "succeeded", 1, 1, checks=True, lines=40),
        _evidence("7", "succeeded", 3, 3, checks=True, lines=30),  # more steps is no merit once all passed
        _evidence("10", "failed", 1, 2, lines=50),     # a tie with fork 2 but for the id: 2 before 10
    ]
    assert [e.fork_id for e in rank(forks)] == ["7", "6", "5", "4", "2", "10", "3", "1"]


# --- workspace.ignore: reported ignored files are not a lie -------------------------------------

CACHE_PLAN = """\
goal: Fix the greeting
strategies:
  - name: python
    steps:
      - id: fix
        instruction: >-
          python3 -c "import pathlib, py_compile; p = pathlib.Path('greet.py');
          p.write_text(p.read_text().replace('Helo', 'Hello')); py_compile.compile('greet.py')"
        allowed_files: [greet.py]
        confidence: 0.6
"""


@pytest.mark.slow
def test_an_executor_reporting_an_ignored_cache_file_is_not_contradicted(tmp_path: Path, executor: Path) -> None:
    root = tmp_path / "cache-project"
    root.mkdir()
    assert conductor(root, "init").returncode == 0
    (root / "greet.py").write_text('print("Helo, world")\n')
    (root / "plan.yaml").write_text(CACHE_PLAN)
    conductor(root, "explore", "--plan", "plan.yaml", "--executor", "handoff", "--no-wait")
    (task_file,) = handoff_dir(root).glob("fork_1/pending/step_001.task.json")
    task = json.loads(task_file.read_text())
    assert "__pycache__/" in task["ignore"] and "*.pyc" in task["ignore"]  # the executor can know them
    assert task["confidence"]["level"] == "medium"  # where a mismatch of reported files rejects the step

    run_executor(root, executor)  # the documented executor reports every file it saw change, the .pyc too
    fork = handoff_dir(root) / "fork_1"
    reported = [c["path"] for c in json.loads((fork / "completed" / "step_001.result.json").read_text())["files_changed"]]
    assert "greet.py" in reported and any(p.startswith("__pycache__/") for p in reported)

    resumed = _json(root, "resume", "--executor", "handoff", "--no-wait")
    assert resumed["status"] == "succeeded" and resumed["applied_fork"] == "1"
    verdict = json.loads((fork / "completed" / "step_001.verdict.json").read_text())
    check = next(c for c in verdict["checks"] if c["name"] == "reported_changes_match")
    assert check["passed"] is True and "workspace.ignore" in check["detail"]
    assert [c["path"] for c in verdict["files_changed"]] == ["greet.py"]
    assert not (root / "__pycache__").exists()  # ignored files are never merged
    verified = _json(root, "verify", "--no-witness")
    assert verified["ok"] is True, verified["findings"]


def test_reported_files_matching_no_ignore_pattern_still_count() -> None:
    """Only ignore patterns excuse a reported path: a file the executor claims but did not change, or
    one it hid, still fails the check."""
    from conductor.models import ExecutorInfo, FileChange, Result
    from conductor.verifier import _reported_check, ignore_matcher

    def change(path: str) -> FileChange:
        return FileChange(path=path, change="added", sha256="0" * 64, lines_added=1, lines_removed=0)

    result = Result(task_id="step_001", plan_id="p", fork_id="1", attempt=1, fencing_token=1,
                    task_checksum="sha256:" + "0" * 64, status="completed", executor=ExecutorInfo(id="x", kind="x"),
                    files_changed=[change("a.py"), change("__pycache__/a.cpython-311.pyc"), change("b.py")],
                    summary="", started_at="2026-01-01T00:00:00.000000Z", finished_at="2026-01-01T00:00:00.000000Z")
    ignored = ignore_matcher(["__pycache__/", "*.pyc"])
    assert _reported_check(result, [change("a.py"), change("b.py")], ignored).passed
    failed = _reported_check(result, [change("a.py")], ignored)
    assert not failed.passed and "b.py" in failed.detail
    assert not _reported_check(result, [change("a.py"), change("b.py")], ignore_matcher([])).passed


# --- a trusted key that cannot be loaded stops the run before plan.json -------------------------


@pytest.mark.parametrize("content", [None, b"not a key\n"])
def test_a_missing_trusted_key_fails_before_the_plan_is_written(tmp_path: Path, content: bytes | None) -> None:
    from conductor.errors import KeyFileError

    root = tmp_path / "keys-project"
    root.mkdir()
    assert conductor(root, "init").returncode == 0
    (root / "plan.yaml").write_text("goal: g\nstrategies:\n  - name: s\n    steps:\n"
                                    "      - id: a\n        instruction: touch a.txt\n        allowed_files: [a.txt]\n")
    config = root / ".conductor" / "config.yaml"
    text = config.read_text()
    assert "  keys: []" in text
    config.write_text(text.replace("  keys: []", "  keys:\n    - public_key: keys/ci-worker.pub\n"
                                                  "      executors: [ci-*]"))
    line = config.read_text().splitlines().index("    - public_key: keys/ci-worker.pub") + 1
    if content is not None:
        (root / ".conductor" / "keys" / "ci-worker.pub").write_bytes(content)
    done = conductor(root, "explore", "--plan", "plan.yaml", "--executor", "handoff", "--no-wait")
    assert done.returncode == KeyFileError.exit_code, done.stdout + done.stderr
    assert f"config.yaml:{line}: trust.keys[0].public_key 'keys/ci-worker.pub'" in done.stderr
    assert "ci-worker.pub" in done.stderr.split("cannot be used:", 1)[1]
    assert not list((root / ".conductor" / "handoff").glob("plan_*"))  # nothing written


@pytest.mark.slow
@pytest.mark.parametrize("claimer", ["conductor worker", "external executor"])
def test_recovery_does_not_take_a_rejected_files_attempt_as_a_lost_publication(
        project: Path, executor: Path, claimer: str) -> None:
    """The attacker reseals a pending task with another fork's identity and attempt 7: the claimer
    rejects it (invalid_task). Recovery on resume must not then log 'task.published attempt 7' as if
    Conductor had published what the attacker wrote."""
    from conductor.canonical import seal

    _one_attempt(project)
    fork = handoff_dir(project) / "fork_1"
    task_file = fork / "pending" / "step_001.task.json"
    task_file.write_text(json.dumps(seal({**json.loads(task_file.read_text()), "fork_id": "2", "attempt": 7})))
    if claimer == "conductor worker":
        assert conductor(project, "worker", "--burst", "--command", "true").returncode == 0
    else:
        run_executor(project, executor)
    conductor(project, "resume", "--executor", "handoff", "--no-wait")
    published = [e["data"] for e in _json(project, "events", "--type", "task.published") if e["log"] == "fork 1"]
    assert [(p["step_id"], p["attempt"]) for p in published] == [("step_001", 1)]
    (rejection,) = _json(project, "events", "--type", "task.rejected")
    assert rejection["data"]["kind"] == "invalid_task"
    replayed = _json(project, "replay")
    assert replayed["problems"] == [] and replayed["state"]["forks"]["1"]["steps"]["step_001"]["state"] == "failed"
    verified = _json(project, "verify", "--no-witness")
    assert verified["ok"] is True, verified["findings"]
