"""The holder half of the fencing check: a completion must come from the lease's holder, not only carry the
right fencing token (issue 9, "tests that must bite": dropping the holder comparison must fail this)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conductor.errors import LeaseLost
from conductor.handoff.complete import complete_task
from conductor.handoff.documents import write_document
from conductor.handoff.lease import claim_task, read_lease
from conductor.models import ExecutorInfo, Result, utc_now
from tests.handoff.support import make_handoff


def test_a_completion_by_someone_who_no_longer_holds_the_lease_is_refused(tmp_path: Path) -> None:
    handoff = make_handoff(tmp_path / "project", steps=1)
    handoff.publish("step_001")
    mine = claim_task(handoff.fork, "step_001", holder="holder-a@here:1", lease_seconds=60)
    assert mine is not None
    # Another executor takes the lease over at the same attempt (same fencing token), by hand.
    lease = read_lease(handoff.fork, "step_001")
    assert lease is not None
    write_document(handoff.fork.lease_file("step_001"), lease.model_copy(update={"holder": "holder-b@here:2",
                                                                                "checksum": None}))
    now = utc_now()
    result = Result(task_id="step_001", plan_id=mine.task.plan_id, fork_id=mine.task.fork_id, attempt=1,
                    fencing_token=mine.lease.fencing_token, task_checksum=mine.task.checksum or "", status="completed",
                    executor=ExecutorInfo(id="holder-a@here:1", kind="test"), started_at=now, finished_at=now)

    with pytest.raises(LeaseLost, match="lease now held by holder-b@here:2"):
        complete_task(mine, result, explanation="not mine any more")

    assert handoff.where()["in_progress"] == ["step_001"] and handoff.where()["completed"] == []
