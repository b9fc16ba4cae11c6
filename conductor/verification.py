"""Verification commands (tests, linters) run by Conductor itself, recorded as evidence for a verdict."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from conductor.canonical import sha256_hex
from conductor.errors import ExecutorError
from conductor.fsutil import private_temp_dir
from conductor.models import CommandEvidence
from conductor.proc import run_command
from conductor.redact import launch_environment, redact
from conductor.sandbox import SandboxSpec
from conductor.workspace import feed
from conductor.workspace.sealed import forget

OUTPUT_TAIL_CHARS = 4000
_TAIL_BYTES = OUTPUT_TAIL_CHARS * 4  # a UTF-8 character is at most 4 bytes


def verification_environment(environ: Mapping[str, str] | None = None, env_names: Sequence[str] = ()) -> dict[str, str]:
    """The environment verification commands run with.

    The allowlist of ``environ`` (default ``os.environ``; ``conductor.redact.launch_environment``, with
    ``env_names`` from ``executor.env``) plus the folder of ``sys.executable`` put first on ``PATH``, so
    ``pytest`` or ``python`` resolve in the environment Conductor runs from even when it is not
    activated, and ``PYTHONDONTWRITEBYTECODE=1`` so that checks do not leave ``__pycache__`` behind.
    """
    env = launch_environment(os.environ if environ is None else environ, env_names)
    # abspath, not realpath: a venv's python is a symlink to the base interpreter, whose folder is wrong.
    interpreter_dir = os.path.dirname(os.path.abspath(sys.executable))
    env["PATH"] = os.pathsep.join([interpreter_dir, env.get("PATH") or os.defpath])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def run_verification(
    commands: Sequence[str],
    cwd: Path,
    *,
    timeout_seconds: float,
    environ: Mapping[str, str] | None = None,
    sandbox: SandboxSpec | None = None,
    env_names: Sequence[str] = (),
    temp_parent: Path | None = None,
) -> list[CommandEvidence]:
    """Run every command through ``/bin/sh -c`` in ``cwd``, in order, and record what each did.

    All commands run, even after one fails, so the evidence is complete.

    Args:
        commands: shell command lines.
        cwd: the working copy to verify.
        timeout_seconds: the limit of each command, in seconds.
        environ: the base environment (default ``os.environ``); see :func:`verification_environment`.
        sandbox: contain each command (``conductor.sandbox``): it may write only in ``cwd`` and a private
            temp folder of its own (``TMPDIR``); None runs them uncontained.
        temp_parent: where that temp folder goes (named so that recovery's temp sweep removes it if this
            process is killed: ``conductor.fsutil.private_temp_dir``); None: the system temp folder.

    Returns:
        One :class:`CommandEvidence` per command, in order. A command that cannot start has
        ``exit_code`` None and the reason as its output.
    """
    env = verification_environment(environ, env_names)
    forget(cwd)  # the commands may write there: a capture this process sealed no longer tells what it holds
    return [_run_one(command, cwd, env, timeout_seconds, sandbox, temp_parent) for command in commands]


def _run_one(command: str, cwd: Path, env: dict[str, str], timeout_seconds: float,
             sandbox: SandboxSpec | None, temp_parent: Path | None) -> CommandEvidence:
    contained = False
    try:
        with private_temp_dir(temp_parent) as private_tmp:
            spec = None if sandbox is None else replace(sandbox, writable=(*sandbox.writable, private_tmp))
            outcome = run_command(command, cwd=cwd, env={**env, "TMPDIR": str(private_tmp)},
                                  timeout_seconds=timeout_seconds, shell=True, sandbox=spec)
            contained = outcome.contained
    except ExecutorError as exc:
        message = str(exc).encode("utf-8")
        return _evidence(command, None, 0.0, False, sha256_hex(message), message)
    finally:
        if not contained:
            feed.drop(cwd)  # something it started may still write there unseen (conductor.workspace.feed)
    return _evidence(
        command, outcome.exit_code, outcome.duration_seconds, outcome.timed_out, outcome.output_sha256, outcome.output,
        sandboxed=outcome.sandboxed,
    )


def _evidence(
    command: str, exit_code: int | None, duration: float, timed_out: bool, output_sha256: str, output: bytes, *,
    sandboxed: bool = False,
) -> CommandEvidence:
    tail = redact(output[-_TAIL_BYTES:].decode("utf-8", errors="replace"))[-OUTPUT_TAIL_CHARS:]
    return CommandEvidence(
        command=command,
        exit_code=exit_code,
        duration_seconds=duration,
        timed_out=timed_out,
        output_sha256=output_sha256,
        output_tail=tail,
        sandboxed=sandboxed,
    )


def all_passed(evidence: Sequence[CommandEvidence]) -> bool:
    """True if every command exited 0 without timing out (vacuously True for no commands)."""
    return all(e.exit_code == 0 and not e.timed_out for e in evidence)
