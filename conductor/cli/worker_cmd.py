"""``worker``: the reference external executor."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import click

from conductor.cli.common import project_option, start_dir


@click.command()
@click.option("--command", "command", required=True, help="Shell command run per task in its workspace.")
@click.option("--plan-id", "plan_id", default=None, help="Only this plan's tasks (default: all plans).")
@click.option("--burst", is_flag=True, help="Exit when no pending task is left instead of waiting for more.")
@click.option("--max-tasks", type=click.IntRange(min=1), default=None, help="Exit after this many tasks.")
@click.option("--lease-seconds", type=click.FloatRange(min=0.1), default=None, help="Lease length (default: config).")
@click.option("--heartbeat-seconds", type=click.FloatRange(min=0.05), default=None, help="Heartbeat (default: config).")
@click.option("--signing-key", "signing_key", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Ed25519 key (PKCS#8 PEM, mode 0600) signing each provenance (default: CONDUCTOR_SIGNING_KEY_FILE, "
                   "else the project key if readable, else unsigned).")
@project_option
def worker(command, plan_id, burst, max_tasks, lease_seconds, heartbeat_seconds, signing_key,  # type: ignore[no-untyped-def]
           project_dir) -> int:
    """Watch the handoff folder, claim tasks and run COMMAND for each.

    The task arrives as JSON on stdin and in CONDUCTOR_* environment variables; the command runs in the
    task's workspace, in its own process group, under the task's timeout. Exit 0 = completed.
    SIGTERM/SIGINT stop the worker after killing the running command's process group (SIGTERM, then
    SIGKILL 2 s later; a second SIGTERM/SIGINT kills it at once); its task goes back to pending.
    """
    from conductor.executors.command import CommandRunner
    from conductor.layout import ProjectLayout
    from conductor.project import load_project
    from conductor.worker import Worker, WorkerSettings

    # Not conductor.runtime.open_project: that module imports the engine, which a worker never runs.
    layout = ProjectLayout.find(start_dir(project_dir))
    project_config, _ = load_project(layout, os.environ)
    config = project_config.executor
    settings = WorkerSettings(
        lease_seconds=lease_seconds or config.lease_seconds,
        heartbeat_seconds=heartbeat_seconds or config.heartbeat_seconds,
        max_attempts=config.max_attempts, poll_seconds=config.poll_seconds, plan_id=plan_id,
    )
    if settings.heartbeat_seconds >= settings.lease_seconds:
        raise click.BadParameter(
            f"heartbeat ({settings.heartbeat_seconds} s) must be shorter than the lease ({settings.lease_seconds} s)",
            param_hint="--heartbeat-seconds/--lease-seconds",
        )
    runner = CommandRunner(command, layout=layout, environ=os.environ, env_names=config.env)
    from conductor.keys import SIGNING_KEY_ENV, load_signing_key

    # A worker signs with a key of its own (trusted in trust.keys), never the project's: the project key is
    # what Conductor itself signs with, and an executor holding it could forge Conductor's attestations.
    own_key = signing_key or os.environ.get(SIGNING_KEY_ENV) or None
    signer = load_signing_key(Path(own_key)) if own_key else None
    work = Worker(layout, runner, settings, ignore=list(project_config.workspace.ignore), signer=signer)

    def on_signal(signum: int, frame: object) -> None:
        if work.stop_requested:  # the second signal: no more grace for the command
            runner.kill_now.set()
        work.request_stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    done = work.run(burst=burst, max_tasks=max_tasks)
    click.echo(f"worker {work.holder}: {done} task(s) run", err=True)
    return 0
