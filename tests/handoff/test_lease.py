"""Leases: written on claim, renewed by heartbeat, reaped when over; a stale holder can never commit."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from conductor.attempts import attempt_changes, prepare_retry
from conductor.canonical import check_checksum, strict_loads
from conductor.errors import LeaseLost, StateConflict
from conductor.executors.base import execute_claim
from conductor.executors.command import CommandRunner
from conductor.handoff import reaper as reaper_module
from conductor.handoff.complete import complete_task
from conductor.handoff.documents import MAX_DOCUMENT_BYTES, write_document
from conductor.handoff.lease import Claim, claim_task, renew_lease
from conductor.handoff.publish import publish_task
from conductor.handoff.reaper import reap_expired
from conductor.models import ExecutorInfo, Result, parse_time, utc_now
from conductor.worker import Worker, WorkerSettings
from tests.handoff.support import Handoff, dead_pid, make_handoff, wait_for

LEASE = 30.0


def _claim(handoff: Handoff, task_id: str = "step_001", *, holder: str = "holder-a@here:1", lease: float = LEASE) -> Claim:
    claim = claim_task(handoff.fork, task_id, holder=holder, lease_seconds=lease)
    assert claim is not None
    return claim


def _reap(handoff: Handoff, *, after: float = 0.0, max_attempts: int = 3, lease: float = LEASE):  # type: ignore[no-untyped-def]
    """Run the reaper as if ``after`` seconds had passed, giving retries a fresh workspace as Conductor does."""
    return reap_expired(
        handoff.fork,
        max_attempts=max_attempts,
        lease_seconds=lease,
        now=datetime.now(UTC) + timedelta(seconds=after),
        prepare_retry=lambda task: prepare_retry(handoff.layout, task),
    )


def _result(claim: Claim, status: str = "completed") -> Result:
    now = utc_now()
    return Result(
        task_id=claim.task.task_id, plan_id=claim.task.plan_id, fork_id=claim.task.fork_id,
        attempt=claim.task.attempt, fencing_token=claim.lease.fencing_token,
        task_checksum=claim.task.checksum or "", status=status,  # type: ignore[arg-type]
        executor=ExecutorInfo(id=claim.lease.holder, kind="test"), summary="zombie says: done",
        started_at=now, finished_at=now,
    )


def _tree(handoff: Handoff) -> dict[str, bytes]:
    """Every file of the fork's handoff folder (not the lock files) with its bytes."""
    return {
        p.relative_to(handoff.fork.dir).as_posix(): p.read_bytes()
        for p in sorted(handoff.fork.dir.rglob("*"))
        if p.is_file() and not p.name.endswith(".lock")
    }


# --- the lease of a claim -----------------------------------------------------------------------


def test_claim_writes_a_lease_with_fencing_token_holder_pid_and_host(handoff: Handoff) -> None:
    handoff.publish("step_001")
    before = datetime.now(UTC)

    claim = _claim(handoff, lease=LEASE)

    path = handoff.fork.lease_file("step_001")
    check_checksum(strict_loads(path.read_bytes()))
    lease = handoff.read_lease("step_001")
    assert lease == claim.lease
    assert lease.task_id == "step_001"
    assert lease.attempt == lease.fencing_token == claim.task.attempt == 1
    assert lease.holder == "holder-a@here:1"
    assert lease.pid == os.getpid()
    assert lease.host == socket.gethostname()
    expires = parse_time(lease.expires_at)
    assert before + timedelta(seconds=LEASE - 1) <= expires <= datetime.now(UTC) + timedelta(seconds=LEASE)


def test_renew_lease_extends_expires_at_on_disk(handoff: Handoff) -> None:
    handoff.publish("step_001")
    claim = _claim(handoff, lease=5)
    first = claim.lease

    time.sleep(0.01)
    renewed = renew_lease(claim, lease_seconds=600)

    on_disk = handoff.read_lease("step_001")
    assert on_disk == renewed == claim.lease
    assert parse_time(renewed.expires_at) > parse_time(first.expires_at) + timedelta(seconds=500)
    assert parse_time(renewed.renewed_at) > parse_time(first.renewed_at)
    assert (renewed.acquired_at, renewed.fencing_token, renewed.holder) == (first.acquired_at, 1, first.holder)


def test_a_live_lease_is_not_reaped(handoff: Handoff) -> None:
    handoff.publish("step_001")
    _claim(handoff)

    assert _reap(handoff, after=LEASE - 5) == []
    assert handoff.where()["in_progress"] == ["step_001"]


# --- reaping and zombies ------------------------------------------------------------------------


def test_reaper_requeues_an_expired_task_as_a_new_attempt_with_a_fresh_workspace(handoff: Handoff) -> None:
    sealed = handoff.publish("step_001")
    zombie = _claim(handoff)
    old_workspace = handoff.root / zombie.task.workspace
    (old_workspace / "README.md").write_text("the zombie's edit\n")
    (old_workspace / "junk.txt").write_text("left by the zombie\n")

    reaped = _reap(handoff, after=LEASE + 1)

    assert [(r.task_id, r.attempt, r.outcome, r.holder) for r in reaped] == [("step_001", 1, "requeued", "holder-a@here:1")]
    assert handoff.where() == {"pending": ["step_001"], "in_progress": [], "completed": [], "failed": []}
    assert not handoff.fork.lease_file("step_001").exists()
    retry = handoff.read_task("pending", "step_001")  # strict read: its checksum is valid
    assert retry.attempt == 2
    assert retry.checksum != sealed.checksum
    assert retry.model_dump(exclude={"attempt", "checksum", "created_at", "workspace"}) == sealed.model_dump(
        exclude={"attempt", "checksum", "created_at", "workspace"})
    new_workspace = handoff.root / retry.workspace
    assert new_workspace == handoff.scratch("step_001", 2).resolve() != old_workspace.resolve()
    assert attempt_changes(handoff.layout, new_workspace, retry.base_commit, [])[1] == []
    assert sorted(p.name for p in new_workspace.iterdir()) == [".git", "README.md"]
    assert (old_workspace / "junk.txt").exists()  # the zombie's folder is never reused
    assert (new_workspace / "README.md").read_text() == "hello\n"


def test_zombie_cannot_renew_or_complete_after_its_task_was_requeued(handoff: Handoff) -> None:
    handoff.publish("step_001")
    zombie = _claim(handoff)
    _reap(handoff, after=LEASE + 1)
    tree = _tree(handoff)

    with pytest.raises(LeaseLost):
        renew_lease(zombie, lease_seconds=LEASE)
    for status in ("completed", "failed"):
        with pytest.raises(LeaseLost):
            complete_task(zombie, _result(zombie, status), explanation="zombie", provenance=b"{}")

    assert _tree(handoff) == tree  # nothing written, nothing moved


def test_zombie_cannot_touch_the_new_attempt_of_another_holder(handoff: Handoff) -> None:
    handoff.publish("step_001")
    zombie = _claim(handoff, holder="holder-a@here:1")
    _reap(handoff, after=LEASE + 1)
    fresh = _claim(handoff, holder="holder-b@here:2")
    assert (fresh.task.attempt, fresh.lease.fencing_token) == (2, 2)
    tree = _tree(handoff)

    with pytest.raises(LeaseLost):
        renew_lease(zombie, lease_seconds=LEASE)
    with pytest.raises(LeaseLost):
        complete_task(zombie, _result(zombie), explanation="zombie", provenance=b"{}")
    assert _tree(handoff) == tree

    committed = complete_task(fresh, _result(fresh), explanation="fresh")
    assert handoff.where()["completed"] == ["step_001"]
    assert handoff.read_result("completed", "step_001") == committed
    assert (committed.attempt, committed.fencing_token) == (2, 2)
    with pytest.raises(LeaseLost):  # and after the commit, the zombie still cannot overwrite it
        complete_task(zombie, _result(zombie), explanation="zombie")
    assert handoff.read_result("completed", "step_001") == committed


def test_the_same_process_holding_a_stale_claim_is_still_fenced(handoff: Handoff) -> None:
    """The fencing token, not the holder name, decides: one worker process re-claiming its own task."""
    handoff.publish("step_001")
    stale = _claim(handoff, holder="worker@here:7")
    _reap(handoff, after=LEASE + 1)
    current = _claim(handoff, holder="worker@here:7")

    with pytest.raises(LeaseLost):
        complete_task(stale, _result(stale), explanation="stale")
    complete_task(current, _result(current), explanation="current")
    assert handoff.read_result("completed", "step_001").attempt == 2


@pytest.mark.parametrize("max_attempts", [1, 2, 3])
def test_after_max_attempts_an_expired_task_fails_with_lease_expired(handoff: Handoff, max_attempts: int) -> None:
    handoff.publish("step_001")
    for attempt in range(1, max_attempts):
        assert _claim(handoff).task.attempt == attempt
        (reaped,) = _reap(handoff, after=LEASE + 1, max_attempts=max_attempts)
        assert reaped.outcome == "requeued"
    last = _claim(handoff)
    assert last.task.attempt == max_attempts

    (reaped,) = _reap(handoff, after=LEASE + 1, max_attempts=max_attempts)

    assert (reaped.outcome, reaped.attempt) == ("failed", max_attempts)
    assert handoff.where() == {"pending": [], "in_progress": [], "completed": [], "failed": ["step_001"]}
    assert handoff.files_in("in_progress") == []
    result = handoff.read_result("failed", "step_001")
    assert result.error is not None and result.error.kind == "lease_expired"
    assert (result.status, result.attempt, result.task_checksum) == ("failed", max_attempts, last.task.checksum)
    assert handoff.read_task("failed", "step_001") == last.task
    with pytest.raises(LeaseLost):
        complete_task(last, _result(last), explanation="too late")


def test_a_lease_whose_holder_died_on_this_host_is_expired_at_once(handoff: Handoff) -> None:
    handoff.publish("step_001")
    claim = _claim(handoff, lease=3600)
    write_document(handoff.fork.lease_file("step_001"), claim.lease.model_copy(update={"pid": dead_pid()}))

    (reaped,) = _reap(handoff, after=0, lease=3600)

    assert reaped.outcome == "requeued"
    assert handoff.read_task("pending", "step_001").attempt == 2


def test_a_live_holder_or_a_holder_on_another_host_keeps_its_lease(handoff: Handoff) -> None:
    handoff.publish("step_001")
    claim = _claim(handoff, lease=3600)
    alive = subprocess.Popen(["sleep", "30"])
    try:
        write_document(handoff.fork.lease_file("step_001"), claim.lease.model_copy(update={"pid": alive.pid}))
        assert _reap(handoff, lease=3600) == []
        # A dead pid means nothing on another host: only the lease's time counts there.
        write_document(handoff.fork.lease_file("step_001"),
                       claim.lease.model_copy(update={"pid": dead_pid(), "host": "another-host.example"}))
        assert _reap(handoff, lease=3600) == []
        assert handoff.where()["in_progress"] == ["step_001"]
        assert _reap(handoff, after=3601, lease=3600)[0].outcome == "requeued"
    finally:
        alive.kill()
        alive.wait()


def test_an_in_progress_task_without_a_lease_is_reaped_after_lease_seconds(handoff: Handoff) -> None:
    """A claimer that died between the rename and the lease write leaves a task without a lease."""
    handoff.publish("step_001")
    os.rename(handoff.task_path("pending", "step_001"), handoff.task_path("in_progress", "step_001"))

    assert _reap(handoff, after=0, lease=LEASE) == []
    assert _reap(handoff, after=LEASE - 2, lease=LEASE) == []
    (reaped,) = _reap(handoff, after=LEASE + 2, lease=LEASE)

    assert (reaped.outcome, reaped.holder) == ("requeued", None)
    assert handoff.read_task("pending", "step_001").attempt == 2


def test_an_unreadable_lease_counts_as_no_lease(handoff: Handoff) -> None:
    handoff.publish("step_001")
    _claim(handoff, lease=3600)
    handoff.fork.lease_file("step_001").write_text("{ torn")

    assert _reap(handoff, after=0) == []
    assert _reap(handoff, after=LEASE + 2)[0].outcome == "requeued"


def test_a_claim_and_its_renewals_cost_no_fsync(handoff: Handoff, monkeypatch: pytest.MonkeyPatch) -> None:
    """A claim guards nothing across a power loss (docs/protocol.md, section 5): the reboot ends its holder,
    and a task found back in pending/, or in in_progress/ with its lease missing or unreadable, is claimed
    again or re-queued. So neither the claim's rename, its lease nor a renewal waits for the disk."""
    import conductor.fsutil as fsutil

    synced: list[str] = []
    real = fsutil.fsync_fd
    monkeypatch.setattr(fsutil, "fsync_fd", lambda fd, path=None: (synced.append(str(path)), real(fd, path))[1])
    handoff.publish("step_001")
    synced.clear()
    claim = _claim(handoff)
    renew_lease(claim, lease_seconds=60, pgid=os.getpid())
    assert synced == []
    assert handoff.read_lease("step_001").pgid == os.getpid()


def test_a_lease_a_power_loss_left_unwritten_counts_as_no_lease(handoff: Handoff) -> None:
    """Without an fsync, a power loss can leave the lease's name on blocks never written: zeros."""
    handoff.publish("step_001")
    _claim(handoff, lease=3600)
    lease = handoff.fork.lease_file("step_001")
    lease.write_bytes(b"\0" * lease.stat().st_size)

    assert _reap(handoff, after=0) == []
    assert _reap(handoff, after=LEASE + 2)[0].outcome == "requeued"


def test_reaper_rejects_a_tampered_in_progress_task(handoff: Handoff) -> None:
    handoff.publish("step_001")
    _claim(handoff)
    path = handoff.task_path("in_progress", "step_001")
    path.write_bytes(path.read_bytes().replace(b"Do step 1.", b"Do evil 1."))

    (reaped,) = _reap(handoff, after=LEASE + 1)

    assert reaped.outcome == "failed"
    assert handoff.where()["failed"] == ["step_001"]
    result = handoff.read_result("failed", "step_001")
    assert result.error is not None and result.error.kind == "checksum_mismatch"


def test_reaper_rejects_an_in_progress_task_file_too_large_to_read(handoff: Handoff) -> None:
    handoff.publish("step_001")
    _claim(handoff)
    path = handoff.task_path("in_progress", "step_001")
    path.write_bytes(b"{" + b" " * MAX_DOCUMENT_BYTES + b"}")

    (reaped,) = _reap(handoff, after=LEASE + 1)

    assert reaped.outcome == "failed"
    assert handoff.where()["failed"] == ["step_001"]
    result = handoff.read_result("failed", "step_001")
    assert result.error is not None and result.error.kind == "invalid_task"


def _between_look_and_lock(monkeypatch: pytest.MonkeyPatch, act) -> None:  # type: ignore[no-untyped-def]
    """Run ``act`` after the reaper's unlocked look, just before it takes the fork lock."""
    real = reaper_module.fork_lock

    def lock(fork):  # type: ignore[no-untyped-def]
        act()
        return real(fork)

    monkeypatch.setattr(reaper_module, "fork_lock", lock)


def test_a_task_tampered_after_the_reapers_first_look_is_read_strictly_and_rejected(
    handoff: Handoff, monkeypatch: pytest.MonkeyPatch
) -> None:
    handoff.publish("step_001")
    _claim(handoff)
    path = handoff.task_path("in_progress", "step_001")
    _between_look_and_lock(monkeypatch, lambda: path.write_bytes(path.read_bytes().replace(b"Do step 1.", b"Do evil 1.")))

    (reaped,) = _reap(handoff, after=LEASE + 1)

    assert reaped.outcome == "failed"
    result = handoff.read_result("failed", "step_001")
    assert result.error is not None and result.error.kind == "checksum_mismatch"
    assert handoff.where()["pending"] == []


def test_a_lease_renewed_after_the_reapers_first_look_keeps_its_task(
    handoff: Handoff, monkeypatch: pytest.MonkeyPatch
) -> None:
    handoff.publish("step_001")
    claim = _claim(handoff, lease=5)
    renewed = []
    _between_look_and_lock(monkeypatch, lambda: renewed.append(renew_lease(claim, lease_seconds=3600)))

    assert _reap(handoff, after=60, lease=5) == []
    assert len(renewed) == 1  # the look found the lease over, and the lock found it renewed
    assert handoff.where()["in_progress"] == ["step_001"]
    assert handoff.read_lease("step_001") == renewed[0]


# --- heartbeats during a real execution ---------------------------------------------------------


def test_heartbeat_keeps_a_long_task_alive_past_its_lease(handoff: Handoff) -> None:
    handoff.publish("step_001")
    claim = _claim(handoff, lease=0.6)
    runner = CommandRunner("sleep 2", layout=handoff.layout)
    reaped: list = []
    done = threading.Event()

    def reaper_loop() -> None:
        while not done.is_set():
            reaped.extend(reap_expired(handoff.fork, max_attempts=3, lease_seconds=0.6))
            time.sleep(0.05)

    thread = threading.Thread(target=reaper_loop)
    thread.start()
    try:
        result = execute_claim(handoff.layout, claim, runner, ignore=[], lease_seconds=0.6, heartbeat_seconds=0.1)
    finally:
        done.set()
        thread.join(timeout=10)

    assert reaped == []
    assert result is not None and result.status == "completed"
    assert handoff.where()["completed"] == ["step_001"]


def test_a_holder_that_loses_its_lease_stops_its_command_and_commits_nothing(handoff: Handoff, tmp_path: Path) -> None:
    handoff.publish("step_001")
    claim = _claim(handoff, lease=LEASE)
    started = tmp_path / "started"
    runner = CommandRunner(f"touch {started}; sleep 30; echo late > README.md", layout=handoff.layout)
    outcome: list = []
    thread = threading.Thread(target=lambda: outcome.append(execute_claim(
        handoff.layout, claim, runner, ignore=[], lease_seconds=LEASE, heartbeat_seconds=0.1)))
    began = time.monotonic()
    thread.start()
    try:
        wait_for(started.exists, timeout=10, what="the command to start")
        assert _reap(handoff, after=LEASE + 1)[0].outcome == "requeued"
        thread.join(timeout=15)
        assert not thread.is_alive()
    finally:
        thread.join(timeout=30)

    assert outcome == [None]
    assert time.monotonic() - began < 15  # the sleep 30 was stopped, not waited out
    assert handoff.where() == {"pending": ["step_001"], "in_progress": [], "completed": [], "failed": []}
    assert handoff.files_in("completed") == handoff.files_in("failed") == []
    assert (handoff.root / claim.task.workspace / "README.md").read_text() == "hello\n"


# --- regressions: bugs these tests found (fixed in 14ac897) and the states the fix introduced -----


def test_a_claim_racing_a_requeue_never_loses_the_task(handoff: Handoff, monkeypatch: pytest.MonkeyPatch) -> None:
    handoff.publish("step_001")
    _claim(handoff, holder="dead-holder@here:1")
    racing: list[Claim | None] = []
    real_publish = reaper_module.publish_documents

    def publish_then_race(items):  # type: ignore[no-untyped-def]
        written = real_publish(items)
        assert [path.parent.name for path, _ in items] == ["pending"]
        # another worker's claim lands right after the retry is published
        racing.append(claim_task(handoff.fork, "step_001", holder="fast-worker@here:2", lease_seconds=LEASE))
        return written

    monkeypatch.setattr(reaper_module, "publish_documents", publish_then_race)
    _reap(handoff, after=LEASE + 1)
    monkeypatch.undo()

    assert handoff.fork.find_task("step_001") is not None, "the task vanished from every state folder"
    (claim,) = racing
    assert claim is not None and claim.task.attempt == 2  # the retry was claimable the moment it appeared
    complete_task(claim, _result(claim), explanation="done")  # whoever holds the task can commit it
    assert handoff.where()["completed"] == ["step_001"]


def test_reaper_survives_a_badly_named_in_progress_file(tmp_path: Path) -> None:
    handoff = make_handoff(tmp_path / "project", steps=1)
    handoff.publish("step_001")
    stray = handoff.fork.state_dir("in_progress") / "step_1.task.json"
    stray.write_bytes(b"{ not a task")

    _reap(handoff, after=LEASE + 1)  # must not raise

    assert "step_1" in handoff.where()["failed"]
    assert handoff.where()["pending"] == ["step_001"]


def test_a_requeue_interrupted_by_a_crash_is_finished_by_the_next_reaper(handoff: Handoff, tmp_path: Path) -> None:
    handoff.publish("step_001")
    claim = _claim(handoff, holder="crashed-worker@here:1")
    write_document(handoff.fork.lease_file("step_001"), claim.lease.model_copy(update={"pid": dead_pid()}))
    # The state a kill -9 of the reaper leaves right after requeue_task published the retry:
    retry = prepare_retry(handoff.layout, claim.task.model_copy(update={"attempt": 2, "created_at": utc_now()}))
    write_document(handoff.task_path("pending", "step_001"), retry, exclusive=True)
    marker = tmp_path / "ran.txt"
    runner = CommandRunner(f'echo "$CONDUCTOR_TASK_ID $CONDUCTOR_ATTEMPT" >> {marker}', layout=handoff.layout)

    Worker(handoff.layout, runner, WorkerSettings(), ignore=[]).run(burst=True)  # must not raise

    assert marker.read_text().splitlines() == ["step_001 2"]
    assert handoff.where() == {"pending": [], "in_progress": [], "completed": ["step_001"], "failed": []}


def _park(handoff: Handoff, claim: Claim) -> Path:
    """The state a kill -9 leaves right after ``requeue_task`` parked the old attempt (lease removed)."""
    parked = handoff.task_path("in_progress", "step_001").with_name("step_001.task.json" + reaper_module.PARKED_SUFFIX)
    os.rename(handoff.task_path("in_progress", "step_001"), parked)
    handoff.fork.lease_file("step_001").unlink()
    return parked


@pytest.mark.parametrize("retry_published", [False, True])
def test_a_requeue_interrupted_after_parking_is_finished_by_the_next_worker(
    handoff: Handoff, tmp_path: Path, retry_published: bool
) -> None:
    handoff.publish("step_001")
    claim = _claim(handoff, holder="crashed-worker@here:1")
    parked = _park(handoff, claim)
    if retry_published:
        retry = prepare_retry(handoff.layout, claim.task.model_copy(update={"attempt": 2, "created_at": utc_now()}))
        write_document(handoff.task_path("pending", "step_001"), retry, exclusive=True)
    marker = tmp_path / "ran.txt"
    runner = CommandRunner(f'echo "$CONDUCTOR_TASK_ID $CONDUCTOR_ATTEMPT" >> {marker}', layout=handoff.layout)

    Worker(handoff.layout, runner, WorkerSettings(), ignore=[]).run(burst=True)

    assert marker.read_text().splitlines() == ["step_001 2"]
    assert handoff.where() == {"pending": [], "in_progress": [], "completed": ["step_001"], "failed": []}
    assert not parked.exists()
    assert handoff.files_in("in_progress") == []


def test_a_task_being_requeued_is_never_invisible(handoff: Handoff, monkeypatch: pytest.MonkeyPatch) -> None:
    handoff.publish("step_001")
    claim = _claim(handoff)
    duplicate = claim.task.model_copy(update={"created_at": utc_now()})  # an engine re-publishing attempt 1
    during: list[object] = []

    def prepare_and_observe(task):  # type: ignore[no-untyped-def]  # runs between the park and the publish
        during.append(handoff.fork.find_task("step_001"))
        try:
            publish_task(handoff.fork, duplicate)
            during.append("published attempt 1 again")
        except StateConflict:
            during.append("refused")
        return prepare_retry(handoff.layout, task)

    reap_expired(handoff.fork, max_attempts=3, lease_seconds=LEASE,
                 now=datetime.now(UTC) + timedelta(seconds=LEASE + 1), prepare_retry=prepare_and_observe)

    assert during[0] is not None, "the step was in no state folder during the requeue"
    assert during[1] == "refused"
    assert handoff.where() == {"pending": ["step_001"], "in_progress": [], "completed": [], "failed": []}
    assert handoff.read_task("pending", "step_001").attempt == 2
