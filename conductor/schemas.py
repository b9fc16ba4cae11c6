"""JSON Schemas (draft 2020-12) of the file contract, generated from :mod:`conductor.models`.

``python -m conductor.schemas`` rewrites ``docs/schemas/<name>.v1.json``; ``python -m conductor.schemas
--check`` exits 1 and names every file that differs from the models (a test runs the same check).

The schemas describe the files as a *reader* meets them (pydantic's validation mode), with two
adjustments that the models alone cannot express but Conductor's reader
(:func:`conductor.handoff.documents.read_document`) enforces:

* ``schema`` (the version string, e.g. ``"conductor.task/v1"``) is required, not defaulted;
* ``checksum`` is required and non-null in every checksummed document (plan, task, lease, result,
  verdict): ``"sha256:" + hex(SHA-256(RFC 8785 JCS of the document without "checksum"))``.

Workspace state is not a JSON document: it lives in git objects in ``.conductor/git`` (see
docs/architecture.md), named by commit and tree ids in the task, verdict and audit events.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from conductor.models import CONTRACT_MODELS

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "docs" / "schemas"
DIALECT = "https://json-schema.org/draft/2020-12/schema"
ID_PREFIX = "https://conductor.dev/schemas/"
VERSION = "v1"
CHECKSUMMED = ("plan", "fork", "task", "lease", "result", "verdict")
CHECKSUM_PATTERN = r"^sha256:[0-9a-f]{64}$"

_TEXT: dict[str, tuple[str, str]] = {
    "plan": (
        "Conductor plan (conductor.plan/v1)",
        "handoff/plan_<id>/plan.json: the goal, its forks (strategies and their steps) and the plan-level "
        "policy. Written once by Conductor, never rewritten. Checksummed.",
    ),
    "fork": (
        "Conductor added fork (conductor.fork/v1)",
        "handoff/plan_<id>/fork_<id>/fork.json: a fork added to an existing plan by `conductor fork --from`: "
        "its steps, the past step it starts from (parent fork, step, the parent's step.merged event and "
        "the commit after it) and the steps it takes over unchanged. Written once by Conductor. "
        "Checksummed.",
    ),
    "task": (
        "Conductor task (conductor.task/v1)",
        "fork_<id>/{pending,in_progress,completed,failed}/<step>.task.json: one attempt of one step as "
        "handed to an executor. Written by Conductor only; an executor moves it by rename and never edits "
        "it. Checksummed.",
    ),
    "lease": (
        "Conductor lease (conductor.lease/v1)",
        "fork_<id>/in_progress/<step>.lease.json: who holds a claimed task and until when. Written by the "
        "claiming executor and renewed (rewritten atomically) by its heartbeat; fencing_token equals the "
        "task's attempt. Checksummed.",
    ),
    "result": (
        "Conductor result (conductor.result/v1)",
        "fork_<id>/{completed,failed}/<step>.result.json: what the executor says it did. Written by the "
        "executor before it moves the task file; never trusted alone. Checksummed.",
    ),
    "verdict": (
        "Conductor verdict (conductor.verdict/v1)",
        "fork_<id>/{completed,failed}/<step>.verdict.json: Conductor's own decision on a finished attempt "
        "(checks, ground-truth changes, verification evidence). Written by Conductor only. Checksummed.",
    ),
    "event": (
        "Conductor audit event",
        "One line of an audit.log: an RFC 8785 canonical JSON object. hash = sha256 over the JCS bytes of "
        "the entry without hash; prev = the previous line's hash (64 zeros after 'sha256:' for seq 0). "
        "Written by Conductor only.",
    ),
    "policy": (
        "Conductor policy layer",
        "One policy layer: .conductor/policy.yaml (parsed YAML), the plan's policy or a step's policy. "
        "Layers merge project -> plan -> step, tighten-only; unknown keys are errors.",
    ),
}

def _reader_rules(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    required = list(schema.get("required", []))
    properties = schema["properties"]
    if "schema" in properties and "schema" not in required:
        required.insert(0, "schema")
        properties["schema"].pop("default", None)
    if name in CHECKSUMMED:
        properties["checksum"] = {
            "description": "sha256:<hex> over the RFC 8785 (JCS) form of the document without this field",
            "pattern": CHECKSUM_PATTERN,
            "title": "Checksum",
            "type": "string",
        }
        required.append("checksum")
    if required:
        schema["required"] = required
    return schema


def _finish(name: str, body: dict[str, Any]) -> dict[str, Any]:
    title, description = _TEXT[name]
    return {
        **body,
        "$schema": DIALECT,
        "$id": f"{ID_PREFIX}{name}.{VERSION}.json",
        "title": title,
        "description": description,
    }


def generate() -> dict[str, dict[str, Any]]:
    """Build the JSON Schema of every contract document.

    Returns:
        ``{name: schema}`` for ``plan``, ``task``, ``lease``, ``result``, ``verdict``, ``event``,
        ``policy`` (from :data:`conductor.models.CONTRACT_MODELS`).
    """
    schemas: dict[str, dict[str, Any]] = {}
    for name, model in CONTRACT_MODELS.items():
        body = model.model_json_schema(by_alias=True, mode="validation")
        schemas[name] = _finish(name, _reader_rules(name, body))
    return schemas


def file_name(name: str) -> str:
    """``"task"`` -> ``"task.v1.json"``."""
    return f"{name}.{VERSION}.json"


def render(schema: dict[str, Any]) -> bytes:
    """The exact bytes of a schema file: sorted keys, indent 2, UTF-8, trailing newline."""
    return (json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def write(directory: Path = SCHEMA_DIR) -> list[Path]:
    """Write every schema to ``directory/<name>.v1.json`` (creating the folder).

    Returns:
        The paths written, in :func:`generate` order.
    """
    from conductor.fsutil import atomic_write

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in generate().items():
        path = directory / file_name(name)
        atomic_write(path, render(schema))
        written.append(path)
    return written


def drift(directory: Path = SCHEMA_DIR) -> list[str]:
    """Schema files of ``directory`` that differ from the models.

    Returns:
        One line per problem: ``"<file>: missing"``, ``"<file>: differs from the models"`` or
        ``"<file>: not generated from any model"``; empty when everything matches.
    """
    problems = []
    expected = {file_name(name): render(schema) for name, schema in generate().items()}
    for name, data in expected.items():
        path = directory / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.read_bytes() != data:
            problems.append(f"{path}: differs from the models")
    if directory.is_dir():
        for path in sorted(directory.glob(f"*.{VERSION}.json")):
            if path.name not in expected:
                problems.append(f"{path}: not generated from any model")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m conductor.schemas [--check] [--dir DIR]``; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m conductor.schemas", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 listing files that drifted; write nothing")
    parser.add_argument("--dir", type=Path, default=SCHEMA_DIR, help=f"schema folder (default: {SCHEMA_DIR})")
    args = parser.parse_args(argv)
    if args.check:
        problems = drift(args.dir)
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            print("run `python -m conductor.schemas` to regenerate", file=sys.stderr)
        return 1 if problems else 0
    for path in write(args.dir):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
