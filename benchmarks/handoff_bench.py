"""Benchmark of the file handoff protocol, each figure beside the raw file-system work it stands on.

Run from anywhere with the project installed (``pip install -e .``)::

    python benchmarks/handoff_bench.py [--tasks N] [--workers 1,2,4] [--latency-samples N]
                                       [--recovery-tasks N] [--race-tasks N] [--help-runs N]
                                       [--only throughput,latency,help,recovery,race] [--json]

Figures (see benchmarks/README.md for the method of each):

1. throughput — tasks/s of real ``conductor worker --burst`` processes running ``true``, against raw durable
   writes (temp + fsync + rename + dir fsync) of the same count and size done in-process;
2. pick-up latency p50/p95 — publish → claim of one watching worker, against a raw watchdog observer;
3. ``conductor --help`` wall time, against ``python -c "import click"`` (and ``python -c pass``);
4. recovery of a crashed handoff folder of many tasks (``conductor.recovery``, then ``reap_expired``), against
   listing and reading the same files raw;
5. the race (``--race-tasks``): four burst workers, checked for double executions and lost tasks.

Everything happens in one temporary folder under the system temp dir, removed at the end. Progress goes
to stderr; the table (or, with ``--json``, one JSON document) to stdout. Exit status: 0, 1 when a run went
wrong (a double execution, a lost task, a broken audit chain, a worker that failed, recovery that raised or
left work undone), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import builtins
import collections
import importlib
import io
import json
import math
import os
import platform
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from repo_bench import FsProbe  # noqa: E402  (the script beside this one; waits out a slow file system)

from conductor.audit import GENESIS, MARK_EVERY_LINES, AuditLog, verify_chain
from conductor.canonical import canonical_bytes, digest, sha256_hex
from conductor.executors.base import executor_info
from conductor.handoff.documents import read_document, sealed_bytes
from conductor.handoff.lease import HOST
from conductor.handoff.publish import publish_task
from conductor.handoff.reaper import BatchPreparer, FolderTaker, reap_expired
from conductor.layout import STATES, ForkLayout, ProjectLayout
from conductor.models import (
    Confidence,
    EffectivePolicy,
    ForkSpec,
    Lease,
    Plan,
    PlannerInfo,
    PolicyLayer,
    Result,
    StepSpec,
    Strategy,
    Task,
    utc_now,
)
from conductor.plan_store import create_plan, ensure_forks
from conductor.project import init_project
from conductor.provenance import build_statement, statement_bytes

PLAN_ID = "20260101T000000Z-bench"
FORK_ID = "bench"
POLICY = EffectivePolicy(global_constraints=[], protected_patterns=[], max_diff_lines=500, timeout_seconds=60)
POLICY_DIGEST = digest(POLICY.to_document())
RUN_LINE = re.compile(r"worker (\S+): (\d+) task\(s\) run")
LATENCY_GAP_SECONDS = 0.3  # idle time before each publish, so the worker is waiting on file events again
RACE_WORKERS = 4
SECTIONS = ("throughput", "latency", "help", "recovery", "race")


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# --- a project with one plan, one fork and N independent steps (as tests/handoff/support.py) ----------


# --- attempt workspaces: the only calls into conductor.attempts (its API follows the workspace engine) --


def attempt_workspace(project: Project, step: str, attempt: int = 1, *, create: bool = True) -> tuple[Path, str]:
    """The folder of ``step``'s attempt and the commit it starts from (the fork's first state).

    With ``create`` the folder is checked out (the engine's cost before publishing); without it the task
    only names where the folder would be.
    """
    from conductor.attempts import prepare_workspace

    base = project.base_commit()
    if not create:
        return project.layout.scratch_dir(project.plan.plan_id, FORK_ID, step, attempt), base
    return prepare_workspace(project.layout, project.plan.plan_id, FORK_ID, step, attempt, base), base


def retry_preparer(project: Project) -> Callable[[Task], Task]:
    """What the engine and workers pass the reaper to give a re-queued task a fresh folder."""
    from conductor.attempts import RetryFolders

    return RetryFolders(project.layout)


# --- a project with one plan, one fork and N independent steps (as tests/handoff/support.py) ----------


@dataclass
class Project:
    layout: ProjectLayout
    plan: Plan
    fork: ForkLayout
    task_overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return self.layout.root

    def base_commit(self) -> str:
        """The commit the fork started at (its ``fork.created`` event)."""
        created = next(e for e in AuditLog(self.fork.audit_log).events() if e.type == "fork.created")
        return str(created.data["commit"])

    def task(self, step: str, *, workspace: bool = True) -> Task:
        """The unsealed attempt-1 task of ``step``, built as ``Engine._publish`` builds it.

        With ``workspace`` the attempt's folder is checked out first (see :func:`attempt_workspace`). The
        command runs as the policy's sandbox mode says (``sandbox_mode``: the default, or ``"off"`` for the
        race, whose execution log lies outside every workspace).
        """
        scratch, base = attempt_workspace(self, step, create=workspace)
        return Task(
            task_id=step, plan_id=self.plan.plan_id, fork_id=FORK_ID, attempt=1, title=f"bench {step}",
            instruction=f"Run the benchmark command for {step}.", allowed_files=["README.md"],
            protected_patterns=POLICY.protected_patterns, constraints=POLICY.global_constraints, depends_on=[],
            workspace=self.layout.relative(scratch),
            base_commit=base, timeout_seconds=POLICY.timeout_seconds, **self.task_overrides,
            max_diff_lines=POLICY.max_diff_lines, policy_digest=POLICY_DIGEST,
            confidence=Confidence(score=0.9, level="high", reasons=["benchmark"]), created_at=utc_now(),
        )

    def step_ids(self) -> list[str]:
        return [step.step_id for step in self.plan.forks[0].steps]


def make_project(root: Path, steps: int) -> Project:
    """A fresh project in ``root`` with one plan of one fork of ``steps`` independent steps (nothing published)."""
    layout = ProjectLayout(init_project(root).root)
    (layout.root / "README.md").write_text("hello\n", encoding="utf-8")
    plan = Plan(
        plan_id=PLAN_ID, goal="benchmark the handoff protocol", created_at=utc_now(),
        planner=PlannerInfo(kind="file", source="benchmarks/handoff_bench.py"),
        forks=[ForkSpec(fork_id=FORK_ID, strategy=Strategy(name="independent steps"), steps=[
            StepSpec(step_id=f"step_{i:03d}", title=f"step {i}", instruction=f"Do step {i}.",
                     allowed_files=["README.md"])
            for i in range(1, steps + 1)
        ])],
    )
    plan = create_plan(layout, plan, ignore=[], project_policy=PolicyLayer())
    ensure_forks(layout, plan)
    return Project(layout=layout, plan=plan, fork=layout.fork(plan.plan_id, FORK_ID))


def publish_all(project: Project) -> dict[str, float]:
    """Prepare and publish every step; returns seconds spent preparing workspaces and in ``publish_task``."""
    prepare = publish = 0.0
    for step in project.step_ids():
        began = time.perf_counter()
        task = project.task(step)
        middle = time.perf_counter()
        publish_task(project.fork, task)
        prepare += middle - began
        publish += time.perf_counter() - middle
    return {"prepare_seconds": prepare, "publish_seconds": publish}


# --- processes --------------------------------------------------------------------------------------


def clean_environ(home: Path) -> dict[str, str]:
    """This environment without ``CONDUCTOR_*`` variables, with ``HOME`` inside the benchmark's temp dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONDUCTOR_")}
    env["HOME"] = str(home)
    return env


@dataclass
class WorkerRun:
    codes: list[int | None]
    outputs: list[str]
    wall_seconds: float

    def counts(self) -> list[int | None]:
        found = [RUN_LINE.search(output) for output in self.outputs]
        return [int(m.group(2)) if m else None for m in found]

    def holders(self) -> set[str]:
        return {m.group(1) for m in (RUN_LINE.search(output) for output in self.outputs) if m}

    def failures(self) -> list[str]:
        """The last lines of the output of every worker that did not exit 0 (why it failed)."""
        return [f"worker {i} exited {code}: " + " | ".join(output.strip().splitlines()[-3:])
                for i, (code, output) in enumerate(zip(self.codes, self.outputs, strict=True)) if code != 0]


def run_burst_workers(root: Path, command: str, count: int, *, env: Mapping[str, str], out_dir: Path,
                      timeout: float) -> WorkerRun:
    """Start ``count`` ``conductor worker --burst`` processes together and wait for all of them."""
    argv = [sys.executable, "-m", "conductor", "worker", "-C", str(root), "--command", command, "--burst"]
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / f"worker{i}.out" for i in range(count)]
    procs = []
    began = time.perf_counter()
    try:
        for path in files:
            with path.open("wb") as handle:
                procs.append(subprocess.Popen(argv, env=dict(env), stdout=handle, stderr=subprocess.STDOUT, cwd=root))
        deadline = time.monotonic() + timeout
        codes: list[int | None] = []
        for proc in procs:
            try:
                codes.append(proc.wait(timeout=max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                codes.append(None)  # reported as a failed run, killed below
        wall = time.perf_counter() - began
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    return WorkerRun(codes=codes, outputs=[p.read_text(errors="replace") for p in files], wall_seconds=wall)


def seconds_of(ts: str) -> float:
    """POSIX seconds of an RFC 3339 UTC timestamp written by ``utc_now`` (microsecond resolution)."""
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


# --- raw baselines ----------------------------------------------------------------------------------


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def raw_durable_write(directory: Path, name: str, payload: bytes, *, link: bool = False) -> float:
    """temp + write + fsync + rename (or link + unlink, as publishing does) + fsync of the directory.

    Returns:
        ``time.time()`` just after the rename or link, when the file became visible.
    """
    temp = directory / f".tmp.{name}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, payload)
        os.fsync(fd)
    finally:
        os.close(fd)
    if link:
        os.link(temp, directory / name)
        visible = time.time()
        os.unlink(temp)
    else:
        os.rename(temp, directory / name)
        visible = time.time()
    fsync_dir(directory)
    return visible


def raw_durable_ops_per_second(directory: Path, ops: int, payload: bytes, *, threads: int = 1,
                               link: bool = False) -> float:
    """Do ``ops`` raw durable writes of ``payload`` into ``directory`` from ``threads`` threads; ops/s."""
    directory.mkdir(parents=True, exist_ok=True)
    shares = [ops // threads + (1 if i < ops % threads else 0) for i in range(threads)]

    def work(index: int, share: int) -> None:
        for n in range(share):
            raw_durable_write(directory, f"t{index}_{n}.json", payload, link=link)

    pool = [threading.Thread(target=work, args=(i, share)) for i, share in enumerate(shares)]
    began = time.perf_counter()
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    elapsed = time.perf_counter() - began
    shutil.rmtree(directory)
    return ops / elapsed


class _Counter:
    """Counts calls of some ``os`` functions while active (to learn what one task costs in durable I/O)."""

    NAMES = ("fsync", "rename", "replace", "link")

    def __init__(self) -> None:
        self.calls = collections.Counter[str]()
        self._saved: dict[str, Callable[..., Any]] = {}

    def __enter__(self) -> _Counter:
        for name in self.NAMES:
            original = self._saved[name] = getattr(os, name)

            def counted(*args: Any, _name: str = name, _original: Callable[..., Any] = original, **kw: Any) -> Any:
                self.calls[_name] += 1
                return _original(*args, **kw)

            setattr(os, name, counted)
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._saved.items():
            setattr(os, name, original)


def durable_io_per_task(root: Path, tasks: int = 9) -> dict[str, Any]:
    """Run ``tasks`` tasks one by one through an in-process ``Worker`` and count its durable I/O calls.

    Returns:
        ``calls_per_task``: the median count per task of each of ``os.fsync``, ``os.rename``,
        ``os.replace`` and ``os.link`` (the median skips one-off costs such as creating the audit log);
        ``raw_writes_per_task``: ``ceil(fsyncs / 2)``, the raw writes of the baseline (each fsyncs the file
        and its directory); ``task_file_bytes``: the size of a published task file.
    """
    from conductor.executors.command import CommandRunner
    from conductor.worker import Worker, WorkerSettings

    project = make_project(root, tasks)
    publish_all(project)
    size = max(p.stat().st_size for p in project.fork.state_dir("pending").glob("*.task.json"))
    worker = Worker(project.layout, CommandRunner("true", layout=project.layout), WorkerSettings(), ignore=[])
    worker.reap()
    per_task: list[collections.Counter[str]] = []
    for _ in range(tasks):
        with _Counter() as counter:
            if not worker.process_once():
                raise RuntimeError(f"calibration worker found no task after {len(per_task)} of {tasks}")
        per_task.append(counter.calls)
    medians = {name: statistics.median(calls[name] for calls in per_task) for name in _Counter.NAMES}
    return {"calls_per_task": medians, "raw_writes_per_task": math.ceil(medians["fsync"] / 2),
            "task_file_bytes": size}


# --- 1. throughput ----------------------------------------------------------------------------------


def compiled_environ(env: Mapping[str, str], tmp: Path) -> dict[str, str]:
    """``env`` for worker processes that start as an installed package does: with byte code. A tree run with
    ``PYTHONDONTWRITEBYTECODE=1`` would compile every module changed since its last ``.pyc`` at each start
    (~0.25 s per worker here), so the byte code goes to a private cache (``PYTHONPYCACHEPREFIX``), filled
    before the runs: the whole package, and whatever a worker imports from the standard library and the
    dependencies (the cache replaces their own ``__pycache__`` folders)."""
    import conductor

    if not env.get("PYTHONDONTWRITEBYTECODE"):
        return dict(env)
    env = {k: v for k, v in env.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(tmp / "pycache")
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(Path(conductor.__file__).parent)], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    warm = make_project(tmp / "warm_up", 1)
    publish_all(warm)
    run = run_burst_workers(warm.root, "true", 1, env=env, out_dir=tmp / "warm_up_out", timeout=120)
    if run.codes != [0]:
        raise RuntimeError(f"warm-up worker failed: {run.failures()}")
    shutil.rmtree(warm.root)
    return env


def bench_throughput(tmp: Path, tasks: int, workers: list[int], env: Mapping[str, str]) -> dict[str, Any]:
    env = compiled_environ(env, tmp)
    calibration = durable_io_per_task(tmp / "calibration")
    payload = b"x" * calibration["task_file_bytes"]
    per_task = calibration["raw_writes_per_task"]
    runs = []
    publish: dict[str, Any] = {}
    spawn = sandboxed_spawn_seconds(tmp / "spawn")
    # With bubblewrap, one more 1-worker run with sandbox.mode off: the cycle without the namespaces' start.
    configs = [(count, "default") for count in workers]
    if spawn["sandboxed"] and 1 in workers:
        configs.append((1, "off"))
    for count, sandbox in configs:
        name = f"{count}" if sandbox == "default" else f"{count}_sandbox_{sandbox}"
        project = make_project(tmp / f"throughput_{name}", tasks)
        if sandbox != "default":
            project.task_overrides["sandbox_mode"] = sandbox
        timing = publish_all(project)
        if not publish:  # publishing does not depend on the worker count: measured once
            raw = raw_durable_ops_per_second(tmp / "raw_publish", tasks, payload, link=True)
            rate = tasks / timing["publish_seconds"]
            publish = {"tasks": tasks, "tasks_per_second": rate, "prepare_workspace_seconds": timing["prepare_seconds"],
                       "raw_ops_per_second": raw, "ratio": raw / rate}
        log(f"throughput: {count} worker(s) over {tasks} tasks, sandbox {sandbox}")
        run = run_burst_workers(project.root, "true", count, env=env, out_dir=tmp / f"throughput_{name}_out",
                                timeout=120 + tasks)
        completed = len(project.fork.task_ids("completed"))
        events = AuditLog(project.fork.audit_log).events()
        claimed = [seconds_of(e.ts) for e in events if e.type == "task.claimed"]
        finished = [seconds_of(e.ts) for e in events if e.type == "task.completed"]
        steady = (max(finished) - min(claimed)) if claimed and finished else None  # None: nothing ran
        raw = raw_durable_ops_per_second(tmp / f"raw_{name}", tasks * per_task, payload, threads=count)
        rate = tasks / run.wall_seconds
        runs.append({
            "workers": count, "sandbox": sandbox, "tasks": tasks, "completed": completed, "exit_codes": run.codes,
            "failures": run.failures(), "per_worker": run.counts(), "wall_seconds": run.wall_seconds,
            "tasks_per_second": rate, "first_claim_to_last_completion_seconds": steady,
            "steady_tasks_per_second": tasks / steady if steady else None,
            "raw_ops_per_second": raw, "raw_tasks_per_second": raw / per_task, "ratio": (raw / per_task) / rate,
            "ok": completed == tasks and run.codes == [0] * count,
        })
        shutil.rmtree(project.root)
    return {"durable_io": calibration, "publish": publish, "runs": runs, "spawn": spawn}


def sandboxed_spawn_seconds(folder: Path, runs: int = 40) -> dict[str, Any]:
    """Median wall time of starting and reaping ``true`` as the command executor starts a step's command
    (``conductor.sandbox.wrap`` of the default mode, then ``subprocess.run``), and of plain ``true``: the
    part of a task's cost that is neither durable I/O nor Conductor's own work."""
    from conductor.sandbox import for_step, wrap

    folder.mkdir(parents=True)
    spec = for_step(writable=(folder,), keys_dir=folder / "keys", environ=os.environ, mode="auto", network=False)
    wrapped = wrap(("true",), spec, cwd=folder)
    walls: dict[str, list[float]] = {"sandboxed": [], "plain": []}
    for _ in range(runs):
        for kind, argv in (("sandboxed", wrapped.argv), ("plain", ["true"])):
            began = time.perf_counter()
            subprocess.run(argv, cwd=folder, check=False)
            walls[kind].append(time.perf_counter() - began)
    return {"sandboxed": wrapped.sandboxed, "sandboxed_seconds": statistics.median(walls["sandboxed"]),
            "plain_seconds": statistics.median(walls["plain"])}


# --- 2. pick-up latency -----------------------------------------------------------------------------


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (no interpolation) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, *, proc: subprocess.Popen[bytes],
               output: Path) -> None:
    """Poll ``predicate`` every 2 ms; fail with the worker's output if it exits or ``timeout`` s pass."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None or time.monotonic() > deadline:
            why = f"the worker exited with {proc.returncode}" if proc.poll() is not None else f"{timeout} s passed"
            tail = output.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"waiting for {what}: {why}; its output:\n{tail}")
        time.sleep(0.002)


def bench_latency(tmp: Path, samples: int, env: Mapping[str, str]) -> dict[str, Any]:
    """Publish ``samples`` tasks one at a time to one watching worker; publish → ``task.claimed`` ts."""
    project = make_project(tmp / "latency", samples + 1)
    steps = project.step_ids()
    argv = [sys.executable, "-m", "conductor", "worker", "-C", str(project.root), "--command", "true"]
    out = tmp / "latency_worker.out"
    published: dict[str, float] = {}  # step -> time.time() when publish_task returned
    visible: dict[str, float] = {}  # step -> time.time() when its os.link into pending/ returned
    publish_costs = []
    with out.open("wb") as handle:
        worker = subprocess.Popen(argv, env=dict(env), stdout=handle, stderr=subprocess.STDOUT, cwd=project.root)
    try:
        publish_task(project.fork, project.task(steps[0]))  # warm-up: proves the worker is up and idle
        done = project.fork.task_file("completed", steps[0])
        wait_until(done.exists, 60, "the warm-up task", proc=worker, output=out)
        for step in steps[1:]:
            task = project.task(step)  # the workspace copy is made before the clock starts
            time.sleep(LATENCY_GAP_SECONDS)
            began = time.perf_counter()
            with _LinkClock() as link:
                publish_task(project.fork, task)
            published[step] = time.time()
            visible[step] = link.at
            publish_costs.append(time.perf_counter() - began)
            done = project.fork.task_file("completed", step)
            wait_until(done.exists, 30, f"{step} to complete", proc=worker, output=out)
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=15)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(timeout=10)
    claimed = {e.data["step_id"]: seconds_of(e.ts) for e in AuditLog(project.fork.audit_log).events()
               if e.type == "task.claimed"}
    latencies = [claimed[step] - at for step, at in published.items()]
    from_link = [claimed[step] - at for step, at in visible.items()]
    raw = raw_watch_latency(tmp / "raw_watch", samples)
    poll = project_poll_seconds(project.layout)
    return {
        "samples": samples, "gap_seconds": LATENCY_GAP_SECONDS, "fallback_poll_seconds": poll,
        "p50_seconds": percentile(latencies, 50), "p95_seconds": percentile(latencies, 95),
        "max_seconds": max(latencies), "from_link_p50_seconds": percentile(from_link, 50),
        "from_link_p95_seconds": percentile(from_link, 95),
        "publish_task_median_seconds": statistics.median(publish_costs),
        "raw_p50_seconds": raw["p50_seconds"], "raw_p95_seconds": raw["p95_seconds"],
        "raw_from_return_p50_seconds": raw["from_return_p50_seconds"], "raw_observer": raw["observer"],
    }


class _LinkClock:
    """Records ``time.time()`` when the ``os.link`` made inside the block returns (a task becoming visible)."""

    def __init__(self) -> None:
        self.at = float("nan")

    def __enter__(self) -> _LinkClock:
        self._original = os.link

        def link(*args: Any, **kw: Any) -> None:
            self._original(*args, **kw)
            self.at = time.time()

        os.link = link  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        os.link = self._original  # type: ignore[assignment]


def project_poll_seconds(layout: ProjectLayout) -> float:
    from conductor.config import load_config  # the worker's fallback poll, to read the latency against

    return float(load_config(layout.config_file).executor.poll_seconds)


def raw_watch_latency(folder: Path, samples: int) -> dict[str, Any]:
    """A watchdog observer (inotify on Linux) on ``folder``; temp + fsync + rename + dir fsync → event seen."""
    from watchdog.events import FileSystemEventHandler
    from watchdog.observers import Observer

    pending = folder / "pending"
    pending.mkdir(parents=True)
    seen: dict[str, float] = {}
    arrived = threading.Event()

    class Handler(FileSystemEventHandler):
        def on_any_event(self, event: Any) -> None:
            at = time.time()
            for path in (getattr(event, "dest_path", ""), event.src_path):
                name = os.path.basename(str(path))
                if name.startswith("step_") and name not in seen:
                    seen[name] = at
                    arrived.set()

    observer = Observer()
    observer.schedule(Handler(), str(folder), recursive=True)
    observer.start()
    latencies: list[float] = []  # from the rename's return (the file visible)
    from_return: list[float] = []  # from the raw write's return, after its directory fsync
    try:
        for i in range(samples):
            name = f"step_{i:03d}.task.json"
            time.sleep(LATENCY_GAP_SECONDS)
            arrived.clear()
            visible = raw_durable_write(pending, name, b"x" * 1500)
            returned = time.time()
            if not arrived.wait(10) or name not in seen:
                raise RuntimeError(f"the raw observer never saw {name}")
            latencies.append(seen[name] - visible)
            from_return.append(seen[name] - returned)
    finally:
        observer.stop()
        observer.join(timeout=5)
    return {"p50_seconds": percentile(latencies, 50), "p95_seconds": percentile(latencies, 95),
            "from_return_p50_seconds": percentile(from_return, 50), "observer": type(observer).__name__}


# --- 3. conductor --help ----------------------------------------------------------------------------


def median_walls(commands: Mapping[str, list[str]], runs: int, env: Mapping[str, str]) -> dict[str, float]:
    """Median wall seconds of each command, run in turns (one of each per round), so that a change in the
    machine's load during the measurement hits every command alike."""
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(runs):
        for name, argv in commands.items():
            began = time.perf_counter()
            subprocess.run(argv, env=dict(env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
            times[name].append(time.perf_counter() - began)
    return {name: statistics.median(values) for name, values in times.items()}


def bench_help(runs: int, env: Mapping[str, str]) -> dict[str, Any]:
    script = Path(sys.executable).parent / "conductor"
    commands = {"pass": [sys.executable, "-c", "pass"], "click": [sys.executable, "-c", "import click"],
                "module": [sys.executable, "-m", "conductor", "--help"]}
    if os.access(script, os.X_OK):
        commands["console"] = [str(script), "--help"]
    walls = median_walls(commands, runs, env)
    console = walls.get("console")
    return {"runs": runs, "python_pass_seconds": walls["pass"], "import_click_seconds": walls["click"],
            "module_help_seconds": walls["module"], "module_ratio": walls["module"] / walls["pass"],
            "module_click_ratio": walls["module"] / walls["click"],
            "console_script": str(script) if console is not None else None, "console_help_seconds": console,
            "console_ratio": console / walls["pass"] if console is not None else None,
            "console_click_ratio": console / walls["click"] if console is not None else None}


# --- 4. recovery of a crashed handoff folder --------------------------------------------------------


def dead_pid() -> int:
    """The pid of a child that has exited and been reaped (a crashed holder on this host)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


class _ChainWriter:
    """Appends audit events to a fork's log as ``AuditLog.append`` would, but in one write (setup speed)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        tail = AuditLog(path).tail(1)
        self.seq = tail[-1].seq + 1 if tail else 0
        self.prev = tail[-1].hash if tail else GENESIS
        self.lines: list[bytes] = []

    def add(self, type_: str, data: dict[str, Any]) -> None:
        entry = {"seq": self.seq, "ts": utc_now(), "type": type_, "data": data, "prev": self.prev}
        self.prev = digest(entry)
        self.lines.append(canonical_bytes({**entry, "hash": self.prev}) + b"\n")
        self.seq += 1

    def flush(self) -> None:
        with self.path.open("ab") as handle:
            handle.write(b"".join(self.lines))
        self.lines = []


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)  # setup only: not timed, so no fsync


def build_crashed_fork(root: Path, tasks: int) -> tuple[Project, dict[str, int]]:
    """A project whose one fork holds ``tasks`` tasks as a crash leaves them.

    90 % completed (task, result, explanation, provenance), 7 % pending, 3 % in progress with an expired
    lease of a dead pid on this host (their attempt copies exist, so a re-queue can restore them), and a
    few old ``.tmp.*`` files. The audit log records publish, claim and completion of each, as a live run
    would. Returns the project and the count of tasks per state.
    """
    project = make_project(root, tasks)
    fork, steps = project.fork, project.step_ids()
    in_progress = max(1, tasks * 3 // 100)
    pending = max(1, tasks * 7 // 100)
    completed = tasks - in_progress - pending
    holder, pid = f"conductor-worker@{HOST}:{dead_pid()}", dead_pid()
    executor = executor_info("command", holder)
    chain = _ChainWriter(fork.audit_log)
    for index, step in enumerate(steps):
        state = "completed" if index < completed else "pending" if index < completed + pending else "in_progress"
        sealed, data = sealed_bytes(project.task(step, workspace=state == "in_progress"))
        _write(fork.task_file(state, step), data)
        chain.add("task.published", {"step_id": step, "attempt": 1, "checksum": sealed["checksum"]})
        if state == "pending":
            continue
        chain.add("task.claimed", {"step_id": step, "attempt": 1, "holder": holder, "pid": pid, "host": HOST})
        if state == "in_progress":
            lease = Lease(task_id=step, attempt=1, fencing_token=1, holder=holder, pid=pid, host=HOST,
                          acquired_at="2026-01-01T00:00:00.000000Z", renewed_at="2026-01-01T00:00:00.000000Z",
                          expires_at="2026-01-01T00:01:00.000000Z")
            _write(fork.lease_file(step), sealed_bytes(lease)[1])
            continue
        _write_completion(fork, Task.model_validate(sealed), executor)
        chain.add("task.completed", {"step_id": step, "attempt": 1, "executor": holder, "duration_seconds": 0.05})
    _flush_with_lagging_mark(chain)
    _leave_temp_files(fork, steps, pid)
    return project, {"completed": completed, "pending": pending, "in_progress": in_progress}


def _flush_with_lagging_mark(chain: _ChainWriter) -> None:
    """Write the log with its check mark as far behind as a live engine's can be: a separate process reads
    the log as an engine does (``AuditLog(cut_torn_tail=True).events()``, which moves the mark on every
    ``MARK_EVERY_LINES`` lines it checks) when ``MARK_EVERY_LINES - 1`` lines are still to come."""
    lag = MARK_EVERY_LINES - 1
    rest, chain.lines = chain.lines[-lag:], chain.lines[:-lag]
    chain.flush()
    reader = "import sys; from conductor.audit import AuditLog; AuditLog(sys.argv[1], cut_torn_tail=True).events()"
    subprocess.run([sys.executable, "-c", reader, str(chain.path)], check=True)
    chain.lines = rest
    chain.flush()


def _write_completion(fork: ForkLayout, task: Task, executor: Any) -> None:
    now = utc_now()
    result = Result(task_id=task.task_id, plan_id=task.plan_id, fork_id=task.fork_id, attempt=1, fencing_token=1,
                    task_checksum=task.checksum or "", status="completed", executor=executor,
                    summary="ran true", started_at=now, finished_at=now)
    _, result_bytes = sealed_bytes(result)
    _write(fork.sidecar("completed", task.task_id, ".result.json"), result_bytes)
    _write(fork.sidecar("completed", task.task_id, ".explanation.md"),
           b"## Command\n`true` exited with 0 after 0.01 s.\n")
    statement = build_statement(task=task, result_digest_hex=sha256_hex(result_bytes),
                                result_name=f"{task.task_id}.result.json", changed=[], executor=executor,
                                started_at=now, finished_at=now, policy_digest=task.policy_digest)
    _write(fork.sidecar("completed", task.task_id, ".provenance.json"), statement_bytes(statement))


def _leave_temp_files(fork: ForkLayout, steps: list[str], pid: int) -> None:
    hour_ago = time.time() - 3600  # older than any grace period a recovery pass gives live writers
    for state, suffix in (("pending", ".task.json"), ("in_progress", ".lease.json"), ("completed", ".result.json"),
                          ("completed", ".provenance.json"), ("in_progress", ".task.json")):
        temp = fork.state_dir(state) / f".tmp.{steps[0]}{suffix}.{pid}.{secrets.token_hex(4)}"
        _write(temp, b'{"schema": "conductor.task/v1", "task_id": ')  # torn, as a crash mid-write leaves it
        os.utime(temp, (hour_ago, hour_ago))


def _recovery_entry() -> tuple[str, Callable[[Project], Any] | None]:
    """``conductor.recovery``'s entry point if that module exists and imports, else why not."""
    try:
        recovery = importlib.import_module("conductor.recovery")
    except ModuleNotFoundError as exc:
        if exc.name != "conductor.recovery":
            return f"conductor.recovery failed to import: {exc}", None
        return "conductor.recovery does not exist", None
    except Exception as exc:  # a half-written module must not stop the benchmark
        return f"conductor.recovery failed to import: {type(exc).__name__}: {exc}", None
    if hasattr(recovery, "recover_project"):
        return "conductor.recovery.recover_project(layout)", lambda p: recovery.recover_project(p.layout)
    if hasattr(recovery, "recover_fork"):
        return "conductor.recovery.recover_fork(fork)", lambda p: recovery.recover_fork(p.fork)
    return "conductor.recovery has neither recover_project nor recover_fork", None


def full_scan(fork: ForkLayout) -> int:
    """List every state and read + checksum-verify every task file; returns the number read."""
    read = 0
    for state in STATES:
        for step in fork.task_ids(state):
            read_document(fork.task_file(state, step), Task)
            read += 1
    return read


def raw_scan(fork: ForkLayout) -> int:
    """The raw baseline of :func:`full_scan`: list each state folder and read each task file's bytes."""
    read = 0
    for state in STATES:
        with os.scandir(fork.state_dir(state)) as entries:
            for entry in entries:
                if entry.name.endswith(".task.json") and not entry.name.startswith("."):
                    with open(entry.path, "rb") as handle:
                        handle.read()
                    read += 1
    return read


class _ReadTally:
    """While active: how many task files are opened (``os.open`` and ``open``), and how many bytes the process
    reads in all (``rchar`` of ``/proc/self/io``: every read system call; None where there is no such file)."""

    def __init__(self) -> None:
        self.task_files = 0
        self.bytes_read: int | None = None

    def __enter__(self) -> _ReadTally:
        self._saved = os.open, io.open, builtins.open
        self._rchar = _rchar()

        def counted(real: Callable[..., Any]) -> Callable[..., Any]:
            def opener(path: Any, *args: Any, **kw: Any) -> Any:
                if isinstance(path, (str, bytes, os.PathLike)) and os.fsdecode(path).endswith(".task.json"):
                    self.task_files += 1
                return real(path, *args, **kw)
            return opener

        os.open, io.open, builtins.open = (counted(real) for real in self._saved)  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        os.open, io.open, builtins.open = self._saved  # type: ignore[assignment]
        after = _rchar()
        self.bytes_read = None if after is None or self._rchar is None else after - self._rchar


def _rchar() -> int | None:
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def bench_recovery(tmp: Path, tasks: int, env: Mapping[str, str], probe: FsProbe | None = None) -> dict[str, Any]:
    """Recovery of a crashed fork: ``conductor.recovery`` then ``reap_expired`` (timed together), and, for
    reference only, a full scan reading every task file."""
    log(f"recovery: building a crashed fork of {tasks} tasks")
    began = time.perf_counter()
    project, built = build_crashed_fork(tmp / "recovery", tasks)
    setup = time.perf_counter() - began
    fork = project.fork
    files = sum(1 for state in STATES for _ in fork.state_dir(state).iterdir())
    log_size = sum(path.stat().st_size for path in project.layout.handoff_dir.rglob("audit.log"))  # plan + fork
    # The crash happened earlier: neither the build's writeback nor the slow spell that follows the earlier
    # sections' deletions (file creation several times slower for a while on some file systems) may run
    # during the timed part. sync, then wait (not timed) until creating files is as fast as at the start.
    settled = probe.settle() if probe is not None else {"waited_seconds": 0.0, "settled": None}
    if probe is None:
        os.sync()

    began = time.perf_counter()
    raw_read = raw_scan(fork)
    raw_seconds = time.perf_counter() - began

    child = recovery_in_new_process(project.root, env)
    parts, what, error = child["parts_seconds"], child["recovery_module"], child["recovery_error"]
    total = sum(parts.values())
    began = time.perf_counter()
    scanned = full_scan(fork)
    scan_seconds = time.perf_counter() - began
    after = {state: len(fork.task_ids(state)) for state in STATES}
    temps = sum(1 for state in STATES for p in fork.state_dir(state).iterdir() if p.name.startswith(".tmp."))
    chain = verify_chain(fork.audit_log)
    creation = raw_folder_creation(tmp / "raw_folders", retry_folder_shape(project), child["requeued"])
    return {
        "tasks": tasks, "built": built, "files": files, "setup_seconds": setup, "timed": list(parts),
        "recovery_module": what, "recovery_error": error, "parts_seconds": parts, "seconds": total,
        "prepare_retry_seconds": child["prepare_retry_seconds"], "recovery_task_files_read": child["task_files"],
        "recovery_bytes_read": child["bytes_read"], "log_bytes": log_size,
        "requeued": child["requeued"], "task_files_read": scanned,
        "full_scan_seconds": scan_seconds,
        "after": after, "temp_files_left": temps, "audit_chain_ok": chain.ok,
        "raw_seconds": raw_seconds, "raw_files_read": raw_read, "ratio": total / raw_seconds,
        "ok": error is None and chain.ok and temps == 0 and after["in_progress"] == 0,
        "settle_waited_seconds": settled["waited_seconds"], "settled": settled["settled"],
        "raw_folder_creation": creation,
    }


def retry_folder_shape(project: Project) -> dict[str, int]:
    """What one re-queued task's attempt folder holds, as entries to create: ``{"dirs", "files", "bytes"}``
    (its stat cache beside it counted as a file; zeros if no retry was published)."""
    pending = project.fork.state_dir("pending")
    tasks = (read_document(path, Task) for path in sorted(pending.glob("*.task.json")))
    retried = next((task for task in tasks if task.attempt > 1), None)
    shape = {"dirs": 0, "files": 0, "bytes": 0}
    if retried is None:
        return shape
    folder = project.root / retried.workspace
    shape["dirs"] = 1
    for path in [*folder.rglob("*"), folder.parent / f"{folder.name}.index"]:
        if path.is_dir():
            shape["dirs"] += 1
        elif path.is_file():
            shape["files"] += 1
            shape["bytes"] += path.stat().st_size
    return shape


def raw_folder_creation(root: Path, shape: dict[str, int], count: int) -> dict[str, Any]:
    """The raw file-system floor of the re-queue's checkouts: ``count`` folders of ``shape`` (flat: one folder
    holding ``dirs - 1`` empty folders and ``files`` files of ``bytes / files`` bytes) made with plain
    ``mkdir``/``open``/``write`` in one thread, no git, no fsync (the checkouts are not fsynced either)."""
    root.mkdir()
    size = shape["bytes"] // shape["files"] if shape["files"] else 0
    payload = b"x" * size
    began = time.perf_counter()
    cpu = time.process_time()
    for index in range(count):
        folder = root / f"r{index}"
        folder.mkdir()
        for sub in range(shape["dirs"] - 1):
            (folder / f"d{sub}").mkdir()
        for name in range(shape["files"]):
            fd = os.open(folder / f"f{name}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, payload)
            os.close(fd)
    seconds = time.perf_counter() - began
    return {"folders": count, "shape": shape, "seconds": seconds, "cpu_seconds": time.process_time() - cpu,
            "entries": count * (shape["dirs"] + shape["files"])}


def recovery_in_new_process(root: Path, env: Mapping[str, str]) -> dict[str, Any]:
    """Run the timed part of the recovery section (:func:`recover_and_reap`) in a new Python process, as it
    runs for real (``conductor resume`` or ``conductor worker`` after a crash): nothing of the logs is known
    yet, and the heap holds only what that process made, not this one's build of the fork (whose objects
    would make the collector's full passes several times longer). Its start is not timed.

    Raises:
        RuntimeError: the process failed (its stderr is in the message).
    """
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--recovery-child", str(root)],
                          capture_output=True, text=True, env=dict(env))
    if done.returncode != 0:
        raise RuntimeError(f"the recovery process failed ({done.returncode}): {done.stderr.strip()}")
    return json.loads(done.stdout)


def recover_and_reap(root: Path) -> dict[str, Any]:
    """The timed part of the recovery section, in this (new) process: ``conductor.recovery``, then
    ``reap_expired`` with the retry preparer the engine and workers pass; their seconds, what recovery read,
    and how many tasks were re-queued."""
    layout = ProjectLayout(root)
    # what _recovery_entry's and retry_preparer's callers use of a Project (its plan is not needed here)
    project: Any = types.SimpleNamespace(layout=layout, fork=layout.fork(PLAN_ID, FORK_ID))
    parts: dict[str, float] = {}
    what, recover = _recovery_entry()
    error = None
    tally = _ReadTally()
    if recover is not None:
        began = time.perf_counter()
        try:
            with tally:
                recover(project)
        except Exception as exc:  # reported (and the exit status says so); the rest of the pass is still timed
            error = f"{type(exc).__name__}: {exc}"
        parts[what] = time.perf_counter() - began
    preparer, prepare = _timed(retry_preparer(project))
    fork = project.fork
    began = time.perf_counter()
    reaped = reap_expired(fork, max_attempts=3, lease_seconds=60, on_event=AuditLog(fork.audit_log).append,
                          prepare_retry=preparer)
    parts["reap_expired"] = time.perf_counter() - began
    return {"parts_seconds": parts, "recovery_module": what, "recovery_error": error,
            "prepare_retry_seconds": prepare["seconds"], "task_files": tally.task_files,
            "bytes_read": tally.bytes_read, "requeued": sum(1 for r in reaped if r.outcome == "requeued")}


def _timed(function: Any) -> tuple[Any, dict[str, float]]:
    """``function`` (a retry preparer) wrapped to add its wall time, and that of every method of a
    ``BatchPreparer`` if it is one (the reaper's waits for checkouts made ahead included), to the returned
    ``{"seconds": ...}``. The wrapper is a ``BatchPreparer`` (a ``FolderTaker``) exactly when ``function`` is."""
    spent = {"seconds": 0.0}

    def timing(call: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kw: Any) -> Any:
            began = time.perf_counter()
            try:
                return call(*args, **kw)
            finally:
                spent["seconds"] += time.perf_counter() - began
        return timed

    if not isinstance(function, BatchPreparer):
        return timing(function), spent

    class Timed:
        __call__ = staticmethod(timing(function))
        prefetch = staticmethod(timing(function.prefetch))
        wait = staticmethod(timing(function.wait))
        sync = staticmethod(timing(function.sync))
        discard = staticmethod(timing(function.discard))

    timed = Timed()
    if isinstance(function, FolderTaker):  # a retry that takes its dead attempt's folder over is timed too

        class TimedTaker(Timed):
            take_over = staticmethod(timing(function.take_over))

        timed = TimedTaker()
    assert isinstance(timed, BatchPreparer), "the timing wrapper must keep the reaper's batch path"
    return timed, spent


# --- 5. the race ------------------------------------------------------------------------------------


def race_verdict(executed: Iterable[str], expected: Iterable[str]) -> dict[str, Any]:
    """Exactly-once check of a race from its O_APPEND execution log.

    Args:
        executed: the log's lines, ``"<task_id> <attempt>"`` per execution.
        expected: the lines a run of every published task exactly once would write.

    Returns:
        ``double_executions`` (lines written more than once, with their counts), ``lost`` (expected lines
        never written) and ``unexpected`` (lines no published task explains).
    """
    counts = collections.Counter(executed)
    wanted = set(expected)
    return {
        "double_executions": {line: n for line, n in sorted(counts.items()) if n > 1},
        "lost": sorted(wanted - set(counts)),
        "unexpected": sorted(set(counts) - wanted),
    }


def bench_race(tmp: Path, tasks: int, env: Mapping[str, str]) -> dict[str, Any]:
    log(f"race: publishing {tasks} tasks")
    began = time.perf_counter()
    project = make_project(tmp / "race", tasks)
    project.task_overrides["sandbox_mode"] = "off"  # the execution log is an oracle outside every workspace
    publish_all(project)
    setup = time.perf_counter() - began
    executed = tmp / "race_executed.log"
    command = f'echo "$CONDUCTOR_TASK_ID $CONDUCTOR_ATTEMPT" >> {executed}'  # >> opens with O_APPEND
    log(f"race: {RACE_WORKERS} workers over {tasks} tasks")
    run = run_burst_workers(project.root, command, RACE_WORKERS, env=env, out_dir=tmp / "race_out",
                            timeout=300 + tasks * 0.5)
    lines = executed.read_text().splitlines() if executed.exists() else []
    verdict = race_verdict(lines, [f"{step} 1" for step in project.step_ids()])
    where = {state: len(project.fork.task_ids(state)) for state in STATES}
    chain = verify_chain(project.fork.audit_log)
    events = AuditLog(project.fork.audit_log).events()
    claimed = collections.Counter(e.data["step_id"] for e in events if e.type == "task.claimed")
    completed = collections.Counter(e.data["step_id"] for e in events if e.type == "task.completed")
    not_completed = tasks - where["completed"]
    event_problems = (sum(1 for n in claimed.values() if n != 1) + sum(1 for n in completed.values() if n != 1)
                      + (tasks - len(completed)))
    holders = {e.data["holder"] for e in events if e.type == "task.claimed"}
    ok = (run.codes == [0] * RACE_WORKERS and not verdict["double_executions"] and not verdict["lost"]
          and not verdict["unexpected"] and not_completed == 0 and chain.ok and event_problems == 0
          and holders <= run.holders())  # every claim by one of these workers (one may have found nothing left)
    return {
        "tasks": tasks, "workers": RACE_WORKERS, "setup_seconds": setup, "wall_seconds": run.wall_seconds,
        "tasks_per_second": tasks / run.wall_seconds, "exit_codes": run.codes, "failures": run.failures(),
        "per_worker": run.counts(),
        "executions": len(lines), "double_executions": len(verdict["double_executions"]),
        "double_examples": list(verdict["double_executions"].items())[:5], "lost_tasks": len(verdict["lost"]),
        "lost_examples": verdict["lost"][:5], "unexpected": len(verdict["unexpected"]),
        "final_states": where, "in_progress_files_left": len(list(project.fork.state_dir("in_progress").iterdir())),
        "audit_chain_ok": chain.ok, "audit_entries": chain.entries, "audit_problems": chain.problems[:5],
        "claim_or_completion_events_not_exactly_once": event_problems, "ok": ok,
    }


# --- machine, table, main ---------------------------------------------------------------------------


def machine(tmp: Path) -> dict[str, Any]:
    fs, device, mount = "unknown", "unknown", "unknown"
    try:
        target = os.path.realpath(tmp)
        best = ""
        for line in Path("/proc/self/mounts").read_text().splitlines():
            dev, point, kind = line.split()[:3]
            point = point.replace("\\040", " ")
            if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
                best, fs, device, mount = point, kind, dev, point
    except OSError:
        pass  # not Linux: the file system stays unknown
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpus": os.cpu_count(), "cpus_usable": affinity, "python": platform.python_version(),
        "implementation": platform.python_implementation(), "platform": platform.platform(),
        "temp_dir": str(Path(tempfile.gettempdir())), "file_system": fs, "device": device, "mount": mount,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _rate(value: float, unit: str) -> str:
    return f"{value:,.1f} {unit}" if value < 100 else f"{value:,.0f} {unit}"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:,.1f} ms"


def _ratio(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:,.1f}x"


def render(doc: Mapping[str, Any]) -> str:
    """The figures of ``doc`` (this script's JSON document) as a plain-text table."""
    m = doc["machine"]
    head = [f"Conductor handoff benchmark: {m['cpus']} CPUs ({m['cpus_usable']} usable), {m['implementation']} "
            f"{m['python']}, temp dir {m['temp_dir']} on {m['file_system']} ({m['device']}), "
            f"load {m['load_average']}", ""]
    rows: list[tuple[str, str, str, str]] = [("figure", "conductor", "raw baseline", "overhead")]
    t = doc.get("throughput")
    if t:
        io, pub = t["durable_io"], t["publish"]
        rows.append((f"publish_task, {pub['tasks']:,} tasks (workspace copies excluded)",
                     _rate(pub["tasks_per_second"], "tasks/s"), _rate(pub["raw_ops_per_second"], "ops/s"),
                     _ratio(pub["ratio"])))
        for run in t["runs"]:
            flag = "" if run["ok"] else "  FAILED"
            raw = f"{_rate(run['raw_tasks_per_second'], 'tasks/s')} ({_rate(run['raw_ops_per_second'], 'ops/s')})"
            off = ", sandbox.mode off" if run.get("sandbox") == "off" else ""
            rows.append((f"throughput, {run['workers']} worker(s){off}, {run['tasks']:,} tasks, wall{flag}",
                         _rate(run["tasks_per_second"], "tasks/s"), raw, _ratio(run["ratio"])))
            steady = run["steady_tasks_per_second"]
            rows.append(("  first claim to last completion", _rate(steady, "tasks/s") if steady else "-",
                         "", ""))
            rows.append(("  tasks per worker", str(run["per_worker"]), "", ""))
            rows.extend((f"  {failure}", "", "", "") for failure in run["failures"])
        spawn = t.get("spawn")
        one = next((run for run in t["runs"] if run["workers"] == 1 and run.get("sandbox", "default") == "default"),
                   None)
        if spawn and one:
            with_spawn = 1 / (1 / one["raw_tasks_per_second"] + spawn["sandboxed_seconds"])
            kind = "sandboxed" if spawn["sandboxed"] else "unsandboxed (no bubblewrap)"
            rows.append((f"  1 worker beside raw + one {kind} `true` start per task "
                         f"({_ms(spawn['sandboxed_seconds'])}; plain `true` {_ms(spawn['plain_seconds'])})",
                         _rate(one["tasks_per_second"], "tasks/s"), _rate(with_spawn, "tasks/s"),
                         _ratio(with_spawn / one["tasks_per_second"])))
            rows.extend((f"  {line}", "", "", "") for line in goal_budget(one["raw_tasks_per_second"], spawn))
        calls = ", ".join(f"{k} {v:g}" for k, v in io["calls_per_task"].items())
        rows.append((f"  durable I/O per task: {calls} -> {io['raw_writes_per_task']} raw writes of "
                     f"{io['task_file_bytes']:,} B", "", "", ""))
    lat = doc.get("latency")
    if lat:
        label = f"pick-up latency (publish_task return -> task.claimed), {lat['samples']} samples"
        for pct in ("p50", "p95"):
            mine, raw = lat[f"{pct}_seconds"], lat[f"raw_{pct}_seconds"]
            rows.append((f"{label}, {pct}", _ms(mine), _ms(raw) + " (rename -> event)",
                         _ratio(mine / raw if raw > 0 else None)))
        rows.append((f"  from the task's link into pending/: p50 {_ms(lat['from_link_p50_seconds'])}, "
                     f"p95 {_ms(lat['from_link_p95_seconds'])}; max {_ms(lat['max_seconds'])}; publish_task median "
                     f"{_ms(lat['publish_task_median_seconds'])}; fallback poll {lat['fallback_poll_seconds']} s",
                     "", "", ""))
        rows.append((f"  raw observer {lat['raw_observer']}; raw p50 from the write's return (after its dir fsync) "
                     f"{_ms(lat['raw_from_return_p50_seconds'])}", "", "", ""))
    h = doc.get("help")
    if h:
        click_ms = _ms(h["import_click_seconds"]) + ' (python -c "import click")'
        rows.append((f"python -m conductor --help, median of {h['runs']}", _ms(h["module_help_seconds"]), click_ms,
                     _ratio(h["module_click_ratio"])))
        if h["console_help_seconds"] is not None:
            rows.append(("conductor --help (console script)", _ms(h["console_help_seconds"]), click_ms,
                         _ratio(h["console_click_ratio"])))
        else:
            rows.append(("conductor --help (console script)", "not beside sys.executable", "", ""))
        rows.append((f"  python -c pass {_ms(h['python_pass_seconds'])}: --help {_ratio(h['module_ratio'])} (module), "
                     f"{_ratio(h['console_ratio'])} (console script) of a bare interpreter", "", "", ""))
    r = doc.get("recovery")
    if r:
        flag = "" if r["ok"] else "  FAILED"
        rows.append((f"recovery, {r['tasks']:,} tasks ({r['files']:,} files){flag}", _ms(r["seconds"]),
                     _ms(r["raw_seconds"]) + " (list + read)", _ratio(r["ratio"])))
        for part, seconds in r["parts_seconds"].items():
            rows.append((f"  {part}", _ms(seconds), "", ""))
            if part == "reap_expired":
                rows.append(("    of which prepare_retry (attempt folders, conductor.attempts)",
                             _ms(r["prepare_retry_seconds"]), "", ""))
        if r["recovery_error"] or r["recovery_module"] not in r["parts_seconds"]:
            error = f"; ERROR {r['recovery_error']}" if r["recovery_error"] else ""
            rows.append((f"  {r['recovery_module']}{error}", "", "", ""))
        read = "" if r["recovery_bytes_read"] is None else f", {r['recovery_bytes_read']:,} bytes read in all"
        rows.append((f"  recovery opened {r['recovery_task_files_read']:,} task file(s){read} "
                     f"(the audit logs hold {r['log_bytes']:,} bytes)", "", "", ""))
        rows.append((f"  built {r['built']}; re-queued {r['requeued']}; after {r['after']}; "
                     f".tmp files left {r['temp_files_left']}; audit chain ok {r['audit_chain_ok']}", "", "", ""))
        if r.get("settled") is not None:
            rows.append((f"  waited {r['settle_waited_seconds']:.1f} s (not timed) for file creation to be as fast as "
                         f"at the start{'' if r['settled'] else ' (it never was)'}", "", "", ""))
        made = r["raw_folder_creation"]
        if made["folders"]:
            shape = made["shape"]
            rows.append((f"  raw creation of {made['folders']:,} folders shaped as a retry's ({shape['dirs']} folders, "
                         f"{shape['files']} files, {shape['bytes']:,} B), one thread, no fsync: "
                         f"{_ms(made['seconds'])}, {made['cpu_seconds'] / made['entries'] * 1e3:.3f} ms CPU per entry",
                         "", "", ""))
        rows.append((f"full scan after recovery, for reference (read_document of all {r['task_files_read']:,} task files)",
                     _ms(r["full_scan_seconds"]), "", ""))
    race = doc.get("race")
    if race:
        verdict = "ok" if race["ok"] else "FAILED"
        rows.append((f"race, {race['workers']} workers, {race['tasks']:,} tasks: {verdict}",
                     f"{race['wall_seconds']:,.1f} s", "", ""))
        rows.append(("  tasks per worker", str(race["per_worker"]), "", ""))
        rows.extend((f"  {failure}", "", "", "") for failure in race["failures"])
        rows.append((f"  double executions {race['double_executions']}, lost tasks {race['lost_tasks']}, "
                     f"audit chain ok {race['audit_chain_ok']} ({race['audit_entries']:,} entries), "
                     f"setup {race['setup_seconds']:.1f} s", "", "", ""))
    widths = [max(len(row[i]) for row in rows if any(row[1:])) for i in range(4)]
    lines = head
    for row in rows:
        if any(row[1:]):
            lines.append("  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
                                   for i, cell in enumerate(row)).rstrip())
        else:
            lines.append(row[0])
    return "\n".join(lines)


def goal_budget(raw_tasks_per_second: float, spawn: Mapping[str, Any]) -> list[str]:
    """What the goal "1 worker >= 50 % of the raw baseline" leaves a task, beside what no implementation
    can skip: the raw writes themselves and the start of the task's command (as the executor starts it)."""
    raw = 1 / raw_tasks_per_second
    start = spawn["sandboxed_seconds"] if spawn["sandboxed"] else spawn["plain_seconds"]
    floor = raw + start
    verdict = "within" if floor <= 2 * raw else "over"
    return [f"goal 50 % of raw allows {_ms(2 * raw)} a task; the raw writes ({_ms(raw)}) plus the command's "
            f"start ({_ms(start)}) alone take {_ms(floor)}: {verdict} it before any work of Conductor's"]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
    return value


def _sections(text: str) -> list[str]:
    chosen = [part.strip() for part in text.split(",")]
    unknown = [part for part in chosen if part not in SECTIONS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    return chosen


def _workers(text: str) -> list[int]:
    try:
        return [_positive(part) for part in text.split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: expected worker counts such as 1,2,4") from exc


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=_positive, default=1000, help="tasks per throughput run (default 1000)")
    parser.add_argument("--workers", type=_workers, default=[1, 2, 4], help="worker counts (default 1,2,4)")
    parser.add_argument("--latency-samples", type=_positive, default=50, help="pick-up samples (default 50)")
    parser.add_argument("--recovery-tasks", type=_positive, default=10_000, help="tasks in the crashed fork")
    parser.add_argument("--race-tasks", type=int, default=0, help="tasks of the 4-worker race (default 0 = skip)")
    parser.add_argument("--help-runs", type=_positive, default=7, help="runs per --help timing (default 7)")
    parser.add_argument("--settle", type=float, default=60.0,
                        help="before timing recovery, wait up to S seconds (not timed) until creating files is as "
                             "fast as at the start (default 60; 0 = only sync)")
    parser.add_argument("--only", type=_sections, default=list(SECTIONS),
                        help=f"run only these sections, comma-separated (default: {','.join(SECTIONS)})")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    args = parser.parse_args(argv)
    if args.race_tasks < 0:
        parser.error("--race-tasks: must be 0 (skip) or more")
    if args.only == ["race"] and not args.race_tasks:
        parser.error("--only race: give --race-tasks N as well (0 skips the race)")
    return args


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["--recovery-child"]:  # the new process of recovery_in_new_process
        print(json.dumps(recover_and_reap(Path(sys.argv[2]))))
        return 0
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="conductor-bench-"))
    try:
        env = clean_environ(tmp / "home")
        (tmp / "home").mkdir()
        doc: dict[str, Any] = {"machine": machine(tmp)}
        log(f"temp dir {tmp}")
        probe = FsProbe(tmp / "fs_probe", max_wait=args.settle)  # reference: file creation before any section ran
        runs: dict[str, Callable[[], Any]] = {
            "throughput": lambda: bench_throughput(tmp, args.tasks, args.workers, env),
            "latency": lambda: bench_latency(tmp, args.latency_samples, env),
            "help": lambda: bench_help(args.help_runs, env),
            "recovery": lambda: bench_recovery(tmp, args.recovery_tasks, env, probe),
            "race": lambda: bench_race(tmp, args.race_tasks, env) if args.race_tasks else None,
        }
        for section in SECTIONS:
            if section in args.only:
                log(f"{section} ...")
                doc[section] = runs[section]()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(doc, indent=2, allow_nan=False) if args.json else render(doc))
    failed = [run for run in (doc.get("throughput") or {"runs": []})["runs"] if not run["ok"]]
    for section in ("recovery", "race"):
        if doc.get(section) is not None and not doc[section]["ok"]:
            failed.append(doc[section])
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
