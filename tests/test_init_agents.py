"""``conductor init --agent``: each agent's instruction file lands where that agent reads it, a second run
changes nothing, the user's own text is kept byte for byte, and every ``conductor …`` command the file
tells the agent to run is a real command with real options.

Where each agent reads its instructions (checked against each tool's documentation):

- Claude Code: ``CLAUDE.md`` at the project root (https://docs.anthropic.com/en/docs/claude-code/memory)
- Codex: ``AGENTS.md``, from the git root down to the working folder
  (https://developers.openai.com/codex/guides/agents-md)
- Cursor: ``.cursor/rules/*.mdc`` with front matter ``description``, ``globs``, ``alwaysApply``
  (https://www.cursor.com/docs/rules)
- Gemini CLI: ``GEMINI.md`` in the workspace and its parents (https://geminicli.com/docs/cli/gemini-md)
- aider: a conventions file loaded by ``read:`` in ``.aider.conf.yml`` at the git root
  (https://aider.chat/docs/usage/conventions.html, https://aider.chat/docs/config/aider_conf.html)
- generic: ``AGENTS.md`` (https://agents.md/)
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest
import yaml

from conductor.agents import AGENTS, BEGIN, END, INSTRUCTIONS, upsert_section
from conductor.cli.main import cli, main
from conductor.errors import ConfigError

EXPECTED = {
    "claude-code": ["CLAUDE.md"],
    "codex": ["AGENTS.md"],
    "cursor": [".cursor/rules/conductor.mdc"],
    "gemini": ["GEMINI.md"],
    "aider": ["CONVENTIONS.md", ".aider.conf.yml"],
    "generic": ["AGENTS.md"],
}


def init(root: Path, *agents: str) -> int:
    args = ["init", "-C", str(root)]
    for agent in agents:
        args += ["--agent", agent]
    return main(args)


def snapshot(root: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file outside .conductor/: bytes, inode and mtime (a rewrite with equal bytes shows too)."""
    found = {}
    for path in root.rglob("*"):
        if path.is_file() and ".conductor" not in path.relative_to(root).parts:
            stat = path.stat()
            found[path.relative_to(root).as_posix()] = (path.read_bytes(), stat.st_ino, stat.st_mtime_ns)
    return found


# --- where the files land ---------------------------------------------------------------------------


@pytest.mark.parametrize("agent", list(EXPECTED))
def test_the_file_lands_where_the_agent_reads_it_and_a_second_run_changes_nothing(tmp_path: Path, agent: str) -> None:
    assert init(tmp_path, agent) == 0
    files = {p for p in snapshot(tmp_path)}
    assert files == set(EXPECTED[agent])
    text = (tmp_path / EXPECTED[agent][0]).read_text("utf-8")
    assert text.count(BEGIN) == 1 and text.count(END) == 1 and INSTRUCTIONS in text
    before = snapshot(tmp_path)
    assert init(tmp_path, agent) == 0
    assert snapshot(tmp_path) == before


def test_cursor_rule_has_the_front_matter_cursor_expects(tmp_path: Path) -> None:
    assert init(tmp_path, "cursor") == 0
    text = (tmp_path / ".cursor/rules/conductor.mdc").read_text("utf-8")
    match = re.match(r"---\n(.*?)\n---\n", text, re.S)
    assert match, "an .mdc rule starts with a front matter block"
    front = yaml.safe_load(match.group(1))
    assert set(front) == {"description", "globs", "alwaysApply"}
    assert isinstance(front["description"], str) and front["description"]
    assert front["alwaysApply"] is True  # a boolean, not the string "true": applied to every request
    assert text[match.end():].startswith(BEGIN)


def test_aider_reads_the_conventions_file_through_its_config(tmp_path: Path) -> None:
    assert init(tmp_path, "aider") == 0
    config = yaml.safe_load((tmp_path / ".aider.conf.yml").read_text("utf-8"))
    assert config == {"read": "CONVENTIONS.md"}
    assert INSTRUCTIONS in (tmp_path / "CONVENTIONS.md").read_text("utf-8")


@pytest.mark.parametrize(("config", "expected_read"), [
    ("model: gpt-4o\n", ["CONVENTIONS.md"]),
    ("model: gpt-4o", ["CONVENTIONS.md"]),
    ("read: STYLE.md  # ours\nmodel: x\n", ["STYLE.md", "CONVENTIONS.md"]),
    ("read: [STYLE.md, 'docs/a b.md']\n", ["STYLE.md", "docs/a b.md", "CONVENTIONS.md"]),
    ("read: []\n", ["CONVENTIONS.md"]),
    ("model: x\nread:\n  - STYLE.md\n  # a comment\n  - other.md\nauto-commits: false\n",
     ["STYLE.md", "other.md", "CONVENTIONS.md"]),
    ("read:\n- STYLE.md", ["STYLE.md", "CONVENTIONS.md"]),
])
def test_aider_config_gains_the_read_entry_and_keeps_the_rest(tmp_path: Path, config: str, expected_read: list[str]) -> None:
    path = tmp_path / ".aider.conf.yml"
    path.write_text(config, "utf-8")
    before = yaml.safe_load(config)
    assert init(tmp_path, "aider") == 0
    after = yaml.safe_load(path.read_text("utf-8"))
    read = after.pop("read")
    assert (read if isinstance(read, list) else [read]) == expected_read
    before.pop("read", None)
    assert after == before
    for line in config.splitlines():  # every line the user wrote is still there
        if not line.startswith("read:"):
            assert line in path.read_text("utf-8").splitlines()
    settled = path.read_bytes()
    assert init(tmp_path, "aider") == 0
    assert path.read_bytes() == settled


def test_aider_config_already_reading_conventions_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / ".aider.conf.yml"
    path.write_bytes(b"read: [CONVENTIONS.md]   # keep\r\n")
    stat = path.stat()
    assert init(tmp_path, "aider") == 0
    assert path.read_bytes() == b"read: [CONVENTIONS.md]   # keep\r\n"
    assert path.stat().st_ino == stat.st_ino


def test_an_aider_config_that_cannot_be_edited_safely_is_refused_unchanged(tmp_path: Path) -> None:
    path = tmp_path / ".aider.conf.yml"
    original = b"read: &files [a.md]\nextra: *files\n"  # an anchor: the entry has a second reader
    path.write_bytes(original)
    assert init(tmp_path, "aider") == ConfigError.exit_code
    assert path.read_bytes() == original


# --- user text ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("agent", list(EXPECTED))
def test_user_text_is_kept_byte_for_byte_and_an_old_section_is_replaced(tmp_path: Path, agent: str) -> None:
    path = tmp_path / EXPECTED[agent][0]
    path.parent.mkdir(parents=True, exist_ok=True)
    head = "# My project\n\nUse tabs.  Trailing spaces stay.   \n\n"
    tail = "\n## Later notes\nüñí©ødé, no final newline"
    path.write_text(f"{head}{BEGIN}\nan old Conductor section\n{END}\n{tail}", "utf-8")
    assert init(tmp_path, agent) == 0
    text = path.read_text("utf-8")
    assert text.startswith(head) and text.endswith(tail)
    assert "an old Conductor section" not in text and INSTRUCTIONS in text
    assert text.count(BEGIN) == 1
    before = path.read_bytes()
    assert init(tmp_path, agent) == 0
    assert path.read_bytes() == before


def test_a_file_without_a_section_gets_it_appended_after_a_blank_line(tmp_path: Path) -> None:
    (tmp_path / "CLAUDE.md").write_bytes(b"Be brief.")
    assert init(tmp_path, "claude-code") == 0
    text = (tmp_path / "CLAUDE.md").read_text("utf-8")
    assert text.startswith(f"Be brief.\n\n{BEGIN}\n")
    assert text.endswith(f"{END}\n")


def test_crlf_files_stay_crlf(tmp_path: Path) -> None:
    (tmp_path / "GEMINI.md").write_bytes(b"line one\r\nline two\r\n")
    assert init(tmp_path, "gemini") == 0
    data = (tmp_path / "GEMINI.md").read_bytes()
    assert data.startswith(b"line one\r\nline two\r\n\r\n")
    assert b"\n" not in data.replace(b"\r\n", b"")


def test_codex_and_generic_share_agents_md(tmp_path: Path) -> None:
    assert init(tmp_path, "codex", "generic") == 0
    assert (tmp_path / "AGENTS.md").read_text("utf-8").count(BEGIN) == 1


def test_file_mode_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "AGENTS.md"
    path.write_text("mine\n", "utf-8")
    path.chmod(0o600)
    assert init(tmp_path, "codex") == 0
    assert path.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("broken", [
    f"{BEGIN}\nno end\n",
    f"{END}\n{BEGIN}\n",
    f"{BEGIN}\n{END}\n{BEGIN}\n{END}\n",
])
def test_unbalanced_markers_are_refused_and_nothing_is_written(tmp_path: Path, broken: str) -> None:
    path = tmp_path / "CLAUDE.md"
    path.write_text(broken, "utf-8")
    assert init(tmp_path, "claude-code") == ConfigError.exit_code
    assert path.read_text("utf-8") == broken
    with pytest.raises(ConfigError, match="CLAUDE.md: the Conductor section's markers are unbalanced"):
        upsert_section(broken, "x", path="CLAUDE.md")


def test_a_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    (tmp_path / "AGENTS.md").write_bytes(b"caf\xe9\n")
    assert init(tmp_path, "generic") == ConfigError.exit_code
    assert (tmp_path / "AGENTS.md").read_bytes() == b"caf\xe9\n"


def test_unknown_agent_is_a_usage_error(tmp_path: Path) -> None:
    assert init(tmp_path, "vim") == 2
    assert not (tmp_path / ".conductor").exists()


def test_init_agent_in_a_real_process_prints_what_it_wrote(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "conductor", "init", "-C", str(tmp_path), "--agent", "cursor", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["agent_files"] == [{"agent": "cursor", "path": ".cursor/rules/conductor.mdc", "action": "created"}]
    again = subprocess.run([sys.executable, "-m", "conductor", "init", "-C", str(tmp_path), "--agent", "cursor"],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "unchanged .cursor/rules/conductor.mdc" in again.stdout


# --- the commands in the text are real ---------------------------------------------------------------


def commands_in(text: str) -> tuple[list[str], list[str]]:
    """(``conductor …`` lines of indented code blocks, ``conductor …`` inline code spans)."""
    blocks = [line.strip() for line in text.splitlines() if re.match(r"^ {4,}conductor ", line)]
    spans = re.findall(r"`(conductor(?: [^`]*)?)`", text)
    return blocks, spans


def resolve(args: list[str]) -> tuple[click.Command, list[str], list[str]]:
    """Walk ``conductor`` subcommands: (the leaf command, its path, the arguments left for it)."""
    assert args[0] == "conductor", args
    command: click.Command = cli
    path, args = ["conductor"], args[1:]
    while isinstance(command, click.Group) and args and not args[0].startswith("-"):
        with click.Context(command, info_name=path[-1]) as ctx:
            sub = command.get_command(ctx, args[0])
        assert sub is not None, f"`{' '.join(path)} {args[0]}` is not a command"
        command, path, args = sub, [*path, args[0]], args[1:]
    return command, path, args


def option_names(command: click.Command) -> set[str]:
    return {name for param in command.params if isinstance(param, click.Option) for name in param.opts + param.secondary_opts}


def check_options(command: click.Command, path: list[str], args: list[str]) -> None:
    known = option_names(command)
    for token in args:
        if token.startswith("--"):
            assert token.split("=")[0] in known, f"`{' '.join(path)}` has no option {token} (has {sorted(known)})"


def assert_real_commands(text: str, folder: Path) -> None:
    blocks, spans = commands_in(text)
    for name in ("NOTES.md", "plan.yaml"):  # files the commands name exist, so file options parse too
        (folder / name).write_text("x\n", "utf-8")
    for line in blocks:  # whole command lines an agent copies: they must parse as given
        command, path, args = resolve(shlex.split(line))
        check_options(command, path, args)
        command.make_context(path[-1], list(args))
    for span in spans:  # fragments in prose: every subcommand and option must exist
        command, path, args = resolve(shlex.split(span))
        check_options(command, path, args)


def test_the_instruction_text_names_only_real_commands_and_options(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks, spans = commands_in(INSTRUCTIONS)
    assert "conductor task claim --json" in blocks
    assert any(b.startswith("conductor task complete ") for b in blocks)
    assert any(b.startswith("conductor task release ") for b in blocks)
    assert any(b.startswith("conductor task complete planning ") for b in blocks)
    assert {"conductor task list --json", "conductor task heartbeat TASK", "conductor mcp"} <= set(spans)
    monkeypatch.chdir(tmp_path)
    assert_real_commands(INSTRUCTIONS, tmp_path)


@pytest.mark.parametrize("agent", list(AGENTS))
def test_every_command_in_every_written_file_is_real(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, agent: str) -> None:
    assert init(tmp_path, agent) == 0
    text = (tmp_path / AGENTS[agent].path).read_text("utf-8")
    assert set(commands_in(INSTRUCTIONS)[0]) <= set(commands_in(text)[0])
    monkeypatch.chdir(tmp_path)
    assert_real_commands(text, tmp_path)


def test_the_commands_run_in_a_fresh_project(tmp_path: Path) -> None:
    """`conductor task claim --json` on a project with nothing pending: exit 9 (as the text says), not a crash."""
    assert init(tmp_path, "claude-code") == 0
    env = {**os.environ, "COLUMNS": "200"}
    run = subprocess.run([sys.executable, "-m", "conductor", "task", "claim", "--json"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 9, (run.stdout, run.stderr)
    assert "Exit code 9 means there is nothing to claim" in INSTRUCTIONS


def test_the_commands_of_docs_agents_md_parse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every `conductor …` line of a code block in docs/agents.md, and each worker template of its table."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "agents.md").read_text("utf-8")
    lines = [line for block in re.findall(r"^```[a-z]*\n(.*?)^```", doc, re.S | re.M) for line in block.splitlines()
             if line.startswith("conductor ")]
    templates = re.findall(r"^\| [^|]+ \| `((?:claude|codex|gemini|aider) [^`]+)` \|", doc, re.M)
    assert len(templates) == 4 and all('"$CONDUCTOR_INSTRUCTION"' in t for t in templates)
    assert any(line.startswith("conductor worker --command ") for line in lines)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "plan.yaml").write_text("x\n", "utf-8")
    for line in [*lines, *(f"conductor worker --command {shlex.quote(t)} --burst" for t in templates)]:
        command, path, args = resolve(shlex.split(line, comments=True))
        check_options(command, path, args)
        command.make_context(path[-1], list(args))


PLAN = """\
goal: Fix the greeting
strategies:
  - name: sed
    steps:
      - id: fix
        instruction: Replace Helo by Hello in greet.py
        allowed_files: [greet.py]
        confidence: 0.9
      - id: test
        instruction: Add test_greet.py that imports greet
        allowed_files: [test_greet.py]
        depends_on: [fix]
        confidence: 0.9
"""


def run(project: Path, args: list[str]) -> subprocess.CompletedProcess[str]:
    assert args[0] == "conductor"
    return subprocess.run([sys.executable, "-m", "conductor", *args[1:]], cwd=project, capture_output=True, text=True,
                          timeout=180)


@pytest.mark.slow
def test_an_agent_following_the_written_file_executes_a_step(tmp_path: Path) -> None:
    """The claim, complete and release lines of CLAUDE.md, run as written (TASK filled in), drive a real plan."""
    project = tmp_path / "project"
    project.mkdir()
    assert init(project, "claude-code") == 0
    (project / "greet.py").write_text('print("Helo, world")\n')
    (project / "plan.yaml").write_text(PLAN)
    published = run(project, ["conductor", "explore", "--plan", "plan.yaml", "--executor", "handoff", "--no-wait"])
    assert published.returncode == 11, published.stdout + published.stderr
    blocks, _ = commands_in((project / "CLAUDE.md").read_text("utf-8"))
    claim_line = next(b for b in blocks if b.startswith("conductor task claim"))
    complete_line = next(b for b in blocks if b.startswith("conductor task complete TASK"))
    release_line = next(b for b in blocks if b.startswith("conductor task release"))

    claimed = run(project, shlex.split(claim_line))
    assert claimed.returncode == 0, claimed.stderr
    task = json.loads(claimed.stdout)
    for field in ("task_id", "plan_id", "fork_id", "attempt", "instruction", "workspace", "allowed_files",
                  "constraints", "checks", "deadline"):
        assert field in task, field
    workspace = Path(task["workspace"])
    assert workspace.is_absolute() and (workspace / "greet.py").is_file()
    (workspace / "greet.py").write_text('print("Hello, world")\n')  # the agent's own work
    done = run(project, [part.replace("TASK", task["ref"]) for part in shlex.split(complete_line)])
    assert done.returncode == 0, done.stdout + done.stderr

    resumed = run(project, ["conductor", "resume", "--executor", "handoff", "--no-wait", "--json"])
    assert json.loads(resumed.stdout)["waiting_for_executor"] == [{"fork_id": "1", "step_id": "step_002"}], resumed.stdout
    second = json.loads(run(project, shlex.split(claim_line)).stdout)
    assert second["task_id"] == "step_002"
    assert (Path(second["workspace"]) / "greet.py").read_text() == 'print("Hello, world")\n'  # step 1 merged
    released = run(project, [part.replace("TASK", second["ref"]) for part in shlex.split(release_line)])
    assert released.returncode == 0, released.stdout + released.stderr
    listed = json.loads(run(project, ["conductor", "task", "list", "--json"]).stdout)
    assert [(t["task_id"], t["state"], t["attempt"]) for t in listed["tasks"]] == [("step_002", "pending", 2)]


@pytest.mark.slow
def test_an_agent_following_the_written_file_answers_a_planning_task(tmp_path: Path) -> None:
    """With --planner handoff, the file's claim line gets the planning task and its planning line answers it."""
    project = tmp_path / "project"
    project.mkdir()
    assert init(project, "gemini") == 0
    (project / "greet.py").write_text('print("Helo, world")\n')
    blocks, _ = commands_in((project / "GEMINI.md").read_text("utf-8"))
    claim_line = next(b for b in blocks if b.startswith("conductor task claim"))
    answer_line = next(b for b in blocks if b.startswith("conductor task complete planning"))
    explore = subprocess.Popen([sys.executable, "-m", "conductor", "explore", "Fix the greeting", "--planner", "handoff",
                                "--planner-timeout", "600", "--executor", "handoff", "--no-wait", "--forks", "1"],
                               cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):  # the planning task appears once explore has published it
            claimed = run(project, shlex.split(claim_line))
            if claimed.returncode != 9:
                break
            assert explore.poll() is None, explore.communicate()
        assert claimed.returncode == 0, claimed.stdout + claimed.stderr
        offer = json.loads(claimed.stdout)
        assert offer["kind"] == "planning" and offer["task_id"] == "planning" and offer["plan_schema"]
        (project / "plan.yaml").write_text(PLAN)
        answered = run(project, [part.replace("PLAN", offer["plan_id"]) if part == "PLAN" else part
                                 for part in shlex.split(answer_line)])
        assert answered.returncode == 0, answered.stdout + answered.stderr
        out, err = explore.communicate(timeout=180)
        assert explore.returncode == 11, out + err  # planned; the steps wait for an executor
    finally:
        if explore.poll() is None:
            explore.kill()
            explore.communicate()
    step = json.loads(run(project, shlex.split(claim_line)).stdout)
    assert (step["plan_id"], step["task_id"]) == (offer["plan_id"], "step_001")


def test_the_mcp_tools_the_text_names_exist() -> None:
    section = INSTRUCTIONS[INSTRUCTIONS.index("### Through MCP"):INSTRUCTIONS.index("### Never")]
    named = set(re.findall(r"`([a-z_]+)`", section))
    assert {"claim_task", "complete_task", "release_task", "submit_plan"} <= named
    source = (Path(__file__).resolve().parent.parent / "conductor" / "mcp_server.py").read_text("utf-8")
    defined = set(re.findall(r"@server\.tool\(\)\n    def ([a-z_]+)\(", source))  # the server's tool functions
    assert named <= defined, sorted(named - defined)


def test_a_symlinked_instruction_file_stays_a_link(tmp_path: Path) -> None:
    (tmp_path / "AGENTS.md").write_text("# Shared rules\n", "utf-8")
    (tmp_path / "CLAUDE.md").symlink_to("AGENTS.md")  # a common setup: one file for several agents
    assert init(tmp_path, "claude-code", "codex") == 0
    assert (tmp_path / "CLAUDE.md").is_symlink() and os.readlink(tmp_path / "CLAUDE.md") == "AGENTS.md"
    text = (tmp_path / "AGENTS.md").read_text("utf-8")
    assert text.startswith("# Shared rules\n") and text.count(BEGIN) == 1


def test_a_symlink_out_of_the_project_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside.md"
    outside.write_text("theirs\n", "utf-8")
    project = tmp_path / "project"
    project.mkdir()
    (project / "GEMINI.md").symlink_to(outside)
    assert init(project, "gemini") == ConfigError.exit_code
    assert outside.read_text("utf-8") == "theirs\n" and (project / "GEMINI.md").is_symlink()
