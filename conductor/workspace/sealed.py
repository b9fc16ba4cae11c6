"""Trees this process captured from attempt folders that nothing else could write since.

Finding what an attempt changed costs a ``stat`` of every file in its folder (``checkout.capture``: about
0.1 s at 50,000 files), and a step used to pay it three times on the same unchanged folder: once after
its executor ran, once more in the verifier, and a third time (``checkout.reset``) when the folder was
recycled for the next step. When the executor ran *in this process* and every process it started is
gone — a sandboxed command whose pid namespace the kernel emptied, or an LLM executor that starts no
process — nothing but Conductor itself can write the folder until Conductor hands it to someone else.
The capture made right after the run is then *sealed*: remembered with the identity of the folder and of
its stat cache, and reused by the verifier and by the next reset of the same folder in this process.

A seal never crosses a process (an external executor's folder is always captured afresh by whoever
reads it) and ends when the folder may be written again: :func:`forget` before anything is launched in
it (verification commands), :func:`take` when it is recycled. Anything that renames, replaces or
rewrites the folder or its stat cache changes their identity, and the seal no longer matches.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

from conductor.workspace.checkout import IndexRefresh, cache_identity, refreshing, settle

MAX_SEALS = 64
"""Seals kept at most (the oldest go first): one per attempt between its run and its folder's reuse."""

_Identity = tuple[tuple[int, ...], "tuple[int, ...] | IndexRefresh"]
_seals: OrderedDict[tuple[str, Path], tuple[_Identity, str]] = OrderedDict()
_lock = threading.Lock()


def _key(folder: Path) -> str:
    return os.path.realpath(folder)  # the verifier names a folder resolved, the recycler as listed


def _stat(path: Path) -> tuple[int, ...] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino, info.st_mtime_ns, info.st_ctime_ns


def _identity(folder: Path) -> _Identity | None:
    # The stat cache is rewritten (a new inode, by rename) by every capture and reset that changes it. A
    # capture told by a change feed has a thread rewrite it (checkout.capture): the seal then stands for
    # what that thread installs.
    top = _stat(folder)
    cache = refreshing(folder) or cache_identity(folder)
    return None if top is None or cache is None else (top, cache)


def _holds(folder: Path, identity: _Identity) -> bool:
    """Whether ``folder`` and its stat cache are still those sealed with ``identity``."""
    top, cache = identity
    if _stat(folder) != top:
        return False
    if isinstance(cache, IndexRefresh):
        if not cache.done.is_set():
            return refreshing(folder) is cache  # still being written by the thread the seal waits on
        return cache.installed is not None and cache.installed == cache_identity(folder)
    return cache == cache_identity(folder)


def seal(folder: Path, excludes: Path, tree: str) -> None:
    """Remember that ``folder`` holds ``tree`` (captured with the exclude file ``excludes``) and that no
    process can write it until :func:`forget` or :func:`take`.

    The caller vouches for that: call it only right after a capture of a folder whose executor ran in
    this process and left no process alive.
    """
    identity = _identity(folder)
    if identity is None:
        return
    key = (_key(folder), excludes)
    with _lock:
        _seals[key] = (identity, tree)
        _seals.move_to_end(key)
        while len(_seals) > MAX_SEALS:
            _seals.popitem(last=False)


def sealed_tree(folder: Path, excludes: Path) -> str | None:
    """The tree sealed for ``folder`` with ``excludes``, or None when there is none or the folder or its
    stat cache is no longer the one sealed (the seal is then dropped)."""
    key = (_key(folder), excludes)
    with _lock:
        found = _seals.get(key)
        if found is None:
            return None
        if not _holds(folder, found[0]):
            del _seals[key]
            return None
        return found[1]


def take(folder: Path) -> str | None:
    """End every seal of ``folder`` (it is about to be handed to another attempt) and return its tree if
    one still matched; the tree of the tracked files only: files the capture left out (``workspace.ignore``)
    may be there beside it."""
    settle(folder)  # the stat cache is about to move with the folder
    name = _key(folder)
    with _lock:
        found = [_seals.pop(key) for key in [key for key in _seals if key[0] == name]]
    trees = {tree for sealed_identity, tree in found if _holds(folder, sealed_identity)}
    return trees.pop() if len(trees) == 1 else None


def forget(folder: Path) -> None:
    """End every seal of ``folder``: something may write it now (once its stat cache is settled)."""
    settle(folder)
    name = _key(folder)
    with _lock:
        for key in [key for key in _seals if key[0] == name]:
            del _seals[key]
