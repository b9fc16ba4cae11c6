from __future__ import annotations

from pathlib import Path

import pytest

from conductor.errors import ConfigError
from conductor.planner import plan_from_file, render_planner_prompt


def write(tmp_path: Path, text: str, name: str = "plan.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_plan_file_becomes_forks_with_numbered_steps_and_resolved_dependencies(tmp_path: Path) -> None:
    path = write(tmp_path, """
goal: Ship it
policy: {behavior: {max_diff_lines: 50}}
strategies:
  - name: a
    steps:
      - {id: first, instruction: do one, allowed_files: [x.py]}
      - {id: second, instruction: do two, depends_on: [first], confidence: 0.4}
  - name: b
    steps:
      - {instruction: do it all, allowed_files: ["src/"]}
""")
    plan = plan_from_file(path, goal=None, forks=None)
    assert plan.goal == "Ship it" and plan.planner.kind == "file"
    assert [f.fork_id for f in plan.forks] == ["1", "2"]
    first, second = plan.forks[0].steps
    assert (first.step_id, second.step_id, second.depends_on) == ("step_001", "step_002", ["step_001"])
    assert second.confidence_estimate == 0.4 and plan.policy.behavior.max_diff_lines == 50
    assert plan.forks[1].steps[0].allowed_files == ["src/"]
    assert len(plan_from_file(path, goal="Other", forks=1).forks) == 1


@pytest.mark.parametrize("steps, message", [
    ("- {id: a, instruction: x, depends_on: [b]}\n      - {id: b, instruction: y}", "names no earlier step"),
    ("- {id: a, instruction: x}\n      - {id: a, instruction: y}", "used twice"),
    ("- {instruction: x, allowed_files: [../etc/passwd]}", "unsafe path"),
    ("- {instruction: x, allowed_files: [/abs]}", "unsafe path"),
])
def test_bad_steps_are_config_errors(tmp_path: Path, steps: str, message: str) -> None:
    path = write(tmp_path, f"goal: g\nstrategies:\n  - name: s\n    steps:\n      {steps}\n")
    with pytest.raises(ConfigError, match=message):
        plan_from_file(path, goal=None, forks=None)


def test_missing_goal_and_missing_file(tmp_path: Path) -> None:
    path = write(tmp_path, "strategies:\n  - name: s\n    steps: [{instruction: x}]\n")
    with pytest.raises(ConfigError, match="no goal"):
        plan_from_file(path, goal=None, forks=None)
    with pytest.raises(ConfigError, match="not found"):
        plan_from_file(tmp_path / "nope.yaml", goal="g", forks=None)


def test_json_plan_files_are_strict(tmp_path: Path) -> None:
    path = write(tmp_path, '{"goal": "g", "goal": "h", "strategies": []}', "plan.json")
    with pytest.raises(ConfigError, match="duplicate"):
        plan_from_file(path, goal=None, forks=None)


def test_planner_prompt_asks_for_distinct_strategies_and_lists_files() -> None:
    prompt = render_planner_prompt("Add caching", forks=3, files=["a.py", "b.py"], constraints=["No new deps"])
    assert "Propose exactly 3 distinct strategies" in prompt and "- a.py" in prompt and "No new deps" in prompt
