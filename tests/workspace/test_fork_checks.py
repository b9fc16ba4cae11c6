"""The fork-level verification before ranking: a clean checkout of the fork's final commit, made only when
there is a command to run there."""

from __future__ import annotations

from pathlib import Path

from conductor.audit import AuditLog
from conductor.ranking import fork_checks
from tests.handoff.support import make_handoff


def _final(handoff) -> Path:
    return handoff.layout.conductor_dir / "scratch" / f"plan_{handoff.plan.plan_id}" / f"fork_{handoff.fork.fork_id}" / "final"


def test_without_commands_nothing_is_checked_out_and_the_fork_passes(tmp_path: Path) -> None:
    handoff = make_handoff(tmp_path / "project")
    log = AuditLog(handoff.fork.audit_log)
    assert fork_checks(handoff.layout, handoff.plan.plan_id, handoff.fork.fork_id, handoff.head, log, commands=[],
                       timeout_seconds=60, sandbox_mode="off")
    assert not _final(handoff).exists()
    (event,) = [e for e in log.events() if e.type == "fork.verified"]
    assert event.data == {"fork_id": handoff.fork.fork_id, "passed": True, "commit": handoff.head, "verification": []}


def test_commands_run_on_a_clean_checkout_of_the_final_commit(tmp_path: Path) -> None:
    handoff = make_handoff(tmp_path / "project")
    log = AuditLog(handoff.fork.audit_log)
    assert not fork_checks(handoff.layout, handoff.plan.plan_id, handoff.fork.fork_id, handoff.head, log,
                           commands=["test -f README.md", "test -f nothing-here"], timeout_seconds=60,
                           sandbox_mode="off")
    assert (_final(handoff) / "README.md").read_text() == "hello\n"
    (event,) = [e for e in log.events() if e.type == "fork.verified"]
    assert [v["exit_code"] for v in event.data["verification"]] == [0, 1] and event.data["passed"] is False
