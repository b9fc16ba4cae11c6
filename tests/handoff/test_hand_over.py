"""A task given back by the process that ran it hands its folder to the retry only when nothing the attempt
started can write there any more (a contained run); otherwise the retry gets a fresh checkout and the old
folder is left to whatever may still write in it. Each test plays a careless or hostile executor that leaves
junk behind, or a process that keeps writing."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conductor import sandbox
from conductor.attempts import RetryFolders, attempt_changes, prepare_retry
from conductor.audit import AuditLog
from conductor.errors import BudgetExceeded
from conductor.executors.base import Outcome, execute_claim
from conductor.handoff.documents import write_document
from conductor.handoff.lease import claim_task
from conductor.handoff.reaper import reap_expired
from conductor.models import ExecutorInfo
from conductor.workspace import feed
from conductor.workspace.checkout import index_file
from tests.handoff.support import (
    Handoff,
    clean_environ,
    dead_pid,
    make_handoff,
    start_worker,
    stop_process,
    wait_for,
)
from tests.helpers.git_calls import record_git_calls, stat_passes

needs_bwrap = pytest.mark.skipif(sandbox.availability() is not None or not sandbox.reports_status(),
                                 reason="bubblewrap with --json-status-fd is needed")

BASE = {"README.md": "hello\n", "src/app.py": "print('app')\n"}


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` but its ``.git``, by relative path."""
    found = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if rel.parts[0] != ".git" and (path.is_file() or path.is_symlink()):
            found[rel.as_posix()] = path.read_bytes()
    return found


def _mess(folder: Path) -> None:
    """What a careless executor leaves when it is stopped halfway: a tracked file changed (same size too),
    one deleted, untracked files and folders, a commit of the agent's own."""
    (folder / "README.md").write_text("HELLO\n")
    (folder / "src" / "app.py").unlink()
    (folder / "junk.txt").write_text("junk\n")
    (folder / "build" / "deep").mkdir(parents=True)
    (folder / "build" / "deep" / "out.o").write_bytes(b"\0" * 100)
    (folder / ".git" / "stray").write_text("the agent's own git data\n")


class _StoppedRunner:
    """Makes a mess in its workspace, then reports that it gave up because it was told to stop."""

    info = ExecutorInfo(id="test:stopped", kind="command")

    def __init__(self, stop: threading.Event, *, contained: bool) -> None:
        self.stop, self.contained = stop, contained

    def run(self, task, workspace, should_stop):  # type: ignore[no-untyped-def]
        _mess(workspace)
        self.stop.set()
        assert should_stop()
        return Outcome("failed", "stopped", "", contained=self.contained)


def _give_back(handoff: Handoff, *, contained: bool, watch: bool) -> None:
    """Publish and claim attempt 1 of step_001 and run :class:`_StoppedRunner` on it through execute_claim;
    with ``watch``, its folder has this process's change feed, as the engine's own checkouts do."""
    handoff.publish("step_001")
    folder = handoff.scratch("step_001", 1)
    feed.drop(folder)  # as in a worker: another process checked the folder out
    if watch:
        assert feed.start(folder)
    claim = claim_task(handoff.fork, "step_001", holder="worker@here:1", lease_seconds=60)
    assert claim is not None
    stop = threading.Event()
    result = execute_claim(handoff.layout, claim, _StoppedRunner(stop, contained=contained), ignore=[],
                           lease_seconds=60, heartbeat_seconds=5, stop=stop,
                           on_event=AuditLog(handoff.fork.audit_log).append,
                           prepare_retry=lambda task: prepare_retry(handoff.layout, task, watch=watch))
    assert result is None  # given back, not committed


@pytest.mark.parametrize("watch", [False, True], ids=["full pass", "change feed"])
def test_a_contained_attempt_given_back_hands_its_folder_to_the_retry_reset_to_the_base(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, watch: bool) -> None:
    if watch and not feed.available():
        pytest.skip("inotify is not available")
    handoff = make_handoff(tmp_path / "project", steps=1, files=BASE)
    first = handoff.scratch("step_001", 1)
    calls = record_git_calls(monkeypatch)

    _give_back(handoff, contained=True, watch=watch)

    retry = handoff.read_task("pending", "step_001")
    second = handoff.scratch("step_001", 2)
    assert retry.attempt == 2 and (handoff.root / retry.workspace).resolve() == second.resolve()
    assert not first.exists() and not index_file(first).exists()  # renamed, not copied: no new checkout
    assert "read-tree" not in [args[0] for args in calls[1:]]  # (the first is attempt 1's own checkout)
    # A worker's folder comes from another process: git looks at every file once. The engine's own has a
    # feed, which names what the attempt wrote: no pass over the whole folder.
    assert len(stat_passes(calls)) == (0 if watch else 1)
    assert index_file(second).is_file()
    feed.vouch(second)  # as the next contained run would: the feed (if any) goes on, with nothing written yet
    assert feed.changes(second) == ([] if watch else None)
    assert _files(second) == {name: text.encode() for name, text in BASE.items()}  # the mess is gone
    assert not (second / ".git" / "stray").exists()  # the agent's .git is made afresh for the new attempt
    assert (second / ".git" / "HEAD").read_text() == "ref: refs/heads/conductor/step_001.a2\n"
    assert attempt_changes(handoff.layout, second, retry.base_commit, [])[1] == []


def test_an_uncontained_attempt_given_back_leaves_its_folder_and_the_retry_gets_a_fresh_one(tmp_path: Path) -> None:
    handoff = make_handoff(tmp_path / "project", steps=1, files=BASE)
    _give_back(handoff, contained=False, watch=False)

    first, second = handoff.scratch("step_001", 1), handoff.scratch("step_001", 2)
    retry = handoff.read_task("pending", "step_001")
    assert (handoff.root / retry.workspace).resolve() == second.resolve()
    # Something the attempt started may still write in its folder: it is nobody's now, left as it was.
    assert (first / "junk.txt").read_text() == "junk\n" and (first / "README.md").read_text() == "HELLO\n"
    assert second.stat().st_ino != first.stat().st_ino
    assert _files(second) == {name: text.encode() for name, text in BASE.items()}


# Attempt 1 makes a mess and leaves a process in a session of its own that keeps rewriting a file; a later
# attempt makes one change.
ATTEMPT_ONE = ("echo HELLO > README.md; rm src/app.py; echo junk > junk.txt; "
               "(setsid sh -c 'while true; do echo evil >> README.md; sleep 0.02; done' </dev/null >/dev/null 2>&1 &); "
               "echo ready > ready; sleep 60")
COMMAND = f'if [ "$CONDUCTOR_ATTEMPT" = 1 ]; then {ATTEMPT_ONE}; else echo retried >> README.md; fi'


def _worker_amid_its_mess(tmp_path: Path) -> tuple[Handoff, subprocess.Popen[bytes], dict[str, str]]:
    """A project whose step_001 a real ``conductor worker`` runs sandboxed (:data:`COMMAND`), returned once
    attempt 1 has made its mess and its straggler writes; with the worker and its environment."""
    handoff = make_handoff(tmp_path / "project", steps=1, files=BASE)
    handoff.publish("step_001", sandbox_mode="required")
    first = handoff.scratch("step_001", 1)
    env = clean_environ(tmp_path / "home")
    worker = start_worker(handoff.root, COMMAND, env=env, log=tmp_path / "worker.out")
    try:
        wait_for(lambda: (first / "ready").exists() and b"evil" in (first / "README.md").read_bytes(), timeout=30,
                 what="the command to make its mess and start its straggler")
    except BaseException:
        stop_process(worker)
        raise
    return handoff, worker, env


def _burst(handoff: Handoff, env: dict[str, str], tmp_path: Path) -> None:
    """Run ``conductor worker --burst`` (:data:`COMMAND`) until no task is left; it must exit 0."""
    burst = start_worker(handoff.root, COMMAND, "--burst", env=env, log=tmp_path / "burst.out")
    try:
        assert burst.wait(timeout=60) == 0, (tmp_path / "burst.out").read_text()
    finally:
        stop_process(burst)


@needs_bwrap
@pytest.mark.timeout(90)
def test_a_worker_stopped_mid_command_hands_the_sandboxed_folder_over_and_its_straggler_is_gone(
        tmp_path: Path) -> None:
    """The real thing: ``conductor worker`` running a sandboxed command that makes a mess and leaves a
    process in a session of its own that keeps rewriting a file; SIGTERM. The retry takes the folder, reset
    to the base, and nothing writes in it any more; the retry then runs to completion with only its change."""
    handoff, worker, env = _worker_amid_its_mess(tmp_path)
    first = handoff.scratch("step_001", 1)
    inode = first.stat().st_ino
    try:
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(timeout=30)
    finally:
        stop_process(worker)
    assert code == 0, (tmp_path / "worker.out").read_text()

    second = handoff.scratch("step_001", 2)
    retry = handoff.read_task("pending", "step_001")
    assert retry.attempt == 2 and (handoff.root / retry.workspace).resolve() == second.resolve()
    assert not first.exists() and second.stat().st_ino == inode
    time.sleep(0.3)  # the straggler wrote every 20 ms while it lived
    assert _files(second) == {name: text.encode() for name, text in BASE.items()}

    _burst(handoff, env, tmp_path)
    result = handoff.read_result("completed", "step_001")
    assert result.attempt == 2 and [(c.path, c.change) for c in result.files_changed] == [("README.md", "modified")]
    assert (second / "README.md").read_text() == "hello\nretried\n" and not (second / "junk.txt").exists()
    assert os.path.exists(second / "src" / "app.py")


# --- the reaper: a dead holder's folder ----------------------------------------------------------


@pytest.mark.parametrize(("holder", "contained", "taken"), [
    ("dead", True, True),
    ("dead", False, False),  # the lease promises nothing: a process of the attempt may live on
    ("alive", True, False),  # the lease ran out, but its holder lives: it may still be writing
    ("elsewhere", True, False),  # a dead pid means nothing on another host
], ids=["dead and contained", "dead, no promise", "alive", "another host"])
def test_the_reaper_gives_the_retry_a_dead_holders_folder_only_when_its_lease_says_nothing_survives(
        tmp_path: Path, holder: str, contained: bool, taken: bool) -> None:
    handoff = make_handoff(tmp_path / "project", steps=1, files=BASE)
    handoff.publish("step_001")
    first = handoff.scratch("step_001", 1)
    feed.drop(first)  # as in the process that reaps after a crash: it did not check the folder out
    claim = claim_task(handoff.fork, "step_001", holder="worker@here:1", lease_seconds=3600)
    assert claim is not None
    _mess(first)
    alive = subprocess.Popen(["sleep", "30"])
    try:
        update: dict[str, object] = {"pid": alive.pid if holder == "alive" else dead_pid(),
                                     "contained": True if contained else None,
                                     "expires_at": "2020-01-01T00:00:00.000000Z"}
        if holder == "elsewhere":
            update["host"] = "another-host.example"
        write_document(handoff.fork.lease_file("step_001"), claim.lease.model_copy(update=update))
        (reaped,) = reap_expired(handoff.fork, max_attempts=3, lease_seconds=3600,
                                 on_event=AuditLog(handoff.fork.audit_log).append,
                                 prepare_retry=RetryFolders(handoff.layout))
    finally:
        alive.kill()
        alive.wait()

    assert reaped.outcome == "requeued" and (reaped.reason == "holder_died") == (holder == "dead")
    retry = handoff.read_task("pending", "step_001")
    second = handoff.scratch("step_001", 2)
    assert retry.attempt == 2 and (handoff.root / retry.workspace).resolve() == second.resolve()
    assert _files(second) == {name: text.encode() for name, text in BASE.items()}
    if taken:
        assert not first.exists() and not index_file(first).exists()
    else:  # left as the old attempt left it, to whatever may still write there
        assert (first / "junk.txt").read_text() == "junk\n" and (first / "README.md").read_text() == "HELLO\n"
    assert not list(first.parent.glob(".tmp.*"))  # no checkout made ahead was left behind


@needs_bwrap
@pytest.mark.timeout(90)
def test_after_kill_9_of_a_worker_the_next_worker_runs_the_retry_in_the_dead_attempts_folder(
        tmp_path: Path) -> None:
    """``conductor worker`` runs a sandboxed command that makes a mess and leaves a process in a session of
    its own rewriting a file; the worker is killed with SIGKILL. Its lease said ``contained``, so the next
    worker's reap gives the retry that folder, reset; the straggler died with the sandbox."""
    handoff, worker, env = _worker_amid_its_mess(tmp_path)
    first = handoff.scratch("step_001", 1)
    inode = first.stat().st_ino
    try:
        lease = handoff.read_lease("step_001")
        assert lease.contained is True and lease.pgid is not None  # recorded when the command started
        worker.kill()
        worker.wait(timeout=10)
    finally:
        stop_process(worker)

    _burst(handoff, env, tmp_path)
    second = handoff.scratch("step_001", 2)
    result = handoff.read_result("completed", "step_001")
    assert result.attempt == 2 and [(c.path, c.change) for c in result.files_changed] == [("README.md", "modified")]
    assert not first.exists() and second.stat().st_ino == inode
    time.sleep(0.3)  # the straggler wrote every 20 ms while it lived
    assert (second / "README.md").read_text() == "hello\nretried\n" and not (second / "junk.txt").exists()
    assert [e.data["reason"] for e in AuditLog(handoff.fork.audit_log).events()
            if e.type == "task.lease_expired"] == ["holder_died"]


def test_a_task_file_naming_another_steps_folder_never_gets_that_folder_taken(tmp_path: Path) -> None:
    """An uncontained executor rewrites its in-progress task (checksum and all) to name another step's
    folder as its workspace, and its lease to say ``contained``, then dies: the reaper must not move
    that folder away from its own attempt."""
    handoff = make_handoff(tmp_path / "project", steps=2, files=BASE)
    handoff.publish("step_001")
    handoff.publish("step_002")
    other = handoff.scratch("step_002", 1)
    inode = other.stat().st_ino
    claim = claim_task(handoff.fork, "step_001", holder="worker@here:1", lease_seconds=3600)
    assert claim is not None
    write_document(handoff.task_path("in_progress", "step_001"),
                   claim.task.model_copy(update={"workspace": handoff.layout.relative(other), "checksum": None}))
    write_document(handoff.fork.lease_file("step_001"),
                   claim.lease.model_copy(update={"pid": dead_pid(), "contained": True}))

    (reaped,) = reap_expired(handoff.fork, max_attempts=3, lease_seconds=3600,
                             on_event=AuditLog(handoff.fork.audit_log).append,
                             prepare_retry=RetryFolders(handoff.layout))

    assert reaped.reason == "holder_died" and reaped.outcome == "requeued"
    assert other.stat().st_ino == inode and index_file(other).is_file()  # step_002's folder stays its own
    assert handoff.where()["pending"] == ["step_001", "step_002"] and handoff.read_task("pending", "step_002").attempt == 1
    retry = handoff.read_task("pending", "step_001")
    assert (handoff.root / retry.workspace).resolve() == handoff.scratch("step_001", 2).resolve()


@pytest.mark.parametrize("in_process", [True, False], ids=["starts no process", "may start processes"])
def test_a_task_the_budget_refused_hands_its_untouched_folder_over_only_from_an_in_process_runner(
        tmp_path: Path, in_process: bool) -> None:
    """An LLM call the budget refused was never made: a runner that works in this process alone
    (``starts_processes = False``) has touched nothing, so the retry takes its folder; a runner that may
    have started something gets a fresh one, as before."""

    class _OverBudget:
        info = ExecutorInfo(id="llm:test/m", kind="llm")
        starts_processes = not in_process

        def run(self, task, workspace, should_stop):  # type: ignore[no-untyped-def]
            raise BudgetExceeded("over budget")

    handoff = make_handoff(tmp_path / "project", steps=1, files=BASE)
    handoff.publish("step_001")
    first = handoff.scratch("step_001", 1)
    inode = first.stat().st_ino
    claim = claim_task(handoff.fork, "step_001", holder="engine@here:1", lease_seconds=60, contained=in_process)
    assert claim is not None and claim.lease.contained is (True if in_process else None)
    with pytest.raises(BudgetExceeded):
        execute_claim(handoff.layout, claim, _OverBudget(), ignore=[], lease_seconds=60, heartbeat_seconds=5,
                      prepare_retry=lambda task: prepare_retry(handoff.layout, task))

    second = handoff.scratch("step_001", 2)
    assert (handoff.root / handoff.read_task("pending", "step_001").workspace).resolve() == second.resolve()
    assert (second.stat().st_ino == inode) is in_process and first.exists() is not in_process
    assert _files(second) == {name: text.encode() for name, text in BASE.items()}
