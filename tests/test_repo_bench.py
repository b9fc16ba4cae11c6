"""benchmarks/repo_bench.py runs end to end at tiny sizes, offline, and reports every figure.

A smoke test: it checks that each figure is there and consistent with the work done (plans succeeded, the
same files changed by Conductor and by git, overheads computed as documented), never how fast anything was.
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
SCRIPT = REPO / "benchmarks" / "repo_bench.py"
CONDUCTOR = Path(sys.executable).parent / "conductor"
TINY = ["--source", "generated", "--files", "300", "--min-mb", "4", "--sizes", "200,400", "--steps", "2",
        "--repeat", "1", "--settle", "1"]


def _bench() -> ModuleType:
    """The benchmark script as a module (it is a script, not part of the package)."""
    if "repo_bench" in sys.modules:
        return sys.modules["repo_bench"]
    spec = importlib.util.spec_from_file_location("repo_bench", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["repo_bench"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _run(tmp_path: Path, *argv: str) -> dict[str, Any]:
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp)}  # HOME is already the test's own (tests/conftest.py)
    proc = subprocess.run([sys.executable, str(SCRIPT), *argv, "--conductor", str(CONDUCTOR), "--json"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert list(temp.iterdir()) == []  # its temp dir is removed
    return json.loads(proc.stdout)


def _check_conductor_run(mine: dict[str, Any], forks: int, steps: int) -> None:
    assert mine["problems"] == [] and mine["exit_code"] == 0 and mine["status"] == "succeeded"
    assert sorted(r["fork_id"] for r in mine["ranking"]) == [str(i) for i in range(1, forks + 1)]
    for ranked in mine["ranking"]:
        assert ranked["status"] == "succeeded" and ranked["steps_verified"] == ranked["steps_total"] == steps
        assert ranked["changed_files"] == steps
    assert _positive(mine["seconds"]) and _positive(mine["growth_bytes"])


def _check_comparison(result: dict[str, Any], forks: int, steps: int, *, one_step: bool = False) -> None:
    assert result["ok"] and result["forks"] == forks and result["steps_per_fork"] == steps
    for run in result["runs"]:
        base = run["git"]
        assert run["ok"]
        _check_conductor_run(run["conductor"], forks, steps)
        if one_step:
            _check_conductor_run(run["conductor_one_step"], forks, 1)
        assert base["forks"] == [{"changed_files": steps, "changed_lines": steps}] * forks
        assert _positive(base["seconds"]) and _positive(base["parts_seconds"]["commands"])
        assert math.isclose(sum(base["parts_seconds"].values()), base["seconds"], rel_tol=1e-6)
        assert set(run["settle"]) == {"conductor", "git"} | ({"conductor 1 step"} if one_step else set())
    assert _positive(result["conductor_seconds"]) and _positive(result["git_seconds"])
    assert math.isclose(result["ratio"], result["conductor_seconds"] / result["git_seconds"])
    assert result["growth_bytes"] == max(run["conductor"]["growth_bytes"] for run in result["runs"])


@pytest.mark.timeout(180)
def test_the_benchmark_runs_at_tiny_sizes_and_reports_every_figure(tmp_path: Path) -> None:
    doc = _run(tmp_path, *TINY)
    assert doc["failures"] == []
    machine = doc["machine"]
    assert machine["cpus"] >= 1 and machine["python"] == platform.python_version()
    assert machine["git"] and machine["file_system"] and len(machine["load_average"]) == 3
    assert doc["conductor"]["version"] and doc["conductor"]["path"] == str(CONDUCTOR)

    info = doc["repository"]
    assert info["source"] == "generated" and info["fallback_reason"] is None
    assert info["files"] == 300 and info["dirs"] > 0 and _positive(info["content_bytes"])
    assert info["disk_bytes"] >= 4_000_000 > info["content_bytes"] and info["min_mb_reached"]
    assert info["commits"] == 1 + info["history_commits"] >= 3  # earlier versions, then the tree as it is
    assert info["shape_ok"] is False  # 300 files are not the 6,000

    repo = doc["repo"]
    _check_comparison(repo, forks=2, steps=2)
    assert repo["ratio_ok"] == (repo["ratio"] <= 2) and repo["growth_ok"] == (repo["growth_bytes"] <= 5_000_000)

    steps = doc["steps"]
    assert steps["steps"] == 2 and [size["files"] for size in steps["sizes"]] == [200, 400]
    for size in steps["sizes"]:
        _check_comparison(size, forks=1, steps=2, one_step=True)
        assert _positive(size["conductor_one_step_seconds"])
        assert math.isclose(size["overhead_per_step_seconds"],  # one round: the round's figure
                            (size["conductor_seconds"] - size["git_seconds"]) / 2)
        assert math.isclose(size["marginal_overhead_per_step_seconds"],
                            size["conductor_seconds"] - size["conductor_one_step_seconds"]
                            - size["git_parts_seconds"]["commands"] / 2)
        assert size["overhead_per_step_each"] == [size["overhead_per_step_seconds"]]
        (gap,) = size["runs"][0]["conductor"]["audit_step_gaps"]  # 2 steps: one step.merged to the next
        assert _positive(gap) and math.isclose(size["audit_overhead_per_step_seconds"],
                                               gap - size["git_parts_seconds"]["commands"] / 2)
    for kind in ("", "marginal_", "audit_"):
        low, high = (size[f"{kind}overhead_per_step_seconds"] for size in steps["sizes"])
        assert steps[f"{kind}flatness_ratio"] == (high / low if low > 0 and high > 0 else None)
        assert steps[f"{kind}flatness_ok"] == (None if steps[f"{kind}flatness_ratio"] is None
                                               else steps[f"{kind}flatness_ratio"] <= 1.5)

    table = _bench().render(doc)
    for label in ("300 files", "explore 2 forks x 2 one-line steps", "git baseline parts", ".conductor/ growth",
                  "200 files: audit log", "400 files: audit log", "1-step plan",
                  "audit-log overhead per step, 400 / 200 files", "the same of overhead",
                  machine["file_system"], f"git {machine['git']}", "waited for the file system"):
        assert label in table, label


@pytest.mark.timeout(120)
def test_apply_lets_conductor_apply_and_git_apply_the_patch(tmp_path: Path) -> None:
    doc = _run(tmp_path, "--only", "steps", "--sizes", "50", "--steps", "2", "--repeat", "1", "--settle", "0",
               "--apply")
    assert doc["failures"] == [] and "repo" not in doc and "repository" not in doc
    (size,) = doc["steps"]["sizes"]
    _check_comparison(size, forks=1, steps=2, one_step=True)
    (run,) = size["runs"]
    assert run["conductor"]["applied_fork"] == run["conductor_one_step"]["applied_fork"] == "1"
    assert run["git"]["parts_seconds"]["apply"] > 0
    assert doc["steps"]["flatness_ratio"] is None and doc["steps"]["flatness_ok"] is None  # one size: no ratio


def test_per_step_figures_are_medians_of_each_rounds_figures() -> None:
    def round_(n_steps: float, one_step: float, git: float, commands: float) -> dict[str, Any]:
        return {"conductor": {"seconds": n_steps}, "conductor_one_step": {"seconds": one_step},
                "git": {"seconds": git, "parts_seconds": {"commands": commands}}}

    runs = [round_(10, 4, 7, 0.3), round_(30, 8, 9, 0.3), round_(12, 5, 6, 0.6)]
    for run, gaps in zip(runs, ([1.0, 2.0], [3.0, 3.0], [2.0, 2.2]), strict=True):
        run["conductor"]["audit_step_gaps"] = gaps
    figures = _bench().per_step_figures(runs, steps=3)
    assert figures["overhead_per_step_each"] == pytest.approx([1, 7, 2])
    assert figures["overhead_per_step_seconds"] == pytest.approx(2)
    assert figures["marginal_overhead_per_step_each"] == pytest.approx([2.9, 10.9, 3.3])
    assert figures["marginal_overhead_per_step_seconds"] == pytest.approx(3.3)  # not 3.4, the figure of the medians
    assert figures["audit_overhead_per_step_each"] == pytest.approx([1.4, 2.9, 1.9])
    assert figures["audit_overhead_per_step_seconds"] == pytest.approx(1.9)
    runs[1]["conductor"]["audit_step_gaps"] = None  # events could not be read
    assert _bench().per_step_figures(runs, steps=3)["audit_overhead_per_step_seconds"] is None


def test_flatness_is_given_only_when_both_overheads_are_positive() -> None:
    def sizes(*overheads: float) -> list[dict[str, float]]:
        return [{"overhead_per_step_seconds": x} for x in overheads]

    flatness = _bench()._flatness
    assert flatness(sizes(0.2, 0.25), "") == {"flatness_ratio": pytest.approx(1.25), "flatness_ok": True}
    assert flatness(sizes(0.2, 0.6), "") == {"flatness_ratio": pytest.approx(3), "flatness_ok": False}
    for noisy in (sizes(0.2, -0.1), sizes(-0.2, 0.1), sizes(0.2)):
        assert flatness(noisy, "") == {"flatness_ratio": None, "flatness_ok": None}


def test_the_plan_chains_one_line_edits_of_the_given_files() -> None:
    plan = _bench().plan_document([["a.py", "b/c.py"], ["a.py"]])
    first, second = plan["strategies"]
    assert [s["allowed_files"] for s in first["steps"]] == [["a.py"], ["b/c.py"]]
    assert [s["depends_on"] for s in first["steps"]] == [[], ["s1"]]
    assert first["steps"][1]["instruction"] == "sed -i '1s/^/# fork 1 step 2\\n/' b/c.py"
    assert second["steps"][0]["instruction"] == "sed -i '1s/^/# fork 2 step 1\\n/' a.py"


@pytest.mark.parametrize("argv", [["--sizes", "1000,x"], ["--sizes", "0"], ["--sizes", "50,10"], ["--repeat", "0"],
                                  ["--files", "10"], ["--only", "repo,speed"], ["--min-mb", "-1"],
                                  ["--settle", "-1"], ["--conductor", "/nonexistent/conductor"],
                                  ["--sizes", "2", "--steps", "3"], ["--steps", "1"]])
def test_bad_arguments_exit_2_naming_the_option(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        _bench().parse_args([*argv, *([] if "--conductor" in argv else ["--conductor", str(CONDUCTOR)])])
    assert exited.value.code == 2
    assert argv[0] in capsys.readouterr().err
