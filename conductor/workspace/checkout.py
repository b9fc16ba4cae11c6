"""Working folders checked out from the store: made, reset to another commit, and captured as a tree.

Each folder has a stat cache beside it, ``<folder>.index`` (a git index Conductor owns, outside the
folder), so finding what changed costs a ``stat`` per file plus hashing only the files whose stat data
changed — git's own algorithm, racy-git rule included: a file modified within the timestamp granularity
of the cache is re-hashed, so a same-size, same-mtime rewrite is still seen (ctime and inode change too).

Inside each folder there is a small ``.git`` of its own that belongs to the agent working there: a branch
``conductor/<folder name>`` at the folder's base commit, objects borrowed from the store, a copy of the stat cache as its
index. ``git status``, ``add``, ``commit``, ``stash`` work there and write only inside that ``.git``;
Conductor never reads it (its own calls name the store and the folder explicitly), and what counts is
the working tree.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
from pathlib import Path

from conductor.errors import UnsafePath
from conductor.fsutil import TEMP_PREFIX, fsync_dir
from conductor.paths import is_dotgit
from conductor.workspace.git import join_z, split_z
from conductor.workspace.store import StateStore

INDEX_SUFFIX = ".index"
AGENT_CONFIG = """[core]
\trepositoryformatversion = {version}
\tfilemode = true
\tbare = false
\tlogallrefupdates = true
{extensions}[user]
\tname = Conductor attempt
\temail = conductor@localhost
"""


def index_file(folder: Path) -> Path:
    """The stat cache of ``folder``: ``<folder>.index`` beside it."""
    return folder.parent / f"{folder.name}{INDEX_SUFFIX}"


def _temp_beside(path: Path) -> Path:
    return path.parent / f"{TEMP_PREFIX}{path.name}.{os.getpid()}.{secrets.token_hex(4)}"


def materialize(store: StateStore, commit: str, folder: Path, *, keep_index: bool = True) -> None:
    """Check ``commit`` out into the new folder ``folder`` (built aside, renamed into place).

    Args:
        keep_index: keep the stat cache beside the folder (False for a checkout handed to a person).

    Raises:
        FileExistsError: ``folder`` exists.
        GitError: ``commit`` is not in the store, or the checkout failed.
    """
    if folder.exists() or folder.is_symlink():
        raise FileExistsError(f"checkout destination exists and is not empty: {folder}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    temp, temp_index = _temp_beside(folder), _temp_beside(index_file(folder))
    temp.mkdir()
    try:
        # One process: a one-tree merge into an empty index writes every file and records its stat data.
        store.git.run(["read-tree", "-m", "-u", commit], work_tree=temp, index=temp_index)
        init_agent_git(store, temp, commit, temp_index, name=folder.name)
        if keep_index:
            os.replace(temp_index, index_file(folder))
        else:
            temp_index.unlink()
        os.rename(temp, folder)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        temp_index.unlink(missing_ok=True)
        raise
    fsync_dir(folder.parent)


def reset(store: StateStore, folder: Path, commit: str) -> None:
    """Make ``folder`` hold exactly ``commit``: whatever else is there goes (untracked and ignored files,
    folders, nested repositories), changed files are restored, and only the paths that differ between
    the folder's last tree and ``commit`` are rewritten.

    Raises:
        FileNotFoundError: ``folder`` has no stat cache (use :func:`materialize`).
        GitError: the reset failed.
    """
    index = index_file(folder)
    if not index.is_file():
        raise FileNotFoundError(f"{folder} has no stat cache {index.name}")
    git = store.git
    _remove_entry(folder / ".git")
    # diff-files lists every entry whose stat data changed (content-checking racily clean ones), which is
    # all a reset needs: a separate --refresh would be a second stat pass over the whole tree.
    dirty = split_z(git.run(["diff-files", "--name-only", "-z"], work_tree=folder, index=index))
    for path in split_z(git.run(["ls-files", "-z", "-o", "--directory"], work_tree=folder, index=index)):
        _remove_entry(folder / path.rstrip("/"))
    if dirty:
        git.run(["checkout-index", "-f", "-u", "-z", "--stdin"], work_tree=folder, index=index, input=join_z(dirty))
    current = git.run(["write-tree"], index=index).decode().strip()
    git.run(["read-tree", "-m", "-u", current, commit], work_tree=folder, index=index)
    init_agent_git(store, folder, commit, index)


def capture(store: StateStore, folder: Path, *, excludes: Path) -> str:
    """The tree of ``folder`` as it is now: every file and symlink except ``.git`` and paths matching the
    patterns in ``excludes`` (``workspace.ignore``), stored in the store. The stat cache is refreshed.

    Args:
        excludes: a gitignore-style pattern file (``StateStore.exclude_file``). The folder's own
            ``.gitignore`` files are *not* honoured: an executor cannot hide a change by ignoring it.

    Returns:
        The tree id.

    Raises:
        UnsafePath: a file name is not UTF-8, has a ``.git`` component in some disguise, or a nested
            repository (a folder with its own ``.git``) was created.
        GitError: git failed.
    """
    index = index_file(folder)
    if not index.is_file():
        raise FileNotFoundError(f"{folder} has no stat cache {index.name}")
    git = store.git
    temp = _temp_beside(index)
    # copy2 keeps the index's mtime: git's racy-git check compares each entry's mtime with the index
    # file's own, and git compares whole seconds only (unless built with USE_NSEC). A copy stamped "now"
    # would make an entry written in the same second as the index look clean, and a same-size in-place
    # edit made within that second would be missed.
    shutil.copy2(index, temp)
    try:
        # One stat pass: entries whose stat data changed are re-hashed by update-index below, which also
        # refreshes their stat data in the cache (so an untouched file is never hashed twice).
        changed = split_z(git.run(["diff-files", "--name-only", "-z"], work_tree=folder, index=temp))
        changed += split_z(git.run(["ls-files", "-z", "-o", f"--exclude-from={excludes}"], work_tree=folder, index=temp))
        for path in changed:
            _check_capturable(folder, path)
        if changed:
            git.run(["update-index", "-z", "--add", "--remove", "--stdin"], work_tree=folder, index=temp,
                    input=join_z(sorted(set(changed))))
        tree = git.run(["write-tree"], index=temp).decode().strip()
        os.replace(temp, index)
        return tree
    finally:
        temp.unlink(missing_ok=True)


def _check_capturable(folder: Path, path: str) -> None:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafePath(f"{path.encode('utf-8', 'surrogateescape')!r}: file name is not UTF-8") from None
    if path.endswith("/"):
        raise UnsafePath(f"{path}: a nested git repository (a folder with its own .git) is not captured; "
                         "remove it or add it to workspace.ignore")
    if any(is_dotgit(part) for part in path.split("/")):
        raise UnsafePath(f"unsafe path {path!r}: has a .git component: git's own data is off limits")
    try:
        mode = os.lstat(folder / path).st_mode
    except FileNotFoundError:
        return  # deleted
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode) or stat.S_ISDIR(mode)):
        raise UnsafePath(f"{path}: special file (fifo, socket or device) in workspace {folder}")


def init_agent_git(store: StateStore, folder: Path, commit: str, index: Path, *, name: str | None = None) -> None:
    """Give ``folder`` a fresh ``.git`` of its own: a branch ``conductor/<name>`` at ``commit`` (``name``
    defaults to the folder's), objects borrowed from the store, the stat cache as its index, no hooks."""
    dotgit = folder / ".git"
    _remove_entry(dotgit)
    for sub in ("objects/info", "objects/pack", "refs/heads", "refs/tags", "info"):
        (dotgit / sub).mkdir(parents=True)
    # A branch rather than a detached HEAD: agents and their tools expect one (and commit to it freely).
    branch = f"conductor/{name or folder.name}"
    (dotgit / "refs" / "heads" / "conductor").mkdir()
    (dotgit / "refs" / "heads" / branch).write_text(commit + "\n")
    (dotgit / "HEAD").write_text(f"ref: refs/heads/{branch}\n")
    sha256 = len(commit) == 64
    (dotgit / "config").write_text(AGENT_CONFIG.format(
        version=1 if sha256 else 0, extensions="[extensions]\n\tobjectformat = sha256\n" if sha256 else ""))
    (dotgit / "objects" / "info" / "alternates").write_text(str((store.dir / "objects").resolve()) + "\n")
    (dotgit / "description").write_text("An attempt workspace of Conductor; this .git is yours to use.\n")
    shutil.copy2(index, dotgit / "index")  # with its mtime, for the agent's git too (see capture)


def remove_folder(folder: Path) -> None:
    """Remove a checked-out folder and its stat cache (never following symlinks)."""
    _remove_entry(folder)
    index_file(folder).unlink(missing_ok=True)


def _remove_entry(path: Path) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree(path)  # rmtree never follows symlinks inside the tree
    else:
        path.unlink()
