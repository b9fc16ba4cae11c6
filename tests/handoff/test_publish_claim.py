"""Publishing and claiming: exclusive publish, claim by rename, and tasks rejected before execution."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from conductor.canonical import (
    check_checksum,
    compute_checksum,
    pretty_bytes,
    seal,
    strict_loads,
)
from conductor.errors import StateConflict
from conductor.executors.command import CommandRunner
from conductor.fsutil import TEMP_PREFIX
from conductor.handoff.lease import claim_task
from conductor.handoff.publish import publish_task
from conductor.layout import ForkLayout
from conductor.models import Result
from conductor.worker import Worker, WorkerSettings
from tests.handoff.support import Handoff, make_handoff

HOLDER = "test-holder@here:1"


def _claim(handoff: Handoff, task_id: str, **kwargs):  # type: ignore[no-untyped-def]
    return claim_task(handoff.fork, task_id, holder=HOLDER, lease_seconds=30, **kwargs)


def _marker_worker(handoff: Handoff, marker: Path) -> Worker:
    """A worker whose command leaves a marker file: if the marker exists, a command ran."""
    runner = CommandRunner(f'echo "$CONDUCTOR_TASK_ID" >> {marker}', layout=handoff.layout)
    return Worker(handoff.layout, runner, WorkerSettings(poll_seconds=0.1), ignore=handoff.ignore)


# --- publish ------------------------------------------------------------------------------------


def test_published_file_is_strict_json_with_a_valid_checksum(handoff: Handoff) -> None:
    sealed = handoff.publish("step_001")

    path = handoff.task_path("pending", "step_001")
    document = strict_loads(path.read_bytes(), source=str(path))
    check_checksum(document, source=str(path))
    assert document["checksum"] == sealed.checksum == compute_checksum(document)
    assert document["schema"] == "conductor.task/v1"
    assert (document["task_id"], document["plan_id"], document["fork_id"], document["attempt"]) == (
        "step_001", handoff.plan.plan_id, handoff.fork.fork_id, 1)
    assert (handoff.root / document["workspace"]).is_dir()
    assert handoff.files_in("pending") == ["step_001.task.json"]  # no temp file left behind


def test_second_publish_is_a_state_conflict_and_never_overwrites(handoff: Handoff) -> None:
    handoff.publish("step_001")
    path = handoff.task_path("pending", "step_001")
    before = path.read_bytes()

    with pytest.raises(StateConflict):
        handoff.publish("step_001", instruction="Something else entirely.")

    assert path.read_bytes() == before
    assert handoff.files_in("pending") == ["step_001.task.json"]


def test_publish_refuses_a_step_that_is_in_progress(handoff: Handoff) -> None:
    handoff.publish("step_001")
    assert _claim(handoff, "step_001") is not None

    with pytest.raises(StateConflict):
        handoff.publish("step_001")

    assert handoff.where()["pending"] == []


def test_publish_race_past_the_existence_check_still_never_overwrites(
    handoff: Handoff, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two publishers that both passed ``find_task``: the ``os.link`` publish makes the second fail."""
    handoff.publish("step_001")
    path = handoff.task_path("pending", "step_001")
    before = path.read_bytes()
    monkeypatch.setattr(ForkLayout, "find_task", lambda self, task_id: None)

    with pytest.raises(StateConflict):
        publish_task(handoff.fork, handoff.build_task("step_001", instruction="Overwrite me."))

    assert path.read_bytes() == before
    assert handoff.files_in("pending") == ["step_001.task.json"]


# --- claim --------------------------------------------------------------------------------------


def test_claim_moves_the_task_and_returns_it(handoff: Handoff) -> None:
    sealed = handoff.publish("step_001")

    claim = _claim(handoff, "step_001")

    assert claim is not None
    assert claim.task == sealed
    assert handoff.where()["in_progress"] == ["step_001"]
    assert handoff.where()["pending"] == []


def test_claim_of_a_missing_task_returns_none(handoff: Handoff) -> None:
    assert _claim(handoff, "step_001") is None
    handoff.publish("step_002")
    assert _claim(handoff, "step_001") is None
    assert handoff.where()["pending"] == ["step_002"]


@pytest.mark.parametrize("claimers", [2, 16])
def test_exactly_one_of_many_racing_threads_wins_a_claim(handoff: Handoff, claimers: int) -> None:
    handoff.publish("step_001")
    barrier = threading.Barrier(claimers)
    outcomes: list[object] = []
    lock = threading.Lock()

    def race(index: int) -> None:
        barrier.wait(timeout=10)
        claim = claim_task(handoff.fork, "step_001", holder=f"racer-{index}", lease_seconds=30)
        with lock:
            outcomes.append(claim)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(claimers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(t.is_alive() for t in threads)

    winners = [o for o in outcomes if o is not None]
    assert len(outcomes) == claimers
    assert len(winners) == 1
    assert handoff.read_lease("step_001").holder == winners[0].lease.holder  # type: ignore[attr-defined]
    assert handoff.where() == {"pending": [], "in_progress": ["step_001"], "completed": [], "failed": []}


# --- tasks rejected before execution ------------------------------------------------------------


def _edit_keeping_checksum(path: Path) -> None:
    document = json.loads(path.read_bytes())
    document["instruction"] = "rm -rf / (an instruction nobody published)"
    path.write_bytes(pretty_bytes(document))  # the old checksum stays


def _malformed(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-20])


def _duplicate_key(path: Path) -> None:
    text = path.read_text("utf-8")
    path.write_text(text.replace('"instruction":', '"instruction": "first",\n  "instruction":', 1), "utf-8")


def _nan(path: Path) -> None:
    text = path.read_text("utf-8")
    document = json.loads(text)
    score = json.dumps(document["confidence"]["score"])
    path.write_text(text.replace(f'"score": {score}', '"score": NaN', 1), "utf-8")
    assert "NaN" in path.read_text("utf-8")


def _unknown_schema(path: Path) -> None:
    document = json.loads(path.read_bytes())
    document["schema"] = "conductor.task/v2"
    path.write_bytes(pretty_bytes(seal(document)))  # a valid checksum: only the version is wrong


def _other_plan(path: Path) -> None:
    document = json.loads(path.read_bytes())
    document["plan_id"] = "someone-elses-plan"
    path.write_bytes(pretty_bytes(seal(document)))


def _other_fork(path: Path) -> None:
    document = json.loads(path.read_bytes())
    document["fork_id"] = "beta"
    path.write_bytes(pretty_bytes(seal(document)))


def _other_step(path: Path) -> None:
    document = json.loads(path.read_bytes())
    document["task_id"] = "step_002"
    path.write_bytes(pretty_bytes(seal(document)))


def _invalid_field(path: Path) -> None:
    document = json.loads(path.read_bytes())
    document["timeout_seconds"] = 0
    path.write_bytes(pretty_bytes(seal(document)))


def _not_an_object(path: Path) -> None:
    path.write_bytes(b"[1, 2, 3]\n")


def _not_utf8(path: Path) -> None:
    path.write_bytes(b'{"schema": "\xff\xfe"}')


TAMPERING = {
    "edited_instruction": (_edit_keeping_checksum, "checksum_mismatch"),
    "malformed_json": (_malformed, "invalid_task"),
    "duplicate_key": (_duplicate_key, "invalid_task"),
    "nan": (_nan, "invalid_task"),
    "unknown_schema_version": (_unknown_schema, "invalid_task"),
    "plan_id_of_another_folder": (_other_plan, "invalid_task"),
    "fork_id_of_another_folder": (_other_fork, "invalid_task"),
    "task_id_of_another_file": (_other_step, "invalid_task"),
    "invalid_field": (_invalid_field, "invalid_task"),
    "not_an_object": (_not_an_object, "invalid_task"),
    "not_utf8": (_not_utf8, "invalid_task"),
}


def _assert_rejected(handoff: Handoff, kind: str, tampered: bytes) -> Result:
    assert handoff.where() == {"pending": [], "in_progress": [], "completed": [], "failed": ["step_001"]}
    assert handoff.task_path("failed", "step_001").read_bytes() == tampered  # kept as found, for inspection
    result = handoff.read_result("failed", "step_001")  # strict read: the result's own checksum is valid
    assert result.status == "failed"
    assert result.error is not None and result.error.kind == kind
    assert result.error.message
    assert not handoff.fork.lease_file("step_001").exists()
    return result


@pytest.mark.parametrize("name", list(TAMPERING))
def test_claim_rejects_a_bad_task_file_without_handing_it_out(handoff: Handoff, name: str) -> None:
    tamper, kind = TAMPERING[name]
    handoff.publish("step_001")
    path = handoff.task_path("pending", "step_001")
    tamper(path)
    tampered = path.read_bytes()
    events: list[tuple[str, dict]] = []

    claim = _claim(handoff, "step_001", on_event=lambda t, d: events.append((t, d)))

    assert claim is None
    _assert_rejected(handoff, kind, tampered)
    assert [t for t, _ in events] == ["task.rejected"]
    assert events[0][1]["kind"] == kind


@pytest.mark.parametrize("name", list(TAMPERING))
def test_worker_never_runs_a_bad_task_file(handoff: Handoff, tmp_path: Path, name: str) -> None:
    tamper, kind = TAMPERING[name]
    handoff.publish("step_001")
    handoff.publish("step_002")  # a good task beside it still runs
    tamper(handoff.task_path("pending", "step_001"))
    tampered = handoff.task_path("pending", "step_001").read_bytes()
    marker = tmp_path / "ran.txt"

    ran = _marker_worker(handoff, marker).run(burst=True)

    assert ran == 1
    assert marker.read_text().split() == ["step_002"]
    assert handoff.where() == {"pending": [], "in_progress": [], "completed": ["step_002"], "failed": ["step_001"]}
    assert handoff.task_path("failed", "step_001").read_bytes() == tampered
    result = handoff.read_result("failed", "step_001")
    assert result.error is not None and result.error.kind == kind


def test_checksum_mismatch_result_names_the_content_actually_seen(handoff: Handoff) -> None:
    sealed = handoff.publish("step_001")
    path = handoff.task_path("pending", "step_001")
    _edit_keeping_checksum(path)
    seen = compute_checksum(json.loads(path.read_bytes()))

    assert _claim(handoff, "step_001") is None

    result = handoff.read_result("failed", "step_001")
    assert result.task_checksum == seen != sealed.checksum
    assert result.attempt == 1


def test_task_pointing_its_executor_outside_the_scratch_area_is_not_run(handoff: Handoff, tmp_path: Path) -> None:
    """A well-formed, correctly checksummed task whose workspace is the project itself: never executed."""
    handoff.publish("step_001", workspace=".")
    marker = tmp_path / "ran.txt"

    _marker_worker(handoff, marker).run(burst=True)

    assert not marker.exists()
    assert handoff.where()["failed"] == ["step_001"]
    result = handoff.read_result("failed", "step_001")
    assert result.error is not None and result.error.kind == "workspace_error"
    assert result.files_changed == []


def test_pending_temp_files_are_never_claimed(handoff: Handoff, tmp_path: Path) -> None:
    """A publisher's half-written temp file in pending/ is not a task."""
    sealed = handoff.publish("step_001")
    temp = handoff.fork.state_dir("pending") / f"{TEMP_PREFIX}step_002.task.json.123.abcd"
    temp.write_bytes(b'{"schema": "conductor.ta')
    marker = tmp_path / "ran.txt"

    _marker_worker(handoff, marker).run(burst=True)

    assert marker.read_text().split() == [sealed.task_id]
    assert temp.exists()
    assert handoff.where()["failed"] == []


@pytest.mark.parametrize("name", ["step_1", "hello"])
def test_a_task_file_with_a_bad_name_is_rejected_not_fatal(tmp_path: Path, name: str) -> None:
    handoff = make_handoff(tmp_path / "project", steps=1)
    sealed = handoff.publish("step_001")
    stray = handoff.fork.state_dir("pending") / f"{name}.task.json"
    stray.write_bytes(handoff.task_path("pending", "step_001").read_bytes())
    marker = tmp_path / "ran.txt"

    _marker_worker(handoff, marker).run(burst=True)  # must not raise

    assert marker.read_text().split() == [sealed.task_id]
    assert name in handoff.where()["failed"]
