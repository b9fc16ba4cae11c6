"""``conductor confidence report``: the reliability table and Brier score of a fixture history, by hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conductor.confidence import Outcome, calibration, read_outcomes
from conductor.project import init_project

# (predicted score, outcome) of six attempts, plus lines the report must not count as forecasts.
FIXTURE = [
    (0.9, "accepted"), (0.9, "accepted"), (0.85, "rejected"), (0.62, "accepted"), (0.55, "executor_failed"),
    (0.3, "lease_expired"),
]


def _history(root: Path) -> Path:
    lines = []
    for number, (predicted, outcome) in enumerate(FIXTURE, start=1):
        lines.append(json.dumps({"v": 2, "ts": "2026-11-26T10:00:00Z", "plan_id": "p", "fork_id": "1",
                                 "step_id": f"step_{number:03d}", "attempt": 1, "executor": "llm",
                                 "model": "openai/m", "kind": "fix .py single", "outcome": outcome,
                                 "accepted": outcome == "accepted", "predicted": predicted}))
    lines.insert(1, lines[0])  # recorded twice (a crash between the write and its event): one forecast
    lines.append(json.dumps({"ts": "2026-11-20T10:00:00Z", "plan_id": "old", "fork_id": "1", "step_id": "step_001",
                             "executor": "command", "accepted": True}))  # the earlier format: no score
    lines.append("{not json")
    path = root / ".conductor" / "history.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _by_hand() -> dict:
    # y = 1, 1, 0, 1, 0, 0; base rate 3/6.
    squared = [(0.9 - 1) ** 2, (0.9 - 1) ** 2, 0.85 ** 2, (0.62 - 1) ** 2, 0.55 ** 2, 0.3 ** 2]
    assert sum(squared) == pytest.approx(0.01 + 0.01 + 0.7225 + 0.1444 + 0.3025 + 0.09)  # = 1.2794
    brier = 1.2794 / 6  # 0.21323…
    return {"brier": 0.2132, "reference": 0.25, "skill": round(1 - brier / 0.25, 4), "base_rate": 0.5}


def test_the_report_of_a_fixture_history_matches_a_hand_computation(tmp_path: Path) -> None:
    root = tmp_path / "project"
    root.mkdir()
    init_project(root)
    _history(root)

    done = subprocess.run([sys.executable, "-m", "conductor", "confidence", "report", "--json"], cwd=root,
                          capture_output=True, text=True, timeout=120)

    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    hand = _by_hand()
    assert (report["forecasts"], report["without_prediction"]) == (6, 1)
    assert report["base_rate"] == hand["base_rate"] and report["brier"] == hand["brier"]
    assert report["reference_brier"] == hand["reference"] and report["skill"] == hand["skill"] == 0.1471
    assert report["outcomes"] == {"accepted": 3, "executor_failed": 1, "lease_expired": 1, "rejected": 1}
    filled = {tuple(b["range"]): (b["count"], b["mean_predicted"], b["observed_rate"]) for b in report["buckets"] if b["count"]}
    assert filled == {(0.3, 0.4): (1, 0.3, 0.0), (0.5, 0.6): (1, 0.55, 0.0), (0.6, 0.7): (1, 0.62, 1.0),
                      (0.8, 0.9): (1, 0.85, 0.0), (0.9, 1.0): (2, 0.9, 1.0)}
    assert len(report["buckets"]) == 10
    levels = {row["level"]: (row["count"], row["mean_predicted"], row["observed_rate"]) for row in report["levels"]}
    # high: 0.9, 0.9, 0.85 -> mean 2.65 / 3, 2 of 3 accepted; medium: 0.62, 0.55 -> 0.585, 1 of 2.
    assert levels == {"low": (1, 0.3, 0.0), "medium": (2, 0.585, 0.5), "high": (3, 0.8833, 0.6667)}

    text = subprocess.run([sys.executable, "-m", "conductor", "confidence", "report"], cwd=root,
                          capture_output=True, text=True, timeout=120, env={"COLUMNS": "120", "PATH": "/usr/bin:/bin"})
    assert text.returncode == 0, text.stderr
    assert "Brier score: 0.213" in text.stdout and "skill 0.147" in text.stdout
    assert "[0.90, 1.00]" in text.stdout and "0.667" in text.stdout


def test_bucket_edges_and_empty_histories() -> None:
    rows = [Outcome("llm", True, predicted=1.0), Outcome("llm", False, predicted=0.3), Outcome("llm", True, predicted=0.8)]
    report = calibration(rows, bins=5)
    counts = [b["count"] for b in report["buckets"]]
    assert counts == [0, 1, 0, 0, 2]  # 0.3 in [0.2, 0.4); 0.8 and 1.0 in [0.8, 1.0]
    assert [row["count"] for row in report["levels"]] == [1, 0, 2]
    assert report["brier"] == round((0 + 0.09 + 0.04) / 3, 4)
    empty = calibration([Outcome("command", True)])
    assert (empty["forecasts"], empty["brier"], empty["skill"], empty["without_prediction"]) == (0, None, None, 1)
    always = calibration([Outcome("llm", True, predicted=0.9)] * 2)
    assert always["reference_brier"] == 0 and always["skill"] is None  # no skill is defined against a sure thing
    with pytest.raises(ValueError, match="bins"):
        calibration(rows, bins=0)


def test_report_cli_without_history_and_outside_a_project(tmp_path: Path) -> None:
    root = tmp_path / "project"
    root.mkdir()
    init_project(root)
    done = subprocess.run([sys.executable, "-m", "conductor", "confidence", "report"], cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "no scored outcomes yet" in done.stdout
    elsewhere = subprocess.run([sys.executable, "-m", "conductor", "confidence", "report"], cwd=tmp_path,
                               capture_output=True, text=True, timeout=120)
    assert elsewhere.returncode == 9 and "no Conductor project" in elsewhere.stderr
    assert read_outcomes(root / ".conductor" / "history.jsonl") == []
