"""What a command leaves running dies with it, sandboxed or not, and the cheaper path is taken only where it
is proven: a sandboxed command's pid namespace is awaited instead of sweeping /proc; unsandboxed, /proc is
swept as before. Each test plants a daemon that double-forks out of the command's process group and session."""

from __future__ import annotations

import os
import secrets
import signal
import time
from pathlib import Path

import pytest

from conductor import proc as proc_module
from conductor import sandbox
from conductor.proc import run_command
from conductor.sandbox import SandboxSpec

needs_bwrap = pytest.mark.skipif(sandbox.availability() is not None or not sandbox.reports_status(),
                                 reason="bubblewrap with --json-status-fd is needed")


def daemon_script(token: str, folder: Path) -> str:
    """Start ``sleep <token>`` twice removed, in a session of its own (it writes ``folder/started`` first),
    then exit once it runs."""
    started = folder / "started"
    return (f"(setsid sh -c 'echo up > {started}; exec sleep {token}' </dev/null >/dev/null 2>&1 &) ; "
            f"while [ ! -s {started} ]; do sleep 0.01; done; sleep 0.1")


def sleepers(token: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes() == f"sleep\0{token}\0".encode():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def gone(token: str, within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while sleepers(token) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not sleepers(token)


@pytest.fixture
def sweeps(monkeypatch: pytest.MonkeyPatch) -> list[str | None]:
    calls: list[str | None] = []
    real = proc_module.kill_orphans

    def counted(pgid, *, leader_start, marker, grace_seconds):  # type: ignore[no-untyped-def]
        calls.append(marker)
        return real(pgid, leader_start=leader_start, marker=marker, grace_seconds=grace_seconds)

    monkeypatch.setattr(proc_module, "kill_orphans", counted)
    return calls


def token() -> str:
    return f"{900 + secrets.randbelow(99)}.{secrets.randbelow(10**6):06d}"


def spec(tmp_path: Path) -> SandboxSpec:
    return SandboxSpec(writable=(tmp_path,), mode="required", home=None)


@needs_bwrap
def test_a_sandboxed_daemon_dies_with_the_namespace_without_a_sweep(tmp_path: Path, sweeps: list) -> None:
    mark = token()
    env = {**os.environ, "CONDUCTOR_WORKSPACE": str(tmp_path)}
    outcome = run_command(daemon_script(mark, tmp_path), cwd=tmp_path, env=env, timeout_seconds=60, sandbox=spec(tmp_path),
                          sweep_environ=f"CONDUCTOR_WORKSPACE={tmp_path}")
    assert outcome.sandboxed and outcome.exit_code == 0 and (tmp_path / "started").read_text() == "up\n"
    assert sleepers(mark) == []  # at once: the namespace was empty when run_command returned
    assert sweeps == []


@needs_bwrap
def test_a_sandboxed_daemon_dies_after_a_timeout_too(tmp_path: Path, sweeps: list) -> None:
    mark = token()
    outcome = run_command(daemon_script(mark, tmp_path) + "; sleep 100", cwd=tmp_path, timeout_seconds=1.5, kill_grace_seconds=0.5,
                          sandbox=spec(tmp_path), sweep_environ=f"CONDUCTOR_WORKSPACE={tmp_path}")
    assert outcome.timed_out and (tmp_path / "started").read_text() == "up\n"
    assert sleepers(mark) == []
    assert sweeps == []


@needs_bwrap
def test_when_the_namespace_cannot_be_shown_empty_proc_is_swept(tmp_path: Path, sweeps: list,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proc_module._Namespace, "emptied", lambda self, timeout: False)
    outcome = run_command("true", cwd=tmp_path, timeout_seconds=60, sandbox=spec(tmp_path),
                          sweep_environ=f"CONDUCTOR_WORKSPACE={tmp_path}")
    assert outcome.sandboxed and sweeps == [f"CONDUCTOR_WORKSPACE={tmp_path}"]


def test_an_unsandboxed_daemon_is_found_by_the_sweep(tmp_path: Path, sweeps: list) -> None:
    mark = token()
    env = {**os.environ, "CONDUCTOR_WORKSPACE": str(tmp_path)}
    outcome = run_command(daemon_script(mark, tmp_path), cwd=tmp_path, env=env, timeout_seconds=60,
                          sandbox=SandboxSpec(writable=(tmp_path,), mode="off"), sweep_environ=f"CONDUCTOR_WORKSPACE={tmp_path}")
    assert not outcome.sandboxed and outcome.exit_code == 0
    assert sweeps == [f"CONDUCTOR_WORKSPACE={tmp_path}"]
    assert gone(mark)


def test_without_sandbox_or_sweep_the_daemon_survives_which_is_what_the_tests_above_rule_out(tmp_path: Path) -> None:
    mark = token()
    outcome = run_command(daemon_script(mark, tmp_path), cwd=tmp_path, timeout_seconds=60)
    try:
        assert outcome.exit_code == 0
        assert sleepers(mark) != []
    finally:
        for pid in sleepers(mark):
            os.kill(pid, signal.SIGKILL)
