"""Rich rendering of core results for people (the ``--json`` paths never come here).

Everything shown here that did not come from Conductor's own code — goals, strategy names, step titles
and instructions, file names, executors' summaries, reasons, holders, explanations — passes through
:func:`safe` (or :func:`printable` where rich markup is not parsed): a plan, an LLM answer or an executor
must not be able to send escape sequences to the terminal or style its text as Conductor's own.
"""

from __future__ import annotations

import re
import sys
import unicodedata
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

# Control (Cc), format (Cf: bidi overrides, zero-width and tag characters), surrogate, private-use and
# line/paragraph separator characters: none prints as itself, several steer the terminal.
_INVISIBLE = frozenset({"Cc", "Cf", "Cs", "Co", "Zl", "Zp"})

STATE_STYLE = {
    "accepted": "green", "completed": "cyan", "in_progress": "yellow", "pending": "blue",
    "failed": "red", "awaiting_approval": "magenta", "not_published": "dim",
}


PIPE_WIDTH = 1_000_000
"""Columns a console writing to a pipe or file lays out for: in effect, lines never wrap."""

_TRAILING_SPACES = re.compile(r"[ ]+$", re.M)


def is_pipe(stderr: bool = False) -> bool:
    """Whether stdout (or stderr) goes somewhere other than a terminal: a pipe, a file, a test's capture."""
    stream = sys.stderr if stderr else sys.stdout
    try:
        return not stream.isatty()
    except (AttributeError, ValueError):  # closed or replaced by an object without isatty
        return True


class PipeConsole(Console):
    """A console for agents and scripts that read plain stdout (issue 10, part 6).

    Nothing wraps at 80 columns or is cut with an ellipsis: the layout width is :data:`PIPE_WIDTH`, so a
    table row is one line however long its cells. Tables lose their box drawing (columns are separated by
    spaces, the header stays), rules become ``== title ==`` lines, Markdown is printed as its source text,
    and trailing spaces are dropped.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(width=PIPE_WIDTH, soft_wrap=True, **kwargs)

    def print(self, *objects: Any, **kwargs: Any) -> None:  # type: ignore[override]
        with self.capture() as captured:
            super().print(*(_unboxed(o) for o in objects), **kwargs)
        self.file.write(_TRAILING_SPACES.sub("", captured.get()))
        self.file.flush()

    def rule(self, title: Any = "", **kwargs: Any) -> None:  # type: ignore[override]
        self.print(f"== {title} ==" if title else "==")


def _unboxed(renderable: Any) -> Any:
    if type(renderable).__name__ == "Markdown" and isinstance(getattr(renderable, "markup", None), str):
        # Markdown is already plain text: laid out 10^6 columns wide, headings would be centred in it.
        return Text(printable(renderable.markup, multiline=True))
    if isinstance(renderable, Table):
        renderable.box, renderable.show_edge, renderable.pad_edge = None, False, False
        renderable.padding = (0, 1)
        for column in renderable.columns:
            column.no_wrap, column.overflow = True, "ignore"
    return renderable


def console(stderr: bool = False) -> Console:
    """The console commands print to: a :class:`PipeConsole` when the stream is not a terminal."""
    # emoji=False: ':warning:' in a goal or title must not turn into a picture either.
    if is_pipe(stderr):
        return PipeConsole(stderr=stderr, highlight=False, emoji=False)
    return Console(stderr=stderr, highlight=False, emoji=False)


def printable(value: object, *, multiline: bool = False) -> str:
    """``value`` as text that cannot steer a terminal: invisible and control characters shown as escapes.

    ESC (so every ANSI/OSC sequence), C1 controls such as U+009B, bidi overrides, zero-width and other
    format characters, and line separators become ``\\x1b``, ``\\x9b``, ``\\u202e``… Use it for text
    printed without rich markup (``click.echo``).

    Args:
        value: anything; ``str(value)`` is shown.
        multiline: keep ``\\n`` and ``\\t`` as they are (for instructions and explanations).
    """
    text = str(value)
    if text.isprintable():
        return text
    kept = "\n\t" if multiline else ""
    return "".join(
        char if char in kept or unicodedata.category(char) not in _INVISIBLE
        else char.encode("unicode_escape").decode("ascii")
        for char in text
    )


def safe(value: object, *, multiline: bool = False) -> str:
    """``value`` ready to be put into rich markup: :func:`printable`, with markup such as ``[red]`` escaped."""
    return escape(printable(value, multiline=multiline))


def status_table(status: dict[str, Any]) -> Table:
    """One plan's forks and steps as a table."""
    table = Table(title=f"plan {safe(status['plan_id'])} — {safe(status['goal'])} \\[{safe(status['status'])}]",
                  title_justify="left")
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
                safe(f"{fork['fork_id']} ({fork['status']})") if index == 0 else "",
                safe(fork["strategy"]) if index == 0 else "",
                safe(f"{step['step_id']} {step['title']}".strip()),
                _styled(step["state"], style),
                safe(step["attempt"] or ""),
                safe(step["confidence"] or ""),
            )
    return table


def _styled(text: object, style: str) -> str:
    return f"[{style}]{safe(text)}[/]" if style else safe(text)


def ranking_table(ranking: list[dict[str, Any]], winner: str | None) -> Table:
    table = Table(title="forks ranked by evidence", title_justify="left")
    for name, justify in (("rank", "right"), ("fork", "left"), ("strategy", "left"), ("status", "left"),
                          ("steps verified", "right"), ("checks", "left"), ("changed lines", "right"),
                          ("files", "right"), ("tokens", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for rank, row in enumerate(ranking, start=1):
        mark = " ★" if row["fork_id"] == winner else ""
        table.add_row(
            str(rank), f"{safe(row['fork_id'])}{mark}", safe(row["strategy"]),
            _styled(row["status"], "green" if row["status"] == "succeeded" else "red"),
            safe(f"{row['steps_verified']}/{row['steps_total']}"),
            "pass" if row["checks_passed"] else "fail", safe(row["changed_lines"]), safe(row["changed_files"]),
            safe(row["tokens"]),
        )
    return table


def summarise_event(event_type: str, data: dict[str, Any]) -> str:
    """One short line about an event for people (``--json`` has everything); plain text, not yet :func:`safe`."""
    if event_type == "step.verified":
        verdict = "accepted" if data.get("accepted") else "rejected: " + "; ".join(data.get("reasons", []))
        return f"{verdict} ({data.get('diff_lines')} lines: {', '.join(data.get('files', [])) or 'no files'})"
    if event_type == "policy.merged":
        effective = data.get("effective", {})
        return (f"max_diff_lines={effective.get('max_diff_lines')} timeout={effective.get('timeout_seconds')}s "
                f"protected={effective.get('protected_patterns')}")
    if event_type == "task.rejected":
        return f"task file rejected unexecuted by {data.get('by')} ({data.get('kind')}): {data.get('message')}"
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


def events_table(rows: list[dict[str, Any]], limit: int | None = 240) -> Table:
    """The events as a table; ``details`` longer than ``limit`` characters are cut with ``…`` (None: whole)."""
    table = Table(show_lines=False)
    for name in ("#", "time", "log", "seq", "type", "step", "details"):
        table.add_column(name, overflow="fold")
    for row in rows:
        details = summarise_event(row["type"], row["data"])
        if limit is not None and len(details) > limit:
            details = details[: limit - 1] + "…"
        table.add_row(safe(row["index"]), safe(row["ts"][11:23]), safe(row["log"]), safe(row["seq"]),
                      safe(row["type"]), safe(row["data"].get("step_id", "")), safe(details))
    return table


def replay_view(report: dict[str, Any]) -> list[Any]:
    """The rebuilt state of a plan: a heading, one table of steps, LLM totals and any disagreement."""
    state = report["state"]
    last = state.get("last")
    where = (f"after #{last['index']} ({last['log']}:{last['seq']} {last['type']}, {last['ts']})" if last
             else "before the first event")
    present = "the present" if report["at_present"] else f"{state['events']} of {report['total_events']} events"
    lines: list[Any] = [f"plan {safe(state['plan_id'])} — {safe(state['goal'])}: {safe(where)}, {present}",
                        f"status {safe(state['status'])}"
                        + (f", winner fork {safe(state['winner'])}" if state["winner"] else "")
                        + (f", applied fork {safe(state['applied'])}" if state["applied"] else "")]
    table = Table(title_justify="left")
    for name in ("fork", "step", "state", "attempt", "confidence", "holder", "commit"):
        table.add_column(name, overflow="fold")
    for fork_id, fork in state["forks"].items():
        for index, (step_id, step) in enumerate(fork["steps"].items()):
            style = STATE_STYLE.get(step["state"], "")
            table.add_row(safe(f"{fork_id} ({fork['status']})") if index == 0 else "", safe(step_id),
                          _styled(step["state"], style), safe(step["attempt"] or ""),
                          safe(step["confidence"] or ""), safe(step["holder"] or ""),
                          safe((step["commit"] or "")[:12]))
    lines.append(table)
    llm = state["llm"]
    lines.append(safe(f"LLM calls {llm['calls']} ({llm['cached']} from recordings), tokens "
                      f"{llm['input_tokens']}+{llm['output_tokens']}, cost ${llm['cost_usd']:.4f}"))
    if report["at_present"]:
        behind = [f"[yellow]the log lags the folders:[/] {safe(b)}" for b in report.get("behind", [])]
        lines += ([f"[red]log and folders disagree:[/] {safe(p)}" for p in report["problems"]]
                  or behind or ["[green]the log agrees with the task folders[/]"])
    return lines
