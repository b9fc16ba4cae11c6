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


# --- groups, back-off, the history format ---------------------------------------------------------


def test_kinds_of_steps_come_from_title_file_types_and_breadth() -> None:
    from conductor.confidence import breadth, file_types, step_kind

    assert step_kind("Add tests for the parser", ["tests/test_parser.py"]) == "test .py single"
    assert step_kind("Fix the off-by-one", ["calc.py", "README.md"]) == "fix .md+.py few"
    assert step_kind("", ["docs/usage.md"]) == "docs .md single"
    assert step_kind("Tidy", ["src/**/*.py", "docs/"]) == "general .py+dir glob"
    assert breadth([]) == "none" and breadth([f"f{i}.py" for i in range(4)]) == "many"
    assert file_types(["a.py", "b.md", "c.txt", "d.toml"]) == "mixed" and file_types(["Makefile"]) == "none"


def _outcomes(count: int, accepted: bool, *, model: str, kind: str, prefix: str) -> list:
    from conductor.confidence import Outcome

    return [Outcome("llm", accepted, model, kind, attempt=1, step_id=f"{prefix}{i}") for i in range(count)]


def test_a_model_that_failed_5_of_5_similar_steps_scores_below_its_planner_estimate(tmp_path: Path) -> None:
    from conductor.confidence import learn, read_outcomes

    path = tmp_path / "history.jsonl"
    for i in range(5):
        record_outcome(path, plan_id="p", fork_id="1", step_id=f"step_{i:03d}", executor="llm", accepted=False,
                       attempt=1, model="openai/gpt-x", kind="fix .py single", predicted=0.9)
    learned = learn(read_outcomes(path), executor="llm", model="openai/gpt-x", kind="fix .py single")
    confidence = score_step(estimate=0.9, allowed_files=["calc.py"], learned=learned)
    # Only the narrowest group has outcomes: p = (0 + 4 * 0.5) / (5 + 4) = 2/9, evidence 5, w = 5/15.
    assert confidence.score == round((10 / 15) * 0.9 + (5 / 15) * (2 / 9), 3) == 0.674
    assert confidence.score < 0.9 and confidence.level == "medium"
    assert confidence.reasons[1] == ("history of llm · openai/gpt-x · fix .py single: 0/5 accepted → 0.22 "
                                     "(backs off to llm · openai/gpt-x 0/5, llm 0/5, all 0/5), weight 0.33")
    # Another model's record on the same kind of step is untouched by these failures beyond the shared prior.
    other = learn(read_outcomes(path), executor="llm", model="gemini/flash", kind="fix .py single")
    assert score_step(estimate=0.9, allowed_files=["calc.py"], learned=other).score > confidence.score


def test_a_narrow_group_without_history_borrows_from_the_broader_one_and_each_outcome_counts_once() -> None:
    from conductor.confidence import PRIOR_STRENGTH, learn

    history = (_outcomes(40, True, model="openai/a", kind="docs .md single", prefix="d")
               + _outcomes(5, False, model="openai/b", kind="fix .py single", prefix="f"))
    learned = learn(history, executor="llm", model="openai/b", kind="docs .md single")
    all_, executor, model, kind = learned.groups
    assert [(g.accepted, g.total) for g in learned.groups] == [(40, 45), (40, 45), (0, 5), (0, 0)]
    # all minus llm: nothing -> Laplace 1/2; llm minus openai/b: 40/40; openai/b minus docs: 0/5; docs: none.
    assert all_.estimate == 0.5 and all_.evidence == 0
    assert executor.estimate == pytest.approx((40 + PRIOR_STRENGTH * 0.5) / (40 + PRIOR_STRENGTH))
    assert model.estimate == pytest.approx(PRIOR_STRENGTH * executor.estimate / (5 + PRIOR_STRENGTH))
    assert kind.estimate == pytest.approx(model.estimate) and kind.total == 0
    assert kind.evidence == pytest.approx(PRIOR_STRENGTH * model.evidence / (model.evidence + PRIOR_STRENGTH))
    # With no outcome of its own the step's group weighs less than the broader groups' counts would.
    assert 0 < kind.evidence < PRIOR_STRENGTH


def test_one_group_is_the_earlier_scorer_and_old_history_fits_the_hierarchy() -> None:
    from conductor.confidence import Outcome, learn

    history = [Outcome("command", i < 9) for i in range(12)]
    flat = score_step(estimate=0.9, allowed_files=["a.py"], accepted=9, total=12)
    # Outcomes without model or kind (the earlier format) land in the executor level; the root ring is empty.
    learned = learn(history, executor="command")
    assert [(g.label, g.accepted, g.total) for g in learned.groups] == [("all", 9, 12), ("command", 9, 12)]
    assert flat.score == round((10 / 22) * 0.9 + (12 / 22) * (10 / 14), 3)  # Laplace, w = 12 / 22
    # Below an empty root ring the executor's own outcomes are smoothed towards 1/2 with K pseudo-outcomes.
    assert score_step(estimate=0.9, allowed_files=["a.py"], learned=learned).score == round(
        (10 / 22) * 0.9 + (12 / 22) * (9 + 2) / (12 + 4), 3)


def test_both_history_formats_are_read_and_an_attempt_recorded_twice_counts_once(tmp_path: Path) -> None:
    from conductor.confidence import read_outcomes

    path = tmp_path / "history.jsonl"
    path.write_text('{"ts": "2026-11-22T10:00:00Z", "plan_id": "p0", "fork_id": "1", "step_id": "step_001", '
                    '"executor": "llm", "accepted": true}\n')
    for _ in range(2):  # a crash between the write and its event makes the engine record the attempt again
        record_outcome(path, plan_id="p1", fork_id="1", step_id="step_001", executor="llm", accepted=False, attempt=2,
                       model="openai/m", kind="fix .py single", outcome="executor_failed", predicted=0.75)
    with path.open("a") as handle:
        handle.write('{"executor": "llm", "accepted": "yes"}\n{"torn": ')
    record_outcome(path, plan_id="p1", fork_id="1", step_id="step_002", executor="llm", accepted=True, attempt=1)
    old, failed, accepted = read_outcomes(path)
    assert (old.model, old.kind, old.attempt, old.outcome) == (None, None, None, "accepted")
    assert (failed.attempt, failed.outcome, failed.predicted, failed.model) == (2, "executor_failed", 0.75, "openai/m")
    assert accepted.step_id == "step_002"  # the torn line cost only itself
    assert read_history(path, "llm") == (2, 3)
    with pytest.raises(ValueError, match="unknown outcome"):
        record_outcome(path, plan_id="p", fork_id="1", step_id="s", executor="llm", accepted=False, outcome="meh")


def test_outcomes_of_a_fork_log_cover_every_attempt() -> None:
    from conductor.confidence import attempt_outcomes, predicted_score
    from conductor.models import Event

    def event(seq: int, type_: str, **data: object) -> Event:
        return Event(seq=seq, ts="2026-11-22T10:00:00Z", type=type_, data=data, prev="sha256:" + "0" * 64,
                     hash="sha256:" + "0" * 64)

    events = [event(0, "confidence.scored", step_id="step_001", score=0.82, level="high", reasons=[]),
              event(1, "task.lease_expired", step_id="step_001", attempt=1),
              event(2, "task.failed", step_id="step_001", attempt=2, reason="timeout", message="ran 300 s"),
              event(3, "step.verified", step_id="step_001", attempt=3, accepted=False),
              event(4, "task.failed", step_id="step_001", attempt=3, reason="verification_rejected"),
              event(5, "step.verified", step_id="step_001", attempt=4, accepted=True),
              event(6, "task.lease_expired", step_id="step_002", attempt=1),
              event(7, "task.failed", step_id="step_002", attempt=1, reason="lease_expired")]
    assert [(s, a, o) for s, a, o, _ in attempt_outcomes(events)] == [
        ("step_001", 1, "lease_expired"), ("step_001", 2, "executor_failed"), ("step_001", 3, "rejected"),
        ("step_001", 4, "accepted"), ("step_002", 1, "lease_expired")]
    assert predicted_score(events, "step_001") == 0.82 and predicted_score(events, "step_002") is None


def test_appends_from_parallel_processes_and_threads_all_land_whole(tmp_path: Path) -> None:
    import subprocess
    import sys
    import threading

    from conductor.confidence import read_outcomes

    path = tmp_path / "history.jsonl"
    path.write_text('{"executor": "llm", "accepted": tr')  # a torn line a crash left behind
    script = ("import sys; from pathlib import Path; from conductor.confidence import record_outcome\n"
              "for i in range(50):\n"
              "    record_outcome(Path(sys.argv[1]), plan_id=sys.argv[2], fork_id='1', step_id=f'step_{i:03d}',\n"
              "                   executor='llm', accepted=i % 2 == 0, attempt=1, model='openai/m' * 40)\n")
    processes = [subprocess.Popen([sys.executable, "-c", script, str(path), f"proc{n}"]) for n in range(3)]

    def write(name: str) -> None:
        for i in range(50):
            record_outcome(path, plan_id=name, fork_id="1", step_id=f"step_{i:03d}", executor="command",
                           accepted=True, attempt=1)

    threads = [threading.Thread(target=write, args=(f"thread{n}",)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert all(p.wait(timeout=120) == 0 for p in processes)
    outcomes = read_outcomes(path)
    assert len(outcomes) == 300
    assert {o.plan_id for o in outcomes} == {"proc0", "proc1", "proc2", "thread0", "thread1", "thread2"}
    assert len(path.read_text().splitlines()) == 301  # the torn line was closed, not merged with a record


def test_the_back_off_example_of_the_docs_is_right() -> None:
    import json
    import re

    from conductor.confidence import Outcome, learn, step_kind

    doc = (Path(__file__).resolve().parent.parent / "docs" / "confidence.md").read_text("utf-8")
    match = re.search(r"<!-- confidence-hierarchy-example -->\n```json\n(.*?)\n```\n", doc, re.S)
    assert match
    example = json.loads(match.group(1))
    history = [Outcome(example["executor"], group["accepted"], group["model"], group["kind"], attempt=1,
                       step_id=f"{group['model']}-{i}") for group in example["history"] for i in range(group["count"])]
    learned = learn(history, executor=example["executor"], model=example["model"],
                    kind=step_kind(example["title"], example["allowed_files"]))
    confidence = score_step(estimate=example["estimate"], allowed_files=example["allowed_files"], learned=learned)
    assert (confidence.score, confidence.level) == (example["score"], example["level"])
    assert confidence.score < example["estimate"]
    assert json.dumps(confidence.reasons, ensure_ascii=False) in doc


@pytest.mark.slow
def test_a_real_llm_plan_is_scored_by_its_model_and_kind_of_step_and_records_its_outcome(tmp_path: Path) -> None:
    import json

    from conductor.confidence import read_outcomes
    from tests.e2e.project import FIXED_CALC, cli_env, conductor, make_project
    from tests.helpers.llm_server import scripted_llm_server

    plan = {"strategies": [{"name": "fix", "description": "", "steps": [
        {"id": "fix", "title": "Fix add", "instruction": "FIX: make add() add", "allowed_files": ["calc.py"],
         "depends_on": [], "confidence": 0.9}]}]}
    with scripted_llm_server() as llm:
        llm.reply("# Goal", plan)
        llm.reply("FIX:", {"summary": "fix", "explanation": "use +",
                           "edits": [{"path": "calc.py", "action": "write", "content": FIXED_CALC}]})
        root = make_project(tmp_path / "proj", config={"planner": {"provider": "openai", "model": "m-1"},
                                                       "llm": {"openai_base_url": llm.openai_base_url}})
        history = root / ".conductor" / "history.jsonl"
        for i in range(5):  # this model failed five steps of the same kind before
            record_outcome(history, plan_id="earlier", fork_id="1", step_id=f"step_{i + 1:03d}", executor="llm",
                           accepted=False, attempt=1, model="openai/m-1", kind="fix .py single", predicted=0.9)
        record_outcome(history, plan_id="earlier", fork_id="1", step_id="step_009", executor="llm", accepted=True,
                       attempt=1, model="openai/other", kind="fix .py single", predicted=0.9)
        run = conductor(root, "build", "Fix add", "--json", env=cli_env(OPENAI_API_KEY="sk-test-not-real"))

    assert run.returncode == 0, run.stderr
    plan_id = json.loads(run.stdout)["plan_id"]
    story = json.loads(conductor(root, "explain", "step_001", "--json").stdout)[0]
    confidence = story["confidence"]
    assert confidence["score"] < 0.9 and confidence["level"] == "medium"
    assert confidence["reasons"][1].startswith("history of llm · openai/m-1 · fix .py single: 0/5 accepted")
    assert "llm 1/6" in confidence["reasons"][1]
    newest = read_outcomes(history)[-1]
    assert (newest.plan_id, newest.model, newest.kind, newest.attempt, newest.outcome) == (
        plan_id, "openai/m-1", "fix .py single", 1, "accepted")
    assert newest.predicted == confidence["score"]


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["write:ENOSPC:1@history.jsonl", "fsync:EIO:2@history.jsonl"])
def test_a_disk_error_while_recording_an_outcome_stops_the_run_and_resume_records_it_once(tmp_path: Path, fault: str) -> None:
    import json

    from conductor.confidence import read_outcomes
    from tests.e2e.project import FIXED_CALC, cli_env, conductor, make_project

    root = make_project(tmp_path / "proj", config={
        "executor": {"kind": "command", "command": 'sh -c "$CONDUCTOR_INSTRUCTION"', "poll_seconds": 0.5}})
    (root / "fix.py").write_text(f"open('calc.py', 'w').write({FIXED_CALC!r})\n")
    (root / "plan.yaml").write_text(
        "goal: Fix add\nstrategies:\n  - name: fix\n    steps:\n"
        "      - id: fix\n        title: Fix add\n        instruction: python3 fix.py\n        allowed_files: [calc.py]\n"
        "        confidence: 0.9\n"
        "      - id: again\n        title: Fix add again\n        instruction: python3 fix.py\n"
        "        allowed_files: [calc.py]\n        depends_on: [fix]\n        confidence: 0.9\n")
    history = root / ".conductor" / "history.jsonl"

    failed = conductor(root, "explore", "--plan", "plan.yaml", "--json", env=cli_env(CONDUCTOR_FAULT=fault))
    assert failed.returncode == 74, failed.stderr
    assert "injected by CONDUCTOR_FAULT" in failed.stderr
    text = history.read_text() if history.exists() else ""
    assert all(json.loads(line) for line in text.splitlines())  # nothing torn is left behind
    resumed = conductor(root, "resume", "--json")
    assert resumed.returncode == 0, resumed.stderr
    outcomes = read_outcomes(history)
    assert sorted((o.step_id, o.attempt, o.outcome) for o in outcomes) == [
        ("step_001", 1, "accepted"), ("step_002", 1, "accepted")]
    assert len(history.read_text().splitlines()) == 2  # recorded once each, the failed write cut back off


def test_the_incremental_reader_sees_appends_replacements_and_lines_still_being_written(tmp_path: Path) -> None:
    import subprocess
    import sys

    from conductor.confidence import read_outcomes

    path = tmp_path / "history.jsonl"
    record_outcome(path, plan_id="p", fork_id="1", step_id="step_001", executor="llm", accepted=True, attempt=1)
    assert len(read_outcomes(path)) == 1
    subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; from conductor.confidence import "
                    "record_outcome; record_outcome(Path(sys.argv[1]), plan_id='p', fork_id='1', step_id='step_002', "
                    "executor='llm', accepted=False, attempt=1)", str(path)], check=True, timeout=120)
    assert [o.step_id for o in read_outcomes(path)] == ["step_001", "step_002"]  # another process's append
    line = path.read_text().splitlines()[0].replace("step_001", "step_003")
    with path.open("a") as handle:
        handle.write(line[:20])  # a line being written: not yet an outcome
    assert len(read_outcomes(path)) == 2
    with path.open("a") as handle:
        handle.write(line[20:] + "\n")
    assert [o.step_id for o in read_outcomes(path)][-1] == "step_003"
    path.unlink()  # forgetting the history, then starting again
    assert read_outcomes(path) == []
    record_outcome(path, plan_id="q", fork_id="1", step_id="step_009", executor="command", accepted=True, attempt=1)
    assert [(o.plan_id, o.step_id) for o in read_outcomes(path)] == [("q", "step_009")]
    path.write_text("")  # emptied in place (same file, shorter): read again from the start
    assert read_outcomes(path) == []
