"""``conductor``: the entry point, the lazy command table, and the one error handler.

Commands are imported only when run, so ``conductor --help`` loads neither the engine nor any SDK.
Exit codes are those of ``conductor.errors`` (see docs/cli.md).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import click

from conductor import __version__

# name -> (module:function, one-line help shown by `conductor --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "init": ("conductor.cli.project_cmds:init", "Create a project (or prepare this folder) with config and policy."),
    "explore": ("conductor.cli.run_cmds:explore", "Plan several strategies for a goal, run them as forks, apply the best."),
    "build": ("conductor.cli.run_cmds:build", "Plan one strategy for a goal and run it."),
    "resume": ("conductor.cli.run_cmds:resume", "Continue a halted or crashed plan; nothing done is redone."),
    "fork": ("conductor.cli.run_cmds:fork", "Start a new fork from the workspace as it was after a step."),
    "approve": ("conductor.cli.project_cmds:approve", "Approve a low-confidence step that waits for review."),
    "worker": ("conductor.cli.worker_cmd:worker", "Run tasks from the handoff folder with any command."),
    "mcp": ("conductor.cli.mcp_cmd:mcp", "Serve tasks, planning and workspaces to an MCP client over stdio."),
    "task": ("conductor.cli.task_cmds:task", "Claim, renew, complete or release a handoff task (for agents and scripts)."),
    "status": ("conductor.cli.inspect_cmds:status", "Show plans, forks and steps by state."),
    "events": ("conductor.cli.inspect_cmds:events", "List a plan's audit events."),
    "explain": ("conductor.cli.inspect_cmds:explain", "Tell the story of one step."),
    "replay": ("conductor.cli.history_cmds:replay", "Rebuild a plan's state at any point from its audit logs."),
    "checkout": ("conductor.cli.history_cmds:checkout", "Restore the workspace as it was after a step."),
    "verify": ("conductor.cli.history_cmds:verify", "Check checksums, results, provenance signatures and audit logs."),
    "gc": ("conductor.cli.project_cmds:gc", "Remove finished plans' attempt folders and unreachable objects."),
    "keys": ("conductor.cli.history_cmds:keys", "Show the signing key id and the trusted keys."),
    "policy": ("conductor.cli.inspect_cmds:policy", "Show the effective policy and where each value came from."),
    "handoff-metrics": ("conductor.cli.inspect_cmds:handoff_metrics", "Write and show handoff metrics.json."),
    "confidence": ("conductor.cli.confidence_cmds:confidence", "Show how well past confidence scores predicted outcomes."),
    "cost": ("conductor.cli.cost_cmd:cost", "Show LLM spending by plan, fork, step and model, and what replays saved."),
}


class _Context(click.Context):
    def make_formatter(self) -> click.HelpFormatter:
        # click sizes the help by shutil.get_terminal_size, and importing shutil pulls in bz2, lzma and
        # zlib; os.get_terminal_size gives the same width for the top-level help screen.
        if self.terminal_width is None and click.formatting.FORCED_WIDTH is None:
            self.terminal_width = max(min(_terminal_columns(), self.max_content_width or 80) - 2, 50)
        return super().make_formatter()


def _terminal_columns() -> int:
    """``shutil.get_terminal_size().columns``: $COLUMNS, else the terminal of stdout, else 80."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


class LazyGroup(click.Group):
    """A group whose commands are imported on first use."""

    context_class = _Context

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module_name, attr = COMMANDS[cmd_name][0].split(":")
        return getattr(importlib.import_module(module_name), attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, text) for name, (_, text) in COMMANDS.items()])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="conductor")
def cli() -> None:
    """Conductor: orchestration runtime for AI coding agents, governed by policy-as-code.

    Exit codes: 0 ok, 1 plan did not succeed, 2 usage, 3 config, 4 policy, 5 integrity,
    6 LLM backend, 7 missing API key, 8 executor, 9 not found, 10 state conflict, 11 halted,
    12 git, 13 no sandbox, 14 LLM budget reached, 70 internal error, 74 disk refused a write,
    130 interrupted. See docs/cli.md.
    """


def _crash_log(exc: BaseException) -> Path:
    # Imported here: a help screen or a normal run never needs them (tempfile alone pulls in random,
    # shutil and the compression modules).
    import tempfile
    import traceback
    from datetime import UTC, datetime

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    path = Path(tempfile.gettempdir()) / f"conductor-crash-{stamp}.log"
    path.write_text("".join(traceback.format_exception(exc)), encoding="utf-8")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit code (never raises, except SystemExit from click itself)."""
    from conductor.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_TERMINATED, ConductorError, Terminated

    try:
        result = cli.main(args=list(argv) if argv is not None else None, prog_name="conductor", standalone_mode=False)
    except ConductorError as exc:
        from conductor.redact import redact

        click.echo(f"conductor: error: {redact(str(exc))}", err=True)
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt) as exc:  # click turns a KeyboardInterrupt into Abort
        if isinstance(exc, Terminated) or isinstance(exc.__cause__, Terminated):  # SIGTERM, not Ctrl-C
            click.echo("conductor: terminated", err=True)
            return EXIT_TERMINATED
        click.echo("conductor: interrupted", err=True)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug: keep the traceback, show one line
        log = _crash_log(exc)
        click.echo(f"conductor: internal error: {type(exc).__name__}: {exc} (traceback in {log})", err=True)
        return EXIT_INTERNAL
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
