"""``explore``, ``build`` and ``resume``: plan and run."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import click

from conductor.cli.common import echo_json, json_option, open_project, project_option


def _run_options(func):  # type: ignore[no-untyped-def]
    for option in reversed([
        project_option,
        click.option("--provider", type=click.Choice(["openai", "gemini"]), default=None, help="LLM provider."),
        click.option("--model", default=None, help="Model for planner and executor."),
        click.option("--executor", "executor_kind", type=click.Choice(["llm", "command", "handoff"]), default=None,
                     help="Who executes steps (default: config.yaml)."),
        click.option("--command", "executor_command", default=None, help="Command for --executor command."),
        click.option("--auto-approve", is_flag=True, help="Run low-confidence steps without approval."),
        click.option("--no-apply", is_flag=True, help="Do not apply the winner's changes to the project."),
        click.option("--no-wait", is_flag=True, help="Return when only external executors have work left."),
        click.option("--keep-workspaces", is_flag=True,
                     help="Keep the attempt folders when the plan finishes (for inspection; `conductor gc` removes them)."),
        click.option("--no-cache", is_flag=True,
                     help="Call the LLM even where a recording of the same request exists (and record anew)."),
        click.option("--budget-usd", "budget_usd", type=click.FloatRange(0, 1_000_000, min_open=True), default=None,
                     help="LLM budget of the plan in USD (needs prices); the plan remembers it. Exit 14 when reached."),
        click.option("--budget-tokens", "budget_tokens", type=click.IntRange(1, 10**12), default=None,
                     help="LLM budget of the plan in input + output tokens; the plan remembers it."),
        json_option,
    ]):
        func = option(func)
    return func


def _planner_options(func):  # type: ignore[no-untyped-def]
    func = click.option("--planner-timeout", "planner_timeout", type=click.IntRange(1, 86_400), default=None,
                        help="Seconds handoff planning waits for an acceptable plan (default: config, 3600).")(func)
    return click.option("--planner", "planner_kind", type=click.Choice(["llm", "handoff"]), default=None,
                        help="Who plans: the LLM, or an agent answering a planning task (default: config.yaml).")(func)


def _overrides(provider, model, executor_kind, executor_command, forks=None):  # type: ignore[no-untyped-def]
    values = {"planner.provider": provider, "planner.model": model, "executor.kind": executor_kind,
              "executor.command": executor_command, "planner.forks": forks}
    if provider is not None:
        values["executor.provider"] = provider
    if model is not None:
        values["executor.model"] = model
    return values


@click.command()
@click.argument("goal", required=False)
@click.option("--plan", "plan_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A hand-written plan (YAML/JSON) instead of the LLM planner.")
@click.option("--forks", type=click.IntRange(1, 16), default=None, help="Strategies to explore (default: config, 3).")
@_planner_options
@_run_options
def explore(goal, plan_file, forks, **options) -> int:  # type: ignore[no-untyped-def]
    """Plan several distinct strategies for GOAL, run each as a fork, rank them, apply the best."""
    return _plan_and_run(goal, plan_file, forks, single=False, **options)


@click.command()
@click.argument("goal", required=False)
@click.option("--plan", "plan_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A hand-written plan (YAML/JSON); its first strategy is used.")
@_planner_options
@_run_options
def build(goal, plan_file, **options) -> int:  # type: ignore[no-untyped-def]
    """Plan one strategy for GOAL and run it."""
    return _plan_and_run(goal, plan_file, 1, single=True, **options)


def _plan_and_run(goal, plan_file, forks, *, single, project_dir, provider, model, executor_kind,  # type: ignore[no-untyped-def]
                  executor_command, auto_approve, no_apply, no_wait, no_cache, keep_workspaces, as_json,
                  budget_usd=None, budget_tokens=None, planner_kind=None, planner_timeout=None) -> int:
    from conductor.runtime import RunChoices, budget_limits, new_plan, runner_factory

    overrides = _overrides(provider, model, executor_kind, executor_command, forks)
    overrides.update({"planner.kind": planner_kind, "planner.handoff_timeout_seconds": planner_timeout})
    project = open_project(project_dir, overrides)
    if plan_file is not None:
        from conductor.planner import load_plan_file

        load_plan_file(plan_file)  # a bad plan file is reported before a missing API key
    choices = RunChoices(provider=provider, model=model, budget_usd=budget_usd, budget_tokens=budget_tokens)
    # fails on a missing API key (or a USD budget without a price) before anything is written
    factory = runner_factory(project, no_cache=no_cache, budget=budget_limits(project, None, choices))
    count = 1 if single else (forks or project.config.planner.forks)
    plan = new_plan(project, goal=goal, plan_file=plan_file, forks=count, no_cache=no_cache,
                    on_planning=lambda task: _planning_published(task, as_json), choices=choices)
    if not as_json:
        from conductor.cli.render import printable

        click.echo(f"plan {plan.plan_id}: {len(plan.forks)} fork(s) for: {printable(plan.goal)}", err=True)
    return _execute(project, plan, factory, auto_approve=auto_approve, no_apply=no_apply, no_wait=no_wait, keep=keep_workspaces,
                    as_json=as_json)


def _planning_published(task, as_json: bool) -> None:  # type: ignore[no-untyped-def]
    if not as_json:
        from conductor.cli.render import printable

        click.echo(printable(f"planning task published for plan {task.plan_id} (attempt {task.attempt}); waiting until "
                             f"{task.deadline} for an agent: `conductor task claim`, or the MCP tool get_planning_task"),
                   err=True)


@click.command()
@click.argument("plan_id", required=False)
@_run_options
def resume(plan_id, project_dir, provider, model, executor_kind, executor_command, auto_approve,  # type: ignore[no-untyped-def]
           no_apply, no_wait, no_cache, keep_workspaces, as_json, budget_usd=None, budget_tokens=None) -> int:
    """Continue PLAN_ID (default: the newest unfinished plan) after a crash, timeout, approval or budget halt,
    with the plan's own executor model unless --provider/--model say otherwise."""
    from conductor.runtime import RunChoices, prepare_resume

    project = open_project(project_dir, _overrides(provider, model, executor_kind, executor_command))
    choices = RunChoices(provider=provider, model=model, budget_usd=budget_usd, budget_tokens=budget_tokens)
    project, plan, factory = prepare_resume(project, plan_id, choices, no_cache=no_cache)
    if not as_json:
        from conductor.cli.render import printable

        click.echo(f"resuming plan {plan.plan_id}: {printable(plan.goal)}", err=True)
    return _execute(project, plan, factory, auto_approve=auto_approve, no_apply=no_apply, no_wait=no_wait, keep=keep_workspaces,
                    as_json=as_json)


@click.command("fork")
@click.option("--from", "from_step", required=True, help="The step after which the new fork starts.")
@click.option("--fork", "parent_fork", default=None, help="The fork to start from (default: the winner, or the "
              "only fork that merged the step).")
@click.option("--instruction", default=None, help="Extra instruction added to every step after --from.")
@click.option("--plan-id", "plan_id", default=None, help="Plan id (default: the newest plan).")
@_run_options
def fork(from_step, parent_fork, instruction, plan_id, project_dir, provider, model, executor_kind,  # type: ignore[no-untyped-def]
         executor_command, auto_approve, no_apply, no_wait, no_cache, keep_workspaces, as_json, budget_usd=None,
         budget_tokens=None) -> int:
    """Start a new fork of a plan from the workspace as it was after a step, and run the rest (with the
    plan's own executor model unless --provider/--model say otherwise)."""
    from conductor.runtime import RunChoices, prepare_fork

    project = open_project(project_dir, _overrides(provider, model, executor_kind, executor_command))
    choices = RunChoices(provider=provider, model=model, budget_usd=budget_usd, budget_tokens=budget_tokens)
    project, record, plan, factory = prepare_fork(project, plan_id, from_step, fork_id=parent_fork,
                                                  instruction=instruction, choices=choices, no_cache=no_cache)
    if not as_json:
        from conductor.cli.render import printable

        click.echo(printable(f"fork {record.fork.fork_id} of plan {plan.plan_id}: from fork {record.parent.fork_id} "
                             f"after {from_step} (reusing {', '.join(record.reused_steps)})"), err=True)
    return _execute(project, plan, factory, auto_approve=auto_approve, no_apply=no_apply, no_wait=no_wait, keep=keep_workspaces,
                    as_json=as_json)


def _execute(project, plan, factory, *, auto_approve, no_apply, no_wait, keep, as_json) -> int:  # type: ignore[no-untyped-def]
    from conductor.engine import EngineOptions
    from conductor.runtime import run_plan

    options = EngineOptions(auto_approve=auto_approve or project.config.approval.auto_approve,
                            apply=not no_apply, wait=not no_wait,
                            keep_workspaces=keep or project.config.workspace.keep)
    from conductor.sandbox import availability

    why = availability()
    if why is not None:  # warned once per run; the plan's log records it (sandbox.unavailable) when mode is auto
        click.echo(f"conductor: warning: launched commands run without a sandbox: {why}", err=True)
    live = None
    progress = lambda: None  # noqa: E731
    if not as_json and sys.stderr.isatty():
        live, progress = _live_status(project, plan.plan_id)
    from conductor.errors import BudgetExceeded

    previous = _terminate_like_ctrl_c()
    try:
        report = run_plan(project, plan, options, on_progress=progress, factory=factory)
    except BudgetExceeded as exc:
        if live is not None:
            live.stop()
            live = None
        return _budget_halt(project, plan.plan_id, exc, as_json)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if live is not None:
            live.stop()
    return _report(project, report, as_json)


def _terminate_like_ctrl_c():  # type: ignore[no-untyped-def]
    """Make SIGTERM end the run as Ctrl-C does (``errors.Terminated``); returns the handler it replaced (None
    off the main thread, where no handler can be set)."""
    from conductor.errors import Terminated

    def terminated(signum, frame):  # type: ignore[no-untyped-def]
        raise Terminated()

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, terminated)


def _budget_halt(project, plan_id: str, exc, as_json: bool) -> int:  # type: ignore[no-untyped-def]
    """The run stopped at the LLM budget: calls in flight finished, the rest wait in pending/ (exit 14)."""
    from conductor.redact import redact

    if as_json:
        echo_json({"plan_id": plan_id, "status": "halted", "reason": "budget", "message": redact(str(exc)),
                   "budget": {"scope": exc.scope, "unit": exc.unit, "limit": exc.limit, "used": exc.used,
                              "needed": exc.needed}})
    else:
        from conductor.cli.render import console, safe, status_table
        from conductor.inspect import plan_status

        out = console()
        out.print(status_table(plan_status(project.layout, plan_id)))
        out.print(f"[yellow]{safe(redact(str(exc)))}[/]")
    return exc.exit_code


def _live_status(project, plan_id):  # type: ignore[no-untyped-def]
    from rich.live import Live

    from conductor.cli.render import console, status_table
    from conductor.inspect import plan_status

    live = Live(console=console(stderr=True), refresh_per_second=4, transient=True)
    live.start()
    return live, lambda: live.update(status_table(plan_status(project.layout, plan_id)))


def _report(project, report, as_json: bool) -> int:  # type: ignore[no-untyped-def]
    from conductor.errors import Halted

    data = {
        "plan_id": report.plan_id, "status": report.status, "message": report.message,
        "ranking": [e.to_dict() for e in report.ranking], "applied_fork": report.applied_fork,
        "applied_files": report.applied_files,
        "awaiting_approval": [{"fork_id": f, "step_id": s} for f, s in report.awaiting_approval],
        "waiting_for_executor": [{"fork_id": f, "step_id": s} for f, s in report.waiting_for_executor],
    }
    if as_json:
        echo_json(data)
    else:
        _print_report(project, report)
    if report.status == "halted":
        return Halted.exit_code
    return 0 if report.status == "succeeded" else 1


def _print_report(project, report) -> None:  # type: ignore[no-untyped-def]
    from conductor.cli.render import console, ranking_table, safe, status_table
    from conductor.inspect import plan_status

    out = console()
    out.print(status_table(plan_status(project.layout, report.plan_id)))
    if report.ranking:
        winner = report.ranking[0].fork_id if report.status == "succeeded" else None
        out.print(ranking_table([e.to_dict() for e in report.ranking], winner))
    for fork_id, step_id in report.awaiting_approval:
        out.print(f"[magenta]{safe(step_id)} of fork {safe(fork_id)} waits for approval:[/] "
                  f"{safe(f'conductor approve {step_id} --fork {fork_id} --plan-id {report.plan_id}')}, "
                  "then conductor resume")
    if report.waiting_for_executor:
        out.print(f"{len(report.waiting_for_executor)} task(s) wait for an external executor "
                  "(start `conductor worker`, then `conductor resume`).")
    if report.applied_fork:
        out.print(f"[green]applied fork {safe(report.applied_fork)}[/]: "
                  f"{safe(', '.join(report.applied_files) or 'no file changes')}")
    elif report.status == "succeeded":
        out.print("not applied (--no-apply)")
    if report.message and report.status != "succeeded":
        out.print(f"[red]{safe(report.message)}[/]" if report.status == "failed" else safe(report.message))
