"""Conductor's private repository: project snapshots, change sets and three-way merges on real git."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from conductor.errors import MergeConflict
from conductor.workspace.store import StateStore
from tests.workspace.support import git, make_repo, repo_fingerprint


def store_for(root: Path) -> StateStore:
    return StateStore(root, root / ".conductor").ensure()


def tree_paths(store: StateStore, commit: str) -> dict[str, bytes]:
    entries = store.entries(store.tree_of(commit))
    blobs = store.read_blobs(e.oid for e in entries.values())
    return {path: blobs[e.oid] for path, e in entries.items()}


def test_a_snapshot_holds_what_the_user_sees_and_leaves_their_repository_untouched(tmp_path: Path) -> None:
    root = make_repo(tmp_path / "proj", {"a.py": "a = 1\n", "keep.txt": "k\n", ".gitignore": "secret.env\nbuild/\n"})
    (root / "a.py").write_text("a = 2  # uncommitted\n")
    (root / "new.py").write_text("untracked\n")
    (root / "secret.env").write_text("TOKEN=x\n")
    (root / "build").mkdir()
    (root / "build" / "out.o").write_bytes(b"\0obj")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "a.pyc").write_bytes(b"pyc")
    (root / "keep.txt").unlink()
    git(root, "add", "new.py")  # staged, not committed
    before = repo_fingerprint(root)

    store = store_for(root)
    commit = store.snapshot_project(ignore=["__pycache__/"], message="base\n")
    files = tree_paths(store, commit)

    assert files == {".gitignore": b"secret.env\nbuild/\n", "a.py": b"a = 2  # uncommitted\n", "new.py": b"untracked\n"}
    # Its parent is the user's HEAD, whose objects the store borrows instead of copying.
    head = git(root, "rev-parse", "HEAD").strip()
    assert store.git.run(["rev-parse", f"{commit}^"]).decode().strip() == head
    assert repo_fingerprint(root) == before


def test_a_snapshot_of_a_folder_that_is_not_a_git_repository(tmp_path: Path) -> None:
    root = tmp_path / "plain"
    (root / "src").mkdir(parents=True)
    (root / "src" / "m.py").write_text("x = 1\n")
    (root / ".env").write_text("dotfiles count\n")
    (root / "node_modules").mkdir()
    (root / "node_modules" / "dep.js").write_text("ignored by workspace.ignore\n")
    (root / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(root / "run.sh", 0o755)
    os.symlink("src/m.py", root / "link")
    store = store_for(root)
    first = store.snapshot_project(ignore=["node_modules/"], message="base\n")
    entries = store.entries(store.tree_of(first))
    assert sorted(entries) == [".env", "link", "run.sh", "src/m.py"]
    assert (entries["run.sh"].mode, entries["link"].mode) == ("100755", "120000")
    assert store.user_repository() is None and not (root / ".git").exists()

    (root / "src" / "m.py").write_text("x = 2\n")
    (root / ".env").unlink()
    second = store.snapshot_project(ignore=["node_modules/"], message="again\n")
    changes = store.changes(store.tree_of(first), store.tree_of(second))
    assert [(c.path, c.change, c.lines_added, c.lines_removed) for c in changes] == [
        (".env", "deleted", 0, 1), ("src/m.py", "modified", 1, 1)]


def test_change_sets_carry_sha256_modes_and_line_counts(tmp_path: Path) -> None:
    root = tmp_path / "p"
    root.mkdir()
    (root / "text.txt").write_text("one\ntwo\nthree\n")
    (root / "tool.sh").write_text("echo\n")
    store = store_for(root)
    old = store.tree_of(store.snapshot_project(ignore=[], message="a\n"))
    (root / "text.txt").write_text("one\nTWO\nthree\nfour\n")
    os.chmod(root / "tool.sh", 0o755)
    (root / "blob.bin").write_bytes(b"\0\1\2" * 100)
    new = store.tree_of(store.snapshot_project(ignore=[], message="b\n"))
    changes = {c.path: c for c in store.changes(old, new)}
    assert changes["text.txt"].lines_added == 2 and changes["text.txt"].lines_removed == 1
    assert changes["text.txt"].sha256 == hashlib.sha256(b"one\nTWO\nthree\nfour\n").hexdigest()
    assert (changes["tool.sh"].mode, changes["tool.sh"].old_mode) == ("100755", "100644")
    assert changes["tool.sh"].lines_added == changes["tool.sh"].lines_removed == 0  # a mode-only change
    assert changes["blob.bin"].binary and changes["blob.bin"].change == "added"


def test_line_counting_is_fast_on_repetitive_files(tmp_path: Path) -> None:
    # difflib took 153 s on 2,000 repetitive lines; git's diff must not care. Bounded by the test timeout.
    root = tmp_path / "p"
    root.mkdir()
    (root / "rep.txt").write_text("x\n" * 20000)
    store = store_for(root)
    old = store.tree_of(store.snapshot_project(ignore=[], message="a\n"))
    (root / "rep.txt").write_text("y\nx\n" * 10000)
    new = store.tree_of(store.snapshot_project(ignore=[], message="b\n"))
    (change,) = store.changes(old, new)
    assert (change.lines_added, change.lines_removed) == (10000, 10000)  # the minimal edit script


def three_trees(
    tmp_path: Path, base: dict[str, str], ours: dict[str, str], theirs: dict[str, str]
) -> tuple[StateStore, str, str, str]:
    root = tmp_path / "m"
    root.mkdir()
    store = store_for(root)
    trees = []
    for files in (base, ours, theirs):
        for path in root.iterdir():
            if path.name != ".conductor":
                path.unlink()
        for name, text in files.items():
            (root / name).write_text(text)
        trees.append(store.tree_of(store.snapshot_project(ignore=[], message="t\n")))
    return store, trees[0], trees[1], trees[2]


def test_merge_takes_each_side_and_merges_edits_to_different_lines(tmp_path: Path) -> None:
    lines = "".join(f"line {i}\n" for i in range(20))
    store, base, ours, theirs = three_trees(
        tmp_path,
        {"shared.txt": lines, "a.txt": "a\n"},
        {"shared.txt": lines.replace("line 2\n", "line 2 (user)\n"), "a.txt": "a\n", "user.txt": "u\n"},
        {"shared.txt": lines.replace("line 17\n", "line 17 (agent)\n"), "a.txt": "a2\n"},
    )
    merged = store.merge(base, ours, theirs)
    entries = store.entries(merged)
    blobs = store.read_blobs(e.oid for e in entries.values())
    text = {p: blobs[e.oid].decode() for p, e in entries.items()}
    assert text["a.txt"] == "a2\n" and text["user.txt"] == "u\n"
    assert "line 2 (user)" in text["shared.txt"] and "line 17 (agent)" in text["shared.txt"]


def test_merge_conflict_names_the_files(tmp_path: Path) -> None:
    store, base, ours, theirs = three_trees(
        tmp_path, {"f.txt": "x\n", "g.txt": "g\n"}, {"f.txt": "user\n", "g.txt": "g\n"}, {"f.txt": "agent\n", "g.txt": "g2\n"})
    with pytest.raises(MergeConflict, match="f.txt") as caught:
        store.merge(base, ours, theirs)
    assert "g.txt" not in str(caught.value)


def test_the_store_never_runs_a_hook_or_filter_of_the_users_repository(tmp_path: Path) -> None:
    root = make_repo(tmp_path / "proj", {"a.txt": "a\n", ".gitattributes": "* filter=evil\n"})
    marker = tmp_path / "ran"
    hook = root / ".git" / "hooks" / "post-checkout"
    hook.write_text(f"#!/bin/sh\ntouch {marker}\n")
    hook.chmod(0o755)
    git(root, "config", "core.fsmonitor", f"sh -c 'touch {marker}'")
    git(root, "config", "filter.evil.clean", f"sh -c 'touch {marker}; cat'")
    (root / "a.txt").write_text("changed\n")
    before = repo_fingerprint(root)
    store = store_for(root)
    commit = store.snapshot_project(ignore=[], message="base\n")
    assert tree_paths(store, commit)["a.txt"] == b"changed\n"  # raw bytes: no clean filter ran
    assert not marker.exists()
    assert repo_fingerprint(root) == before


def test_git_older_than_the_minimum_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from conductor.errors import GitError
    from conductor.workspace import git as git_module

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "git").write_text("#!/bin/sh\necho 'git version 2.20.1'\n")
    (fake / "git").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    git_module.git_executable.cache_clear()
    try:
        with pytest.raises(GitError, match="needs git >= 2.31"):
            git_module.git_executable()
    finally:
        git_module.git_executable.cache_clear()
    assert subprocess.run(["git", "--version"], capture_output=True, text=True).stdout.startswith("git version 2.20")


def test_symlinks_after_a_change_set_equal_a_fresh_listing(tmp_path: Path) -> None:
    """The verifier's symlink map is derived from the previous tree's and the change set: it must equal a
    full listing of the new tree after every kind of change to links (a fresh store answers each)."""
    from conductor.workspace.checkout import capture, materialize

    root = make_repo(tmp_path / "proj", {"a.py": "a\n", "pkg/b.py": "b\n", "docs/x.md": "x\n"})
    os.symlink("a.py", root / "link_a")
    os.symlink("../a.py", root / "docs" / "up")
    store = store_for(root)
    commit = store.snapshot_project(ignore=[], message="base\n")
    folder = tmp_path / "ws"
    materialize(store, commit, folder)
    edits = [
        lambda: os.symlink("pkg/b.py", folder / "link_b"),  # added
        lambda: (os.unlink(folder / "link_a"), os.symlink("pkg", folder / "link_a")),  # retargeted
        lambda: os.unlink(folder / "docs" / "up"),  # deleted
        lambda: (os.unlink(folder / "docs" / "x.md"), os.rmdir(folder / "docs"), os.symlink("/etc", folder / "docs")),
        lambda: os.symlink("a.py", folder / "odd\nname"),  # a newline in the name
        lambda: (folder / "plain.txt").write_text("no link changed\n"),
    ]
    old = store.tree_of(commit)
    for edit in edits:
        edit()
        new = capture(store, folder, excludes=store.exclude_file([]))
        derived = store.symlinks_after(old, new, store.changes(old, new))
        assert derived == store_for(root).symlinks(new)  # another instance: nothing remembered
        old = new
    assert derived == {"link_a": "pkg", "link_b": "pkg/b.py", "docs": "/etc", "odd\nname": "a.py"}
