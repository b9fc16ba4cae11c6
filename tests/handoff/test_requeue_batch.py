"""Re-queues in batches (``reaper.REQUEUE_BATCH`` under one hold of the fork lock, each kind of fsync once):
a reaper killed anywhere inside a batch loses no task and publishes none twice, and the batch's writes
(``AuditLog.append_many``, ``publish_exclusive_many``) keep the guarantees of the single ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from conductor import fsutil
from conductor.attempts import RetryFolders
from conductor.audit import AuditLog, verify_chain
from conductor.faults import CRASH_EXIT_CODE
from conductor.handoff import reaper as reaper_module
from conductor.handoff.lease import claim_task
from conductor.layout import PARKED_SUFFIX, STATES
from conductor.recovery import recover_project
from tests.handoff.support import Handoff, clean_environ, make_handoff

STEPS = 20  # more than one batch
LEASE = 30.0

REAP = """
import sys
from datetime import UTC, datetime, timedelta
from conductor.attempts import RetryFolders
from conductor.audit import AuditLog
from conductor.handoff.reaper import reap_expired
from conductor.layout import ProjectLayout
from pathlib import Path
layout = ProjectLayout(Path(sys.argv[1]))
fork = layout.fork(sys.argv[2], sys.argv[3])
reap_expired(fork, max_attempts=3, lease_seconds=30, now=datetime.now(UTC) + timedelta(seconds=31),
             on_event=AuditLog(fork.audit_log, cut_torn_tail=True).append, prepare_retry=RetryFolders(layout))
"""


def _held_fork(tmp_path: Path) -> Handoff:
    handoff = make_handoff(tmp_path / "project", steps=STEPS)
    log = AuditLog(handoff.fork.audit_log)
    for task in handoff.publish_all():
        log.append("task.published", {"step_id": task.task_id, "attempt": 1, "checksum": task.checksum})
    for task_id in handoff.step_ids:
        assert claim_task(handoff.fork, task_id, holder="gone@here:1", lease_seconds=LEASE) is not None
    return handoff


def _reap_in_a_process(handoff: Handoff, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", REAP, str(handoff.root), handoff.plan.plan_id, handoff.fork.fork_id],
                          env=clean_environ(tmp_path, **env), capture_output=True, text=True, timeout=120)


def _published(handoff: Handoff) -> Counter[tuple[str, int]]:
    return Counter((e.data["step_id"], e.data["attempt"]) for e in AuditLog(handoff.fork.audit_log).events()
                   if e.type == "task.published")


def _assert_every_task_requeued_once(handoff: Handoff) -> None:
    assert handoff.where() == {"pending": handoff.step_ids, "in_progress": [], "completed": [], "failed": []}
    assert [name for state in STATES for name in handoff.files_in(state)
            if name.endswith(PARKED_SUFFIX) or name.startswith(".tmp")] == []
    for task_id in handoff.step_ids:
        retry = handoff.read_task("pending", task_id)
        assert retry.attempt == 2
        assert (handoff.root / retry.workspace / "README.md").read_text() == "hello\n"
    assert _published(handoff) == Counter({(t, a): 1 for t in handoff.step_ids for a in (1, 2)})
    assert verify_chain(handoff.fork.audit_log).ok


def test_a_reap_of_many_expired_tasks_requeues_each_once_in_batches(tmp_path: Path) -> None:
    handoff = _held_fork(tmp_path)
    result = _reap_in_a_process(handoff, tmp_path)
    assert result.returncode == 0, result.stderr
    _assert_every_task_requeued_once(handoff)
    expired = [e for e in AuditLog(handoff.fork.audit_log).events() if e.type == "task.lease_expired"]
    assert sorted(e.data["step_id"] for e in expired) == handoff.step_ids


# Each point is hit once per task (the log is written twice per batch); the n-th hit falls inside the
# second batch (tasks 17-20).
@pytest.mark.parametrize("crash_at", [
    "reaper.after_expired_event:18", "reaper.after_park:19", "publish.after_temp:18", "publish.after_link:17",
    "publish.after_dir_fsync:20", "reaper.after_republish:18", "reaper.before_unpark:19", "audit.after_write:3",
])
def test_a_reaper_killed_inside_a_batch_loses_no_task_and_publishes_none_twice(tmp_path: Path, crash_at: str) -> None:
    handoff = _held_fork(tmp_path)
    crashed = _reap_in_a_process(handoff, tmp_path, CONDUCTOR_CRASH_AT=crash_at)
    assert crashed.returncode == CRASH_EXIT_CODE, crashed.stderr

    recover_project(handoff.layout, exclusive=True, grace_seconds=0)
    finished = _reap_in_a_process(handoff, tmp_path)
    assert finished.returncode == 0, finished.stderr

    _assert_every_task_requeued_once(handoff)


def test_append_many_chains_every_event_with_one_write_and_one_fsync(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    log = AuditLog(tmp_path / "audit.log")
    log.append("task.published", {"step_id": "step_001", "attempt": 1})
    writes, fsyncs = [], []
    real_write, real_fsync = os.write, os.fsync
    monkeypatch.setattr(os, "write", lambda fd, data: writes.append(len(data)) or real_write(fd, data))
    monkeypatch.setattr(os, "fsync", lambda fd: fsyncs.append(fd) or real_fsync(fd))

    events = log.append_many([("task.lease_expired", {"step_id": f"step_00{i}"}) for i in range(2, 6)])

    monkeypatch.undo()
    assert len(writes) == len(fsyncs) == 1
    assert [e.seq for e in events] == [1, 2, 3, 4]
    after = log.append("task.published", {"step_id": "step_006", "attempt": 1})
    assert after.seq == 5 and after.prev == events[-1].hash
    # Another process's view (a fresh read of the file) agrees, and the whole chain checks.
    lines = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    assert [line["hash"] for line in lines[1:5]] == [e.hash for e in events]
    assert verify_chain(tmp_path / "audit.log").ok
    assert log.append_many([]) == []


def test_append_many_refuses_the_whole_batch_for_one_bad_event(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log")
    log.append("plan.created", {})
    before = (tmp_path / "audit.log").read_bytes()
    with pytest.raises(Exception, match="canonical|NaN|JSON|event data"):
        log.append_many([("task.published", {"step_id": "a"}), ("task.published", {"bad": float("nan")})])
    assert (tmp_path / "audit.log").read_bytes() == before


def test_publish_exclusive_many_creates_each_file_once_and_never_touches_an_existing_one(tmp_path: Path) -> None:
    folder = tmp_path / "pending"
    folder.mkdir()
    (folder / "b.json").write_bytes(b"theirs")
    results = fsutil.publish_exclusive_many([(folder / "a.json", b"A"), (folder / "b.json", b"B"),
                                             (folder / "c.json", b"C")])
    assert [type(r).__name__ for r in results] == ["NoneType", "FileExistsError", "NoneType"]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == {"a.json": b"A", "b.json": b"theirs", "c.json": b"C"}


def test_requeue_batch_holds_the_lock_once_per_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from datetime import UTC, datetime, timedelta

    handoff = _held_fork(tmp_path)
    holds: list[int] = []
    real_lock = reaper_module.fork_lock
    monkeypatch.setattr(reaper_module, "fork_lock", lambda fork: holds.append(1) or real_lock(fork))
    reaped = reaper_module.reap_expired(handoff.fork, max_attempts=3, lease_seconds=LEASE,
                                        now=datetime.now(UTC) + timedelta(seconds=31),
                                        on_event=AuditLog(handoff.fork.audit_log).append,
                                        prepare_retry=RetryFolders(handoff.layout))
    assert [r.task_id for r in reaped] == handoff.step_ids and {r.outcome for r in reaped} == {"requeued"}
    assert len(holds) == -(-STEPS // reaper_module.REQUEUE_BATCH)
    _assert_every_task_requeued_once(handoff)
