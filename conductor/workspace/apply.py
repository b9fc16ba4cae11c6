"""Applying a fork's result to the project folder: a three-way merge, then only the changed files written.

The project may have moved on since the plan began (the user kept editing). So the winner is merged as
git merges a branch: base = the plan's base commit, ours = the project's working tree now, theirs = the
winner's final commit (:meth:`StateStore.merge`). Only the paths where the merged tree differs from the
project now are written, each checked just before to still be what the merge saw (else nothing is
written and the conflict names the files). The user's ``HEAD``, index and ``.git`` are never touched:
the result lands in the working tree as uncommitted changes, for the user to review and commit.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from conductor.errors import MergeConflict, UnsafePath
from conductor.fsutil import TEMP_PREFIX, atomic_write, fsync_dir
from conductor.layout import CONDUCTOR_DIR
from conductor.models import FileChange
from conductor.paths import check_relpath, resolve_inside
from conductor.workspace.store import MODE_EXEC, MODE_LINK, StateStore
from conductor.workspace.trees import entry_on_disk


@dataclass(frozen=True)
class ApplyPlan:
    """What applying a winner will do: the project's tree now, the merged tree, and the changes between."""

    user_tree: str
    result_tree: str
    changes: list[FileChange]


def plan_apply(store: StateStore, *, base_commit: str, winner_commit: str, ignore: Sequence[str]) -> ApplyPlan:
    """Merge the winner into the project's current working tree (nothing is written yet).

    Raises:
        MergeConflict: the project and the winner changed the same paths incompatibly (named).
        GitError: git failed.
    """
    user_tree = store.project_tree(ignore=ignore)
    result = store.merge(store.tree_of(base_commit), user_tree, store.tree_of(winner_commit))
    return ApplyPlan(user_tree, result, store.changes(user_tree, result))


def write_changes(store: StateStore, root: Path, plan: ApplyPlan) -> list[str]:
    """Write ``plan``'s changes into ``root``; idempotent (paths already as merged are skipped).

    Returns:
        The paths written or deleted now.

    Raises:
        MergeConflict: a path is neither as the merge saw it nor as merged (edited meanwhile); nothing
            was written.
        UnsafePath: a path would leave ``root``, go through a symlink, or enter ``.git``/``.conductor``.
    """
    paths = [c.path for c in plan.changes]
    before = store.entries(plan.user_tree, paths)
    after = store.entries(plan.result_tree, paths)
    fmt = store.object_format
    todo, conflicts = [], []
    for path in paths:
        _check_target(root, path)
        now = entry_on_disk(root / path, fmt)
        if now == after.get(path):
            continue
        if now != before.get(path):
            conflicts.append(path)
        todo.append(path)
    if conflicts:
        raise MergeConflict(f"{len(conflicts)} project path(s) changed while the winner was being applied: "
                            + ", ".join(conflicts))
    blobs = store.read_blobs(after[p].oid for p in todo if p in after)
    for path in sorted((p for p in todo if p not in after), reverse=True):
        _delete(root, path)
    for path in sorted(p for p in todo if p in after):
        entry = after[path]
        _write(root, path, blobs[entry.oid], entry.mode)
    return todo


def _check_target(root: Path, path: str) -> None:
    if check_relpath(path) != path:
        raise UnsafePath(f"unsafe path {path!r}: not in normal form")
    if path.split("/")[0] == CONDUCTOR_DIR:
        raise UnsafePath(f"unsafe path {path!r}: inside {CONDUCTOR_DIR}/, which is Conductor's")
    parent = path.rpartition("/")[0]
    if parent:
        resolve_inside(root, parent)  # no folder on the way may be a symlink out of the project or into .git


def _delete(root: Path, rel: str) -> None:
    path = root / rel
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        return  # a folder in place of a deleted file: the user made it; leave it
    path.unlink()
    fsync_dir(path.parent)
    folder, top = path.parent, Path(os.path.abspath(root))
    while Path(os.path.abspath(folder)) != top:
        try:
            folder.rmdir()
        except OSError:  # not empty: stop pruning
            return
        folder = folder.parent


def _write(root: Path, rel: str, data: bytes, mode: str) -> None:
    target = root / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    if mode != MODE_LINK:
        atomic_write(target, data, mode=0o755 if mode == MODE_EXEC else 0o644)
        os.chmod(target, 0o755 if mode == MODE_EXEC else 0o644)  # atomic_write honours the umask
        return
    temp = target.parent / f"{TEMP_PREFIX}{target.name}.{os.getpid()}.{secrets.token_hex(4)}"
    os.symlink(os.fsdecode(data), temp)
    try:
        os.replace(temp, target)  # rename(2) replaces a symlink itself, never what it points to
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
