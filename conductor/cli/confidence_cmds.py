"""``confidence report``: whether past confidence scores meant what they said."""

from __future__ import annotations

from pathlib import Path

import click

from conductor.cli.common import echo_json, json_option, project_option, start_dir


@click.group()
def confidence() -> None:
    """What the confidence scorer has learned, and how well it predicted (docs/confidence.md)."""


@confidence.command()
@click.option("--bins", default=10, show_default=True, type=click.IntRange(1, 100),
              help="Equal-width score buckets of the reliability table.")
@project_option
@json_option
def report(bins: int, project_dir: Path | None, as_json: bool) -> int:
    """Calibration of past scores against outcomes: a reliability table and the Brier score.

    Every recorded attempt whose step's score is known is one forecast: the table shows, per score
    bucket and per level, how many there were, their mean score and how many were accepted.
    """
    from conductor.confidence import calibration, read_outcomes
    from conductor.layout import ProjectLayout

    layout = ProjectLayout.find(start_dir(project_dir))
    result = calibration(read_outcomes(layout.history_file), bins=bins)
    if as_json:
        echo_json(result)
        return 0
    _print(result)
    return 0


def _figure(value: object) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def _print(result: dict) -> None:  # type: ignore[type-arg]
    from rich.table import Table

    from conductor.cli.render import console

    out = console()
    if not result["forecasts"]:
        out.print(f"no scored outcomes yet ({result['without_prediction']} outcome(s) without a score)")
        return
    for title, rows, first in (("Reliability by score bucket", result["buckets"], None),
                               ("By confidence level", result["levels"], "level")):
        table = Table(title=title)
        if first:
            table.add_column("level")
        for name in ("scores", "count", "mean predicted", "observed rate"):
            table.add_column(name, justify="right")
        for row in rows:
            if not row["count"] and first is None:
                continue
            low, high = row["range"]
            closing = "]" if high == 1.0 else ")"
            cells = [f"[{low:.2f}, {high:.2f}{closing}", str(row["count"]), _figure(row["mean_predicted"]),
                     _figure(row["observed_rate"])]
            table.add_row(*([row[first]] if first else []), *cells)
        out.print(table)
    outcomes = ", ".join(f"{name} {count}" for name, count in result["outcomes"].items())
    out.print(f"forecasts: {result['forecasts']} ({outcomes}; {result['without_prediction']} without a score)")
    out.print(f"base rate: {_figure(result['base_rate'])}")
    out.print(f"Brier score: {_figure(result['brier'])} (reference, always the base rate: "
              f"{_figure(result['reference_brier'])}; skill {_figure(result['skill'])})")
