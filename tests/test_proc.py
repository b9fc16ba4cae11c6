import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conductor.errors import ExecutorError
from conductor.proc import kill_orphans, pid_alive, process_start, run_command


def is_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for a reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def wait_gone(pid: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not is_alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_exit_code_and_combined_output(tmp_path):
    outcome = run_command("echo out; echo err >&2; exit 3", cwd=tmp_path, timeout_seconds=10)
    assert outcome.exit_code == 3
    assert not outcome.timed_out
    assert outcome.signal is None
    assert sorted(outcome.output.split()) == [b"err", b"out"]
    assert outcome.output_size == len(outcome.output)
    assert outcome.output_sha256 == hashlib.sha256(outcome.output).hexdigest()


def test_runs_in_cwd_with_env(tmp_path):
    outcome = run_command(
        [sys.executable, "-c", "import os; print(os.getcwd(), os.environ['GREETING'])"],
        cwd=tmp_path,
        env={"GREETING": "hello"},
        timeout_seconds=30,
    )
    assert outcome.output.decode().split() == [str(tmp_path.resolve()), "hello"]


def test_child_gets_its_own_process_group(tmp_path):
    seen = []
    outcome = run_command(
        [sys.executable, "-c", "import os; print(os.getpgid(0))"],
        cwd=tmp_path,
        timeout_seconds=30,
        on_start=lambda pid, contained: seen.append((pid, contained)),
    )
    assert int(outcome.output) == seen[0][0] != os.getpgid(0)
    assert seen[0][1] is False  # no sandbox: nothing promises its processes die with us


def test_timeout_kills_the_whole_group_including_a_background_grandchild(tmp_path):
    started = time.monotonic()
    outcome = run_command(
        "sleep 100 & echo $!; sleep 100", cwd=tmp_path, timeout_seconds=1.0, kill_grace_seconds=1.0
    )
    assert time.monotonic() - started < 10
    assert outcome.timed_out
    assert outcome.exit_code is None
    assert outcome.signal == signal.SIGTERM
    grandchild = int(outcome.output.split()[0])
    assert wait_gone(grandchild)


def test_a_background_grandchild_dies_with_a_child_that_exits_normally(tmp_path):
    outcome = run_command("sleep 100 & echo $!", cwd=tmp_path, timeout_seconds=10)
    assert outcome.exit_code == 0
    assert wait_gone(int(outcome.output.split()[0]))


def test_sigkill_after_the_grace_period_when_sigterm_is_ignored(tmp_path):
    outcome = run_command("trap '' TERM; sleep 100", cwd=tmp_path, timeout_seconds=0.5, kill_grace_seconds=0.5)
    assert outcome.timed_out
    assert outcome.signal == signal.SIGKILL
    assert outcome.duration_seconds < 10


def test_a_child_killed_by_a_signal_reports_it(tmp_path):
    outcome = run_command("kill -KILL $$", cwd=tmp_path, timeout_seconds=10)
    assert outcome.exit_code is None
    assert outcome.signal == signal.SIGKILL
    assert not outcome.timed_out


def test_stdin_is_delivered(tmp_path):
    outcome = run_command(["cat"], cwd=tmp_path, stdin=b"hello\nworld\n", timeout_seconds=10)
    assert outcome.output == b"hello\nworld\n"


def test_without_stdin_the_child_reads_end_of_file(tmp_path):
    outcome = run_command("cat; echo done", cwd=tmp_path, timeout_seconds=10)
    assert outcome.output == b"done\n"


def test_large_input_and_output_do_not_deadlock(tmp_path):
    data = os.urandom(3 * 1024 * 1024)  # far beyond a pipe buffer in both directions
    outcome = run_command(["cat"], cwd=tmp_path, stdin=data, timeout_seconds=60, max_output_bytes=1024)
    assert outcome.exit_code == 0
    assert outcome.output_size == len(data)
    assert outcome.output == data[-1024:]
    assert outcome.output_sha256 == hashlib.sha256(data).hexdigest()


def test_a_child_that_ignores_its_input_does_not_block_us(tmp_path):
    outcome = run_command("exit 0", cwd=tmp_path, stdin=b"x" * (4 * 1024 * 1024), timeout_seconds=10)
    assert outcome.exit_code == 0


def test_output_keeps_the_last_mebibyte_by_default(tmp_path):
    code = "import sys; sys.stdout.write('a' * 2_000_000 + 'END')"
    outcome = run_command([sys.executable, "-c", code], cwd=tmp_path, timeout_seconds=60)
    assert outcome.output_size == 2_000_003
    assert len(outcome.output) == 1 << 20
    assert outcome.output.endswith(b"aEND")


def test_should_stop_stops_the_group(tmp_path):
    started = time.monotonic()
    outcome = run_command(
        "sleep 100 & echo $!; sleep 100",
        cwd=tmp_path,
        timeout_seconds=60,
        should_stop=lambda: time.monotonic() - started > 0.5,
    )
    assert time.monotonic() - started < 10
    assert not outcome.timed_out
    assert outcome.exit_code is None
    assert outcome.signal == signal.SIGTERM
    assert wait_gone(int(outcome.output.split()[0]))


def test_missing_executable_is_an_executor_error(tmp_path):
    with pytest.raises(ExecutorError, match="command not found"):
        run_command(["conductor-no-such-command-xyz"], cwd=tmp_path, timeout_seconds=5)


def test_missing_working_folder_is_an_executor_error(tmp_path):
    with pytest.raises(ExecutorError, match="does not exist"):
        run_command(["true"], cwd=tmp_path / "missing", timeout_seconds=5)


def test_an_exception_in_on_start_still_kills_the_child(tmp_path):
    pids = []

    def fail(pid, contained):
        pids.append(pid)
        raise RuntimeError("lease write failed")

    with pytest.raises(RuntimeError):
        run_command(["sleep", "100"], cwd=tmp_path, timeout_seconds=60, on_start=fail)
    assert wait_gone(pids[0])


def test_string_command_can_be_split_without_a_shell(tmp_path):
    outcome = run_command("echo '$HOME'", cwd=tmp_path, timeout_seconds=10, shell=False)
    assert outcome.output == b"$HOME\n"


# --- stopping at once, setsid escapes, orphans ----------------------------------------------------

ESCAPE = f"{sys.executable} -c 'import os, time; os.setsid(); time.sleep(100)'"  # out of reach of killpg
ESCAPE_AND_EXIT = f"{ESCAPE} & echo $!; sleep 0.5"  # half a second to leave the group before the command exits


def spawn_group(*script: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], list[int]]:
    """Start ``sh -c`` in a new session; each line of ``script`` runs in the background and prints its pid."""
    body = "".join(f"{line} & echo $!; " for line in script) + "exec sleep 100"
    proc = subprocess.Popen(["/bin/sh", "-c", body], stdout=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, **(env or {})})
    with proc.stdout:  # type: ignore[union-attr]
        pids = [int(proc.stdout.readline()) for _ in script]  # type: ignore[union-attr]
    return proc, pids


def cleanup(*pids: int) -> None:
    for pid in pids:
        for kill in (os.killpg, os.kill):
            try:
                kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def test_kill_now_cuts_the_grace_period_short(tmp_path):
    started = time.monotonic()
    outcome = run_command(
        "trap '' TERM; sleep 100", cwd=tmp_path, timeout_seconds=60, kill_grace_seconds=60,
        should_stop=lambda: time.monotonic() - started > 0.3,
        kill_now=lambda: time.monotonic() - started > 0.8,
    )
    assert time.monotonic() - started < 10
    assert outcome.signal == signal.SIGKILL
    assert outcome.exit_code is None


def test_a_setsid_grandchild_survives_killpg_but_not_the_environment_sweep(tmp_path):
    survivor = escaped = 0
    try:
        outcome = run_command(ESCAPE_AND_EXIT, cwd=tmp_path, env={**os.environ, "CONDUCTOR_WORKSPACE": f"{tmp_path}/a"},
                              timeout_seconds=30)
        survivor = int(outcome.output.split()[0])
        assert is_alive(survivor)  # the limit of a process group
        outcome = run_command(ESCAPE_AND_EXIT, cwd=tmp_path, env={**os.environ, "CONDUCTOR_WORKSPACE": f"{tmp_path}/b"},
                              timeout_seconds=30, sweep_environ=f"CONDUCTOR_WORKSPACE={tmp_path}/b")
        escaped = int(outcome.output.split()[0])
        assert outcome.exit_code == 0
        assert wait_gone(escaped)
        assert is_alive(survivor)  # another marker: not this command's
    finally:
        cleanup(survivor, escaped)


def test_the_sweep_also_follows_a_timeout(tmp_path):
    escaped = 0
    try:
        outcome = run_command(f"{ESCAPE_AND_EXIT}; sleep 100", cwd=tmp_path, timeout_seconds=1.5, kill_grace_seconds=0.5,
                              env={**os.environ, "CONDUCTOR_WORKSPACE": str(tmp_path)},
                              sweep_environ=f"CONDUCTOR_WORKSPACE={tmp_path}")
        escaped = int(outcome.output.split()[0])
        assert outcome.timed_out
        assert wait_gone(escaped)
    finally:
        cleanup(escaped)


def test_the_sweep_matches_the_exact_entry_only(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    proc, (escaped,) = spawn_group(ESCAPE, env={"CONDUCTOR_WORKSPACE": f"{other}0"})
    try:
        run_command("true", cwd=tmp_path, timeout_seconds=10, sweep_environ=f"CONDUCTOR_WORKSPACE={other}")
        assert is_alive(escaped)
    finally:
        cleanup(proc.pid, escaped)
        proc.wait()


def test_process_start_identifies_one_process(tmp_path):
    first = subprocess.Popen(["sleep", "100"])
    try:
        assert process_start(first.pid) == process_start(first.pid) is not None
        assert process_start(first.pid).split(":")[0] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    finally:
        first.kill()
        first.wait()
    assert process_start(first.pid) is None  # reaped


def test_a_killed_process_is_dead_before_its_parent_collects_it():
    """A holder killed with kill -9 stays a zombie until its parent reaps it (an init that reaps orphans
    periodically takes seconds): it runs no code any more, so a reaper must not wait for that."""
    child = subprocess.Popen(["sleep", "100"])
    try:
        assert pid_alive(child.pid)
        child.kill()
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child.pid}/stat").read_text().split(") ")[1][0] != "Z":  # not yet reaped: a zombie
            assert time.monotonic() < deadline, "the killed child never became a zombie"
            time.sleep(0.01)
        assert not pid_alive(child.pid)
    finally:
        child.kill()
        child.wait()
    assert not pid_alive(child.pid)  # reaped: no such process


def test_kill_orphans_kills_a_group_whose_leader_has_the_recorded_start():
    proc, (child,) = spawn_group("sleep 100")
    try:
        killed = kill_orphans(proc.pid, leader_start=process_start(proc.pid), marker=None, grace_seconds=1)
        assert killed == sorted([proc.pid, child])
        assert proc.wait(timeout=5) == -signal.SIGTERM
        assert wait_gone(child)
    finally:
        cleanup(proc.pid, child)
        proc.wait()


def test_kill_orphans_sends_sigkill_after_the_grace_period():
    proc, (child,) = spawn_group("trap '' TERM; sleep 100")
    try:
        began = time.monotonic()
        kill_orphans(proc.pid, leader_start=process_start(proc.pid), marker=None, grace_seconds=0.5)
        assert 0.4 < time.monotonic() - began < 5
        assert wait_gone(child)
    finally:
        cleanup(proc.pid, child)
        proc.wait()


def test_kill_orphans_leaves_a_group_with_another_start_alone():
    proc, (child,) = spawn_group("sleep 100")
    try:
        boot, ticks = process_start(proc.pid).split(":")
        recycled = f"{boot}:{int(ticks) - 1}"  # the recorded leader was another process with this pid
        assert kill_orphans(proc.pid, leader_start=recycled, marker="CONDUCTOR_WORKSPACE=/nowhere",
                            grace_seconds=0.2) == []
        assert kill_orphans(proc.pid, leader_start=None, marker=None, grace_seconds=0.2) == []
        assert is_alive(proc.pid) and is_alive(child)
    finally:
        cleanup(proc.pid, child)
        proc.wait()


def test_kill_orphans_proves_a_leaderless_group_by_a_member_carrying_the_marker(tmp_path):
    marker = f"CONDUCTOR_WORKSPACE={tmp_path}"
    proc, (child,) = spawn_group("sleep 100", env={"CONDUCTOR_WORKSPACE": str(tmp_path)})
    try:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()  # the leader is gone; its group lives on in the background sleep
        assert kill_orphans(proc.pid, leader_start=None, marker=f"{marker}/x", grace_seconds=0.2) == []
        assert is_alive(child)
        assert kill_orphans(proc.pid, leader_start=None, marker=marker, grace_seconds=1) == [child]
        assert wait_gone(child)
    finally:
        cleanup(proc.pid, child)


def test_kill_orphans_finds_a_marked_process_outside_the_group(tmp_path):
    proc, (escaped,) = spawn_group(ESCAPE, env={"CONDUCTOR_WORKSPACE": str(tmp_path)})
    try:
        time.sleep(0.2)  # let it leave the group
        killed = kill_orphans(None, leader_start=None, marker=f"CONDUCTOR_WORKSPACE={tmp_path}", grace_seconds=1)
        assert escaped in killed
        assert wait_gone(escaped)
    finally:
        cleanup(proc.pid, escaped)
        proc.wait()


def test_within_an_environ_snapshot_every_holders_leftovers_are_still_found(tmp_path):
    """One reap pass, many dead holders: /proc environments are read once for the first filter, yet each
    holder's orphan is killed, including one started after the snapshot's first reads."""
    from conductor.proc import environ_snapshot

    def orphan(marker: str) -> subprocess.Popen:
        proc = subprocess.Popen(["sleep", "100"], env={**os.environ, "CONDUCTOR_WORKSPACE": marker},
                                start_new_session=True)
        # Until it execs, a child shows its parent's environment: a leftover of a dead holder has long run.
        deadline = time.monotonic() + 10
        while f"CONDUCTOR_WORKSPACE={marker}".encode() not in Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0"):
            assert time.monotonic() < deadline
            time.sleep(0.005)
        return proc

    first, second = orphan(f"{tmp_path}/a"), orphan(f"{tmp_path}/b")
    late = None
    try:
        with environ_snapshot():
            assert kill_orphans(None, leader_start=None, marker=f"CONDUCTOR_WORKSPACE={tmp_path}/a",
                                grace_seconds=1) == [first.pid]
            late = orphan(f"{tmp_path}/c")  # a new pid: read when first seen, not from the snapshot
            assert kill_orphans(None, leader_start=None, marker=f"CONDUCTOR_WORKSPACE={tmp_path}/b",
                                grace_seconds=1) == [second.pid]
            assert kill_orphans(None, leader_start=None, marker=f"CONDUCTOR_WORKSPACE={tmp_path}/c",
                                grace_seconds=1) == [late.pid]
        for proc in (first, second, late):
            assert proc.wait(timeout=5) == -signal.SIGTERM
    finally:
        for proc in (first, second, late):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
