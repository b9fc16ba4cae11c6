"""What one task's cycle costs the shared folders: the listings a worker makes, what it does under the fork
lock, and when an idle worker wakes. These check behaviour (which calls, under which lock), never time."""

from __future__ import annotations

import fcntl
import os
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import conductor.fsutil as fsutil
import conductor.handoff.complete as complete_module
import conductor.handoff.reaper as reaper_module
import conductor.worker as worker_module
from conductor.executors.command import CommandRunner
from conductor.handoff.documents import write_document
from conductor.handoff.lease import claim_task
from conductor.handoff.watcher import task_arrival
from conductor.layout import ForkLayout
from conductor.models import ExecutorInfo, Result, utc_now
from conductor.worker import Worker, WorkerSettings
from tests.handoff.support import Handoff, dead_pid, make_handoff, wait_for

HOLDER = "cycle-test@here:1"


def _lock_held(fork: ForkLayout) -> bool:
    """Is the fork lock held by anyone (this process's other descriptors included)?"""
    fd = os.open(fork.dir / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _result(claim) -> Result:  # type: ignore[no-untyped-def]
    now = utc_now()
    return Result(task_id=claim.task.task_id, plan_id=claim.task.plan_id, fork_id=claim.task.fork_id,
                  attempt=claim.task.attempt, fencing_token=claim.lease.fencing_token,
                  task_checksum=claim.task.checksum or "", status="completed",
                  executor=ExecutorInfo(id=HOLDER, kind="test"), summary="done", started_at=now, finished_at=now)


def test_a_worker_lists_the_pending_folder_once_per_drain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    handoff = make_handoff(tmp_path / "project", steps=5)
    handoff.publish_all()
    listed: list[Path] = []
    real_names = worker_module.entry_names

    def counting(folder: Path, **kwargs):  # type: ignore[no-untyped-def]
        if folder.name == "pending":
            listed.append(folder)
        return real_names(folder, **kwargs)

    monkeypatch.setattr(worker_module, "entry_names", counting)
    worker = Worker(handoff.layout, CommandRunner("true", layout=handoff.layout), WorkerSettings(), ignore=[])
    assert [worker.process_once() for _ in range(6)] == [1, 1, 1, 1, 1, 0]
    # One listing served the five tasks; the sixth call found the list used up and listed once more.
    assert len(listed) == 2
    assert handoff.where()["completed"] == handoff.step_ids


def test_listed_tasks_another_worker_took_meanwhile_are_skipped(tmp_path: Path) -> None:
    handoff = make_handoff(tmp_path / "project", steps=3)
    handoff.publish_all()
    worker = Worker(handoff.layout, CommandRunner("true", layout=handoff.layout), WorkerSettings(), ignore=[])
    worker._queue.extend(worker._pending())
    for task_id in handoff.step_ids[:2]:  # two of them go to someone else after the listing
        assert claim_task(handoff.fork, task_id, holder=HOLDER, lease_seconds=30) is not None
    assert worker.process_once() == 1 and worker.process_once() == 0
    assert handoff.where()["completed"] == ["step_003"]


def test_completion_keeps_fsyncs_of_new_files_out_of_the_fork_lock(handoff: Handoff,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    handoff.publish("step_001")
    claim = claim_task(handoff.fork, "step_001", holder=HOLDER, lease_seconds=30)
    assert claim is not None
    synced: list[tuple[str, bool]] = []  # (what, under the lock?)
    real_fsync_fd = fsutil.fsync_fd

    def fsync_fd(fd: int, path: object = None) -> None:  # every fsync goes through it, a folder's too
        kind = "folder" if Path(str(path)).is_dir() else "file"
        synced.append((f"{kind} {Path(str(path)).name}", _lock_held(handoff.fork)))
        real_fsync_fd(fd, path)

    monkeypatch.setattr(fsutil, "fsync_fd", fsync_fd)
    complete_module.complete_task(claim, _result(claim), explanation="done", provenance=b"{}")

    assert synced == [
        ("file step_001.result.json", False), ("file step_001.explanation.md", False),
        ("file step_001.provenance.json", False),
        ("folder completed", True),  # one fsync makes the three sidecars durable before the commit point
        ("folder completed", False), ("folder in_progress", False),  # the commit rename's, after the lock
    ]
    assert handoff.where()["completed"] == ["step_001"] and handoff.files_in("in_progress") == []


def test_the_reaper_kills_a_dead_holders_command_before_taking_the_fork_lock(
    handoff: Handoff, monkeypatch: pytest.MonkeyPatch
) -> None:
    handoff.publish("step_001")
    claim = claim_task(handoff.fork, "step_001", holder=HOLDER, lease_seconds=30)
    assert claim is not None
    write_document(handoff.fork.lease_file("step_001"), claim.lease.model_copy(update={"pid": dead_pid()}))
    kills: list[bool] = []
    monkeypatch.setattr(reaper_module, "kill_orphaned_command",
                        lambda fork, lease, workspace: kills.append(_lock_held(fork)) or [])

    reaped = reaper_module.reap_expired(handoff.fork, max_attempts=3, lease_seconds=30,
                                        prepare_retry=lambda task: task)

    assert kills == [False] and [r.outcome for r in reaped] == ["requeued"]


def test_the_reaper_takes_the_fork_lock_only_for_leases_that_look_over(
    handoff: Handoff, monkeypatch: pytest.MonkeyPatch
) -> None:
    handoff.publish_all()
    for task_id in handoff.step_ids:
        assert claim_task(handoff.fork, task_id, holder=HOLDER, lease_seconds=30) is not None
    locked: list[ForkLayout] = []
    real_lock = reaper_module.fork_lock
    monkeypatch.setattr(reaper_module, "fork_lock", lambda fork: locked.append(fork) or real_lock(fork))

    assert reaper_module.reap_expired(handoff.fork, max_attempts=3, lease_seconds=30) == []
    assert locked == []  # three live leases: looked at, never locked
    later = datetime.now(UTC) + timedelta(seconds=31)
    reaped = reaper_module.reap_expired(handoff.fork, max_attempts=3, lease_seconds=30, now=later,
                                        prepare_retry=lambda task: task)
    assert len(reaped) == 3 and len(locked) == 1  # one hold for the batch (up to REQUEUE_BATCH tasks)


@pytest.mark.parametrize("event, path, is_directory, wakes", [
    ("created", "/h/plan_p/fork_1/pending/step_001.task.json", False, True),
    ("moved", "/h/plan_p/fork_1/pending/step_001.task.json", False, True),
    ("created", "/h/plan_p/fork_1/pending/.tmp.step_001.task.json.12.abcdef01", False, False),
    ("created", "/h/plan_p/fork_1/in_progress/step_001.lease.json", False, False),
    ("moved", "/h/plan_p/fork_1/completed/step_001.task.json", False, False),
    ("modified", "/h/plan_p/fork_1/audit.log", False, False),
    ("deleted", "/h/plan_p/fork_1/pending/step_001.task.json", False, False),
    ("created", "/h/plan_q", True, True),
])
def test_an_idle_worker_wakes_for_new_tasks_and_new_folders_only(event: str, path: str, is_directory: bool,
                                                                  wakes: bool) -> None:
    assert task_arrival(event, path, is_directory) is wakes


@pytest.mark.timeout(60)
def test_an_idle_worker_claims_a_new_task_without_waiting_for_its_fallback_poll(tmp_path: Path) -> None:
    handoff = make_handoff(tmp_path / "project", steps=1)
    runner = CommandRunner("true", layout=handoff.layout)
    worker = Worker(handoff.layout, runner, WorkerSettings(poll_seconds=600), ignore=[])
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, kwargs={"stop": stop}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: worker._watcher is not None, timeout=30, what="the worker to watch")
        handoff.publish("step_001")
        # A 600 s poll would never get here in time: the file event woke the worker.
        wait_for(lambda: handoff.where()["completed"] == ["step_001"], timeout=30, what="the task to complete")
    finally:
        worker.request_stop()
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive()
