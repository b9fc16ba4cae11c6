"""A full or failing disk (injected ENOSPC / EIO) at many points of a real run: a clear error, nothing partial.

Every case runs ``conductor explore`` with ``CONDUCTOR_FAULT=<op>:<errno>:<n>[@<path text>]`` and expects
exit code 74 (``StorageError``) with a message naming the injected error — an exit 0 would mean the error
was swallowed or retried, since only that one operation fails. Right after the failure no partial document,
no temp file and no broken audit chain may be visible (a failing append cuts its half line back off).
After the fault is cleared, ``conductor resume`` must finish the plan with every invariant holding, and a
disk error must never have become a step's failure.

Two sets of cases: targeted ones, at the writes that matter most (a publish, an audit line, the lease,
the result, the commit rename, the verdict, the apply), and a spread over the whole run: a clean run with
``CONDUCTOR_CRASH_TRACE`` counts each kind of operation, then the first, a quarter, half, three quarters
and the last of them fail in turn.
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conductor.fsutil import StorageError
from tests.fault.harness import Trial, crash_counts, finish, recovery_repairs, workers
from tests.fault.invariants import outcome_problems, state_problems

pytestmark = pytest.mark.slow

OPS = ("write", "fsync", "rename", "link")
# (fault, repair recovery must record afterwards, or None)
TARGETED = [
    ("link:ENOSPC:1@pending", None),                      # publishing the first task
    ("write:ENOSPC:1@audit.log", None),                   # half a plan.created line, cut back at once
    ("write:EIO:2@fork_1/audit.log", None),               # half a fork event line (confidence.scored)
    ("write:EIO:1@lease.json", None),                     # the lease of a claim
    ("write:ENOSPC:1@result.json", None),                 # the result of a completion
    ("rename:EIO:1@completed/step_001.task.json", "uncommitted_quarantined"),  # the commit rename
    ("write:EIO:1@verdict.json", None),                   # an accepted verdict
    ("rename:EIO:1@failed/step_001.task.json", "rejection_finished"),  # the rejection's commit rename
    ("write:ENOSPC:1@apply.intent.json", None),           # the apply's intent
    ("write:ENOSPC:1@/project/b.txt", "apply_finished"),  # the apply's second file: a half-applied winner
    ("fsync:EIO:1@plan.json", None),                      # the plan file itself
]


def run_case(template: Path, where: Path, fault: str, repair: str | None = None) -> tuple[list[str], Trial]:
    trial = Trial.copy_of(template, where)
    failed = trial.explore(CONDUCTOR_FAULT=fault, CONDUCTOR_CRASH_TRACE=str(where / "trace"))
    hit = [line.split("!", 1)[1] for line in crash_counts(where / "trace") if "!" in line]
    op, error, nth = fault.split(":")
    reached = crash_counts(where / "trace")[f"io.{op}"]
    if not hit and failed.returncode == 0 and "@" not in nth and 0 < reached < int(nth):
        # How many operations a run makes depends on timing (a checkpoint per engine pass in which a log
        # grew, the order of parallel forks): this run's last one is then the case, in a fresh copy.
        return run_case(template, where.with_name(f"{where.name}-at-{reached}"), f"{op}:{error}:{reached}", repair)
    problems = [] if hit else [f"{fault} was never injected: the operation was not reached"]
    in_executor_thread = bool(hit) and hit[0].startswith("conductor-exec")
    failures = [p for p in trial.root.glob(".conductor/handoff/plan_*/fork_*/failed/*.result.json")
                if "injected by CONDUCTOR_FAULT" in p.read_text()]
    if failures:  # a disk error is no verdict on the step: the run must stop instead (exit 74)
        problems.append(f"a disk error became the step's failure: {[str(p.relative_to(trial.root)) for p in failures]}")
    if failed.returncode != StorageError.exit_code:
        where = " (in an executor thread)" if in_executor_thread else ""
        problems.append(f"exit {failed.returncode}, expected {StorageError.exit_code} (StorageError){where}")
    elif "injected by CONDUCTOR_FAULT" not in failed.stderr or "conductor: error:" not in failed.stderr:
        problems.append(f"unclear error: {failed.stderr.strip()[-300:]!r}")
    problems += [f"right after the fault: {p}" for p in state_problems(trial.root, recovered=False)]
    ended = finish(trial)
    if ended is not None and ended.returncode != 0:
        problems.append(f"resume after the fault failed with exit {ended.returncode}: {ended.stderr.strip()[-400:]}")
    problems += outcome_problems(trial)
    if repair is not None and repair not in recovery_repairs(trial.root):
        problems.append(f"recovery did not record {repair!r} (it recorded {recovery_repairs(trial.root)})")
    return problems, trial


def run_all(template: Path, tmp_path: Path, cases: list[tuple[str, str | None]]) -> list[tuple[str, list[str], Trial]]:
    with ThreadPoolExecutor(max_workers=workers()) as pool:
        return list(pool.map(lambda ic: (ic[1][0], *run_case(template, tmp_path / f"case-{ic[0]}", *ic[1])),
                             enumerate(cases)))


def report(outcomes: list[tuple[str, list[str], Trial]]) -> None:
    failures = [(fault, problems, trial) for fault, problems, trial in outcomes if problems]
    text = [f"{fault}: {problems}\n    " + trial.story().replace("\n", "\n    ") for fault, problems, trial in failures]
    assert text == [], f"{len(text)} of {len(outcomes)} fault cases failed:\n" + "\n".join(text)


def test_targeted_disk_errors_fail_cleanly_and_resume_finishes(template: Path, tmp_path: Path) -> None:
    report(run_all(template, tmp_path, TARGETED))


def test_a_disk_error_while_the_command_runs_stops_the_run_instead_of_failing_the_step(
    template: Path, tmp_path: Path
) -> None:
    # The second lease write is the renewal that records the command's process group as it starts.
    problems, trial = run_case(template, tmp_path / "case", "write:EIO:2@lease.json")
    assert problems == [], trial.story()


@pytest.mark.timeout(1200)  # bounded by its cases; see test_random_kills
def test_disk_errors_spread_over_a_whole_run_fail_cleanly_and_resume_finishes(template: Path, tmp_path: Path) -> None:
    trial = Trial.copy_of(template, tmp_path / "trace")
    assert trial.explore(CONDUCTOR_CRASH_TRACE=str(tmp_path / "trace" / "trace")).returncode == 0, trial.story()
    counts: Counter[str] = crash_counts(tmp_path / "trace" / "trace")
    assert all(counts[f"io.{op}"] for op in OPS), counts
    cases: list[tuple[str, str | None]] = [
        (f"{op}:{'ENOSPC' if i % 2 else 'EIO'}:{n}", None)
        for op in OPS
        for i, n in enumerate(sorted({1, *(max(1, counts[f'io.{op}'] * q // 4) for q in (1, 2, 3, 4))}))
    ]
    started = time.monotonic()
    outcomes = run_all(template, tmp_path, cases)
    print(f"\n{len(cases)} spread faults over {dict((op, counts[f'io.{op}']) for op in OPS)} operations of a clean "
          f"run, {time.monotonic() - started:.0f} s wall")
    report(outcomes)
