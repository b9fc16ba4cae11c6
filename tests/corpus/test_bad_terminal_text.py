"""Text from a plan, an LLM or an executor, printed by the real CLI: it must not reach the terminal as
escape sequences or as rich markup.

The attacker writes a plan (or is the LLM that writes it) and runs the step's command: the goal retitles the
terminal window (OSC 0) and clears the screen, the strategy name carries a C1 CSI (U+009B) and rich
markup, the title makes text blink, a plan constraint hides text behind a bidi override, and the command
writes an OSC 52 clipboard write (``ESC ] 52``) and rich markup into its explanation. Every human-readable
view (``build``'s report, ``status``, ``explain``, ``events``, ``replay``, ``policy``) must show these
characters as visible escapes (``\\x1b``) and the markup as typed.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from tests.e2e.project import cli_env, conductor, make_project

GOAL = "Fix add \x1b]0;pwned\x07\x1b[2J[red]GOAL[/] :warning:"
STRATEGY = "[bold]strategy[/]\x9b31m"
TITLE = "title\x1b[5m"
CONSTRAINT = "keep \u202etxt.exe tests"
# The fix changes the file's size: a same-size edit right after checkout is sometimes not captured (a
# workspace stat-cache race outside this test's subject, reported separately).
FIX = (f"{sys.executable} -c \"import pathlib; p = pathlib.Path('calc.py'); "
       "p.write_text(p.read_text().replace('a - b', 'a + b  # fixed'))\"")
# The explanation: its first line becomes the step's summary; the rest is shown by `explain`.
EXPLAIN = (f"{sys.executable} -c \"import os; open(os.environ['CONDUCTOR_EXPLANATION_FILE'], 'w')"
           ".write('done \\x1b]52;c;cHduZWQ=\\x07[blink]x[/blink]\\n\\n[link=https://evil.example]click[/link] "
           "\\x1b[8mhidden\\x1b[0m')\"")
# What may never reach a terminal: C0 controls but newline, DEL, C1 controls, bidi and zero-width characters.
RAW = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069]")


def _env() -> dict[str, str]:
    env = cli_env(TERM="dumb", COLUMNS="400", NO_COLOR="1")
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        env.pop(name, None)
    return env


@pytest.mark.timeout(300)
def test_untrusted_text_reaches_the_terminal_escaped(tmp_path: Path) -> None:
    root = make_project(tmp_path / "proj")
    plan = root / "plan.json"
    plan.write_text(json.dumps({"goal": GOAL, "policy": {"global_constraints": [CONSTRAINT]}, "strategies": [
        {"name": STRATEGY, "steps": [{"id": "fix", "title": TITLE, "instruction": f"{FIX} && {EXPLAIN}",
                                      "allowed_files": ["calc.py"], "confidence": 0.9}]}]}))

    build = conductor(root, "build", "--plan", str(plan), "--executor", "command",
                      "--command", 'sh -c "$CONDUCTOR_INSTRUCTION"', env=_env())
    assert build.returncode == 0, (build.stdout, build.stderr)
    plan_id = re.search(r"plan (\S+):", build.stderr).group(1)  # type: ignore[union-attr]
    views = {"build": build}
    for args in (["status"], ["explain", "step_001"], ["events"], ["replay"], ["policy", "--plan-id", plan_id]):
        views[args[0]] = conductor(root, *args, env=_env())

    for name, run in views.items():
        assert run.returncode == 0, (name, run.stderr)
        for stream in (run.stdout, run.stderr):
            assert not RAW.search(stream), (name, RAW.findall(stream), stream)
    shown = {name: run.stdout + run.stderr for name, run in views.items()}
    goal_shown = "Fix add \\x1b]0;pwned\\x07\\x1b[2J[red]GOAL[/] :warning:"  # markup and emoji code as typed
    for name in ("build", "status", "replay"):
        assert goal_shown in shown[name], (name, shown[name])
    for name in ("build", "status"):
        assert "[bold]strategy[/]\\x9b31m" in shown[name] and "step_001 title\\x1b[5m" in shown[name]
    assert "keep \\u202etxt.exe tests" in shown["policy"]
    story = shown["explain"]
    assert "[bold]strategy[/]\\x9b31m" in story and "title\\x1b[5m" in story
    assert "done \\x1b]52;c;cHduZWQ=\\x07[blink]x[/blink]" in story  # the summary (first line)
    assert "\\x1b[8mhidden\\x1b[0m" in story  # the explanation, rendered as Markdown
    assert "[link=https://evil.example]click[/link]" in story
