"""A small sample project with a real bug and a real test suite, and ways to run the real CLI on it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from conductor.audit import verify_chain
from conductor.project import init_project

CALC = "def add(a, b):\n    return a - b\n"
FIXED_CALC = "def add(a, b):\n    return a + b\n"
TEST_CALC = "from calc import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n"
VERIFY = f"{sys.executable} -m pytest -q -p no:cacheprovider"


def make_project(root: Path, *, config: dict | None = None, policy: dict | None = None) -> Path:
    """A git-less Python project with a failing test, initialised for Conductor."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "calc.py").write_text(CALC)
    (root / "test_calc.py").write_text(TEST_CALC)
    (root / "poetry.lock").write_text("locked\n")
    init_project(root)
    base_config = {"verification": {"commands": [VERIFY], "timeout_seconds": 120},
                   "executor": {"poll_seconds": 0.5}}
    for section, values in (config or {}).items():
        base_config.setdefault(section, {}).update(values)
    (root / ".conductor" / "config.yaml").write_text(yaml.safe_dump(base_config))
    (root / ".conductor" / "policy.yaml").write_text(yaml.safe_dump(policy or {"file_rules": {"protected_patterns": ["*.lock"]}}))
    return root


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONDUCTOR_", "OPENAI_", "GEMINI_", "GOOGLE_"))}
    env.update(extra)
    return env


def conductor(root: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess."""
    return subprocess.run([sys.executable, "-m", "conductor", *args], cwd=root, env=env or cli_env(),
                          capture_output=True, text=True, timeout=timeout)


def spawn(root: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "conductor", *args], cwd=root, env=env or cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def all_chains_verify(root: Path) -> list[Path]:
    """Verify every audit log under the project; returns the logs checked (asserts they are intact)."""
    logs = sorted((root / ".conductor" / "handoff").rglob("audit.log"))
    for log in logs:
        report = verify_chain(log)
        assert report.ok, (log, report.problems)
    return logs
