"""conductor.recovery on hand-made crash leftovers: each repair, its audit event, and what it must not touch."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from pathlib import Path

import pytest

import conductor.recovery as recovery_module
from conductor import ranking
from conductor.audit import AuditLog, verify_chain
from conductor.errors import StateConflict
from conductor.executors.command import CommandRunner
from conductor.fsutil import atomic_write
from conductor.handoff.documents import write_document
from conductor.handoff.lease import HOST, claim_task
from conductor.layout import ProjectLayout
from conductor.models import ErrorInfo, ExecutorInfo, Lease, Result, Task, Verdict, utc_now
from conductor.attempts import state_store
from conductor.ranking import apply_intent_file, apply_winner
from conductor.workspace.apply import ApplyPlan
from conductor.workspace.store import TreeEntry
from conductor.recovery import QUARANTINE, recover_project
from conductor.worker import Worker, WorkerSettings
from tests.fault.invariants import state_problems
from tests.handoff.support import Handoff, dead_pid, make_handoff

EXECUTOR = ExecutorInfo(id="test@here:1", kind="test")


@pytest.fixture
def handoff(tmp_path: Path) -> Handoff:
    return make_handoff(tmp_path / "project", steps=3)


def log_of(handoff: Handoff) -> AuditLog:
    return AuditLog(handoff.fork.audit_log)


def publish(handoff: Handoff, task_id: str) -> Task:
    """Publish attempt 1 and log it, as the engine does."""
    task = handoff.publish(task_id)
    log_of(handoff).append("task.published", {"step_id": task_id, "attempt": 1, "checksum": task.checksum})
    return task


def repairs(handoff: Handoff, what: str | None = None) -> list[dict]:
    logs = [log_of(handoff), AuditLog(handoff.layout.plan_dir(handoff.plan.plan_id) / "audit.log")]
    found = [e.data for log in logs for e in log.events() if e.type == "recovery.repaired"]
    return [r for r in found if what is None or r["what"] == what]


def quarantined(handoff: Handoff) -> list[str]:
    folder = handoff.fork.dir / QUARANTINE
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def result_for(task: Task, status: str = "completed") -> Result:
    now = utc_now()
    return Result(task_id=task.task_id, plan_id=task.plan_id, fork_id=task.fork_id, attempt=task.attempt,
                  fencing_token=task.attempt, task_checksum=task.checksum or "", status=status, executor=EXECUTOR,
                  summary="done", error=None if status == "completed" else ErrorInfo(kind="x", message="y"),
                  started_at=now, finished_at=now)


def temp_name(target: str, pid: int) -> str:
    return f".tmp.{target}.{pid}.deadbeef"


# --- temp files ---------------------------------------------------------------------------------


def test_abandoned_temp_files_are_removed_and_live_writers_keep_theirs(handoff: Handoff) -> None:
    pending = handoff.fork.state_dir("pending")
    dead, alive = dead_pid(), os.getppid()
    (pending / temp_name("step_001.task.json", dead)).write_text("{half")
    (pending / temp_name("step_002.task.json", alive)).write_text("{half")
    (pending / temp_name("step_003.task.json", os.getpid())).write_text("{half")
    scratch = handoff.layout.conductor_dir / "scratch" / f"plan_{handoff.plan.plan_id}" / f"fork_{handoff.fork.fork_id}"
    copy = scratch / temp_name("step_001.a1", dead)  # a checkout a crash interrupted
    (copy / "sub").mkdir(parents=True)
    index = scratch / temp_name("step_001.a1.index", dead)
    index.write_bytes(b"DIRC partial")

    report = recover_project(handoff.layout)

    left = sorted(p.name for p in pending.iterdir())
    assert left == sorted([temp_name("step_002.task.json", alive), temp_name("step_003.task.json", os.getpid())])
    assert not copy.exists() and not index.exists()
    removed = {r.path.rsplit("/", 1)[-1] for r in report.repairs if r.what == "temp_removed"}
    assert removed == {temp_name("step_001.task.json", dead), temp_name("step_001.a1", dead),
                       temp_name("step_001.a1.index", dead)}
    assert sorted(r["path"].rsplit("/", 1)[-1] for r in repairs(handoff, "temp_removed")) == sorted(removed)

    recover_project(handoff.layout, grace_seconds=0)  # our own pid's temp is judged by age; a live writer's never
    assert [p.name for p in pending.iterdir()] == [temp_name("step_002.task.json", alive)]
    (pending / ".tmp.no-pid-in-this-name").write_text("x")
    recover_project(handoff.layout, grace_seconds=0)
    assert [p.name for p in pending.iterdir()] == [temp_name("step_002.task.json", alive)]


def test_a_temp_named_file_that_belongs_to_the_project_is_never_swept(tmp_path: Path) -> None:
    name = temp_name("mine", dead_pid())
    handoff = make_handoff(tmp_path / "project", files={"README.md": "hi\n", name: "user data\n"})
    handoff.publish("step_001")
    in_attempt = handoff.scratch("step_001") / name

    recover_project(handoff.layout, plan_id=handoff.plan.plan_id, exclusive=True)

    assert handoff.fork_text(name) == "user data\n"  # the fork's state holds it
    assert (handoff.root / name).read_text() == "user data\n"
    assert in_attempt.read_text() == "user data\n"  # attempt folders are the agent's: never swept


# --- a task in two folders ----------------------------------------------------------------------


def test_a_task_in_two_folders_keeps_the_most_advanced_copy_and_quarantines_the_other(handoff: Handoff) -> None:
    publish(handoff, "step_001")
    shutil.copy2(handoff.task_path("pending", "step_001"), handoff.task_path("in_progress", "step_001"))

    report = recover_project(handoff.layout)

    assert handoff.where()["in_progress"] == ["step_001"] and handoff.where()["pending"] == []
    [moved] = quarantined(handoff)
    assert moved.endswith(".duplicate.pending.step_001.task.json")
    assert [r.what for r in report.repairs] == ["duplicate_quarantined"]
    assert repairs(handoff, "duplicate_quarantined")[0]["path"].endswith("pending/step_001.task.json")


def test_a_committed_completion_wins_over_a_newer_looking_copy(handoff: Handoff) -> None:
    task = publish(handoff, "step_001")
    claim = claim_task(handoff.fork, "step_001", holder="w", lease_seconds=60)
    assert claim is not None
    write_document(handoff.fork.sidecar("completed", "step_001", ".result.json"), result_for(task))
    shutil.copy2(handoff.task_path("in_progress", "step_001"), handoff.task_path("completed", "step_001"))

    recover_project(handoff.layout)

    assert handoff.where()["completed"] == ["step_001"] and handoff.where()["in_progress"] == []
    assert [n.split(".", 1)[1] for n in quarantined(handoff)] == ["duplicate.in_progress.step_001.task.json"]


def test_a_higher_attempt_wins_when_nothing_is_committed(handoff: Handoff) -> None:
    task = publish(handoff, "step_001")
    write_document(handoff.task_path("in_progress", "step_001"), task.model_copy(update={"attempt": 2}))
    log_of(handoff).append("task.published", {"step_id": "step_001", "attempt": 2, "checksum": "sha256:" + "0" * 64})

    recover_project(handoff.layout)

    assert handoff.where()["in_progress"] == ["step_001"]
    assert handoff.read_task("in_progress", "step_001").attempt == 2


def test_two_unreadable_copies_are_a_state_conflict(handoff: Handoff) -> None:
    handoff.task_path("pending", "step_001").write_text("{broken")
    handoff.task_path("failed", "step_001").write_text("{broken too")
    with pytest.raises(StateConflict, match="no copy is a valid task file"):
        recover_project(handoff.layout)


# --- completions that were never committed ------------------------------------------------------


def test_sidecars_of_an_uncommitted_completion_are_quarantined_and_the_task_stays(handoff: Handoff) -> None:
    task = publish(handoff, "step_001")
    claim = claim_task(handoff.fork, "step_001", holder="w", lease_seconds=60)
    assert claim is not None
    write_document(handoff.fork.sidecar("completed", "step_001", ".result.json"), result_for(task))
    atomic_write(handoff.fork.sidecar("completed", "step_001", ".explanation.md"), b"did it")
    lease_before = handoff.fork.lease_file("step_001").read_bytes()

    report = recover_project(handoff.layout)

    assert handoff.files_in("completed") == []
    assert handoff.where()["in_progress"] == ["step_001"]
    assert handoff.fork.lease_file("step_001").read_bytes() == lease_before  # a live lease is never touched
    assert sorted(n.split(".", 1)[1] for n in quarantined(handoff)) == [
        "uncommitted.completed.step_001.explanation.md", "uncommitted.completed.step_001.result.json"]
    assert [r.what for r in report.repairs] == ["uncommitted_quarantined"] * 2


def rejection_in_progress(handoff: Handoff) -> Task:
    """The verifier's rejection interrupted: verdict in failed/, result moved, task still in completed/."""
    task = publish(handoff, "step_001")
    durable = handoff.task_path("completed", "step_001")
    shutil.move(handoff.task_path("pending", "step_001"), durable)
    write_document(handoff.fork.sidecar("failed", "step_001", ".result.json"), result_for(task))
    atomic_write(handoff.fork.sidecar("completed", "step_001", ".explanation.md"), b"did it")
    verdict = Verdict(task_id="step_001", plan_id=task.plan_id, fork_id=task.fork_id, attempt=1, accepted=False,
                      reasons=["outside allowed_files: c.txt"], diff_lines=1, policy_digest=task.policy_digest,
                      decided_at=utc_now())
    write_document(handoff.fork.sidecar("failed", "step_001", ".verdict.json"), verdict)
    return task


def test_only_the_engine_finishes_an_interrupted_rejection(handoff: Handoff) -> None:
    rejection_in_progress(handoff)
    before = {state: handoff.files_in(state) for state in ("completed", "failed")}

    recover_project(handoff.layout)  # a worker starting: the engine may be in the middle of this very move
    assert {state: handoff.files_in(state) for state in ("completed", "failed")} == before

    report = recover_project(handoff.layout, plan_id=handoff.plan.plan_id, exclusive=True)
    assert handoff.files_in("completed") == []
    assert handoff.files_in("failed") == ["step_001.explanation.md", "step_001.result.json", "step_001.task.json",
                                          "step_001.verdict.json"]
    assert "rejection_finished" in [r.what for r in report.repairs]


# --- leases -------------------------------------------------------------------------------------


def lease(task_id: str, *, pid: int, seconds: str = "2099-01-01T00:00:00.000000Z") -> Lease:
    now = utc_now()
    return Lease(task_id=task_id, attempt=1, fencing_token=1, holder=f"w@{HOST}:{pid}", pid=pid, host=HOST,
                 acquired_at=now, renewed_at=now, expires_at=seconds)


def test_a_dead_lease_without_its_task_is_removed_and_a_live_one_kept(handoff: Handoff) -> None:
    publish(handoff, "step_001")
    publish(handoff, "step_002")
    write_document(handoff.fork.lease_file("step_001"), lease("step_001", pid=dead_pid()))
    write_document(handoff.fork.lease_file("step_002"), lease("step_002", pid=os.getppid()))

    report = recover_project(handoff.layout)

    assert handoff.files_in("in_progress") == ["step_002.lease.json"]
    assert [r.what for r in report.repairs] == ["lease_removed"]


# --- the audit log ------------------------------------------------------------------------------


def test_a_torn_last_line_is_cut_saved_and_recorded(handoff: Handoff) -> None:
    publish(handoff, "step_001")
    log = log_of(handoff)
    torn = b'{"data":{"attempt":1,"step_id":"step_0'
    with log.path.open("ab") as handle:
        handle.write(torn)
    assert not verify_chain(log.path).ok

    report = recover_project(handoff.layout)

    assert verify_chain(log.path).ok
    event = next(e for e in log.events() if e.type == "recovery.audit_truncated")
    assert event.data["bytes"] == len(torn)
    assert event.data["sha256"] == hashlib.sha256(torn).hexdigest()
    assert (handoff.root / event.data["saved_as"]).read_bytes() == torn
    assert [r.what for r in report.repairs] == ["audit_truncated"]


# --- events lost between an action and its record -----------------------------------------------


def test_a_lost_publish_event_is_restored_for_a_retry_always_and_for_attempt_1_by_the_engine(handoff: Handoff) -> None:
    first = handoff.publish("step_001")  # attempt 1, never logged
    retry = handoff.build_task("step_002", attempt=2)
    second = write_document(handoff.task_path("pending", "step_002"), retry, exclusive=True)

    recover_project(handoff.layout)
    restored = [(e.data["step_id"], e.data["attempt"], e.data["checksum"], e.data["reason"])
                for e in log_of(handoff).events() if e.type == "task.published"]
    assert restored == [("step_002", 2, second.checksum, "recovered")]

    recover_project(handoff.layout, plan_id=handoff.plan.plan_id, exclusive=True)
    restored = [(e.data["step_id"], e.data["attempt"]) for e in log_of(handoff).events() if e.type == "task.published"]
    assert restored == [("step_002", 2), ("step_001", 1)]
    assert first.checksum in {e.data["checksum"] for e in log_of(handoff).events() if e.type == "task.published"}


def test_a_lost_plan_created_event_is_restored_by_the_engine(handoff: Handoff) -> None:
    plan_log = handoff.layout.plan_dir(handoff.plan.plan_id) / "audit.log"
    plan_log.unlink()  # as if the crash came right after plan.json

    recover_project(handoff.layout, plan_id=handoff.plan.plan_id, exclusive=True)

    [created] = [e for e in AuditLog(plan_log).events() if e.type == "plan.created"]
    assert created.data["plan_checksum"] == handoff.plan.checksum


def test_a_verified_step_whose_merge_event_was_lost_gets_it_back_from_its_verdict(handoff: Handoff) -> None:
    task = publish(handoff, "step_001")
    shutil.move(handoff.task_path("pending", "step_001"), handoff.task_path("completed", "step_001"))
    write_document(handoff.fork.sidecar("completed", "step_001", ".result.json"), result_for(task))
    atomic_write(handoff.fork.sidecar("completed", "step_001", ".provenance.json"), b"{}")
    change = {"path": "README.md", "change": "modified", "sha256": "0" * 64, "lines_added": 1, "lines_removed": 1}
    verdict = write_document(handoff.fork.sidecar("completed", "step_001", ".verdict.json"), Verdict(
        task_id="step_001", plan_id=task.plan_id, fork_id=task.fork_id, attempt=1, accepted=True,
        files_changed=[change], diff_lines=2, policy_digest=task.policy_digest, decided_at=utc_now(),
        tree=state_store(handoff.layout).tree_of(handoff.head), commit=handoff.head))
    log_of(handoff).append("step.verified", {"step_id": "step_001", "attempt": 1, "accepted": True, "reasons": [],
                                             "diff_lines": 2, "files": ["README.md"], "checks": [],
                                             "verification": [], "verdict_checksum": verdict.checksum})

    recover_project(handoff.layout)  # a worker: the engine may be about to log it itself
    assert not [e for e in log_of(handoff).events() if e.type == "step.merged"]
    recover_project(handoff.layout, plan_id=handoff.plan.plan_id, exclusive=True)

    [merged] = [e for e in log_of(handoff).events() if e.type == "step.merged"]
    assert merged.data["files"] == ["README.md"] and merged.data["commit"] == verdict.commit
    assert repairs(handoff, "event_restored")[-1]["detail"].startswith("step.merged of step_001 attempt 1")


# --- disagreements no crash explains ------------------------------------------------------------


def test_a_completion_the_folders_contradict_is_a_state_conflict_naming_event_and_file(handoff: Handoff) -> None:
    publish(handoff, "step_001")
    event = log_of(handoff).append("task.completed", {"step_id": "step_001", "attempt": 1, "executor": "x",
                                                      "duration_seconds": 1.0})
    with pytest.raises(StateConflict) as caught:
        recover_project(handoff.layout)
    message = str(caught.value)
    assert f"seq {event.seq} task.completed step_001 attempt 1" in message
    assert "pending/step_001.task.json" in message and "refusing to guess" in message


def test_a_task_file_behind_its_published_attempt_is_a_state_conflict(handoff: Handoff) -> None:
    publish(handoff, "step_001")
    log_of(handoff).append("task.published", {"step_id": "step_001", "attempt": 2, "checksum": "sha256:" + "1" * 64})
    with pytest.raises(StateConflict, match="holds attempt 1"):
        recover_project(handoff.layout)


def test_a_published_task_that_vanished_is_a_state_conflict(handoff: Handoff) -> None:
    publish(handoff, "step_001")
    handoff.task_path("pending", "step_001").unlink()
    with pytest.raises(StateConflict, match="in no state folder"):
        recover_project(handoff.layout)


# --- the winner's apply -------------------------------------------------------------------------


def winner_with(handoff: Handoff, files: dict[str, str]) -> str:
    """A commit on top of the fork's state with ``files`` written (as a verified step would make it)."""
    store = state_store(handoff.layout)
    updates = {path: TreeEntry("100644", store.write_blob(text.encode())) for path, text in files.items()}
    return store.commit(store._tree_with(store.tree_of(handoff.head), updates), [handoff.head], "winner\n")


def apply(handoff: Handoff, winner: str) -> list:
    return apply_winner(handoff.layout, handoff.plan.plan_id, handoff.fork.fork_id,
                        base_commit=handoff.plan.base_commit, winner_commit=winner, ignore=[])


def half_applied(handoff: Handoff, monkeypatch: pytest.MonkeyPatch) -> list:
    """A winner changing two files, and a crash (in-process: an exception) after the first one was written."""
    winner = winner_with(handoff, {"README.md": "changed\n", "new.txt": "new\n"})
    real = ranking.write_changes

    def crash_after_first(store, root, plan):  # type: ignore[no-untyped-def]
        real(store, root, ApplyPlan(plan.user_tree, plan.result_tree, plan.changes[:1]))
        raise KeyboardInterrupt("crash")

    monkeypatch.setattr(ranking, "write_changes", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        apply(handoff, winner)
    monkeypatch.setattr(ranking, "write_changes", real)
    store = state_store(handoff.layout)
    return store.changes(store.tree_of(handoff.plan.base_commit), store.tree_of(winner))


def test_a_half_applied_winner_is_finished_from_its_intent(handoff: Handoff, monkeypatch: pytest.MonkeyPatch) -> None:
    changes = half_applied(handoff, monkeypatch)
    assert [c.path for c in changes] == ["README.md", "new.txt"]
    assert (handoff.root / "README.md").read_text() == "changed\n" and not (handoff.root / "new.txt").exists()
    assert apply_intent_file(handoff.layout, handoff.plan.plan_id).exists()

    report = recover_project(handoff.layout, plan_id=handoff.plan.plan_id, exclusive=True)

    assert (handoff.root / "new.txt").read_text() == "new\n" and (handoff.root / "README.md").read_text() == "changed\n"
    assert not apply_intent_file(handoff.layout, handoff.plan.plan_id).exists()
    assert [r.what for r in report.repairs] == ["apply_finished"]
    assert recover_project(handoff.layout, plan_id=handoff.plan.plan_id, exclusive=True).repairs == []  # idempotent


def test_an_apply_that_cannot_be_finished_is_a_state_conflict_and_keeps_its_intent(
    handoff: Handoff, monkeypatch: pytest.MonkeyPatch
) -> None:
    half_applied(handoff, monkeypatch)
    (handoff.root / "new.txt").write_text("a person wrote this meanwhile\n")

    with pytest.raises(StateConflict, match="cannot be finished"):
        recover_project(handoff.layout, plan_id=handoff.plan.plan_id, exclusive=True)

    assert apply_intent_file(handoff.layout, handoff.plan.plan_id).exists()
    assert (handoff.root / "new.txt").read_text() == "a person wrote this meanwhile\n"


def test_an_apply_refused_for_a_conflict_leaves_no_intent(handoff: Handoff) -> None:
    winner = winner_with(handoff, {"README.md": "changed\n"})
    (handoff.root / "README.md").write_text("edited by a person\n")
    with pytest.raises(StateConflict, match="README.md"):
        apply(handoff, winner)
    assert not apply_intent_file(handoff.layout, handoff.plan.plan_id).exists()
    assert (handoff.root / "README.md").read_text() == "edited by a person\n"


def test_an_apply_keeps_the_users_edits_to_other_lines_of_the_same_file(handoff: Handoff) -> None:
    lines = "".join(f"line {i}\n" for i in range(30))
    (handoff.root / "README.md").write_text(lines)
    # The plan began with README.md = "hello\n"; a new plan would see the edit, so make one on top of it.
    store = state_store(handoff.layout)
    base = store.snapshot_project(ignore=[], message="base\n")
    winner = store.commit(store._tree_with(store.tree_of(base), {
        "README.md": TreeEntry("100644", store.write_blob(lines.replace("line 25\n", "line 25 (agent)\n").encode()))}),
        [base], "winner\n")
    (handoff.root / "README.md").write_text(lines.replace("line 2\n", "line 2 (user)\n"))
    apply_winner(handoff.layout, handoff.plan.plan_id, handoff.fork.fork_id, base_commit=base, winner_commit=winner,
                 ignore=[])
    text = (handoff.root / "README.md").read_text()
    assert "line 2 (user)" in text and "line 25 (agent)" in text


# --- live workers -------------------------------------------------------------------------------


class SlowRunner:
    """Writes README.md after a short pause, so recovery passes run while tasks are in flight."""

    info = EXECUTOR

    def run(self, task, workspace, should_stop):  # type: ignore[no-untyped-def]
        from conductor.executors.base import Outcome

        threading.Event().wait(0.02)
        (workspace / "README.md").write_text(f"{task.task_id}\n")
        return Outcome("completed", "wrote", "wrote README.md")


def test_recovery_running_beside_a_live_worker_touches_nothing_of_it(tmp_path: Path) -> None:
    handoff = make_handoff(tmp_path / "project", steps=12)
    for task_id in handoff.step_ids:
        publish(handoff, task_id)
    worker = Worker(handoff.layout, SlowRunner(), WorkerSettings(poll_seconds=0.05), ignore=[])
    thread = threading.Thread(target=worker.run, kwargs={"burst": True})
    thread.start()
    passes = 0
    while thread.is_alive():
        report = recover_project(handoff.layout)
        assert report.repairs == []
        passes += 1
    thread.join()
    assert passes > 1
    assert handoff.where()["completed"] == handoff.step_ids
    assert quarantined(handoff) == []
    assert state_problems(handoff.root, finished=True) == []


def test_recovery_of_a_clean_project_does_nothing(handoff: Handoff) -> None:
    publish(handoff, "step_001")
    assert recover_project(handoff.layout, plan_id=handoff.plan.plan_id, exclusive=True).repairs == []
    assert recover_project(ProjectLayout(handoff.root / "nowhere")).repairs == []


def test_an_intent_altered_after_the_crash_is_refused_not_followed(handoff: Handoff, monkeypatch: pytest.MonkeyPatch) -> None:
    """Recovery follows apply.intent.json only when its checksum holds: an intent redirected to another
    tree (here: one that would delete README.md) is a StateConflict and the project is left as it is."""
    half_applied(handoff, monkeypatch)
    path = apply_intent_file(handoff.layout, handoff.plan.plan_id)
    document = json.loads(path.read_text())
    document["result_tree"] = document["user_tree"]  # "finish" by putting the files back as they were
    document["changes"] = [c for c in document["changes"] if c["path"] == "README.md"]
    path.write_text(json.dumps(document))  # the checksum no longer matches
    before = (handoff.root / "README.md").read_text()

    with pytest.raises(StateConflict, match="unreadable"):
        recover_project(handoff.layout, plan_id=handoff.plan.plan_id, exclusive=True)

    assert (handoff.root / "README.md").read_text() == before and path.exists()


# --- what recovery reads --------------------------------------------------------------------------


def test_recovery_reads_only_the_task_files_the_log_does_not_account_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    handoff = make_handoff(tmp_path / "project", steps=6)
    for task_id in handoff.step_ids:
        publish(handoff, task_id)
    worker = Worker(handoff.layout, CommandRunner("true", layout=handoff.layout), WorkerSettings(), ignore=[])
    for _ in range(4):
        assert worker.process_once() == 1
    completed, pending = handoff.where()["completed"], handoff.where()["pending"]
    # One completion whose task.completed event was lost (a crash at complete.before_event): the log is
    # rewritten without that event.
    unlogged = completed[0]
    events = AuditLog(handoff.fork.audit_log).events()
    rebuilt = AuditLog(tmp_path / "rebuilt.log")
    for event in events:
        if not (event.type == "task.completed" and event.data["step_id"] == unlogged):
            rebuilt.append(event.type, event.data)
    os.replace(rebuilt.path, handoff.fork.audit_log)
    read: list[str] = []
    real_read = recovery_module._read_task

    def counting(path: Path):  # type: ignore[no-untyped-def]
        read.append(f"{path.parent.name}/{path.name}")
        return real_read(path)

    monkeypatch.setattr(recovery_module, "_read_task", counting)

    # The attacker edits a pending task's instruction and leaves its attempt and checksum fields alone.
    tampered = handoff.task_path("pending", pending[0])
    document = json.loads(tampered.read_bytes())
    document["instruction"] = "rm -rf ~"
    tampered.write_text(json.dumps(document))

    assert recover_project(handoff.layout).repairs == []

    # Only the completion the log does not account for: not the three completions it does, and not the
    # pending tasks, whose bytes claim the attempt and checksum their task.published events name.
    assert read == [f"completed/{unlogged}.task.json"]
    # The tampered one is refused unexecuted by whoever claims it, as without a crash.
    assert claim_task(handoff.fork, pending[0], holder="x@here:1", lease_seconds=30) is None
    assert handoff.read_result("failed", pending[0]).error.kind == "checksum_mismatch"


def test_recovery_reads_an_in_flight_task_file_that_is_not_what_the_log_published(handoff: Handoff) -> None:
    """A retry published whose task.published event a crash lost: the file claims another attempt than the
    log's last publication, so it is read strictly and the event restored."""
    task = publish(handoff, "step_001")
    retry = task.model_copy(update={"attempt": 2, "checksum": None})
    handoff.task_path("pending", "step_001").unlink()
    write_document(handoff.task_path("pending", "step_001"), retry)

    repairs = recover_project(handoff.layout, exclusive=True).repairs

    assert [r.what for r in repairs] == ["event_restored"]
    published = [e.data for e in AuditLog(handoff.fork.audit_log).events() if e.type == "task.published"]
    assert published[-1]["attempt"] == 2 and published[-1]["reason"] == "recovered"


def test_a_completed_task_file_the_log_does_not_account_for_is_still_checked(handoff: Handoff) -> None:
    publish(handoff, "step_001")
    claim = claim_task(handoff.fork, "step_001", holder="x@here:1", lease_seconds=30)
    assert claim is not None
    os.rename(claim.task_path, handoff.task_path("completed", "step_001"))  # completed, never logged as such
    handoff.fork.lease_file("step_001").unlink()
    log_of(handoff).append("task.published", {"step_id": "step_001", "attempt": 2, "checksum": "sha256:" + "2" * 64})
    with pytest.raises(StateConflict, match="completed/step_001.task.json holds attempt 1"):
        recover_project(handoff.layout)


def test_a_running_plan_sweeps_the_temp_files_a_killed_writer_left(handoff: Handoff) -> None:
    """The engine runs this for every fork before a plan finishes: a worker SIGKILLed between writing a
    result's temp file and renaming it leaves the temp behind, and no process start follows to sweep it."""
    from conductor.recovery import sweep_fork_leftovers

    folder = handoff.fork.state_dir("completed")
    folder.mkdir(parents=True, exist_ok=True)
    dead = folder / f".tmp.step_001.result.json.{dead_pid()}.0123abcd"
    live = folder / f".tmp.step_002.result.json.{os.getppid()}.0123abcd"  # a writer still at work
    dead.write_text("{")
    live.write_text("{")

    repairs = sweep_fork_leftovers(handoff.fork, AuditLog(handoff.fork.audit_log))

    assert not dead.exists() and live.exists()
    assert [r.what for r in repairs] == ["temp_removed"]
    assert [e.data["what"] for e in AuditLog(handoff.fork.audit_log).events() if e.type == "recovery.repaired"] == [
        "temp_removed"]


def test_a_running_plan_removes_the_lease_a_worker_killed_after_its_commit_left(handoff: Handoff) -> None:
    """A worker SIGKILLed between moving its task to completed/ and removing its lease leaves the lease; the
    engine's sweep before the plan finishes removes it (its holder is gone), not a live holder's."""
    from conductor.recovery import sweep_fork_leftovers

    folder = handoff.fork.state_dir("in_progress")
    folder.mkdir(parents=True, exist_ok=True)
    now = "2026-01-01T00:00:00.000000Z"
    far = "2999-01-01T00:00:00.000000Z"
    for step, pid in (("step_001", dead_pid()), ("step_002", os.getppid())):
        write_document(handoff.fork.lease_file(step), Lease(
            task_id=step, attempt=1, fencing_token=1, holder=f"w@{HOST}:{pid}", pid=pid, host=HOST,
            acquired_at=now, renewed_at=now, expires_at=far))

    repairs = sweep_fork_leftovers(handoff.fork, AuditLog(handoff.fork.audit_log))

    assert not handoff.fork.lease_file("step_001").exists() and handoff.fork.lease_file("step_002").exists()
    assert [r.what for r in repairs] == ["lease_removed"]
