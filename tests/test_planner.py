from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from conductor.errors import ConfigError
from conductor.models import ForkSpec, PlannerInfo, PolicyLayer, step_number
from conductor.planner import FileStep, FileStrategy, build_plan, plan_from_file, render_planner_prompt


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


# --- step order is numeric ------------------------------------------------------------------------


def _many_steps(count: int, depends: dict[int, str]) -> str:
    steps = "".join(f"      - {{id: s{n}, instruction: do {n}{', depends_on: [' + depends[n] + ']' if n in depends else ''}}}\n"
                    for n in range(1, count + 1))
    return f"goal: g\nstrategies:\n  - name: long\n    steps:\n{steps}"


def test_step_1000_may_depend_on_step_200(tmp_path: Path) -> None:
    """Compared as strings, "step_200" >= "step_1000" and this valid dependency was refused."""
    plan = plan_from_file(write(tmp_path, _many_steps(1005, {1000: "s200"})), goal=None, forks=None)

    steps = plan.forks[0].steps
    assert (steps[999].step_id, steps[999].depends_on) == ("step_1000", ["step_200"])
    assert [s.step_id for s in steps[997:1001]] == ["step_998", "step_999", "step_1000", "step_1001"]


def test_step_101_may_not_depend_on_the_later_step_1005(tmp_path: Path) -> None:
    """Compared as strings, "step_1005" < "step_101" and this forward dependency was accepted: the step
    would wait forever for a step that runs after it."""
    path = write(tmp_path, _many_steps(1005, {101: "s1005"}))

    with pytest.raises(ConfigError) as info:
        plan_from_file(path, goal=None, forks=None)

    assert str(info.value) == (f"{path}:105: strategies[0].steps[100].depends_on[0]: depends_on 's1005' names no "
                               "earlier step (strategy 'long', step s101)")


def _fork(*steps: tuple[str, list[str]]) -> dict[str, object]:
    return {"fork_id": "1", "strategy": {"name": "s"},
            "steps": [{"step_id": step_id, "instruction": "x", "depends_on": depends} for step_id, depends in steps]}


@pytest.mark.parametrize(("steps", "problem"), [
    ((("step_001", []), ("step_002", ["step_003"]), ("step_003", [])), "step_002 depends on step_003, not an earlier"),
    ((("step_001", ["step_009"]),), "step_001 depends on step_009, not an earlier step"),
    ((("step_001", []), ("step_001", [])), "step_001 is listed after step_001"),
    ((("step_001", []), ("step_0001", [])), "step_0001 is listed after step_001"),
    ((("step_200", []), ("step_1000", []), ("step_101", ["step_1000"])), "step_101 is listed after step_1000"),
])
def test_a_fork_of_plan_json_keeps_steps_in_numeric_order(steps: tuple[tuple[str, list[str]], ...], problem: str) -> None:
    """A hand-edited (and re-sealed) plan.json cannot reorder steps or point a dependency forward."""
    with pytest.raises(ValidationError, match=problem):
        ForkSpec.model_validate(_fork(*steps))


def test_a_fork_orders_step_ids_as_numbers() -> None:
    fork = ForkSpec.model_validate(_fork(("step_200", []), ("step_999", ["step_200"]), ("step_1000", ["step_999"])))
    assert [s.step_id for s in fork.steps] == ["step_200", "step_999", "step_1000"]
    assert sorted(["step_1000", "step_200", "step_0999"], key=step_number) == ["step_200", "step_0999", "step_1000"]


# --- allowed_files entries that could never match -------------------------------------------------


@pytest.mark.parametrize("entry", ["calc.py ", " calc.py", "src/ calc.py", "calc.py\u00a0"])
def test_allowed_files_entry_with_stray_whitespace_is_refused_at_load(tmp_path: Path, entry: str) -> None:
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"goal": "g", "strategies": [{"name": "s", "steps": [
        {"id": "fix", "instruction": "x", "allowed_files": ["ok.py", entry]}]}]}))

    with pytest.raises(ConfigError) as info:
        plan_from_file(path, goal=None, forks=None)

    assert str(info.value) == (
        f"{path}:1: strategies[0].steps[0].allowed_files[1]: unsafe path {entry!r}: starts or ends a part with "
        "whitespace, which an allowed_files entry may not (a stray space would never match the file meant) "
        "(strategy 's', step fix)")


def test_an_llm_planner_answer_with_a_stray_space_is_a_config_error_too() -> None:
    strategy = FileStrategy(name="s", steps=[FileStep(id="\x1b[31mfix", instruction="x", allowed_files=["a.py "])])

    with pytest.raises(ConfigError) as info:
        build_plan(goal="g", strategies=[strategy], policy=PolicyLayer(), planner=PlannerInfo(kind="llm"),
                   source="planner answer")

    assert str(info.value).startswith("planner answer: strategies[0].steps[0].allowed_files[0]: unsafe path 'a.py '")
    assert str(info.value).endswith("(strategy 's', step '\\x1b[31mfix')")  # the LLM's id shown escaped


def test_plans_started_in_the_same_second_are_ordered_by_creation_not_by_their_random_suffix(tmp_path: Path) -> None:
    from conductor.plan_store import create_plan, latest_plan_id
    from conductor.project import init_project

    layout = init_project(tmp_path / "project")
    strategies = [FileStrategy(name="a", steps=[FileStep(instruction="do it", allowed_files=["x.py"])])]
    # The older plan's suffix sorts after the newer one's: id order alone would call the older one newest.
    for suffix in ("ffff", "0000", "8888"):
        plan = build_plan(goal="g", strategies=strategies, policy=PolicyLayer(), planner=PlannerInfo(kind="file"),
                          source="test", plan_id=f"20261126T155427-{suffix}")
        create_plan(layout, plan, ignore=[])
    create_plan(layout, build_plan(goal="g", strategies=strategies, policy=PolicyLayer(),
                                   planner=PlannerInfo(kind="file"), source="test", plan_id="20261126T155426-ffff"),
                ignore=[])
    assert layout.plan_ids() == ["20261126T155426-ffff", "20261126T155427-ffff", "20261126T155427-0000",
                                 "20261126T155427-8888"]
    assert latest_plan_id(layout) == latest_plan_id(layout, unfinished=True) == "20261126T155427-8888"
