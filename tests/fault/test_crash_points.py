"""Crash at every registered crash point of a real plan run, then ``conductor resume``: nothing lost, nothing twice.

A clean run with ``CONDUCTOR_CRASH_TRACE`` first counts how often each point is reached. Then, for every
point, the run is repeated with ``CONDUCTOR_CRASH_AT=<point>:<n>`` for the first hit (and, for points hit
several times, the middle and the last hit too). Each crashed run must die with exit status 137 at that
point; ``conductor resume`` without the variable must then finish the plan, and every invariant of
``tests/fault/invariants.py`` must hold. The re-queue points need an expired lease, so their scenario
first crashes a run while it holds a lease, then crashes the resume in the reaper.

``CONDUCTOR_FAULT_POINTS=<point>,<point>`` limits the run to some points (for debugging).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from conductor.faults import CRASH_EXIT_CODE, CRASH_POINTS
from tests.fault.harness import Trial, crash_counts, finish, recovery_repairs, workers
from tests.fault.invariants import outcome_problems

pytestmark = pytest.mark.slow

HOLD_A_LEASE = "claim.after_lease:1"  # a crash that leaves a task in progress under a dead holder
REAPER_POINTS = tuple(p for p in CRASH_POINTS if p.startswith("reaper."))
# What recovery must have repaired after a crash at the first hit of these points.
EXPECTED_REPAIR = {
    "write.after_temp": "temp_removed",
    "publish.after_temp": "temp_removed",
    "publish.after_link": "temp_removed",
    "plan.after_plan_file": "event_restored",
    "publish.before_event": "event_restored",
    "complete.after_result": "uncommitted_quarantined",
    "complete.after_explanation": "uncommitted_quarantined",
    "complete.before_task_move": "uncommitted_quarantined",
    "complete.after_task_move": "lease_removed",
    "verify.after_reject_verdict": "rejection_finished",
    "verify.before_reject_move": "rejection_finished",
    "verify.after_logged": "event_restored",
    "reaper.after_republish": "event_restored",
    "repair.after_publish": "event_restored",
    "apply.after_intent": "apply_finished",
    "apply.after_file": "apply_finished",
    "apply.after_files": "apply_finished",
}


@dataclass(frozen=True)
class Case:
    point: str
    nth: int
    scenario: str  # "explore" (crash the run) or "reaper" (crash a resume that re-queues a dead holder's task)

    @property
    def name(self) -> str:
        return f"{self.point}:{self.nth}"


ONLY = os.environ.get("CONDUCTOR_FAULT_POINTS")  # read at import: an autouse fixture clears CONDUCTOR_*


def selected(points: list[str]) -> list[str]:
    return [p for p in points if p in ONLY.split(",")] if ONLY else points


def hits_to_try(count: int) -> list[int]:
    return sorted({1, count // 2 + 1, count}) if count > 2 else list(range(1, count + 1))


def trace_run(template: Path, where: Path, scenario: str) -> Trial:
    trial = Trial.copy_of(template, where)
    trace = str(where / "trace")
    if scenario == "explore":
        assert trial.explore(CONDUCTOR_CRASH_TRACE=trace).returncode == 0, trial.story()
    else:
        assert trial.explore(CONDUCTOR_CRASH_AT=HOLD_A_LEASE).returncode == CRASH_EXIT_CODE, trial.story()
        (where / "trace").unlink(missing_ok=True)
        assert trial.resume(CONDUCTOR_CRASH_TRACE=trace).returncode == 0, trial.story()
    assert outcome_problems(trial) == []
    return trial


def run_case(template: Path, where: Path, case: Case) -> tuple[list[str], Trial, float]:
    started = time.monotonic()
    trial = Trial.copy_of(template, where)
    problems: list[str] = []
    if case.scenario == "reaper":
        first = trial.explore(CONDUCTOR_CRASH_AT=HOLD_A_LEASE)
        if first.returncode != CRASH_EXIT_CODE:
            problems.append(f"the set-up crash at {HOLD_A_LEASE} did not happen (exit {first.returncode})")
        crashed = trial.resume(CONDUCTOR_CRASH_AT=case.name)
    else:
        for retry in range(3):
            trace = where / f"trace-{retry}"
            crashed = trial.explore(CONDUCTOR_CRASH_AT=case.name, CONDUCTOR_CRASH_TRACE=str(trace))
            reached = crash_counts(trace)[case.point]
            if not (crashed.returncode == 0 and 0 < reached < case.nth):
                break
            # How often a point is reached can depend on timing (a checkpoint per engine pass in which a log
            # grew): this run's last hit is then the case to crash at, in a fresh copy.
            case = Case(case.point, reached, case.scenario)
            trial = Trial.copy_of(template, where.with_name(f"{where.name}-at-{reached}-{retry}"))
    if crashed.returncode != CRASH_EXIT_CODE:
        problems.append(f"did not die at {case.name}: exit {crashed.returncode} (point not reached?)")
    ended = finish(trial)
    if ended is not None and ended.returncode != 0:
        problems.append(f"the run after the crash failed with exit {ended.returncode}: {ended.stderr.strip()[-500:]}")
    problems += outcome_problems(trial)
    expected = EXPECTED_REPAIR.get(case.point)
    if expected and case.nth == 1 and expected not in recovery_repairs(trial.root):
        problems.append(f"recovery did not record {expected!r} (it recorded {recovery_repairs(trial.root)})")
    return problems, trial, time.monotonic() - started


@pytest.fixture(scope="module")
def traces(template: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Counter[str]]:
    """Scenario → how often a clean run of it reaches each crash point."""
    where = tmp_path_factory.mktemp("traces")
    return {scenario: crash_counts(trace_run(template, where / scenario, scenario).root.parent / "trace")
            for scenario in ("explore", "reaper")}


def test_every_crash_point_is_reached_by_a_clean_run(traces: dict[str, Counter[str]]) -> None:
    unreached = [p for p in CRASH_POINTS if not traces["reaper" if p in REAPER_POINTS else "explore"][p]]
    assert unreached == []


GROUPS = 4  # one test each (about 40 s on 2 CPUs), so that test processes running side by side share them


@pytest.mark.timeout(1200)  # bounded by its cases; see test_random_kills
@pytest.mark.parametrize("group", range(GROUPS))
def test_a_crash_at_every_point_is_recovered_by_resume(
    template: Path, traces: dict[str, Counter[str]], tmp_path: Path, group: int
) -> None:
    """Every point of ``CRASH_POINTS[group::GROUPS]`` (every point over the groups)."""
    points = selected(list(CRASH_POINTS))[group::GROUPS]
    if not points:
        pytest.skip("CONDUCTOR_FAULT_POINTS leaves this group no point")
    counts, reaper = traces["explore"], traces["reaper"]
    cases = [Case(p, n, "reaper" if p in REAPER_POINTS else "explore")
             for p in points
             for n in hits_to_try((reaper if p in REAPER_POINTS else counts)[p])]
    assert len(cases) >= len(points)  # every point at least once
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=workers()) as pool:
        outcomes = list(pool.map(lambda c: (c, *run_case(template, tmp_path / c.name.replace(":", "_"), c)), cases))
    wall = time.monotonic() - started
    failures = [f"{case.name}: {problems}\n    " + trial.story().replace("\n", "\n    ")
                for case, problems, trial, _ in outcomes if problems]
    print(f"\n{len(cases)} crash cases over {len(set(c.point for c in cases))} points in {wall:.0f} s wall "
          f"({sum(s for *_, s in outcomes):.0f} s summed, {workers()} at once)")
    assert failures == [], f"{len(failures)} of {len(cases)} crash cases failed:\n" + "\n".join(failures)
