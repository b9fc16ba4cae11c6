"""Claiming a task and holding its lease.

A claim is ``os.rename(pending/x, in_progress/x)``: exactly one claimer wins; the others get
``FileNotFoundError`` and move on. The winner then verifies the task (strict JSON, schema, checksum) and
writes ``in_progress/<step>.lease.json``. The lease's ``fencing_token`` is the task's ``attempt``.
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError

from conductor.canonical import compute_checksum, sha256_hex, strict_loads
from conductor.errors import (
    ChecksumMismatch,
    ConductorError,
    IntegrityError,
    InvalidDocument,
    LeaseLost,
)
from conductor.faults import crash_point
from conductor.fsutil import atomic_write, commit_temp, durable_rename, flocked, write_temp
from conductor.handoff.documents import (
    MAX_DOCUMENT_BYTES,
    parse_document,
    read_document,
    read_limited,
    reread,
    sealed_bytes,
    write_document,
)
from conductor.layout import ForkLayout
from conductor.models import ErrorInfo, ExecutorInfo, Lease, Result, Task, utc_now
from conductor.proc import process_start

M = TypeVar("M", Lease, Task)

EventSink = Callable[[str, dict[str, Any]], None]

HOST = socket.gethostname()


def _no_events(type_: str, data: dict[str, Any]) -> None:
    return None


def emit_all(on_event: EventSink, events: list[tuple[str, dict[str, Any]]]) -> None:
    """Send ``events`` to ``on_event`` in order. When the sink is the ``append`` of an object that also has
    ``append_many`` (an :class:`conductor.audit.AuditLog`, the engine's fork view), they go as one batch:
    one write and one fsync instead of one of each per event."""
    if not events:
        return
    owner = getattr(on_event, "__self__", None)
    many = getattr(owner, "append_many", None)
    if many is not None and getattr(on_event, "__name__", "") == "append":
        many(events)
        return
    for type_, data in events:
        on_event(type_, data)


@contextmanager
def fork_lock(fork: ForkLayout) -> Iterator[None]:
    """Hold the fork's lock file (cross-process, cross-thread) for a short critical section.

    Completion, renewal and reaping take it so that a reaper cannot re-queue a task while its holder
    is committing it. It is a plain ``flock(2)`` on ``fork_<id>/.lock`` (docs/protocol.md, 6.5): waiters
    sleep in the kernel and wake when it is released. Callers keep slow work (fsyncs of new files,
    killing processes) outside it.
    """
    with flocked(fork.dir / ".lock"):
        yield


def holder_name(kind: str) -> str:
    """An executor identity such as ``conductor-worker@host:1234``."""
    return f"{kind}@{HOST}:{os.getpid()}"


def _time_after(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Claim:
    """A task this process holds, with the lease that proves it.

    ``task_seen`` and ``lease_seen`` pair the ``task`` / ``lease`` objects with the exact bytes of their
    files as this process read or wrote them: while a file still holds those bytes, the fencing check
    need not parse it again (:func:`assert_holder`).
    """

    fork: ForkLayout
    task: Task
    lease: Lease
    task_seen: tuple[Task, bytes] | None = field(default=None, repr=False, compare=False)
    lease_seen: tuple[Lease, bytes] | None = field(default=None, repr=False, compare=False)

    @property
    def task_path(self) -> Path:
        return self.fork.task_file("in_progress", self.task.task_id)


def claim_task(
    fork: ForkLayout,
    task_id: str,
    *,
    holder: str,
    lease_seconds: float,
    on_event: EventSink = _no_events,
    pid: int | None = None,
    bounded_by_timeout: bool = False,
    contained: bool = False,
) -> Claim | None:
    """Try to claim ``task_id`` from ``pending/``.

    Args:
        pid: the lease's ``pid``: None = this process; 0 = no process, a lease held by time alone (the
            ``conductor task`` CLI: the reaper never treats it as a dead holder, only its ``expires_at``
            and the task's timeout count).
        contained: the work runs inside this process and starts no process (an in-process LLM executor):
            recorded as the lease's ``contained``, so a reaper that finds this process gone may give the
            attempt's folder to the retry.
        bounded_by_timeout: the lease never reaches past the claim plus the task's ``timeout_seconds``.

    Returns:
        The claim, or None when another executor won the race or the task file was rejected (a tampered
        or malformed task goes to ``failed/`` with a result whose ``error.kind`` is ``checksum_mismatch``
        or ``invalid_task``; it is never executed).
    """
    source = fork.task_file("pending", task_id)
    target = fork.task_file("in_progress", task_id)
    try:
        os.rename(source, target)
    except FileNotFoundError:
        return None
    crash_point("claim.after_rename")
    try:
        data = read_limited(target)
        task = parse_document(data, Task, source=target)
        _check_identity(fork, task_id, task)
    except IntegrityError as exc:
        reject_task_file(fork, task_id, target, exc, holder=holder, on_event=on_event)
        return None
    now = utc_now()
    lease = Lease(
        task_id=task_id,
        attempt=task.attempt,
        fencing_token=task.attempt,
        holder=holder,
        pid=os.getpid() if pid is None else pid,
        host=HOST,
        acquired_at=now,
        renewed_at=now,
        expires_at=_time_after(min(lease_seconds, task.timeout_seconds) if bounded_by_timeout else lease_seconds),
        contained=True if contained and pid is None else None,
    )
    lease, lease_data = _write_lease(fork, lease)
    crash_point("claim.after_lease")
    on_event("task.claimed", {"step_id": task_id, "attempt": task.attempt, "holder": holder, "pid": lease.pid, "host": HOST})
    return Claim(fork=fork, task=task, lease=lease, task_seen=(task, data), lease_seen=(lease, lease_data))


def _write_lease(fork: ForkLayout, lease: Lease) -> tuple[Lease, bytes]:
    """Seal and write a lease atomically; returns it with its bytes.

    Nothing is fsynced, neither the file nor the folder: a lease guards nothing across a power loss, whose
    reboot ends every holder on this host. What a power loss can leave — no lease, the one before, or a
    file of unwritten blocks that fails its checksum — every reader already takes as a lease that is
    lost: it expires ``lease_seconds`` after the claim (the task file's ctime; docs/protocol.md, 6.2),
    and a holder elsewhere still alive finds its fencing token stale at its next renewal or commit. While
    the machine runs, the rename keeps every write atomic for every reader.
    """
    sealed, data = sealed_bytes(lease)
    atomic_write(fork.lease_file(lease.task_id), data, sync_dir=False, sync_file=False)
    return Lease.model_validate(sealed), data


def _check_identity(fork: ForkLayout, task_id: str, task: Task) -> None:
    if (task.task_id, task.plan_id, task.fork_id) != (task_id, fork.plan_id, fork.fork_id):
        raise InvalidDocument(
            f"task file {task_id} names {task.plan_id}/{task.fork_id}/{task.task_id}, "
            f"but lies in {fork.plan_id}/{fork.fork_id}"
        )


def reject_task_file(
    fork: ForkLayout, task_id: str, path: Path, exc: ConductorError, *, holder: str, on_event: EventSink
) -> None:
    """Move an unreadable or tampered task file from ``path`` to ``failed/`` with a failure result.

    The result is written first and the task file moved last (the commit point), so a crash in between
    leaves the task where it was. Then ``task.rejected`` is appended through ``on_event``
    (:func:`rejection_event`): a tampered task is an integrity event the log must record.
    """
    kind = "checksum_mismatch" if isinstance(exc, ChecksumMismatch) else "invalid_task"
    attempt, seen_checksum = _salvage(path)
    now = utc_now()
    try:
        result = Result(
            task_id=task_id,
            plan_id=fork.plan_id,
            fork_id=fork.fork_id,
            attempt=attempt,
            fencing_token=attempt,
            task_checksum=seen_checksum,
            status="failed",
            executor=ExecutorInfo(id=holder, kind="conductor"),
            summary="task file rejected before execution",
            error=ErrorInfo(kind=kind, message=str(exc)),
            started_at=now,
            finished_at=now,
        )
    except ValidationError:
        result = None  # a file name no result can carry: the move alone records the rejection
    if result is not None:
        write_document(fork.sidecar("failed", task_id, ".result.json"), result)
    durable_rename(path, fork.task_file("failed", task_id))
    on_event("task.rejected", rejection_event(task_id, attempt, kind, str(exc), by=holder, task_checksum=seen_checksum))


def rejection_event(task_id: str, attempt: int, kind: str, message: str, *, by: str, task_checksum: str) -> dict[str, Any]:
    """The data of a ``task.rejected`` event: a claimer refused a task file unread (docs/protocol.md, 6.6).

    ``task_checksum`` is the checksum of the content the claimer read (the recomputed checksum if it
    parsed, else ``sha256:`` of its raw bytes), so ``conductor verify`` can tell that the rejected file
    still holds exactly what was rejected.
    """
    return {"step_id": task_id, "attempt": attempt, "kind": kind, "message": message, "by": by,
            "task_checksum": task_checksum}


def rejected_content_checksums(path: Path) -> set[str]:
    """The ``task_checksum`` values a rejection of the task file at ``path`` may record for its content
    now: Conductor's (the recomputed checksum if it parses, else ``sha256:`` of its raw bytes; see
    :func:`rejection_event`) and ``sha256:`` of the raw bytes, which external executors may use (6.6)."""
    return {_salvage(path)[1], "sha256:" + sha256_hex(_read_regular(path))}


def _salvage(path: Path) -> tuple[int, str]:
    """Best-effort attempt number and content checksum of a task file that failed validation.

    The file may be anything a hostile hand put there: it is opened without following symlinks and
    without blocking (a fifo), only a regular file is read, and at most the document size limit.
    """
    data = _read_regular(path)
    try:
        document = strict_loads(data)
    except InvalidDocument:
        document = None
    if not isinstance(document, dict):
        return 1, "sha256:" + sha256_hex(data)
    try:
        checksum = compute_checksum(document)
    except InvalidDocument:  # parses, but holds values JCS cannot express
        checksum = "sha256:" + sha256_hex(data)
    attempt = document.get("attempt")
    valid = isinstance(attempt, int) and not isinstance(attempt, bool) and 1 <= attempt <= MAX_SALVAGED_ATTEMPT
    return (attempt if valid else 1), checksum


MAX_SALVAGED_ATTEMPT = 2**31 - 1  # beyond it a failure result could not even be canonicalised


def _read_regular(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return b""  # a symlink, a directory or something gone: its name is all we keep
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return b""
        return os.read(fd, MAX_DOCUMENT_BYTES + 1)
    finally:
        os.close(fd)


def read_lease(fork: ForkLayout, task_id: str) -> Lease | None:
    """The lease of an in-progress task, or None if it has none (yet) or it is unreadable."""
    try:
        return read_document(fork.lease_file(task_id), Lease)
    except (FileNotFoundError, IntegrityError):
        return None


def assert_holder(claim: Claim) -> None:
    """Check, under the fork lock, that ``claim`` still holds its task (fencing check).

    A task or lease file that still holds exactly the bytes this process read or wrote is not parsed
    again; any other content is read strictly.

    Raises:
        LeaseLost: the task left ``in_progress/`` or was re-queued with a newer attempt.
        IntegrityError: the task file was altered (see :func:`conductor.handoff.documents.read_document`).
    """
    try:
        attempt = reread(claim.task_path, Task, _still(claim.task_seen, claim.task)).attempt
    except FileNotFoundError as exc:
        raise LeaseLost(f"{claim.task.task_id}: no longer in progress (reclaimed or finished)") from exc
    if attempt != claim.lease.fencing_token:
        raise LeaseLost(
            f"{claim.task.task_id}: fencing token {claim.lease.fencing_token} is stale (current attempt {attempt})"
        )
    try:
        lease = reread(claim.fork.lease_file(claim.task.task_id), Lease, _still(claim.lease_seen, claim.lease))
    except (FileNotFoundError, IntegrityError):
        return  # no lease (yet), or none readable: the task file decides
    if (lease.fencing_token, lease.holder) != (claim.lease.fencing_token, claim.lease.holder):
        raise LeaseLost(f"{claim.task.task_id}: lease now held by {lease.holder} (token {lease.fencing_token})")


def _still(seen: tuple[M, bytes] | None, model: M) -> tuple[M, bytes] | None:
    """``seen`` if it still pairs bytes with the claim's current object ``model``."""
    return seen if seen is not None and seen[0] is model else None


def renew_lease(claim: Claim, *, lease_seconds: float, pgid: int | None = None, contained: bool = False,
                not_after: datetime | None = None) -> Lease:
    """Extend the lease of ``claim`` by ``lease_seconds`` from now (the heartbeat).

    The new lease is written before the fork lock is taken; under the lock there is only the fencing check
    and the rename.

    Args:
        pgid: the process group the work now runs in (its leader must not have been reaped yet, so its
            id is not recycled): recorded with the leader's start identity (``pgid``, ``pgid_start``), so a
            reaper can kill the group if this process dies. Later renewals keep it.
        contained: with ``pgid``, every process of that group runs in a pid namespace that dies with this
            process (recorded as the lease's ``contained``: a reaper that finds this process gone may give
            the attempt's folder to the retry).
        not_after: the lease never reaches past this instant (a claim's deadline).

    Raises:
        LeaseLost: the task was reclaimed; the caller must stop working on it.
    """
    expires = datetime.now(UTC) + timedelta(seconds=lease_seconds)
    if not_after is not None:
        expires = min(expires, not_after)
    update: dict[str, Any] = {"renewed_at": utc_now(), "expires_at": expires.strftime("%Y-%m-%dT%H:%M:%S.%fZ")}
    if pgid is not None:
        update.update(pgid=pgid, pgid_start=process_start(pgid), contained=True if contained else None)
    path, base = claim.fork.lease_file(claim.task.task_id), claim.lease
    sealed, data = sealed_bytes(base.model_copy(update=update))
    temp = write_temp(path, data, sync=False)  # no fsync at all, as for every lease (see _write_lease)
    try:
        with fork_lock(claim.fork):
            assert_holder(claim)
            if claim.lease is not base:  # another thread of ours renewed meanwhile: keep what it recorded
                temp.unlink()
                sealed, data = sealed_bytes(claim.lease.model_copy(update=update))
                temp = write_temp(path, data, sync=False)
            commit_temp(temp, path)
            claim.lease = Lease.model_validate(sealed)
            claim.lease_seen = (claim.lease, data)
            crash_point("heartbeat.after_renew")
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return claim.lease


def workspace_marker(workspace: Path) -> str:
    """The environment entry ``CONDUCTOR_WORKSPACE=<absolute path>`` that marks every process of an attempt.

    A command executor starts its command with it and every descendant inherits it, so the reaper can
    still find the command's processes after they left its process group (docs/protocol.md, section 8).
    """
    return f"CONDUCTOR_WORKSPACE={workspace.resolve()}"
