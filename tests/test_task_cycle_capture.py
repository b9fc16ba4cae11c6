"""The capture of an attempt folder in one git pass (``ls-files -m -o``), and the tree git recorded in the
stat cache reused when nothing changed: every result is checked against an oracle that hashes every file
from an empty index, so a faster capture can never be a less exact one."""

from __future__ import annotations

import os
import random
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from conductor.workspace import checkout
from conductor.workspace.checkout import cached_tree, capture, index_file, materialize, reset
from conductor.workspace.git import join_z, split_z
from conductor.workspace.store import StateStore
from tests.helpers.git_calls import commands, record_git_calls
from tests.workspace.support import make_repo

FILES = {"a.py": "a = 1\n", "pkg/b.py": "b = 1\n", "pkg/sub/c.txt": "c\n", "d.sh": "#!/bin/sh\n", "e.md": "e\n"}


@pytest.fixture
def setup(tmp_path: Path) -> tuple[StateStore, str, Path]:
    root = make_repo(tmp_path / "proj", FILES)
    store = StateStore(root, root / ".conductor").ensure()
    commit = store.snapshot_project(ignore=[], message="base\n")
    folder = root / ".conductor" / "scratch" / "step_001.a1"
    materialize(store, commit, folder)
    return store, commit, folder


def oracle(store: StateStore, folder: Path, excludes: Path, scratch: Path) -> str:
    """The tree of ``folder`` hashed from scratch: every file listed from an empty index and added."""
    fresh = scratch / "oracle.index"
    fresh.unlink(missing_ok=True)
    paths = split_z(store.git.run(["ls-files", "-z", "-o", f"--exclude-from={excludes}"], work_tree=folder, index=fresh))
    paths = [p for p in paths if not p.startswith(".git/")]
    if paths:
        store.git.run(["update-index", "-z", "--add", "--stdin"], work_tree=folder, index=fresh, input=join_z(paths))
    return store.git.run(["write-tree"], index=fresh).decode().strip()


def test_an_unchanged_folder_costs_one_git_process_and_gives_the_base_tree(setup, monkeypatch) -> None:
    store, commit, folder = setup
    base, excludes = store.tree_of(commit), store.exclude_file([])
    assert cached_tree(index_file(folder)) == base  # read-tree of one tree recorded it
    calls = record_git_calls(monkeypatch)
    assert capture(store, folder, excludes=excludes) == base
    assert commands(calls) == ["ls-files"]
    (folder / "a.py").write_text("a = 2\n")
    changed = capture(store, folder, excludes=store.exclude_file([]))
    assert commands(calls)[1:] == ["ls-files", "update-index", "write-tree"]
    assert changed != base and cached_tree(index_file(folder)) == changed
    del calls[:]
    assert capture(store, folder, excludes=store.exclude_file([])) == changed  # unchanged since: from the cache
    assert commands(calls) == ["ls-files"]


def test_a_touched_file_with_the_same_content_is_no_change(setup) -> None:
    store, commit, folder = setup
    target = folder / "a.py"
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 5_000_000_000))
    assert capture(store, folder, excludes=store.exclude_file([])) == store.tree_of(commit)


def test_every_kind_of_change_is_captured_exactly(setup, tmp_path: Path) -> None:
    store, commit, folder = setup
    excludes = store.exclude_file(["*.log", "cache/"])
    target = folder / "e.md"
    st = target.stat()
    with open(target, "r+b") as handle:  # same size, same mtime
        handle.write(b"E\n")
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    (folder / "a.py").unlink()  # deleted
    os.symlink("pkg/b.py", folder / "a.py")  # ... and replaced by a symlink
    (folder / "pkg" / "sub" / "c.txt").unlink()
    (folder / "pkg" / "sub" / "c.txt").mkdir()  # a file replaced by a folder
    (folder / "pkg" / "sub" / "c.txt" / "inner").write_text("inner\n")
    os.chmod(folder / "d.sh", 0o755)  # mode only
    (folder / "new" / "deep").mkdir(parents=True)
    (folder / "new" / "deep" / "n.py").write_text("n\n")
    (folder / "x.log").write_text("ignored\n")
    (folder / "cache").mkdir()
    (folder / "cache" / "c").write_text("ignored\n")
    (folder / "empty_dir").mkdir()
    tree = capture(store, folder, excludes=excludes)
    assert tree == oracle(store, folder, excludes, tmp_path)
    changes = {c.path: c.change for c in store.changes(store.tree_of(commit), tree)}
    assert changes == {"a.py": "modified", "d.sh": "modified", "e.md": "modified", "new/deep/n.py": "added",
                       "pkg/sub/c.txt": "deleted", "pkg/sub/c.txt/inner": "added"}
    # A folder replaced by a file, then the reverse of everything: back to the base tree exactly.
    shutil.rmtree(folder / "pkg")
    (folder / "pkg").write_text("now a file\n")
    assert capture(store, folder, excludes=excludes) == oracle(store, folder, excludes, tmp_path)
    reset(store, folder, commit)
    assert capture(store, folder, excludes=excludes) == store.tree_of(commit)


def test_random_edits_match_a_full_rehash(setup, tmp_path: Path) -> None:
    store, commit, folder = setup
    excludes = store.exclude_file(["*.tmp"])
    rng = random.Random(8)
    names = ["a.py", "pkg/b.py", "pkg/sub/c.txt", "d.sh", "e.md", "f/g.txt", "f/h.tmp", "pkg/z"]
    for _round in range(25):
        for _ in range(rng.randint(0, 3)):
            path = folder / rng.choice(names)
            action = rng.choice(["write", "same_size", "delete", "chmod", "symlink", "touch"])
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
                continue
            if action == "write" or not (path.exists() or path.is_symlink()):
                if path.is_symlink():
                    path.unlink()
                path.parent.mkdir(parents=True, exist_ok=True)
                if path.parent.is_symlink() or not path.parent.is_dir():
                    continue
                path.write_text(f"{rng.random()}\n" * rng.randint(0, 3))
            elif action == "delete":
                path.unlink()
            elif action == "symlink":
                path.unlink()
                os.symlink(rng.choice(names), path)
            elif path.is_symlink():
                continue
            elif action == "chmod":
                os.chmod(path, path.stat().st_mode ^ stat.S_IXUSR)
            elif action == "touch":
                os.utime(path)
            else:  # same size, same mtime, in place
                st = path.stat()
                data = path.read_bytes()
                path.write_bytes(bytes(reversed(data)) if len(set(data)) > 1 else data.upper() if data else data)
                os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert capture(store, folder, excludes=excludes) == oracle(store, folder, excludes, tmp_path), _round


def test_an_index_without_a_recorded_tree_falls_back_to_write_tree(setup, tmp_path: Path, monkeypatch) -> None:
    store, commit, folder = setup
    index = index_file(folder)
    # An index written without the end-of-entries extension (e.g. by another git setting) has no usable record.
    subprocess.run(["git", f"--git-dir={store.dir}", f"--work-tree={folder}", "-c", "index.threads=false",
                    "-c", "index.recordEndOfIndexEntries=false", "update-index", "--refresh", "-q"],
                   env={**os.environ, "GIT_INDEX_FILE": str(index)}, check=True, cwd=folder)
    assert cached_tree(index) is None
    base, excludes = store.tree_of(commit), store.exclude_file([])
    calls = record_git_calls(monkeypatch)
    assert capture(store, folder, excludes=excludes) == base
    assert commands(calls) == ["ls-files", "write-tree"]
    (folder / "a.py").write_text("a = 2\n")  # a change: the rewritten index records its tree again
    changed = capture(store, folder, excludes=excludes)
    assert cached_tree(index) == changed
    for garbage in (b"", b"DIRC", b"DIRC" + b"\0" * 200, index.read_bytes()[:-30]):
        broken = tmp_path / "broken.index"
        broken.write_bytes(garbage)
        assert cached_tree(broken) is None


def test_a_nested_repository_is_still_refused(setup) -> None:
    store, _commit, folder = setup
    (folder / "nested").mkdir()
    subprocess.run(["git", "init", "-q", str(folder / "nested")], check=True)
    (folder / "nested" / "x").write_text("x")
    with pytest.raises(checkout.UnsafePath, match="nested git repository"):
        capture(store, folder, excludes=store.exclude_file([]))
