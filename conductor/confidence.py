"""Pre-execution confidence of a step: the planner's estimate, tempered by what this project has learned.

The model (documented with its sources in docs/confidence.md):

1. ``prior`` = the planner's own estimate for the step, or 0.7 when it gave none.
2. Every outcome of every attempt is kept in ``.conductor/history.jsonl`` (:func:`record_outcome`),
   labelled with the executor kind, the provider/model of an ``llm`` executor and the kind of step
   (:func:`step_kind`: role, file types, breadth of ``allowed_files``).
3. The learned rate of the step's group is estimated down a hierarchy of nested groups, broad to
   narrow — all outcomes → executor kind → provider/model → kind of step (:func:`learn`). The root
   uses Laplace's rule of succession, ``(a + 1) / (n + 2)``; each narrower level shrinks its own
   outcomes towards the broader estimate, ``(a + K · broader) / (n + K)`` with ``K`` =
   :data:`PRIOR_STRENGTH` pseudo-outcomes (a Beta prior centred on the broader group: the back-off of a
   group with little history). Each outcome is counted once, at the narrowest level it belongs to.
4. The evidence behind the estimate is the group's own count plus what it borrows from the broader
   group, at most ``K``: ``e = n + K · e_broader / (e_broader + K)``. The blend weight is
   ``w = e / (e + 10)``, so ten outcomes' worth of evidence weighs as much as the planner;
   ``score = (1 − w) · prior + w · rate``.
5. A wide scope costs confidence: minus 0.03 for each allowed-file entry beyond three, and minus 0.1 for
   any wildcard or folder entry, at most 0.2 in all; the score is clamped to [0, 1] and rounded to 3
   decimals.

With a single group (the ``accepted``/``total`` arguments of :func:`score_step`) this is exactly the
earlier one-rate-per-executor scorer. History lines in the earlier format (no ``v``) are read as outcomes
of their executor kind only. Levels: high ≥ 0.8 (runs autonomously), medium ≥ 0.5 (runs with extra
verification), low below 0.5 (waits for ``conductor approve``).
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from conductor.fsutil import fsync_dir, fsync_fd, flocked, write_all
from conductor.models import Confidence, ConfidenceLevel, Event, StepSpec, utc_now

DEFAULT_PRIOR = 0.7
HISTORY_WEIGHT_HALF = 10  # outcomes' worth of evidence at which history weighs as much as the planner
PRIOR_STRENGTH = 4.0  # K: pseudo-outcomes a narrower group borrows from its parent
HIGH, MEDIUM = 0.8, 0.5
HISTORY_VERSION = 2
OUTCOMES = ("accepted", "rejected", "executor_failed", "lease_expired")

_ROLES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("test", ("test", "tests", "testing", "spec", "specs", "pytest", "coverage")),
    ("docs", ("doc", "docs", "documentation", "document", "readme", "changelog", "docstring", "docstrings")),
    ("fix", ("fix", "fixes", "bug", "bugfix", "repair", "correct", "broken", "regression")),
    ("refactor", ("refactor", "rename", "cleanup", "clean", "simplify", "extract", "restructure", "move")),
    ("config", ("config", "configuration", "ci", "build", "dependency", "dependencies", "packaging", "setup")),
    ("feature", ("add", "implement", "create", "feature", "support", "new", "introduce")),
)
_WORD = re.compile(r"[a-z]+")
_WILDCARD = re.compile(r"[*?\[]")


def level_for(score: float) -> ConfidenceLevel:
    """The level of a score: high ≥ 0.8, medium ≥ 0.5, low otherwise."""
    if score >= HIGH:
        return "high"
    if score >= MEDIUM:
        return "medium"
    return "low"


# --- kinds of steps -----------------------------------------------------------------------------


def step_role(title: str, allowed_files: Sequence[str] = ()) -> str:
    """The role of a step from its title's keywords (first listed role wins), else from its files.

    Returns:
        One of ``test``, ``docs``, ``fix``, ``refactor``, ``config``, ``feature``, ``general``.
    """
    words = set(_WORD.findall(title.lower()))
    for role, keywords in _ROLES:
        if words & set(keywords):
            return role
    names = [PurePosixPath(entry.rstrip("/")).name.lower() for entry in allowed_files]
    if names and all(n.startswith("test") or n.endswith(("_test.py", ".test.js", ".test.ts", ".spec.ts")) for n in names):
        return "test"
    if names and all(n.endswith((".md", ".rst", ".adoc")) for n in names):
        return "docs"
    return "general"


def file_types(allowed_files: Sequence[str]) -> str:
    """The file types of ``allowed_files``: sorted suffixes joined by ``+`` (``.md+.py``), ``dir`` for a
    folder entry, ``none`` for a name without one, ``mixed`` beyond three types, ``-`` for no entry."""
    types = set()
    for entry in allowed_files:
        if entry.endswith("/") or entry.endswith("/**"):
            types.add("dir")
            continue
        suffix = PurePosixPath(entry).suffix.lower()
        types.add(suffix if suffix and not _WILDCARD.search(suffix) else ("dir" if entry.endswith("*") else "none"))
    if not types:
        return "-"
    return "+".join(sorted(types)) if len(types) <= 3 else "mixed"


def breadth(allowed_files: Sequence[str]) -> str:
    """``none`` (no entry), ``single`` (one file), ``few`` (2–3 files), ``many`` (more), or ``glob`` (any
    wildcard or folder entry)."""
    if any(_WILDCARD.search(entry) or entry.endswith("/") for entry in allowed_files):
        return "glob"
    count = len(allowed_files)
    return "none" if count == 0 else "single" if count == 1 else "few" if count <= 3 else "many"


def kind_of(step: StepSpec) -> str:
    """:func:`step_kind` of a planned step: its title, or the start of its instruction when untitled."""
    return step_kind(step.title or step.instruction[:200], step.allowed_files)


def step_kind(title: str, allowed_files: Sequence[str]) -> str:
    """The kind of a step, the narrowest group of the history: ``"<role> <types> <breadth>"``,
    e.g. ``"test .py single"`` (see :func:`step_role`, :func:`file_types`, :func:`breadth`)."""
    return f"{step_role(title, allowed_files)} {file_types(allowed_files)} {breadth(allowed_files)}"


# --- the history file ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """One recorded outcome of one attempt (a line of ``history.jsonl``).

    ``model`` is ``provider/model`` for an ``llm`` executor, else None; ``kind`` is :func:`step_kind`;
    both are None on lines of the earlier format. ``predicted`` is the step's confidence score when it
    was published (None if unknown). ``outcome`` is one of :data:`OUTCOMES`.
    """

    executor: str
    accepted: bool
    model: str | None = None
    kind: str | None = None
    attempt: int | None = None
    outcome: str = ""
    predicted: float | None = None
    plan_id: str = ""
    fork_id: str = ""
    step_id: str = ""
    ts: str = ""


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` as one JSON line to ``path``, durably, locked across threads and processes.

    The line is written under an exclusive ``flock`` of ``<path>.lock`` (each call opens its own
    descriptor, so threads exclude each other too) and fsynced. A torn last line a crash left behind is
    closed with a newline first, so it costs only itself; a failed write is cut back off.

    Raises:
        StorageError: the write or fsync failed (nothing of this record stays in the file).
    """
    line = (json.dumps(record, ensure_ascii=False, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    with flocked(path.with_name(path.name + ".lock")):
        created = not path.exists()
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line
            try:
                write_all(fd, line, path)
                fsync_fd(fd, path)
            except BaseException:
                os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)
        if created:
            fsync_dir(path.parent)


@dataclass(frozen=True)
class _Parsed:
    """What one process has parsed of an append-only JSON-lines file: its items up to ``offset`` (just
    after the last complete line), for the file with this device and inode."""

    dev: int
    ino: int
    offset: int
    items: tuple[Any, ...]


_parsed: dict[tuple[str, Any], _Parsed] = {}
_parsed_lock = threading.Lock()


def _appended(path: Path, convert: Callable[[dict[str, Any]], Any]) -> list[Any]:
    """``convert`` of every JSON object line of ``path`` (None results and other lines skipped), in order.

    Both files are append-only, so a process parses only the lines added since its last call; a file
    that was replaced or shrank (deleted, rewritten, a failed append cut back) is parsed again whole.
    A last line without its newline (being written, or torn) waits for the next call.
    """
    key = (str(path), convert)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        with _parsed_lock:
            _parsed.pop(key, None)
        return []
    try:
        stat = os.fstat(fd)
        with _parsed_lock:
            known = _parsed.get(key)
        if known is None or (known.dev, known.ino) != (stat.st_dev, stat.st_ino) or stat.st_size < known.offset:
            known = _Parsed(stat.st_dev, stat.st_ino, 0, ())
        chunks, position = [], known.offset
        while position < stat.st_size:
            chunk = os.pread(fd, stat.st_size - position, position)
            if not chunk:
                break
            chunks.append(chunk)
            position += len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    complete = data.rfind(b"\n") + 1
    items = list(known.items)
    for line in data[:complete].decode("utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        item = convert(entry) if isinstance(entry, dict) else None
        if item is not None:
            items.append(item)
    with _parsed_lock:
        _parsed[key] = _Parsed(known.dev, known.ino, known.offset + complete, tuple(items))
    return items


def _record(entry: dict[str, Any]) -> dict[str, Any]:
    return entry


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every JSON object line of ``path`` in order; a missing file is empty, other lines are skipped.

    The dicts are shared with later calls of this process: do not change them.
    """
    return _appended(path, _record)


def _outcome(entry: dict[str, Any]) -> Outcome | None:
    executor = entry.get("executor")
    if not isinstance(executor, str) or not isinstance(entry.get("accepted"), bool):
        return None
    attempt = entry.get("attempt")
    predicted = entry.get("predicted")
    text = {name: entry.get(name) if isinstance(entry.get(name), str) else None for name in ("model", "kind")}
    return Outcome(
        executor=executor, accepted=entry["accepted"], model=text["model"], kind=text["kind"],
        attempt=attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else None,
        outcome=str(entry.get("outcome") or ("accepted" if entry["accepted"] else "rejected")),
        predicted=float(predicted) if isinstance(predicted, (int, float)) and not isinstance(predicted, bool)
        and 0.0 <= predicted <= 1.0 else None,
        plan_id=str(entry.get("plan_id", "")), fork_id=str(entry.get("fork_id", "")),
        step_id=str(entry.get("step_id", "")), ts=str(entry.get("ts", "")),
    )


def read_outcomes(path: Path) -> list[Outcome]:
    """Every outcome in the history file, both formats; an attempt recorded twice counts once.

    A line of the earlier format (``{"ts", "plan_id", "fork_id", "step_id", "executor", "accepted"}``)
    has no attempt and is never merged with another. Lines that do not parse are skipped.
    """
    outcomes, seen = [], set()
    for outcome in _appended(path, _outcome):
        if outcome.attempt is not None:
            key = (outcome.plan_id, outcome.fork_id, outcome.step_id, outcome.attempt)
            if key in seen:
                continue
            seen.add(key)
        outcomes.append(outcome)
    return outcomes


def recorded_attempts(path: Path) -> set[tuple[str, str, str, int]]:
    """``(plan_id, fork_id, step_id, attempt)`` of every outcome already in the history file."""
    return {(o.plan_id, o.fork_id, o.step_id, o.attempt) for o in read_outcomes(path) if o.attempt is not None}


def read_history(path: Path, executor: str) -> tuple[int, int]:
    """(accepted, total) outcomes recorded for ``executor``, both formats; unreadable lines are skipped."""
    mine = [o for o in read_outcomes(path) if o.executor == executor]
    return sum(o.accepted for o in mine), len(mine)


def record_outcome(
    path: Path, *, plan_id: str, fork_id: str, step_id: str, executor: str, accepted: bool,
    attempt: int | None = None, model: str | None = None, kind: str | None = None, outcome: str | None = None,
    predicted: float | None = None,
) -> None:
    """Append one outcome to the history file (see :func:`append_record`: locked, fsynced).

    Args:
        attempt: the attempt number (1 for the first); ``(plan, fork, step, attempt)`` is the key that
            makes recording again after a crash harmless.
        model: ``provider/model`` of an ``llm`` executor, else None.
        kind: :func:`step_kind` of the step.
        outcome: one of :data:`OUTCOMES` (default: accepted or rejected by ``accepted``).
        predicted: the step's confidence score when published, for ``conductor confidence report``.

    Raises:
        ValueError: ``outcome`` is not one of :data:`OUTCOMES`.
        StorageError: the write failed.
    """
    outcome = outcome or ("accepted" if accepted else "rejected")
    if outcome not in OUTCOMES:
        raise ValueError(f"unknown outcome {outcome!r}: expected one of {', '.join(OUTCOMES)}")
    append_record(path, {
        "v": HISTORY_VERSION, "ts": utc_now(), "plan_id": plan_id, "fork_id": fork_id, "step_id": step_id,
        "attempt": attempt, "executor": executor, "model": model, "kind": kind, "outcome": outcome,
        "accepted": accepted, "predicted": predicted,
    })


def predicted_score(events: Sequence[Event], step_id: str) -> float | None:
    """The score of the step's newest ``confidence.scored`` event in a fork's log, or None."""
    for event in reversed(events):
        if event.type == "confidence.scored" and event.data.get("step_id") == step_id:
            score = event.data.get("score")
            return float(score) if isinstance(score, (int, float)) and not isinstance(score, bool) else None
    return None


def attempt_outcomes(events: Sequence[Event]) -> list[tuple[str, int, str, Event]]:
    """``(step_id, attempt, outcome, event)`` of every attempt a fork's log settles, first event per attempt.

    ``step.verified`` gives ``accepted`` or ``rejected``; ``task.lease_expired`` and ``task.failed`` with
    reason ``lease_expired`` give ``lease_expired``; ``task.rejected`` and any other ``task.failed``
    (an executor's own failure, a malformed result) give ``executor_failed``. ``task.failed`` with
    reason ``verification_rejected`` follows its ``step.verified`` and adds nothing.
    """
    found: dict[tuple[str, int], tuple[str, int, str, Event]] = {}
    for event in events:
        step_id, attempt = event.data.get("step_id"), event.data.get("attempt")
        if not isinstance(step_id, str) or not isinstance(attempt, int) or isinstance(attempt, bool):
            continue
        if event.type == "step.verified":
            outcome = "accepted" if event.data.get("accepted") is True else "rejected"
        elif event.type == "task.lease_expired" or (event.type == "task.failed" and event.data.get("reason") == "lease_expired"):
            outcome = "lease_expired"
        elif event.type == "task.rejected" or (event.type == "task.failed" and event.data.get("reason") != "verification_rejected"):
            outcome = "executor_failed"
        else:
            continue
        found.setdefault((step_id, attempt), (step_id, attempt, outcome, event))
    return list(found.values())


# --- learning -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupRate:
    """One group of the hierarchy: its label, its counts, and its smoothed estimate and evidence."""

    label: str
    accepted: int
    total: int
    estimate: float
    evidence: float


@dataclass(frozen=True)
class Learned:
    """The learned success rate of a step's group: ``groups`` from broadest to narrowest; the last one
    is the step's own group, whose estimate and evidence the score uses."""

    groups: list[GroupRate] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.groups[-1].estimate if self.groups else 0.5

    @property
    def evidence(self) -> float:
        return self.groups[-1].evidence if self.groups else 0.0


def _levels(executor: str, model: str | None, kind: str | None) -> list[tuple[str, Any]]:
    """(label, test) for each group of the hierarchy, broadest first; an outcome in a group passes the
    tests of every level up to it."""
    levels: list[tuple[str, Any]] = [("all", None), (executor, lambda o: o.executor == executor)]
    if model is not None:
        levels.append((f"{executor} · {model}", lambda o: o.model == model))
    if kind is not None:
        levels.append((f"{executor}" + (f" · {model}" if model else "") + f" · {kind}",
                       lambda o: o.model == model and o.kind == kind))
    return levels


def learn(outcomes: Iterable[Outcome], *, executor: str, model: str | None = None, kind: str | None = None) -> Learned:
    """The hierarchical estimate for a step run by ``executor`` (``model``) of kind ``kind``.

    The groups are nested (all ⊇ executor ⊇ model ⊇ kind), so each outcome is used once, in the
    narrowest group it belongs to: the root estimate is Laplace's rule of succession over the outcomes
    outside the executor's group, ``(a + 1) / (n + 2)``, evidence ``n``; each narrower level then adds the
    outcomes of its group that are not in the next one, ``p = (a + K · p_broader) / (n + K)`` and
    ``e = n + K · e_broader / (e_broader + K)`` (K = :data:`PRIOR_STRENGTH`). Counting a narrow group's
    outcomes again in every broader level would make five failures look like twenty. A None ``model`` or
    ``kind`` skips that level.

    Returns:
        The groups broadest first, each with its own (inclusive) counts and the estimate and evidence
        reached at that level; the last is the step's group.
    """
    levels = _levels(executor, model, kind)
    tests = [test for _, test in levels[1:]]
    ring_accepted, ring_total = [0] * len(levels), [0] * len(levels)
    for outcome in outcomes:
        depth = 0
        for test in tests:
            if not test(outcome):
                break
            depth += 1
        ring_total[depth] += 1
        ring_accepted[depth] += outcome.accepted
    groups: list[GroupRate] = []
    for index, (label, _) in enumerate(levels):
        a, n = ring_accepted[index], ring_total[index]
        if not groups:
            estimate, evidence = (a + 1) / (n + 2), float(n)
        else:
            broader = groups[-1]
            estimate = (a + PRIOR_STRENGTH * broader.estimate) / (n + PRIOR_STRENGTH)
            evidence = n + PRIOR_STRENGTH * broader.evidence / (broader.evidence + PRIOR_STRENGTH)
        groups.append(GroupRate(label, sum(ring_accepted[index:]), sum(ring_total[index:]), estimate, evidence))
    return Learned(groups)


def _flat(accepted: int, total: int) -> Learned:
    return Learned([GroupRate("history", accepted, total, (accepted + 1) / (total + 2), float(total))])


def score_step(
    *, estimate: float | None, allowed_files: list[str], learned: Learned | None = None, accepted: int = 0,
    total: int = 0,
) -> Confidence:
    """Score one step before it runs (see the module docstring for the formula).

    Args:
        estimate: the planner's probability that the step succeeds, in [0, 1], or None.
        allowed_files: the step's allowed-file entries.
        learned: the step's group from :func:`learn`; None uses the single group ``accepted``/``total``.
        accepted: with no ``learned``: accepted outcomes of the one group.
        total: with no ``learned``: all outcomes of that group.

    Returns:
        The confidence with the reasons for its value (which group, how many outcomes, the weight).
    """
    learned = learned if learned is not None else _flat(accepted, total)
    prior = DEFAULT_PRIOR if estimate is None else estimate
    reasons = [f"planner estimate {prior:.2f}" + (" (default)" if estimate is None else "")]
    evidence = learned.evidence
    weight = evidence / (evidence + HISTORY_WEIGHT_HALF)
    score = (1 - weight) * prior + weight * learned.rate
    if evidence > 0:
        reasons.append(_history_reason(learned, weight))
    else:
        reasons.append("no history yet")
    penalty = 0.03 * max(0, len(allowed_files) - 3)
    if any(_WILDCARD.search(entry) for entry in allowed_files) or any(e.endswith("/") for e in allowed_files):
        penalty += 0.1
    penalty = min(penalty, 0.2)
    if penalty:
        reasons.append(f"wide scope −{penalty:.2f}")
    score = round(min(1.0, max(0.0, score - penalty)), 3)
    return Confidence(score=score, level=level_for(score), reasons=reasons)


def _history_reason(learned: Learned, weight: float) -> str:
    own = learned.groups[-1]
    counts = f"{own.accepted}/{own.total} accepted → {own.estimate:.2f}"
    if len(learned.groups) == 1:
        return f"{own.label} {counts}, weight {weight:.2f}"
    broader = ", ".join(f"{g.label} {g.accepted}/{g.total}" for g in learned.groups[-2::-1])
    return f"history of {own.label}: {counts} (backs off to {broader}), weight {weight:.2f}"


# --- calibration --------------------------------------------------------------------------------

_LEVEL_RANGES = (("low", 0.0, MEDIUM), ("medium", MEDIUM, HIGH), ("high", HIGH, 1.0))


def _bucket(rows: list[tuple[float, bool]], low: float, high: float, **label: Any) -> dict[str, Any]:
    count = len(rows)
    return {**label, "range": [low, high], "count": count,
            "mean_predicted": round(sum(p for p, _ in rows) / count, 4) if count else None,
            "observed_rate": round(sum(y for _, y in rows) / count, 4) if count else None}


def calibration(outcomes: Iterable[Outcome], *, bins: int = 10) -> dict[str, Any]:
    """How well past scores predicted outcomes: a reliability table and the Brier score.

    Each outcome recorded with the score its step was published with (``predicted``) is one forecast
    ``p`` of the event "this attempt is accepted" (``y`` = 1) or not (``y`` = 0); every attempt counts,
    repairs and expired leases included. The Brier score is ``mean((p − y)²)`` (Brier 1950: 0 is perfect;
    always forecasting 0.5 scores 0.25). The reference is the climatological forecast, the base rate
    ``ȳ`` for everyone, whose Brier score is ``ȳ(1 − ȳ)``; the skill score is ``1 − brier / reference``.
    The reliability table (the numbers of a reliability diagram, DeGroot & Fienberg 1983) groups the
    forecasts into ``bins`` equal-width buckets (a score of exactly 1 falls into the last) and into the
    three confidence levels; a well-calibrated scorer's observed rate matches its mean forecast.

    Args:
        outcomes: from :func:`read_outcomes`; those without ``predicted`` are only counted.
        bins: number of equal-width buckets over [0, 1], 1 to 100.

    Returns:
        ``{"forecasts": n, "without_prediction": m, "base_rate": ȳ|None, "brier": b|None,
        "reference_brier": r|None, "skill": s|None, "outcomes": {outcome: n of the forecasts},
        "buckets": [{"range": [lo, hi], "count", "mean_predicted", "observed_rate"}],
        "levels": [{"level", "range", "count", "mean_predicted", "observed_rate"}]}``; figures rounded to
        4 decimals, None where there is nothing to average.

    Raises:
        ValueError: ``bins`` is outside 1..100.
    """
    if not 1 <= bins <= 100:
        raise ValueError(f"bins must be between 1 and 100, not {bins}")
    outcomes = list(outcomes)
    rows = [(o.predicted, o.accepted) for o in outcomes if o.predicted is not None]
    counts: dict[str, int] = {}
    for outcome in outcomes:
        if outcome.predicted is not None:
            counts[outcome.outcome] = counts.get(outcome.outcome, 0) + 1
    n = len(rows)
    base = sum(y for _, y in rows) / n if n else None
    brier = sum((p - y) ** 2 for p, y in rows) / n if n else None
    reference = base * (1 - base) if base is not None else None
    skill = 1 - brier / reference if brier is not None and reference else None
    width = 1 / bins
    # Scores have 3 decimals: bucket on thousandths, so 0.3 is in [0.3, 0.4) despite 0.3 * 10 = 2.9999…
    index = [min(int(round(p * 1000)) * bins // 1000, bins - 1) for p, _ in rows]
    buckets = [_bucket([row for row, i in zip(rows, index, strict=True) if i == b], round(b * width, 4),
                       round((b + 1) * width, 4)) for b in range(bins)]
    levels = [_bucket([(p, y) for p, y in rows if level_for(p) == name], low, high, level=name)
              for name, low, high in _LEVEL_RANGES]
    return {"forecasts": n, "without_prediction": len(outcomes) - n,
            "base_rate": round(base, 4) if base is not None else None,
            "brier": round(brier, 4) if brier is not None else None,
            "reference_brier": round(reference, 4) if reference is not None else None,
            "skill": round(skill, 4) if skill is not None else None,
            "outcomes": dict(sorted(counts.items())), "buckets": buckets, "levels": levels}
