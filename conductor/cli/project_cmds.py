"""``init`` and ``approve``."""

from __future__ import annotations

import getpass
from pathlib import Path

import click

from conductor.cli.common import json_option, open_project, plan_option, project_option, echo_json


@click.command()
@click.argument("name", required=False)
@click.option("-C", "--directory", type=click.Path(file_okay=False, path_type=Path), default=Path("."),
              help="Where to create NAME (or the folder to prepare).")
@click.option("--agent", "agents", multiple=True,
              type=click.Choice(["claude-code", "codex", "cursor", "gemini", "aider", "generic"]),  # conductor.agents.AGENTS
              help="Also write this agent's instruction file (CLAUDE.md, AGENTS.md, .cursor/rules/conductor.mdc, "
                   "GEMINI.md, CONVENTIONS.md + .aider.conf.yml); repeatable. See docs/agents.md.")
@json_option
def init(name, directory, agents, as_json) -> int:  # type: ignore[no-untyped-def]
    """Create project NAME (or, without NAME, prepare the current folder) with .conductor/ defaults."""
    from conductor.project import init_project

    project = init_project(directory, name)
    written = _install_agents(project.root, agents)
    if as_json:
        echo_json({"root": str(project.root.resolve()), "created": list(project.created),
                   "agent_files": [{"agent": a, "path": p, "action": act} for a, p, act in written]})
        return 0
    if project.created:
        click.echo(f"initialised {project.root}")
        for path in project.created:
            click.echo(f"  created {path}")
    elif not written:
        click.echo(f"{project.root} is already a Conductor project; nothing changed")
    for agent, path, action in written:
        click.echo(f"{action} {path} (instructions for {agent})")
    return 0


def _install_agents(root: Path, agents: tuple[str, ...]) -> list[tuple[str, str, str]]:
    from conductor.agents import install

    return [(agent, written.path, written.action)
            for agent in dict.fromkeys(agents)  # each once, in the order given
            for written in install(root, agent).files]


@click.command()
@click.argument("step_id")
@click.option("--fork", "fork_id", default=None, help="Only in this fork (default: every fork where it waits).")
@plan_option
@project_option
@json_option
def approve(step_id, fork_id, plan_id, project_dir, as_json) -> int:  # type: ignore[no-untyped-def]
    """Approve STEP_ID, a low-confidence step waiting for review; then run `conductor resume`."""
    from conductor.runtime import approve_step

    project = open_project(project_dir)
    forks = approve_step(project, step_id, plan_id=plan_id, fork_id=fork_id, by=f"user:{getpass.getuser()}")
    if as_json:
        echo_json({"step_id": step_id, "approved_in_forks": forks})
    else:
        click.echo(f"approved {step_id} in fork(s) {', '.join(forks)}; run `conductor resume` to continue")
    return 0


@click.command("gc")
@project_option
@json_option
def gc(project_dir, as_json) -> int:  # type: ignore[no-untyped-def]
    """Remove finished plans' attempt folders and unreachable objects; keep all that records name."""
    from dataclasses import asdict

    from conductor.gc import collect_garbage

    project = open_project(project_dir)
    report = collect_garbage(project.layout)
    if as_json:
        echo_json(asdict(report))
        return 0
    freed = (report.store_bytes_before + report.scratch_bytes_before) - (report.store_bytes_after + report.scratch_bytes_after)
    click.echo(f"removed {report.folders_removed} attempt folder(s) of {len(report.plans_cleaned)} finished plan(s); "
               f"freed {freed / 1e6:.1f} MB; .conductor/git is {report.store_bytes_after / 1e6:.1f} MB")
    return 0
