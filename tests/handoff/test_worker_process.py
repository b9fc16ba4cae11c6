"""``conductor worker`` as real processes: racing workers, kill -9, SIGTERM, watch mode."""

from __future__ import annotations

import collections
import os
import re
import signal
import time
from pathlib import Path

import pytest

from conductor.attempts import attempt_changes, prepare_retry
from conductor.audit import AuditLog, verify_chain
from conductor.handoff.reaper import reap_expired
from tests.handoff.support import (
    Handoff,
    clean_environ,
    kill_group_quietly,
    make_handoff,
    pid_running,
    start_worker,
    stop_process,
    wait_for,
)

RUN_LINE = re.compile(r"worker (\S+): (\d+) task\(s\) run")


def _race_tasks() -> int:
    """Tasks of the race: ``CONDUCTOR_RACE_TASKS`` (default 1000). Read at import, because the autouse
    fixture of tests/conftest.py removes every ``CONDUCTOR_*`` variable before a test runs."""
    raw = os.environ.get("CONDUCTOR_RACE_TASKS", "1000")
    if not raw.strip().isdigit() or int(raw) < 4:
        raise ValueError(f"CONDUCTOR_RACE_TASKS={raw!r}: expected a whole number of at least 4 (one per worker)")
    return int(raw)


RACE_TASKS = _race_tasks()
RACE_TIMEOUT = max(600, int(RACE_TASKS * 0.3))  # 1,000 tasks take ~40 s on 2 CPUs; listing grows with the queue


def _tasks_run(output: str) -> int:
    match = RUN_LINE.search(output)
    assert match, f"no summary line in the worker's output:\n{output}"
    return int(match.group(2))


def _events(handoff: Handoff, type_: str) -> list[dict]:
    return [e.data for e in AuditLog(handoff.fork.audit_log).events() if e.type == type_]


# --- four workers, one thousand tasks (CONDUCTOR_RACE_TASKS) -------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(RACE_TIMEOUT)
def test_four_worker_processes_run_a_thousand_tasks_exactly_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    count, workers = RACE_TASKS, 4
    began = time.monotonic()
    handoff = make_handoff(tmp_path / "project", steps=count)
    published = handoff.publish_all()
    setup = time.monotonic() - began
    log = tmp_path / "executed.log"
    command = f'echo "$CONDUCTOR_TASK_ID $CONDUCTOR_ATTEMPT" >> {log}'  # >> opens with O_APPEND
    env = clean_environ(tmp_path / "home")

    started = time.monotonic()
    procs = [start_worker(handoff.root, command, "--burst", env=env, log=tmp_path / f"worker{i}.out")
             for i in range(workers)]
    try:
        codes = [proc.wait(timeout=RACE_TIMEOUT - 180) for proc in procs]
    finally:
        for proc in procs:
            stop_process(proc)
    wall = time.monotonic() - started

    outputs = [(tmp_path / f"worker{i}.out").read_text() for i in range(workers)]
    counts = [_tasks_run(output) for output in outputs]
    with capsys.disabled():
        print(f"\n[race] {count} tasks, {workers} workers: setup {setup:.1f} s, workers' wall time {wall:.1f} s, "
              f"per-worker counts {counts}")
    assert codes == [0] * workers, outputs

    lines = log.read_text().splitlines()
    duplicates = [line for line, n in collections.Counter(lines).items() if n > 1]
    assert duplicates == []
    assert len(lines) == count
    assert sorted(lines) == sorted(f"{task.task_id} 1" for task in published)
    assert handoff.where() == {"pending": [], "in_progress": [], "completed": sorted(handoff.step_ids), "failed": []}
    assert handoff.files_in("in_progress") == []
    assert sum(counts) == count
    assert all(n > 0 for n in counts), f"a worker did nothing: {counts}"

    report = verify_chain(handoff.fork.audit_log)
    assert report.ok, report.problems[:5]
    claimed = collections.Counter(e["step_id"] for e in _events(handoff, "task.claimed"))
    completed = collections.Counter(e["step_id"] for e in _events(handoff, "task.completed"))
    assert set(claimed.values()) == set(completed.values()) == {1}
    assert len(completed) == count
    holders = {RUN_LINE.search(output).group(1) for output in outputs}  # type: ignore[union-attr]
    assert {e["holder"] for e in _events(handoff, "task.claimed")} == holders
    assert len(holders) == workers


# --- kill -9 in the middle of a task ------------------------------------------------------------


LONG_ON_FIRST_ATTEMPT = (
    'echo "start $CONDUCTOR_ATTEMPT" >> {log}; '
    'if [ "$CONDUCTOR_ATTEMPT" = 1 ]; then echo $$ > {pid}; echo zombie > README.md; exec sleep 30; fi; '
    'echo "done $CONDUCTOR_TASK_ID $CONDUCTOR_ATTEMPT" >> {log}'
)


@pytest.mark.parametrize("reaper", ["reap_expired", "new_worker"])
@pytest.mark.timeout(120)
def test_kill_9_mid_task_then_the_task_is_retried_at_once_and_completes_once(
    tmp_path: Path, handoff: Handoff, reaper: str
) -> None:
    handoff.publish("step_001")
    log, pid_file = tmp_path / "events.log", tmp_path / "command.pid"
    command = LONG_ON_FIRST_ATTEMPT.format(log=log, pid=pid_file)
    env = clean_environ(tmp_path / "home")  # default lease: 60 s; nothing below may wait for it
    first = start_worker(handoff.root, command, "--burst", env=env, log=tmp_path / "first.out")
    orphan = 0
    try:
        orphan = int(wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), timeout=30,
                              what="the first attempt's command to start"))
        lease = handoff.read_lease("step_001")
        assert (lease.pid, lease.fencing_token) == (first.pid, 1)

        first.send_signal(signal.SIGKILL)
        assert first.wait(timeout=10) == -signal.SIGKILL  # reaped by us: its pid is dead, not a zombie

        assert handoff.where() == {"pending": [], "in_progress": ["step_001"], "completed": [], "failed": []}
        began = time.monotonic()
        if reaper == "reap_expired":
            (reaped,) = reap_expired(handoff.fork, max_attempts=3, lease_seconds=60,
                                     on_event=AuditLog(handoff.fork.audit_log).append,
                                     prepare_retry=lambda task: prepare_retry(handoff.layout, task))
            assert (reaped.outcome, reaped.attempt) == ("requeued", 1)
            retry = handoff.read_task("pending", "step_001")
            assert retry.attempt == 2
            assert attempt_changes(handoff.layout, handoff.root / retry.workspace, retry.base_commit, [])[1] == []
        second = start_worker(handoff.root, command, "--burst", env=env, log=tmp_path / "second.out")
        try:
            assert second.wait(timeout=60) == 0
        finally:
            stop_process(second)
        assert time.monotonic() - began < 30  # far below the 60 s lease: the dead holder was detected
    finally:
        stop_process(first)
        if orphan:
            kill_group_quietly(orphan)  # kill -9 of a worker cannot take its command's group with it

    assert log.read_text().splitlines() == ["start 1", "start 2", "done step_001 2"]
    assert handoff.where() == {"pending": [], "in_progress": [], "completed": ["step_001"], "failed": []}
    result = handoff.read_result("completed", "step_001")
    assert (result.attempt, result.fencing_token) == (2, 2)
    assert result.files_changed == []  # attempt 2 started from the base, not from the zombie's edit
    assert _tasks_run((tmp_path / "second.out").read_text()) == 1
    expired = _events(handoff, "task.lease_expired")
    assert [(e["step_id"], e["attempt"]) for e in expired] == [("step_001", 1)]
    assert [e["attempt"] for e in _events(handoff, "task.completed")] == [2]


# --- SIGTERM while a command runs ---------------------------------------------------------------


@pytest.mark.timeout(60)
def test_sigterm_kills_the_command_group_releases_the_task_and_exits_0(tmp_path: Path, handoff: Handoff) -> None:
    original = handoff.publish("step_001")
    bg_pid, sh_pid = tmp_path / "bg.pid", tmp_path / "sh.pid"
    command = f"sleep 100 & echo $! > {bg_pid}; echo $$ > {sh_pid}; sleep 30"
    env = clean_environ(tmp_path / "home")
    worker = start_worker(handoff.root, command, env=env, log=tmp_path / "worker.out")  # watch mode
    pids: list[int] = []
    try:
        wait_for(lambda: bg_pid.exists() and bg_pid.read_text().strip() and sh_pid.exists()
                 and sh_pid.read_text().strip(), timeout=30, what="the command to start")
        pids = [int(bg_pid.read_text()), int(sh_pid.read_text())]
        assert all(pid_running(pid) for pid in pids)

        began = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(timeout=10)
        elapsed = time.monotonic() - began
    finally:
        stop_process(worker)
        for pid in pids:
            if pid_running(pid):
                kill_group_quietly(pid)

    output = (tmp_path / "worker.out").read_text()
    assert code == 0, output
    print(f"worker stopped {elapsed:.2f} s after SIGTERM")
    wait_for(lambda: not any(pid_running(pid) for pid in pids), timeout=5, what="the command's group to die")
    assert handoff.where() == {"pending": ["step_001"], "in_progress": [], "completed": [], "failed": []}
    assert handoff.files_in("in_progress") == []
    retry = handoff.read_task("pending", "step_001")
    assert retry.attempt == original.attempt + 1
    assert retry.checksum != original.checksum
    assert (handoff.root / retry.workspace).resolve() == handoff.scratch("step_001", 2).resolve()
    assert handoff.scratch("step_001", 1).is_dir()  # unsandboxed: not handed over (tests/handoff/test_hand_over.py)
    assert [e.data["reason"] for e in AuditLog(handoff.fork.audit_log).events()
            if e.type == "task.published"] == ["given_back"]


# --- watch mode ---------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_a_watching_worker_picks_up_a_task_published_later_then_stops_on_sigterm(
    tmp_path: Path, handoff: Handoff
) -> None:
    log = tmp_path / "executed.log"
    command = f'echo "$CONDUCTOR_TASK_ID" >> {log}'
    # A fallback poll longer than the pick-up guard below: only file events can wake the worker in time.
    env = clean_environ(tmp_path / "home", CONDUCTOR_EXECUTOR_POLL_SECONDS="6")
    handoff.publish("step_001")  # done first: proves the worker is up and in its loop
    worker = start_worker(handoff.root, command, env=env, log=tmp_path / "worker.out")
    try:
        wait_for(lambda: handoff.where()["completed"] == ["step_001"], timeout=30, what="the first task")
        time.sleep(0.5)  # the worker is now idle, waiting for file events

        published = time.monotonic()
        handoff.publish("step_002")
        wait_for(lambda: handoff.where()["completed"] == ["step_001", "step_002"], timeout=4,
                 interval=0.02, what="the task published while the worker watched")
        latency = time.monotonic() - published
        assert worker.poll() is None

        worker.send_signal(signal.SIGTERM)
        code = worker.wait(timeout=15)
    finally:
        stop_process(worker)

    output = (tmp_path / "worker.out").read_text()
    print(f"pick-up latency {latency:.2f} s")
    assert code == 0, output
    assert _tasks_run(output) == 2
    assert log.read_text().splitlines() == ["step_001", "step_002"]


@pytest.mark.timeout(90)
def test_an_idle_watching_worker_stops_promptly_on_sigterm(tmp_path: Path, handoff: Handoff) -> None:
    log = tmp_path / "executed.log"
    env = clean_environ(tmp_path / "home", CONDUCTOR_EXECUTOR_POLL_SECONDS="12")
    handoff.publish("step_001")
    worker = start_worker(handoff.root, f'echo "$CONDUCTOR_TASK_ID" >> {log}', env=env, log=tmp_path / "worker.out")
    try:
        wait_for(lambda: handoff.where()["completed"] == ["step_001"], timeout=30, what="the first task")
        time.sleep(0.5)
        began = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)
        elapsed = time.monotonic() - began
    finally:
        stop_process(worker)

    assert worker.returncode == 0
    assert elapsed < 5, f"stopped {elapsed:.1f} s after SIGTERM"


@pytest.mark.timeout(60)
def test_worker_exits_0_with_nothing_to_do_in_burst_mode(tmp_path: Path, handoff: Handoff) -> None:
    worker = start_worker(handoff.root, "false", "--burst", env=clean_environ(tmp_path / "home"),
                          log=tmp_path / "worker.out")
    try:
        assert worker.wait(timeout=30) == 0
    finally:
        stop_process(worker)
    assert _tasks_run((tmp_path / "worker.out").read_text()) == 0
