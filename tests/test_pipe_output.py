"""Issue 10, part 6: output read from a pipe (as agents read it) is whole, one line per row.

Every command runs as its own process with stdout a pipe: tables must not wrap at 80 columns, nothing is
cut with an ellipsis, and ``explain`` never prints an event as JSON cut mid-object.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

TIMEOUT = 120
TITLE = ("Replace the misspelled greeting Helo with Hello in greet.py and keep every other line of the "
         "file exactly as it was before")
STRATEGY = "a rather long strategy name that says in words how this fork goes about the goal"
GOAL = "Fix the greeting in greet.py, and make sure that everything about the greeting is right everywhere"
PLAN = f"""\
goal: {GOAL}
strategies:
  - name: {STRATEGY}
    steps:
      - id: fix
        title: {TITLE}
        instruction: sed -i 's/Helo/Hello/' greet.py
        allowed_files: [greet.py]
        confidence: 0.9
  - name: loud
    steps:
      - id: fail
        title: {TITLE} (but louder)
        instruction: shout
        allowed_files: [greet.py]
        confidence: 0.9
"""
# The worker's command: fork 1's task succeeds and explains itself in Markdown; fork 2's fails, and its
# task.failed message (which quotes the command) is far longer than the 400 characters explain used to cut.
MARKER = "long-marker-" + "x" * 450
COMMAND = f"# {MARKER}\n" + r"""
if [ "$CONDUCTOR_FORK_ID" = 1 ]; then
  sed -i 's/Helo/Hello/' greet.py
  printf '# What I did\n\nI replaced the misspelled greeting in greet.py.\n' > "$CONDUCTOR_EXPLANATION_FILE"
else
  python3 -c "import sys; sys.stderr.write('E' * 700 + '\n'); sys.exit(3)"
fi
"""


def conductor(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``conductor`` with stdout and stderr pipes (not a terminal) and no COLUMNS to hint a width."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "FORCE_COLOR")}
    return subprocess.run([sys.executable, "-m", "conductor", *args], cwd=project, capture_output=True, text=True,
                          timeout=TIMEOUT, env=env)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pipe") / "project"
    root.mkdir()
    assert conductor(root, "init").returncode == 0
    config = root / ".conductor" / "config.yaml"
    config.write_text(config.read_text().replace("max_attempts: 3", "max_attempts: 1", 1))
    (root / "greet.py").write_text('print("Helo, world")\n')
    (root / "plan.yaml").write_text(PLAN)
    published = conductor(root, "explore", "--plan", "plan.yaml", "--executor", "handoff", "--no-wait")
    assert published.returncode == 11, published.stderr
    (root / "explore.out").write_text(published.stdout)
    worked = conductor(root, "worker", "--burst", "--command", COMMAND)
    assert worked.returncode == 0, worked.stderr
    resumed = conductor(root, "resume", "--executor", "handoff")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    (root / "resume.out").write_text(resumed.stdout)
    return root


def _line_with(text: str, fragment: str) -> str:
    lines = [line for line in text.splitlines() if fragment in line]
    assert lines, f"{fragment!r} is on no single line of:\n{text}"
    return lines[0]


def test_status_and_explore_tables_keep_each_row_on_one_line(project: Path) -> None:
    for text in ((project / "explore.out").read_text(), (project / "resume.out").read_text(),
                 conductor(project, "status").stdout):
        row = _line_with(text, f"step_001 {TITLE}")
        assert STRATEGY in row  # the fork's strategy is on the step's row, not folded below it
        assert "…" not in text
        assert not any(char in text for char in "│─┃━┏┡└")  # no box drawing in a pipe
        assert not any(line != line.rstrip() for line in text.splitlines())
    assert GOAL in _line_with(conductor(project, "status").stdout, "plan ")


def test_the_ranking_table_is_one_line_per_fork(project: Path) -> None:
    text = (project / "resume.out").read_text()
    header = _line_with(text, "steps verified")
    assert "changed lines" in header and "tokens" in header
    assert "1/1" in _line_with(text, STRATEGY + "  succeeded")


def test_explain_prints_whole_values_never_cut_json(project: Path) -> None:
    done = conductor(project, "explain", "step_001", "--fork", "2")
    assert done.returncode == 0, done.stderr
    text = done.stdout
    events = [line for line in text.splitlines() if re.match(r"  \d\d:\d\d:\d\d\.\d{3}  ", line)]
    assert len(events) >= 3
    assert not [line for line in events if '{"' in line or "…" in line]
    failed = _line_with(text, "task.failed")
    assert MARKER in failed and "reason=command_failed" in failed and failed.endswith("reason=command_failed")
    heading = _line_with(text, "== fork 2 (loud)")
    assert heading.endswith("[failed] ==") and len(heading) < 400  # a heading, not a 10^6-column rule


def test_explain_shows_the_explanation_as_its_markdown_text(project: Path) -> None:
    text = conductor(project, "explain", "step_001", "--fork", "1").stdout
    assert "# What I did" in text.splitlines()  # not centred in a huge width
    assert _line_with(text, "I replaced the misspelled greeting").startswith("I replaced")
    assert max(len(line) for line in text.splitlines()) < 2000


def test_events_details_are_whole_in_a_pipe(project: Path) -> None:
    text = conductor(project, "events", "--fork", "2").stdout
    assert MARKER in _line_with(text, "task.failed")
    header = _line_with(text, "details")
    assert header.split() == ["#", "time", "log", "seq", "type", "step", "details"]


def test_replay_and_metrics_tables_too(project: Path) -> None:
    replayed = conductor(project, "replay").stdout
    assert "the log agrees with the task folders" in replayed
    assert not any(char in replayed for char in "│─")
    metrics = conductor(project, "handoff-metrics").stdout
    assert _line_with(metrics, "success_rate").split() == ["success_rate", "0.5"]


def test_a_terminal_keeps_rich_tables_and_a_pipe_gets_plain_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from rich.markdown import Markdown

    from conductor.cli import render

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdout", Terminal())
    assert not render.is_pipe() and not isinstance(render.console(), render.PipeConsole)
    piped = io.StringIO()
    monkeypatch.setattr(sys, "stdout", piped)
    out = render.console()
    assert render.is_pipe() and isinstance(out, render.PipeConsole)
    out.print(render.status_table({"plan_id": "p", "goal": "g" * 300, "status": "running", "forks": [
        {"fork_id": "1", "strategy": "s", "status": "running",
         "steps": [{"step_id": "step_001", "title": TITLE * 3, "state": "pending", "attempt": 1, "confidence": "high"}]}]}))
    out.print(Markdown("# Heading\n\nA paragraph [red]not markup[/red] \x1b[31m"))
    out.rule("the end")
    lines = piped.getvalue().splitlines()
    assert lines[0] == "plan p — " + "g" * 300 + " [running]"
    assert lines[1].split() == ["fork", "strategy", "step", "state", "attempt", "confidence"]
    assert lines[2].startswith("1 (running)  s ") and (TITLE * 3) in lines[2] and lines[2].endswith("high")
    assert lines[3:] == ["# Heading", "", "A paragraph [red]not markup[/red] \\x1b[31m", "== the end =="]
