"""``replay``, ``checkout``, ``verify`` and ``keys``: the plan's past, and whether its records hold."""

from __future__ import annotations

from pathlib import Path

import click

from conductor.cli.common import (
    echo_json,
    json_option,
    open_project,
    plan_option,
    project_option,
)


@click.command()
@plan_option
@click.option("--to", "to", default=None, metavar="INDEX|LOG:SEQ",
              help="Stop after this event: its timeline index (see `conductor events`) or <log>:<seq> "
                   "with log 'plan' or a fork id.")
@click.option("--to-step", "to_step", default=None, help="Stop where this step was merged (or failed).")
@click.option("--fork", "fork_id", default=None, help="With --to-step: the fork to look in.")
@project_option
@json_option
def replay(plan_id, to, to_step, fork_id, project_dir, as_json) -> int:  # type: ignore[no-untyped-def]
    """Rebuild and show the plan's state at a point from its audit logs alone.

    At the present (no --to/--to-step) the rebuilt state is also checked against the task folders;
    a disagreement exits 10.
    """
    from conductor.errors import StateConflict
    from conductor.replay import replay as run_replay
    from conductor.runtime import resolve_plan_id

    if to is not None and to_step is not None:
        raise click.UsageError("use --to or --to-step, not both")
    project = open_project(project_dir)
    report = run_replay(project.layout, resolve_plan_id(project.layout, plan_id), to=to, to_step=to_step,
                        fork_id=fork_id)
    if as_json:
        echo_json(report)
    else:
        from conductor.cli.render import console, replay_view

        for renderable in replay_view(report):
            console().print(renderable)
    return StateConflict.exit_code if report["problems"] else 0


@click.command()
@click.argument("step_id")
@plan_option
@click.option("--fork", "fork_id", default=None, help="The fork (default: the winner, or the only fork that "
              "merged the step).")
@click.option("--into", "into", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="An absent or empty folder (default: .conductor/checkouts/plan_<id>/fork_<id>/<step>).")
@project_option
@json_option
def checkout(step_id, plan_id, fork_id, into, project_dir, as_json) -> int:  # type: ignore[no-untyped-def]
    """Write the workspace as it was after STEP_ID into a folder."""
    from conductor.runtime import resolve_plan_id
    from conductor.timetravel import checkout as run_checkout

    project = open_project(project_dir)
    plan_id = resolve_plan_id(project.layout, plan_id)
    try:
        point, target = run_checkout(project.layout, plan_id, step_id, fork_id=fork_id, into=into)
    except FileExistsError as exc:
        raise click.UsageError(str(exc)) from None
    data = {"plan_id": plan_id, "fork_id": point.fork_id, "step_id": step_id, "commit": point.commit,
            "event": {"seq": point.event.seq, "hash": point.event.hash}, "path": str(target)}
    if as_json:
        echo_json(data)
    else:
        click.echo(f"{step_id} of fork {point.fork_id} (commit {point.commit[:12]}) → {target}")
    return 0


@click.command()
@click.option("--plan-id", "plan_id", default=None, help="Only this plan (default: every plan).")
@click.option("--witness", "witness", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to remember the newest checkpoint of each log (default: "
                   "$XDG_STATE_HOME/conductor/witness.json).")
@click.option("--no-witness", is_flag=True, help="Do not read or update a witness file.")
@project_option
@json_option
def verify(plan_id, witness, no_witness, project_dir, as_json) -> int:  # type: ignore[no-untyped-def]
    """Check every checksum, result, provenance signature and audit log; name what is wrong.

    Exits 0 when everything holds, 5 when anything does not. A tampered task file that a claimer
    rejected unexecuted, as its task.rejected event records, is shown as a NOTE and does not fail.
    """
    from conductor.cli.render import printable
    from conductor.errors import IntegrityError
    from conductor.runtime import resolve_plan_id
    from conductor.verify import default_witness, verify_project

    project = open_project(project_dir)
    plan_ids = [resolve_plan_id(project.layout, plan_id)] if plan_id else None
    witness_path = None if no_witness else (witness or default_witness(project.environ))
    report = verify_project(project.layout, project.config, plan_ids=plan_ids, witness=witness_path,
                            environ=project.environ)
    if as_json:
        echo_json({"ok": report.ok, "checked": report.checked, "uncovered_entries": report.uncovered,
                   "findings": [{"where": f.where, "problem": f.problem} for f in report.findings],
                   "notices": [{"where": f.where, "notice": f.problem} for f in report.notices]})
    else:
        checked = ", ".join(f"{n} {kind.replace('_', ' ')}" for kind, n in report.checked.items()) or "nothing"
        for finding in report.findings:
            click.echo(f"FAIL {printable(finding)}")
        for notice in report.notices:
            click.echo(f"NOTE {printable(notice)}")
        click.echo(("ok" if report.ok else f"{len(report.findings)} problem(s)") + f" — checked {checked}"
                   + (f"; {report.uncovered} audit entries are newer than their log's last checkpoint"
                      if report.uncovered else ""))
    return 0 if report.ok else IntegrityError.exit_code


@click.command()
@project_option
@json_option
def keys(project_dir, as_json) -> int:  # type: ignore[no-untyped-def]
    """Show the signing key's id and every trusted public key."""
    from conductor.keys import SIGNING_KEY_ENV, SIGNING_KEY_FILE, TrustStore, private_keys_dir, project_key

    project = open_project(project_dir)
    layout = project.layout
    signer = project_key(layout.keys_dir, layout.conductor_dir, project.environ, create=False)
    source = project.environ.get(SIGNING_KEY_ENV) or str(private_keys_dir(layout.conductor_dir, project.environ)
                                                         / SIGNING_KEY_FILE)
    trust = TrustStore.for_project(layout.keys_dir, project.config.trust, layout.conductor_dir,
                                   own_key=signer.public_key if signer else None)
    data = {
        "signing_key": {"key_id": signer.key_id, "file": source} if signer else None,
        "trusted": [{"key_id": e.key_id, "executors": list(e.executors), "file": e.source} for e in trust.entries()],
        "require_signatures": project.config.trust.require_signatures,
    }
    if as_json:
        echo_json(data)
        return 0
    click.echo(f"signing key: {signer.key_id} ({source})" if signer else
               "signing key: none (run `conductor init` to create one)")
    for entry in data["trusted"]:
        click.echo(f"trusted: {entry['key_id']} for {', '.join(entry['executors'])} ({entry['file']})")
    return 0
