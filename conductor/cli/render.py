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


def events_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(show_lines=False)
    for name in ("time", "log", "seq", "type", "details"):
        table.add_column(name, overflow="fold")
    for row in rows:
        details = ", ".join(f"{k}={v}" for k, v in row["data"].items() if k not in ("plan_id",))
        table.add_row(row["ts"][11:23], row["log"], str(row["seq"]), row["type"], details[:300])
    return table
