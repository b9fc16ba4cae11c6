"""Attempt workspaces: the folder each attempt of a step runs in, and what it changed.

Every attempt gets its own folder, ``.conductor/scratch/plan_P/fork_F/<step>.a<n>/``, checked out from
Conductor's private repository at the attempt's base commit (the fork's state when the step was
published), with a ``.git`` of its own (see :mod:`conductor.workspace.checkout`). What the attempt
changed is its working tree against that commit, found with a stat cache, never the executor's word.

Cost: the first attempt of a fork costs a checkout (what ``git worktree add`` costs). After that a
finished attempt's folder is *recycled*: renamed to the new attempt's name and reset to the new base,
which rewrites only the files that differ and removes everything else — for a chain of steps, about
the cost of a ``git status``. A folder is recycled only when its attempt ended with the executor's own
word (its task reached ``completed/`` and was verified, or ``failed/``), or when the process that ran a
contained attempt gave it back (:func:`hand_over`: the retry takes the folder). A folder whose lease
expired, or that an uncontained run gave back, is never reused, since its executor may still be writing
there (a zombie's writes land in a folder nobody reads). ``gc`` removes them.
"""

from __future__ import annotations

import os
import secrets
import shutil
import threading
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

from conductor.errors import ConductorError, UnsafePath
from conductor.fsutil import TEMP_PREFIX, entry_names, fsync_dir
from conductor.handoff.documents import read_document
from conductor.layout import RESULT_SUFFIX, TASK_SUFFIX, VERDICT_SUFFIX, ForkLayout, ProjectLayout
from conductor.models import FileChange, Result, Task
from conductor.workspace import feed, sealed
from conductor.workspace.checkout import capture, index_file, materialize, remove_folder, reset, settle
from conductor.workspace.store import StateStore


@lru_cache(maxsize=16)
def _store(root: Path, conductor_dir: Path) -> StateStore:
    return StateStore(root, conductor_dir).ensure()


def state_store(layout: ProjectLayout) -> StateStore:
    """The project's private repository, created on first use.

    Raises:
        GitError: git is missing or too old.
    """
    return _store(layout.root, layout.conductor_dir)


def task_workspace(layout: ProjectLayout, task: Task) -> Path:
    """The absolute workspace of ``task``; it must be an attempt folder under ``.conductor/scratch``.

    Raises:
        UnsafePath: the task points its executor anywhere else, or the folder is missing.
    """
    scratch_root = layout.scratch_root.resolve()
    workspace = (layout.root / task.workspace).resolve()
    if not workspace.is_relative_to(scratch_root) or not workspace.is_dir():
        raise UnsafePath(f"{task.task_id}: workspace {task.workspace!r} is not an attempt folder under .conductor/scratch")
    return workspace


def prepare_workspace(layout: ProjectLayout, plan_id: str, fork_id: str, step_id: str, attempt: int,
                      base_commit: str, *, recycle: bool = True, watch: bool = True) -> Path:
    """Make the folder of one attempt hold exactly ``base_commit`` and return it.

    A folder left at that name by a crash before the task was published is reset; otherwise (with
    ``recycle``) an idle folder of the same fork is recycled, or a new one checked out. With ``watch``, a
    new folder gets a change feed (:mod:`conductor.workspace.feed`); pass False when the attempt will be
    run by another process (an external executor), for which this process's feed could never vouch: its
    watches (one per folder of the tree) would be spent for nothing.

    Raises:
        GitError: the checkout or reset failed.
    """
    store = state_store(layout)
    target = layout.scratch_dir(plan_id, fork_id, step_id, attempt)
    if target.is_dir() and index_file(target).is_file():
        sealed.forget(target)
        feed.drop(target)
        reset(store, target, base_commit)
        return target
    remove_folder(target)
    for idle in _idle_folders(layout, plan_id, fork_id) if recycle else ():
        holds = sealed.take(idle)  # before the rename, which changes the stat cache's ctime
        try:
            os.rename(idle, target)
        except FileNotFoundError:  # another process recycled it first
            continue
        os.replace(index_file(idle), index_file(target))
        reset(store, target, base_commit, holds=holds, only=feed.changes(target))
        feed.rearm(target)
        return target
    materialize(store, base_commit, target)
    if watch:
        feed.start(target)
    return target


def prepare_retry(layout: ProjectLayout, task: Task, *, watch: bool = False) -> Task:
    """Give a re-queued task (``attempt`` already incremented) a folder of its own at the same base.

    Args:
        watch: give the folder a change feed; only for a retry this process will run itself (see
            :func:`prepare_workspace`). A worker or a ``conductor task`` command cannot know who claims
            the retry, and a short-lived command's feed would end with it.

    Returns:
        The task with ``workspace`` pointing at the new attempt's folder.
    """
    # No search for an idle folder: a re-queue happens under the fork lock, often many at once after a
    # crash, and each search reads every finished attempt's task; a checkout of the base is cheaper.
    folder = prepare_workspace(layout, task.plan_id, task.fork_id, task.task_id, task.attempt, task.base_commit,
                               recycle=False, watch=watch)
    return task.model_copy(update={"workspace": layout.relative(folder)})


def hand_over(layout: ProjectLayout, task: Task, *, fallback: Callable[[Task], Task]) -> Task:
    """Give a re-queued task (``attempt`` already incremented, ``workspace`` still naming the folder of the
    attempt it replaces) that same folder, renamed to the new attempt's name and reset to the base.

    Only for an attempt given back by the process that ran it, once nothing the attempt started can write
    the folder any more (a *contained* run, ``conductor.executors.base.Outcome``): then the folder is
    nobody's, and a reset rewrites only what the attempt changed, where a fresh checkout costs what
    ``git worktree add`` costs (on a 6,800-file repository, seconds spent by a worker told to stop).
    The reset looks at the whole folder (one ``git ls-files`` pass) unless this process's change feed can
    name what was written (the engine running its own executor), as when a finished attempt's folder is
    recycled (:func:`prepare_workspace`).

    Args:
        fallback: makes the retry's folder when this one cannot be handed over (it is not an attempt folder
            with its stat cache, or the new attempt's name is taken): :func:`prepare_retry` as the caller
            would use it.

    Returns:
        The task with ``workspace`` pointing at the new attempt's folder.

    Raises:
        GitError: the reset failed (the folder then stays under the new name; recovery or the next
            :func:`prepare_workspace` for that name resets it).
    """
    old = _previous_folder(layout, task)
    target = layout.scratch_dir(task.plan_id, task.fork_id, task.task_id, task.attempt)
    if old is None or target.exists() or target.is_symlink() or index_file(target).exists():
        return fallback(task)
    sealed.forget(old)  # (after waiting for a refresh of its stat cache that may still write the index)
    feed.vouch(old)  # the caller's word: the run was contained (see the module docstring of feed)
    if not _move_with_cache(old, target):
        return fallback(task)
    reset(state_store(layout), target, task.base_commit, only=feed.changes(target))
    feed.rearm(target)
    fsync_dir(target.parent)  # the rename is durable before the retry naming it is published
    return task.model_copy(update={"workspace": target.relative_to(layout.root).as_posix()})


class RetryFolders:
    """:func:`prepare_retry` for one project that checks retries out ahead of the fork lock, in the
    background and several at once (a :class:`conductor.handoff.reaper.BatchPreparer`: a checkout is slow
    work, and after a crash a reap re-queues many tasks, each needing one, while the re-queues themselves
    mostly wait for the disk).

    A folder made ahead is built in a private folder ``scratch/plan_P/fork_F/.tmp.ahead.<pid>.<hex>/``
    under its final name (so its agent branch is named right), and renamed into place only under the
    fork lock, when its retry is published and its name is still free: a folder another process made or
    uses is never touched. What is not used is removed by :meth:`discard`, or, after a crash, by
    recovery's temp sweep (the private folder's name carries the pid).

    With ``watch`` (only where this process runs the retries itself), each folder's change feed is started
    right after its checkout, in the background too: a feed is keyed by the folder's inode, which the
    rename into place keeps.
    """

    def __init__(self, layout: ProjectLayout, *, watch: bool = False, threads: int | None = None) -> None:
        self.layout = layout
        self.watch = watch
        # One per CPU: the re-queues themselves mostly wait (their fsyncs are grouped per batch), and each
        # checkout is mostly a git process starting (measured on 2 CPUs: 300 re-queues took 0.75-0.91 s with
        # 2 threads, 0.91-1.06 s with 1).
        self.threads = threads or min(4, max(1, os.cpu_count() or 2))
        # (plan, fork, step, attempt, base) -> the checkout being made: its folder, or None if it failed
        self._pending: dict[tuple[str, str, str, int, str], Future[Path | None]] = {}
        self._private: dict[Path, Path] = {}  # fork's scratch folder -> this instance's private folder in it
        self._private_lock = threading.Lock()
        self._unsynced: set[Path] = set()  # folders whose new entries are not fsynced yet
        self._pool: ThreadPoolExecutor | None = None

    def __call__(self, task: Task) -> Task:
        made = self.wait(task)
        self._pending.pop(_retry_key(task), None)
        if made is not None:
            target = self.layout.scratch_dir(task.plan_id, task.fork_id, task.task_id, task.attempt)
            if not target.exists() and not index_file(target).exists():
                os.rename(index_file(made), index_file(target))
                os.rename(made, target)
                self._unsynced.add(target.parent)  # fsynced once for the batch, by sync()
                # (target is built from the layout's root: no symlink to resolve, unlike layout.relative)
                return task.model_copy(update={"workspace": target.relative_to(self.layout.root).as_posix()})
            remove_folder(made)
        return prepare_retry(self.layout, task, watch=self.watch)

    def take_over(self, task: Task) -> Task:
        """The retry takes the folder of the attempt it replaces, which nothing can write any more (its
        holder died and its lease says all its processes died with it): the folder taken over ahead
        (:meth:`prefetch` with ``take``), else :func:`hand_over` now, with this preparer as the fallback.
        A :class:`conductor.handoff.reaper.FolderTaker`."""
        if _retry_key(task) in self._pending:
            return self(task)
        return hand_over(self.layout, task, fallback=self)

    def prefetch(self, tasks: list[Task], *, take: Collection[str] = ()) -> None:
        """Start making the folder of each retry (``attempt`` already incremented) at its base, in the
        background; returns at once. A folder that cannot be made is left to :meth:`__call__`, which makes
        it again and reports the error.

        Args:
            take: the steps whose old attempt's folder is nobody's (see :meth:`take_over`): it is moved
                into this preparer's private folder and reset there, instead of a new checkout (which
                is made if the old folder is not there any more).
        """
        wanted = [task for task in tasks if _retry_key(task) not in self._pending]
        if not wanted:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="conductor-retry")
        store = state_store(self.layout)
        for task in wanted:
            self._pending[_retry_key(task)] = self._pool.submit(self._make, store, task, task.task_id in take)

    def wait(self, task: Task) -> Path | None:
        """Wait until the checkout made ahead for ``task`` (if any) is done; its folder, or None."""
        future = self._pending.get(_retry_key(task))
        return None if future is None else future.result()

    def sync(self) -> None:
        """Make the renames of the folders handed over since the last call durable (one fsync per folder
        they went to); the re-queue calls it before it publishes the retries that name them."""
        while self._unsynced:
            fsync_dir(self._unsynced.pop())

    def discard(self) -> None:
        """Wait for the checkouts still being made, then remove every folder made ahead and not used."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._pending.clear()
        for private in self._private.values():
            for made in private.iterdir() if self.watch and private.is_dir() else ():
                feed.drop(made)
            shutil.rmtree(private, ignore_errors=True)
        self._private.clear()

    def _make(self, store: StateStore, task: Task, take: bool = False) -> Path | None:
        target = self.layout.scratch_dir(task.plan_id, task.fork_id, task.task_id, task.attempt)
        with self._private_lock:  # one private folder per fork: a retry's name (step, attempt) is unique in it
            private = self._private.get(target.parent)
            if private is None:
                target.parent.mkdir(parents=True, exist_ok=True)
                private = target.parent / f"{TEMP_PREFIX}ahead.{os.getpid()}.{secrets.token_hex(4)}"
                private.mkdir()
                self._private[target.parent] = private
        try:
            if not (take and _take_into(self.layout, store, task, private / target.name)):
                materialize(store, task.base_commit, private / target.name, durable=False)  # durable when used
        except (ConductorError, OSError):
            return None
        if self.watch:
            feed.start(private / target.name)
        return private / target.name


def _previous_folder(layout: ProjectLayout, task: Task) -> Path | None:
    """The folder of the attempt a retry ``task`` replaces: ``task.workspace`` (not yet updated), if it is
    that attempt's own folder (``<step>.a<attempt - 1>`` beside the retry's), else None."""
    try:
        old = task_workspace(layout, task)
    except UnsafePath:
        return None
    own = layout.scratch_dir(task.plan_id, task.fork_id, task.task_id, task.attempt - 1)
    return old if old == own.resolve() and not own.is_symlink() else None


def _take_into(layout: ProjectLayout, store: StateStore, task: Task, folder: Path) -> bool:
    """Move the folder of the attempt ``task`` replaces (``task.workspace``, with its stat cache) to
    ``folder`` and reset it there to the task's base, as :func:`hand_over` does in place; False if it is
    not there (another process took it, or it was never made), and nothing was done."""
    old = _previous_folder(layout, task)
    if old is None or not _move_with_cache(old, folder):
        return False
    reset(store, folder, task.base_commit)  # one pass over the folder: no feed vouches for it here
    return True


def _move_with_cache(old: Path, folder: Path) -> bool:
    """Rename the checked-out folder ``old`` and its stat cache to ``folder``; False, with nothing moved, if
    either is not there (never made, or another process took it meanwhile)."""
    try:
        os.rename(index_file(old), index_file(folder))  # first: a folder without its stat cache is no use
    except FileNotFoundError:
        return False
    try:
        os.rename(old, folder)
    except FileNotFoundError:
        index_file(folder).unlink()  # the folder went meanwhile: its cache goes too
        return False
    return True


def _retry_key(task: Task) -> tuple[str, str, str, int, str]:
    return task.plan_id, task.fork_id, task.task_id, task.attempt, task.base_commit


def attempt_changes(layout: ProjectLayout, workspace: Path, base_commit: str, ignore: list[str], *,
                    seal: bool = False) -> tuple[str, list[FileChange]]:
    """What an attempt changed: its working tree now against ``base_commit``.

    A tree this process sealed for the folder (:mod:`conductor.workspace.sealed`) is reused instead of
    looking at the folder again.

    Args:
        seal: the caller vouches that no process can write ``workspace`` any more: its executor ran in
            this process and left no process alive. The captured tree is then sealed, and this process's
            verifier and the folder's next reset reuse it.

    Returns:
        ``(tree, changes)``: the captured tree's id (stored) and the change set, sorted by path.

    Raises:
        UnsafePath: the folder holds a name Conductor refuses to capture (see ``checkout.capture``).
        GitError: git failed.
    """
    store = state_store(layout)
    excludes = store.exclude_file(ignore)
    if seal:
        feed.vouch(workspace)
    tree = sealed.sealed_tree(workspace, excludes)
    if tree is None:
        tree = capture(store, workspace, excludes=excludes, only=feed.changes(workspace) if seal else None)
        if seal:
            sealed.seal(workspace, excludes, tree)
    return tree, store.changes(store.tree_of(base_commit), tree)


def _idle_folders(layout: ProjectLayout, plan_id: str, fork_id: str) -> list[Path]:
    """Folders of this fork whose attempt ended with the executor's own word (see the module docstring),
    most recently used first.

    Cost: one listing each of the scratch folder, ``completed/`` and ``failed/``; only the folders of
    finished steps are then looked at, so publishing each of a thousand steps does not read the other
    pending ones (which made publishing a fork quadratic).
    """
    fork = layout.fork(plan_id, fork_id)
    finished = {name[: -len(TASK_SUFFIX)] for state in ("completed", "failed")
                for name in entry_names(fork.state_dir(state)) if name.endswith(TASK_SUFFIX)}
    if not finished:
        return []
    folder = layout.fork_scratch_dir(plan_id, fork_id)
    candidates = []
    for name in entry_names(folder):
        step, dot, attempt = name.rpartition(".a")
        if dot and attempt.isdigit() and step in finished:
            entry = folder / name
            try:
                candidates.append((entry.stat().st_mtime, entry, step, int(attempt)))
            except FileNotFoundError:  # recycled by another process meanwhile
                continue
    candidates.sort(key=lambda c: c[0], reverse=True)
    return [entry for _, entry, step, attempt in candidates
            if entry.is_dir() and index_file(entry).is_file() and _finished(layout, fork, step, attempt, entry)]


def _finished(layout: ProjectLayout, fork: ForkLayout, step: str, attempt: int, folder: Path) -> bool:
    for state in ("completed", "failed"):
        path = fork.task_file(state, step)
        if not path.is_file():
            continue
        try:
            task = read_document(path, Task)
        except (ConductorError, OSError):
            return False
        if task.attempt != attempt or layout.root / task.workspace != folder:
            return False
        if fork.sidecar(state, step, VERDICT_SUFFIX).exists():
            return True  # verified (accepted or rejected): the executor had committed its result
        if state == "completed":
            return False  # not verified yet: the verifier still needs the folder
        try:
            result = read_document(fork.sidecar("failed", step, RESULT_SUFFIX), Result)
        except (ConductorError, OSError):
            return False
        # Failed by its executor's own word; a lease that ran out means the executor may still be there.
        return result.error is None or result.error.kind != "lease_expired"
    return False


def remove_plan_workspaces(layout: ProjectLayout, plan_id: str) -> int:
    """Remove every attempt folder of a plan (and their stat caches). Returns how many folders."""
    folder = layout.plan_scratch_dir(plan_id)
    if not folder.is_dir():
        return 0
    count = sum(1 for p in folder.glob("fork_*/*") if p.is_dir())
    settle()  # no stat cache of theirs is still being written
    shutil.rmtree(folder)
    return count
