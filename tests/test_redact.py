"""Secrets never reach launched commands, and never land in what Conductor stores or prints (issue 9,
item 4). The attacker here is a command that prints its environment and a provider error that echoes a
key."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from conductor.redact import REDACTED, launch_environment, redact
from tests.e2e.project import cli_env, conductor, make_project

KEY = "sk-proj-0123456789abcdefghijklmnop"


def test_the_environment_of_a_launched_command_is_an_allowlist() -> None:
    environ = {"PATH": "/bin", "HOME": "/home/u", "LANG": "C.UTF-8", "LC_ALL": "C", "CONDUCTOR_TASK_ID": "step_001",
               "OPENAI_API_KEY": KEY, "GEMINI_API_KEY": "AIza" + "x" * 30, "AWS_SECRET_ACCESS_KEY": "s" * 40,
               "CONDUCTOR_SIGNING_KEY_FILE": "/keys/k", "MY_TOOL_HOME": "/opt/tool"}
    env = launch_environment(environ, ["MY_TOOL_HOME"])
    assert env == {"PATH": "/bin", "HOME": "/home/u", "LANG": "C.UTF-8", "LC_ALL": "C",
                   "CONDUCTOR_TASK_ID": "step_001", "MY_TOOL_HOME": "/opt/tool"}


def test_redact_removes_known_values_credentials_key_shapes_and_url_userinfo() -> None:
    environ = {"OPENAI_API_KEY": "custom-secret-value-1", "SHORT_TOKEN": "abc", "PATH": "/usr/bin/secretive"}
    text = ("custom-secret-value-1 failed; Authorization: Bearer abcdefghijklmnop.qrs; key sk-ABCDEFGHIJKLMNOPQR; "
            "gemini AIzaSyA1234567890abcdefghijklmno; url https://alice:hunter22@llm.example/v1 and "
            "http://127.0.0.1:8080/v1; api_key=\"zzzzzzzzzzzz\"; /usr/bin/secretive stays; abc stays")
    out = redact(text, environ)
    for secret in ("custom-secret-value-1", "abcdefghijklmnop.qrs", "sk-ABCDEFGHIJKLMNOPQR", "AIzaSyA1234567890",
                   "alice", "hunter22", "zzzzzzzzzzzz"):
        assert secret not in out, secret
    assert "Bearer [REDACTED]" in out and f"https://{REDACTED}@llm.example/v1" in out
    assert "http://127.0.0.1:8080/v1" in out and "/usr/bin/secretive stays" in out and "abc stays" in out


def test_a_command_that_prints_its_environment_sees_and_leaks_no_key(tmp_path: Path) -> None:
    root = make_project(tmp_path / "proj")
    plan = root / "plan.yaml"
    # The key is assembled at run time, so the plan itself (stored in plan.json) does not hold it.
    echo_key = f"{sys.executable} -c \"print('Authorization: Bearer ' + 'sk-proj-' + '{KEY[8:]}')\""
    leak = (f"{sys.executable} -c \"import os; print(sorted(os.environ))\"; env; "
            f"echo \\\"OPENAI=$OPENAI_API_KEY\\\"; {echo_key}; exit 3")
    plan.write_text(yaml.safe_dump({"goal": "leak", "strategies": [{"name": "one", "steps": [
        {"id": "leak", "instruction": leak, "allowed_files": ["calc.py"], "confidence": 0.9}]}]}))
    env = cli_env(OPENAI_API_KEY=KEY, GEMINI_API_KEY="AIza" + "k" * 35)

    run = conductor(root, "build", "--plan", str(plan), "--executor", "command",
                    "--command", 'sh -c "$CONDUCTOR_INSTRUCTION"', "--json", env=env)

    assert json.loads(run.stdout)["status"] == "failed"
    stored = "".join(p.read_text(errors="replace") for p in (root / ".conductor").rglob("*") if p.is_file()
                     and p.suffix in (".md", ".json", ".log"))
    explanation = next((root / ".conductor").rglob("failed/step_001.explanation.md")).read_text()
    assert '"OPENAI="' in explanation  # the variable was empty in the command
    for name in ("OPENAI_API_KEY", "GEMINI_API_KEY"):  # neither in Python's list nor in `env`'s output
        assert f"'{name}'" not in explanation and f"\n{name}=" not in explanation
    assert KEY not in stored and KEY not in run.stdout + run.stderr
    assert "Bearer [REDACTED]" in explanation
