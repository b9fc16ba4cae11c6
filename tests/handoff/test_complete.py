"""Completing a claim: sidecars first, the task file last; results from hashing; provenance that matches."""

from __future__ import annotations

import base64
import json
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import rfc8785

from conductor.attempts import prepare_retry
from conductor.canonical import (
    check_checksum,
    compute_checksum,
    sha256_hex,
    strict_loads,
)
from conductor.errors import LeaseLost
from conductor.executors.base import Outcome, execute_claim
from conductor.executors.command import CommandRunner
from conductor.handoff import complete as complete_module
from conductor.handoff.complete import complete_task
from conductor.handoff.lease import Claim, claim_task
from conductor.handoff.reaper import reap_expired
from conductor.models import ExecutorInfo, FileChange, Result, utc_now
from conductor.provenance import PREDICATE_TYPE, STATEMENT_TYPE
from tests.handoff.support import (
    Handoff,
    make_handoff,
    pid_running,
    sha256_file,
    wait_for,
)

FILES = {"README.md": "hello\n", "notes.txt": "a\nb\n", "gone.txt": "bye\n"}


@pytest.fixture
def project(tmp_path: Path) -> Handoff:
    return make_handoff(tmp_path / "project", steps=2, files=FILES)


def _claim(handoff: Handoff, task_id: str = "step_001") -> Claim:
    claim = claim_task(handoff.fork, task_id, holder="worker@here:1", lease_seconds=60)
    assert claim is not None
    return claim


def _run(handoff: Handoff, command: str, task_id: str = "step_001", **publish) -> tuple[Claim, Result | None]:  # type: ignore[no-untyped-def]
    handoff.publish(task_id, **publish)
    claim = _claim(handoff, task_id)
    runner = CommandRunner(command, layout=handoff.layout)
    result = execute_claim(handoff.layout, claim, runner, ignore=[], lease_seconds=60, heartbeat_seconds=5)
    return claim, result


def _hand_result(claim: Claim, status: str = "completed") -> Result:
    now = utc_now()
    return Result(
        task_id=claim.task.task_id, plan_id=claim.task.plan_id, fork_id=claim.task.fork_id,
        attempt=claim.task.attempt, fencing_token=claim.lease.fencing_token,
        task_checksum=claim.task.checksum or "", status=status,  # type: ignore[arg-type]
        executor=ExecutorInfo(id="ide-agent", kind="handoff"), summary="done by hand",
        started_at=now, finished_at=now,
    )


# --- the commit protocol ------------------------------------------------------------------------


def test_complete_writes_every_sidecar_before_moving_the_task(project: Handoff, monkeypatch: pytest.MonkeyPatch) -> None:
    project.publish("step_001")
    claim = _claim(project)
    seen_at_commit: list[tuple[list[str], list[str]]] = []
    real_rename = complete_module.rename_file

    def observing_rename(source: Path, target: Path) -> None:
        seen_at_commit.append((project.files_in("completed"), project.files_in("in_progress")))
        real_rename(source, target)

    monkeypatch.setattr(complete_module, "rename_file", observing_rename)
    complete_task(claim, _hand_result(claim), explanation="# Why\nBecause.\n", provenance=b'{"p":1}')

    assert seen_at_commit == [(
        ["step_001.explanation.md", "step_001.provenance.json", "step_001.result.json"],
        ["step_001.lease.json", "step_001.task.json"],
    )]
    assert project.files_in("completed") == [
        "step_001.explanation.md", "step_001.provenance.json", "step_001.result.json", "step_001.task.json"]
    assert project.files_in("in_progress") == []  # the lease is gone too
    assert project.fork.sidecar("completed", "step_001", ".explanation.md").read_text() == "# Why\nBecause.\n"
    assert project.fork.sidecar("completed", "step_001", ".provenance.json").read_bytes() == b'{"p":1}'
    assert project.read_task("completed", "step_001") == claim.task  # the task file is moved, not rewritten


def test_a_failed_status_commits_into_failed(project: Handoff) -> None:
    project.publish("step_001")
    claim = _claim(project)

    complete_task(claim, _hand_result(claim, "failed"), explanation="could not")

    assert project.where() == {"pending": [], "in_progress": [], "completed": [], "failed": ["step_001"]}
    assert project.read_result("failed", "step_001").status == "failed"


def test_a_crash_before_the_commit_point_leaves_the_task_in_progress(project: Handoff, monkeypatch: pytest.MonkeyPatch) -> None:
    """Delivery is at-least-once: sidecars without the task file are not a completion, and the retry wins."""
    project.publish("step_001")
    claim = _claim(project)

    def crash(source: Path, target: Path) -> None:
        raise OSError("power loss")

    monkeypatch.setattr(complete_module, "rename_file", crash)
    with pytest.raises(OSError):
        complete_task(claim, _hand_result(claim), explanation="first try")
    monkeypatch.undo()

    assert project.fork.find_task("step_001") == ("in_progress", project.task_path("in_progress", "step_001"))
    assert project.read_lease("step_001") == claim.lease
    # The holder is gone for good; once its lease is over, the reaper hands the task out again.
    reap_expired(project.fork, max_attempts=3, lease_seconds=60,
                 now=datetime.now(UTC) + timedelta(seconds=61),
                 prepare_retry=lambda task: prepare_retry(project.layout, task))
    retry = _claim(project)
    assert retry.task.attempt == 2
    complete_task(retry, _hand_result(retry), explanation="second try")

    result = project.read_result("completed", "step_001")
    assert (result.attempt, result.task_checksum) == (2, retry.task.checksum)
    assert project.fork.sidecar("completed", "step_001", ".explanation.md").read_text() == "second try"


def test_complete_rejects_a_result_when_the_task_is_gone(project: Handoff) -> None:
    project.publish("step_001")
    claim = _claim(project)
    complete_task(claim, _hand_result(claim), explanation="once")
    before = project.fork.sidecar("completed", "step_001", ".result.json").read_bytes()

    with pytest.raises(LeaseLost):
        complete_task(claim, _hand_result(claim, "failed"), explanation="twice")

    assert project.fork.sidecar("completed", "step_001", ".result.json").read_bytes() == before
    assert project.files_in("failed") == []


# --- the result ---------------------------------------------------------------------------------


def test_result_is_checksummed_and_names_the_attempt_and_the_task(project: Handoff) -> None:
    claim, result = _run(project, "true")

    path = project.fork.sidecar("completed", "step_001", ".result.json")
    document = strict_loads(path.read_bytes())
    check_checksum(document)
    assert result is not None and result.checksum == document["checksum"]
    assert result == project.read_result("completed", "step_001")
    assert (result.task_id, result.plan_id, result.fork_id) == ("step_001", project.plan.plan_id, project.fork.fork_id)
    assert result.attempt == result.fencing_token == claim.task.attempt == 1
    assert result.task_checksum == claim.task.checksum == project.read_task("completed", "step_001").checksum
    assert result.status == "completed" and result.error is None
    assert result.executor.kind == "command"
    assert result.started_at <= result.finished_at


def test_files_changed_are_what_the_command_really_did(project: Handoff) -> None:
    command = (
        "printf 'hello\\nworld\\n' > README.md; "  # asked for
        "echo surprise > surprise.txt; "            # not asked for
        "rm gone.txt; "
        "mkdir -p sub && printf 'x\\ny\\n' > sub/deep.txt; "
        'echo "I changed nothing at all" > "$CONDUCTOR_EXPLANATION_FILE"'  # the executor's claim is not trusted
    )
    claim, result = _run(project, command)

    workspace = project.root / claim.task.workspace
    assert result is not None and result.status == "completed"
    assert result.summary == "I changed nothing at all"
    assert result.files_changed == [
        FileChange(path="README.md", change="modified", sha256=sha256_file(workspace / "README.md"),
                   lines_added=1, lines_removed=0, mode="100644", old_mode="100644", size=12),
        FileChange(path="gone.txt", change="deleted", sha256=None, lines_added=0, lines_removed=1, old_mode="100644"),
        FileChange(path="sub/deep.txt", change="added", sha256=sha256_file(workspace / "sub/deep.txt"),
                   lines_added=2, lines_removed=0, mode="100644", size=4),
        FileChange(path="surprise.txt", change="added", sha256=sha256_file(workspace / "surprise.txt"),
                   lines_added=1, lines_removed=0, mode="100644", size=9),
    ]
    assert (workspace / "README.md").read_text() == "hello\nworld\n"
    # The fork's state is untouched: the attempt worked in its own folder.
    assert project.fork_text("README.md") == "hello\n"
    assert project.fork_text("gone.txt") is not None


def test_a_command_that_changes_nothing_reports_no_files(project: Handoff) -> None:
    _, result = _run(project, "cat README.md > /dev/null")
    assert result is not None and result.files_changed == []


def test_a_failing_command_fails_the_task_with_command_failed(project: Handoff) -> None:
    claim, result = _run(project, "echo half-done > README.md; echo oops >&2; exit 3")

    assert result is not None
    assert project.where()["failed"] == ["step_001"]
    assert project.where()["completed"] == []
    stored = project.read_result("failed", "step_001")
    assert stored == result
    assert stored.status == "failed"
    assert stored.error is not None and stored.error.kind == "command_failed"
    assert "3" in stored.error.message
    assert [c.path for c in stored.files_changed] == ["README.md"]
    explanation = project.fork.sidecar("failed", "step_001", ".explanation.md").read_text()
    assert "oops" in explanation and "exited with 3" in explanation
    assert project.fork.sidecar("failed", "step_001", ".provenance.json").is_file()
    assert project.read_task("failed", "step_001") == claim.task


def test_a_command_past_its_timeout_is_killed_with_its_process_group(project: Handoff, tmp_path: Path) -> None:
    bg_pid, sh_pid = tmp_path / "bg.pid", tmp_path / "sh.pid"
    command = f"sleep 100 & echo $! > {bg_pid}; echo $$ > {sh_pid}; sleep 100"
    began = time.monotonic()

    _, result = _run(project, command, timeout_seconds=1)

    elapsed = time.monotonic() - began
    assert result is not None and result.status == "failed"
    assert result.error is not None and result.error.kind == "timeout"
    assert project.where()["failed"] == ["step_001"]
    assert elapsed < 10
    pids = [int(bg_pid.read_text()), int(sh_pid.read_text())]
    wait_for(lambda: not any(pid_running(pid) for pid in pids), timeout=5, what="the command's process group to die")


def test_task_arrives_on_stdin_and_in_the_environment(project: Handoff, tmp_path: Path) -> None:
    seen = tmp_path / "seen"
    seen.mkdir()
    command = (f"cat > {seen}/stdin.json; "
               f'printf "%s\\n" "$CONDUCTOR_TASK_ID" "$CONDUCTOR_ATTEMPT" "$CONDUCTOR_WORKSPACE" "$PWD" '
               f'"$CONDUCTOR_TASK_FILE" > {seen}/env')
    claim, result = _run(project, command)

    assert result is not None and result.status == "completed"
    assert json.loads((seen / "stdin.json").read_bytes()) == claim.task.to_document()
    task_id, attempt, workspace, cwd, task_file = (seen / "env").read_text().splitlines()
    assert (task_id, attempt) == ("step_001", "1")
    assert Path(workspace) == Path(cwd) == (project.root / claim.task.workspace).resolve()
    assert Path(task_file) == project.task_path("in_progress", "step_001")


# --- provenance ---------------------------------------------------------------------------------


def test_provenance_is_an_in_toto_statement_whose_subjects_match_the_files(project: Handoff) -> None:
    claim, result = _run(project, "echo changed >> README.md; echo new > added.txt; rm gone.txt")

    assert result is not None
    path = project.fork.sidecar("completed", "step_001", ".provenance.json")
    envelope = strict_loads(path.read_bytes())
    assert envelope["payloadType"] == "application/vnd.in-toto+json"
    assert envelope["signatures"] == []  # _run gives the executor no key: an unsigned envelope
    raw = base64.b64decode(envelope["payload"])
    statement = strict_loads(raw)
    assert rfc8785.dumps(statement) == raw  # canonical bytes: what the DSSE envelope signs
    assert statement["_type"] == STATEMENT_TYPE == "https://in-toto.io/Statement/v1"
    assert statement["predicateType"] == PREDICATE_TYPE

    workspace = project.root / claim.task.workspace
    result_path = project.fork.sidecar("completed", "step_001", ".result.json")
    expected = {
        "README.md": sha256_file(workspace / "README.md"),
        "added.txt": sha256_file(workspace / "added.txt"),
        "step_001.result.json": sha256_hex(result_path.read_bytes()),
    }
    subjects = statement["subject"]
    assert [s["name"] for s in subjects] == sorted(expected)  # the deleted file has nothing to point at
    assert {s["name"]: s["digest"]["sha256"] for s in subjects} == expected

    predicate = statement["predicate"]
    task_document = json.loads(project.task_path("completed", "step_001").read_bytes())
    assert predicate["buildDefinition"]["externalParameters"]["task"] == task_document
    internal = predicate["buildDefinition"]["internalParameters"]
    assert internal["task_checksum"] == claim.task.checksum == compute_checksum(task_document)
    assert internal["policy_digest"] == claim.task.policy_digest
    assert predicate["runDetails"]["builder"]["id"] == result.executor.id
    metadata = predicate["runDetails"]["metadata"]
    assert metadata["invocationId"] == f"{project.plan.plan_id}/{project.fork.fork_id}/step_001#1"
    assert (metadata["startedOn"], metadata["finishedOn"]) == (result.started_at, result.finished_at)


def test_each_task_gets_its_own_workspace_and_results(tmp_path: Path) -> None:
    handoff = make_handoff(tmp_path / "project", steps=2)
    runner = CommandRunner('echo "$CONDUCTOR_TASK_ID" > mine.txt', layout=handoff.layout)
    for task_id in handoff.step_ids:
        handoff.publish(task_id)
        claim = _claim(handoff, task_id)
        execute_claim(handoff.layout, claim, runner, ignore=[], lease_seconds=60, heartbeat_seconds=5)

    for task_id in handoff.step_ids:
        result = handoff.read_result("completed", task_id)
        (change,) = result.files_changed
        workspace = handoff.scratch(task_id)
        assert (workspace / "mine.txt").read_text() == f"{task_id}\n"
        assert change.sha256 == sha256_file(workspace / "mine.txt")


# --- bugs ---------------------------------------------------------------------------------------


class _ScriptedRunner:
    """A runner that does ``action`` (with the task) and reports success."""

    info = ExecutorInfo(id="scripted@here:1", kind="test")

    def __init__(self, action) -> None:  # type: ignore[no-untyped-def]
        self.action = action

    def run(self, task, workspace, should_stop):  # type: ignore[no-untyped-def]
        self.action(task)
        return Outcome("completed", "finished on its own", "finished on its own")


def test_a_stop_request_after_the_work_finished_does_not_discard_it(project: Handoff) -> None:
    project.publish("step_001")
    claim = _claim(project)
    stop = threading.Event()
    runner = _ScriptedRunner(lambda task: stop.set())  # SIGTERM lands just as the command exits 0

    result = execute_claim(project.layout, claim, runner, ignore=[], lease_seconds=60, heartbeat_seconds=5, stop=stop)

    assert result is not None and result.status == "completed"
    assert project.where()["completed"] == ["step_001"]


def test_a_task_file_tampered_with_during_execution_fails_the_task_not_the_worker(project: Handoff) -> None:
    project.publish("step_001")
    claim = _claim(project)

    def tamper(task) -> None:  # type: ignore[no-untyped-def]
        path = project.task_path("in_progress", task.task_id)
        path.write_bytes(path.read_bytes().replace(b"Do step 1.", b"Do evil 1."))

    result = execute_claim(project.layout, claim, _ScriptedRunner(tamper), ignore=[], lease_seconds=60,
                           heartbeat_seconds=5)  # must not raise

    assert result is None  # nothing committed by the executor: the altered task was rejected instead
    assert project.where()["failed"] == ["step_001"]
    stored = project.read_result("failed", "step_001")
    assert stored.error is not None and stored.error.kind == "checksum_mismatch"


def test_a_task_published_before_an_upgrade_is_executed_and_attested_as_published(tmp_path: Path) -> None:
    """A task file without the fields a newer Task model defaults: the engine's own completion and the
    attestation state the document as the file holds it (its dump would add the defaults and no longer
    match the published checksum: exit 5 at completion)."""
    from pydantic_core import PydanticUndefined

    from conductor.attestation import write_attestation
    from conductor.keys import TrustStore, generate_signing_key
    from conductor.models import Task, Verdict
    from conductor.provenance import read_provenance

    handoff = make_handoff(tmp_path / "project", steps=1)
    handoff.publish("step_001")
    path = handoff.task_path("pending", "step_001")
    document = json.loads(path.read_text())
    defaulted = {name for name, f in Task.model_fields.items()
                 if (f.default is not PydanticUndefined and document.get(f.alias or name) == f.default)
                 or (f.default_factory is not None and document.get(name) == f.default_factory())}  # type: ignore[call-arg]
    older = {k: v for k, v in document.items() if k not in defaulted | {"checksum"}}
    assert len(older) < len(document) - 1, defaulted  # some defaulted fields are gone
    older["checksum"] = compute_checksum(older)
    path.write_text(json.dumps(older, indent=2) + "\n")

    claim = _claim(handoff)
    runner = CommandRunner("echo new > a.txt", layout=handoff.layout)
    execute_claim(handoff.layout, claim, runner, ignore=[], lease_seconds=60, heartbeat_seconds=5)

    provenance = handoff.fork.sidecar("completed", "step_001", ".provenance.json")
    read = read_provenance(provenance, TrustStore(), executor_id=runner.info.id, require_signature=False)
    assert read.statement["predicate"]["buildDefinition"]["externalParameters"]["task"] == older
    result = handoff.read_result("completed", "step_001")
    verdict = Verdict(task_id="step_001", plan_id=result.plan_id, fork_id=result.fork_id, attempt=1, accepted=True,
                      policy_digest=claim.task.policy_digest, files_changed=result.files_changed, diff_lines=1,
                      decided_at=utc_now())
    write_attestation(handoff.layout, handoff.fork, verdict, handoff.head, generate_signing_key(tmp_path / "keys"))
    attestation = json.loads(handoff.fork.sidecar("completed", "step_001", ".attestation.json").read_text())
    statement = json.loads(base64.b64decode(attestation["payload"]))
    assert statement["predicate"]["buildDefinition"]["internalParameters"]["task_checksum"] == older["checksum"]


def test_an_attempt_given_back_unworked_does_not_use_up_the_steps_attempts(tmp_path: Path) -> None:
    """The budget refusing the LLM call (or the worker told to stop) gives the task back as attempt + 1,
    a new fencing token, with one more attempt in its budget: a plan halted on its budget twice still has
    every repair the policy allows. An expired lease of that attempt is then retried, not failed."""
    from conductor.audit import AuditLog
    from conductor.errors import BudgetExceeded
    from conductor.executors.base import GIVEN_BACK

    class _OverBudget:
        info = ExecutorInfo(id="llm:test/m", kind="llm")

        def run(self, task, workspace, should_stop):  # type: ignore[no-untyped-def]
            raise BudgetExceeded("over budget")

    handoff = make_handoff(tmp_path / "project", steps=1)
    handoff.publish("step_001", max_attempts=2)
    log = AuditLog(handoff.fork.audit_log)
    with pytest.raises(BudgetExceeded):
        execute_claim(handoff.layout, _claim(handoff), _OverBudget(), ignore=[], lease_seconds=60, heartbeat_seconds=5,
                      on_event=log.append, prepare_retry=lambda task: prepare_retry(handoff.layout, task))

    retry = handoff.read_task("pending", "step_001")
    assert (retry.attempt, retry.max_attempts) == (2, 3)
    assert [e.data.get("reason") for e in log.events() if e.type == "task.published"] == [GIVEN_BACK]
    _claim(handoff)
    reap_expired(handoff.fork, max_attempts=2, lease_seconds=60, now=datetime.now(UTC) + timedelta(seconds=3600),
                 on_event=log.append, prepare_retry=lambda task: prepare_retry(handoff.layout, task))
    assert handoff.read_task("pending", "step_001").attempt == 3  # 2 < 3: retried, where 2 of 2 would have failed
