"""A plan is one document however many steps it has: ``plan.json`` has its own size limit
(``plan_store.MAX_PLAN_BYTES``), checked when the plan is created, so a plan Conductor accepts is one every
later command can read back (a 10,000-step plan is over the 4 MiB a task file may have)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conductor import plan_store
from conductor.errors import ConfigError, IntegrityError
from conductor.handoff.documents import MAX_DOCUMENT_BYTES
from conductor.models import ForkSpec, Plan, PlannerInfo, PolicyLayer, StepSpec, Strategy, utc_now
from conductor.plan_store import create_plan, load_plan
from conductor.project import init_project, load_project
from conductor.verify import verify_project


def _plan(plan_id: str, steps: int, instruction_bytes: int) -> Plan:
    return Plan(
        plan_id=plan_id, goal="a big plan", created_at=utc_now(), planner=PlannerInfo(kind="file", source="test"),
        forks=[ForkSpec(fork_id="a", strategy=Strategy(name="many steps"), steps=[
            StepSpec(step_id=f"step_{i:05d}", title=f"step {i}", instruction=f"{i} " + "x" * instruction_bytes,
                     allowed_files=["README.md"])
            for i in range(steps)])])


def test_a_plan_larger_than_a_task_file_may_be_is_created_loaded_and_verified(tmp_path: Path) -> None:
    layout = init_project(tmp_path / "project")
    created = create_plan(layout, _plan("20261127T000000Z-big", 4_500, 1_000), ignore=[],
                          project_policy=PolicyLayer())
    size = (layout.plan_dir(created.plan_id) / "plan.json").stat().st_size
    assert MAX_DOCUMENT_BYTES < size <= plan_store.MAX_PLAN_BYTES
    loaded = load_plan(layout, created.plan_id)
    assert loaded.checksum == created.checksum and len(loaded.forks[0].steps) == 4_500
    report = verify_project(layout, load_project(layout)[0], witness=None)
    # (its log has no signed checkpoint: the plan never ran, which verify reports; plan.json itself is fine)
    assert report.checked["plans"] == 1 and not [f for f in report.findings if "plan.json" in str(f)], report.findings


def test_a_plan_over_the_limit_is_refused_before_anything_is_written(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    layout = init_project(tmp_path / "project")
    monkeypatch.setattr(plan_store, "MAX_PLAN_BYTES", 100_000)
    with pytest.raises(ConfigError, match=r"1 fork\(s\), 200 step\(s\)\); the limit is 100,000 bytes"):
        create_plan(layout, _plan("20261127T000000Z-toobig", 200, 1_000), ignore=[], project_policy=PolicyLayer())
    assert layout.plan_ids() == [] and not layout.plan_dir("20261127T000000Z-toobig").exists()


def test_a_plan_file_grown_past_the_limit_by_hand_is_refused_unread(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    layout = init_project(tmp_path / "project")
    created = create_plan(layout, _plan("20261127T000000Z-padded", 3, 10), ignore=[], project_policy=PolicyLayer())
    path = layout.plan_dir(created.plan_id) / "plan.json"
    monkeypatch.setattr(plan_store, "MAX_PLAN_BYTES", path.stat().st_size + 100)
    with path.open("ab") as handle:  # trailing whitespace keeps the JSON and its checksum valid
        handle.write(b" " * 200)
    with pytest.raises(IntegrityError, match="larger than"):
        load_plan(layout, created.plan_id)
    report = verify_project(layout, load_project(layout)[0], witness=None)
    assert any("plan.json" in str(f) and "larger than" in str(f) for f in report.findings), report.findings
