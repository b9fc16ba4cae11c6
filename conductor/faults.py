"""Named crash points and injected I/O errors, for proving that a crash or a failing disk loses nothing.

Three environment variables, read once when this module is first imported (so unset variables cost one
``is None`` test per call):

``CONDUCTOR_CRASH_AT=<name>[:<n>]``
    The process dies at once with ``os._exit(137)`` — no ``finally`` blocks, no flushing, no lock
    release, exactly like ``kill -9`` — the ``n``-th time (default: the first) it reaches
    ``crash_point("<name>")``. ``<name>`` must be a key of :data:`CRASH_POINTS`.

``CONDUCTOR_FAULT=<op>:<errno>[:<n>][@<text>]``
    The ``n``-th (default: the first) operation ``<op>`` done through :mod:`conductor.fsutil` in this
    process raises ``OSError(<errno>)``; ``<op>`` is ``write``, ``fsync``, ``rename`` or ``link`` and
    ``<errno>`` is ``ENOSPC`` or ``EIO``. With ``@<text>``, only operations on a path containing ``<text>``
    count (``fsync:EIO:2@lease.json``: the second fsync of a lease). Only that one operation fails (a
    retry would succeed, so a test sees any code path that swallows the error and retries). A failing
    ``write`` first writes half of its bytes, as a real ``write(2)`` on a filling disk may.

``CONDUCTOR_CRASH_TRACE=<file>``
    Every crash point reached is appended to ``<file>`` as one line (its name), and every operation
    ``CONDUCTOR_FAULT`` could fail as ``io.<op>`` (the one it failed as ``io.<op>!<thread name>``), so a
    test can see which points a run reaches and how often, and choose where to crash or fail.

The suite in ``tests/fault/`` runs real processes with these variables and checks, after every crash,
that ``conductor resume`` finishes the plan with every step applied exactly once.

Errors: a malformed variable raises :class:`conductor.errors.ConfigError` at import, naming it.
"""

from __future__ import annotations

import errno as errno_codes
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass

from conductor.errors import ConfigError

CRASH_ENV = "CONDUCTOR_CRASH_AT"
FAULT_ENV = "CONDUCTOR_FAULT"
TRACE_ENV = "CONDUCTOR_CRASH_TRACE"
CRASH_EXIT_CODE = 137  # what a shell reports for a process killed by SIGKILL (128 + 9)
FAULT_OPS = ("write", "fsync", "rename", "link")
FAULT_ERRNOS = {"ENOSPC": errno_codes.ENOSPC, "EIO": errno_codes.EIO}

CRASH_POINTS: dict[str, str] = {
    # durable writes (conductor.fsutil): every document, lease, result, plan, snapshot goes through these
    "write.after_temp": "atomic write: temp file written and fsynced, not yet renamed over the target",
    "write.after_rename": "atomic write: renamed into place, folder not yet fsynced",
    "publish.after_temp": "exclusive create: temp file written and fsynced, not yet linked",
    "publish.after_link": "exclusive create: linked into place, temp not yet removed, folder not fsynced",
    "publish.after_dir_fsync": "exclusive create: complete and durable (a task: before task.published)",
    "rename.after_rename": "durable rename: renamed, folders not yet fsynced",
    # the plan
    "plan.after_plan_file": "plan.json created, plan.created not yet logged",
    "fork.after_workspace": "a fork's workspace copied, fork.created not yet logged",
    # publish, claim, heartbeat
    "publish.before_event": "a step's task published, task.published not yet logged",
    "claim.after_rename": "task renamed into in_progress/, no lease written yet",
    "claim.after_lease": "lease written, task.claimed not yet logged",
    "heartbeat.after_renew": "a lease renewed by the heartbeat",
    "execute.after_run": "the executor's work is done in the attempt workspace, nothing committed",
    # complete
    "complete.after_result": "result written, explanation not yet",
    "complete.after_explanation": "explanation written, provenance not yet",
    "complete.before_task_move": "every sidecar written, the task file not yet moved (not committed)",
    "complete.after_task_move": "task moved (committed), lease not yet removed",
    "complete.before_event": "completion committed and lease removed, task.completed not yet logged",
    # reaper
    "reaper.after_expired_event": "task.lease_expired logged, task not yet parked",
    "reaper.after_park": "expired task parked as .requeue, retry not yet published",
    "reaper.after_republish": "retry published to pending/, task.published not yet logged",
    "reaper.before_unpark": "retry published and logged, parked file not yet removed",
    # verify
    "verify.after_merge": "accepted change set merged into a new fork commit, verdict not yet written",
    "verify.after_verdict": "verdict written, step.verified not yet logged",
    "verify.after_reject_verdict": "rejection verdict written in failed/, sidecars and task not yet moved",
    "verify.before_reject_move": "rejection: sidecars moved to failed/, the task file not yet (not committed)",
    "verify.after_logged": "step.verified logged, step.merged / task.failed not yet",
    # self-repair (conductor.repair): a failed attempt archived and retried
    "repair.after_evidence": "a failed attempt's evidence written to attempts/, its files still in failed/",
    "repair.before_task_archive": "a failed attempt's sidecars moved to attempts/, its task file not yet",
    "repair.after_archive": "a failed attempt archived, task.retried not yet logged",
    "repair.before_publish": "task.retried logged, the retry not yet published",
    "repair.after_publish": "the retry published to pending/, task.published not yet logged",
    # the end of a plan
    "rank.after_ranked": "plan.ranked logged, the winner not yet applied",
    "apply.after_intent": "apply intent recorded, no project file changed yet",
    "apply.after_file": "the winner half applied: a project file written, the others not yet",
    "apply.after_files": "every project file written, the intent not yet removed",
    "apply.before_event": "the winner applied and its intent removed, plan.applied not yet logged",
    "plan.before_finished": "plan.applied logged, plan.finished not yet",
    # the audit log
    "audit.after_write": "an audit line written, not yet fsynced",
}
"""Every crash point: name → where the process is when it dies there. A test checks that each name is
used in the source and that every ``crash_point("…")`` call uses a registered name."""


@dataclass(frozen=True)
class _Trigger:
    name: str
    nth: int


def _parse_count(text: str, variable: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"{variable}: count {text!r} is not a positive integer")
    return int(text)


def _parse_crash(value: str | None) -> _Trigger | None:
    if not value:
        return None
    name, _, count = value.partition(":")
    if name not in CRASH_POINTS:
        raise ConfigError(f"{CRASH_ENV}={value!r}: unknown crash point (known: {', '.join(sorted(CRASH_POINTS))})")
    return _Trigger(name, _parse_count(count, CRASH_ENV) if count else 1)


@dataclass(frozen=True)
class _Fault:
    op: str
    errno: int
    nth: int
    where: str  # "" = any path


def _parse_fault(value: str | None) -> _Fault | None:
    if not value:
        return None
    spec, _, where = value.partition("@")
    parts = spec.split(":")
    if len(parts) not in (2, 3) or parts[0] not in FAULT_OPS or parts[1] not in FAULT_ERRNOS:
        raise ConfigError(
            f"{FAULT_ENV}={value!r}: expected <op>:<errno>[:<n>][@<text>] with op in {'|'.join(FAULT_OPS)} "
            f"and errno in {'|'.join(FAULT_ERRNOS)}"
        )
    nth = _parse_count(parts[2], FAULT_ENV) if len(parts) == 3 else 1
    return _Fault(parts[0], FAULT_ERRNOS[parts[1]], nth, where)


_lock = threading.Lock()
_crash: _Trigger | None = None
_fault: _Fault | None = None
_trace: int | None = None  # an O_APPEND descriptor of CONDUCTOR_CRASH_TRACE's file
_counts: dict[str, int] = {}


def configure(environ: Mapping[str, str] = os.environ) -> None:
    """(Re)read the three variables from ``environ`` and reset every counter (done once at import).

    Raises:
        ConfigError: a variable is malformed or names an unknown crash point.
    """
    global _crash, _fault, _trace
    crash, fault = _parse_crash(environ.get(CRASH_ENV)), _parse_fault(environ.get(FAULT_ENV))
    trace_file = environ.get(TRACE_ENV)
    with _lock:
        if _trace is not None:
            os.close(_trace)
        _trace = os.open(trace_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if trace_file else None
        _crash, _fault = crash, fault
        _counts.clear()


def _count(key: str) -> int:
    with _lock:
        _counts[key] = _counts.get(key, 0) + 1
        return _counts[key]


def crash_point(name: str) -> None:
    """Die here with exit status 137 if ``CONDUCTOR_CRASH_AT`` names this point (and this is the n-th hit).

    Args:
        name: a key of :data:`CRASH_POINTS`.
    """
    trigger, trace = _crash, _trace
    if trace is not None:
        os.write(trace, name.encode("ascii") + b"\n")  # one write on O_APPEND: lines never interleave
    if trigger is None or trigger.name != name:
        return
    if _count("crash:" + name) == trigger.nth:
        os._exit(CRASH_EXIT_CODE)  # no cleanup on purpose: this is what kill -9 leaves behind


def io_fault(op: str, path: object = None) -> OSError | None:
    """The error the n-th ``op`` must fail with under ``CONDUCTOR_FAULT``, or None (called by fsutil).

    Args:
        op: ``"write"``, ``"fsync"``, ``"rename"`` or ``"link"``.
        path: the file concerned, for the error's message (and ``@<text>`` matching).
    """
    fault, trace = _fault, _trace
    if trace is not None:
        os.write(trace, f"io.{op}\n".encode("ascii"))
    if fault is None or fault.op != op or (fault.where and fault.where not in str(path)):
        return None
    if _count("fault:" + op) != fault.nth:
        return None
    if trace is not None:  # which thread it hit: an error in a worker thread may surface differently
        os.write(trace, f"io.{op}!{threading.current_thread().name}\n".encode("utf-8", "replace"))
    code = fault.errno
    return OSError(code, f"{os.strerror(code)} (injected by {FAULT_ENV})", None if path is None else str(path))


configure()
