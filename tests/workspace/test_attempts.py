"""Attempt folders are recycled from attempts that ended with the executor's own word, and never from one
whose executor may still be running (a lease that ran out)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from conductor.attempts import attempt_changes, prepare_retry
from conductor.audit import AuditLog
from conductor.handoff.documents import write_document
from conductor.handoff.lease import claim_task
from conductor.handoff.reaper import reap_expired
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
