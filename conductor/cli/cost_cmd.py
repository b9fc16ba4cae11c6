"""``conductor cost``: LLM spending by plan, fork, step and model, from ``.conductor/ledger.jsonl``."""

from __future__ import annotations

from typing import Any

import click

from conductor.cli.common import echo_json, json_option, open_project, project_option


@click.command()
@click.option("--plan", "--plan-id", "plan_id", default=None, help="Only this plan (default: every plan).")
@project_option
@json_option
def cost(plan_id, project_dir, as_json) -> int:  # type: ignore[no-untyped-def]
    """Show what LLM calls cost by plan, fork, step and model, what replays saved, and each plan's budget."""
    from conductor.llm.cost import cost_report
    from conductor.runtime import budget_limits, project_ledger

    project = open_project(project_dir)
    if plan_id is not None and plan_id not in project.layout.plan_ids():
        from conductor.errors import NotFound

        raise NotFound(f"no plan {plan_id!r}")
    report = cost_report(project_ledger(project), plan_id)
    known = set(project.layout.plan_ids())
    for plan in report["plans"]:
        if plan["plan_id"] in known:
            plan["budget"] = budget_limits(project, plan["plan_id"]).to_dict()
    if as_json:
        echo_json(report)
        return 0
    _print(report)
    return 0


def _print(report: dict[str, Any]) -> None:
    from rich.table import Table

    from conductor.cli.render import console, safe

    out = console()
    if not report["plans"]:
        out.print("no LLM calls recorded yet")
        return
    for plan in report["plans"]:
        table = Table(title=f"plan {safe(plan['plan_id'] or '(no plan)')}{_budget(plan.get('budget'))}",
                      title_justify="left")
        for column in ("", "calls", "replayed", "input tok", "output tok", "USD", "saved tok", "saved USD"):
            table.add_column(column, justify="left" if not column else "right")
        table.add_row("[bold]plan[/]", *_cells(plan))
        for fork in plan["forks"]:
            table.add_row(f"fork {safe(fork['fork_id'])}", *_cells(fork))
        for step in plan["steps"]:
            table.add_row(f"  fork {safe(step['fork_id'])} {safe(step['step_id'])}", *_cells(step))
        for model in plan["models"]:
            table.add_row(f"model {safe(model['provider'])}/{safe(model['model'])}", *_cells(model))
        out.print(table)
        if plan["held_calls"]:
            out.print(f"[yellow]{plan['held_calls']} call(s) reserved and not settled ({plan['held_tokens']:,} tokens "
                      "at their worst case): in flight, or their process died mid-call; budgets count them[/]")
    total = report["total"]
    out.print(f"all: {total['calls']} call(s), {total['tokens']:,} tokens, {_usd(total['usd'])}; "
              f"{total['cached_calls']} replayed, saving {total['saved_tokens']:,} tokens, {_usd(total['saved_usd'])}")


def _cells(spend: dict[str, Any]) -> list[str]:
    return [str(spend["calls"]), str(spend["cached_calls"]), f"{spend['input_tokens']:,}", f"{spend['output_tokens']:,}",
            _usd(spend["usd"]), f"{spend['saved_tokens']:,}", _usd(spend["saved_usd"])]


def _usd(value: float | None) -> str:
    return "-" if value is None else f"${value:.4f}"


def _budget(budget: dict[str, Any] | None) -> str:
    if not budget:
        return ""
    parts = [f"${budget['plan_usd']:g}" if budget.get("plan_usd") is not None else "",
             f"{budget['plan_tokens']:,} tokens" if budget.get("plan_tokens") is not None else ""]
    shown = " / ".join(p for p in parts if p)
    return f" (budget {shown})" if shown else ""
