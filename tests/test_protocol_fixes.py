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


def _tamper_and_reject(project: Path, executor: Path) -> Path:
    """Tamper fork 1's pending task, let the external executor reject it (and run fork 2's), resume."""
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
