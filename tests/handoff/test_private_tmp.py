"""A launched command's private ``TMPDIR`` lives beside the attempt folders, named for the process that made
it, so what a ``kill -9`` leaves there is swept by recovery (it used to pile up in the system temp folder)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from conductor.audit import AuditLog
from conductor.executors.base import execute_claim
from conductor.executors.command import CommandRunner
from conductor.fsutil import TEMP_NAME, private_temp_dir
from conductor.handoff.lease import claim_task
from conductor.handoff.reaper import reap_expired
from conductor.recovery import recover_project
from tests.handoff.support import Handoff, clean_environ, start_worker, stop_process, wait_for


@pytest.mark.timeout(120)
def test_the_tmpdir_a_killed_worker_leaves_is_removed_by_recovery(tmp_path: Path, handoff: Handoff) -> None:
    handoff.publish("step_001")
    oracle = tmp_path / "tmpdir.txt"
    command = f'echo "$TMPDIR" > {oracle}.part && mv {oracle}.part {oracle} && touch "$TMPDIR/left" && exec sleep 60'
    worker = start_worker(handoff.root, command, "--burst", env=clean_environ(tmp_path / "home"),
                          log=tmp_path / "worker.out")
    try:
        wait_for(oracle.exists, timeout=30, what="the command to start")
        private = Path(oracle.read_text().strip())
        fork_scratch = handoff.scratch("step_001").parent
        assert private.parent == fork_scratch
        match = TEMP_NAME.match(private.name)
        assert match is not None and int(match.group("pid")) == worker.pid
        assert oracle.stat().st_uid == private.stat().st_uid and private.stat().st_mode & 0o777 == 0o700

        worker.send_signal(signal.SIGKILL)
        assert worker.wait(timeout=10) == -signal.SIGKILL
        assert (private / "left").exists()  # nothing ran at exit

        report = recover_project(handoff.layout, exclusive=True)
        assert not private.exists()
        assert any(r.what == "temp_removed" and r.path.endswith(private.name) for r in report.repairs)
    finally:
        stop_process(worker)
        # the orphaned `sleep` goes with the dead holder's re-queue
        reap_expired(handoff.fork, max_attempts=3, lease_seconds=60, on_event=AuditLog(handoff.fork.audit_log).append)


def test_a_private_temp_dir_is_removed_at_exit_even_with_a_read_only_folder_inside(tmp_path: Path) -> None:
    parent = tmp_path / "scratch"
    with private_temp_dir(parent) as folder:
        assert folder.parent == parent and TEMP_NAME.match(folder.name)
        (folder / "ro").mkdir()
        (folder / "ro" / "file").write_text("x")
        (folder / "ro").chmod(0o500)
    assert list(parent.iterdir()) == []


@pytest.mark.parametrize("replacement", ["symlink", "file", "gone"])
def test_a_tmpdir_its_command_replaced_loses_only_that_entry(tmp_path: Path, handoff: Handoff,
                                                             replacement: str) -> None:
    """An unsandboxed command swaps its TMPDIR for a link to a folder of the user (or a file, or nothing):
    the step ends as usual, the link is removed without being followed, and nothing is left behind."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep\n")
    swap = {"symlink": f'ln -s {outside} "$TMPDIR"', "file": 'echo x > "$TMPDIR"', "gone": "true"}[replacement]
    handoff.publish("step_001")
    claim = claim_task(handoff.fork, "step_001", holder="tmp-test@here:1", lease_seconds=60)
    assert claim is not None

    result = execute_claim(handoff.layout, claim, CommandRunner(f'rm -rf "$TMPDIR" && {swap}', layout=handoff.layout),
                           ignore=[], lease_seconds=60, heartbeat_seconds=20)

    assert result is not None and result.status == "completed"
    assert (outside / "keep.txt").read_text() == "keep\n" and [p.name for p in outside.iterdir()] == ["keep.txt"]
    fork_scratch = handoff.scratch("step_001").parent
    assert [p.name for p in fork_scratch.iterdir() if TEMP_NAME.match(p.name)] == []
