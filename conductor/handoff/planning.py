"""Handoff planning: an agent, not an LLM call, answers a goal with a plan.

``planner.kind: handoff`` (``conductor explore --planner handoff``) publishes a *planning task* and waits
for an agent to answer it with a plan file (the format ``conductor explore --plan FILE`` reads,
:class:`conductor.planner.PlanFile`). The folder follows the discipline of step tasks (docs/protocol.md,
section 13): checksummed documents, durable writes, claims by rename, a lease, a lock for the renames::

    .conductor/handoff/planning_<plan>/
      .lock                        the planning lock (flock), held only for renames
      audit.log                    every planning event (hash-chained, as the other logs)
      pending/      a<n>.planning.json
      in_progress/  a<n>.planning.json  a<n>.lease.json
      completed/    a<n>.planning.json  a<n>.answer.json|.yaml  [a<n>.verdict.json once accepted]
      failed/       a<n>.planning.json  [a<n>.answer.*]  a<n>.verdict.json (the reasons)

``<plan>`` is the id the plan gets once an answer is accepted. Attempt ``n`` is its own file: a rejected
answer moves to ``failed/`` with its reasons and attempt ``n + 1`` is published carrying every earlier
rejection, up to ``executor.max_attempts``. An answer is judged by the process that waits (Conductor),
never by the one that submits it: the same checks as ``explore --plan FILE`` (schema, step ids and
dependencies, safe ``allowed_files``) plus one of policy (an ``allowed_files`` path the project protects
could never be changed).

Agents use :func:`claim_planning`, :func:`renew_planning`, :func:`answer_planning` and
:func:`release_planning` (``conductor task`` and ``conductor mcp`` call them); Conductor uses
:class:`PlanningRound`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field

from conductor.audit import AuditLog
from conductor.canonical import sha256_hex
from conductor.errors import ConductorError, ConfigError, ExecutorError, IntegrityError, LeaseLost, NotFound
from conductor.fsutil import commit_temp, durable_rename, flocked, fsync_dir, rename_file, sync_rename, write_temp
from conductor.handoff.documents import MAX_DOCUMENT_BYTES, read_document, write_document
from conductor.layout import ProjectLayout
from conductor.models import (
    Checksum,
    Contract,
    EffectivePolicy,
    Identifier,
    Plan,
    PlannerInfo,
    PolicyLayer,
    parse_time,
    utc_now,
)

PLANNING_SCHEMA = "conductor.planning/v1"
PLANNING_LEASE_SCHEMA = "conductor.planning-lease/v1"
PLANNING_VERDICT_SCHEMA = "conductor.planning-verdict/v1"
PLANNING_TASK_ID = "planning"
"""The task id agents name a planning task by (``conductor task complete planning --plan-file F``)."""
PLANNING_PREFIX = "planning_"
STATES = ("pending", "in_progress", "completed", "failed")
ANSWER_FORMATS = ("json", "yaml")
MAX_FACT_FILES = 300
"""Files listed in a planning task's facts; ``files_total`` tells how many there are."""

EventSink = Callable[[str, dict[str, Any]], None]

_LANGUAGES = {
    ".py": "Python", ".js": "JavaScript", ".mjs": "JavaScript", ".cjs": "JavaScript", ".ts": "TypeScript",
    ".tsx": "TypeScript", ".jsx": "JavaScript", ".go": "Go", ".rs": "Rust", ".java": "Java", ".kt": "Kotlin",
    ".rb": "Ruby", ".php": "PHP", ".c": "C", ".h": "C", ".cc": "C++", ".cpp": "C++", ".hpp": "C++",
    ".cs": "C#", ".swift": "Swift", ".scala": "Scala", ".sh": "Shell", ".lua": "Lua", ".r": "R",
    ".ex": "Elixir", ".exs": "Elixir", ".erl": "Erlang", ".hs": "Haskell", ".ml": "OCaml", ".dart": "Dart",
    ".sql": "SQL", ".html": "HTML", ".css": "CSS", ".md": "Markdown", ".yaml": "YAML", ".yml": "YAML",
    ".toml": "TOML", ".json": "JSON",
}


# --- documents ----------------------------------------------------------------------------------


class ProjectFacts(Contract):
    """What a planner needs to know about the project, without reading it."""

    files: list[str] = Field(description="project files, relative (at most 300; .git, .conductor and tool caches left out)")
    files_total: int = Field(ge=0, description="how many files the listing found (it stops past 1,500)")
    languages: list[str] = Field(description="languages by file extension, most files first")
    verification_commands: list[str] = Field(description="run in the workspace after every step; all must exit 0")
    policy: EffectivePolicy = Field(description="the project's effective policy; a plan can only tighten it")


class Rejection(Contract):
    """Why an earlier answer was refused."""

    attempt: int = Field(ge=1)
    reasons: list[str]


class Waiter(Contract):
    """The Conductor process that waits for the answer: when it is gone, nobody will judge one."""

    pid: int = Field(ge=1)
    host: str
    start: str | None = Field(default=None, description="'<boot_id>:<starttime>' of the process (Linux), against pid reuse")


class PlanningTask(Contract):
    """``a<n>.planning.json``: attempt n of a planning task. Written by Conductor only. Checksummed."""

    schema_: Literal["conductor.planning/v1"] = Field(default=PLANNING_SCHEMA, alias="schema")
    task_id: Literal["planning"] = PLANNING_TASK_ID
    plan_id: Identifier = Field(description="the id the plan will get")
    attempt: int = Field(ge=1)
    max_attempts: int = Field(ge=1, description="answers Conductor judges before it gives up")
    goal: str = Field(min_length=1)
    strategies: int = Field(ge=1, description="distinct strategies wanted (more are cut, fewer are accepted)")
    instruction: str = Field(description="what to do, in words")
    plan_schema: dict[str, Any] = Field(description="JSON Schema (draft 2020-12) of the answer: a plan file")
    facts: ProjectFacts
    previous_rejections: list[Rejection] = Field(default_factory=list)
    deadline: str = Field(description="when Conductor stops waiting for an answer")
    waiter: Waiter | None = Field(default=None, description="the process that judges answers")
    created_at: str
    checksum: Checksum | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)

    def to_document(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


class PlanningLease(Contract):
    """``in_progress/a<n>.lease.json``: who holds the planning task and until when. Checksummed."""

    schema_: Literal["conductor.planning-lease/v1"] = Field(default=PLANNING_LEASE_SCHEMA, alias="schema")
    plan_id: Identifier
    attempt: int = Field(ge=1)
    holder: str = Field(min_length=1)
    acquired_at: str
    renewed_at: str
    expires_at: str
    checksum: Checksum | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)

    def to_document(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


class PlanningVerdict(Contract):
    """``a<n>.verdict.json``: Conductor's decision on an answer (or why the attempt ended without one)."""

    schema_: Literal["conductor.planning-verdict/v1"] = Field(default=PLANNING_VERDICT_SCHEMA, alias="schema")
    plan_id: Identifier
    attempt: int = Field(ge=1)
    accepted: bool
    reasons: list[str] = Field(default_factory=list)
    answer_sha256: str | None = Field(default=None, description="hex SHA-256 of the answer file; None without one")
    holder: str | None = None
    next_attempt: int | None = Field(default=None, description="the attempt published after this rejection")
    decided_at: str
    checksum: Checksum | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)

    def to_document(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


class PlanningFailed(ExecutorError):
    """No acceptable plan: every attempt was rejected, nobody answered in time, or planning was withdrawn."""


# --- where things are ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanningLayout:
    """Paths of one planning task's folder."""

    project: ProjectLayout
    plan_id: str

    @property
    def dir(self) -> Path:
        return self.project.handoff_dir / f"{PLANNING_PREFIX}{self.plan_id}"

    @property
    def audit_log(self) -> AuditLog:
        return AuditLog(self.dir / "audit.log")

    def task_file(self, state: str, attempt: int) -> Path:
        return self.dir / state / f"a{attempt}.planning.json"

    def lease_file(self, attempt: int) -> Path:
        return self.dir / "in_progress" / f"a{attempt}.lease.json"

    def verdict_file(self, state: str, attempt: int) -> Path:
        return self.dir / state / f"a{attempt}.verdict.json"

    def answer_file(self, state: str, attempt: int) -> Path | None:
        """The answer of ``attempt`` in ``state``, whichever format it came in, or None."""
        for fmt in ANSWER_FORMATS:
            path = self.dir / state / f"a{attempt}.answer.{fmt}"
            if path.exists():
                return path
        return None

    def attempts(self, state: str) -> list[int]:
        """Attempts whose task file is in ``state``, ascending."""
        folder = self.dir / state
        found = []
        for path in folder.glob("a*.planning.json") if folder.is_dir() else []:
            number = path.name[1 : -len(".planning.json")]
            if number.isdigit():
                found.append(int(number))
        return sorted(found)

    def live(self) -> tuple[str, int] | None:
        """The state (``pending`` or ``in_progress``) and attempt of the task agents may work on, or None."""
        for state in ("in_progress", "pending"):
            attempts = self.attempts(state)
            if attempts:
                return state, attempts[-1]
        return None

    def lock(self):  # type: ignore[no-untyped-def]
        """The planning lock: held for renames and fencing checks only (as a fork's ``.lock``)."""
        return flocked(self.dir / ".lock")


def planning_ids(project: ProjectLayout) -> list[str]:
    """Plan ids of every planning folder, oldest first."""
    folder = project.handoff_dir
    if not folder.is_dir():
        return []
    return sorted(p.name[len(PLANNING_PREFIX):] for p in folder.glob(f"{PLANNING_PREFIX}*") if p.is_dir())


def _this_process() -> Waiter:
    from conductor.handoff.lease import HOST
    from conductor.proc import process_start

    return Waiter(pid=os.getpid(), host=HOST, start=process_start(os.getpid()))


def _time_after(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _expired(stamp: str) -> bool:
    return parse_time(stamp) <= datetime.now(UTC)


# --- the agent's side ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PlanningClaim:
    """A planning task an agent holds: the task and its lease."""

    layout: PlanningLayout
    task: PlanningTask
    lease: PlanningLease

    def to_json(self) -> dict[str, Any]:
        """What ``conductor task claim --json`` and the MCP tools show of it."""
        return {"kind": "planning", "task_id": PLANNING_TASK_ID, "plan_id": self.task.plan_id,
                "attempt": self.task.attempt, "max_attempts": self.task.max_attempts, "goal": self.task.goal,
                "strategies": self.task.strategies, "instruction": self.task.instruction,
                "previous_rejections": [r.model_dump(mode="json") for r in self.task.previous_rejections],
                "facts": self.task.facts.model_dump(mode="json"), "plan_schema": self.task.plan_schema,
                "deadline": self.task.deadline, "lease_expires_at": self.lease.expires_at, "holder": self.lease.holder,
                "task_file": str(self.layout.task_file("in_progress", self.task.attempt))}


def _abandoned(task: PlanningTask) -> str | None:
    """Why nobody will judge an answer to ``task`` any more, or None: its deadline passed, or the process
    that waits for it (on this host) is gone."""
    from conductor.handoff.lease import HOST
    from conductor.proc import pid_alive, process_start

    if _expired(task.deadline):
        return f"its deadline {task.deadline} passed"
    waiter = task.waiter
    if waiter is None or waiter.host != HOST:
        return None  # another host's process cannot be checked from here: the deadline decides
    if waiter.start is not None:
        gone = process_start(waiter.pid) != waiter.start  # None once gone; another value if the pid was reused
    else:
        gone = not pid_alive(waiter.pid)
    return f"the conductor process waiting for it (pid {waiter.pid}) is gone" if gone else None


def _live_task(layout: PlanningLayout) -> tuple[str, int, PlanningTask | None] | None:
    """The live attempt and its task (None when the file does not read back: a claim rejects it); one nobody
    will judge any more is withdrawn (``planning.failed``, reason ``abandoned``) and None returned."""
    live = layout.live()
    if live is None:
        return None
    state, attempt = live
    try:
        task = read_document(layout.task_file(state, attempt), PlanningTask)
    except FileNotFoundError:
        return None
    except IntegrityError:
        return state, attempt, None
    why = _abandoned(task)
    if why is None:
        return state, attempt, task
    with layout.lock():
        if layout.live() == live and _finish_unanswered(layout, attempt, state, [f"abandoned: {why}"], holder=None):
            layout.audit_log.append("planning.failed", {"attempt": attempt, "reason": "abandoned", "message": why})
    return None


def pending_planning(project: ProjectLayout) -> list[tuple[str, int]]:
    """``(plan_id, attempt)`` of every planning task waiting in ``pending/``, oldest plan first (tasks nobody
    will judge any more are withdrawn on the way)."""
    found = []
    for plan_id in planning_ids(project):
        live = _live_task(PlanningLayout(project, plan_id))
        if live is not None and live[0] == "pending":
            found.append((plan_id, live[1]))
    return found


def planning_tasks(project: ProjectLayout) -> list[dict[str, Any]]:
    """A summary of every live planning task (pending or in progress): plan id, attempt, state, goal, holder.
    Tasks nobody will judge any more (their deadline passed, or the waiting process died) are withdrawn."""
    rows = []
    for plan_id in planning_ids(project):
        layout = PlanningLayout(project, plan_id)
        live = _live_task(layout)
        if live is None:
            continue
        state, attempt, task = live
        if task is None:
            continue
        lease = _read_lease(layout, attempt) if state == "in_progress" else None
        rows.append({"kind": "planning", "task_id": PLANNING_TASK_ID, "plan_id": plan_id, "attempt": attempt,
                     "state": state, "goal": task.goal, "strategies": task.strategies,
                     "holder": lease.holder if lease else None, "lease_expires_at": lease.expires_at if lease else None})
    return rows


def claim_planning(
    project: ProjectLayout, plan_id: str | None = None, *, holder: str, lease_seconds: float
) -> PlanningClaim | None:
    """Claim a pending planning task (of ``plan_id``, or the oldest one waiting).

    Returns:
        The claim, or None when no planning task waits (or another agent won every race).

    Raises:
        NotFound: ``plan_id`` names no planning task.
    """
    candidates = [(plan_id, a) for p, a in pending_planning(project) if p == plan_id] if plan_id else pending_planning(project)
    if plan_id is not None and not PlanningLayout(project, plan_id).dir.is_dir():
        raise NotFound(f"no planning task for plan {plan_id!r}")
    for pid, attempt in candidates:
        assert pid is not None
        layout = PlanningLayout(project, pid)
        claim = _claim_attempt(layout, attempt, holder=holder, lease_seconds=lease_seconds)
        if claim is not None:
            return claim
    return None


def _claim_attempt(layout: PlanningLayout, attempt: int, *, holder: str, lease_seconds: float) -> PlanningClaim | None:
    source, target = layout.task_file("pending", attempt), layout.task_file("in_progress", attempt)
    try:
        os.rename(source, target)  # the claim: one winner, the others get ENOENT
    except FileNotFoundError:
        return None
    try:
        task = read_document(target, PlanningTask)
        if task.plan_id != layout.plan_id or task.attempt != attempt:
            raise IntegrityError(f"{target}: names plan {task.plan_id} attempt {task.attempt}")
    except IntegrityError as exc:  # a tampered task is never worked on: it fails with the reason
        _finish_unanswered(layout, attempt, "in_progress", [f"invalid planning task: {exc}"], holder=holder)
        layout.audit_log.append("planning.failed", {"attempt": attempt, "reason": "invalid_task", "message": str(exc)})
        return None
    now = utc_now()
    lease = PlanningLease(plan_id=layout.plan_id, attempt=attempt, holder=holder, acquired_at=now, renewed_at=now,
                          expires_at=_time_after(lease_seconds))
    lease = write_document(layout.lease_file(attempt), lease, sync_dir=False)
    layout.audit_log.append("planning.claimed", {"attempt": attempt, "holder": holder, "pid": os.getpid()})
    return PlanningClaim(layout, task, lease)


def _finish_unanswered(layout: PlanningLayout, attempt: int, state: str, reasons: list[str], *, holder: str | None) -> bool:
    """Move attempt ``attempt`` from ``state`` to ``failed/`` with a verdict giving ``reasons`` (verdict first, the
    task file last: the commit point); False if the task file was gone."""
    verdict = PlanningVerdict(plan_id=layout.plan_id, attempt=attempt, accepted=False, reasons=reasons, holder=holder,
                              decided_at=utc_now())
    write_document(layout.verdict_file("failed", attempt), verdict)
    try:
        durable_rename(layout.task_file(state, attempt), layout.task_file("failed", attempt))
    except FileNotFoundError:
        return False
    layout.lease_file(attempt).unlink(missing_ok=True)
    return True


def _read_lease(layout: PlanningLayout, attempt: int) -> PlanningLease | None:
    try:
        return read_document(layout.lease_file(attempt), PlanningLease)
    except (FileNotFoundError, IntegrityError):
        return None


def _held(layout: PlanningLayout, holder: str, lease_seconds: float | None) -> tuple[int, PlanningLease]:
    """The attempt ``holder`` holds, checked under the lock (the fencing check).

    With ``lease_seconds``, a task in ``pending/`` is claimed now: a lease that lapsed while nobody else
    claimed the task is taken back (no one's work is overwritten), and an answer needs no claim before it.

    Raises:
        NotFound: no live planning task. LeaseLost: another agent holds it, or it moved on.
    """
    live = layout.live()
    if live is None:
        raise NotFound(f"plan {layout.plan_id}: no planning task waits for an answer (answered, rejected for good or withdrawn)")
    state, attempt = live
    if state == "pending" and lease_seconds is None:
        raise LeaseLost(f"plan {layout.plan_id}: planning attempt {attempt} waits in pending/: nobody holds it")
    if state == "pending":
        taken = _claim_attempt(layout, attempt, holder=holder, lease_seconds=lease_seconds)
        if taken is None:
            raise LeaseLost(f"plan {layout.plan_id}: planning attempt {attempt} was taken by another agent")
        return attempt, taken.lease
    lease = _read_lease(layout, attempt)
    if lease is None or lease.holder != holder:
        other = lease.holder if lease else "nobody (no lease yet)"
        raise LeaseLost(f"plan {layout.plan_id}: planning attempt {attempt} is held by {other}, not {holder}")
    return attempt, lease


def show_planning(project: ProjectLayout, plan_id: str) -> tuple[PlanningTask, str]:
    """The live (or latest) planning task of ``plan_id`` and its state.

    Raises:
        NotFound: no planning folder for ``plan_id``.
    """
    layout = PlanningLayout(project, plan_id)
    if not layout.dir.is_dir():
        raise NotFound(f"no planning task for plan {plan_id!r}")
    live = layout.live()
    if live is None:
        latest = max(((a, s) for s in ("completed", "failed") for a in layout.attempts(s)), default=None)
        if latest is None:
            raise NotFound(f"plan {plan_id}: the planning folder holds no task")
        attempt, state = latest
    else:
        state, attempt = live
    return read_document(layout.task_file(state, attempt), PlanningTask), state


def renew_planning(project: ProjectLayout, plan_id: str, *, holder: str, lease_seconds: float) -> PlanningLease:
    """Extend ``holder``'s lease on the planning task of ``plan_id`` (the heartbeat).

    Raises:
        NotFound, LeaseLost: as :func:`_held`.
    """
    layout = PlanningLayout(project, plan_id)
    with layout.lock():
        attempt, lease = _held(layout, holder, lease_seconds)
        renewed = lease.model_copy(update={"renewed_at": utc_now(), "expires_at": _time_after(lease_seconds)})
        return write_document(layout.lease_file(attempt), renewed, sync_dir=False)


def answer_planning(project: ProjectLayout, plan_id: str, *, holder: str, answer: bytes, fmt: str) -> int:
    """Submit a plan file as the answer to the planning task ``holder`` holds; returns the attempt answered.

    Under the planning lock: the fencing check, the answer written into ``completed/``, then the task file
    renamed there (the commit point) and the lease removed. Conductor judges it afterwards
    (:func:`wait_for_verdict` tells the outcome).

    Args:
        answer: the plan file's bytes (YAML or JSON, at most 4 MiB).
        fmt: ``"json"`` or ``"yaml"``: how Conductor will parse it.

    Raises:
        ConfigError: an unknown format, or an answer larger than 4 MiB.
        NotFound, LeaseLost: the caller does not hold the task (nothing is written).
    """
    if fmt not in ANSWER_FORMATS:
        raise ConfigError(f"answer format {fmt!r}: expected json or yaml")
    if len(answer) > MAX_DOCUMENT_BYTES:
        raise ConfigError(f"the plan is larger than {MAX_DOCUMENT_BYTES} bytes")
    layout = PlanningLayout(project, plan_id)
    with layout.lock():
        attempt, _ = _held(layout, holder, 60)
        target = layout.dir / "completed" / f"a{attempt}.answer.{fmt}"
        commit_temp(write_temp(target, answer), target)
        fsync_dir(target.parent)  # the answer is durable before the commit point
        # logged before the commit point, so the judge, woken by the rename, finds who answered
        layout.audit_log.append("planning.answered", {"attempt": attempt, "holder": holder, "answer_sha256": sha256_hex(answer)})
        rename_file(layout.task_file("in_progress", attempt), layout.task_file("completed", attempt))
        layout.lease_file(attempt).unlink(missing_ok=True)
    sync_rename(layout.task_file("in_progress", attempt), layout.task_file("completed", attempt))
    return attempt


def release_planning(project: ProjectLayout, plan_id: str, *, holder: str, reason: str = "released") -> int:
    """Give the planning task back to ``pending/`` unanswered (same attempt); returns the attempt.

    Raises:
        NotFound, LeaseLost: the caller does not hold the task.
    """
    layout = PlanningLayout(project, plan_id)
    with layout.lock():
        attempt, _ = _held(layout, holder, None)
        rename_file(layout.task_file("in_progress", attempt), layout.task_file("pending", attempt))
        layout.lease_file(attempt).unlink(missing_ok=True)
    sync_rename(layout.task_file("in_progress", attempt), layout.task_file("pending", attempt))
    layout.audit_log.append("planning.released", {"attempt": attempt, "holder": holder, "reason": reason})
    return attempt


def read_verdict(project: ProjectLayout, plan_id: str, attempt: int) -> PlanningVerdict | None:
    """Conductor's verdict on ``attempt``, or None while it has not judged it."""
    layout = PlanningLayout(project, plan_id)
    for state in ("completed", "failed"):
        try:
            return read_document(layout.verdict_file(state, attempt), PlanningVerdict)
        except FileNotFoundError:
            continue
    return None


def wait_for_verdict(project: ProjectLayout, plan_id: str, attempt: int, *, timeout: float) -> PlanningVerdict | None:
    """Wait up to ``timeout`` seconds for Conductor's verdict on ``attempt``; None if none came.

    Raises:
        IntegrityError: the verdict file is malformed.
    """
    from conductor.handoff.watcher import FolderWatcher

    layout = PlanningLayout(project, plan_id)
    deadline = time.monotonic() + timeout
    with FolderWatcher([layout.dir / "completed", layout.dir / "failed"], kinds=("created", "moved")) as watcher:
        while True:
            verdict = read_verdict(project, plan_id, attempt)
            left = deadline - time.monotonic()
            if verdict is not None or left <= 0:
                return verdict
            watcher.wait(min(left, 0.5))


# --- Conductor's side ---------------------------------------------------------------------------


def project_facts(root: Path, *, policy: PolicyLayer, verification: Iterable[str]) -> ProjectFacts:
    """The facts a planning task carries: files (bounded), languages, verification commands, policy."""
    from conductor.planner import list_project_files
    from conductor.policy import merge_policies

    files = list_project_files(root)
    counts: dict[str, int] = {}
    for name in files:
        language = _LANGUAGES.get(Path(name).suffix.lower())
        if language:
            counts[language] = counts.get(language, 0) + 1
    languages = sorted(counts, key=lambda lang: (-counts[lang], lang))
    effective = merge_policies([("project", policy)]).effective
    return ProjectFacts(files=files[:MAX_FACT_FILES], files_total=len(files), languages=languages,
                        verification_commands=list(verification), policy=effective)


def plan_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a plan file, the answer's format (:class:`conductor.planner.PlanFile`)."""
    from conductor.planner import PlanFile

    schema = PlanFile.model_json_schema(mode="validation")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def planning_instruction(goal: str, strategies: int, plan_id: str) -> str:
    """The planning task's ``instruction``: the planner's brief and how to answer."""
    from conductor.planner import PLANNER_SYSTEM

    wanted = f"exactly {strategies} distinct strateg{'y' if strategies == 1 else 'ies'}"
    return (f"{PLANNER_SYSTEM}\n\nGoal: {goal}\n\nPropose {wanted} for the goal as a plan file (YAML or JSON) "
            "matching plan_schema: `strategies: [{name, description, steps: [{id, title, instruction, "
            "allowed_files, depends_on, confidence}]}]`. allowed_files are paths relative to the project root "
            "(no absolute paths, no `..`, nothing the policy protects). Answer with "
            f"`conductor task complete planning --plan {plan_id} --plan-file FILE` or the MCP tool submit_plan. "
            "A rejected answer is re-offered as a new attempt whose previous_rejections say why.")


@dataclass(frozen=True)
class Judgement:
    """Conductor's reading of an answer: the plan, or why there is none."""

    plan: Plan | None
    reasons: list[str]


def judge_answer(path: Path, *, plan_id: str, goal: str, strategies: int, project_policy: PolicyLayer,
                 source: str, planner_source: str | None = None) -> Judgement:
    """Check an answer as ``explore --plan FILE`` checks a plan file, plus the project's protected paths.

    Args:
        path: the answer file (``.json`` is parsed as strict JSON, anything else as YAML).
        source: how reasons name the answer (``a2.answer.yaml``).
        planner_source: the plan's ``planner.source`` (the answer's path relative to the project).

    Returns:
        The plan (goal: the task's own; strategies: the first ``strategies``), or the reasons it was refused.
    """
    from conductor.planner import PlanFile, build_plan
    from conductor.yamlutil import read_mapping_document, validate_document

    try:
        document = read_mapping_document(path, source=source)
        plan_file = validate_document(document, PlanFile)
        plan = build_plan(goal=goal, strategies=plan_file.strategies[:strategies], policy=plan_file.policy,
                          planner=PlannerInfo(kind="handoff", source=planner_source or source), source=source, plan_id=plan_id,
                          lines=document.lines)
    except ConfigError as exc:
        return Judgement(None, str(exc).split("; "))
    reasons = _protected_paths(plan, project_policy, source)
    return Judgement(None if reasons else plan, reasons)


def _protected_paths(plan: Plan, project_policy: PolicyLayer, source: str) -> list[str]:
    """A literal ``allowed_files`` path that the merged policy protects names a file no step may change."""
    from conductor.policy import matches_protected, merge_policies

    reasons = []
    for position, fork in enumerate(plan.forks):
        for step in fork.steps:
            try:
                merged = merge_policies([("project", project_policy), ("plan", plan.policy), ("step", step.policy)])
            except ConfigError as exc:
                reasons.append(f"{source}: strategies[{position}] {step.step_id}: {exc}")
                continue
            for entry in step.allowed_files:
                if entry.endswith("/") or any(c in entry for c in "*?[!"):
                    continue  # a pattern may cover unprotected files too; the verifier judges each change
                if matches_protected(entry, merged.effective.protected_patterns):
                    reasons.append(f"{source}: strategy {fork.strategy.name!r}, {step.step_id}: allowed_files entry "
                                   f"{entry!r} is protected by the policy ({', '.join(merged.effective.protected_patterns)}): "
                                   "no step may change it")
    return reasons


class PlanningRound:
    """Conductor's side of one planning task: publish, wait, judge, re-offer, give up.

    ``process_once()`` does one pass and ``run()`` loops it on folder events (watchdog) with a fallback
    poll, as the engine does for steps.
    """

    def __init__(
        self, project: ProjectLayout, *, plan_id: str, goal: str, strategies: int, facts: ProjectFacts,
        project_policy: PolicyLayer, max_attempts: int, lease_seconds: float, timeout_seconds: float,
        poll_seconds: float = 2.0, clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.layout = PlanningLayout(project, plan_id)
        self.project = project
        self.goal, self.strategies, self.facts = goal, strategies, facts
        self.project_policy = project_policy
        self.max_attempts, self.lease_seconds, self.poll_seconds = max_attempts, lease_seconds, poll_seconds
        self.timeout_seconds = timeout_seconds
        self._clock = clock
        self._deadline = clock() + timeout_seconds
        self._deadline_text = _time_after(timeout_seconds)
        self.rejections: list[Rejection] = []
        self.accepted: tuple[int, PlanningVerdict] | None = None

    # -- one pass --

    def publish(self, attempt: int) -> PlanningTask:
        """Publish attempt ``attempt`` into ``pending/`` (never over an existing file)."""
        for state in STATES:
            (self.layout.dir / state).mkdir(parents=True, exist_ok=True)
        task = PlanningTask(plan_id=self.layout.plan_id, attempt=attempt, max_attempts=self.max_attempts, goal=self.goal,
                            strategies=self.strategies,
                            instruction=planning_instruction(self.goal, self.strategies, self.layout.plan_id),
                            plan_schema=plan_schema(), facts=self.facts, previous_rejections=list(self.rejections),
                            deadline=self._deadline_text, waiter=_this_process(), created_at=utc_now())
        sealed = write_document(self.layout.task_file("pending", attempt), task, exclusive=True)
        self.layout.audit_log.append("planning.published", {
            "plan_id": self.layout.plan_id, "attempt": attempt, "goal": self.goal, "strategies": self.strategies,
            "checksum": sealed.checksum, "previous_rejections": len(self.rejections)})
        return sealed

    def process_once(self) -> Plan | None:
        """Reap an expired claim, judge answers that arrived, re-offer or give up; the accepted plan, if any.

        Raises:
            PlanningFailed: the last attempt was rejected, or the timeout passed (the task is withdrawn).
        """
        self._reap()
        for attempt in self.layout.attempts("completed"):
            if self.layout.verdict_file("completed", attempt).exists():
                continue
            plan = self._judge(attempt)
            if plan is not None:
                return plan
        if self._clock() >= self._deadline:
            self.withdraw("timeout", f"no acceptable plan within {self.timeout_seconds:g} s")
        return None

    def _reap(self) -> None:
        """Return an in-progress attempt whose lease ran out (or that never got one) to ``pending/``."""
        for attempt in self.layout.attempts("in_progress"):
            lease = _read_lease(self.layout, attempt)
            if lease is not None and not _expired(lease.expires_at):
                continue
            if lease is None:
                try:
                    age = time.time() - self.layout.task_file("in_progress", attempt).stat().st_ctime
                except FileNotFoundError:
                    continue
                if age < self.lease_seconds:
                    continue  # claimed a moment ago: its lease is being written
            with self.layout.lock():
                if _read_lease(self.layout, attempt) != lease:
                    continue  # renewed (or released) meanwhile
                try:
                    rename_file(self.layout.task_file("in_progress", attempt), self.layout.task_file("pending", attempt))
                except FileNotFoundError:
                    continue
                self.layout.lease_file(attempt).unlink(missing_ok=True)
            sync_rename(self.layout.task_file("in_progress", attempt), self.layout.task_file("pending", attempt))
            self.layout.audit_log.append("planning.lease_expired", {
                "attempt": attempt, "holder": lease.holder if lease else None,
                "why": "lease_expired" if lease else "no_lease"})

    def _judge(self, attempt: int) -> Plan | None:
        answer = self.layout.answer_file("completed", attempt)
        holder = self._answered_by(attempt)
        if answer is None:
            judgement = Judgement(None, [f"attempt {attempt} completed without an answer file"])
        else:
            judgement = judge_answer(answer, plan_id=self.layout.plan_id, goal=self.goal, strategies=self.strategies,
                                     project_policy=self.project_policy, source=answer.name,
                                     planner_source=self.project.relative(answer))
        digest = sha256_hex(answer.read_bytes()) if answer else None
        if judgement.plan is not None:
            verdict = PlanningVerdict(plan_id=self.layout.plan_id, attempt=attempt, accepted=True, answer_sha256=digest,
                                      holder=holder, decided_at=utc_now())
            sealed = write_document(self.layout.verdict_file("completed", attempt), verdict)
            self.layout.audit_log.append("planning.accepted", {
                "attempt": attempt, "holder": holder, "answer_sha256": digest, "verdict_checksum": sealed.checksum,
                "forks": len(judgement.plan.forks), "rejected_attempts": [r.attempt for r in self.rejections]})
            self.accepted = (attempt, sealed)
            return judgement.plan
        self.rejections.append(Rejection(attempt=attempt, reasons=judgement.reasons))
        last = attempt >= self.max_attempts
        verdict = PlanningVerdict(plan_id=self.layout.plan_id, attempt=attempt, accepted=False, reasons=judgement.reasons,
                                  answer_sha256=digest, holder=holder, next_attempt=None if last else attempt + 1,
                                  decided_at=utc_now())
        write_document(self.layout.verdict_file("failed", attempt), verdict)
        if answer is not None:
            durable_rename(answer, self.layout.dir / "failed" / answer.name)
        durable_rename(self.layout.task_file("completed", attempt), self.layout.task_file("failed", attempt))
        self.layout.audit_log.append("planning.rejected", {"attempt": attempt, "holder": holder, "reasons": judgement.reasons,
                                                          "answer_sha256": digest})
        if last:
            self.layout.audit_log.append("planning.failed", {"attempt": attempt, "reason": "max_attempts",
                                                              "message": f"{attempt} answer(s) rejected"})
            raise PlanningFailed(self._failure(f"every answer was rejected ({attempt} of {self.max_attempts} attempts)"))
        self.publish(attempt + 1)
        return None

    def _answered_by(self, attempt: int) -> str | None:
        try:
            events = self.layout.audit_log.events()
        except ConductorError:
            return None
        found = [e for e in events if e.type == "planning.answered" and e.data.get("attempt") == attempt]
        return found[-1].data.get("holder") if found else None

    def _failure(self, what: str) -> str:
        lines = [f"handoff planning of plan {self.layout.plan_id} failed: {what}"]
        for rejection in self.rejections:
            lines += [f"  attempt {rejection.attempt}: {reason}" for reason in rejection.reasons]
        return "\n".join(lines)

    def withdraw(self, reason: str, message: str) -> None:
        """End planning without a plan: the live attempt moves to ``failed/`` with ``reason``; audited.

        Raises:
            PlanningFailed: always (naming ``message`` and every earlier rejection).
        """
        with self.layout.lock():
            live = self.layout.live()
            if live is not None and not _finish_unanswered(self.layout, live[1], live[0], [f"{reason}: {message}"], holder=None):
                live = None
        self.layout.audit_log.append("planning.failed", {"attempt": live[1] if live else None, "reason": reason,
                                                          "message": message})
        raise PlanningFailed(self._failure(message))

    # -- the loop --

    def run(self, *, on_published: Callable[[PlanningTask], None] = lambda task: None) -> Plan:
        """Publish attempt 1 and wait until an answer is accepted.

        Raises:
            PlanningFailed: every attempt was rejected, or nobody answered within the timeout.
            KeyboardInterrupt: after withdrawing the task (``planning.failed``, reason ``interrupted``).
        """
        from conductor.handoff.watcher import FolderWatcher

        on_published(self.publish(1))
        try:
            with FolderWatcher([self.layout.dir / s for s in STATES], kinds=("created", "moved")) as watcher:
                while True:
                    plan = self.process_once()
                    if plan is not None:
                        return plan
                    left = self._deadline - self._clock()
                    watcher.wait(max(0.0, min(self.poll_seconds, left)))
        except KeyboardInterrupt:
            try:
                self.withdraw("interrupted", "planning was interrupted")
            except PlanningFailed:
                pass
            raise


def plan_by_handoff(
    project: ProjectLayout, *, goal: str, strategies: int, policy: PolicyLayer, verification: Iterable[str],
    max_attempts: int, lease_seconds: float, timeout_seconds: float, poll_seconds: float = 2.0,
    on_published: Callable[[PlanningTask], None] = lambda task: None,
) -> tuple[Plan, PlanningRound]:
    """Publish a planning task for ``goal`` and wait for an acceptable plan (not yet written to disk).

    Returns:
        The plan (``planner.kind`` ``handoff``, its id the planning folder's) and the round (its
        ``accepted`` attempt and verdict, its ``rejections``), for the plan's audit log.

    Raises:
        PlanningFailed: every attempt was rejected, or nobody answered within ``timeout_seconds``.
    """
    from conductor.planner import new_plan_id

    facts = project_facts(project.root, policy=policy, verification=verification)
    round_ = PlanningRound(project, plan_id=new_plan_id(), goal=goal, strategies=strategies, facts=facts,
                           project_policy=policy, max_attempts=max_attempts, lease_seconds=lease_seconds,
                           timeout_seconds=timeout_seconds, poll_seconds=poll_seconds)
    return round_.run(on_published=on_published), round_


# --- what `conductor task` and `conductor mcp` call -----------------------------------------------


def configured_lease_seconds(project: ProjectLayout, environ: Mapping[str, str] = os.environ) -> float:
    """``executor.lease_seconds`` of the project's config: the lease of a planning claim, renewed by every call."""
    from conductor.project import load_project

    return float(load_project(project, environ)[0].executor.lease_seconds)


def planning_target(project: ProjectLayout, plan_id: str | None, holder: str) -> str:
    """The plan id a planning call without ``plan_id`` means: the planning task ``holder`` holds, else the
    only one live.

    Raises:
        NotFound: no live planning task (or ``plan_id`` has none), or several (name one).
    """
    if plan_id is not None:
        if not PlanningLayout(project, plan_id).dir.is_dir():
            raise NotFound(f"no planning task for plan {plan_id!r}")
        return plan_id
    rows = planning_tasks(project)
    mine = [r["plan_id"] for r in rows if r["holder"] == holder]
    if len(mine) == 1:
        return mine[0]
    if len(rows) == 1:
        return rows[0]["plan_id"]
    if not rows:
        raise NotFound("no planning task waits for a plan")
    raise NotFound(f"several planning tasks ({', '.join(r['plan_id'] for r in rows)}): name the plan")


def held_planning(project: ProjectLayout, plan_id: str, *, holder: str, lease_seconds: float) -> PlanningClaim:
    """Renew ``holder``'s claim of the planning task of ``plan_id`` and return it (what ``show`` prints).

    Raises:
        NotFound, LeaseLost: as :func:`renew_planning`.
    """
    lease = renew_planning(project, plan_id, holder=holder, lease_seconds=lease_seconds)
    layout = PlanningLayout(project, plan_id)
    return PlanningClaim(layout, read_document(layout.task_file("in_progress", lease.attempt), PlanningTask), lease)


def submit_plan(project: ProjectLayout, plan_id: str | None, *, holder: str, answer: bytes, fmt: str,
                wait_seconds: float) -> dict[str, Any]:
    """Answer the planning task and wait up to ``wait_seconds`` for Conductor's verdict.

    Returns:
        ``{"kind": "planning", "plan_id", "attempt", "verdict": "accepted" | "rejected" | "pending",
        "reasons", "next_attempt"}``.

    Raises:
        ConfigError, NotFound, LeaseLost: as :func:`answer_planning` (nothing is written).
    """
    target = planning_target(project, plan_id, holder)
    attempt = answer_planning(project, target, holder=holder, answer=answer, fmt=fmt)
    verdict = wait_for_verdict(project, target, attempt, timeout=max(0.0, wait_seconds))
    outcome: dict[str, Any] = {"kind": "planning", "task_id": PLANNING_TASK_ID, "plan_id": target, "attempt": attempt}
    if verdict is None:
        return {**outcome, "verdict": "pending", "reasons": [], "next_attempt": None}
    return {**outcome, "verdict": "accepted" if verdict.accepted else "rejected", "reasons": list(verdict.reasons),
            "next_attempt": verdict.next_attempt}
