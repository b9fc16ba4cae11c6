"""Returning tasks whose lease expired (or whose holder died) to ``pending/``.

Run by the engine and by every worker before it looks for work. A task whose lease has expired goes
back to ``pending/`` with ``attempt + 1`` (a new checksum); after ``max_attempts`` it goes to ``failed/``
with reason ``lease_expired``. A holder on this host whose process is gone is treated as expired at once,
so ``conductor resume`` after a kill -9 does not wait out the lease; the command such a holder left
running (the process group its lease records) is killed first.

A lease whose ``pid`` is 0 (``conductor task claim``) has no process: only its time counts. Every
external holder is also held to the step's ``timeout_seconds``: an attempt still held ``timeout_seconds``
+ ``lease_seconds`` after its claim is over whatever its lease says (the extra lease length lets an
executor that enforces the timeout itself, as ``conductor worker`` does, report it). Conductor's own
in-process executors (holder ``conductor-engine@…``) bound their own time and are exempt.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol, TypeVar, runtime_checkable

from conductor.errors import IntegrityError, StateConflict
from conductor.faults import crash_point
from conductor.fsutil import durable_rename, entry_names, rename_file
from conductor.handoff.documents import (
    parse_document,
    publish_documents,
    read_document,
    read_limited,
    reread,
    write_document,
)
from conductor.handoff.lease import (
    HOST,
    EventSink,
    _no_events,
    emit_all,
    fork_lock,
    reject_task_file,
    workspace_marker,
)
from conductor.layout import PARKED_SUFFIX, STATES, TASK_SUFFIX, ForkLayout
from conductor.models import (
    ErrorInfo,
    ExecutorInfo,
    Lease,
    Result,
    Task,
    parse_time,
    utc_now,
)
from conductor.proc import environ_snapshot, kill_orphans, pid_alive


M = TypeVar("M", Lease, Task)

ORPHAN_GRACE_SECONDS = 1.0  # SIGTERM → SIGKILL for a dead holder's command (done before the fork lock is taken)
ENGINE_HOLDER_PREFIX = "conductor-engine@"  # the engine's in-process executors: not held to timeout_seconds here
UNKNOWN_HOLDER = "unknown"  # task.lease_expired's holder when no readable lease names one


@runtime_checkable
class BatchPreparer(Protocol):
    """A ``prepare_retry`` that can also make retries' workspaces ahead of the fork lock, in the background.

    :func:`reap_expired` calls :meth:`prefetch` with the retries it expects to publish (it returns at
    once; a :class:`FolderTaker` also gets ``take=``, the steps whose old folder it may take over),
    :meth:`wait` for each before it takes the lock for it, then the preparer itself for each retry
    it does publish (under the lock: it hands over what was made ahead, or makes it then), then
    :meth:`sync` before it publishes the retries it prepared (the preparer's renames are made durable
    there, once for the batch), then :meth:`discard` for whatever was made and not used.
    """

    def __call__(self, task: Task) -> Task: ...

    def prefetch(self, tasks: list[Task]) -> None: ...

    def wait(self, task: Task) -> object: ...

    def sync(self) -> None: ...

    def discard(self) -> None: ...


@runtime_checkable
class FolderTaker(Protocol):
    """A ``prepare_retry`` that can also give a retry the folder of the attempt it replaces.

    :func:`reap_expired` calls :meth:`take_over` instead of the preparer itself for a retry whose old
    folder nobody can write any more: its holder died on this host, and its lease says every process of
    the work died with it (``Lease.contained``).
    """

    def __call__(self, task: Task) -> Task: ...

    def take_over(self, task: Task) -> Task: ...


def nobodys_folder(lease: Lease | None, reason: str | None) -> bool:
    """Whether an expired attempt's folder is nobody's: its holder died here (``reason`` is
    ``"holder_died"``) and its lease says everything of the work died with it (``contained``). A holder
    that is alive, elsewhere or unknown may still have something writing there."""
    return reason == "holder_died" and lease is not None and lease.contained is True


REQUEUE_BATCH = 16
"""Expired tasks handled under one hold of the fork lock: their events share one write and one fsync of the
audit log, their retries' task files one fsync of ``pending/`` (a crash leaves hundreds to re-queue)."""


@dataclass(frozen=True)
class Reaped:
    task_id: str
    attempt: int
    outcome: str  # "requeued" | "failed"
    holder: str | None
    killed: tuple[int, ...] = ()  # pids of the dead holder's command that were killed
    reason: str = ""  # why the lease was over (see expiry_reason)


def lease_expired(lease: Lease | None, *, task_mtime: float, now: datetime, lease_seconds: float) -> bool:
    """Is a lease over? A task without a readable lease gets ``lease_seconds`` from its claim (ctime).
    (The step's timeout is not considered here: see :func:`expiry_reason`.)"""
    return expiry_reason(lease, claimed_at=task_mtime, now=now, lease_seconds=lease_seconds) is not None


def expiry_reason(
    lease: Lease | None,
    *,
    claimed_at: float,
    now: datetime,
    lease_seconds: float,
    timeout_seconds: Callable[[], int | None] = lambda: None,
) -> str | None:
    """Why a lease is over, or None while it holds.

    Args:
        claimed_at: the claim's time (epoch seconds): the task file's ctime, which the claim's rename set.
        timeout_seconds: the task's ``timeout_seconds`` (None if unknown); called only when it can matter.

    Returns:
        ``"no_lease"`` (none readable, ``lease_seconds`` after the claim), ``"holder_died"`` (its pid on this
        host is gone), ``"timeout"`` (past the step's timeout: ``expires_at`` reached at or after it, or
        ``timeout_seconds`` + ``lease_seconds`` after the claim whatever ``expires_at`` says),
        ``"not_renewed"`` (``expires_at`` reached), or None.
    """
    elapsed = now.timestamp() - claimed_at
    if lease is None:
        return "no_lease" if elapsed > lease_seconds else None
    if lease.host == HOST and lease.pid > 0 and lease.pid != os.getpid() and not pid_alive(lease.pid):
        return "holder_died"
    expired = parse_time(lease.expires_at) <= now
    try:  # the earlier of the rename and the lease's own word: neither can push the deadline out
        elapsed = max(elapsed, now.timestamp() - parse_time(lease.acquired_at).timestamp())
    except ValueError:
        pass
    if lease.holder.startswith(ENGINE_HOLDER_PREFIX) or (not expired and elapsed <= lease_seconds):
        return "not_renewed" if expired else None
    timeout = timeout_seconds()
    if timeout is not None and elapsed >= timeout + (0 if expired else lease_seconds):
        return "timeout"
    return "not_renewed" if expired else None


def reap_expired(
    fork: ForkLayout,
    *,
    max_attempts: int,
    lease_seconds: float,
    now: datetime | None = None,
    on_event: EventSink = _no_events,
    prepare_retry: Callable[[Task], Task] | None = None,
) -> list[Reaped]:
    """Re-queue or fail every in-progress task of ``fork`` whose lease is over.

    ``in_progress/`` is listed once; a lease that is not over costs a stat and a read, without the fork
    lock. Only a task whose lease looks over is looked at again under the lock, and the command a dead
    holder left running is killed before the lock is taken (that takes up to a second).

    Args:
        prepare_retry: called with the re-queued task (attempt already incremented) before it is
            published; returns the task to publish (Conductor uses it to give the retry a fresh copy of
            the step's base workspace).

    Returns:
        What was done, one entry per reaped task.
    """
    now = now or datetime.now(UTC)
    names = entry_names(fork.state_dir("in_progress"))
    if any(name.endswith(TASK_SUFFIX + PARKED_SUFFIX) for name in names):
        finish_parked(fork, prepare_retry=prepare_retry, on_event=on_event)
    looks = []
    with environ_snapshot():  # many dead holders after a crash: /proc is read once for all their leftovers
        for task_id in sorted(name[: -len(TASK_SUFFIX)] for name in names if name.endswith(TASK_SUFFIX)):
            look = _look(fork, task_id, now=now, lease_seconds=lease_seconds)
            if look is not None:
                looks.append((task_id, look))
    batch = prepare_retry if isinstance(prepare_retry, BatchPreparer) and looks else None
    retries = {task_id: look.task.model_copy(update={"attempt": look.task.attempt + 1}) for task_id, look in looks
               if look.task is not None and look.task.attempt < (look.task.max_attempts or max_attempts)}
    if batch is not None:  # folders made in the background, before the lock is taken for each
        # A dead holder's folder that nobody can write (as things look now) is taken over, not checked out.
        taker = isinstance(batch, FolderTaker)
        take = [task_id for task_id, look in looks if taker and nobodys_folder(look.lease, look.reason)]
        if take:
            batch.prefetch(list(retries.values()), take=take)
        else:  # (a preparer that takes no folder over need not know the argument)
            batch.prefetch(list(retries.values()))
    reaped: list[Reaped] = []
    try:
        for start in range(0, len(looks), REQUEUE_BATCH):
            chunk = looks[start:start + REQUEUE_BATCH]
            if batch is not None:
                for task_id, _ in chunk:
                    if task_id in retries:
                        batch.wait(retries[task_id])
            with fork_lock(fork):
                reaped.extend(_reap_batch(
                    fork, chunk, now=now, max_attempts=max_attempts, lease_seconds=lease_seconds,
                    on_event=on_event, prepare_retry=prepare_retry,
                ))
    finally:
        if batch is not None:
            batch.discard()
    return reaped


@dataclass(frozen=True)
class _Look:
    """An unlocked first look at an in-progress task whose lease seemed over."""

    lease: Lease | None
    task: Task | None  # None if the task file was unreadable
    killed: tuple[int, ...]  # the dead holder's command, killed already
    reason: str = ""  # why the lease looked over (see expiry_reason)
    # The parsed files with the exact bytes they were read from (None: absent or unreadable)
    lease_seen: tuple[Lease, bytes] | None = None
    task_seen: tuple[Task, bytes] | None = None

    @property
    def workspace(self) -> str | None:
        return self.task.workspace if self.task is not None else None


def _look(fork: ForkLayout, task_id: str, *, now: datetime, lease_seconds: float) -> _Look | None:
    path = fork.task_file("in_progress", task_id)
    try:
        ctime = path.stat().st_ctime
    except FileNotFoundError:
        return None  # completed meanwhile
    try:
        lease_seen = _read(fork.lease_file(task_id), Lease)
    except FileNotFoundError:
        lease_seen = None
    lease = lease_seen[0] if lease_seen else None
    reason = _reason(path, lease, ctime, now=now, lease_seconds=lease_seconds)
    if reason is None:
        return None
    try:
        task_seen = _read(path, Task)
    except FileNotFoundError:
        return None  # completed meanwhile
    task = task_seen[0] if task_seen else None
    return _Look(lease, task, tuple(kill_orphaned_command(fork, lease, workspace=task.workspace if task else None)),
                 reason, lease_seen, task_seen)


def _read(path: Path, model: type[M]) -> tuple[M, bytes] | None:
    """A document and its exact bytes, or None if it is unreadable.

    Raises:
        FileNotFoundError: it is gone.
    """
    try:
        data = read_limited(path)
        return parse_document(data, model, source=path), data
    except IntegrityError:
        return None


def _reap_batch(
    fork: ForkLayout,
    looks: list[tuple[str, _Look]],
    *,
    now: datetime,
    max_attempts: int,
    lease_seconds: float,
    on_event: EventSink,
    prepare_retry: Callable[[Task], Task] | None,
) -> list[Reaped]:
    """Reap the looked-at tasks whose lease is still over now, under the fork lock; in ``looks`` order."""
    done: dict[str, Reaped] = {}
    expired: list[tuple[str, dict[str, object]]] = []
    requeue: list[tuple[Task, Reaped]] = []
    free: set[str] = set()  # the tasks whose old folder is nobody's (nobodys_folder)
    for task_id, look in looks:
        path = fork.task_file("in_progress", task_id)
        try:
            ctime = path.stat().st_ctime
        except FileNotFoundError:
            continue  # completed meanwhile
        try:
            lease = reread(fork.lease_file(task_id), Lease, look.lease_seen)
        except (FileNotFoundError, IntegrityError):
            lease = None  # as read_lease
        reason = _reason(path, lease, ctime, now=now, lease_seconds=lease_seconds)
        if reason is None:
            continue
        try:
            task = reread(path, Task, look.task_seen)
        except FileNotFoundError:
            continue  # completed meanwhile
        except IntegrityError as exc:
            killed = _killed(fork, look, lease, None)
            reject_task_file(fork, task_id, path, exc, holder="conductor-reaper", on_event=on_event)
            done[task_id] = Reaped(task_id, 0, "failed", lease.holder if lease else None, killed, reason)
            continue
        holder = lease.holder if lease else None
        killed = _killed(fork, look, lease, task.workspace)
        data: dict[str, object] = {"step_id": task_id, "attempt": task.attempt, "holder": holder or UNKNOWN_HOLDER,
                                   "reason": reason}
        if killed:
            data["killed"] = list(killed)
        if task.attempt >= (task.max_attempts or max_attempts):  # the step's own budget (policy), shared with repairs
            on_event("task.lease_expired", data)
            crash_point("reaper.after_expired_event")
            _fail_exhausted(fork, task, holder, on_event, reason=reason)
            done[task_id] = Reaped(task_id, task.attempt, "failed", holder, killed, reason)
        else:
            expired.append(("task.lease_expired", data))
            requeue.append((task, Reaped(task_id, task.attempt, "requeued", holder, killed, reason)))
            if nobodys_folder(lease, reason):
                free.add(task_id)
    emit_all(on_event, expired)
    for _ in expired:
        crash_point("reaper.after_expired_event")
    if requeue:
        taken = prepare_retry.take_over if isinstance(prepare_retry, FolderTaker) else None
        requeue_tasks(fork, [task for task, _ in requeue], prepare_retry=prepare_retry, on_event=on_event,
                      reason="lease_expired", take_over=taken, free=free)
        done.update((entry.task_id, entry) for _, entry in requeue)
    return [done[task_id] for task_id, _ in looks if task_id in done]


def _reason(path: Path, lease: Lease | None, ctime: float, *, now: datetime, lease_seconds: float) -> str | None:
    return expiry_reason(lease, claimed_at=ctime, now=now, lease_seconds=lease_seconds,
                         timeout_seconds=lambda: _task_timeout(path))


_timeouts: dict[tuple[str, int, int, int], int] = {}  # (path, inode, ctime_ns, size) -> timeout_seconds


def _task_timeout(path: Path) -> int | None:
    """The ``timeout_seconds`` of the task file at ``path`` (None if unreadable); a task held past its
    lease length is read once per pass, so the value is kept while the file is unchanged."""
    try:
        info = path.stat()
        key = (str(path), info.st_ino, info.st_ctime_ns, info.st_size)
        if key not in _timeouts:
            if len(_timeouts) > 4096:
                _timeouts.clear()
            _timeouts[key] = read_document(path, Task).timeout_seconds
        return _timeouts[key]
    except (FileNotFoundError, IntegrityError):
        return None


def _killed(fork: ForkLayout, look: _Look, lease: Lease | None, workspace: str | None) -> tuple[int, ...]:
    """What the first look killed, or, if the lease or task changed since, what killing now finds."""
    if lease == look.lease and workspace == look.workspace:
        return look.killed
    return tuple(kill_orphaned_command(fork, lease, workspace=workspace))


def kill_orphaned_command(fork: ForkLayout, lease: Lease | None, *, workspace: str | None) -> list[int]:
    """Kill the command a dead holder on this host left running; returns the pids signalled.

    Acts only when ``lease`` names this host and a holder pid that is not ours and no longer exists: a
    live holder stops its own command when it finds its lease lost, and another host's processes are out
    of reach (their pids mean nothing here). Then it kills the lease's process group if it is proven to
    be the recorded one (``pgid_start``, or a member carrying the attempt's ``CONDUCTOR_WORKSPACE``), and
    every process carrying that marker (children that left the group); see ``conductor.proc.kill_orphans``.

    Args:
        workspace: the task's ``workspace`` (relative to the project root), or None if the task file is
            unreadable (then only a group proven by ``pgid_start`` is killed).
    """
    if lease is None or lease.host != HOST or lease.pid <= 0 or lease.pid == os.getpid() or pid_alive(lease.pid):
        return []  # (pid 0: a lease held by time alone has no process to kill)
    marker = workspace_marker(fork.project.root / workspace) if workspace is not None else None
    if lease.pgid is None and marker is None:
        return []
    return kill_orphans(lease.pgid, leader_start=lease.pgid_start, marker=marker, grace_seconds=ORPHAN_GRACE_SECONDS)


def requeue_task(
    fork: ForkLayout,
    task: Task,
    *,
    prepare_retry: Callable[[Task], Task] | None,
    on_event: EventSink,
    reason: str,
) -> Task:
    """Put an in-progress task back into ``pending/`` as attempt + 1 (call under the fork lock).

    The in-progress file is first parked as ``<step>.task.json.requeue`` (a name no claimer lists), so a
    claim of the retry can never land on, or be removed with, the old attempt's file. A crash after
    parking is finished by the next reap (``finish_parked``).

    Returns:
        The published retry (or the one a crashed requeue had already published).

    Raises:
        StateConflict: a different task file with this name is already pending.
    """
    return requeue_tasks(fork, [task], prepare_retry=prepare_retry, on_event=on_event, reason=reason)[0]


def requeue_tasks(
    fork: ForkLayout,
    tasks: list[Task],
    *,
    prepare_retry: Callable[[Task], Task] | None,
    on_event: EventSink,
    reason: str,
    take_over: Callable[[Task], Task] | None = None,
    free: Collection[str] = (),
) -> list[Task]:
    """:func:`requeue_task` for several tasks at once (call under the fork lock), with each kind of fsync
    made once for all of them: the retries' files are written, fsynced and linked into ``pending/`` as a
    batch, and their ``task.published`` events go to the log as one write. Each retry is still durable
    before it is visible, and logged after it is durable.

    ``take_over`` (:meth:`FolderTaker.take_over`) prepares the retry of each task named in ``free``
    (whose old folder is nobody's) instead of ``prepare_retry``.

    Returns:
        The published retries, in the order of ``tasks``.

    Raises:
        StateConflict: a different task file with one of these names is already pending (the others are
            re-queued; that one stays parked).
    """
    parked: list[Path] = []
    for task in tasks:
        in_progress = fork.task_file("in_progress", task.task_id)
        parked.append(in_progress.with_name(in_progress.name + PARKED_SUFFIX))
        # Not fsynced: after a power loss either name is recovered (a parked file is finished by the next
        # reap, an old attempt beside its published retry is a duplicate whose higher attempt wins), and
        # no holder of the old attempt outlives the reboot to commit it.
        rename_file(in_progress, parked[-1])
        crash_point("reaper.after_park")
        fork.lease_file(task.task_id).unlink(missing_ok=True)
    retries, conflicts = _publish_retries(fork, tasks, prepare_retry=prepare_retry, on_event=on_event,
                                          reason=reason, take_over=take_over, free=free)
    for task, parked_file in zip(tasks, parked, strict=True):
        if task.task_id not in conflicts:
            crash_point("reaper.before_unpark")
            parked_file.unlink()
    if conflicts:
        raise StateConflict("; ".join(conflicts.values()))
    return [retry for retry in retries if retry is not None]


def _publish_retries(
    fork: ForkLayout, tasks: list[Task], *, prepare_retry: Callable[[Task], Task] | None, on_event: EventSink,
    reason: str, take_over: Callable[[Task], Task] | None = None, free: Collection[str] = (),
) -> tuple[list[Task | None], dict[str, str]]:
    """Publish the retry of each task (or find the one a crashed requeue published); returns the retries
    (None where there is a conflict) and the conflicts, by task id."""
    retries: list[Task | None] = [None] * len(tasks)
    conflicts: dict[str, str] = {}
    new: list[tuple[int, Task]] = []
    for index, task in enumerate(tasks):
        try:
            retries[index] = _published_already(fork, task)
        except StateConflict as exc:
            conflicts[task.task_id] = str(exc)
            continue
        if retries[index] is None:
            retry = task.model_copy(update={"attempt": task.attempt + 1, "created_at": utc_now()})
            prepare = take_over if take_over is not None and task.task_id in free else prepare_retry
            new.append((index, prepare(retry) if prepare is not None else retry))
    if isinstance(prepare_retry, BatchPreparer):
        prepare_retry.sync()
    published = publish_documents([(fork.task_file("pending", retry.task_id), retry) for _, retry in new])
    events: list[tuple[str, dict[str, object]]] = []
    for (index, retry), result in zip(new, published, strict=True):
        if isinstance(result, FileExistsError):
            conflicts[retry.task_id] = f"{retry.task_id}: another task file appeared in pending/ during its re-queue"
            continue
        crash_point("reaper.after_republish")
        retries[index] = result
        events.append(("task.published", {"step_id": retry.task_id, "attempt": result.attempt,
                                          "checksum": result.checksum, "reason": reason}))
    emit_all(on_event, events)
    return retries, conflicts


def _published_already(fork: ForkLayout, task: Task) -> Task | None:
    """The retry a requeue that crashed after publishing left (None if there is none).

    Raises:
        StateConflict: the task file found there is unreadable or not a later attempt.
    """
    found = next(((state, fork.task_file(state, task.task_id)) for state in STATES
                  if fork.task_file(state, task.task_id).exists()), None)
    if found is None:
        return None
    try:
        existing = read_document(found[1], Task)
    except (IntegrityError, FileNotFoundError) as exc:
        raise StateConflict(f"{task.task_id}: re-queued, but {found[0]}/ holds an unreadable task") from exc
    if existing.attempt > task.attempt:
        return existing
    raise StateConflict(f"{task.task_id}: re-queued attempt {task.attempt}, but {found[0]}/ holds attempt "
                        f"{existing.attempt}")


def finish_parked(
    fork: ForkLayout, *, prepare_retry: Callable[[Task], Task] | None, on_event: EventSink
) -> list[str]:
    """Finish requeues a crash interrupted (parked files left in ``in_progress/``); returns their ids."""
    finished = []
    folder = fork.state_dir("in_progress")
    for parked in sorted(folder.glob(f"*.task.json{PARKED_SUFFIX}")) if folder.is_dir() else []:
        with fork_lock(fork):
            if not parked.exists():
                continue
            task = read_document(parked, Task)
            _, conflicts = _publish_retries(fork, [task], prepare_retry=prepare_retry, on_event=on_event,
                                            reason="recovered")
            if conflicts:
                raise StateConflict(conflicts[task.task_id])
            parked.unlink()
            finished.append(task.task_id)
    return finished


def _fail_exhausted(fork: ForkLayout, task: Task, holder: str | None, on_event: EventSink, *,
                    reason: str = "not_renewed") -> None:
    now = utc_now()
    if reason == "timeout":
        message = f"attempt {task.attempt} of {task.attempt} ran past its timeout of {task.timeout_seconds} s; no attempts left"
    else:
        message = f"lease expired ({reason}) on attempt {task.attempt} of {task.attempt}; no attempts left"
    result = Result(
        task_id=task.task_id,
        plan_id=task.plan_id,
        fork_id=task.fork_id,
        attempt=task.attempt,
        fencing_token=task.attempt,
        task_checksum=task.checksum or "",
        status="failed",
        executor=ExecutorInfo(id=holder or "unknown", kind="unknown"),
        summary="the attempt ran past its timeout" if reason == "timeout" else "the executor stopped renewing its lease",
        error=ErrorInfo(kind="lease_expired", message=message),
        started_at=now,
        finished_at=now,
    )
    write_document(fork.sidecar("failed", task.task_id, ".result.json"), result)
    durable_rename(fork.task_file("in_progress", task.task_id), fork.task_file("failed", task.task_id))
    fork.lease_file(task.task_id).unlink(missing_ok=True)
    on_event("task.failed", {"step_id": task.task_id, "attempt": task.attempt, "reason": "lease_expired", "message": message})
