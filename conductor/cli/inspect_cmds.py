"""``status``, ``events``, ``explain``, ``policy`` and ``handoff-metrics``: read-only views."""

from __future__ import annotations

import json

import click

from conductor.cli.common import echo_json, json_option, open_project, plan_option, project_option


@click.command()
@plan_option
@click.option("--all", "all_plans", is_flag=True, help="Every plan, not only the newest.")
@project_option
@json_option
def status(plan_id, all_plans, project_dir, as_json) -> int:  # type: ignore[no-untyped-def]
    """Show plans, forks and steps by state."""
    from conductor.inspect import plan_status
    from conductor.runtime import resolve_plan_id

    project = open_project(project_dir)
    layout = project.layout
    ids = layout.plan_ids() if all_plans else ([resolve_plan_id(layout, plan_id)] if layout.plan_ids() or plan_id else [])
    statuses = [plan_status(layout, pid) for pid in ids]
    if as_json:
        echo_json(statuses if all_plans else (statuses[0] if statuses else None))
        return 0
    from conductor.cli.render import console, status_table

    out = console()
    if not statuses:
        out.print("no plans yet: run `conductor explore \"<goal>\"`")
    for item in statuses:
        out.print(status_table(item))
    return 0


@click.command()
@plan_option
@click.option("--fork", "fork_id", default=None, help="Only this fork's log.")
@click.option("--step", "step_id", default=None, help="Only events about this step.")
@click.option("--type", "types", multiple=True, help="Event type or prefix (repeatable), e.g. task or llm.call.")
@project_option
@json_option
def events(plan_id, fork_id, step_id, types, project_dir, as_json) -> int:  # type: ignore[no-untyped-def]
    """List a plan's audit events, oldest first."""
    from conductor.inspect import list_events
    from conductor.runtime import resolve_plan_id

    project = open_project(project_dir)
    rows = list_events(project.layout, resolve_plan_id(project.layout, plan_id), fork_id=fork_id,
                       step_id=step_id, types=tuple(types))
    if as_json:
        echo_json(rows)
        return 0
    from conductor.cli.render import console, events_table, is_pipe

    console().print(events_table(rows, limit=None if is_pipe() else 240))
    return 0


@click.command()
@click.argument("step_id")
@plan_option
@click.option("--fork", "fork_id", default=None, help="Only this fork.")
@project_option
@json_option
def explain(step_id, plan_id, fork_id, project_dir, as_json) -> int:  # type: ignore[no-untyped-def]
    """Tell the story of STEP_ID: task, policy, confidence, claims, result, verdict, explanation."""
    from conductor.inspect import explain_step
    from conductor.runtime import resolve_plan_id

    from conductor.keys import TrustStore

    project = open_project(project_dir)
    trust = TrustStore.for_project(project.layout.keys_dir, project.config.trust, project.layout.conductor_dir)
    stories = explain_step(project.layout, resolve_plan_id(project.layout, plan_id), step_id, fork_id, trust=trust)
    if as_json:
        echo_json(stories)
        return 0
    for story in stories:
        _print_story(story)
    return 0


def _print_attempts(out, attempts) -> None:  # type: ignore[no-untyped-def]
    """Attempt by attempt: what it tried (files, summary) and why it was rejected. Printed only when the
    step was retried (a single attempt is the result and verdict below)."""
    from conductor.cli.render import safe

    if len(attempts) < 2:
        return
    for attempt in attempts:
        current = "" if attempt.get("archived") else " (current)"
        out.print(f"[bold]attempt {safe(attempt.get('attempt'))}{current}[/]: {safe(attempt.get('outcome'))}"
                  + (f" by {safe(attempt['executor'])}" if attempt.get("executor") else ""))
        if attempt.get("summary"):
            out.print(f"  tried: {safe(attempt['summary'], multiline=True)}")
        out.print(f"  files: {safe(', '.join(attempt.get('files') or []) or '(none)')}")
        for reason in attempt.get("reasons") or []:
            out.print(f"  why: {safe(reason, multiline=True)}")
        if attempt.get("forbidden"):
            out.print(f"  forbidden: {safe(', '.join(attempt['forbidden']))}")
        if attempt.get("failed_command"):
            tail = (attempt.get("output_tail") or "").rstrip().splitlines()[-5:]
            out.print(f"  failing check: {safe(attempt['failed_command'])}")
            for line in tail:
                out.print(f"    | {safe(line)}")


def _print_story(story) -> None:  # type: ignore[no-untyped-def]
    from rich.markdown import Markdown

    from conductor.cli.render import console, printable, safe, summarise_event

    out = console()
    step = story["step"]
    out.rule(f"fork {safe(story['fork_id'])} ({safe(story['strategy'])}) — {safe(step['step_id'])} "
             f"{safe(step['title'])} \\[{safe(story['state'])}]")
    out.print(f"[bold]instruction[/]: {safe(step['instruction'], multiline=True)}")
    out.print(f"[bold]allowed files[/]: {safe(', '.join(step['allowed_files']) or '(none)')}")
    if story["task"]:
        task = story["task"]
        # Judge the content, not the checksum field: a tampered file keeps the published value there.
        content = story.get("task_content_checksum")
        same = "matches" if content is not None and content == story["published_checksum"] else "DIFFERS FROM"
        claimed = "" if content == task.get("checksum") else f", though its checksum field says {safe(task.get('checksum'))}"
        out.print(f"[bold]task[/]: attempt {safe(task.get('attempt'))}, content checksum {safe(content)} "
                  f"({same} the published {safe(story['published_checksum'])}{claimed})")
    if story["policy"]:
        policy = story["policy"]
        out.print(f"[bold]policy[/] {safe(policy.get('digest'))}:")
        for key, source in sorted(policy.get("sources", {}).items()):
            value = json.dumps(_lookup(policy.get("effective", {}), key))
            out.print(f"  {safe(key)} = {safe(value)}  [dim]from {safe(source)}[/]")
    if story["confidence"]:
        confidence = story["confidence"]
        out.print(f"[bold]confidence[/]: {safe(confidence.get('level'))} {safe(confidence.get('score'))} — "
                  f"{safe('; '.join(confidence.get('reasons', [])))}")
    for claim in story["claims"]:
        who = claim.get("holder") or claim.get("reason") or claim.get("checksum", "")
        out.print(f"  {safe(claim['ts'][11:23])}  [cyan]{safe(claim['type'])}[/] attempt {safe(claim.get('attempt'))} "
                  f"{safe(who)}")
    if story["lease"]:
        lease = story["lease"]
        out.print(f"[bold]lease[/]: {safe(lease.get('holder'))} (pid {safe(lease.get('pid'))} on "
                  f"{safe(lease.get('host'))}), token {safe(lease.get('fencing_token'))}, "
                  f"expires {safe(lease.get('expires_at'))}")
    for event in story["events"]:
        if event["type"] in ("task.claimed", "task.lease_expired", "task.abandoned", "task.published",
                             "policy.merged", "confidence.scored"):
            continue
        # A readable summary, whole: never a JSON text cut mid-object (`explain --json` has every value).
        out.print(f"  {safe(event['ts'][11:23])}  [cyan]{safe(event['type'])}[/]  "
                  f"{safe(summarise_event(event['type'], event['data']))}")
    _print_attempts(out, story.get("attempts", []))
    if story.get("rejection"):
        rejection = story["rejection"]
        out.print(f"[bold]task file rejected[/] by {safe(rejection.get('by'))} ({safe(rejection.get('kind'))}), "
                  f"never executed: {safe(rejection.get('message'), multiline=True)}")
    if story["result"]:
        result = story["result"]
        out.print(f"[bold]result[/]: {safe(result.get('status'))} by {safe(result.get('executor', {}).get('id'))}: "
                  f"{safe(result.get('summary'), multiline=True)}")
    if story["verdict"]:
        verdict = story["verdict"]
        verdict_text = "accepted" if verdict.get("accepted") else "rejected: " + "; ".join(verdict.get("reasons", []))
        out.print(f"[bold]verdict[/]: {safe(verdict_text)} ({safe(verdict.get('diff_lines'))} changed lines)")
    if story["verdict"]:
        for check in story["verdict"].get("checks", []):
            mark = "[green]✓[/]" if check.get("passed") else "[red]✗[/]"
            out.print(f"  {mark} {safe(check.get('name'))} {safe(check.get('detail') or '')}")
        for evidence in story["verdict"].get("verification", []):
            out.print(f"  $ {safe(evidence.get('command'))} → exit {safe(evidence.get('exit_code'))} "
                      f"(output sha256 {safe(str(evidence.get('output_sha256'))[:12])}…)")
    for name, checked in (story["signatures"] or {}).items():
        if not checked.get("present"):
            out.print(f"[bold]{safe(name)}[/]: none")
        elif checked.get("error"):
            out.print(f"[bold]{safe(name)}[/]: [red]{safe(checked['error'])}[/]")
        else:
            signers = ", ".join(checked["signed_by"]) or "unsigned"
            out.print(f"[bold]{safe(name)}[/]: signed by {safe(signers)}; {len(checked['subjects'])} subjects")
    lessons = story.get("lessons") or {}
    for line in lessons.get("received", []):
        out.print(f"[bold]lesson received[/]: {safe(line, multiline=True)}")
    for lesson in lessons.get("taught", []):
        out.print(f"[bold]lesson taught[/] (attempt {safe(lesson.get('attempt'))}, {safe(lesson.get('kind'))}): "
                  f"{safe(lesson.get('detail'), multiline=True)} [dim]files {safe(', '.join(lesson.get('files', [])))}[/]")
    if story["explanation"]:
        # Markdown parses no rich markup, but passes escape sequences through; links are shown, not hidden.
        out.print(Markdown(printable(story["explanation"], multiline=True), hyperlinks=False))


def _lookup(document: dict, dotted: str) -> object:
    """The value at a policy source key such as ``max_diff_lines`` or ``protected_patterns[0]``."""
    dotted = {"sandbox.mode": "sandbox_mode", "sandbox.network": "network"}.get(dotted, dotted)
    value: object = document
    for part in dotted.split("."):
        name, _, index = part.partition("[")
        value = value.get(name) if isinstance(value, dict) else None
        if index and isinstance(value, list):
            position = int(index.rstrip("]"))
            value = value[position] if position < len(value) else None
    return value


@click.command()
@click.option("--step", "step_id", default=None, help="Merge this step's policy too (needs a plan).")
@click.option("--fork", "fork_id", default=None, help="The fork of --step (default: the first that has it).")
@plan_option
@project_option
@json_option
def policy(step_id, fork_id, plan_id, project_dir, as_json) -> int:  # type: ignore[no-untyped-def]
    """Show the effective policy and where each value came from (project → plan → step)."""
    from conductor.policy import merge_policies

    project = open_project(project_dir)
    layers = [("project", project.policy)]
    if step_id is not None or plan_id is not None:
        from conductor.plan_store import load_plan
        from conductor.runtime import resolve_plan_id

        plan = load_plan(project.layout, resolve_plan_id(project.layout, plan_id))
        layers.append(("plan", plan.policy))
        if step_id is not None:
            steps = [s for f in plan.forks if fork_id in (None, f.fork_id) for s in f.steps if s.step_id == step_id]
            if not steps:
                from conductor.errors import NotFound

                raise NotFound(f"no step {step_id!r} in plan {plan.plan_id}")
            layers.append(("step", steps[0].policy))
    merged = merge_policies(layers, defaults={"max_attempts": project.config.executor.max_attempts})
    effective = merged.effective.model_dump(mode="json")
    if as_json:
        echo_json({"effective": effective, "sources": merged.sources, "notes": merged.notes, "digest": merged.digest})
        return 0
    from rich.table import Table

    from conductor.cli.render import console, safe

    table = Table(title=f"effective policy ({merged.digest[:19]}…)", title_justify="left")
    table.add_column("key")
    table.add_column("value")
    table.add_column("from")
    for key in ("max_diff_lines", "max_diff_bytes", "timeout_seconds"):
        table.add_row(key, safe(effective[key]), safe(merged.sources.get(key, "")))
    for key, field in (("sandbox.mode", "sandbox_mode"), ("sandbox.network", "network")):
        table.add_row(key, safe(effective[field]), safe(merged.sources.get(key, "")))
    for key in ("global_constraints", "protected_patterns"):
        for index, item in enumerate(effective[key]):
            table.add_row(key if index == 0 else "", safe(item), safe(merged.sources.get(f"{key}[{index}]", "")))
    out = console()
    out.print(table)
    for note in merged.notes:
        out.print(f"note: {safe(note)}")
    return 0


@click.command("handoff-metrics")
@project_option
@json_option
def handoff_metrics(project_dir, as_json) -> int:  # type: ignore[no-untyped-def]
    """Compute execution statistics, write .conductor/handoff/metrics.json and show them."""
    from conductor.metrics import write_metrics

    project = open_project(project_dir)
    metrics = write_metrics(project.layout)
    if as_json:
        echo_json(metrics)
        return 0
    from rich.table import Table

    from conductor.cli.render import console, safe

    totals = metrics["totals"]
    table = Table(title=f"handoff metrics (written to {safe(project.layout.relative(project.layout.metrics_file))})",
                  title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in _flatten(totals):
        table.add_row(safe(key), safe(value))
    console().print(table)
    for error in metrics.get("errors", []):
        console(stderr=True).print(f"[red]unreadable[/] {safe(error)}")
    return 0


def _flatten(value, prefix=""):  # type: ignore[no-untyped-def]
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _flatten(inner, f"{prefix}{key}." if not isinstance(inner, dict) else f"{prefix}{key}.")
    else:
        yield prefix.rstrip("."), value
