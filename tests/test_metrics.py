"""Handoff metrics from hand-built fork folders and audit logs with known timestamps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conductor.audit import AuditLog
from conductor.layout import ProjectLayout
from conductor.metrics import compute_metrics, percentile, write_metrics

NOW = "2026-02-01T00:00:00.000000Z"


class _Log:
    """An audit log whose next entry is stamped ``2026-01-01T00:00:00Z + seconds``."""

    def __init__(self, path: Path):
        self.seconds = 0.0
        self.log = AuditLog(path, clock=self._ts)

    def _ts(self) -> str:
        minutes, seconds = divmod(self.seconds, 60)
        return f"2026-01-01T00:{int(minutes):02d}:{seconds:09.6f}Z"

    def at(self, seconds: float, type_: str, **data: object) -> None:
        self.seconds = seconds
        self.log.append(type_, data)


def _touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_text("{}")


def _project(tmp_path: Path) -> ProjectLayout:
    layout = ProjectLayout(tmp_path)
    fork = layout.fork("p1", "a")
    _touch(fork.state_dir("pending"), "step_004.task.json", ".tmp.step_006.task.json.123.beef")
    _touch(fork.state_dir("in_progress"), "step_003.task.json", "step_003.lease.json")
    _touch(fork.state_dir("completed"), "step_001.task.json", "step_001.result.json")
    _touch(fork.state_dir("failed"), "step_002.task.json", "step_005.task.json", "step_002.result.json")

    log = _Log(fork.audit_log)
    log.at(1, "llm.call", purpose="step", step_id="step_001", input_tokens=100, output_tokens=20, cost_usd=0.01)
    log.at(2, "task.published", step_id="step_001", attempt=1)
    log.at(10, "task.claimed", step_id="step_001", attempt=1, holder="w1")
    log.at(20, "task.completed", step_id="step_001", attempt=1)  # 10 s
    log.at(21, "step.verified", step_id="step_001", attempt=1, accepted=True)
    log.at(22, "task.published", step_id="step_002", attempt=1)
    log.at(30, "task.claimed", step_id="step_002", attempt=1, holder="w1")
    log.at(60, "task.lease_expired", step_id="step_002", attempt=1, holder="w1")  # no outcome
    log.at(61, "task.published", step_id="step_002", attempt=2)
    log.at(100, "task.claimed", step_id="step_002", attempt=2, holder="w2")
    log.at(130.5, "task.completed", step_id="step_002", attempt=2)  # 30.5 s
    log.at(131, "step.verified", step_id="step_002", attempt=2, accepted=False)
    log.at(131.5, "task.failed", step_id="step_002", attempt=2, reason="rejected")  # last outcome: failed
    log.at(140, "llm.call", purpose="step", step_id="step_002", input_tokens=50, output_tokens=5)
    log.at(200, "task.claimed", step_id="step_003", attempt=1, holder="w3")  # still running
    log.at(300, "task.claimed", step_id="step_005", attempt=1, holder="w3")
    log.at(320, "task.failed", step_id="step_005", attempt=1, reason="executor_error")  # 20 s

    plan_log = _Log(layout.plan_dir("p1") / "audit.log")
    plan_log.at(0, "llm.call", purpose="plan", input_tokens=1000, output_tokens=200, cost_usd=0.5)
    return layout


def test_fork_metrics_are_exact(tmp_path: Path) -> None:
    metrics = compute_metrics(_project(tmp_path), now=NOW)
    fork = metrics["plans"]["p1"]["forks"]["a"]
    assert fork == {
        "tasks": {"pending": 1, "in_progress": 1, "completed": 1, "failed": 2},
        "attempts": {"completed": 1, "failed": 2},
        "success_rate": 0.333333,
        "duration_seconds": {"count": 3, "mean": 20.166667, "p50": 20.0, "p95": 30.5},
        "retries": 1,
        "lease_expirations": 1,
        "verification_rejections": 1,
        "task_rejections": 0,
        "llm": {"calls": 2, "input_tokens": 150, "output_tokens": 25, "cost_usd": 0.01},
    }
    assert metrics["generated_at"] == NOW and metrics["errors"] == []


def test_plan_level_log_adds_planning_tokens(tmp_path: Path) -> None:
    metrics = compute_metrics(_project(tmp_path), now=NOW)
    plan = metrics["plans"]["p1"]
    assert plan["planning"] == {"calls": 1, "input_tokens": 1000, "output_tokens": 200, "cost_usd": 0.5}
    assert plan["totals"]["llm"] == {"calls": 3, "input_tokens": 1150, "output_tokens": 225, "cost_usd": 0.51}
    assert metrics["totals"] == plan["totals"]


def test_totals_pool_durations_across_forks_and_broken_logs_are_reported(tmp_path: Path) -> None:
    layout = _project(tmp_path)
    other = layout.fork("p1", "b")
    _touch(other.state_dir("completed"), "step_001.task.json")
    log = _Log(other.audit_log)
    log.at(0, "task.claimed", step_id="step_001", attempt=1)
    log.at(40, "task.completed", step_id="step_001", attempt=1)
    broken = layout.fork("p2", "c")
    _touch(broken.state_dir("pending"), "step_001.task.json")
    broken.audit_log.write_bytes(b'{"seq":0')  # torn

    metrics = compute_metrics(layout, now=NOW)
    totals = metrics["totals"]
    assert totals["tasks"] == {"pending": 2, "in_progress": 1, "completed": 2, "failed": 2}
    assert totals["attempts"] == {"completed": 2, "failed": 2} and totals["success_rate"] == 0.5
    # pooled samples [10, 20, 30.5, 40]: nearest rank 2 and 4, not an average of per-fork percentiles
    assert totals["duration_seconds"] == {"count": 4, "mean": 25.125, "p50": 20.0, "p95": 40.0}
    assert metrics["plans"]["p2"]["forks"]["c"]["tasks"]["pending"] == 1
    [error] = metrics["errors"]
    assert error["path"] == ".conductor/handoff/plan_p2/fork_c/audit.log"
    assert "torn write" in error["error"]


def test_fork_without_log_or_events(tmp_path: Path) -> None:
    layout = ProjectLayout(tmp_path)
    _touch(layout.fork("p1", "a").state_dir("pending"), "step_001.task.json")
    fork = compute_metrics(layout, now=NOW)["plans"]["p1"]["forks"]["a"]
    assert fork["tasks"]["pending"] == 1 and fork["success_rate"] is None
    assert fork["duration_seconds"] == {"count": 0, "mean": None, "p50": None, "p95": None}


def test_no_handoff_folder_gives_empty_metrics(tmp_path: Path) -> None:
    metrics = compute_metrics(ProjectLayout(tmp_path), now=NOW)
    assert metrics["plans"] == {} and metrics["errors"] == []
    assert metrics["totals"]["tasks"] == {"pending": 0, "in_progress": 0, "completed": 0, "failed": 0}


def test_write_metrics_writes_the_file_durably(tmp_path: Path) -> None:
    layout = _project(tmp_path)
    written = write_metrics(layout, now=NOW)
    assert json.loads(layout.metrics_file.read_text()) == written
    assert not [p for p in layout.handoff_dir.iterdir() if p.name.startswith(".tmp.")]


@pytest.mark.parametrize(
    ("values", "p", "expected"),
    [
        ([], 50, None),
        ([7.0], 95, 7.0),
        ([3.0, 1.0, 2.0], 50, 2.0),
        ([1.0, 2.0, 3.0, 4.0], 50, 2.0),  # rank ceil(2.0) = 2: an observed value, no interpolation
        ([float(v) for v in range(1, 21)], 95, 19.0),  # rank ceil(19.0) = 19
        ([float(v) for v in range(1, 21)], 96, 20.0),  # rank ceil(19.2) = 20
        ([float(v) for v in range(1, 21)], 100, 20.0),
    ],
)
def test_nearest_rank_percentile(values: list[float], p: float, expected: float | None) -> None:
    assert percentile(values, p) == expected


def test_verified_outcomes_count_for_an_executor_that_logs_nothing(tmp_path: Path) -> None:
    """An external executor writes no events: the verifier's step.verified is the attempt's outcome, a
    failure the engine logged for it carries its duration, and a rejected task file is no execution."""
    layout = ProjectLayout(tmp_path)
    log = _Log(layout.fork("p1", "x").audit_log)
    log.at(0, "task.published", step_id="step_001", attempt=1)
    log.at(5, "step.verified", step_id="step_001", attempt=1, accepted=True)
    log.at(6, "task.published", step_id="step_002", attempt=1)
    log.at(9, "step.verified", step_id="step_002", attempt=1, accepted=False)
    log.at(9.5, "task.failed", step_id="step_002", attempt=1, reason="verification_rejected")
    log.at(10, "task.published", step_id="step_003", attempt=1)
    log.at(20, "task.failed", step_id="step_003", attempt=1, reason="command_failed", duration_seconds=7.25)
    log.at(21, "task.published", step_id="step_004", attempt=1)
    log.at(22, "task.rejected", step_id="step_004", attempt=1, kind="checksum_mismatch")
    log.at(22.5, "task.rejected", step_id="step_004", attempt=1, kind="checksum_mismatch")  # logged twice
    fork = compute_metrics(layout, now=NOW)["plans"]["p1"]["forks"]["x"]
    assert fork["attempts"] == {"completed": 1, "failed": 2} and fork["success_rate"] == 0.333333
    assert fork["duration_seconds"]["count"] == 1 and fork["duration_seconds"]["mean"] == 7.25
    assert fork["task_rejections"] == 1 and fork["verification_rejections"] == 1
