"""The ``command`` executor: run any command per task (a script, a linter, ``claude -p``, ``aider``).

The command runs in the attempt's workspace, in its own process group, under the task's timeout. It
gets the task as JSON on stdin and in environment variables (see docs/protocol.md, "Command executor").
Exit status 0 means completed; anything else, or a timeout, means failed. If the command writes the file
named by ``CONDUCTOR_EXPLANATION_FILE``, that text becomes the step's explanation.

The command's process group goes into the lease as soon as it started, so a reaper can kill it if this
executor dies. When the command ends, is stopped or times out, whatever it left running is killed: its
group and every process still carrying its ``CONDUCTOR_WORKSPACE`` (a child that left the group).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from conductor.canonical import pretty_bytes
from conductor.executors.base import Outcome, executor_info
from conductor.fsutil import private_temp_dir
from conductor.handoff.lease import holder_name
from conductor.layout import ProjectLayout
from conductor.models import ErrorInfo, Task
from conductor.proc import run_command
from conductor.redact import launch_environment, redact
from conductor.sandbox import for_step

OUTPUT_TAIL_CHARS = 4000


def task_environment(task: Task, *, layout: ProjectLayout, workspace: Path, explanation_file: Path) -> dict[str, str]:
    """The ``CONDUCTOR_*`` variables a command sees (documented in docs/protocol.md)."""
    return {
        "CONDUCTOR_TASK_ID": task.task_id,
        "CONDUCTOR_PLAN_ID": task.plan_id,
        "CONDUCTOR_FORK_ID": task.fork_id,
        "CONDUCTOR_ATTEMPT": str(task.attempt),
        "CONDUCTOR_INSTRUCTION": task.instruction,
        "CONDUCTOR_ALLOWED_FILES": "\n".join(task.allowed_files),
        "CONDUCTOR_TIMEOUT_SECONDS": str(task.timeout_seconds),
        "CONDUCTOR_WORKSPACE": str(workspace),
        "CONDUCTOR_PROJECT_ROOT": str(layout.root),
        "CONDUCTOR_TASK_FILE": str(layout.root / ".conductor" / "handoff" / f"plan_{task.plan_id}"
                                   / f"fork_{task.fork_id}" / "in_progress" / f"{task.task_id}.task.json"),
        "CONDUCTOR_EXPLANATION_FILE": str(explanation_file),
    }


class CommandRunner:
    """Runs a shell command for each task.

    Attributes:
        kill_grace_seconds: when a command is stopped or times out: SIGTERM to its group, SIGKILL this
            many seconds later.
        kill_now: set it (e.g. on a second Ctrl-C) to SIGKILL the running commands' groups at once,
            without waiting out the grace period.
    """

    def __init__(
        self, command: str, *, layout: ProjectLayout, environ: Mapping[str, str] | None = None,
        identity: str | None = None, kill_grace_seconds: float = 2.0, env_names: Sequence[str] = (),
    ) -> None:
        self.command = command
        self.layout = layout
        self.environ = dict(os.environ if environ is None else environ)
        self.env_names = tuple(env_names)
        self.info = executor_info("command", identity or holder_name("conductor-worker"))
        self.kill_grace_seconds = kill_grace_seconds
        self.kill_now = threading.Event()

    def run(self, task: Task, workspace: Path, should_stop: Callable[[], bool]) -> Outcome:
        # Beside the attempt folders, named for this process: recovery's sweep takes it after a kill -9.
        with private_temp_dir(self.layout.fork_scratch_dir(task.plan_id, task.fork_id)) as scratch:
            explanation_file = scratch / "explanation.md"
            env = {**launch_environment(self.environ, self.env_names),
                   **task_environment(task, layout=self.layout, workspace=workspace, explanation_file=explanation_file),
                   "TMPDIR": str(scratch)}
            outcome = run_command(
                self.command, cwd=workspace, env=env, stdin=pretty_bytes(task.to_document()),
                timeout_seconds=task.timeout_seconds, shell=True, kill_grace_seconds=self.kill_grace_seconds,
                # execute_claim's StopCheck records the group in the lease; a plain callable has nowhere to.
                on_start=getattr(should_stop, "process_started", None),
                should_stop=should_stop, kill_now=self.kill_now.is_set,
                sweep_environ=f"CONDUCTOR_WORKSPACE={env['CONDUCTOR_WORKSPACE']}",  # lease.workspace_marker
                sandbox=for_step(writable=(workspace, scratch), keys_dir=self.layout.keys_dir,
                                 environ=self.environ, mode=task.sandbox_mode, network=task.network),
            )
            written = explanation_file.read_text("utf-8", errors="replace") if explanation_file.exists() else ""
        output = outcome.output.decode("utf-8", errors="replace")[-OUTPUT_TAIL_CHARS:]
        # What the command printed or wrote is stored and shown: no secret of ours may be in it.
        written = redact(written, self.environ) if written else written  # most commands write no explanation
        output = redact(output, self.environ) if output else output
        explanation = _explanation(self.command, outcome, written, output)
        contained = outcome.contained  # its pid namespace is empty: nothing it started can write any more
        if outcome.timed_out:
            message = f"command timed out after {task.timeout_seconds} s: {self.command}"
            return Outcome("failed", message, explanation, ErrorInfo(kind="timeout", message=message), contained=contained)
        if outcome.exit_code != 0:
            message = f"command exited with {outcome.exit_code}: {self.command}"
            if outcome.sandboxed:
                message += f" ({outcome.sandbox}: a write elsewhere, a read of a secret or a connection fails)"
            return Outcome("failed", message, explanation, ErrorInfo(kind="command_failed", message=message),
                           contained=contained)
        summary = (written.strip().splitlines() or [f"ran {self.command}"])[0][:200]
        return Outcome("completed", summary, explanation, contained=contained)


def _explanation(command: str, outcome, written: str, output: str) -> str:  # type: ignore[no-untyped-def]
    status = "timed out" if outcome.timed_out else f"exited with {outcome.exit_code}"
    parts = [written.strip()] if written.strip() else []
    where = f" It ran {outcome.sandbox}." if outcome.sandbox else ""
    parts.append(f"## Command\n`{command}` {status} after {outcome.duration_seconds:.2f} s.{where}")
    if output.strip():
        parts.append(f"## Output (last {OUTPUT_TAIL_CHARS} characters)\n```\n{output.rstrip()}\n```")
    return "\n\n".join(parts) + "\n"
