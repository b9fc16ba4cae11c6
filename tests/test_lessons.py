"""Lessons: a rejected attempt teaches the tasks that come after it (conductor/lessons.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from conductor.lessons import (
    LESSON_PREFIX,
    MAX_LESSON_CHARS,
    lesson_from_failure,
    lesson_from_verdict,
    lessons_for,
    read_lessons,
    received_lessons,
    record_lesson,
    relevance,
)
from conductor.models import Check, CommandEvidence, FileChange, Verdict
from tests.e2e.project import all_chains_verify, conductor, make_project

SECRET = "sk-" + "A1b2C3d4E5f6G7h8I9j0"


def _verdict(**fields: object) -> Verdict:
    base: dict = {"task_id": "step_002", "plan_id": "p1", "fork_id": "1", "attempt": 1, "accepted": False,
                  "diff_lines": 2, "policy_digest": "sha256:" + "0" * 64, "decided_at": "2026-11-26T10:00:00Z"}
    return Verdict(**{**base, **fields})


def test_a_protected_file_rejection_becomes_a_policy_lesson_with_its_files_and_pattern() -> None:
    verdict = _verdict(
        reasons=["deps/poetry.lock: matches protected pattern '*.lock' (project)"],
        checks=[Check(name="within_allowed_files", passed=True),
                Check(name="outside_protected_patterns", passed=False, detail="deps/poetry.lock: …")],
        files_changed=[FileChange(path="deps/poetry.lock", change="added"), FileChange(path="deps/a.txt", change="added")],
    )
    lesson = lesson_from_verdict(verdict, instruction=f"Pin deps with key {SECRET} " + "x" * 500,
                                 allowed_files=["deps/"])
    assert lesson is not None
    assert (lesson["kind"], lesson["files"], lesson["patterns"]) == ("policy_violation", ["deps/poetry.lock"], ["*.lock"])
    assert lesson["checks"] == ["outside_protected_patterns"] and lesson["id"] == "p1/1/step_002#1"
    assert lesson["text"].startswith(f"{LESSON_PREFIX}step_002 of plan p1 fork 1 (attempt 1, policy violation): "
                                     "deps/poetry.lock: matches protected pattern '*.lock' (project). "
                                     "Do not modify files matching '*.lock'")
    assert SECRET not in json.dumps(lesson) and "[REDACTED]" in lesson["instruction"]
    assert len(lesson["instruction"]) <= 160 and len(lesson["text"]) <= 400
    assert lesson_from_verdict(_verdict(accepted=True), instruction="x", allowed_files=[]) is None


def test_a_failed_verification_becomes_a_lesson_naming_the_command_and_its_last_line() -> None:
    evidence = CommandEvidence(command="pytest -q tests/test_calc.py", exit_code=1, duration_seconds=0.5,
                               output_sha256="0" * 64,
                               output_tail=f"....\nFAILED test_calc.py::test_add token {SECRET}\n1 failed in 0.1s\n")
    verdict = _verdict(reasons=["verification failed: pytest -q tests/test_calc.py exited 1"],
                       checks=[Check(name="verification_commands", passed=False)], verification=[evidence],
                       files_changed=[FileChange(path="calc.py", change="modified")])
    lesson = lesson_from_verdict(verdict, instruction="Fix add", allowed_files=["calc.py"])
    assert lesson is not None and lesson["kind"] == "verification_failed"
    assert lesson["commands"] == ["pytest -q tests/test_calc.py"] and lesson["files"] == ["calc.py"]
    assert lesson["detail"] == "after changing calc.py, `pytest -q tests/test_calc.py` exited 1: 1 failed in 0.1s"
    failure = lesson_from_failure(plan_id="p1", fork_id="2", step_id="step_003", attempt=2, reason="timeout",
                                  message=f"killed after 300 s, Bearer {SECRET}", instruction="Refactor",
                                  allowed_files=["src/app.py", "src/**/*.py"])
    assert failure["kind"] == "executor_failure" and failure["files"] == ["src/app.py"]
    assert SECRET not in failure["text"] and "Finish well within the task's timeout." in failure["text"]


def _record(path: Path, step: str, files: list[str], *, patterns: list[str] = (), commands: list[str] = (),  # type: ignore[assignment]
            detail: str | None = None) -> dict:
    lesson = {"v": 1, "id": f"p/1/{step}#1", "ts": "2026-11-26T10:00:00Z", "plan_id": "p", "fork_id": "1",
              "step_id": step, "attempt": 1, "kind": "policy_violation", "files": files, "patterns": list(patterns),
              "checks": [], "commands": list(commands), "instruction": "", "detail": detail or step,
              "text": f"{LESSON_PREFIX}{step}: {detail or step}"}
    record_lesson(path, lesson)
    return lesson


def test_later_tasks_get_the_relevant_lessons_best_and_newest_first_and_bounded(tmp_path: Path) -> None:
    path = tmp_path / "lessons.jsonl"
    _record(path, "old_same_file", ["src/app.py"])
    _record(path, "area", ["src/util.py"])
    _record(path, "unrelated", ["docs/index.md"])
    _record(path, "pattern", ["vendor/x.lock"], patterns=["*.lock"])
    _record(path, "command", ["tests/test_cli.py"], commands=["pytest -q tests/test_app.py"])
    _record(path, "new_same_file", ["src/app.py"])
    _record(path, "repeat", ["src/app.py"], detail="new_same_file")  # the same mistake again: once
    assert relevance(read_lessons(path)[0], ["src/app.py"]) == 4 + 2
    assert relevance(read_lessons(path)[2], ["src/app.py"]) == 0
    chosen = [lesson["step_id"] for lesson in lessons_for(path, ["src/app.py", "poetry.lock"], limit=10)]
    assert chosen == ["repeat", "old_same_file", "pattern", "area", "command"]
    assert [lesson["step_id"] for lesson in lessons_for(path, ["src/app.py"])] == ["repeat", "old_same_file", "area"]
    assert lessons_for(path, ["README.md"]) == []
    # The character bound: one long lesson fills a task's share.
    _record(path, "long", ["README.md"], detail="y" * (MAX_LESSON_CHARS - 20))
    _record(path, "long2", ["README.md"], detail="z" * 100)
    assert [lesson["step_id"] for lesson in lessons_for(path, ["README.md"])] == ["long2"]
    assert received_lessons(["Never touch /core", f"{LESSON_PREFIX}x"]) == [f"{LESSON_PREFIX}x"]


def test_lessons_file_survives_torn_lines_and_keeps_one_lesson_per_id(tmp_path: Path) -> None:
    path = tmp_path / "lessons.jsonl"
    first = _record(path, "a", ["a.py"])
    with path.open("a") as handle:
        handle.write('{"v": 1, "id": "torn", "te')
    _record(path, "a", ["b.py"])  # the same id recorded again (after a crash): the first stays
    _record(path, "b", ["b.py"])
    assert [(lesson["id"], lesson["files"]) for lesson in read_lessons(path)] == [(first["id"], ["a.py"]), ("p/1/b#1", ["b.py"])]


# --- for real: a rejection in one plan, its lesson in the next ------------------------------------


PLAN_1 = """\
goal: Pin the dependencies
strategies:
  - name: lockfile
    steps:
      - id: pin
        title: Pin dependencies
        instruction: mkdir -p deps && echo 'regex==1' > deps/poetry.lock
        allowed_files: ['deps/']
        confidence: 0.9
"""

PLAN_2 = """\
goal: List the requirements
strategies:
  - name: requirements
    steps:
      - id: requirements
        title: Write requirements
        instruction: mkdir -p deps && echo 'regex==1' > deps/requirements.txt
        allowed_files: [deps/requirements.txt]
        confidence: 0.9
      - id: calc
        instruction: printf 'def add(a, b):\\n    return a + b\\n' > calc.py
        allowed_files: [calc.py]
        confidence: 0.9
"""


def _task(root: Path, plan_id: str, step_id: str) -> dict:
    # By the plan's id as explore reported it: two plans started in the same second sort by a random suffix.
    (task,) = [p for p in sorted((root / ".conductor" / "handoff").glob(f"plan_*/fork_1/*/{step_id}.task.json"))
               if json.loads(p.read_text())["plan_id"] == plan_id]
    return json.loads(task.read_text())


@pytest.mark.slow
def test_after_a_protected_file_rejection_the_next_plans_task_in_that_area_carries_the_lesson(tmp_path: Path) -> None:
    root = make_project(tmp_path / "project", config={
        "executor": {"kind": "command", "command": 'sh -c "$CONDUCTOR_INSTRUCTION"', "poll_seconds": 0.5}})
    (root / "plan1.yaml").write_text(PLAN_1)
    (root / "plan2.yaml").write_text(PLAN_2)
    config = yaml.safe_load((root / ".conductor" / "config.yaml").read_text())
    config["verification"]["commands"] = [f"{sys.executable} -c pass"]
    (root / ".conductor" / "config.yaml").write_text(yaml.safe_dump(config))

    first = conductor(root, "explore", "--plan", "plan1.yaml", "--json")
    assert first.returncode != 0, first.stdout
    lessons = read_lessons(root / ".conductor" / "lessons.jsonl")
    assert lessons and {lesson["kind"] for lesson in lessons} == {"policy_violation"}
    assert lessons[0]["files"] == ["deps/poetry.lock"] and lessons[0]["patterns"] == ["*.lock"]
    history = [json.loads(line) for line in (root / ".conductor" / "history.jsonl").read_text().splitlines()]
    assert history and all(h["outcome"] == "rejected" and h["kind"] == "config dir glob" for h in history)
    assert [h["attempt"] for h in history] == list(range(1, len(history) + 1))
    assert all(h["predicted"] == 0.8 for h in history)  # 0.9 - 0.1 for the folder entry, no history yet

    second = conductor(root, "explore", "--plan", "plan2.yaml", "--json")
    assert second.returncode == 0, second.stderr + second.stdout
    plan_id = json.loads(second.stdout)["plan_id"]
    carried = received_lessons(_task(root, plan_id, "step_001")["constraints"])
    assert len(carried) == 1 and "deps/poetry.lock: matches protected pattern '*.lock'" in carried[0]
    assert received_lessons(_task(root, plan_id, "step_002")["constraints"]) == []  # calc.py is another area
    # What it learned shows where people look: explain, on both sides.
    told = json.loads(conductor(root, "explain", "step_001", "--json").stdout)[0]
    assert told["lessons"]["received"] == carried and told["lessons"]["taught"] == []
    story = conductor(root, "explain", "step_001").stdout
    assert "lesson" in story.lower() and "deps/poetry.lock" in story
    all_chains_verify(root)


def test_a_finished_forks_log_records_every_missing_outcome_and_executor_failure_lessons_once(tmp_path: Path) -> None:
    from conductor.confidence import read_outcomes
    from conductor.layout import ProjectLayout
    from conductor.lessons import learn_from_events, learn_from_verdict
    from conductor.models import Event, StepSpec

    def event(seq: int, type_: str, **data: object) -> Event:
        return Event(seq=seq, ts="2026-11-26T10:00:00Z", type=type_, data=data, prev="sha256:" + "0" * 64,
                     hash="sha256:" + "0" * 64)

    layout = ProjectLayout(tmp_path)
    step = StepSpec(step_id="step_001", title="Refactor the parser", instruction="Split parse()",
                    allowed_files=["src/parser.py"])
    events = [event(0, "confidence.scored", step_id="step_001", score=0.77, level="medium", reasons=[]),
              event(1, "task.lease_expired", step_id="step_001", attempt=1),
              event(2, "task.failed", step_id="step_001", attempt=2, reason="timeout", message=f"killed, key {SECRET}"),
              event(3, "step.verified", step_id="step_001", attempt=3, accepted=True),
              event(4, "task.published", step_id="step_002", attempt=1)]  # not a step of these: skipped
    # Attempt 3's verdict was recorded at once, as the engine does.
    learn_from_verdict(layout, _verdict(task_id="step_001", attempt=3, accepted=True), step, executor="llm",
                       model="gemini/flash", predicted=0.77)
    assert learn_from_events(layout, "p1", "1", [step], events, executor="llm", model="gemini/flash") == 2
    assert learn_from_events(layout, "p1", "1", [step], events, executor="llm", model="gemini/flash") == 0
    outcomes = read_outcomes(layout.history_file)
    assert [(o.attempt, o.outcome, o.predicted, o.kind) for o in outcomes] == [
        (3, "accepted", 0.77, "refactor .py single"), (1, "lease_expired", 0.77, "refactor .py single"),
        (2, "executor_failed", 0.77, "refactor .py single")]
    (lesson,) = read_lessons(layout.lessons_file)
    assert (lesson["kind"], lesson["attempt"], lesson["files"], lesson["checks"]) == (
        "executor_failure", 2, ["src/parser.py"], ["timeout"])
    assert SECRET not in layout.lessons_file.read_text()
    assert [entry["step_id"] for entry in lessons_for(layout.lessons_file, ["src/lexer.py"])] == ["step_001"]


def test_other_rejections_get_advice_that_fits_them() -> None:
    medium = lesson_from_verdict(_verdict(reasons=["medium confidence: executor reported ['a.py'], workspace shows ['b.py']"],
                                          checks=[Check(name="reported_changes_match", passed=False)]),
                                 instruction="x", allowed_files=["a.py"])
    conflict = lesson_from_verdict(_verdict(reasons=["merge_conflict: a.py changed on both sides"]), instruction="x",
                                   allowed_files=["a.py"])
    assert medium is not None and conflict is not None
    assert (medium["kind"], conflict["kind"]) == ("rejected", "rejected")
    assert medium["text"].endswith("Report exactly the files you changed.") and medium["checks"] == ["reported_changes_match"]
    assert conflict["text"].endswith("change only what this step needs.") and conflict["files"] == ["a.py"]
    broken = lesson_from_verdict(_verdict(reasons=["invalid_result: no result file"]), instruction="x", allowed_files=["a.py"])
    assert broken is not None and broken["kind"] == "executor_failure"
