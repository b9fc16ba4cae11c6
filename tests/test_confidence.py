from __future__ import annotations

from pathlib import Path

import pytest

from conductor.confidence import level_for, read_history, record_outcome, score_step


def test_levels_follow_the_documented_thresholds() -> None:
    assert [level_for(s) for s in (1.0, 0.8, 0.79, 0.5, 0.49, 0.0)] == ["high", "high", "medium", "medium", "low", "low"]


def test_without_history_the_planner_estimate_decides() -> None:
    confidence = score_step(estimate=0.9, allowed_files=["a.py"], accepted=0, total=0)
    assert (confidence.score, confidence.level) == (0.9, "high")
    assert score_step(estimate=None, allowed_files=[], accepted=0, total=0).score == 0.7


def test_history_pulls_the_score_towards_the_observed_success_rate() -> None:
    # 10 outcomes weigh as much as the planner: w = 0.5; history (0 + 1) / (10 + 2) = 1/12.
    confidence = score_step(estimate=0.9, allowed_files=["a.py"], accepted=0, total=10)
    assert confidence.score == pytest.approx(round(0.5 * 0.9 + 0.5 / 12, 3))
    assert confidence.level == "low"
    good = score_step(estimate=0.6, allowed_files=["a.py"], accepted=30, total=30)
    assert good.score > 0.6


def test_wide_scope_costs_confidence() -> None:
    narrow = score_step(estimate=0.9, allowed_files=["a.py"], accepted=0, total=0).score
    many = score_step(estimate=0.9, allowed_files=[f"f{i}.py" for i in range(6)], accepted=0, total=0).score
    wildcard = score_step(estimate=0.9, allowed_files=["src/**/*.py"], accepted=0, total=0).score
    assert narrow == 0.9 and many == pytest.approx(0.81) and wildcard == pytest.approx(0.8)


def test_history_file_round_trip_counts_only_the_executor_kind(tmp_path: Path) -> None:
    path = tmp_path / "history.jsonl"
    for accepted in (True, True, False):
        record_outcome(path, plan_id="p", fork_id="1", step_id="step_001", executor="llm", accepted=accepted)
    record_outcome(path, plan_id="p", fork_id="1", step_id="step_002", executor="command", accepted=False)
    with path.open("a") as handle:
        handle.write("not json\n")
    assert read_history(path, "llm") == (2, 3)
    assert read_history(path, "command") == (0, 1)
    assert read_history(tmp_path / "missing.jsonl", "llm") == (0, 0)
