"""Options and helpers shared by the command modules."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

project_option = click.option(
    "-C", "--project", "project_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Project folder (default: the current folder or the nearest parent with .conductor/).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts instead of tables.")
plan_option = click.option("--plan-id", "plan_id", default=None, help="Plan id (default: the newest plan).")


def start_dir(project_dir: Path | None) -> Path:
    return project_dir if project_dir is not None else Path.cwd()


def open_project(project_dir: Path | None, overrides: dict[str, Any] | None = None):  # type: ignore[no-untyped-def]
    from conductor.runtime import open_project as _open

    return _open(start_dir(project_dir), environ=os.environ, overrides=overrides)


def echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False, default=str))
