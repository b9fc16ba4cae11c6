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

import math
import os
import shutil
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from conductor.errors import GitError, UnsafePath
from conductor.fsutil import fsync_dir, temp_path
from conductor.paths import is_dotgit
from conductor.workspace import feed
from conductor.workspace.git import Git, join_z, split_z
from conductor.workspace.store import MODE_EXEC, MODE_FILE, MODE_LINK, StateStore, TreeEntry
from conductor.workspace.trees import edit_tree, entry_on_disk

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


MAX_TOLD = 64
"""Paths from a change feed that git is told about at most (see :func:`_told`)."""


def materialize(store: StateStore, commit: str, folder: Path, *, keep_index: bool = True, durable: bool = True) -> None:
    """Check ``commit`` out into the new folder ``folder`` (built aside, renamed into place).

    Args:
        keep_index: keep the stat cache beside the folder (False for a checkout handed to a person).
        durable: fsync the parent folder after the rename (False for a folder made in a private place and
            renamed into its real one later, whose rename is made durable then).

    Raises:
        FileExistsError: ``folder`` exists.
        GitError: ``commit`` is not in the store, or the checkout failed.
    """
    if folder.exists() or folder.is_symlink():
        raise FileExistsError(f"checkout destination exists and is not empty: {folder}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    temp, temp_index = temp_path(folder), temp_path(index_file(folder))
    temp.mkdir()
    try:
        # One process: a one-tree merge into an empty index writes every file and records its stat data.
        store.git.run(["read-tree", "-m", "-u", commit], work_tree=temp, index=temp_index)
        _unsmudge(store, temp, temp_index)
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
    if durable:
        fsync_dir(folder.parent)


REFRESH_ENTRIES = 20_000
"""A checkout of at least this many entries has its stat cache refreshed once the clock has left the second
its files were written in (see :func:`_unsmudge`)."""


def _unsmudge(store: StateStore, folder: Path, index: Path) -> None:
    """Refresh a large fresh checkout's stat cache a second later, so later passes only ``lstat``.

    git cannot trust the stat data of an entry written in the same second as the index itself (the
    racy-git rule, gitformat-index(5)): it records such an entry "smudged", and every later look compares
    it by content until the index is written again from a later second. After a checkout of 50,000 files
    that is the last second's ~10,000 files, re-hashed by every capture and reset of the attempt (0.3 s
    instead of 0.1 s a pass). Waiting out the second (< 1 s, against a checkout that took seconds) and one
    ``update-index --refresh`` clears them. Smaller checkouts are cheap to re-hash and never wait.
    """
    with open(index, "rb") as handle:
        header = handle.read(12)
    if len(header) < 12 or int.from_bytes(header[8:12], "big") < REFRESH_ENTRIES:
        return
    written = os.stat(index).st_mtime
    time.sleep(max(0.0, math.floor(written) + 1.01 - time.time()))  # file times may trail time.time() by a tick
    store.git.run(["update-index", "-q", "--refresh"], work_tree=folder, index=index, ok_codes=(0, 1))


def reset(store: StateStore, folder: Path, commit: str, *, holds: str | None = None,
          only: Sequence[str] | None = None) -> None:
    """Make ``folder`` hold exactly ``commit``: whatever else is there goes (untracked and ignored files,
    folders, nested repositories), changed files are restored, and only the paths that differ between
    the folder's last tree and ``commit`` are rewritten.

    Args:
        holds: the tree the folder's tracked files are known to hold, exactly as its stat cache records
            them (a sealed capture, :mod:`conductor.workspace.sealed`): their stat pass is skipped, and
            only what is untracked is looked for and removed.
        only: the only paths (a folder standing for everything below it) that can differ from the stat
            cache, as a change feed tells them (:mod:`conductor.workspace.feed`); git looks at those only.

    Raises:
        FileNotFoundError: ``folder`` has no stat cache (use :func:`materialize`).
        GitError: the reset failed.
    """
    settle(folder)
    index = index_file(folder)
    if not index.is_file():
        raise FileNotFoundError(f"{folder} has no stat cache {index.name}")
    git = store.git
    _remove_entry(folder / ".git")
    # One process, one stat pass, as in capture: -m lists every entry whose stat data changed (content-
    # checking racily clean ones), -d the deleted ones, -o --directory what is untracked (an untracked
    # folder as "dir/"); -t tags each: "C " changed, "R " removed, "? " other. Known contents: -o only.
    dirty, other = set(), []
    told = _told(git, folder, index, only, untracked=["-t", "-o", "--directory"]) if only is not None else None
    if told is not None:  # from a change feed: the paths it names, and only those
        _held, tracked, untracked = told
        other = [item[2:] for item in untracked]
        dirty = set() if holds is not None else set(tracked)
    else:
        look = ["-o", "--directory"] if holds is not None else ["-m", "-d", "-o", "--directory"]
        for item in split_z(git.run(["ls-files", "-z", "-t", *look], work_tree=folder, index=index)):
            tag, path = item[:2], item[2:]
            if tag == "? ":
                other.append(path)
            elif tag in ("C ", "R "):
                dirty.add(path)
            else:
                raise GitError(f"git ls-files -t in {folder}: unexpected tag {tag!r} for {path!r}")
    for path in other:
        _remove_entry(folder / path.rstrip("/"))
    if dirty:
        git.run(["checkout-index", "-f", "-u", "-z", "--stdin"], work_tree=folder, index=index,
                input=join_z(sorted(dirty)))
    current = holds or index_tree(index) or git.run(["write-tree"], index=index).decode().strip()
    target = store.tree_of(commit)
    if current != target:  # a chain of steps: the folder often holds the next base already
        git.run(["read-tree", "-m", "-u", current, commit], work_tree=folder, index=index)
    remember_tree(index, target)
    init_agent_git(store, folder, commit, index)


def capture(store: StateStore, folder: Path, *, excludes: Path, only: Sequence[str] | None = None) -> str:
    """The tree of ``folder`` as it is now: every file and symlink except ``.git`` and paths matching the
    patterns in ``excludes`` (``workspace.ignore``), stored in the store. The stat cache is refreshed:
    before the call returns after a full pass; with ``only``, by a thread that every later use of the
    cache waits for (:func:`settle`), so that the caller goes on while git rewrites the whole index.

    Args:
        excludes: a gitignore-style pattern file (``StateStore.exclude_file``). The folder's own
            ``.gitignore`` files are *not* honoured: an executor cannot hide a change by ignoring it.
        only: the only paths that can differ from the stat cache, from a change feed (see :func:`reset`).

    Returns:
        The tree id.

    Raises:
        UnsafePath: a file name is not UTF-8, has a ``.git`` component in some disguise, or a nested
            repository (a folder with its own ``.git``) was created.
        GitError: git failed.
    """
    settle(folder)
    index = index_file(folder)
    if not index.is_file():
        raise FileNotFoundError(f"{folder} has no stat cache {index.name}")
    git = store.git
    # One process, one stat pass (ls-files -m is git's ie_modified): an entry whose stat data changed, or
    # that is racily clean, is compared by content (a same-size, same-mtime rewrite is seen); a deleted
    # entry is listed too; -o adds the untracked files (a nested repository as "path/"). The index is only
    # read here, so its mtime — the racy-git reference — is untouched.
    told = _told(git, folder, index, only, untracked=["-o", f"--exclude-from={excludes}"]) if only is not None else None
    if told is not None:  # from a change feed: what it names, changed or not (update-index skips the unchanged)
        changed = sorted({*told[1], *told[2]})
    else:
        changed = sorted(set(split_z(git.run(["ls-files", "-z", "-m", "-o", f"--exclude-from={excludes}"],
                                             work_tree=folder, index=index))))
    # Entries that go (deleted, now a folder, or behind what is now a symlink or a file) are removed first,
    # whatever is at their path: a file or link that replaced a folder ("pkg" for "pkg/b.py"), or the
    # reverse, must not meet the old entry in the index (git refuses a path "beyond a symbolic link").
    gone = {path for path in changed if _check_capturable(folder, path)}
    going, coming = [p for p in changed if p in gone], [p for p in changed if p not in gone]
    if not changed and (tree := index_tree(index)) is not None:
        return tree  # the folder is what the index says, and the index's tree is known
    if told is not None:
        # The changed paths are known: their blobs are stored (through an index of their own: the same
        # hashing as update-index, symlinks included) and the last tree is edited along them (trees.py).
        # Bringing the stat cache up to that tree rewrites the whole index (35 ms at 50,000 files): that
        # is left to a thread, which the next use of the cache waits for (settle).
        fmt = store.object_format
        seen = {path: _stat_key(folder / path) for path in coming}
        updates = {path: None for path in going} | {path: _entry(folder, path, fmt) for path in coming}
        if coming:
            _store_blobs(git, folder, index, coming)
        tree = edit_tree(store, told[0], updates)
        _refresh_later(git, folder, index, going, coming, told[1], seen, tree)
        return tree
    temp = temp_path(index)
    shutil.copy2(index, temp)  # keeps the index's mtime (see _update_cache)
    try:
        _update_cache(git, folder, temp, going, coming, {})
        # write-tree also stores the tree in the index (its cache-tree), read by the next capture.
        tree = git.run(["write-tree"], index=temp).decode().strip()
        os.replace(temp, index)
        remember_tree(index, tree)
        return tree
    finally:
        temp.unlink(missing_ok=True)


def _update_cache(git: Git, folder: Path, index: Path, going: list[str], coming: list[str],
                  held: dict[str, TreeEntry]) -> None:
    """Remove ``going`` from the stat cache ``index`` and re-hash ``coming`` into it, stat data refreshed.

    ``index`` is a copy made with ``shutil.copy2``, which keeps the original's mtime: git's racy-git check
    compares each entry's mtime with the index file's own, and git compares whole seconds only (unless
    built with USE_NSEC). A copy stamped "now" would make an entry written in the same second as the
    index look clean, and a same-size in-place edit made within that second would be missed.
    """
    if going:
        git.run(["update-index", "-z", "--force-remove", "--stdin"], work_tree=folder, index=index,
                input=join_z(going))
    if coming:
        # A path the feed saw written (``held``: its entry in the last tree) is re-hashed whatever its stat
        # data says: a same-size rewrite in the second the cache was written, its mtime put back, matches
        # in stat (git compares whole seconds). --cacheinfo first puts its entry back with no stat data,
        # in the same process.
        forced = [arg for path in coming if (old := held.get(path)) is not None
                  for arg in ("--cacheinfo", f"{old.mode},{old.oid},{path}")]
        git.run(["update-index", "-z", "--add", "--remove", *forced, "--stdin"], work_tree=folder, index=index,
                input=join_z(coming))


def _store_blobs(git: Git, folder: Path, index: Path, paths: list[str]) -> None:
    """Store the blobs of ``paths`` (files and symlinks of ``folder``) in the store."""
    scratch = temp_path(index)  # an index of these paths only: git creates it, and it is thrown away
    try:
        git.run(["update-index", "-z", "--add", "--stdin"], work_tree=folder, index=scratch, input=join_z(paths))
    finally:
        scratch.unlink(missing_ok=True)


def _stat_key(path: Path) -> tuple[int, int, int, int] | None:
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns


def cache_identity(folder: Path) -> tuple[int, int, int, int] | None:
    """``(st_ino, st_size, st_mtime_ns, st_ctime_ns)`` of ``folder``'s stat cache, None if it has none:
    every rewrite of the cache (a new file, renamed into place) changes it."""
    return _stat_key(index_file(folder))


class IndexRefresh:
    """A stat cache being brought up to a captured tree by a thread (see :func:`capture`).

    Attributes:
        done: set when the thread has finished, installed or not.
        installed: the new stat cache's :func:`cache_identity` once it replaced the old one; None if it
            did not (the old one, which still holds the previous tree, stays).
    """

    def __init__(self) -> None:
        self.done = threading.Event()
        self.installed: tuple[int, int, int, int] | None = None


_REFRESHES: dict[str, tuple[IndexRefresh, threading.Thread]] = {}  # by _refresh_key
_REFRESHES_LOCK = threading.Lock()


def _refresh_key(folder: Path) -> str:
    return os.path.realpath(index_file(folder))  # a folder may be named resolved or as listed


def _refresh_later(git: Git, folder: Path, index: Path, going: list[str], coming: list[str],
                   held: dict[str, TreeEntry], seen: dict[str, tuple[int, int, int, int] | None], tree: str) -> None:
    refresh = IndexRefresh()

    def work() -> None:
        temp = temp_path(index)
        try:
            shutil.copy2(index, temp)
            _update_cache(git, folder, temp, going, coming, held)
            # The cache must hold what the tree was made from: a file written since it was hashed (nothing
            # can, in a folder whose feed is trusted; checked all the same) leaves the old cache in place,
            # which still holds the last tree exactly, and the next pass finds the change by stat.
            if any(_stat_key(folder / path) != key for path, key in seen.items()):
                return
            os.replace(temp, index)
            remember_tree(index, tree)
            refresh.installed = cache_identity(folder)
        except Exception:  # noqa: BLE001 - the old cache stays, and is still true to its own tree
            return
        finally:
            temp.unlink(missing_ok=True)
            refresh.done.set()

    thread = threading.Thread(target=work, name=f"conductor-refresh-{folder.name}")
    key = _refresh_key(folder)
    with _REFRESHES_LOCK:
        _REFRESHES[key] = (refresh, thread)
    try:
        thread.start()
    except RuntimeError:  # no thread to be had (a process limit, interpreter shutdown): do it now
        with _REFRESHES_LOCK:
            del _REFRESHES[key]
        work()


def refreshing(folder: Path) -> IndexRefresh | None:
    """The background refresh of ``folder``'s stat cache that nobody has waited for yet, if any."""
    with _REFRESHES_LOCK:
        found = _REFRESHES.get(_refresh_key(folder))
    return found[0] if found is not None else None


def settle(folder: Path | None = None) -> None:
    """Wait until the stat cache of ``folder`` (None: of every folder) is no longer being refreshed in
    the background. Everything that reads, replaces or removes a stat cache, or lets anything write its
    folder, calls it first."""
    with _REFRESHES_LOCK:
        if folder is None:
            waiting = list(_REFRESHES.items())
        else:
            key = _refresh_key(folder)
            waiting = [(key, _REFRESHES[key])] if key in _REFRESHES else []
    for key, (refresh, thread) in waiting:
        thread.join()
        with _REFRESHES_LOCK:
            if key in _REFRESHES and _REFRESHES[key][0] is refresh:
                del _REFRESHES[key]


_INDEX_TREES: OrderedDict[tuple[int, int], tuple[tuple[int, int], str]] = OrderedDict()
_INDEX_TREES_LOCK = threading.Lock()


def remember_tree(index: Path, tree: str) -> None:
    """Remember that the stat cache ``index``, as it is now, holds ``tree`` (for :func:`index_tree`)."""
    info = os.stat(index)
    with _INDEX_TREES_LOCK:
        _INDEX_TREES[(info.st_dev, info.st_ino)] = ((info.st_size, info.st_mtime_ns), tree)
        _INDEX_TREES.move_to_end((info.st_dev, info.st_ino))
        while len(_INDEX_TREES) > 256:
            _INDEX_TREES.popitem(last=False)


def index_tree(index: Path) -> str | None:
    """The tree the stat cache ``index`` holds: git's own record (:func:`cached_tree`), or what this
    process remembered when it last wrote the file without one (a capture that edited the tree along the
    changed paths). Keyed by the file's inode, size and mtime: a recycled folder's stat cache is renamed
    (which changes its ctime), and every rewrite is a new file. None if neither is known."""
    tree = cached_tree(index)
    if tree is not None:
        return tree
    try:
        info = os.stat(index)
    except OSError:
        return None
    with _INDEX_TREES_LOCK:
        known = _INDEX_TREES.get((info.st_dev, info.st_ino))
    return known[1] if known is not None and known[0] == (info.st_size, info.st_mtime_ns) else None


def _entry(folder: Path, path: str, object_format: str) -> TreeEntry:
    # As update-index just stored it: info/attributes turns every conversion off, so the blob is the bytes.
    entry = entry_on_disk(folder / path, object_format)
    if entry is None or entry.mode not in (MODE_FILE, MODE_EXEC, MODE_LINK):
        raise GitError(f"{path} in {folder} changed while it was captured")
    return entry


def _told(git: Git, folder: Path, index: Path, only: Sequence[str], *,
          untracked: list[str]) -> tuple[str, dict[str, TreeEntry], list[str]] | None:
    """What a change feed's paths ``only`` hold: ``(held, tracked, untracked)``, or None if it cannot be
    told (the caller then makes the full pass). ``held`` is the tree the stat cache holds.

    ``tracked``: the paths among ``only`` that the folder's last tree has as a file or link (found in
    that tree, not by reading the 4 MB index at 50,000 files). A tracked path under a named
    folder is named itself: the folders the feed watches report each file's change. ``untracked``: what
    ``git ls-files <untracked> -- <only>`` lists below the paths, which git reads alone.

    git's pathspec matching costs (index entries × pathspecs), so past :data:`MAX_TOLD` paths the full
    pass is cheaper.
    """
    held = index_tree(index)
    if held is None or len(only) > MAX_TOLD or any("\n" in path for path in only):
        return None
    if not only:
        return held, {}, []
    # Each path and the folders above it: a submodule (a "commit" entry, whose object the store may lack)
    # on the way is left to the full pass, which judges a submodule's folder by rules of its own.
    asked = sorted({*only, *(path.rsplit("/", i)[0] for path in only for i in range(1, path.count("/") + 1))})
    kinds: dict[str, str] = {}
    tracked: dict[str, TreeEntry] = {}
    for record in split_z(git.run(["ls-tree", "-z", "--full-tree", held, "--",
                                   *(f":(literal){path}" for path in asked)])):
        meta, _, path = record.partition("\t")
        mode, kinds[path], oid = meta.split(" ")
        if kinds[path] == "blob":
            tracked[path] = TreeEntry(mode, oid)
    if "commit" in kinds.values():
        return None
    tracked = {path: tracked[path] for path in only if path in tracked}  # not a file above one (now a folder)
    # git reads the whole index to list what is untracked (7 ms at 50,000 files); only a path that is
    # there and is, or may hold, something the index lacks needs it: an untracked one, or a tracked file
    # that is now a folder. A path that is not there at all lists nothing.
    asking = [path for path in only if _may_hold_untracked(folder, path, path in tracked)]
    if not asking:
        return held, tracked, []
    # Literal: a feed's path is a name, never a pattern (gitglossary(7), "pathspec magic").
    listed = git.run(["ls-files", "-z", *untracked, "--", *(f":(literal){path}" for path in asking)],
                     work_tree=folder, index=index)
    return held, tracked, split_z(listed)


def _may_hold_untracked(folder: Path, path: str, tracked: bool) -> bool:
    try:
        mode = os.lstat(folder / path).st_mode  # a folder on the way that is now a link is followed: git asked
    except (FileNotFoundError, NotADirectoryError):  # gone, or a folder on the way is now a file
        return False
    except OSError:  # e.g. a folder on the way made unreadable: git decides
        return True
    return not tracked or stat.S_ISDIR(mode)


def cached_tree(index: Path) -> str | None:
    """The tree id git recorded for a whole index in its cache-tree extension, or None if it has none.

    Format (gitformat-index(5)): the extensions follow the entries; the last one, ``EOIE`` (written since
    ``index.threads=true`` is among the hardened settings), holds the offset where they begin. The ``TREE``
    extension starts with the root: an empty path, NUL, the entry count in ASCII (-1 = invalid), a space,
    the subtree count, a newline, then the tree id. git writes it when it made or read that tree
    (``read-tree`` of one tree, ``write-tree``) and invalidates it when an entry changes; the count must
    also equal the index's own entry count. Anything unexpected answers None (the caller runs ``write-tree``).
    """
    try:
        with open(index, "rb") as handle:
            header = handle.read(12)
            total = handle.seek(0, os.SEEK_END)
            tail_start = max(0, total - 76)  # EOIE and the checksum, for the larger (SHA-256) ids
            handle.seek(tail_start)
            tail = handle.read()
            if len(header) < 12 or header[:4] != b"DIRC":
                return None
            for size in (20, 32):  # SHA-1 or SHA-256 repository
                eoie = total - size - (12 + size)
                at = eoie - tail_start
                if eoie > 12 and at >= 0 and tail[at:at + 4] == b"EOIE" and int.from_bytes(tail[at + 4:at + 8], "big") == 4 + size:
                    break
            else:
                return None
            first = int.from_bytes(tail[at + 8:at + 12], "big")
            if not 12 <= first <= eoie:
                return None
            handle.seek(first)
            data = handle.read(eoie - first)  # the extensions before EOIE
    except OSError:
        return None
    entries = int.from_bytes(header[8:12], "big")
    pos = 0
    while pos + 8 <= len(data):
        signature, length = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "big")
        start, pos = pos + 8, pos + 8 + length
        if signature != b"TREE":
            continue
        line_end = data.find(b"\n", start, pos)
        head = data[start:line_end].split(b"\0", 1) if line_end > 0 else []
        counts = head[1].split(b" ") if len(head) == 2 and head[0] == b"" else []
        if len(counts) != 2 or counts[0] != str(entries).encode() or line_end + 1 + size > pos:
            return None
        return data[line_end + 1:line_end + 1 + size].hex()
    return None


def _check_capturable(folder: Path, path: str) -> bool:
    """Refuse what is never captured (raises :class:`UnsafePath`); True if ``path`` is gone, a folder or
    behind a symlink or file (its entry leaves the index), False for a file or symlink."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafePath(f"{path.encode('utf-8', 'surrogateescape')!r}: file name is not UTF-8") from None
    if path.endswith("/"):
        raise UnsafePath(f"{path}: a nested git repository (a folder with its own .git) is not captured; "
                         "remove it or add it to workspace.ignore")
    if any(is_dotgit(part) for part in path.split("/")):
        raise UnsafePath(f"unsafe path {path!r}: has a .git component: git's own data is off limits")
    parts = path.split("/")
    try:
        for depth in range(1, len(parts)):  # never through a symlink: what lies behind one is not this path
            if not stat.S_ISDIR(os.lstat(folder.joinpath(*parts[:depth])).st_mode):
                return True  # its folder is a file or a symlink now
        mode = os.lstat(folder / path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return True  # deleted
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode) or stat.S_ISDIR(mode)):
        raise UnsafePath(f"{path}: special file (fifo, socket or device) in workspace {folder}")
    return stat.S_ISDIR(mode)


def init_agent_git(store: StateStore, folder: Path, commit: str, index: Path, *, name: str | None = None) -> None:
    """Give ``folder`` a fresh ``.git`` of its own: a branch ``conductor/<name>`` at ``commit`` (``name``
    defaults to the folder's), objects borrowed from the store, the stat cache as its index, no hooks.

    Only what git needs to see a repository (``HEAD``, ``config``, ``objects/``, ``refs/``): git makes
    the rest (``objects/pack``, ``logs/``, loose refs...) when the agent's commands need it. The branch is
    written to ``packed-refs``, which spares a folder per attempt; a commit moves it to a loose ref.
    """
    dotgit = folder / ".git"
    _remove_entry(dotgit)
    (dotgit / "objects" / "info").mkdir(parents=True)
    (dotgit / "refs").mkdir()
    # A branch rather than a detached HEAD: agents and their tools expect one (and commit to it freely).
    branch = f"refs/heads/conductor/{name or folder.name}"
    sha256 = len(commit) == 64
    _write_new(dotgit / "HEAD", f"ref: {branch}\n")
    _write_new(dotgit / "packed-refs", f"# pack-refs with: peeled fully-peeled sorted \n{commit} {branch}\n")
    _write_new(dotgit / "config", AGENT_CONFIG.format(
        version=1 if sha256 else 0, extensions="[extensions]\n\tobjectformat = sha256\n" if sha256 else ""))
    _write_new(dotgit / "objects" / "info" / "alternates", str((store.dir / "objects").resolve()) + "\n")
    # With its mtime, for the agent's git too (see capture): git's racy-git rule compares entries with it.
    shutil.copyfile(index, dotgit / "index")
    info = os.stat(index)
    os.utime(dotgit / "index", ns=(info.st_atime_ns, info.st_mtime_ns))


def _write_new(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def remove_folder(folder: Path) -> None:
    """Remove a checked-out folder and its stat cache (never following symlinks)."""
    settle(folder)
    feed.drop(folder)
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
