"""``edit_tree`` builds the same tree as git's own index-based edit (``read-tree`` + ``update-index
--index-info`` + ``write-tree``) for random edits: files changed, added in new folders, removed until a
folder is empty, a folder replaced by a file and the reverse, symlinks and modes."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from conductor.errors import GitError
from conductor.workspace.store import MODE_EXEC, MODE_FILE, MODE_LINK, StateStore, TreeEntry
from conductor.workspace.trees import edit_tree


@pytest.fixture
def store(tmp_path: Path) -> StateStore:
    root = tmp_path / "project"
    for path in ["a.txt", "src/app.py", "src/lib/util.py", "src/lib/deep/x.py", "docs/a.md", "docs/b.md", "z/only.txt"]:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(path + "\n")
    return StateStore(root, root / ".conductor").ensure()


def base_tree(store: StateStore) -> str:
    return store.tree_of(store.snapshot_project(ignore=[], message="base\n"))


def test_random_edits_match_gits_own(store: StateStore) -> None:
    rng = random.Random(8)
    base = base_tree(store)
    for _round in range(60):
        files = sorted(store.entries(base))
        updates: dict[str, TreeEntry | None] = {}
        for _ in range(rng.randint(1, 4)):
            roll = rng.random()
            if roll < 0.3 and files:
                updates[rng.choice(files)] = None
            elif roll < 0.6 and files:
                path = rng.choice(files)
                updates[path] = TreeEntry(rng.choice([MODE_FILE, MODE_EXEC]), store.write_blob(f"{path} {_round}".encode()))
            else:
                folder = rng.choice(["", "src", "src/lib", "new", "new/deeper/still", "docs"])
                name = f"{folder}/n{rng.randint(0, 5)}" if folder else f"n{rng.randint(0, 5)}"
                updates[name] = TreeEntry(rng.choice([MODE_FILE, MODE_LINK]), store.write_blob(name.encode()))
        if any(p != q and q.startswith(p + "/") for p in updates for q in updates if updates[p] and updates[q]):
            continue  # a file and a path below it, both set: no work tree holds that
        try:
            expected = store._tree_with(base, updates)
        except GitError:
            continue
        assert edit_tree(store, base, updates) == expected, updates
        base = expected


def test_a_folder_replaced_by_a_file_and_back(store: StateStore) -> None:
    base = base_tree(store)
    blob = store.write_blob(b"now a file\n")
    gone = {path: None for path in store.entries(base) if path.startswith("src/")}
    as_file = edit_tree(store, base, {**gone, "src": TreeEntry(MODE_FILE, blob)})
    assert as_file == store._tree_with(base, {**gone, "src": TreeEntry(MODE_FILE, blob)})
    back = edit_tree(store, as_file, {"src": None, "src/app.py": TreeEntry(MODE_FILE, blob)})
    assert store.entries(back)["src/app.py"] == TreeEntry(MODE_FILE, blob) and "src" not in store.entries(back)


def test_everything_removed_is_the_empty_tree(store: StateStore) -> None:
    base = base_tree(store)
    empty = edit_tree(store, base, {path: None for path in store.entries(base)})
    assert store.entries(empty) == {} and empty == store._tree_with(base, {p: None for p in store.entries(base)})


def test_a_file_over_a_folder_replaces_all_below_as_git_does(store: StateStore) -> None:
    base = base_tree(store)
    update = {"src/lib": TreeEntry(MODE_FILE, store.write_blob(b"x"))}
    assert edit_tree(store, base, update) == store._tree_with(base, update)
    assert sorted(store.entries(edit_tree(store, base, update))) == [
        "a.txt", "docs/a.md", "docs/b.md", "src/app.py", "src/lib", "z/only.txt"]
    with pytest.raises(GitError, match="paths below it are set"):
        edit_tree(store, base, {**update, "src/lib/new.py": TreeEntry(MODE_FILE, store.write_blob(b"y"))})


def test_an_object_the_store_lacks_is_refused(store: StateStore) -> None:
    with pytest.raises(GitError):
        edit_tree(store, base_tree(store), {"a.txt": TreeEntry(MODE_FILE, "1" * 40)})
