"""Attempt folders are recycled from attempts that ended with the executor's own word, and never from one
whose executor may still be running (a lease that ran out)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from conductor.attempts import attempt_changes, prepare_retry
from conductor.audit import AuditLog
from conductor.handoff.documents import write_document
from conductor.handoff.lease import claim_task
from conductor.handoff.reaper import reap_expired
from conductor.workspace import feed
from tests.corpus.builders import do_and_complete, reported, verify
from tests.handoff.support import make_handoff
from tests.helpers.fork_state import fork_head


def test_a_verified_attempts_folder_becomes_the_next_steps_folder(tmp_path: Path) -> None:
    handoff = make_handoff(tmp_path / "project", steps=2)
    claimed = do_and_complete(handoff, lambda ws: (ws / "README.md").write_text("step one\n"),
                              files=reported("README.md"))
    first = handoff.scratch("step_001")
    inode = os.stat(first).st_ino
    assert verify(handoff, claimed).accepted
    (first / "junk.txt").write_text("left behind\n")
    (first / "__pycache__").mkdir()
    (first / "__pycache__" / "x.pyc").write_bytes(b"a cache a later step must not inherit")

    task = handoff.publish("step_002")

    second = handoff.root / task.workspace
    assert second == handoff.scratch("step_002").resolve() and not first.exists()
    assert os.stat(second).st_ino == inode  # renamed, not copied
    assert task.base_commit == fork_head(handoff.layout, handoff.plan.plan_id, handoff.fork.fork_id)
    assert (second / "README.md").read_text() == "step one\n"
    assert not (second / "junk.txt").exists() and not (second / "__pycache__").exists()
    assert attempt_changes(handoff.layout, second, task.base_commit, [])[1] == []


def test_a_folder_whose_lease_ran_out_is_never_reused(tmp_path: Path) -> None:
    handoff = make_handoff(tmp_path / "project", steps=2)
    handoff.publish("step_001")
    zombie_folder = handoff.scratch("step_001")
    log = AuditLog(handoff.fork.audit_log)
    # A holder on another host: it may be alive, so only time expires its lease (max_attempts 1: the task
    # then fails for good, and its folder must still never be recycled).
    assert claim_task(handoff.fork, "step_001", holder="agent@elsewhere", lease_seconds=0.01) is not None
    lease = handoff.read_lease("step_001")
    write_document(handoff.fork.lease_file("step_001"), lease.model_copy(update={"host": "elsewhere", "checksum": None}))
    time.sleep(0.05)
    (reaped,) = reap_expired(handoff.fork, max_attempts=1, lease_seconds=60, on_event=log.append,
                             prepare_retry=lambda task: prepare_retry(handoff.layout, task))
    assert reaped.outcome == "failed"

    task = handoff.publish("step_002")

    assert zombie_folder.is_dir() and handoff.root / task.workspace != zombie_folder
    assert (handoff.root / task.workspace / "README.md").read_text() == "hello\n"


def _expire_elsewhere(handoff, step: str) -> None:
    """Claim ``step`` as a holder on another host with a lease already run out."""
    assert claim_task(handoff.fork, step, holder="agent@elsewhere", lease_seconds=0.01) is not None
    lease = handoff.read_lease(step)
    write_document(handoff.fork.lease_file(step), lease.model_copy(update={"host": "elsewhere", "checksum": None}))


@pytest.mark.parametrize("watch", [False, True])
def test_many_retries_get_their_folders_checked_out_ahead_and_side_by_side(tmp_path: Path, monkeypatch,
                                                                           watch: bool) -> None:
    """``watch``: the retries will run in this process (the engine's own executor), so each folder made
    ahead gets a change feed too; a folder for another process gets none."""
    import subprocess
    import threading

    import conductor.attempts as attempts

    handoff = make_handoff(tmp_path / "project", steps=4)
    steps = handoff.step_ids
    for step in steps:
        handoff.publish(step)
        _expire_elsewhere(handoff, step)
    # Another process left step_004's attempt-2 folder (a reap that crashed before publishing): it is
    # reset in place, never replaced by a folder made ahead.
    taken = handoff.scratch("step_004", 2)
    prepare_retry(handoff.layout, handoff.read_task("in_progress", "step_004").model_copy(update={"attempt": 2}))
    (taken / "junk.txt").write_text("left by a crash\n")
    threads, fallbacks = set(), []
    real_materialize, real_prepare = attempts.materialize, attempts.prepare_retry
    monkeypatch.setattr(attempts, "materialize", lambda *a, **k: (threads.add(threading.get_ident()),
                                                                   real_materialize(*a, **k))[1])
    monkeypatch.setattr(attempts, "prepare_retry", lambda layout, task, **kw: (fallbacks.append(task.task_id),
                                                                               real_prepare(layout, task, **kw))[1])
    time.sleep(0.05)
    folders = attempts.RetryFolders(handoff.layout, watch=watch, threads=2)

    reaped = reap_expired(handoff.fork, max_attempts=3, lease_seconds=60, on_event=AuditLog(handoff.fork.audit_log).append,
                          prepare_retry=folders)

    assert [r.outcome for r in reaped] == ["requeued"] * 4 and fallbacks == ["step_004"]
    assert threading.get_ident() not in threads  # made ahead by the pool, not under the fork lock
    for step in steps:
        retry = handoff.read_task("pending", step)
        folder = handoff.root / retry.workspace
        assert retry.attempt == 2 and folder == handoff.scratch(step, 2).resolve()
        assert (folder / "README.md").read_text() == "hello\n" and not (folder / "junk.txt").exists()
        branch = subprocess.run(["git", "branch", "--show-current"], cwd=folder, capture_output=True, text=True, check=True)
        assert branch.stdout.strip() == f"conductor/{step}.a2"
        assert attempt_changes(handoff.layout, folder, retry.base_commit, [])[1] == []
        assert handoff.scratch(step, 1).is_dir()  # the old attempt's folder is left alone
        feed.vouch(folder)
        # step_004's folder was reset where a crash left it: what ran there before is unknown, so no feed
        assert feed.changes(folder) == ([] if watch and step != "step_004" else None)
    left = sorted(p.name for p in handoff.scratch("step_001").parent.iterdir() if p.name.startswith(".tmp."))
    assert left == []  # the pool's private folders are gone (the one made for step_004 discarded)


def test_a_folder_made_ahead_by_a_process_that_died_is_swept_by_recovery(tmp_path: Path) -> None:
    import re

    from conductor.attempts import RetryFolders
    from conductor.recovery import recover_project
    from tests.handoff.support import dead_pid

    handoff = make_handoff(tmp_path / "project", steps=1)
    task = handoff.publish("step_001")
    retry = task.model_copy(update={"attempt": 2})
    folders = RetryFolders(handoff.layout)
    folders.prefetch([retry])
    folders.wait(retry)  # made; then its process is "killed": no discard
    fork_scratch = handoff.scratch("step_001").parent
    (made,) = [p for p in fork_scratch.iterdir() if p.name.startswith(".tmp.ahead.")]
    assert (made / "step_001.a2" / "README.md").read_text() == "hello\n"
    orphan = made.with_name(re.sub(r"\.\d+\.", f".{dead_pid()}.", made.name, count=1))
    made.rename(orphan)

    report = recover_project(handoff.layout)

    assert not orphan.exists() and handoff.scratch("step_001").is_dir()
    assert any(r.what == "temp_removed" and orphan.name in r.path for r in report.repairs)
