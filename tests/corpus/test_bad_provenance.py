"""Forged and mis-signed provenance, played against the verifier (issue 9, "tests that must bite": replacing
the verifier's provenance rejection with ``if False``, or dropping its subject-digest comparison, must fail
these)."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from conductor.canonical import sha256_hex
from conductor.handoff.complete import complete_task
from conductor.handoff.documents import sealed_bytes
from conductor.keys import SigningKey, TrustStore
from conductor.models import FileChange, Verdict
from conductor.provenance import build_statement, envelope_for
from conductor.verifier import VerifySettings, verify_step
from tests.corpus.builders import claim, hand_result, policy, workspace
from tests.handoff.support import make_handoff

EXECUTOR = "ide-agent"


def run_step(tmp_path: Path, *, signer: SigningKey | None, trusted: dict[str, SigningKey], require: bool,
             forge_digest: bool = False) -> Verdict:
    """One step by an external executor that writes README.md and signs (or not) its provenance."""
    handoff = make_handoff(tmp_path / "project", steps=1)
    handoff.publish("step_001")
    claimed = claim(handoff)
    assert claimed is not None
    (workspace(handoff, claimed) / "README.md").write_text("changed\n")
    import hashlib

    digest = "f" * 64 if forge_digest else hashlib.sha256(b"changed\n").hexdigest()
    files = [FileChange(path="README.md", change="modified", sha256=digest, lines_added=1, lines_removed=1)]
    result = hand_result(claimed, files)
    _, result_bytes = sealed_bytes(result)
    statement = build_statement(task=claimed.task, result_digest_hex=sha256_hex(result_bytes),
                                result_name="step_001.result.json", changed=files, executor=result.executor,
                                started_at=result.started_at, finished_at=result.finished_at, usage=result.usage,
                                policy_digest=claimed.task.policy_digest)
    complete_task(claimed, result, explanation="by hand", provenance=envelope_for(statement, signer))
    trust = TrustStore()
    for pattern, key in trusted.items():
        trust.add(key.public_key, (pattern,))
    return verify_step(handoff.layout, handoff.fork, "step_001", published_checksum=claimed.task.checksum,
                       published_attempt=1, policy=policy(), confidence_level="high",
                       settings=VerifySettings(commands=[], timeout_seconds=30, ignore=[], trust=trust,
                                               require_signatures=require),
                       head_commit=handoff.head)


def key() -> SigningKey:
    return SigningKey.of(Ed25519PrivateKey.generate())


def test_a_provenance_whose_subject_digest_lies_is_rejected(tmp_path: Path) -> None:
    agent = key()
    verdict = run_step(tmp_path, signer=agent, trusted={EXECUTOR: agent}, require=False, forge_digest=True)
    assert not verdict.accepted
    assert "provenance: subject digests do not match the files: README.md" in verdict.reasons


def test_a_signature_by_an_untrusted_key_is_rejected(tmp_path: Path) -> None:
    verdict = run_step(tmp_path, signer=key(), trusted={}, require=True)
    assert not verdict.accepted
    assert any(r.startswith("provenance:") for r in verdict.reasons)


def test_a_key_trusted_only_for_another_executor_is_rejected(tmp_path: Path) -> None:
    agent = key()
    verdict = run_step(tmp_path, signer=agent, trusted={"someone-else": agent}, require=False)
    assert not verdict.accepted
    assert any("not trusted for executor 'ide-agent'" in r for r in verdict.reasons)


def test_unsigned_provenance_is_rejected_when_signatures_are_required(tmp_path: Path) -> None:
    verdict = run_step(tmp_path, signer=None, trusted={}, require=True)
    assert not verdict.accepted
    assert "provenance: unsigned: no signature by a trusted key" in verdict.reasons


def test_a_signature_by_the_trusted_key_is_accepted(tmp_path: Path) -> None:
    agent = key()
    verdict = run_step(tmp_path, signer=agent, trusted={EXECUTOR: agent}, require=True)
    assert verdict.accepted, verdict.reasons
    [check] = [c for c in verdict.checks if c.name == "provenance"]
    assert check.passed and check.detail.startswith("signed by ")
