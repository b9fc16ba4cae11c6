"""benchmarks/handoff_bench.py runs end to end at tiny sizes and reports every figure.

A smoke test: it checks that each figure is there and consistent with the work done (tasks completed,
files read, exactly-once), never how fast anything was.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "handoff_bench.py"
TINY = ["--tasks", "12", "--workers", "1,2", "--latency-samples", "3", "--recovery-tasks", "100",
        "--race-tasks", "20", "--help-runs", "1", "--settle", "0"]


def _bench() -> ModuleType:
    """The benchmark script as a module (it is a script, not part of the package)."""
    if "handoff_bench" in sys.modules:
        return sys.modules["handoff_bench"]
    spec = importlib.util.spec_from_file_location("handoff_bench", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["handoff_bench"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.timeout(120)
def test_the_benchmark_runs_at_tiny_sizes_and_reports_every_figure(tmp_path: Path) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp)}  # HOME is already the test's own (tests/conftest.py)
    proc = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--json"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads(proc.stdout)
    assert list(temp.iterdir()) == []  # its temp dir is removed

    machine = doc["machine"]
    assert machine["cpus"] >= 1 and machine["python"] == platform.python_version()
    assert machine["file_system"] and machine["temp_dir"] == str(temp)

    throughput = doc["throughput"]
    io = throughput["durable_io"]
    assert io["calls_per_task"]["fsync"] >= 2 and io["raw_writes_per_task"] >= 1 and io["task_file_bytes"] > 0
    assert all(_positive(throughput["publish"][k]) for k in ("tasks_per_second", "raw_ops_per_second", "ratio"))
    # With bubblewrap, 1 worker runs again with sandbox.mode off: the cycle without the namespaces' start.
    unsandboxed_too = [(1, "off")] if throughput["spawn"]["sandboxed"] else []
    assert [(run["workers"], run["sandbox"]) for run in throughput["runs"]] == [(1, "default"), (2, "default"),
                                                                               *unsandboxed_too]
    for run in throughput["runs"]:
        assert run["ok"] and run["completed"] == 12 and run["exit_codes"] == [0] * run["workers"]
        assert run["failures"] == []
        assert sum(run["per_worker"]) == 12
        for key in ("tasks_per_second", "steady_tasks_per_second", "raw_ops_per_second", "raw_tasks_per_second",
                    "ratio"):
            assert _positive(run[key]), key

    latency = doc["latency"]
    assert latency["samples"] == 3
    assert latency["p50_seconds"] <= latency["p95_seconds"] <= latency["max_seconds"]
    assert latency["from_link_p50_seconds"] >= latency["p50_seconds"]  # the link comes before the return
    assert latency["raw_p50_seconds"] <= latency["raw_p95_seconds"] and latency["raw_observer"]
    assert _positive(latency["publish_task_median_seconds"])

    help_ = doc["help"]
    assert all(_positive(help_[k]) for k in ("python_pass_seconds", "import_click_seconds", "module_help_seconds",
                                              "module_click_ratio"))
    assert (help_["console_help_seconds"] is None) == (help_["console_script"] is None)

    recovery = doc["recovery"]
    built = recovery["built"]
    assert sum(built.values()) == 100 and all(n > 0 for n in built.values())
    assert recovery["recovery_error"] is None, recovery["recovery_error"]
    assert recovery["ok"] and recovery["timed"] == ["conductor.recovery.recover_project(layout)", "reap_expired"]
    assert recovery["seconds"] == pytest.approx(sum(recovery["parts_seconds"].values()))
    assert 0 < recovery["prepare_retry_seconds"] < recovery["parts_seconds"]["reap_expired"]
    assert recovery["requeued"] == built["in_progress"]
    assert recovery["after"]["in_progress"] == 0 and sum(recovery["after"].values()) == 100
    assert recovery["task_files_read"] == recovery["raw_files_read"] == 100
    # Recovery reads the tasks the log cannot vouch for (the pending and in-progress ones), not the history.
    assert recovery["recovery_task_files_read"] == built["pending"] + built["in_progress"]
    assert recovery["recovery_bytes_read"] is None or recovery["recovery_bytes_read"] > recovery["log_bytes"] / 2
    assert recovery["audit_chain_ok"] and _positive(recovery["seconds"]) and _positive(recovery["raw_seconds"])
    assert _positive(recovery["full_scan_seconds"])
    made = recovery["raw_folder_creation"]  # the floor of the retries' checkouts, shaped as one of them
    assert made["folders"] == recovery["requeued"] and made["shape"]["dirs"] >= 4 and made["shape"]["files"] >= 5
    assert made["entries"] == made["folders"] * (made["shape"]["dirs"] + made["shape"]["files"])

    race = doc["race"]
    assert race["ok"] and race["double_executions"] == 0 and race["lost_tasks"] == 0 and race["unexpected"] == 0
    assert race["failures"] == [] and race["exit_codes"] == [0] * 4
    assert race["executions"] == 20 and sum(race["per_worker"]) == 20 and len(race["per_worker"]) == 4
    assert race["final_states"] == {"pending": 0, "in_progress": 0, "completed": 20, "failed": 0}
    assert race["audit_chain_ok"] and race["claim_or_completion_events_not_exactly_once"] == 0

    table = _bench().render(doc)
    for label in ("publish_task", "throughput, 1 worker(s)", "throughput, 2 worker(s)", "durable I/O per task",
                  "pick-up latency", "p50", "p95", "python -m conductor --help", "conductor --help (console script)",
                  'python -c "import click"', "recovery, 100 tasks", "reap_expired", "of which prepare_retry",
                  "recovery opened 10 task file(s)", "raw creation of 3 folders", "full scan", "race, 4 workers, 20 tasks: ok",
                  "double executions 0, lost tasks 0", machine["file_system"]):
        assert label in table, label
    assert "goal 50 % of raw allows" in table
    assert ("throughput, 1 worker(s), sandbox.mode off" in table) == bool(unsandboxed_too)


def test_the_goal_budget_says_whether_the_unavoidable_part_of_a_task_fits_the_goal() -> None:
    bench = _bench()
    sandboxed = {"sandboxed": True, "sandboxed_seconds": 0.0035, "plain_seconds": 0.0005}
    # raw 400 tasks/s: 2.5 ms a task, so the goal allows 5.0 ms; 2.5 + 3.5 = 6.0 ms is over it.
    (line,) = bench.goal_budget(400.0, sandboxed)
    assert "allows 5.0 ms" in line and "take 6.0 ms: over it" in line
    # Without bubblewrap the command's start is plain `true`'s: 2.5 + 0.5 = 3.0 ms fits in 5.0 ms.
    (line,) = bench.goal_budget(400.0, {**sandboxed, "sandboxed": False})
    assert "take 3.0 ms: within it" in line


def test_only_runs_the_chosen_sections(tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--only", "help", "--help-runs", "1", "--json"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert sorted(doc) == ["help", "machine"] and doc["help"]["runs"] == 1
    assert "python -m conductor --help" in _bench().render(doc)


def test_a_recovery_that_raises_makes_the_benchmark_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    bench = _bench()

    def broken(project: Any) -> None:
        raise RuntimeError("recovery broke")

    monkeypatch.setattr(bench, "_recovery_entry", lambda: ("a broken recovery", broken))
    # the timed part runs in this process, where the broken entry is patched in
    monkeypatch.setattr(bench, "recovery_in_new_process", lambda root, env: bench.recover_and_reap(root))
    monkeypatch.setattr(bench.tempfile, "tempdir", str(tmp_path))
    assert bench.main(["--only", "recovery", "--recovery-tasks", "10", "--settle", "0", "--json"]) == 1
    recovery = json.loads(capsys.readouterr().out)["recovery"]
    assert recovery["recovery_error"] == "RuntimeError: recovery broke" and not recovery["ok"]


def test_race_verdict_names_double_executions_lost_and_unexpected_lines() -> None:
    verdict = _bench().race_verdict(["step_001 1", "step_002 1", "step_002 1", "step_009 1"],
                                    ["step_001 1", "step_002 1", "step_003 1"])
    assert verdict == {"double_executions": {"step_002 1": 2}, "lost": ["step_003 1"], "unexpected": ["step_009 1"]}
    assert _bench().race_verdict(["step_001 1"], ["step_001 1"]) == {"double_executions": {}, "lost": [],
                                                                     "unexpected": []}


@pytest.mark.parametrize("argv", [["--workers", "1,x"], ["--workers", "0"], ["--tasks", "0"], ["--race-tasks", "-1"],
                                  ["--only", "race,speed"], ["--only", "race"]])
def test_bad_arguments_exit_2_naming_the_option(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        _bench().parse_args(argv)
    assert exited.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_the_timing_wrapper_keeps_every_path_the_reaper_takes(tmp_path: Path) -> None:
    from conductor.attempts import RetryFolders
    from conductor.handoff.reaper import BatchPreparer, FolderTaker
    from conductor.project import init_project

    bench = _bench()
    timed, _spent = bench._timed(RetryFolders(init_project(tmp_path)))
    assert isinstance(timed, BatchPreparer) and isinstance(timed, FolderTaker)
    plain, _spent = bench._timed(lambda task: task)
    assert not isinstance(plain, BatchPreparer) and not isinstance(plain, FolderTaker)
