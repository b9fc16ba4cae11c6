import hashlib
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from conductor.errors import ExecutorError
from conductor.proc import run_command


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
        on_start=seen.append,
    )
    assert int(outcome.output) == seen[0] != os.getpgid(0)


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

    def fail(pid):
        pids.append(pid)
        raise RuntimeError("lease write failed")

    with pytest.raises(RuntimeError):
        run_command(["sleep", "100"], cwd=tmp_path, timeout_seconds=60, on_start=fail)
    assert wait_gone(pids[0])


def test_string_command_can_be_split_without_a_shell(tmp_path):
    outcome = run_command("echo '$HOME'", cwd=tmp_path, timeout_seconds=10, shell=False)
    assert outcome.output == b"$HOME\n"
