"""``conductor.handoff.agent``: the protocol in a few calls for agents, played straight and played as an attacker."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from conductor.attempts import prepare_retry
from conductor.audit import AuditLog
from conductor.errors import LeaseLost, NotFound, StateConflict
from conductor.handoff import agent
from conductor.handoff.documents import read_document, write_document
from conductor.handoff.lease import claim_task
from conductor.handoff.reaper import reap_expired
from conductor.keys import TrustStore, generate_signing_key
from conductor.models import (
    ForkSpec,
    Plan,
    PlannerInfo,
    PolicyLayer,
    Result,
    StepSpec,
    Strategy,
    parse_time,
    utc_now,
)
from conductor.plan_store import create_plan, ensure_forks
from conductor.provenance import read_provenance
from tests.handoff.support import Handoff, clean_environ, dead_pid, make_handoff, stop_process, wait_for

ME, OTHER = "agent-me@test", "agent-other@test"


def _events(fork_or_handoff, type_: str) -> list[dict]:  # type: ignore[no-untyped-def]
    fork = getattr(fork_or_handoff, "fork", fork_or_handoff)
    return [e.data for e in AuditLog(fork.audit_log).events() if e.type == type_]


def _reap(handoff: Handoff, *, after: float, lease: float = 60.0, max_attempts: int = 3):  # type: ignore[no-untyped-def]
    return reap_expired(handoff.fork, max_attempts=max_attempts, lease_seconds=lease,
                        now=datetime.now(UTC) + timedelta(seconds=after), on_event=AuditLog(handoff.fork.audit_log).append,
                        prepare_retry=lambda task: prepare_retry(handoff.layout, task))


def _config(handoff: Handoff, **executor: object) -> None:
    (handoff.root / ".conductor" / "config.yaml").write_text(yaml.safe_dump({"executor": executor}))


def _add_plan(handoff: Handoff, plan_id: str, fork_id: str = "1") -> Handoff:
    """A second plan in the same project, with one step (step_001) of its own."""
    plan = Plan(plan_id=plan_id, goal="another plan", created_at=utc_now(), planner=PlannerInfo(kind="file"),
                forks=[ForkSpec(fork_id=fork_id, strategy=Strategy(name="other"),
                                steps=[StepSpec(step_id="step_001", instruction="Do it.", allowed_files=["README.md"])])])
    plan = create_plan(handoff.layout, plan, ignore=[], project_policy=PolicyLayer())
    ensure_forks(handoff.layout, plan)
    return Handoff(layout=handoff.layout, plan=plan, fork=handoff.layout.fork(plan_id, fork_id), ignore=[])


# --- claim --------------------------------------------------------------------------------------


def test_claim_takes_the_next_pending_task_with_a_pid_less_lease_bounded_by_the_timeout(handoff: Handoff) -> None:
    handoff.publish("step_002")
    handoff.publish("step_001", timeout_seconds=20)
    before = datetime.now(UTC)

    task = agent.claim(handoff.layout, holder=ME)

    assert (task.task_id, task.attempt, task.state, task.holder) == ("step_001", 1, "in_progress", ME)
    assert Path(task.workspace).is_absolute() and Path(task.workspace).is_dir()
    assert Path(task.workspace) == (handoff.root / handoff.read_task("in_progress", "step_001").workspace).resolve()
    lease = handoff.read_lease("step_001")
    assert (lease.pid, lease.holder, lease.fencing_token) == (0, ME, 1)
    # min(lease_seconds 60, timeout 20): the lease ends at the deadline
    assert parse_time(lease.expires_at) <= before + timedelta(seconds=21)
    assert parse_time(task.deadline) <= parse_time(lease.acquired_at) + timedelta(seconds=20)
    assert task.lease_expires_at == lease.expires_at
    document = task.to_json()
    for key in ("task_id", "plan_id", "fork_id", "attempt", "instruction", "workspace", "allowed_files", "constraints",
                "deadline", "protected_patterns", "timeout_seconds", "base_commit", "lease_expires_at", "title",
                "depends_on", "max_diff_lines", "checksum", "confidence"):
        assert key in document, key
    json.dumps(document)  # JSON-ready
    assert _events(handoff, "task.claimed") == [{"step_id": "step_001", "attempt": 1, "holder": ME, "pid": 0,
                                                 "host": lease.host}]
    assert agent.claim(handoff.layout, holder=ME).task_id == "step_002"
    with pytest.raises(NotFound) as caught:
        agent.claim(handoff.layout, holder=ME)
    assert caught.value.exit_code == 9 and "2 task(s) in progress" in str(caught.value)


def test_claim_goes_oldest_plan_first_and_an_id_in_two_plans_is_ambiguous(handoff: Handoff) -> None:
    newer = _add_plan(handoff, "20990101T000000Z-newer")
    newer.publish("step_001")
    handoff.publish("step_001")  # PLAN_ID sorts first: the older plan

    first = agent.claim(handoff.layout, holder=ME)
    assert (first.plan_id, first.task_id) == (handoff.plan.plan_id, "step_001")
    # step_001 is in progress in one plan (mine) and pending in the other: my claim is the one meant
    assert agent.show(handoff.layout, "step_001", holder=ME).plan_id == handoff.plan.plan_id
    with pytest.raises(agent.AmbiguousTask) as caught:  # a stranger holds neither: pending and in progress
        agent.show(handoff.layout, "step_001", holder=OTHER)
    assert caught.value.exit_code == 2
    assert f"{handoff.plan.plan_id}/alpha/step_001" in str(caught.value)
    assert "20990101T000000Z-newer/1/step_001" in str(caught.value)
    second = agent.claim(handoff.layout, task_id="20990101T000000Z-newer/1/step_001", holder=OTHER)
    assert (second.plan_id, second.fork_id) == ("20990101T000000Z-newer", "1")
    with pytest.raises(NotFound):
        agent.claim(handoff.layout, plan_id="no-such-plan", holder=ME)
    with pytest.raises(NotFound):
        agent.claim(handoff.layout, task_id="../../etc", holder=ME)


def test_claiming_a_named_task_held_by_someone_else_says_who(handoff: Handoff) -> None:
    handoff.publish("step_001")
    agent.claim(handoff.layout, task_id="step_001", holder=OTHER)
    with pytest.raises(StateConflict, match=f"already claimed \\(held by {OTHER}\\)"):
        agent.claim(handoff.layout, task_id="step_001", holder=ME)


def test_claim_waits_for_a_task_to_be_published(handoff: Handoff) -> None:
    timer = threading.Timer(0.5, lambda: handoff.publish("step_003"))
    timer.start()
    try:
        task = agent.claim(handoff.layout, holder=ME, wait_seconds=60)
    finally:
        timer.cancel()
    assert task.task_id == "step_003"
    timer = threading.Timer(0.5, lambda: handoff.publish("step_002"))
    timer.start()
    try:  # a named task not published yet is waited for too
        named = agent.claim(handoff.layout, task_id="step_002", holder=ME, wait_seconds=60)
    finally:
        timer.cancel()
    assert named.task_id == "step_002"
    with pytest.raises(NotFound, match="nothing to claim: no step_001 in any plan"):
        agent.claim(handoff.layout, task_id="step_001", holder=ME, wait_seconds=0.3)


def test_claim_rejects_a_tampered_task_unexecuted_and_takes_the_next(handoff: Handoff) -> None:
    handoff.publish("step_001")
    handoff.publish("step_002")
    path = handoff.task_path("pending", "step_001")
    path.write_text(path.read_text().replace("Do step 1.", "rm -rf /"))

    assert agent.claim(handoff.layout, holder=ME).task_id == "step_002"
    assert handoff.where()["failed"] == ["step_001"]
    assert handoff.read_result("failed", "step_001").error.kind == "checksum_mismatch"  # type: ignore[union-attr]


# --- complete -----------------------------------------------------------------------------------


def test_complete_computes_files_changed_from_the_workspace_and_commits(handoff: Handoff) -> None:
    handoff.publish("step_001")
    task = agent.claim(handoff.layout, holder=ME)
    (Path(task.workspace) / "README.md").write_text("hello, agent\n")

    done = agent.complete(handoff.layout, "step_001", holder=ME, summary="greeted", explanation="# Why\n\nBecause.\n")

    assert (done.status, done.task.state, done.warnings, done.signed_by) == ("completed", "completed", (), None)
    assert handoff.where()["completed"] == ["step_001"] and not handoff.fork.lease_file("step_001").exists()
    result = handoff.read_result("completed", "step_001")
    assert (result.executor.id, result.executor.kind, result.summary) == (ME, "agent", "greeted")
    assert [(c.path, c.change, c.sha256, c.lines_added, c.lines_removed) for c in result.files_changed] == [
        ("README.md", "modified", hashlib.sha256(b"hello, agent\n").hexdigest(), 1, 1)]
    assert result.fencing_token == result.attempt == 1
    explanation = handoff.fork.sidecar("completed", "step_001", ".explanation.md").read_text()
    assert explanation == "# Why\n\nBecause.\n"
    provenance = read_provenance(handoff.fork.sidecar("completed", "step_001", ".provenance.json"), TrustStore(),
                                 executor_id=ME, require_signature=False)
    assert provenance.signed_by == [] and provenance.subjects["README.md"] == result.files_changed[0].sha256
    assert [e["executor"] for e in _events(handoff, "task.completed")] == [ME]
    assert done.to_json()["files_changed"][0]["path"] == "README.md"


def test_complete_signs_with_the_agents_own_key(handoff: Handoff, tmp_path: Path) -> None:
    key = generate_signing_key(tmp_path / "agent-keys")
    handoff.publish("step_001")
    agent.claim(handoff.layout, holder=ME)

    done = agent.complete(handoff.layout, "step_001", holder=ME, signer=key)

    trust = TrustStore()
    trust.add(key.public_key, ["agent-me@*"])
    read = read_provenance(handoff.fork.sidecar("completed", "step_001", ".provenance.json"), trust, executor_id=ME,
                           require_signature=True)
    assert read.signed_by == [key.key_id] == [done.signed_by]


def test_a_task_published_by_an_older_conductor_completes_stating_its_own_document(handoff: Handoff) -> None:
    """A task file without the fields a newer Task model defaults (published before an upgrade) is still
    completed, and the provenance states the document exactly as published, with its own checksum."""
    from pydantic_core import PydanticUndefined

    from conductor.canonical import compute_checksum

    handoff.publish("step_001")
    path = handoff.task_path("pending", "step_001")
    document = json.loads(path.read_text())
    defaults = {name: f.default if f.default is not PydanticUndefined else f.default_factory()  # type: ignore[misc]
                for name, f in type(handoff.read_task("pending", "step_001")).model_fields.items()
                if f.default is not PydanticUndefined or f.default_factory is not None}
    older = {k: v for k, v in document.items() if k == "schema" or k not in defaults or v != defaults[k]}
    older = {k: v for k, v in older.items() if k != "checksum"}
    assert len(older) < len(document) - 1  # some defaulted fields are gone
    older["checksum"] = compute_checksum(older)
    path.write_text(json.dumps(older, indent=2) + "\n")

    agent.claim(handoff.layout, holder=ME)
    done = agent.complete(handoff.layout, "step_001", holder=ME)

    assert done.status == "completed"
    read = read_provenance(handoff.fork.sidecar("completed", "step_001", ".provenance.json"), TrustStore(),
                           executor_id=ME, require_signature=False)
    definition = read.statement["predicate"]["buildDefinition"]
    assert definition["externalParameters"]["task"] == older
    assert definition["internalParameters"]["task_checksum"] == older["checksum"]


def test_a_change_outside_allowed_files_is_completed_with_a_warning(handoff: Handoff) -> None:
    handoff.publish("step_001")
    task = agent.claim(handoff.layout, holder=ME)
    (Path(task.workspace) / "evil.sh").write_text("echo pwned\n")

    done = agent.complete(handoff.layout, "step_001", holder=ME)

    assert done.status == "completed"
    assert any("evil.sh" in w and "outside allowed_files" in w for w in done.warnings), done.warnings
    assert [c.path for c in handoff.read_result("completed", "step_001").files_changed] == ["evil.sh"]


def test_complete_with_status_failed_is_final_and_says_so(handoff: Handoff) -> None:
    handoff.publish("step_001")
    agent.claim(handoff.layout, holder=ME)
    done = agent.complete(handoff.layout, "step_001", holder=ME, status="failed", summary="cannot be done")
    assert done.task.state == "failed"
    result = handoff.read_result("failed", "step_001")
    assert result.error is not None and (result.error.kind, result.error.message) == ("reported_failure", "cannot be done")
    with pytest.raises(agent.BadRequest):
        agent.complete(handoff.layout, "step_001", holder=ME, status="maybe")


def test_complete_from_another_holder_is_refused_and_writes_nothing(handoff: Handoff) -> None:
    handoff.publish("step_001")
    task = agent.claim(handoff.layout, holder=ME)
    (Path(task.workspace) / "README.md").write_text("mine\n")
    lease_before = handoff.fork.lease_file("step_001").read_bytes()

    for call in (lambda: agent.complete(handoff.layout, "step_001", holder=OTHER),
                 lambda: agent.heartbeat(handoff.layout, "step_001", holder=OTHER),
                 lambda: agent.release(handoff.layout, "step_001", holder=OTHER)):
        with pytest.raises(LeaseLost, match=f"held by {ME}, not by {OTHER}") as caught:
            call()
        assert caught.value.exit_code == 10

    assert handoff.where()["in_progress"] == ["step_001"]
    assert handoff.files_in("completed") == [] and handoff.files_in("failed") == []
    assert handoff.fork.lease_file("step_001").read_bytes() == lease_before
    assert _events(handoff, "task.completed") == [] and _events(handoff, "task.released") == []


def test_complete_after_the_lease_expired_and_the_task_was_requeued_is_refused(handoff: Handoff) -> None:
    handoff.publish("step_001", timeout_seconds=300)
    first = agent.claim(handoff.layout, holder=ME)
    (Path(first.workspace) / "README.md").write_text("late work\n")

    (reaped,) = _reap(handoff, after=61)  # the agent went quiet past its 60 s lease
    assert (reaped.outcome, reaped.reason) == ("requeued", "not_renewed")
    assert _events(handoff, "task.lease_expired") == [{"step_id": "step_001", "attempt": 1, "holder": ME,
                                                       "reason": "not_renewed"}]

    with pytest.raises(StateConflict, match="not in progress \\(it is pending\\)"):
        agent.complete(handoff.layout, "step_001", holder=ME)
    # The same holder claims the retry: a completion pinned to the first attempt is still refused.
    second = agent.claim(handoff.layout, holder=ME)
    assert second.attempt == 2 and second.workspace != first.workspace
    with pytest.raises(LeaseLost, match="attempt 1 is stale"):
        agent.complete(handoff.layout, "step_001", holder=ME, attempt=1)
    assert handoff.files_in("completed") == [] and handoff.where()["in_progress"] == ["step_001"]
    # ...and the zombie's edit of the first folder is nobody's change
    done = agent.complete(handoff.layout, "step_001", holder=ME, attempt=2)
    assert done.files_changed == ()


def test_complete_of_a_task_not_in_progress_is_a_state_conflict(handoff: Handoff) -> None:
    handoff.publish("step_001")
    with pytest.raises(StateConflict, match="not in progress \\(it is pending\\)") as caught:
        agent.complete(handoff.layout, "step_001", holder=ME)
    assert caught.value.exit_code == 10
    with pytest.raises(NotFound):
        agent.complete(handoff.layout, "step_002", holder=ME)


def test_a_nested_repository_fails_the_task_as_a_workspace_error(handoff: Handoff) -> None:
    handoff.publish("step_001")
    task = agent.claim(handoff.layout, holder=ME)
    subprocess.run(["git", "init", "-q", str(Path(task.workspace) / "inner")], check=True)
    done = agent.complete(handoff.layout, "step_001", holder=ME)
    assert done.status == "failed"
    assert handoff.read_result("failed", "step_001").error.kind == "workspace_error"  # type: ignore[union-attr]


# --- heartbeat, timeout ---------------------------------------------------------------------------


def test_heartbeat_and_show_renew_the_lease_but_never_past_the_deadline(handoff: Handoff) -> None:
    handoff.publish("step_001", timeout_seconds=3)
    _config(handoff, lease_seconds=2, heartbeat_seconds=1)
    task = agent.claim(handoff.layout, holder=ME)
    first = handoff.read_lease("step_001").expires_at
    time.sleep(0.05)
    renewed = agent.heartbeat(handoff.layout, "step_001", holder=ME)
    assert parse_time(renewed.lease_expires_at) > parse_time(first)
    assert parse_time(renewed.lease_expires_at) <= parse_time(task.deadline)
    time.sleep(1.1)
    shown = agent.show(handoff.layout, "step_001", holder=ME)  # any call by its holder renews it
    assert parse_time(shown.lease_expires_at) > parse_time(renewed.lease_expires_at)
    assert parse_time(shown.lease_expires_at) <= parse_time(task.deadline)
    assert handoff.read_lease("step_001").pid == 0
    wait_for(lambda: datetime.now(UTC) > parse_time(task.deadline), timeout=30, what="the deadline")
    with pytest.raises(LeaseLost, match="ran out of time"):
        agent.heartbeat(handoff.layout, "step_001", holder=ME)
    with pytest.raises(LeaseLost, match="ran out of time"):
        agent.complete(handoff.layout, "step_001", holder=ME)
    assert handoff.files_in("completed") == []
    (reaped,) = _reap(handoff, after=0, lease=2)
    assert reaped.reason == "timeout"


def test_the_reaper_holds_a_live_pid_holder_to_the_timeout(handoff: Handoff) -> None:
    """A hand-written executor that keeps renewing forever: timeout_seconds + one lease length, then out."""
    handoff.publish("step_001", timeout_seconds=100)
    claim = claim_task(handoff.fork, "step_001", holder="hand-written@here:1", lease_seconds=10_000)
    assert claim is not None
    alive = subprocess.Popen(["sleep", "600"])
    try:
        write_document(handoff.fork.lease_file("step_001"), claim.lease.model_copy(update={"pid": alive.pid}))
        assert _reap(handoff, after=150, lease=60) == []  # timeout + lease not reached yet
        (reaped,) = _reap(handoff, after=161, lease=60)
        assert (reaped.outcome, reaped.reason) == ("requeued", "timeout")
        assert alive.poll() is None  # a live holder is never killed: it finds its lease lost itself
    finally:
        stop_process(alive)  # type: ignore[arg-type]
    (event,) = _events(handoff, "task.lease_expired")
    assert (event["holder"], event["reason"]) == ("hand-written@here:1", "timeout")


def test_the_engines_own_claims_are_not_held_to_the_timeout_by_the_reaper(handoff: Handoff) -> None:
    handoff.publish("step_001", timeout_seconds=5)
    claim_task(handoff.fork, "step_001", holder="conductor-engine@here:1", lease_seconds=10_000)
    assert _reap(handoff, after=1000, lease=60) == []


def test_lease_expired_reasons_holder_died_and_no_lease_with_a_holder_never_null(handoff: Handoff) -> None:
    handoff.publish("step_001")
    handoff.publish("step_002")
    claim = claim_task(handoff.fork, "step_001", holder="died@here:1", lease_seconds=10_000)
    assert claim is not None
    write_document(handoff.fork.lease_file("step_001"), claim.lease.model_copy(update={"pid": dead_pid()}))
    handoff.task_path("pending", "step_002").rename(handoff.task_path("in_progress", "step_002"))  # no lease
    reaped = _reap(handoff, after=61)
    assert {(r.task_id, r.reason) for r in reaped} == {("step_001", "holder_died"), ("step_002", "no_lease")}
    events = {e["step_id"]: e for e in _events(handoff, "task.lease_expired")}
    assert (events["step_001"]["holder"], events["step_001"]["reason"]) == ("died@here:1", "holder_died")
    assert (events["step_002"]["holder"], events["step_002"]["reason"]) == ("unknown", "no_lease")


def test_a_pid_less_lease_is_never_taken_for_a_dead_holder(handoff: Handoff) -> None:
    handoff.publish("step_001")
    agent.claim(handoff.layout, holder=ME)
    assert _reap(handoff, after=30) == []  # pid 0 on this host: only the time counts
    assert handoff.where()["in_progress"] == ["step_001"]


# --- release ------------------------------------------------------------------------------------


def test_release_audits_and_offers_a_new_attempt_in_a_fresh_workspace(handoff: Handoff) -> None:
    handoff.publish("step_001")
    first = agent.claim(handoff.layout, holder=ME)
    (Path(first.workspace) / "README.md").write_text("half done\n")

    back = agent.release(handoff.layout, "step_001", holder=ME, reason="wrong tool for this")

    assert (back.state, back.attempt) == ("pending", 2)
    assert back.workspace != first.workspace
    assert (Path(back.workspace) / "README.md").read_text() == "hello\n"  # the retry starts from the base
    assert _events(handoff, "task.released") == [{"step_id": "step_001", "attempt": 1, "holder": ME,
                                                  "reason": "wrong tool for this"}]
    assert [e.get("reason") for e in _events(handoff, "task.published")] == ["released"]
    assert not handoff.fork.lease_file("step_001").exists()
    with pytest.raises(StateConflict):
        agent.release(handoff.layout, "step_001", holder=ME)  # not in progress any more


def test_an_executor_of_its_own_can_release_through_conductor_task(handoff: Handoff) -> None:
    """A hand-written executor (its own lease, its own pid) gives a task back the documented way."""
    handoff.publish("step_001", timeout_seconds=300)
    claim = claim_task(handoff.fork, "step_001", holder="mini@here:42", lease_seconds=60)
    assert claim is not None and claim.lease.pid > 0
    with pytest.raises(LeaseLost):
        agent.release(handoff.layout, "step_001", holder="mini@here:42", attempt=2)  # not the attempt it holds
    back = agent.release(handoff.layout, "step_001", holder="mini@here:42", attempt=1, reason="cannot run node")
    assert (back.state, back.attempt) == ("pending", 2)
    assert _events(handoff, "task.released")[0]["holder"] == "mini@here:42"


def test_releasing_the_last_attempt_fails_the_step(handoff: Handoff) -> None:
    _config(handoff, max_attempts=2)
    handoff.publish("step_001")
    agent.claim(handoff.layout, holder=ME)
    agent.release(handoff.layout, "step_001", holder=ME)
    agent.claim(handoff.layout, holder=ME)
    last = agent.release(handoff.layout, "step_001", holder=ME, reason="still stuck")
    assert (last.state, last.attempt) == ("failed", 2)
    result = read_document(handoff.fork.sidecar("failed", "step_001", ".result.json"), Result)
    assert result.error is not None and result.error.kind == "released" and "still stuck" in result.error.message
    assert [e["reason"] for e in _events(handoff, "task.failed")] == ["released"]
    with pytest.raises(NotFound):
        agent.claim(handoff.layout, holder=ME)  # no endless loop


# --- list and show ------------------------------------------------------------------------------


def test_list_and_show_give_states_in_a_stable_order(handoff: Handoff) -> None:
    for step in ("step_003", "step_001", "step_002"):
        handoff.publish(step)
    agent.claim(handoff.layout, task_id="step_002", holder=ME)
    tasks = agent.list_tasks(handoff.layout)
    assert [(t.task_id, t.state, t.holder) for t in tasks] == [
        ("step_001", "pending", None), ("step_002", "in_progress", ME), ("step_003", "pending", None)]
    assert agent.list_tasks(handoff.layout, states=("completed",)) == []
    agent.complete(handoff.layout, "step_002", holder=ME)
    shown = agent.show(handoff.layout, "step_002")
    assert shown.state == "completed"
    assert shown.to_json()["result"]["status"] == "completed" and shown.to_json()["verdict"] is None
    with pytest.raises(agent.BadRequest):
        agent.list_tasks(handoff.layout, states=("limbo",))


def test_an_unknown_task_field_is_passed_through(handoff: Handoff) -> None:
    """Fields a newer task model adds (previous_attempts, say) reach the agent untouched."""
    handoff.publish("step_001")
    task = agent.claim(handoff.layout, holder=ME)
    assert task.to_json()["checksum"] == handoff.read_task("in_progress", "step_001").checksum
    view = agent._agent_task(handoff.layout, handoff.fork, "in_progress", handoff.read_task("in_progress", "step_001"))
    extended = type(view)(**{**view.__dict__, "extra": {**view.extra, "previous_attempts": [{"attempt": 1}]}})
    assert extended.to_json()["previous_attempts"] == [{"attempt": 1}]
    assert extended.to_json()["workspace"] == view.workspace  # extra never overrides the agent's own fields


# --- real processes -------------------------------------------------------------------------------


def _cli(root: Path, *args: str, home: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "conductor", "task", *args, "-C", str(root)],
                            env=clean_environ(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _done(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=180)
    return proc.returncode, out, err


@pytest.mark.slow
def test_racing_claimers_in_separate_processes_exactly_one_wins(tmp_path: Path, isolated_environment: Path) -> None:
    handoff = make_handoff(tmp_path / "project", steps=1)
    handoff.publish("step_001")
    racers = [_cli(handoff.root, "claim", "step_001", "--json", "--holder", f"racer-{i}", home=isolated_environment)
              for i in range(6)]
    outcomes = [_done(proc) for proc in racers]
    winners = [json.loads(out) for code, out, _ in outcomes if code == 0]
    assert len(winners) == 1, outcomes
    assert sorted(code for code, _, _ in outcomes) == [0] + [StateConflict.exit_code] * 5, outcomes
    assert all("already claimed" in err or "cannot be claimed" in err for code, _, err in outcomes if code), outcomes
    lease = handoff.read_lease("step_001")
    assert lease.holder == winners[0]["holder"] and lease.pid == 0
    assert len(_events(handoff, "task.claimed")) == 1


@pytest.mark.slow
def test_racing_next_task_claimers_share_the_queue_without_a_double_claim(tmp_path: Path, isolated_environment: Path) -> None:
    handoff = make_handoff(tmp_path / "project", steps=3)
    handoff.publish_all()
    racers = [_cli(handoff.root, "claim", "--json", "--holder", f"racer-{i}", home=isolated_environment) for i in range(5)]
    outcomes = [_done(proc) for proc in racers]
    won = [json.loads(out)["task_id"] for code, out, _ in outcomes if code == 0]
    assert sorted(won) == ["step_001", "step_002", "step_003"], outcomes
    assert sorted(code for code, _, _ in outcomes) == [0, 0, 0, NotFound.exit_code, NotFound.exit_code]
    holders = {handoff.read_lease(step).holder for step in won}
    assert len(holders) == 3
    claimed = _events(handoff, "task.claimed")
    assert sorted(e["step_id"] for e in claimed) == sorted(won)


@pytest.mark.slow
def test_completing_processes_racing_a_reaper_never_both_commit(tmp_path: Path, isolated_environment: Path) -> None:
    """An agent completes (a real process) while the reaper re-queues: either the completion or the re-queue
    happened, never both, and the audit log says which."""
    handoff = make_handoff(tmp_path / "project", steps=1)
    handoff.publish("step_001")
    task = agent.claim(handoff.layout, holder=ME)
    (Path(task.workspace) / "README.md").write_text("racing\n")
    proc = _cli(handoff.root, "complete", "step_001", "--holder", ME, "--json", home=isolated_environment)
    reaped = _reap(handoff, after=61)
    code, out, err = _done(proc)
    if reaped:  # the reaper won the lock: the completion found the task gone and wrote nothing
        assert code == StateConflict.exit_code, (out, err)
        assert handoff.files_in("completed") == [] and handoff.where()["pending"] == ["step_001"]
        assert _events(handoff, "task.completed") == []
    else:
        assert code == 0, err
        assert handoff.where()["completed"] == ["step_001"] and _events(handoff, "task.lease_expired") == []


@pytest.mark.slow
def test_a_lease_claimed_through_the_cli_outlives_the_process_and_a_stranger_cannot_complete(
        tmp_path: Path, isolated_environment: Path) -> None:
    handoff = make_handoff(tmp_path / "project", steps=1)
    handoff.publish("step_001")
    code, out, err = _done(_cli(handoff.root, "claim", "--json", "--holder", ME, home=isolated_environment))
    assert code == 0, err
    claimed = json.loads(out)
    assert _reap(handoff, after=5) == []  # the claiming process is gone; the lease is not
    (Path(claimed["workspace"]) / "README.md").write_text("done by me\n")
    code, _, err = _done(_cli(handoff.root, "complete", claimed["ref"], "--holder", OTHER, home=isolated_environment))
    assert code == LeaseLost.exit_code
    assert f"held by {ME}, not by {OTHER}" in err
    assert handoff.files_in("completed") == []
    code, _, err = _done(_cli(handoff.root, "complete", claimed["ref"], "--holder", ME, "--attempt", "1",
                              home=isolated_environment))
    assert code == 0, err
    assert [c.path for c in handoff.read_result("completed", "step_001").files_changed] == ["README.md"]
    assert not handoff.fork.lease_file("step_001").exists()
