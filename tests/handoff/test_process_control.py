"""Nothing left running: the command's process group after a kill -9 of its worker, a stop, a timeout.

Real ``conductor worker`` processes, real signals. Commands write the pids of what they start into files so
that each test can check, with ``/proc``, that those processes are gone (or, where they must be left
alone, still there), and kill them in ``finally`` whatever happened.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conductor.attempts import prepare_retry
from conductor.audit import AuditLog
from conductor.handoff.documents import write_document
from conductor.handoff.lease import HOST, Claim, claim_task, renew_lease
from conductor.handoff.reaper import reap_expired
from conductor.models import Lease, utc_now
from conductor.proc import process_start
from tests.handoff.support import (
    Handoff,
    clean_environ,
    dead_pid,
    kill_group_quietly,
    pid_running,
    start_worker,
    stop_process,
    wait_for,
)

ESCAPE = f"{sys.executable} -c 'import os, time; os.setsid(); time.sleep(1000)'"  # leaves the process group

# Attempt 1 starts a background grandchild, a grandchild in a session of its own, records the three pids
# and then blocks; attempt 2 just finishes.
BLOCK_ON_FIRST_ATTEMPT = (
    'if [ "$CONDUCTOR_ATTEMPT" = 1 ]; then '
    "sleep 1000 & echo $! > {dir}/bg; " + ESCAPE + " & echo $! > {dir}/escaped; "
    "sleep 0.3; echo $$ > {dir}/sh; exec sleep 1000; fi; "
    'echo "done $CONDUCTOR_ATTEMPT" >> {dir}/log'
)
NAMES = ("sh", "bg", "escaped")


def _pids(folder: Path) -> dict[str, int]:
    return {name: int((folder / name).read_text()) for name in NAMES}


def _started(folder: Path) -> bool:
    return (folder / "sh").exists() and bool((folder / "sh").read_text().strip())


def _kill_all(pids: dict[str, int] | list[int]) -> None:
    for pid in (pids.values() if isinstance(pids, dict) else pids):
        kill_group_quietly(pid)


def _events(handoff: Handoff, type_: str) -> list[dict]:
    return [e.data for e in AuditLog(handoff.fork.audit_log).events() if e.type == type_]


def _reap(handoff: Handoff, **options: object) -> list:
    return reap_expired(handoff.fork, max_attempts=3, lease_seconds=60, on_event=AuditLog(handoff.fork.audit_log).append,
                        prepare_retry=lambda task: prepare_retry(handoff.layout, task), **options)  # type: ignore[arg-type]


# --- (a) kill -9 of the worker: the reaper kills the orphaned command ---------------------------


@pytest.mark.parametrize("reaper", ["reap_expired", "new_worker", "leaderless"])
@pytest.mark.timeout(120)
def test_after_a_kill_9_the_reaper_kills_the_orphaned_command_and_the_retry_completes(
    tmp_path: Path, handoff: Handoff, reaper: str
) -> None:
    handoff.publish("step_001")
    env = clean_environ(tmp_path / "home")  # lease: 60 s; the dead holder must be detected, not waited out
    command = BLOCK_ON_FIRST_ATTEMPT.format(dir=tmp_path)
    first = start_worker(handoff.root, command, "--burst", env=env, log=tmp_path / "first.out")
    pids: dict[str, int] = {}
    try:
        wait_for(lambda: _started(tmp_path), timeout=30, what="the first attempt's command to start")
        pids = _pids(tmp_path)
        lease = handoff.read_lease("step_001")
        assert (lease.pid, lease.pgid) == (first.pid, pids["sh"])  # recorded at once, well before a heartbeat
        assert lease.pgid_start == process_start(pids["sh"]) is not None

        first.send_signal(signal.SIGKILL)
        assert first.wait(timeout=10) == -signal.SIGKILL
        time.sleep(0.3)
        assert all(pid_running(pid) for pid in pids.values())  # orphaned, not killed with the worker

        if reaper == "leaderless":  # the leader exited, its background child lives on in the group
            os.kill(pids["sh"], signal.SIGKILL)
            wait_for(lambda: not pid_running(pids["sh"]), timeout=5, what="the leader to die")
        began = time.monotonic()
        if reaper == "new_worker":
            second = start_worker(handoff.root, command, "--burst", env=env, log=tmp_path / "second.out")
            try:
                assert second.wait(timeout=60) == 0
            finally:
                stop_process(second)
        else:
            (reaped,) = _reap(handoff)
            assert (reaped.outcome, reaped.attempt) == ("requeued", 1)
            expected = {pids["bg"], pids["escaped"]} | ({pids["sh"]} if reaper == "reap_expired" else set())
            assert set(reaped.killed) == expected
            assert handoff.read_task("pending", "step_001").attempt == 2
        wait_for(lambda: not any(pid_running(pid) for pid in pids.values()), timeout=10,
                 what="the orphaned command to be killed")
        elapsed = time.monotonic() - began
        if reaper != "new_worker":
            second = start_worker(handoff.root, command, "--burst", env=env, log=tmp_path / "second.out")
            try:
                assert second.wait(timeout=60) == 0
            finally:
                stop_process(second)
    finally:
        stop_process(first)
        _kill_all(pids)

    print(f"orphan killed {elapsed:.2f} s after the reaper started")
    assert (tmp_path / "log").read_text().splitlines() == ["done 2"]
    assert handoff.where() == {"pending": [], "in_progress": [], "completed": ["step_001"], "failed": []}
    assert handoff.read_result("completed", "step_001").attempt == 2
    (expired,) = _events(handoff, "task.lease_expired")
    assert pids["bg"] in expired["killed"] and pids["escaped"] in expired["killed"]


# --- (b) SIGTERM / SIGINT: the group and its escapees are gone, the task is released ------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.timeout(60)
def test_a_stop_signal_kills_the_command_and_its_grandchildren_and_releases_the_task(
    tmp_path: Path, handoff: Handoff, sig: int
) -> None:
    original = handoff.publish("step_001")
    worker = start_worker(handoff.root, BLOCK_ON_FIRST_ATTEMPT.format(dir=tmp_path), env=clean_environ(tmp_path / "home"),
                          log=tmp_path / "worker.out")  # watch mode: only the signal ends it
    pids: dict[str, int] = {}
    try:
        wait_for(lambda: _started(tmp_path), timeout=30, what="the command to start")
        pids = _pids(tmp_path)
        assert all(pid_running(pid) for pid in pids.values())
        worker.send_signal(sig)
        code = worker.wait(timeout=15)
        # Gone by the time the worker exits: the worker itself killed them, nobody else did.
        still = [name for name, pid in pids.items() if pid_running(pid)]
    finally:
        stop_process(worker)
        _kill_all(pids)

    assert code == 0, (tmp_path / "worker.out").read_text()
    assert still == []
    assert handoff.where() == {"pending": ["step_001"], "in_progress": [], "completed": [], "failed": []}
    assert handoff.read_task("pending", "step_001").attempt == original.attempt + 1
    assert [e["reason"] for e in _events(handoff, "task.published")] == ["given_back"]


@pytest.mark.timeout(60)
def test_a_second_signal_kills_a_command_that_ignores_sigterm_at_once(tmp_path: Path, handoff: Handoff) -> None:
    handoff.publish("step_001")
    command = f"trap '' TERM; sleep 1000 & echo $! > {tmp_path}/bg; echo $$ > {tmp_path}/sh; wait"
    worker = start_worker(handoff.root, command, env=clean_environ(tmp_path / "home"), log=tmp_path / "worker.out")
    pids: list[int] = []
    try:
        wait_for(lambda: _started(tmp_path), timeout=30, what="the command to start")
        pids = [int((tmp_path / name).read_text()) for name in ("sh", "bg")]
        began = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert all(pid_running(pid) for pid in pids)  # SIGTERM is ignored: only SIGKILL, after 2 s, would do
        worker.send_signal(signal.SIGINT)
        code = worker.wait(timeout=15)
        elapsed = time.monotonic() - began
        still = [pid for pid in pids if pid_running(pid)]
    finally:
        stop_process(worker)
        _kill_all(pids)

    print(f"worker exited {elapsed:.2f} s after the first signal")
    assert code == 0, (tmp_path / "worker.out").read_text()
    assert still == []
    assert elapsed < 1.8  # the 2 s grace period was cut short
    assert handoff.where()["pending"] == ["step_001"]


# --- (c) timeout --------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_timeout_kills_the_group_with_its_grandchildren_and_fails_the_task(tmp_path: Path, handoff: Handoff) -> None:
    handoff.publish("step_001", timeout_seconds=1)
    worker = start_worker(handoff.root, BLOCK_ON_FIRST_ATTEMPT.format(dir=tmp_path), "--burst",
                          env=clean_environ(tmp_path / "home"), log=tmp_path / "worker.out")
    pids: dict[str, int] = {}
    try:
        wait_for(lambda: _started(tmp_path), timeout=30, what="the command to start")
        pids = _pids(tmp_path)
        code = worker.wait(timeout=30)
        still = [name for name, pid in pids.items() if pid_running(pid)]
    finally:
        stop_process(worker)
        _kill_all(pids)

    assert code == 0, (tmp_path / "worker.out").read_text()
    assert still == []
    assert handoff.where() == {"pending": [], "in_progress": [], "completed": [], "failed": ["step_001"]}
    result = handoff.read_result("failed", "step_001")
    assert result.error is not None and result.error.kind == "timeout"


# --- (d), (e) leases the reaper must not act on -------------------------------------------------


def _unrelated_group() -> subprocess.Popen[bytes]:
    """A process group of the test itself: no CONDUCTOR_WORKSPACE in its environment."""
    return subprocess.Popen(["/bin/sh", "-c", "sleep 1000 & exec sleep 1000"], start_new_session=True,
                            env=clean_environ(Path("/nonexistent")))


def _claim_with_lease(handoff: Handoff, **fields: object) -> Claim:
    """Claim step_001 in-process, then replace its lease by one with ``fields``."""
    handoff.publish("step_001")
    claim = claim_task(handoff.fork, "step_001", holder="someone@elsewhere:1", lease_seconds=60)
    assert claim is not None
    lease = Lease(**{**claim.lease.model_dump(by_alias=True, exclude={"checksum"}), **fields})
    claim.lease = write_document(handoff.fork.lease_file("step_001"), lease)
    return claim


def _members(group: subprocess.Popen[bytes]) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{name}/stat").read_text()
        except (OSError, ValueError):
            continue
        if name.isdigit() and int(stat.rsplit(")", 1)[1].split()[2]) == group.pid and pid_running(int(name)):
            found.append(int(name))
    return sorted(found)


@pytest.mark.parametrize("expired", [False, True])
def test_a_lease_of_another_host_is_never_acted_on(handoff: Handoff, expired: bool) -> None:
    group = _unrelated_group()
    try:
        wait_for(lambda: len(_members(group)) == 2, timeout=10, what="the group to start")
        members = _members(group)
        past = "2000-01-01T00:00:00.000000Z"
        _claim_with_lease(handoff, host=f"not-{HOST}", pid=dead_pid(), pgid=group.pid,
                          pgid_start=process_start(group.pid), **({"expires_at": past} if expired else {}))
        reaped = _reap(handoff)
        assert [r.outcome for r in reaped] == (["requeued"] if expired else [])  # only by its time
        assert all(r.killed == () for r in reaped)
        assert _members(group) == members
    finally:
        _kill_all([group.pid])
        group.wait(timeout=10)


def test_a_live_holder_whose_lease_ran_out_keeps_its_command(handoff: Handoff) -> None:
    group, holder = _unrelated_group(), subprocess.Popen(["sleep", "1000"])
    try:
        wait_for(lambda: len(_members(group)) == 2, timeout=10, what="the group to start")
        _claim_with_lease(handoff, pid=holder.pid, pgid=group.pid, pgid_start=process_start(group.pid),
                          expires_at="2000-01-01T00:00:00.000000Z")
        (reaped,) = _reap(handoff)
        assert (reaped.outcome, reaped.killed) == ("requeued", ())
        assert len(_members(group)) == 2
    finally:
        _kill_all([group.pid])
        holder.kill()
        for proc in (group, holder):
            proc.wait(timeout=10)


@pytest.mark.parametrize("recorded", ["recycled", "missing", "proven"])
def test_a_recorded_group_is_killed_only_if_it_is_provably_the_same(handoff: Handoff, recorded: str) -> None:
    group = _unrelated_group()  # plays a group that got the recorded id after the recorded one died
    try:
        wait_for(lambda: len(_members(group)) == 2, timeout=10, what="the group to start")
        members = _members(group)
        boot, ticks = process_start(group.pid).split(":")  # type: ignore[union-attr]
        start = {"recycled": f"{boot}:{int(ticks) - 100}", "missing": None, "proven": f"{boot}:{ticks}"}[recorded]
        _claim_with_lease(handoff, host=HOST, pid=dead_pid(), pgid=group.pid, pgid_start=start)
        (reaped,) = _reap(handoff)
        assert reaped.outcome == "requeued"
        if recorded == "proven":  # the control: the same lease with the right start identity does kill
            assert sorted(reaped.killed) == members
            wait_for(lambda: _members(group) == [], timeout=5, what="the group to die")
        else:
            assert reaped.killed == ()
            assert _members(group) == members
    finally:
        _kill_all([group.pid])
        group.wait(timeout=10)


# --- the lease field itself ---------------------------------------------------------------------


def test_renewals_keep_the_recorded_group(handoff: Handoff) -> None:
    handoff.publish("step_001")
    claim = claim_task(handoff.fork, "step_001", holder="me@here:1", lease_seconds=60)
    assert claim is not None and claim.lease.pgid is None
    renew_lease(claim, lease_seconds=60, pgid=os.getpid())
    renewed = renew_lease(claim, lease_seconds=120)
    on_disk = handoff.read_lease("step_001")
    assert (renewed.pgid, on_disk.pgid) == (os.getpid(), os.getpid())
    assert on_disk.pgid_start == process_start(os.getpid()) is not None
    assert on_disk.renewed_at <= utc_now()
