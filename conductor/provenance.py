"""Provenance of one step attempt: an in-toto Statement v1 with a SLSA Provenance v1 predicate.

Formats:
    * in-toto Statement v1 (https://github.com/in-toto/attestation/blob/main/spec/v1/statement.md):
      ``{"_type", "subject": [ResourceDescriptor], "predicateType", "predicate"}``; every subject has a
      ``name`` and a ``digest`` (a DigestSet: algorithm → lowercase hex).
    * SLSA Provenance v1 (https://slsa.dev/provenance/v1): ``buildDefinition`` {buildType,
      externalParameters, internalParameters, resolvedDependencies} and ``runDetails`` {builder {id,
      version}, metadata {invocationId, startedOn, finishedOn}, byproducts}.

How Conductor fills them:
    * subjects: every changed file that still exists (name = path relative to the workspace) and the
      result file (name = its file name), sorted by name;
    * ``externalParameters.task``: the task document as handed to the executor (with its checksum);
    * ``internalParameters``: the task checksum, the digest of the effective policy and the executor's
      full identity (id, kind, version, model);
    * ``runDetails.builder.id``: the executor's id; ``invocationId``: ``<plan>/<fork>/<step>#<attempt>``;
    * ``byproducts``: one ResourceDescriptor per verification command (digest = SHA-256 of its output)
      and one for the LLM usage.

Files: ``<step>.provenance.json`` is the executor's statement (built here by Conductor's own executors)
in a DSSE v1 envelope (payloadType :data:`PAYLOAD_TYPE`, https://github.com/secure-systems-lab/dsse),
signed with the executor's Ed25519 key when it has one. ``<step>.attestation.json`` is Conductor's own
statement about an accepted step (:func:`build_attestation`), always signed with the project key: it adds
the verification evidence, the policy verdict and the fork's commit after the merge. See
docs/provenance.md for verifying both without Conductor.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from conductor import __version__
from conductor.canonical import sha256_hex, strict_loads
from conductor.errors import ChecksumMismatch, InvalidDocument
from conductor.handoff.jcs import jcs_bytes, jcs_checksum
from conductor.models import CommandEvidence, ExecutorInfo, FileChange, Result, Task, Usage, Verdict

if TYPE_CHECKING:
    from conductor.keys import SigningKey, TrustStore

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "https://conductor.dev/step/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
"""DSSE payloadType of an in-toto statement."""

_HEX_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def build_statement(
    *,
    task: Task,
    result_digest_hex: str,
    result_name: str,
    changed: Sequence[FileChange],
    executor: ExecutorInfo,
    started_at: str,
    finished_at: str,
    usage: Usage | None = None,
    verification: Sequence[CommandEvidence] = (),
    policy_digest: str | None = None,
    task_document: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Build the in-toto Statement v1 (SLSA Provenance v1 predicate) of one step attempt.

    Args:
        task: the task as published; its checksum is recomputed and, if present, checked.
        task_document: the task file's document exactly as read, when the caller has it: stated instead of
            ``task``'s dump, which would add the fields a newer Conductor defaults to a task published
            before an upgrade (and so change its checksum).
        result_digest_hex: lowercase hex SHA-256 of the result file's bytes.
        result_name: the result file's name, e.g. ``"step_001.result.json"``.
        changed: the files actually changed (ground truth from hashing); deleted files and files
            without a digest are not subjects, since there is nothing left to point at.
        executor: who ran the attempt; becomes ``runDetails.builder``.
        started_at: RFC 3339 UTC start of the attempt.
        finished_at: RFC 3339 UTC end of the attempt.
        usage: LLM token usage and cost, if any.
        verification: evidence of the verification commands.
        policy_digest: ``"sha256:<hex>"`` of the effective policy; defaults to the task's.

    Returns:
        The statement as a JSON-ready dict.

    Raises:
        ChecksumMismatch: the task's recorded checksum does not match its content.
        InvalidDocument: a digest is not 64 lowercase hex characters.
    """
    task_document = dict(task_document) if task_document is not None else task.to_document()
    task_checksum = _task_checksum(task_document)
    return {
        "_type": STATEMENT_TYPE,
        "subject": _subjects(changed, result_name, result_digest_hex),
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {"task": task_document},
                "internalParameters": {
                    "task_checksum": task_checksum,
                    "policy_digest": policy_digest or task.policy_digest,
                    "executor": executor.to_document(),
                },
                "resolvedDependencies": [{"name": "base", "digest": {"gitCommit": task.base_commit}}],
            },
            "runDetails": {
                "builder": {"id": executor.id, "version": _builder_version(executor)},
                "metadata": {
                    "invocationId": invocation_id(task),
                    "startedOn": started_at,
                    "finishedOn": finished_at,
                },
                "byproducts": _byproducts(verification, usage),
            },
        },
    }


def statement_bytes(statement: dict[str, Any]) -> bytes:
    """The RFC 8785 canonical bytes of ``statement`` (the payload a DSSE envelope signs).

    Raises:
        InvalidDocument: the statement holds a value JSON cannot represent canonically.
    """
    return jcs_bytes(statement)  # the C encoder where it writes JCS exactly, else rfc8785 (conductor.handoff.jcs)


def invocation_id(task: Task) -> str:
    """``"<plan>/<fork>/<step>#<attempt>"``: the attempt's identity, unique within a project."""
    return f"{task.plan_id}/{task.fork_id}/{task.task_id}#{task.attempt}"


def _task_checksum(task_document: dict[str, Any]) -> str:
    actual = jcs_checksum(task_document)
    recorded = task_document.get("checksum")
    if recorded is not None and recorded != actual:
        raise ChecksumMismatch(f"task {task_document.get('task_id')}: checksum {recorded} does not match content")
    return actual


def _subjects(changed: Sequence[FileChange], result_name: str, result_hex: str) -> list[dict[str, Any]]:
    subjects = [
        _descriptor(change.path, change.sha256)
        for change in changed
        if change.change != "deleted" and change.sha256 is not None
    ]
    subjects.append(_descriptor(result_name, result_hex))
    return sorted(subjects, key=lambda subject: subject["name"])


def _descriptor(name: str, hex_digest: str) -> dict[str, Any]:
    if not _HEX_SHA256.match(hex_digest):
        raise InvalidDocument(f"{name}: sha256 digest {hex_digest!r} is not 64 lowercase hex characters")
    return {"name": name, "digest": {"sha256": hex_digest}}


def _builder_version(executor: ExecutorInfo) -> dict[str, str]:
    # SLSA: builder.version is a map of component name -> version string.
    version = {"conductor": __version__}
    if executor.version:
        version["executor"] = executor.version
    if executor.model:
        version["model"] = executor.model
    return version


def _byproducts(verification: Sequence[CommandEvidence], usage: Usage | None) -> list[dict[str, Any]]:
    byproducts = [_evidence_descriptor(index, evidence) for index, evidence in enumerate(verification)]
    if usage is not None:
        document = usage.to_document()
        # A ResourceDescriptor needs a uri, digest or content; the digest lets a reader check the annotations.
        byproducts.append({
            "name": "usage",
            "mediaType": "application/json",
            "digest": {"sha256": sha256_hex(jcs_bytes(document))},
            "annotations": document,
        })
    return byproducts


def _evidence_descriptor(index: int, evidence: CommandEvidence) -> dict[str, Any]:
    annotations = evidence.to_document()
    descriptor = _descriptor(f"verification/{index}", annotations.pop("output_sha256"))
    return {**descriptor, "mediaType": "text/plain", "annotations": annotations}


# --- DSSE: signing and reading ------------------------------------------------------------------

ATTESTATION_BUILD_TYPE = "https://conductor.dev/verification/v1"
VERIFIER_ID = "conductor-verifier"


def envelope_for(statement: dict[str, Any], signer: SigningKey | None) -> bytes:
    """The DSSE envelope (RFC 8785 bytes) of ``statement``; signed by ``signer``, unsigned when None.

    An unsigned envelope has ``"signatures": []``: the statement's digests still bind the files, but
    nothing vouches for who wrote it (``trust.require_signatures`` rejects it).
    """
    from conductor.dsse import envelope_bytes, sign_envelope

    return envelope_bytes(sign_envelope(statement_bytes(statement), PAYLOAD_TYPE, [signer] if signer else []))


@dataclass(frozen=True)
class ReadProvenance:
    """A provenance or attestation file after its envelope was checked.

    Attributes:
        statement: the in-toto Statement (parsed strictly).
        signed_by: key ids of trusted signatures that verified ([] = unsigned or only unknown keys).
        subjects: subject name → sha256 hex.
        commits: subject name → git commit id (subjects with a ``gitCommit`` digest).
    """

    statement: dict[str, Any]
    signed_by: list[str]
    subjects: dict[str, str]
    commits: dict[str, str] = field(default_factory=dict)


def read_provenance(
    path: Path, trust: TrustStore, *, executor_id: str | None, require_signature: bool
) -> ReadProvenance:
    """Read a DSSE envelope over an in-toto Statement v1 and check its signatures.

    Args:
        path: the ``provenance.json`` / ``attestation.json`` file.
        trust: the trusted keys.
        executor_id: who the file claims to come from (signatures must be trusted for it).
        require_signature: an unsigned envelope is an error when True.

    Raises:
        InvalidDocument: not a DSSE envelope, wrong payloadType, or a payload that is not a statement.
        SignatureError: a bad signature, an untrusted signer, or unsigned while required.
        OSError: the file cannot be read.
    """
    from conductor.dsse import parse_envelope, verify_envelope

    envelope = parse_envelope(path.read_bytes(), source=str(path))
    if envelope.payload_type != PAYLOAD_TYPE:
        raise InvalidDocument(f"{path}: payloadType {envelope.payload_type!r} is not {PAYLOAD_TYPE!r}")
    verified = verify_envelope(envelope, trust, executor_id=executor_id, require_signature=require_signature)
    statement = strict_loads(verified.payload, source=f"{path} payload")
    if not isinstance(statement, dict) or statement.get("_type") != STATEMENT_TYPE:
        raise InvalidDocument(f"{path}: the payload is not an in-toto Statement v1")
    subjects, commits = {}, {}
    for subject in statement.get("subject") or []:
        name, digests = (subject.get("name"), subject.get("digest")) if isinstance(subject, dict) else (None, None)
        if isinstance(name, str) and isinstance(digests, dict) and isinstance(digests.get("gitCommit"), str):
            commits[name] = digests["gitCommit"]
            continue
        if not isinstance(name, str) or not isinstance(digests, dict) or not isinstance(digests.get("sha256"), str):
            raise InvalidDocument(f"{path}: a subject without a name and a sha256 or gitCommit digest: {subject!r}")
        subjects[name] = digests["sha256"]
    return ReadProvenance(statement=statement, signed_by=verified.signed_by, subjects=subjects, commits=commits)


def build_attestation(
    *,
    task: Task,
    verdict: Verdict,
    result: Result,
    files: Sequence[tuple[str, str]],
    workspace_commit: str,
    verifier_id: str,
    task_document: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Conductor's own statement about one accepted step (``<step>.attestation.json``, DSSE-signed).

    Subjects: every changed file (sha256 of its new content), each evidence file of the step (``files``:
    result, explanation, executor provenance, verdict — name and sha256 hex) and ``workspace``, the
    fork's state after the merge (digest ``gitCommit``: a commit in ``.conductor/git``, restorable with
    ``conductor checkout``). The attempt's base commit is its one resolved dependency.
    The SLSA predicate records the task checksum, the effective policy digest, plan/fork/step ids and
    attempt, the executor's identity, model and token usage, the verification commands with exit codes
    and output digests, the policy verdict and its checks, and start/finish times. ``task_document``: as
    :func:`build_statement`.

    Raises:
        ChecksumMismatch: the task's recorded checksum does not match its content.
        InvalidDocument: a digest is not 64 lowercase hex characters.
    """
    task_document = dict(task_document) if task_document is not None else task.to_document()
    subjects = [_descriptor(c.path, c.sha256) for c in verdict.files_changed
                if c.change != "deleted" and c.sha256 is not None]
    subjects += [_descriptor(name, hex_digest) for name, hex_digest in files]
    subjects.append({"name": "workspace", "digest": {"gitCommit": workspace_commit}})
    return {
        "_type": STATEMENT_TYPE,
        "subject": sorted(subjects, key=lambda subject: subject["name"]),
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": ATTESTATION_BUILD_TYPE,
                "externalParameters": {"task": task_document},
                "internalParameters": {
                    "task_checksum": _task_checksum(task_document),
                    "policy_digest": verdict.policy_digest,
                    "plan_id": task.plan_id, "fork_id": task.fork_id, "step_id": task.task_id,
                    "attempt": task.attempt,
                    "executor": result.executor.to_document(),
                    "verdict": {"accepted": verdict.accepted, "reasons": verdict.reasons,
                                "diff_lines": verdict.diff_lines,
                                "checks": [c.model_dump(mode="json") for c in verdict.checks]},
                },
                "resolvedDependencies": [{"name": "base", "digest": {"gitCommit": task.base_commit}}],
            },
            "runDetails": {
                "builder": {"id": verifier_id, "version": {"conductor": __version__}},
                "metadata": {
                    "invocationId": invocation_id(task),
                    "startedOn": result.started_at,
                    "finishedOn": verdict.decided_at,
                },
                "byproducts": _byproducts(verdict.verification, result.usage),
            },
        },
    }
