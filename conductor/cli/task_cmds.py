"""``conductor task``: the handoff protocol in a few calls, for IDE agents and scripts.

Parses, calls :mod:`conductor.handoff.agent`, prints. ``--json`` prints one JSON object on stdout; the
plain text is one fact per line, never wrapped, so an agent reading a pipe sees whole lines.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from conductor.cli.common import echo_json, json_option, project_option, start_dir

holder_option = click.option(
    "--holder", default=None, metavar="NAME",
    help="Who holds the claim; keep it the same across calls (default: $CONDUCTOR_HOLDER, else conductor-task@<host>).")
attempt_option = click.option(
    "--attempt", type=click.IntRange(min=1), default=None,
    help="The attempt you claimed: refuse if the task has moved on to another attempt.")
plan_option = click.option("--plan", "plan_id", default=None, metavar="PLAN", help="Only this plan (default: every plan).")
fork_option = click.option("--fork", "fork_id", default=None, metavar="FORK", help="Only this fork (default: every fork).")


def held_task_options(*, attempt: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The options of every command about one TASK you hold, in help order: ``--plan``, ``--fork``,
    ``--holder``, ``--attempt`` (with ``attempt``), ``-C``, ``--json``."""
    options = (plan_option, fork_option, holder_option, *((attempt_option,) if attempt else ()), project_option,
               json_option)

    def apply(function: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):  # as a stack of decorators would, bottom first
            function = option(function)
        return function

    return apply


def _layout(project_dir: Path | None):  # type: ignore[no-untyped-def]
    from conductor.layout import ProjectLayout

    return ProjectLayout.find(start_dir(project_dir))


@click.group()
def task() -> None:
    """Execute handoff tasks by hand or from an agent: claim, work in the workspace, complete.

    \b
      conductor task claim --json          # the next pending task, with its workspace
      (edit files in "workspace", run the checks there)
      conductor task complete TASK --summary "what I did"

    TASK is a step id (step_001) or PLAN/FORK/STEP. A claim's lease needs no process: any
    `conductor task` call on the task renews it; it ends at the step's timeout. See docs/cli.md.
    """


@task.command("list")
@click.option("--state", "states", multiple=True, type=click.Choice(["pending", "in_progress", "completed", "failed"]),
              help="Only tasks in this state (repeatable; default: pending and in_progress).")
@plan_option
@fork_option
@project_option
@json_option
def list_(states: tuple[str, ...], plan_id: str | None, fork_id: str | None, project_dir: Path | None, as_json: bool) -> int:
    """List tasks, oldest plan first, then fork, then step."""
    from conductor.handoff.agent import ACTIVE_STATES, list_tasks
    from conductor.handoff.planning import planning_tasks

    layout, wanted = _layout(project_dir), states or ACTIVE_STATES
    planning = [r for r in planning_tasks(layout) if r["state"] in wanted and plan_id in (None, r["plan_id"])
                and fork_id is None]
    only_planning = plan_id is not None and plan_id not in layout.plan_ids() and bool(planning)
    tasks = [] if only_planning else list_tasks(layout, plan_id=plan_id, fork_id=fork_id, states=wanted)
    if as_json:
        echo_json({"tasks": [t.to_json() for t in tasks], "planning": planning})
        return 0
    if not tasks and not planning:
        click.echo("no task " + " or ".join(wanted))
    for row in planning:
        held = f"  held by {_p(row['holder'])} until {row['lease_expires_at']}" if row["holder"] else ""
        click.echo(f"planning (plan {_p(row['plan_id'])})  {row['state']}  attempt {row['attempt']}{held}  {_p(row['goal'])}")
    for item in tasks:
        held = f"  held by {_p(item.holder)} until {item.lease_expires_at}" if item.state == "in_progress" else ""
        click.echo(f"{_p(item.ref)}  {item.state}  attempt {item.attempt}{held}  {_p(item.title)}".rstrip())
    return 0


@task.command()
@click.argument("task_id", metavar="[TASK]", required=False)
@plan_option
@fork_option
@holder_option
@click.option("--wait", "wait_seconds", type=click.FloatRange(min=0, max=86_400), default=0.0, metavar="SECONDS",
              help="With nothing to claim, wait up to this long for a task to be published (default: 0).")
@project_option
@json_option
def claim(task_id: str | None, plan_id: str | None, fork_id: str | None, holder: str | None, wait_seconds: float,
          project_dir: Path | None, as_json: bool) -> int:
    """Claim the next pending task (or TASK) and print what to do and where. Exit 9: nothing to claim."""
    from conductor.handoff import agent

    if task_id in (None, PLANNING) and fork_id is None:
        offered = _claim_planning(_layout(project_dir), plan_id, holder, wait_seconds, named=task_id == PLANNING)
        if offered is not None:
            _print_planning(offered.to_json(), as_json)
            return 0
    claimed = agent.claim(_layout(project_dir), plan_id=plan_id, fork_id=fork_id, task_id=task_id, holder=holder,
                          wait_seconds=wait_seconds)
    if as_json:
        echo_json(claimed.to_json())
        return 0
    click.echo(f"claimed {_p(claimed.ref)} (attempt {claimed.attempt}) for {_p(claimed.holder)}")
    _print_task(claimed)
    pinned = f"{_p(claimed.ref)} --attempt {claimed.attempt}"
    click.echo(f'next: work only in the workspace, then `conductor task complete {pinned} --summary "…"` '
               f"(or `conductor task release {pinned}` to give it back)")
    return 0


@task.command()
@click.argument("task_id", metavar="TASK")
@held_task_options(attempt=False)
def show(task_id: str, plan_id: str | None, fork_id: str | None, holder: str | None, project_dir: Path | None,
         as_json: bool) -> int:
    """Show TASK in whatever state it is (renews the lease when you hold it)."""
    from conductor.handoff import agent

    if task_id == PLANNING:
        _print_planning(_show_planning(_layout(project_dir), plan_id, holder), as_json)
        return 0
    shown = agent.show(_layout(project_dir), task_id, plan_id=plan_id, fork_id=fork_id, holder=holder)
    if as_json:
        echo_json(shown.to_json())
        return 0
    click.echo(f"{_p(shown.ref)} (attempt {shown.attempt}): {shown.state}")
    _print_task(shown)
    result, verdict = shown.extra.get("result"), shown.extra.get("verdict")
    if result:
        click.echo(f"result:         {result['status']}: {_p(result['summary'])}")
    if verdict:
        click.echo(f"verdict:        {'accepted' if verdict['accepted'] else 'rejected'}")
        for reason in verdict["reasons"]:
            click.echo(f"  - {_p(reason)}")
    elif shown.state in ("completed", "failed") and "verdict" in shown.extra:
        click.echo("verdict:        not yet (Conductor verifies completed tasks on its next pass)")
    return 0


@task.command()
@click.argument("task_id", metavar="TASK")
@held_task_options(attempt=True)
def heartbeat(task_id: str, plan_id: str | None, fork_id: str | None, holder: str | None, attempt: int | None,
              project_dir: Path | None, as_json: bool) -> int:
    """Renew your lease of TASK (never past its deadline)."""
    from conductor.handoff import agent

    if task_id == PLANNING:
        _print_planning(_show_planning(_layout(project_dir), plan_id, holder, renew=True), as_json)
        return 0
    renewed = agent.heartbeat(_layout(project_dir), task_id, plan_id=plan_id, fork_id=fork_id, holder=holder,
                              attempt=attempt)
    if as_json:
        echo_json(renewed.to_json())
        return 0
    click.echo(f"renewed {_p(renewed.ref)} (attempt {renewed.attempt}): lease until {renewed.lease_expires_at}, "
               f"deadline {renewed.deadline}")
    return 0


@task.command()
@click.argument("task_id", metavar="TASK")
@click.option("--summary", default="", help="One line: what was done (default: first line of the explanation).")
@click.option("--explanation-file", "explanation_file", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
              default=None, help="Markdown for the reviewer ('-' reads stdin; default: a summary of the changes).")
@click.option("--status", type=click.Choice(["success", "failed"]), default="success", show_default=True,
              help="failed: report that the attempt failed (say why in the explanation); Conductor retries "
                   "the step with that evidence while its attempts last.")
@click.option("--signing-key", "signing_key", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Your own Ed25519 key (PKCS#8 PEM, 0600) to sign the provenance (default: "
                   "$CONDUCTOR_SIGNING_KEY_FILE, else unsigned).")
@click.option("--plan-file", "plan_file", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path), default=None,
              help="TASK planning only: the plan (YAML, or JSON for a .json name; '-' reads YAML from stdin).")
@held_task_options(attempt=True)
def complete(task_id: str, summary: str, explanation_file: Path | None, status: str, signing_key: Path | None,
             plan_file: Path | None, plan_id: str | None, fork_id: str | None, holder: str | None, attempt: int | None,
             project_dir: Path | None, as_json: bool) -> int:
    """Complete TASK with what its workspace holds now; Conductor then verifies it.

    Conductor finds the changed files itself (the workspace against the task's base commit), writes the
    result, the explanation and the provenance, under the fork lock after checking you still hold it.
    """
    from conductor.handoff import agent

    layout = _layout(project_dir)
    if task_id == PLANNING or plan_file is not None:
        return _answer_planning(layout, task_id, plan_file, plan_id, holder, as_json)
    explanation = _read_explanation(explanation_file)
    done = agent.complete(layout, task_id, plan_id=plan_id, fork_id=fork_id, status=status, summary=summary,
                          explanation=explanation, holder=holder, attempt=attempt,
                          signer=_signer(signing_key, layout))
    if as_json:
        echo_json(done.to_json())
        for warning in done.warnings:
            click.echo(f"conductor: warning: {_p(warning)}", err=True)
        return 0
    click.echo(f"{done.task.state} {_p(done.task.ref)} (attempt {done.task.attempt}): {_p(done.summary)}")
    click.echo(f"files changed ({len(done.files_changed)}): " + (", ".join(
        f"{_p(c.path)} ({c.change} +{c.lines_added} -{c.lines_removed})" for c in done.files_changed) or "none"))
    for warning in done.warnings:
        click.echo(f"warning: {_p(warning)}")
    click.echo("provenance: " + (f"signed by key {done.signed_by}" if done.signed_by else
                                 "unsigned (no executor key: --signing-key or CONDUCTOR_SIGNING_KEY_FILE)"))
    if done.status == "completed":
        click.echo(f"next: Conductor verifies it; `conductor task show {_p(done.task.ref)}` shows the verdict")
    return 0


@task.command()
@click.argument("task_id", metavar="TASK")
@click.option("--reason", default="", help="Why you give it back (recorded in the audit log).")
@held_task_options(attempt=True)
def release(task_id: str, reason: str, plan_id: str | None, fork_id: str | None, holder: str | None,
            attempt: int | None, project_dir: Path | None, as_json: bool) -> int:
    """Give TASK back: it is offered again as a new attempt in a fresh workspace (on the last allowed
    attempt, the step fails instead)."""
    from conductor.handoff import agent

    if task_id == PLANNING:
        from conductor.handoff.planning import planning_target, release_planning

        layout, who = _layout(project_dir), _holder(holder)
        target = planning_target(layout, plan_id, who)
        attempt = release_planning(layout, target, holder=who, reason=reason or "released by its holder")
        if as_json:
            echo_json({"kind": "planning", "task_id": PLANNING, "plan_id": target, "attempt": attempt, "state": "pending"})
        else:
            click.echo(f"released the planning task of plan {_p(target)}: attempt {attempt} is pending again")
        return 0
    released = agent.release(_layout(project_dir), task_id, plan_id=plan_id, fork_id=fork_id, reason=reason,
                             holder=holder, attempt=attempt)
    if as_json:
        echo_json(released.to_json())
        return 0
    if released.state == "pending":
        click.echo(f"released {_p(released.ref)}: attempt {released.attempt} is pending in a fresh workspace")
    else:
        click.echo(f"released {_p(released.ref)} on its last allowed attempt ({released.attempt}): the step failed")
    return 0


# --- planning tasks (conductor.handoff.planning) -----------------------------------------------

PLANNING = "planning"
PLANNING_VERDICT_WAIT = 30.0


def _holder(holder: str | None) -> str:
    from conductor.handoff.agent import default_holder

    return holder or default_holder()


def _claim_planning(layout: Any, plan_id: str | None, holder: str | None, wait_seconds: float, *, named: bool) -> Any:
    """Claim a waiting planning task (of ``plan_id``), waiting up to ``wait_seconds`` when ``named``; None if none."""
    import time

    from conductor.errors import NotFound
    from conductor.handoff.planning import claim_planning, configured_lease_seconds, pending_planning

    until = time.monotonic() + (wait_seconds if named else 0.0)
    while True:
        waiting = [p for p, _ in pending_planning(layout) if plan_id in (None, p)]
        if waiting:
            claimed = claim_planning(layout, waiting[0], holder=_holder(holder),
                                     lease_seconds=configured_lease_seconds(layout))
            if claimed is not None:
                return claimed
        elif time.monotonic() >= until:
            if named:
                raise NotFound("nothing to claim: no planning task waits" + (f" for plan {plan_id}" if plan_id else ""))
            return None
        else:
            time.sleep(0.2)


def _show_planning(layout: Any, plan_id: str | None, holder: str | None, *, renew: bool = False) -> dict[str, Any]:
    from conductor.handoff.planning import (
        configured_lease_seconds,
        held_planning,
        planning_target,
        planning_tasks,
        show_planning,
    )

    who = _holder(holder)
    target = planning_target(layout, plan_id, who)
    if renew or any(r["plan_id"] == target and r["holder"] == who for r in planning_tasks(layout)):
        return held_planning(layout, target, holder=who, lease_seconds=configured_lease_seconds(layout)).to_json()
    task, state = show_planning(layout, target)
    return {"kind": PLANNING, "task_id": PLANNING, "plan_id": task.plan_id, "attempt": task.attempt, "state": state,
            "goal": task.goal, "strategies": task.strategies, "instruction": task.instruction,
            "previous_rejections": [r.model_dump(mode="json") for r in task.previous_rejections],
            "facts": task.facts.model_dump(mode="json"), "plan_schema": task.plan_schema, "deadline": task.deadline}


def _print_planning(data: dict[str, Any], as_json: bool) -> None:
    if as_json:
        echo_json(data)
        return
    click.echo(f"planning task of plan {_p(data['plan_id'])} (attempt {data['attempt']})"
               + (f", held by {_p(data['holder'])} until {data['lease_expires_at']}" if data.get("holder") else ""))
    click.echo(f"goal:           {_p(data['goal'])}")
    click.echo(f"strategies:     {data['strategies']} wanted")
    if data.get("task_file"):
        click.echo(f"task file:      {_p(data['task_file'])} (plan_schema, facts: files, languages, checks, policy)")
    for rejection in data.get("previous_rejections", []):
        click.echo(f"attempt {rejection['attempt']} was rejected:")
        for reason in rejection["reasons"]:
            click.echo(f"  - {_p(reason)}")
    click.echo("instruction:")
    from conductor.cli.render import printable

    for line in printable(data["instruction"], multiline=True).splitlines():
        click.echo(f"  {line}")
    click.echo(f"next: write a plan file, then `conductor task complete planning --plan {_p(data['plan_id'])} "
               "--plan-file FILE`")


def _answer_planning(layout: Any, task_id: str, plan_file: Path | None, plan_id: str | None, holder: str | None,
                     as_json: bool) -> int:
    """``complete planning --plan-file F``: answer, wait for the verdict; exit 1 when it is rejected."""
    from conductor.handoff.planning import submit_plan

    if task_id != PLANNING or plan_file is None:
        raise click.UsageError("--plan-file answers the planning task: `conductor task complete planning --plan-file F`")
    if str(plan_file) == "-":
        data, fmt = sys.stdin.buffer.read(), "yaml"
    else:
        try:
            data = plan_file.read_bytes()
        except (FileNotFoundError, IsADirectoryError) as exc:
            from conductor.errors import NotFound

            raise NotFound(f"{plan_file}: no such plan file") from exc
        fmt = "json" if plan_file.suffix.lower() == ".json" else "yaml"
    outcome = submit_plan(layout, plan_id, holder=_holder(holder), answer=data, fmt=fmt,
                          wait_seconds=PLANNING_VERDICT_WAIT)
    if as_json:
        echo_json(outcome)
    else:
        click.echo(f"plan {_p(outcome['plan_id'])}, planning attempt {outcome['attempt']}: {outcome['verdict']}")
        for reason in outcome["reasons"]:
            click.echo(f"  - {_p(reason)}")
        if outcome["verdict"] == "rejected" and outcome["next_attempt"]:
            click.echo(f"next: attempt {outcome['next_attempt']} waits: `conductor task claim planning` shows the reasons; "
                       "fix the plan and answer again")
        elif outcome["verdict"] == "pending":
            click.echo("next: Conductor has not judged it yet: `conductor task show planning` (is `conductor explore` running?)")
    return 1 if outcome["verdict"] == "rejected" else 0


# --- helpers ------------------------------------------------------------------------------------


def _p(value: Any) -> str:
    from conductor.cli.render import printable

    return printable(value)


def _print_task(item: Any) -> None:
    from conductor.cli.render import printable

    rows = [
        ("title", item.title), ("workspace", item.workspace),
        ("allowed files", ", ".join(item.allowed_files) or "(none: change nothing)"),
        ("protected", ", ".join(item.protected_patterns) or "(none)"),
        ("timeout", f"{item.timeout_seconds} s" + (f", deadline {item.deadline}" if item.deadline else "")),
    ]
    if item.lease_expires_at:
        rows.append(("lease until", f"{item.lease_expires_at} (any `conductor task` call on it renews it)"))
    rows.append(("base commit", item.base_commit))
    for label, value in rows:
        click.echo(f"{label + ':':<15} {printable(value)}")
    if item.constraints:
        click.echo("constraints:")
        for constraint in item.constraints:
            click.echo(f"  - {printable(constraint)}")
    if item.checks:
        click.echo("checks (Conductor runs these in the workspace afterwards; run them first):")
        for command in item.checks:
            click.echo(f"  $ {printable(command)}")
    click.echo("instruction:")
    for line in printable(item.instruction, multiline=True).splitlines() or [""]:
        click.echo(f"  {line}")


def _read_explanation(path: Path | None) -> str | None:
    if path is None:
        return None
    if str(path) == "-":
        return sys.stdin.read()
    from conductor.errors import NotFound

    try:
        return path.read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError) as exc:
        raise NotFound(f"{path}: no such explanation file") from exc
    except UnicodeDecodeError as exc:
        raise click.BadParameter(f"{path} is not UTF-8 text", param_hint="--explanation-file") from exc


def _signer(signing_key: Path | None, layout: Any) -> Any:
    """The agent's own key: ``--signing-key``, else ``$CONDUCTOR_SIGNING_KEY_FILE``, else None (unsigned).

    Never the project key, which is trusted only for Conductor's own identities: a provenance it signs for
    an agent would be rejected, so using it is refused here, before anything is written.
    """
    from conductor.errors import KeyFileError
    from conductor.keys import PUBLIC_KEY_FILE, SIGNING_KEY_ENV, key_id, load_public_key, load_signing_key

    named = signing_key or os.environ.get(SIGNING_KEY_ENV) or None
    if not named:
        return None
    signer = load_signing_key(Path(named).expanduser())
    project_pub = layout.keys_dir / PUBLIC_KEY_FILE
    if project_pub.is_file() and key_id(load_public_key(project_pub)) == signer.key_id:
        raise KeyFileError(f"{named}: this is the project's own key, trusted only for Conductor's own identities; "
                           "sign with a key of your own listed in trust.keys (docs/provenance.md), or leave it unsigned")
    return signer
