"""A capture sealed after a contained run serves the verifier and the next reset of its folder, and never
stands in for a look at a folder something else could have written: an executor whose processes outlive
it, a verification command, a folder or stat cache changed behind the seal's back. Real bubblewrap, real
processes (CI installs bubblewrap and sets CONDUCTOR_TEST_REQUIRE_SANDBOX=1)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from conductor import sandbox
from conductor.attempts import attempt_changes, state_store
from conductor.executors.base import execute_claim
from conductor.executors.command import CommandRunner
from conductor.handoff.lease import Claim, claim_task
from conductor.workspace import feed, sealed
from conductor.workspace.checkout import index_file
from tests.corpus.builders import HOLDER, verify
from tests.handoff.support import Handoff, make_handoff
from tests.helpers.git_calls import record_git_calls, stat_passes

if sandbox.availability() is not None:
    if os.environ.get("CONDUCTOR_TEST_REQUIRE_SANDBOX") == "1":
        raise RuntimeError(f"CONDUCTOR_TEST_REQUIRE_SANDBOX=1 but {sandbox.availability()}")
    pytest.skip(f"no sandbox here: {sandbox.availability()}", allow_module_level=True)

IGNORE = ["__pycache__/"]
# Starts a process that leaves the command's session and sheds its environment (so no sweep finds it),
# waits for the test's go-ahead, then writes into the workspace: after the command has ended. The command
# waits until it has left (its process group is killed when the command ends).
LINGER = ("setsid env -i /bin/sh -c 'touch \"$1/ready\"; while [ ! -e \"$0\" ]; do sleep 0.02; done; "
          "echo late > late.txt; touch \"$0.done\"' {flag} \"$TMPDIR\" </dev/null >/dev/null 2>&1 & "
          "while [ ! -e \"$TMPDIR/ready\" ]; do sleep 0.01; done")


@pytest.fixture
def handoff(tmp_path: Path) -> Handoff:
    return make_handoff(tmp_path / "project", steps=2)


def run(handoff: Handoff, task_id: str, command: str, *, mode: str) -> Claim:
    """Publish ``task_id`` and run ``command`` on it in this process, as the engine's own executor does."""
    handoff.publish(task_id, sandbox_mode=mode)
    claim = claim_task(handoff.fork, task_id, holder=HOLDER, lease_seconds=60)
    assert claim is not None
    result = execute_claim(handoff.layout, claim, CommandRunner(command, layout=handoff.layout), ignore=IGNORE,
                           lease_seconds=60, heartbeat_seconds=20)
    assert result is not None and result.status == "completed", result
    return claim


def test_a_contained_runs_capture_serves_the_verifier_and_the_next_reset(handoff: Handoff, monkeypatch) -> None:
    claim = run(handoff, "step_001", "echo one > README.md && mkdir __pycache__ && echo c > __pycache__/x.pyc",
                mode="required")
    folder = handoff.scratch("step_001")
    inode = os.stat(folder).st_ino
    calls = record_git_calls(monkeypatch)

    verdict = verify(handoff, claim, ignore=IGNORE)

    assert verdict.accepted and [c.path for c in verdict.files_changed] == ["README.md"]
    assert stat_passes(calls) == []  # the seal stood in for a second look at the folder
    calls.clear()
    task = handoff.publish("step_002")

    # Recycled with one look for untracked files only; what the capture left out is gone all the same.
    second = handoff.root / task.workspace
    assert os.stat(second).st_ino == inode and not folder.exists()
    # With a change feed (conductor.workspace.feed), git is told the only paths the command wrote.
    # The edited README.md is still a file: only __pycache__ may hold something untracked.
    only = ["--", ":(literal)__pycache__"] if feed.available() else []
    assert stat_passes(calls) == [] and [a for a in calls if a[0] == "ls-files"] == [
        ["ls-files", "-z", "-t", "-o", "--directory", *only]]
    assert (second / "README.md").read_text() == "one\n" and not (second / "__pycache__").exists()
    assert sealed.take(second) is None  # taken: the folder is someone else's now
    assert attempt_changes(handoff.layout, second, task.base_commit, IGNORE)[1] == []


@pytest.fixture
def flag(tmp_path: Path):  # type: ignore[no-untyped-def]
    """The go-ahead of a process :data:`LINGER` left behind; given at the end whatever happened, so it exits."""
    path = tmp_path / "go"
    yield path
    path.touch()


def test_a_process_left_behind_by_an_uncontained_executor_is_seen(handoff: Handoff, flag: Path) -> None:
    claim = run(handoff, "step_001", "echo one > README.md; " + LINGER.format(flag=flag), mode="off")
    folder = handoff.scratch("step_001")
    flag.touch()  # the executor's command has ended; what it left behind writes now
    deadline = time.monotonic() + 30
    while not Path(f"{flag}.done").exists():
        assert time.monotonic() < deadline, "the lingering process never wrote"
        time.sleep(0.02)
    assert sealed.sealed_tree(folder, state_store(handoff.layout).exclude_file(IGNORE)) is None

    verdict = verify(handoff, claim, ignore=IGNORE)

    assert sorted(c.path for c in verdict.files_changed) == ["README.md", "late.txt"]
    assert not verdict.accepted  # late.txt is not among the step's allowed files


def test_in_the_sandbox_nothing_outlives_the_command_so_the_seal_holds(handoff: Handoff, flag: Path) -> None:
    claim = run(handoff, "step_001", "echo one > README.md; " + LINGER.format(flag=flag), mode="required")
    flag.touch()
    time.sleep(0.5)  # ample for a live process (it polls every 0.02 s): the pid namespace took it down

    verdict = verify(handoff, claim, ignore=IGNORE)

    assert not Path(f"{flag}.done").exists() and not (handoff.scratch("step_001") / "late.txt").exists()
    assert verdict.accepted and [c.path for c in verdict.files_changed] == ["README.md"]


def test_a_verification_command_ends_the_seal(handoff: Handoff, monkeypatch) -> None:
    claim = run(handoff, "step_001", "echo one > README.md", mode="required")
    verdict = verify(handoff, claim, ignore=IGNORE, commands=("echo tampered >> README.md",))
    assert verdict.accepted and verdict.verification[0].exit_code == 0
    calls = record_git_calls(monkeypatch)

    task = handoff.publish("step_002")

    # The reset looked again — at every file, or at what the change feed saw the (contained) command write —
    # and restored the file it wrote.
    assert len(stat_passes(calls)) == (0 if feed.available() else 1)
    assert [args[0] for args in calls].count("checkout-index") == 1
    assert (handoff.root / task.workspace / "README.md").read_text() == "one\n"


def test_a_seal_ends_when_the_folder_or_its_stat_cache_changes(handoff: Handoff) -> None:
    claim = run(handoff, "step_001", "echo one > README.md", mode="required")
    folder = handoff.scratch("step_001")
    excludes = handoff.layout.conductor_dir / "none"
    tree, _ = attempt_changes(handoff.layout, folder, claim.task.base_commit, IGNORE)
    sealed.seal(folder, excludes, tree)
    assert sealed.sealed_tree(folder, excludes) == tree

    (folder / "new.txt").write_text("x\n")  # a new entry at the top changes the folder's mtime
    assert sealed.sealed_tree(folder, excludes) is None
    sealed.seal(folder, excludes, tree)
    stamp = os.stat(index_file(folder)).st_mtime_ns
    os.utime(index_file(folder), ns=(stamp, stamp + 1))  # the stat cache touched behind the seal's back
    assert sealed.sealed_tree(folder, excludes) is None and sealed.take(folder) is None
    sealed.seal(folder, excludes, tree)
    sealed.forget(folder)
    assert sealed.take(folder) is None
