"""Conductor's signed attestation of every accepted step (``completed/<step>.attestation.json``).

The executor's ``provenance.json`` says what the executor did, signed with the executor's key if it has
one. The attestation is Conductor's independent statement, signed with the project key after the step
was verified and merged: the true changed files, the evidence files of the step, the verification
commands and their output digests, the policy verdict, and the fork's commit after the merge (see
:func:`conductor.provenance.build_attestation`). It is written after the verdict and before the
``step.merged`` event; being deterministic for a given verdict, rewriting it after a crash is harmless.
"""

from __future__ import annotations

from conductor.fsutil import atomic_write, file_sha256
from conductor.canonical import strict_loads
from conductor.handoff.documents import parse_document, read_document, read_limited
from conductor.handoff.lease import HOST
from conductor.keys import SigningKey
from conductor.layout import (
    ATTESTATION_SUFFIX,
    EXPLANATION_SUFFIX,
    PROVENANCE_SUFFIX,
    RESULT_SUFFIX,
    VERDICT_SUFFIX,
    ForkLayout,
    ProjectLayout,
)
from conductor.models import Result, Task, Verdict
from conductor.provenance import VERIFIER_ID, build_attestation, envelope_for

EVIDENCE_SUFFIXES = (RESULT_SUFFIX, EXPLANATION_SUFFIX, PROVENANCE_SUFFIX, VERDICT_SUFFIX)


def write_attestation(layout: ProjectLayout, fork: ForkLayout, verdict: Verdict, commit: str,
                      signer: SigningKey) -> None:
    """Build, sign and write the attestation of the accepted step ``verdict.task_id``.

    Raises:
        IntegrityError: the task or result file no longer matches its checksum.
        OSError: a file cannot be read or written.
    """
    task_id = verdict.task_id
    task_bytes = read_limited(fork.task_file("completed", task_id))
    task = parse_document(task_bytes, Task, source=fork.task_file("completed", task_id))
    result = read_document(fork.sidecar("completed", task_id, RESULT_SUFFIX), Result)
    files = [(f"{task_id}{suffix}", file_sha256(fork.sidecar("completed", task_id, suffix)))
             for suffix in EVIDENCE_SUFFIXES if fork.sidecar("completed", task_id, suffix).exists()]
    statement = build_attestation(task=task, verdict=verdict, result=result, files=files,
                                  workspace_commit=commit, verifier_id=f"{VERIFIER_ID}@{HOST}",
                                  task_document=strict_loads(task_bytes))
    atomic_write(fork.sidecar("completed", task_id, ATTESTATION_SUFFIX), envelope_for(statement, signer))
