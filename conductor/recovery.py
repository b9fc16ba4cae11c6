"""Recovery on start: repair what a crash, a ``kill -9`` or a full disk can leave in a project's files.

:func:`recover_project` runs at the start of every command that runs a plan (``explore``, ``build``,
``resume``: ``conductor.runtime``) and of ``conductor worker``. It is safe while other Conductor processes
work on the same project: a fork's repairs run under the fork lock, a log's torn-tail repair under the
log's append lock, and neither a live lease nor a live writer's temp file is ever touched. Repairs that
race with the engine's own unlocked steps (publishing attempt 1, verifying, applying) need
``exclusive=True``, which only the plan's engine passes (``run_plan``).

What a crash can leave, and what recovery does (the order of the passes):

1. A torn last line in an ``audit.log`` (a write cut short): the bytes after the last newline are saved as
   ``audit.log.torn-<time>`` and cut off; ``recovery.audit_truncated`` records their size and SHA-256.
2. Temp files ``.tmp.<name>.<pid>.<random>`` (:mod:`conductor.fsutil`) whose writer is gone — its pid is
   not alive on this host — are removed; a temp without a pid in its name, or with this process's own pid
   (a previous process that had it), once it is ``grace_seconds`` old. A temp is never a commit point, so
   even removing a live writer's temp on another host sharing the folder (whose pid means nothing here)
   costs at most a retry of that write.
3. A task file in two state folders: the copy whose completion is committed (in ``completed/`` or
   ``failed/`` with a result naming its attempt) wins, else the highest attempt, then the most advanced
   folder (``failed`` > ``completed`` > ``in_progress`` > ``pending``); the others are quarantined.
4. (exclusive) A rejection the verifier did not finish (its verdict in ``failed/``, the task still in
   ``completed/``): the decided rejection is finished (sidecars, then the task, moved to ``failed/``); the
   engine then logs the verdict it finds.
5. Sidecars (result, explanation, provenance, verdict, attestation) in ``completed/`` or ``failed/``
   without their task file there: the completion was never committed (the task move is the commit
   point), so they are quarantined and the task stays where it is (its lease runs out and it is retried).
6. A lease without its task in ``in_progress/`` whose holder is dead or whose time is up: removed.
7. A task file whose attempt has no ``task.published`` event (a crash between the publish and its event):
   the event is restored (``reason: "recovered"``) — for attempts > 1 always (the reaper publishes them
   under the fork lock), for attempt 1 only with ``exclusive``. (exclusive) A ``step.verified`` without
   the ``step.merged`` or ``task.failed`` that follows it: restored from the verdict file.
8. (exclusive) ``plan.json`` without ``plan.created``: the event is restored from the file.
9. (exclusive) An interrupted apply of the winner (``apply.intent.json`` left by
   :func:`conductor.ranking.apply_winner`): finished from the intent, idempotently.
10. Temp folders a crash left while checking out an attempt workspace (``.tmp.<step>.a<n>.<pid>.<random>``
    beside the attempt folders). Attempt folders themselves hold the agent's files and are never swept:
    what an attempt changed is captured into ``.conductor/git`` by the verifier, so a stray file there is
    never applied unless it passed verification.

Then the log and the folders must agree — every task file at least at its last published attempt, every
``task.completed`` / ``task.failed`` / ``step.merged`` event matched by its task file's folder — or
:class:`~conductor.errors.StateConflict` names each disagreement (file and event seq) and nothing is
guessed. Quarantined files go to ``fork_<id>/quarantine/<UTC time>.<reason>.<state>.<name>``; nothing is
deleted but temp files and dead leases. Every repair is an audit event (``recovery.repaired``
``{what, path, detail}`` in the fork's log, or the plan's log for plan- and project-level repairs).

Self-repair (``conductor.repair``) moves a failed attempt's files to ``fork_<id>/attempts/``, no state
folder; a crash in the middle leaves the task in ``failed/`` or archived with no retry out yet, which the
engine's next pass finishes: the agreement check takes the outcome events of an archived or superseded
attempt as history.

Cost: each log is parsed once per process (:meth:`conductor.audit.AuditLog.events` reads only what was
appended since), each state folder is listed once per pass, and a task file is read only when the log
does not account for it: a file in ``completed/`` or ``failed/`` whose step's last published attempt has a
completion, failure or verdict event is taken to hold that attempt (nothing a crash leaves can change a
finished step's file; ``conductor verify`` is the check against tampering). So a recovery reads the
in-flight tasks and whatever needs repair, not the plan's history.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from conductor.attempts import state_store
from conductor.audit import AuditLog, repair_torn_tail
from conductor.canonical import check_checksum, strict_loads
from conductor.config import DEFAULT_WORKSPACE_IGNORE
from conductor.errors import ChecksumMismatch, GitError, IntegrityError, MergeConflict, StateConflict
from conductor.fsutil import TEMP_NAME, TEMP_PREFIX, durable_rename, entry_names, fsync_dir, remove_durably
from conductor.handoff.documents import read_document, read_limited
from conductor.handoff.lease import HOST, fork_lock
from conductor.proc import pid_alive
from conductor.layout import (
    ATTESTATION_SUFFIX,
    EXPLANATION_SUFFIX,
    LEASE_SUFFIX,
    PARKED_SUFFIX,
    PROVENANCE_SUFFIX,
    RESULT_SUFFIX,
    STATES,
    TASK_SUFFIX,
    VERDICT_SUFFIX,
    ForkLayout,
    ProjectLayout,
)
from conductor.models import Event, FileChange, Lease, Result, Task, Verdict, parse_time, utc_now
from conductor.plan_store import plan_log, read_plan_file
from conductor.ranking import APPLY_INTENT_SCHEMA, apply_intent_file, finish_apply
from conductor.repair import ARCHIVE_DIR, archive_name

TEMP_GRACE_SECONDS = 60.0
"""A temp file this old is abandoned whoever wrote it (a durable write takes milliseconds)."""
QUARANTINE = "quarantine"
SIDECARS = (RESULT_SUFFIX, EXPLANATION_SUFFIX, PROVENANCE_SUFFIX, VERDICT_SUFFIX, ATTESTATION_SUFFIX)
_ADVANCE = {"pending": 0, "in_progress": 1, "completed": 2, "failed": 3}


@dataclass(frozen=True)
class Repair:
    """One thing recovery repaired.

    Attributes:
        what: the kind, e.g. ``temp_removed``, ``duplicate_quarantined``, ``uncommitted_quarantined``,
            ``lease_removed``, ``rejection_finished``, ``event_restored``, ``apply_finished``,
            ``audit_truncated``.
        path: the file concerned, relative to the project root (POSIX).
        detail: one line for people.
    """

    what: str
    path: str
    detail: str

    def to_data(self) -> dict[str, str]:
        return {"what": self.what, "path": self.path, "detail": self.detail}


@dataclass
class RecoveryReport:
    """Every repair of one recovery pass, in the order made (empty when nothing needed repair)."""

    repairs: list[Repair] = field(default_factory=list)

    def lines(self) -> list[str]:
        """One line per repair, for the CLI: ``<what>: <path>: <detail>``."""
        return [f"{r.what}: {r.path}: {r.detail}" for r in self.repairs]


def recover_project(
    layout: ProjectLayout,
    *,
    plan_id: str | None = None,
    exclusive: bool = False,
    grace_seconds: float = TEMP_GRACE_SECONDS,
    ignore: Sequence[str] = DEFAULT_WORKSPACE_IGNORE,
) -> RecoveryReport:
    """Repair what a crash left in the project (see the module docstring for the list).

    Args:
        layout: the project.
        plan_id: only this plan (and the project-wide folders); None = every unfinished plan (and the
            torn tails of every plan's logs, which any later append would trip over).
        exclusive: the caller is the plan's only engine and nothing of it runs yet: also make the repairs
            that race with a live engine (passes 4, 8, 9, 10 and attempt-1 events of pass 7).
        grace_seconds: age after which a temp file without another live writer's pid is abandoned.
        ignore: ``config.yaml``'s ``workspace.ignore`` (for the workspace snapshot of a restored
            ``step.merged`` event).

    Returns:
        The repairs made, each also recorded as an audit event.

    Raises:
        StateConflict: the log and the folders disagree in a way no crash explains (each disagreement is
            named with its file and event seq), or an interrupted apply cannot be finished.
        AuditChainError: a log is damaged other than by a torn last line (that is left for people).
        StorageError: a repair's write failed.
    """
    job = _Recovery(layout, exclusive=exclusive, grace_seconds=grace_seconds, ignore=ignore)
    if not layout.handoff_dir.is_dir():
        return job.report
    known = layout.plan_ids()
    plans = known if plan_id is None else [plan_id] if plan_id in known else []  # an unknown id: the caller says so
    for each in plans:
        job.repair_torn_logs(each)
    for each in plans:
        if plan_id is not None or not _finished(layout, each):
            job.recover_plan(each)
    job.sweep_project(log=plan_log(layout, plans[-1]) if plans else None)
    return job.report


def recover_fork(
    fork: ForkLayout, *, exclusive: bool = False, grace_seconds: float = TEMP_GRACE_SECONDS,
    ignore: Sequence[str] = DEFAULT_WORKSPACE_IGNORE,
) -> list[Repair]:
    """Passes 1–7 and the consistency check for one fork (see :func:`recover_project`).

    Returns:
        The repairs made in this fork.

    Raises:
        StateConflict: the fork's log and folders disagree (each disagreement named).
    """
    job = _Recovery(fork.project, exclusive=exclusive, grace_seconds=grace_seconds, ignore=ignore)
    _repair_torn(job, AuditLog(fork.audit_log))
    job.recover_fork(fork)
    return job.report.repairs


def sweep_fork_leftovers(fork: ForkLayout, log: AuditLog, *, grace_seconds: float = TEMP_GRACE_SECONDS) -> list[Repair]:
    """Passes 2 and 6 alone, for one fork while a plan runs: remove the temp files of the fork's folders (and
    of its attempt folders' parent) whose writer is gone, and the leases of tasks no longer in progress
    whose holder is gone or whose time is up (a worker killed mid-write or between its task's move and its
    lease's removal leaves them; nothing else would until the next start), each recorded as
    ``recovery.repaired`` (``temp_removed``, ``lease_removed``).

    Returns:
        What was removed (temp files, then dead leases), one repair each.
    """
    job = _Recovery(fork.project, exclusive=False, grace_seconds=grace_seconds, ignore=DEFAULT_WORKSPACE_IGNORE)
    if fork.dir.is_dir():
        job.sweep(fork.dir, log)
        for state in STATES:
            job.sweep(fork.state_dir(state), log)
    # and beside the fork's attempt folders (a checkout's or capture's temp index, a folder made ahead)
    job.sweep(fork.project.fork_scratch_dir(fork.plan_id, fork.fork_id), log)
    if fork.state_dir("in_progress").is_dir():
        with fork_lock(fork):  # pass 6 too: a worker killed between its task's move and its lease's removal
            job._remove_dead_leases(fork, log)
    return job.report.repairs


def _finished(layout: ProjectLayout, plan_id: str) -> bool:
    return any(e.type == "plan.finished" for e in plan_log(layout, plan_id).events())




def _stamp() -> str:
    return utc_now().replace("-", "").replace(":", "").replace(".", "")


def _repair_torn(job: _Recovery, log: AuditLog) -> None:
    torn = repair_torn_tail(log.path)
    if torn is None:
        return
    saved = job.relative(torn.saved_as)
    log.append("recovery.audit_truncated", {"bytes": torn.size, "sha256": torn.sha256, "saved_as": saved})
    job.report.repairs.append(Repair("audit_truncated", job.relative(log.path),
                                     f"cut {torn.size} torn byte(s) (sha256 {torn.sha256}), saved as {saved}"))


class _Recovery:
    """One recovery pass: the settings, the report, and the passes of the module docstring."""

    def __init__(
        self, layout: ProjectLayout, *, exclusive: bool, grace_seconds: float, ignore: Sequence[str]
    ) -> None:
        self.layout, self.exclusive, self.grace_seconds = layout, exclusive, grace_seconds
        self.ignore = list(ignore)
        self.now = time.time()
        self.report = RecoveryReport()
        self.swept: set[Path] = set()  # state folders swept already: the project-wide sweep skips them

    # --- bookkeeping ----------------------------------------------------------------------------

    def relative(self, path: Path) -> str:
        try:
            return path.relative_to(self.layout.root).as_posix()
        except ValueError:
            return str(path)

    def record(self, log: AuditLog | None, what: str, path: Path, detail: str) -> None:
        repair = Repair(what, self.relative(path), detail)
        self.report.repairs.append(repair)
        if log is not None:
            log.append("recovery.repaired", repair.to_data())

    def quarantine(self, fork: ForkLayout, path: Path, reason: str, log: AuditLog, detail: str) -> None:
        folder = fork.dir / QUARANTINE
        if not folder.is_dir():
            folder.mkdir()
            fsync_dir(fork.dir)
        target = folder / f"{_stamp()}.{reason}.{path.parent.name}.{path.name}"
        try:
            durable_rename(path, target)
        except FileNotFoundError:
            return  # moved on by a live process meanwhile: not ours to keep
        self.record(log, f"{reason}_quarantined", path, f"{detail}; moved to {self.relative(target)}")

    # --- pass 1 and the plan --------------------------------------------------------------------

    def repair_torn_logs(self, plan_id: str) -> None:
        _repair_torn(self, plan_log(self.layout, plan_id))
        for folder in sorted(self.layout.plan_dir(plan_id).glob("fork_*")):
            _repair_torn(self, AuditLog(folder / "audit.log"))

    def recover_plan(self, plan_id: str) -> None:
        plan_dir, log = self.layout.plan_dir(plan_id), plan_log(self.layout, plan_id)
        self.sweep(plan_dir, log)
        scratch = self.layout.plan_scratch_dir(plan_id)
        self.sweep(scratch, log)
        for folder in sorted(plan_dir.glob("fork_*")):
            fork = self.layout.fork(plan_id, folder.name[len("fork_"):])
            self.recover_fork(fork)
            self.sweep(scratch / folder.name, AuditLog(fork.audit_log))
        if self.exclusive:
            self._restore_plan_created(plan_id, log)
            self._finish_apply(plan_id, log)

    def sweep_project(self, *, log: AuditLog | None) -> None:
        """Pass 2 over ``.conductor/`` (every plan folder, checkpoints, recordings, keys...); attempt
        folders have their own sweep, and ``.conductor/git`` is git's (it cleans its own temp objects)."""
        conductor = self.layout.conductor_dir
        skip = {conductor / "git", self.layout.scratch_root, conductor / "checkouts"} | self.swept
        self.sweep(conductor, log, recursive=True, may_descend=lambda path: path not in skip)
        self.sweep(conductor / "git" / "info", log)  # the exclude file Conductor writes there (fsutil)

    # --- pass 2: temp files ---------------------------------------------------------------------

    def stale_temp(self, entry: os.DirEntry[str]) -> str | None:
        """Why the temp file ``entry`` is abandoned, or None if its writer may still be writing."""
        if not entry.name.startswith(TEMP_PREFIX):
            return None
        match = TEMP_NAME.match(entry.name)
        pid = int(match.group("pid")) if match else None
        if pid is not None and pid != os.getpid():
            # A live pid may be a writer still at work (a big copy can take minutes): never swept.
            return None if pid_alive(pid) else f"its writer (pid {pid} on {HOST}) is gone"
        try:
            age = self.now - entry.stat(follow_symlinks=False).st_mtime
        except FileNotFoundError:
            return None
        # No pid to ask, or our own (a previous process that had it): only age tells.
        return f"{age:.0f} s old" if age >= self.grace_seconds else None

    def sweep(
        self, folder: Path, log: AuditLog | None, *, recursive: bool = False,
        may_remove: Callable[[Path], bool] = lambda path: True,
        may_descend: Callable[[Path], bool] = lambda path: True,
    ) -> None:
        """Remove the abandoned temp files of ``folder`` (and, with ``recursive``, of its subfolders)."""
        def candidate(entry: os.DirEntry[str]) -> bool:
            return entry.name.startswith(TEMP_PREFIX) or (recursive and entry.is_dir(follow_symlinks=False))

        for entry in _scan(folder, candidate):
            why = self.stale_temp(entry)
            if why is not None and may_remove(Path(entry.path)):
                path = Path(entry.path)
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(path, ignore_errors=True)
                    fsync_dir(folder)
                elif not remove_durably(path):
                    continue
                self.record(log, "temp_removed", path, f"abandoned temp file: {why}")
            elif recursive and entry.is_dir(follow_symlinks=False) and may_descend(Path(entry.path)):
                self.sweep(Path(entry.path), log, recursive=True, may_remove=may_remove, may_descend=may_descend)

    # --- one fork -------------------------------------------------------------------------------

    def recover_fork(self, fork: ForkLayout) -> None:
        if not fork.dir.is_dir():
            return
        log = AuditLog(fork.audit_log)
        self.sweep(fork.dir, log)
        for state in STATES:
            self.sweep(fork.state_dir(state), log)
            self.swept.add(fork.state_dir(state))
        log.events()  # the history is parsed before the lock is taken; under it only what was added since
        with fork_lock(fork):
            self._resolve_duplicates(fork, log, _Folders(fork))
            if self.exclusive:
                self._finish_rejections(fork, log, _Folders(fork))
            self._quarantine_uncommitted(fork, log, _Folders(fork))
            self._remove_dead_leases(fork, log)
            events = log.events()  # the log is parsed once per process; later calls read only new lines
            tasks = _TaskFiles(fork, _Folders(fork), events)
            self._restore_published(fork, log, tasks)
            if self.exclusive:
                self._restore_verdict_events(fork, log, events)
            _check_agreement(fork, log.events(), tasks)

    # --- pass 3: a task in two folders ----------------------------------------------------------

    def _resolve_duplicates(self, fork: ForkLayout, log: AuditLog, folders: _Folders) -> None:
        places: dict[str, list[str]] = {}
        for state in STATES:
            for task_id in folders.tasks(state):
                places.setdefault(task_id, []).append(state)
        for task_id, states in places.items():
            if len(states) < 2 or not _present_together([fork.task_file(state, task_id) for state in states]):
                continue  # a claim or a verdict moved it while the folders were listed: one file, two sightings
            copies = {state: _read_task(fork.task_file(state, task_id)) for state in states}
            keep = _choose_copy(fork, task_id, copies)
            for state in states:
                if state != keep:
                    attempt = copies[state].attempt if copies[state] is not None else "unreadable"
                    self.quarantine(fork, fork.task_file(state, task_id), "duplicate", log,
                                    f"{task_id} is also in {keep}/ (kept); this copy: attempt {attempt}")

    # --- pass 4: an unfinished rejection --------------------------------------------------------

    def _finish_rejections(self, fork: ForkLayout, log: AuditLog, folders: _Folders) -> None:
        for task_id in folders.tasks("completed"):
            rejected = fork.sidecar("failed", task_id, VERDICT_SUFFIX)
            if not folders.has("failed", rejected.name) or not rejected.exists():
                continue
            verdict, task = _rejection(fork, task_id, rejected)
            for suffix in (RESULT_SUFFIX, EXPLANATION_SUFFIX, PROVENANCE_SUFFIX):
                source = fork.sidecar("completed", task_id, suffix)
                if source.exists():
                    durable_rename(source, fork.sidecar("failed", task_id, suffix))
            durable_rename(fork.task_file("completed", task_id), fork.task_file("failed", task_id))
            self.record(log, "rejection_finished", fork.task_file("failed", task_id),
                        f"{task_id} attempt {task.attempt}: moved to failed/ as its verdict decided "
                        f"({'; '.join(verdict.reasons) or 'rejected'})")

    # --- pass 5: sidecars of a completion never committed ---------------------------------------

    def _quarantine_uncommitted(self, fork: ForkLayout, log: AuditLog, folders: _Folders) -> None:
        for state in ("completed", "failed"):
            for name, task_id in _sidecar_names(folders.names[state]):
                if folders.has(state, f"{task_id}{TASK_SUFFIX}") or fork.task_file(state, task_id).exists():
                    continue
                path = fork.state_dir(state) / name
                if state == "failed" and fork.task_file("completed", task_id).exists() \
                        and fork.sidecar("failed", task_id, VERDICT_SUFFIX).exists():
                    continue  # a rejection in progress: the engine's own recovery finishes it (pass 4)
                if fork.task_file(state, task_id).exists():
                    continue  # the verifier committed its rejection between the two looks above
                self.quarantine(fork, path, "uncommitted", log,
                                f"no {task_id} task file in {state}/: its completion was never committed")

    # --- pass 6: leases of tasks no longer in progress -------------------------------------------

    def _remove_dead_leases(self, fork: ForkLayout, log: AuditLog) -> None:
        folder = fork.state_dir("in_progress")
        for path in sorted(folder.glob(f"*{LEASE_SUFFIX}")) if folder.is_dir() else []:
            task_id = path.name[: -len(LEASE_SUFFIX)]
            task = fork.task_file("in_progress", task_id)
            if task.exists() or task.with_name(task.name + PARKED_SUFFIX).exists():
                continue
            why = self._lease_over(path)
            if why is not None and remove_durably(path):
                self.record(log, "lease_removed", path, f"{task_id} is no longer in progress and {why}")

    def _lease_over(self, path: Path) -> str | None:
        try:
            lease = read_document(path, Lease)
        except FileNotFoundError:
            return None
        except IntegrityError:
            age = self.now - path.stat().st_mtime
            return f"the lease is unreadable and {age:.0f} s old" if age >= self.grace_seconds else None
        if lease.host == HOST and 0 < lease.pid != os.getpid() and not pid_alive(lease.pid):
            return f"its holder (pid {lease.pid}) is gone"
        if parse_time(lease.expires_at).timestamp() <= self.now:
            return "the lease expired"
        return None

    # --- pass 7: a publish whose event was lost -------------------------------------------------

    def _restore_published(self, fork: ForkLayout, log: AuditLog, tasks: _TaskFiles) -> None:
        for state in STATES:
            for task_id in tasks.folders.tasks(state):
                if tasks.vouched(task_id) is not None or tasks.as_published(task_id) is not None:
                    continue  # settled at, or still holding, its last published attempt: the log accounts for it
                task = tasks.task(task_id)
                if task is None or (task_id, task.attempt) in tasks.published:
                    continue
                if task.attempt == 1 and not self.exclusive:
                    continue  # the engine publishes attempt 1 without the fork lock: it may log it any moment
                log.append("task.published", {"step_id": task_id, "attempt": task.attempt,
                                              "checksum": task.checksum, "reason": "recovered"})
                tasks.published.add((task_id, task.attempt))
                self.record(log, "event_restored", fork.task_file(state, task_id),
                            f"task.published of {task_id} attempt {task.attempt} (published, never logged)")

    def _restore_verdict_events(self, fork: ForkLayout, log: AuditLog, events: list[Event]) -> None:
        """``step.merged`` / ``task.failed`` of a ``step.verified`` whose process died right after logging it."""
        done = {(e.type, e.data.get("step_id"), e.data.get("attempt")) for e in events}
        for event in events:
            if event.type != "step.verified":
                continue
            task_id, attempt, accepted = event.data.get("step_id"), event.data.get("attempt"), event.data.get("accepted")
            follow = "step.merged" if accepted else "task.failed"
            if (follow, task_id, attempt) in done or not isinstance(task_id, str):
                continue
            path = fork.sidecar("completed" if accepted else "failed", task_id, VERDICT_SUFFIX)
            verdict = _read_verdict(path)
            if verdict is None or verdict.attempt != attempt or verdict.accepted != accepted:
                continue  # the folders disagree with the log: the agreement check names it
            files = [c.path for c in verdict.files_changed]
            if accepted:
                if verdict.commit is not None:
                    state_store(self.layout).set_ref(f"plans/{fork.plan_id}/forks/{fork.fork_id}", verdict.commit)
                log.append("step.merged", {"step_id": task_id, "attempt": attempt, "files": files,
                                           "commit": verdict.commit})
            else:
                log.append("task.failed", {"step_id": task_id, "attempt": attempt, "reason": "verification_rejected",
                                           "message": "; ".join(verdict.reasons)})
            done.add((follow, task_id, attempt))
            self.record(log, "event_restored", path, f"{follow} of {task_id} attempt {attempt} (after step.verified "
                        f"seq {event.seq}, never logged)")

    # --- passes 8 and 9: the plan's own events and its apply ------------------------------------

    def _restore_plan_created(self, plan_id: str, log: AuditLog) -> None:
        if any(e.type == "plan.created" for e in log.events()):
            return
        path = self.layout.plan_dir(plan_id) / "plan.json"
        plan = read_plan_file(path)
        log.append("plan.created", {"plan_id": plan.plan_id, "goal": plan.goal,
                                    "planner": plan.planner.model_dump(mode="json"),
                                    "forks": [f.fork_id for f in plan.forks], "plan_checksum": plan.checksum})
        self.record(log, "event_restored", path, "plan.created (plan.json written, never logged)")

    def _finish_apply(self, plan_id: str, log: AuditLog) -> None:
        path = apply_intent_file(self.layout, plan_id)
        if not path.exists():
            return
        fork_id, document = _read_intent(path, plan_id)
        changes = [FileChange.model_validate(c) for c in document["changes"]]
        # Only temps named after a file being applied: anything else in the project is the user's.
        targets = {(self.layout.root / c.path).parent / f"{TEMP_PREFIX}{Path(c.path).name}" for c in changes}
        for folder in sorted({target.parent for target in targets}):
            self.sweep(folder, log, may_remove=lambda path: _temp_target(path) in targets)
        try:
            finish_apply(self.layout, document)
        except (MergeConflict, ChecksumMismatch, GitError) as exc:
            raise StateConflict(f"{path}: the interrupted apply of fork {fork_id} cannot be finished ({exc}); "
                                "the project may be half applied, and the intent is kept") from exc
        remove_durably(path)
        self.record(log, "apply_finished", path,
                    f"the interrupted apply of fork {fork_id} was finished: {len(changes)} change(s) in place")


# --- helpers --------------------------------------------------------------------------------------


def _temp_target(path: Path) -> Path | None:
    """``<folder>/.tmp.<name>`` for a temp ``<folder>/.tmp.<name>.<pid>.<random>``, else None."""
    match = TEMP_NAME.match(path.name)
    return path.parent / f"{TEMP_PREFIX}{match.group('name')}" if match else None


def _scan(folder: Path, keep: Callable[[os.DirEntry[str]], bool] = lambda entry: True) -> Iterator[os.DirEntry[str]]:
    """The entries of ``folder`` that ``keep`` accepts, in name order (none if it is missing)."""
    try:
        with os.scandir(folder) as entries:
            yield from sorted((entry for entry in entries if keep(entry)), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return


def _sidecars(folder: Path) -> Iterator[tuple[Path, str]]:
    """``(path, task_id)`` of every sidecar file in a state folder."""
    for name, task_id in _sidecar_names(entry.name for entry in _scan(folder)):
        yield folder / name, task_id


def _sidecar_names(names: Iterable[str]) -> Iterator[tuple[str, str]]:
    """``(name, task_id)`` of every sidecar among a state folder's ``names``, in name order."""
    for name in sorted(names):
        if name.startswith(TEMP_PREFIX):
            continue
        stem, dot, rest = name.partition(".")  # step ids hold no dot: the suffix starts at the first one
        if dot and stem and f".{rest}" in _SIDECAR_SET:
            yield name, stem
        elif dot:  # a task id with a dot in it: try every suffix, as the file name may still be a sidecar
            suffix = next((s for s in SIDECARS if name.endswith(s)), None)
            if suffix is not None and len(name) > len(suffix):
                yield name, name[: -len(suffix)]


_SIDECAR_SET = frozenset(SIDECARS)


class _Folders:
    """The names in a fork's four state folders, each listed once, in the order tasks move (``pending``
    first): a task that moves while they are listed is seen twice, never missed."""

    def __init__(self, fork: ForkLayout) -> None:
        self.names = {state: set(entry_names(fork.state_dir(state))) for state in STATES}

    def has(self, state: str, name: str) -> bool:
        return name in self.names[state]

    def tasks(self, state: str) -> list[str]:
        """Ids of the task files in ``state`` (as ``ForkLayout.task_ids``)."""
        return sorted(name[: -len(TASK_SUFFIX)] for name in self.names[state] if name.endswith(TASK_SUFFIX))

    def where(self, task_id: str) -> tuple[str, bool] | None:
        """The state holding ``task_id``'s task file — the most advanced if it was seen twice — and whether
        it is only a parked (``.requeue``) file in ``in_progress/``; None when it is in no folder."""
        name = f"{task_id}{TASK_SUFFIX}"
        for state in _MOST_ADVANCED_FIRST:
            if name in self.names[state]:
                return state, False
        return ("in_progress", True) if name + PARKED_SUFFIX in self.names["in_progress"] else None


class _TaskFiles:
    """Where each task file is and, when the log cannot vouch for it, what it holds.

    A task file in ``completed/`` or ``failed/`` whose step's last published attempt has a completion,
    failure or verdict event, and no event names a later attempt, holds that attempt, so it is not read
    again. (A later attempt named by an event means a retry was published, its event lost in a crash, and
    an executor went on with it: that file is read and its publication restored.) Every other task file is
    read, once: the in-flight ones and those the log does not account for. So recovery reads what may need
    repair, not the history.

    An in-flight file (pending, in progress) whose bytes claim exactly the attempt and checksum of its
    step's last ``task.published`` event is what was published: the log accounts for it, and its attempt
    is taken from a plain JSON parse, not a strict read (checksum, schema). Recovery only decides from a
    file's attempt whether a publication went unlogged; whoever claims the file reads it strictly, and a
    file whose content does not match the checksum it claims is refused then, as it would be without a
    crash. Any other file is read strictly.
    """

    def __init__(self, fork: ForkLayout, folders: _Folders, events: list[Event]) -> None:
        self.fork, self.folders = fork, folders
        self.published: set[tuple[Any, Any]] = set()
        self._last: dict[str, Any] = {}  # step -> the attempt of its last task.published event
        self._settled: set[tuple[Any, Any]] = set()
        self._checksum: dict[str, Any] = {}  # step -> the checksum its last task.published event names
        # step -> the highest attempt any event names: above the last published one when a retry's file was
        # published but its event lost (a crash) and an executor then claimed and completed it.
        self._highest: dict[str, int] = {}
        highest = self._highest
        for event in events:
            data = event.data
            if "step_id" not in data:
                continue  # no task's event (plan, fork, llm and recovery events)
            key = (data["step_id"], data.get("attempt"))
            for value in (key[1], data.get("next_attempt")):
                if isinstance(value, int) and value > highest.get(key[0], 0):
                    highest[key[0]] = value
            if event.type == "task.published":
                self.published.add(key)
                self._last[key[0]] = key[1]
                self._checksum[key[0]] = data.get("checksum")
            elif event.type in _SETTLING:
                self._settled.add(key)
            elif event.type == "task.rejected":  # the rejected file may claim any attempt: the log's is settled
                self._settled.add((key[0], self._last.get(key[0])))
        self._read: dict[str, Task | None] = {}
        self._vouched: dict[str, int | None] = {}
        self._as_published: dict[str, int | None] = {}

    def vouched(self, task_id: str) -> int | None:
        """The attempt the log vouches ``task_id``'s task file holds, or None when it has to be read."""
        if task_id not in self._vouched:
            found = self.folders.where(task_id)
            attempt = self._last.get(task_id)
            settled = found is not None and found[0] in ("completed", "failed") and (task_id, attempt) in self._settled
            later = isinstance(attempt, int) and self._highest.get(task_id, 0) > attempt
            self._vouched[task_id] = attempt if settled and isinstance(attempt, int) and not later else None
        return self._vouched[task_id]

    def as_published(self, task_id: str) -> int | None:
        """The attempt of ``task_id``'s in-flight task file if its bytes claim the attempt and checksum of
        the step's last ``task.published`` event (see the class docstring), else None."""
        if task_id not in self._as_published:
            found = self.folders.where(task_id)
            attempt, checksum = self._last.get(task_id), self._checksum.get(task_id)
            claimed = None
            if found is not None and not found[1] and found[0] in ("pending", "in_progress") \
                    and isinstance(attempt, int) and isinstance(checksum, str):
                try:
                    document = json.loads(read_limited(self.fork.task_file(found[0], task_id)))
                except (OSError, ValueError, IntegrityError):
                    document = None
                if isinstance(document, dict) and document.get("attempt") == attempt \
                        and document.get("checksum") == checksum and document.get("task_id") == task_id:
                    claimed = attempt
            self._as_published[task_id] = claimed
        return self._as_published[task_id]

    def task(self, task_id: str) -> Task | None:
        """The task file of ``task_id`` read strictly (None when it is missing or unreadable)."""
        if task_id not in self._read:
            found = self.folders.where(task_id)
            path = None if found is None else self.fork.task_file(found[0], task_id)
            if found is not None and found[1]:
                path = self.fork.task_file("in_progress", task_id).with_name(f"{task_id}{TASK_SUFFIX}{PARKED_SUFFIX}")
            task = None if path is None else _read_task(path)
            # A file naming another step, plan or fork is not this task, however well sealed (6.2): nothing
            # is restored from it.
            identity = (self.fork.plan_id, self.fork.fork_id, task_id)
            self._read[task_id] = task if task is None or (task.plan_id, task.fork_id, task.task_id) == identity else None
        return self._read[task_id]

    def attempt(self, task_id: str) -> int | None:
        known = self.vouched(task_id)
        if known is None:
            known = self.as_published(task_id)
        if known is not None:
            return known
        task = self.task(task_id)
        return None if task is None else task.attempt


_SETTLING = frozenset({"task.completed", "task.failed", "step.verified", "step.merged"})
_MOST_ADVANCED_FIRST = sorted(STATES, key=_ADVANCE.__getitem__, reverse=True)


def _present_together(paths: list[Path]) -> bool:
    """Did every path exist at one same instant? Each is looked at twice with the same inode in between, so
    a file renamed from one of these names to another (a claim, a verdict's move) is not two files."""
    try:
        first = [os.stat(p, follow_symlinks=False).st_ino for p in paths]
        return [os.stat(p, follow_symlinks=False).st_ino for p in paths] == first
    except FileNotFoundError:
        return False


def _read_verdict(path: Path) -> Verdict | None:
    try:
        return read_document(path, Verdict)
    except (FileNotFoundError, IntegrityError):
        return None


def _read_task(path: Path) -> Task | None:
    try:
        return read_document(path, Task)
    except (FileNotFoundError, IntegrityError):
        return None


def _committed(fork: ForkLayout, state: str, task: Task | None) -> bool:
    """Is this copy a committed completion: in completed/ or failed/ beside a result naming its attempt?"""
    if task is None or state not in ("completed", "failed"):
        return False
    try:
        return read_document(fork.sidecar(state, task.task_id, RESULT_SUFFIX), Result).attempt == task.attempt
    except (FileNotFoundError, IntegrityError):
        return False


def _choose_copy(fork: ForkLayout, task_id: str, copies: dict[str, Task | None]) -> str:
    """The state folder whose copy of a duplicated task file to keep (rule 3 of the module docstring).

    Raises:
        StateConflict: no copy is readable, or two committed completions disagree.
    """
    readable = {state: task for state, task in copies.items() if task is not None}
    if not readable:
        raise StateConflict(f"{fork.dir}: {task_id} is in {', '.join(copies)}/ and no copy is a valid task file")
    committed = [state for state, task in readable.items() if _committed(fork, state, task)]
    if len(committed) > 1:
        raise StateConflict(f"{fork.dir}: {task_id} has committed completions in both {' and '.join(committed)}/")
    if committed:
        return committed[0]
    return max(readable, key=lambda state: (readable[state].attempt, _ADVANCE[state]))


def _rejection(fork: ForkLayout, task_id: str, rejected: Path) -> tuple[Verdict, Task]:
    """The verdict and task of a rejection in progress, checked to belong together.

    Raises:
        StateConflict: the verdict is unreadable, accepts the step, names another attempt, or an accepted
            verdict exists too.
    """
    task_path = fork.task_file("completed", task_id)
    try:
        verdict = read_document(rejected, Verdict)
        task = read_document(task_path, Task)
    except IntegrityError as exc:
        raise StateConflict(f"{rejected}: a rejection in progress cannot be finished: {exc}") from exc
    if verdict.accepted or verdict.attempt != task.attempt or fork.sidecar("completed", task_id, VERDICT_SUFFIX).exists():
        raise StateConflict(
            f"{rejected} (attempt {verdict.attempt}, accepted={verdict.accepted}) does not belong to {task_path} "
            f"(attempt {task.attempt}); refusing to guess which decision stands"
        )
    return verdict, task


def _read_intent(path: Path, plan_id: str) -> tuple[str, dict]:
    """``(fork_id, document)`` of an apply intent, read strictly.

    Raises:
        StateConflict: the intent is unreadable (the project may be half applied; people must look).
    """
    try:
        document: Any = strict_loads(path.read_bytes(), source=str(path))
        if not isinstance(document, dict) or document.get("schema") != APPLY_INTENT_SCHEMA:
            raise IntegrityError(f"{path}: not a {APPLY_INTENT_SCHEMA} document")
        check_checksum(document, source=str(path))
        if document.get("plan_id") != plan_id or not isinstance(document.get("fork_id"), str):
            raise IntegrityError(f"{path}: names plan {document.get('plan_id')!r}, not {plan_id!r}")
        for c in document.get("changes", []):
            FileChange.model_validate(c)
        if not all(isinstance(document.get(k), str) for k in ("user_tree", "result_tree")):
            raise IntegrityError(f"{path}: no user_tree/result_tree")
    except (IntegrityError, ValidationError, TypeError) as exc:
        raise StateConflict(f"{path}: an interrupted apply's intent is unreadable ({exc}); "
                            "the project may be half applied") from exc
    return document["fork_id"], document


def _seen_as(fork: ForkLayout, state: str | None, task_id: str, held: int | None) -> str:
    return f"{fork.task_file(state, task_id) if state else 'no task file'}" + (
        f" (attempt {held})" if held is not None else "")


_AGREEMENT_TYPES = frozenset({"task.published", "task.completed", "task.failed", "step.merged"})


def _check_agreement(fork: ForkLayout, events: list[Event], tasks: _TaskFiles) -> None:
    """Raise StateConflict naming every event the folders contradict (no crash can cause these).

    An outcome of an attempt that was retried since (a later attempt is published), or that is being
    retried (archived under ``attempts/``, its retry not yet published: ``conductor.repair``), is history:
    its task file has moved on by design.
    """
    problems: list[str] = []
    last_published: dict[str, Event] = {}
    newest = {e.data.get("step_id"): e.data.get("attempt") for e in events if e.type == "task.published"}
    archive = set(entry_names(fork.dir / ARCHIVE_DIR))  # listed once, under the fork lock that every archiving holds

    def is_archived(task_id: str, attempt: int) -> bool:  # as conductor.repair.is_archived, from the listing
        return archive_name(task_id, attempt, TASK_SUFFIX) in archive

    for event in events:
        if event.type not in _AGREEMENT_TYPES:
            continue
        task_id, attempt = event.data.get("step_id"), event.data.get("attempt")
        if not isinstance(task_id, str):
            continue
        if event.type == "task.published":
            last_published[task_id] = event
            continue
        if event.type != "step.merged" and isinstance(attempt, int) and (
                (isinstance(newest.get(task_id), int) and attempt < newest[task_id])
                or is_archived(task_id, attempt)):
            continue
        found = tasks.folders.where(task_id)
        state = found[0] if found else None
        held = tasks.attempt(task_id) if state else None
        seen = functools.partial(_seen_as, fork, state, task_id, held)  # a message only when needed
        if event.type == "task.completed" and (state not in ("completed", "failed")
                                               or (held is not None and held != attempt)):
            problems.append(f"seq {event.seq} task.completed {task_id} attempt {attempt}, but {seen()}")
        elif event.type == "task.failed" and state != "failed":
            problems.append(f"seq {event.seq} task.failed {task_id} attempt {attempt}, but {seen()}")
        elif event.type == "step.merged" and (
            state != "completed" or (held is not None and held != attempt)
            or not tasks.folders.has("completed", f"{task_id}{VERDICT_SUFFIX}")
        ):
            problems.append(f"seq {event.seq} step.merged {task_id} attempt {attempt}, but {seen()} "
                            "with no accepted verdict beside it")
    for task_id, event in last_published.items():
        found = tasks.folders.where(task_id)
        if found is None and isinstance(event.data.get("attempt"), int) and is_archived(task_id, event.data["attempt"]):
            continue  # a repair archived it and crashed before publishing the retry: the engine's next pass does
        if found is None:
            problems.append(f"seq {event.seq} task.published {task_id} attempt {event.data.get('attempt')}, "
                            "but its task file is in no state folder")
            continue
        held = tasks.attempt(task_id)
        if held is not None and held < int(event.data.get("attempt", 0)):
            problems.append(f"seq {event.seq} task.published {task_id} attempt {event.data.get('attempt')}, "
                            f"but {fork.task_file(found[0], task_id)} holds attempt {held}")
    if problems:
        raise StateConflict(f"{fork.audit_log} and the folders of fork {fork.fork_id} disagree; refusing to guess: "
                            + "; ".join(problems))
