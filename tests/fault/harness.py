"""A tiny project, a two-fork plan and the real CLI, for crashing Conductor on purpose.

The plan: fork 1 ("good") appends ``one`` to ``a.txt``, then (depending on it) writes ``two`` to ``b.txt``;
fork 2 ("bad") writes ``c.txt`` although only ``a.txt`` is allowed, so the verifier rejects it. Fork 1 wins
and its changes are applied: the project must end with exactly :data:`EXPECTED` and no ``c.txt``. A step
whose effect is applied twice shows as a doubled line. Every execution of a step's command appends
``<plan> <fork> <step> <attempt>`` to an ``O_APPEND`` log outside the project (``FAULT_EXEC_LOG``), so an
attempt executed twice is visible too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from conductor.project import init_project

EXEC_LOG_ENV = "FAULT_EXEC_LOG"
COMMAND = (
    'printf "%s %s %s %s\\n" "$CONDUCTOR_PLAN_ID" "$CONDUCTOR_FORK_ID" "$CONDUCTOR_TASK_ID" "$CONDUCTOR_ATTEMPT" '
    '>> "$FAULT_EXEC_LOG" && eval "$CONDUCTOR_INSTRUCTION"'
)
PLAN = {
    "goal": "append one, then two",
    "strategies": [
        {"name": "good", "description": "two dependent steps", "steps": [
            {"id": "one", "title": "one", "instruction": "echo one >> a.txt", "allowed_files": ["a.txt"],
             "confidence": 0.9},
            {"id": "two", "title": "two", "instruction": "echo two >> b.txt", "allowed_files": ["b.txt"],
             "depends_on": ["one"], "confidence": 0.9},
        ]},
        {"name": "bad", "description": "writes outside its allowed files", "steps": [
            {"id": "bad", "title": "bad", "instruction": "echo bad >> c.txt", "allowed_files": ["a.txt"],
             "confidence": 0.9},
        ]},
    ],
}
EXPECTED = {"a.txt": "a\none\n", "b.txt": "two\n"}
ABSENT = ("c.txt",)
GOOD_STEPS = ("step_001", "step_002")  # fork 1
LEASE_SECONDS = 3
CONFIG = {
    "executor": {"kind": "command", "command": COMMAND, "poll_seconds": 0.1, "lease_seconds": LEASE_SECONDS,
                 "heartbeat_seconds": 1, "max_attempts": 5, "parallel": 2,
                 "env": [EXEC_LOG_ENV]},  # launched commands see only allowlisted variables
    "verification": {"commands": [], "timeout_seconds": 60},
}
RUN_TIMEOUT = 120.0


def make_template(root: Path) -> Path:
    """Initialise the sample project once (keys and all); trials copy it."""
    root.mkdir(parents=True)
    (root / "a.txt").write_text("a\n")
    init_project(root)
    (root / ".conductor" / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    # The execution log is a test oracle outside the workspace, which the sandbox would refuse (as it
    # should: tests/test_sandbox.py); these trials are about crashes, not containment.
    (root / ".conductor" / "policy.yaml").write_text(yaml.safe_dump({"sandbox": {"mode": "off"}}))
    (root / "plan.yaml").write_text(yaml.safe_dump(PLAN))
    return root


@dataclass
class Trial:
    """One copy of the sample project, with its execution log and helpers to run the real CLI on it."""

    root: Path
    exec_log: Path
    home: Path
    runs: list[str] = field(default_factory=list)  # what was run, with exit codes (for failure reports)

    @classmethod
    def copy_of(cls, template: Path, where: Path) -> Trial:
        where.mkdir(parents=True, exist_ok=True)
        root = where / "project"
        shutil.copytree(template, root, symlinks=True)
        home = where / "home"
        home.mkdir(exist_ok=True)
        return cls(root=root, exec_log=where / "exec.log", home=home)

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("CONDUCTOR_", "OPENAI_", "GEMINI_", "GOOGLE_", "PYTEST_"))}
        env["HOME"] = str(self.home)
        env[EXEC_LOG_ENV] = str(self.exec_log)
        env.update(extra)
        return env

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "conductor", *args]

    def run(self, *args: str, timeout: float = RUN_TIMEOUT, **extra: str) -> subprocess.CompletedProcess[str]:
        """Run ``conductor <args>`` to the end (extra keyword arguments become environment variables)."""
        started = time.monotonic()
        proc = subprocess.run(self.argv(*args), cwd=self.root, env=self.env(**extra), capture_output=True,
                              text=True, timeout=timeout)
        self.note(args, extra, proc.returncode, time.monotonic() - started, proc.stderr)
        return proc

    def spawn(self, *args: str, **extra: str) -> subprocess.Popen[str]:
        return subprocess.Popen(self.argv(*args), cwd=self.root, env=self.env(**extra), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def note(self, args: tuple[str, ...], extra: dict[str, str], code: int | None, seconds: float, stderr: str) -> None:
        env = " ".join(f"{k}={v}" for k, v in extra.items() if k != EXEC_LOG_ENV)
        tail = stderr.strip().splitlines()[-1][:300] if stderr.strip() else ""
        self.runs.append(f"{env} conductor {' '.join(args)} -> {code} in {seconds:.1f} s {tail}".strip())

    def explore(self, **extra: str) -> subprocess.CompletedProcess[str]:
        return self.run("explore", "--plan", "plan.yaml", "--forks", "2", "--json", **extra)

    def resume(self, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return self.run("resume", "--json", *args, **extra)

    def executions(self) -> Counter[tuple[str, str, str, str]]:
        """(plan, fork, step, attempt) → how many times its command ran."""
        if not self.exec_log.exists():
            return Counter()
        return Counter(tuple(line.split()) for line in self.exec_log.read_text().splitlines() if line.strip())

    def plan_ids(self) -> list[str]:
        handoff = self.root / ".conductor" / "handoff"
        return sorted(p.name[5:] for p in handoff.glob("plan_*") if (p / "plan.json").is_file())

    def story(self) -> str:
        return "\n".join(self.runs)


def finish(trial: Trial, *resume_args: str) -> subprocess.CompletedProcess[str] | None:
    """Bring an interrupted trial to its end: ``resume``, or ``explore`` again if no plan was ever created.

    Returns:
        The last command's result, or None when the plan had already finished (nothing to resume).
    """
    if not trial.plan_ids():
        return trial.explore()
    proc = trial.resume(*resume_args)
    if proc.returncode == 9 and "no unfinished plan" in proc.stderr:
        return None
    return proc


def crash_counts(trace: Path) -> Counter[str]:
    """Crash point (and ``io.<op>``) → times reached, from a ``CONDUCTOR_CRASH_TRACE`` file."""
    if not trace.exists():
        return Counter()
    return Counter(line for line in trace.read_text().splitlines() if line)


def workers() -> int:
    """How many trials to run at once: one per CPU (the trials are subprocesses), at least two."""
    return max(2, os.cpu_count() or 2)


def recovery_repairs(root: Path) -> list[str]:
    """The ``what`` of every ``recovery.repaired`` / ``recovery.audit_truncated`` event in the project's logs."""
    from conductor.audit import AuditLog

    found = []
    for log in sorted((root / ".conductor" / "handoff").rglob("audit.log")):
        for event in AuditLog(log).events():
            if event.type == "recovery.repaired":
                found.append(str(event.data.get("what")))
            elif event.type == "recovery.audit_truncated":
                found.append("audit_truncated")
    return found
