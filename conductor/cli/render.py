"""Rich rendering of core results for people (the ``--json`` paths never come here)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

STATE_STYLE = {
    "accepted": "green", "completed": "cyan", "in_progress": "yellow", "pending": "blue",
    "failed": "red", "awaiting_approval": "magenta", "not_published": "dim",
}


def console(stderr: bool = False) -> Console:
    return Console(stderr=stderr, highlight=False)


def status_table(status: dict[str, Any]) -> Table:
    """One plan's forks and steps as a table."""
    table = Table(title=f"plan {status['plan_id']} — {status['goal']} [{status['status']}]", title_justify="left")
    table.add_column("fork")
    table.add_column("strategy")
    table.add_column("step")
    table.add_column("state")
    table.add_column("attempt", justify="right")
    table.add_column("confidence")
    for fork in status["forks"]:
        for index, step in enumerate(fork["steps"]):
            style = STATE_STYLE.get(step["state"], "")
            table.add_row(
                f"{fork['fork_id']} ({fork['status']})" if index == 0 else "",
                fork["strategy"] if index == 0 else "",
                f"{step['step_id']} {step['title']}".strip(),
                f"[{style}]{step['state']}[/]" if style else step["state"],
                str(step["attempt"] or ""),
                step["confidence"] or "",
            )
    return table


def ranking_table(ranking: list[dict[str, Any]], winner: str | None) -> Table:
    table = Table(title="forks ranked by evidence", title_justify="left")
    for name, justify in (("rank", "right"), ("fork", "left"), ("strategy", "left"), ("status", "left"),
                          ("steps verified", "right"), ("checks", "left"), ("changed lines", "right"),
                          ("files", "right"), ("tokens", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for rank, row in enumerate(ranking, start=1):
        mark = " ★" if row["fork_id"] == winner else ""
        table.add_row(
            str(rank), f"{row['fork_id']}{mark}", row["strategy"],
            f"[green]{row['status']}[/]" if row["status"] == "succeeded" else f"[red]{row['status']}[/]",
            f"{row['steps_verified']}/{row['steps_total']}",
            "pass" if row["checks_passed"] else "fail", str(row["changed_lines"]), str(row["changed_files"]),
            str(row["tokens"]),
        )
    return table


def summarise_event(event_type: str, data: dict[str, Any]) -> str:
    """One short line about an event for people (``--json`` has everything)."""
    if event_type == "step.verified":
        verdict = "accepted" if data.get("accepted") else "rejected: " + "; ".join(data.get("reasons", []))
        return f"{verdict} ({data.get('diff_lines')} lines: {', '.join(data.get('files', [])) or 'no files'})"
    if event_type == "policy.merged":
        effective = data.get("effective", {})
        return (f"max_diff_lines={effective.get('max_diff_lines')} timeout={effective.get('timeout_seconds')}s "
                f"protected={effective.get('protected_patterns')}")
    if event_type == "confidence.scored":
        return f"{data.get('level')} {data.get('score')} ({'; '.join(data.get('reasons', []))})"
    if event_type == "llm.call":
        return (f"{data.get('purpose')} {data.get('provider')}/{data.get('model')} "
                f"{data.get('input_tokens')}+{data.get('output_tokens')} tokens")
    if event_type == "plan.ranked":
        return " > ".join(f"fork {r['fork_id']} ({r['status']}, {r['changed_lines']} lines)" for r in data.get("ranking", []))
    skip = {"plan_id", "step_id", "checksum", "plan_checksum", "verification", "checks"}
    parts = [f"{k}={v}" for k, v in data.items() if k not in skip and not isinstance(v, (dict, list))]
    parts += [f"{k}={','.join(map(str, v))}" for k, v in data.items() if k not in skip and isinstance(v, list)
              and all(not isinstance(x, (dict, list)) for x in v)]
    return " ".join(parts)


def events_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(show_lines=False)
    for name in ("#", "time", "log", "seq", "type", "step", "details"):
        table.add_column(name, overflow="fold")
    for row in rows:
        details = summarise_event(row["type"], row["data"])
        table.add_row(str(row["index"]), row["ts"][11:23], row["log"], str(row["seq"]), row["type"],
                      row["data"].get("step_id", ""), details[:240])
    return table


def replay_view(report: dict[str, Any]) -> list[Any]:
    """The rebuilt state of a plan: a heading, one table of steps, LLM totals and any disagreement."""
    state = report["state"]
    last = state.get("last")
    where = (f"after #{last['index']} ({last['log']}:{last['seq']} {last['type']}, {last['ts']})" if last
             else "before the first event")
    present = "the present" if report["at_present"] else f"{state['events']} of {report['total_events']} events"
    lines: list[Any] = [f"plan {state['plan_id']} — {state['goal']}: {where}, {present}",
                        f"status {state['status']}" + (f", winner fork {state['winner']}" if state["winner"] else "")
                        + (f", applied fork {state['applied']}" if state["applied"] else "")]
    table = Table(title_justify="left")
    for name in ("fork", "step", "state", "attempt", "confidence", "holder", "commit"):
        table.add_column(name, overflow="fold")
    for fork_id, fork in state["forks"].items():
        for index, (step_id, step) in enumerate(fork["steps"].items()):
            style = STATE_STYLE.get(step["state"], "")
            table.add_row(f"{fork_id} ({fork['status']})" if index == 0 else "", step_id,
                          f"[{style}]{step['state']}[/]" if style else step["state"], str(step["attempt"] or ""),
                          step["confidence"] or "", step["holder"] or "",
                          (step["commit"] or "")[:12])
    lines.append(table)
    llm = state["llm"]
    lines.append(f"LLM calls {llm['calls']} ({llm['cached']} from recordings), tokens "
                 f"{llm['input_tokens']}+{llm['output_tokens']}, cost ${llm['cost_usd']:.4f}")
    if report["at_present"]:
        lines += ([f"[red]log and folders disagree:[/] {p}" for p in report["problems"]]
                  or ["[green]the log agrees with the task folders[/]"])
    return lines
