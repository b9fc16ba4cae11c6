"""Lessons: what a rejected attempt teaches the tasks that come after it.

Each rejection yields one short, structured lesson, appended to ``.conductor/lessons.jsonl`` (one JSON
object a line, under a lock, fsynced; see :func:`conductor.confidence.append_record`)::

    {"v": 1, "id": "<plan>/<fork>/<step>#<attempt>", "ts": "…", "plan_id": "…", "fork_id": "1",
     "step_id": "step_002", "attempt": 1, "kind": "policy_violation", "files": ["deps/poetry.lock"],
     "patterns": ["*.lock"], "checks": ["outside_protected_patterns"], "commands": [],
     "instruction": "<the step's instruction, first 160 characters>", "detail": "<why, ≤ 240 characters>",
     "text": "<the line a later task gets in its constraints, ≤ 400 characters>"}

``kind`` is ``policy_violation`` (a policy check failed: outside ``allowed_files``, a protected file, a
diff too large, an unsafe path or link), ``verification_failed`` (a verification command exited non-zero),
``executor_failure`` (the executor reported failure, its result was malformed or did not match the task,
or its lease ran out) or ``rejected`` (anything else: provenance, the medium-confidence check, a merge
conflict). Every text field is redacted (:func:`conductor.redact.redact`) and bounded.

When a step is published, :func:`lessons_for` picks the lessons relevant to it — a lesson's files are
covered by the step's ``allowed_files`` (4 points), a protected pattern the lesson hit matches one of
them (3), they share a folder (2), or a failing command of the lesson names one of them (1) — best
first, the most recent first among equals, a mistake repeated by several attempts once, at most
:data:`MAX_LESSONS` of them and :data:`MAX_LESSON_CHARS` characters in all. Their ``text`` lines start with :data:`LESSON_PREFIX`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from pathspec import GitIgnoreSpec

from conductor.confidence import (
    append_record,
    attempt_outcomes,
    kind_of,
    predicted_score,
    read_records,
    record_outcome,
    recorded_attempts,
)
from conductor.errors import ConductorError
from conductor.layout import ProjectLayout
from conductor.models import Event, StepSpec, Verdict, utc_now
from conductor.policy import matches_protected, validate_allowed_files
from conductor.redact import redact

LESSON_VERSION = 1
LESSON_PREFIX = "Lesson from "
KINDS = ("policy_violation", "verification_failed", "executor_failure", "rejected")
MAX_LESSONS = 3  # lessons a task gets at most
MAX_LESSON_CHARS = 1200  # characters of lesson text a task gets at most
MAX_SCAN = 2000  # only the newest lessons of the file are considered
_TEXT_CHARS, _DETAIL_CHARS, _INSTRUCTION_CHARS, _ITEM_CHARS, _ITEMS = 400, 240, 160, 200, 10
_POLICY_CHECKS = frozenset({"paths_safe", "within_allowed_files", "outside_protected_patterns", "diff_size"})
_EXECUTOR_REASONS = ("checksum_mismatch", "invalid_result", "result_mismatch", "workspace_error")
_REJECTED_ADVICE = (
    ("medium confidence", "Report exactly the files you changed."),
    ("merge_conflict", "Another step changed the same lines meanwhile: change only what this step needs."),
    ("provenance", "Sign the result's provenance with a key the project trusts."),
)
_PATTERN = re.compile(r"matches protected pattern '((?:[^'\\]|\\.)*)'")
_WILDCARD = re.compile(r"[*?\[]")


def _clip(text: str, limit: int) -> str:
    text = " ".join(redact(str(text)).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _items(values: Sequence[str]) -> list[str]:
    seen: list[str] = []
    for value in values:
        clipped = _clip(value, _ITEM_CHARS)
        if clipped and clipped not in seen:
            seen.append(clipped)
    return seen[:_ITEMS]


def _lesson(
    *, plan_id: str, fork_id: str, step_id: str, attempt: int, kind: str, files: Sequence[str], instruction: str,
    detail: str, advice: str, patterns: Sequence[str] = (), checks: Sequence[str] = (), commands: Sequence[str] = (),
) -> dict[str, Any]:
    label = kind.replace("_", " ")
    text = f"{LESSON_PREFIX}{step_id} of plan {plan_id} fork {fork_id} (attempt {attempt}, {label}): {detail}. {advice}"
    return {
        "v": LESSON_VERSION, "id": f"{plan_id}/{fork_id}/{step_id}#{attempt}", "ts": utc_now(),
        "plan_id": plan_id, "fork_id": fork_id, "step_id": step_id, "attempt": attempt, "kind": kind,
        "files": _items(files), "patterns": _items(patterns), "checks": _items(checks), "commands": _items(commands),
        "instruction": _clip(instruction, _INSTRUCTION_CHARS), "detail": _clip(detail, _DETAIL_CHARS),
        "text": _clip(text, _TEXT_CHARS),
    }


def lesson_from_verdict(verdict: Verdict, *, instruction: str, allowed_files: Sequence[str]) -> dict[str, Any] | None:
    """The lesson of a rejected verdict (None for an accepted one).

    Args:
        verdict: the verifier's decision on one attempt.
        instruction: the step's instruction (summarised into the lesson).
        allowed_files: the step's allowed files (the lesson's files when the attempt changed none).
    """
    if verdict.accepted:
        return None
    failed = [c.name for c in verdict.checks if not c.passed]
    changed = [c.path for c in verdict.files_changed]
    common = {"plan_id": verdict.plan_id, "fork_id": verdict.fork_id, "step_id": verdict.task_id,
              "attempt": verdict.attempt, "instruction": instruction}
    policy = [r for r in verdict.reasons if not r.startswith(("verification failed", "medium confidence", "provenance",
                                                              "merge_conflict", *_EXECUTOR_REASONS))]
    if _POLICY_CHECKS & set(failed) or any(r.startswith("unsafe_symlink") for r in verdict.reasons):
        named = [r.split(": ", 1)[0] for r in policy]
        files = [path for path in named if path in changed] or changed or list(allowed_files)
        patterns = [m.group(1) for r in policy for m in _PATTERN.finditer(r)]
        advice = (f"Do not modify files matching {', '.join(repr(p) for p in dict.fromkeys(patterns))}; "
                  if patterns else "") + "change only files inside allowed_files, within the policy's limits."
        return _lesson(**common, kind="policy_violation", files=files, patterns=patterns,
                       checks=[c for c in failed if c in _POLICY_CHECKS], detail="; ".join(policy) or "; ".join(verdict.reasons),
                       advice=advice)
    broken = [e for e in verdict.verification if e.exit_code != 0]
    if broken:
        tails = [_last_line(e.output_tail) for e in broken]
        detail = "; ".join(f"`{e.command}` exited {e.exit_code}" + (" (timeout)" if e.timed_out else "")
                           + (f": {tail}" if tail else "") for e, tail in zip(broken, tails, strict=True))
        if changed:
            detail = f"after changing {', '.join(changed[:5])}, {detail}"
        return _lesson(**common, kind="verification_failed", files=changed or list(allowed_files),
                       checks=["verification_commands"], commands=[e.command for e in broken], detail=detail,
                       advice="The change must make these commands pass.")
    if any(r.startswith(_EXECUTOR_REASONS) for r in verdict.reasons):
        return _lesson(**common, kind="executor_failure", files=changed or list(allowed_files), checks=failed,
                       detail="; ".join(verdict.reasons), advice="Answer with a complete, well-formed result for this task.")
    advice = next((text for prefix, text in _REJECTED_ADVICE if any(r.startswith(prefix) for r in verdict.reasons)),
                  "Avoid what got this attempt rejected.")
    return _lesson(**common, kind="rejected", files=changed or list(allowed_files), checks=failed,
                   detail="; ".join(verdict.reasons), advice=advice)


def lesson_from_failure(
    *, plan_id: str, fork_id: str, step_id: str, attempt: int, reason: str, message: str, instruction: str,
    allowed_files: Sequence[str],
) -> dict[str, Any]:
    """The lesson of an attempt the executor failed (``task.failed`` with a reason other than
    ``verification_rejected``: an error kind the executor reported, ``lease_expired``...)."""
    detail = f"the executor failed ({reason})" + (f": {message}" if message else "")
    advice = ("Finish well within the task's timeout." if reason in ("lease_expired", "timeout")
              else "Avoid what made the executor fail.")
    return _lesson(plan_id=plan_id, fork_id=fork_id, step_id=step_id, attempt=attempt, kind="executor_failure",
                   files=[entry for entry in allowed_files if not _WILDCARD.search(entry)], checks=[reason],
                   instruction=instruction, detail=detail, advice=advice)


def _last_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def record_lesson(path: Path, lesson: dict[str, Any]) -> None:
    """Append a lesson to ``lessons.jsonl`` (locked across threads and processes, fsynced).

    Raises:
        StorageError: the write failed.
    """
    append_record(path, lesson)


def read_lessons(path: Path) -> list[dict[str, Any]]:
    """The lessons in ``path``, oldest first, one per ``id`` (the first recorded); other lines are skipped."""
    lessons, seen = [], set()
    for entry in read_records(path):
        if entry.get("v") != LESSON_VERSION or not isinstance(entry.get("text"), str) or entry.get("id") in seen:
            continue
        seen.add(entry.get("id"))
        lessons.append(entry)
    return lessons


def lessons_of_step(path: Path, plan_id: str, fork_id: str, step_id: str) -> list[dict[str, Any]]:
    """The lessons a step's rejected attempts taught, oldest first."""
    return [lesson for lesson in read_lessons(path)
            if (lesson.get("plan_id"), lesson.get("fork_id"), lesson.get("step_id")) == (plan_id, fork_id, step_id)]


def relevance(lesson: dict[str, Any], allowed_files: Sequence[str]) -> int:
    """How relevant ``lesson`` is to a task with ``allowed_files`` (0: not at all; see the module docstring)."""
    return _TaskFiles(allowed_files).relevance(lesson)


class _TaskFiles:
    """A task's ``allowed_files``, compiled once for scoring every lesson against them."""

    def __init__(self, allowed_files: Sequence[str]) -> None:
        self.entries = list(allowed_files)
        self.literals = [e for e in self.entries if not _WILDCARD.search(e) and not e.endswith("/")]
        self.areas = {_area(e) for e in self.entries} - {""}
        self.protected: dict[str, bool] = {}  # pattern -> whether it protects one of the literal entries
        try:
            self.spec: GitIgnoreSpec | None = GitIgnoreSpec.from_lines(["/" + e for e in validate_allowed_files(self.entries)])
        except (ConductorError, ValueError, TypeError):
            self.spec = None  # an unsafe or broken entry: the file test matches nothing

    def covers(self, path: str) -> bool:
        # A lesson's paths were safe workspace paths when recorded; one edited into the file only scores.
        return self.spec is not None and self.spec.match_file(path)

    def hit_by(self, pattern: str) -> bool:
        if pattern not in self.protected:
            try:
                self.protected[pattern] = any(matches_protected(entry, [pattern]) for entry in self.literals)
            except ConductorError:
                self.protected[pattern] = False  # a broken pattern matches nothing
        return self.protected[pattern]

    def relevance(self, lesson: dict[str, Any]) -> int:
        files = [f for f in lesson.get("files", []) if isinstance(f, str)]
        score = 4 if any(self.covers(path) for path in files) else 0
        if any(self.hit_by(p) for p in lesson.get("patterns", []) if isinstance(p, str)):
            score += 3
        if _same_area({_area(f) for f in files} - {""}, self.areas):
            score += 2
        commands = " ".join(c for c in lesson.get("commands", []) if isinstance(c, str))
        if commands and any(_names(entry, commands) for entry in self.literals):
            score += 1
        return score


def _area(entry: str) -> str:
    """The folder an entry lives in (the part before any wildcard): ``src/app.py``, ``src/`` and
    ``src/**/*.py`` are all in ``src``; a top-level file is in ``""``."""
    static = _WILDCARD.split(entry, 1)[0]
    return static.rstrip("/") if static.endswith("/") else static.rpartition("/")[0]


def _same_area(ours: set[str], theirs: set[str]) -> bool:
    """Whether two sets of folders share one, or one holds another (the top level, ``""``, is left out
    by the callers: it would relate every pair of top-level files)."""
    return bool(ours & theirs) or any(a.startswith(b + "/") or b.startswith(a + "/") for a in ours for b in theirs)


def _names(entry: str, command: str) -> bool:
    stem = PurePosixPath(entry).stem
    # "test_app.py" names "app.py": an underscore separates words here.
    word = rf"(?<![A-Za-z0-9]){re.escape(stem)}(?![A-Za-z0-9])"
    return entry in command or (len(stem) >= 3 and re.search(word, command) is not None)


def lessons_for(
    path: Path, allowed_files: Sequence[str], *, limit: int = MAX_LESSONS, max_chars: int = MAX_LESSON_CHARS
) -> list[dict[str, Any]]:
    """The lessons of ``path`` relevant to a task with ``allowed_files``: most relevant first, then most
    recent; at most ``limit`` lessons and ``max_chars`` characters of ``text`` in all; a mistake that
    several attempts repeated (same kind and detail) once, the most recent."""
    task = _TaskFiles(allowed_files)
    scored = [(task.relevance(lesson), index, lesson) for index, lesson in enumerate(read_lessons(path)[-MAX_SCAN:])]
    chosen, seen, used = [], set(), 0
    for _score, _, lesson in sorted((s for s in scored if s[0] > 0), key=lambda s: (-s[0], -s[1])):
        text = lesson["text"]
        same = (lesson.get("kind"), lesson.get("detail"))  # one mistake repeated by several attempts
        if same in seen or used + len(text) > max_chars:
            continue
        chosen.append(lesson)
        seen.add(same)
        used += len(text)
        if len(chosen) == limit:
            break
    return chosen


def received_lessons(constraints: Sequence[str]) -> list[str]:
    """The lesson lines among a task's ``constraints``."""
    return [c for c in constraints if isinstance(c, str) and c.startswith(LESSON_PREFIX)]


# --- what the engine calls ----------------------------------------------------------------------


def learn_from_verdict(
    layout: ProjectLayout, verdict: Verdict, step: StepSpec, *, executor: str, model: str | None, predicted: float | None
) -> None:
    """Record a verdict's outcome in the history and, for a rejection, its lesson (each once per attempt).

    Args:
        executor: the executor kind; ``model``: ``provider/model`` of an ``llm`` executor, else None.
        predicted: the step's confidence score when published.

    Raises:
        StorageError: a write failed.
    """
    if (verdict.plan_id, verdict.fork_id, verdict.task_id, verdict.attempt) not in recorded_attempts(layout.history_file):
        record_outcome(layout.history_file, plan_id=verdict.plan_id, fork_id=verdict.fork_id, step_id=verdict.task_id,
                       executor=executor, accepted=verdict.accepted, attempt=verdict.attempt, model=model,
                       kind=kind_of(step), predicted=predicted)
    lesson = lesson_from_verdict(verdict, instruction=step.instruction, allowed_files=step.allowed_files)
    if lesson is not None and lesson["id"] not in {known.get("id") for known in read_lessons(layout.lessons_file)}:
        record_lesson(layout.lessons_file, lesson)


def learn_from_events(
    layout: ProjectLayout, plan_id: str, fork_id: str, steps: Sequence[StepSpec], events: Sequence[Event], *,
    executor: str, model: str | None,
) -> int:
    """Record every attempt outcome of a fork's log that the history lacks (expired leases, executor
    failures, and verdicts a crash kept from being recorded), with a lesson for each executor failure.

    Safe to call again: outcomes are keyed by (plan, fork, step, attempt) and lessons by their id.

    Returns:
        The number of outcomes recorded now.

    Raises:
        StorageError: a write failed.
    """
    recorded = recorded_attempts(layout.history_file)
    known = {lesson.get("id") for lesson in read_lessons(layout.lessons_file)}
    by_id = {step.step_id: step for step in steps}
    count = 0
    for step_id, attempt, outcome, event in attempt_outcomes(events):
        step = by_id.get(step_id)
        if step is None:
            continue
        if (plan_id, fork_id, step_id, attempt) not in recorded:
            record_outcome(layout.history_file, plan_id=plan_id, fork_id=fork_id, step_id=step_id, executor=executor,
                           accepted=outcome == "accepted", attempt=attempt, model=model, kind=kind_of(step),
                           outcome=outcome, predicted=predicted_score(events, step_id))
            count += 1
        if event.type in ("task.failed", "task.rejected") and f"{plan_id}/{fork_id}/{step_id}#{attempt}" not in known:
            reason = str(event.data.get("reason") or event.data.get("kind") or "failed")
            record_lesson(layout.lessons_file, lesson_from_failure(
                plan_id=plan_id, fork_id=fork_id, step_id=step_id, attempt=attempt, reason=reason,
                message=str(event.data.get("message", "")), instruction=step.instruction, allowed_files=step.allowed_files))
    return count


def task_constraints(layout: ProjectLayout, constraints: Sequence[str], allowed_files: Sequence[str]) -> list[str]:
    """A task's constraints: the policy's, then the lines of the lessons relevant to ``allowed_files``."""
    return [*constraints, *(lesson["text"] for lesson in lessons_for(layout.lessons_file, allowed_files))]
