"""docs/provenance.md tells the truth: its standalone verifiers run, accept what Conductor signs and refuse tampering.

The Python blocks after ``<!-- verify-provenance -->``, ``<!-- verify-chain -->`` and
``<!-- verify-checkpoint -->`` are written to files and run with ``sys.executable`` against envelopes,
logs and checkpoints made by ``conductor.dsse``, ``conductor.audit`` and ``conductor.checkpoint``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from conductor.audit import AuditLog, verify_chain
from conductor.canonical import seal, sha256_hex
from conductor.checkpoint import audit_origin, checkpoint_body, note_digest, sign_note, verify_note, write_checkpoint
from conductor.config import Config
from conductor.dsse import PAYLOAD_TYPE_IN_TOTO, envelope_bytes, pae, parse_envelope, sign_envelope, verify_envelope
from conductor.keys import SigningKey, TrustStore, generate_signing_key, load_public_key
from conductor.models import Confidence, ExecutorInfo, FileChange, Result, Task, Usage, Verdict
from conductor.provenance import build_attestation, build_statement, statement_bytes
from conductor.yamlutil import load_yaml_mapping

DOC = Path(__file__).resolve().parent.parent / "docs" / "provenance.md"
TIMEOUT = 60
EXECUTOR = "conductor-worker@host:42"


def block(marker: str) -> str:
    """The fenced code block that follows ``<!-- marker -->`` in docs/provenance.md."""
    match = re.search(rf"<!-- {re.escape(marker)} -->\n```[a-z]*\n(.*?)\n```\n", DOC.read_text("utf-8"), re.S)
    assert match, f"no code block after <!-- {marker} -->"
    return match.group(1)


def run_snippet(marker: str, tmp_path: Path, *args: Path | str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / f"{marker}.py"
    script.write_text(block(marker) + "\n", encoding="utf-8")
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                          timeout=TIMEOUT, cwd=tmp_path)


def test_snippets_import_nothing_from_conductor() -> None:
    for marker in ("verify-provenance", "verify-chain", "verify-checkpoint"):
        imports = re.findall(r"^(?:from|import) (\S+)", block(marker), re.M)
        assert not [name for name in imports if name.startswith("conductor")], marker
        allowed = {"base64", "hashlib", "json", "os", "sys", "pathlib", "cryptography", "rfc8785"}
        assert {name.split(".")[0] for name in imports} <= allowed, imports


def test_pae_example_in_the_doc() -> None:
    text = DOC.read_text("utf-8")
    assert pae("http://example.com/HelloWorld", b"hello world").decode() in text


def test_trust_example_is_a_valid_config(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(block("trust-example") + "\n", encoding="utf-8")
    trust = load_yaml_mapping(path, Config).trust
    assert [k.executors for k in trust.keys] == [["conductor-worker@*"], ["*"]]
    assert trust.require_signatures is False


# --- provenance ---------------------------------------------------------------------------------


@dataclass
class Step:
    workspace: Path
    provenance: Path
    result: Path
    public_key: Path
    key: SigningKey
    statement: dict


def _task() -> Task:
    document = {
        "task_id": "step_001", "plan_id": "20260101-hello", "fork_id": "minimal", "attempt": 1,
        "instruction": "Create hello.py", "allowed_files": ["hello.py", "src/util.py", "link"],
        "workspace": ".conductor/scratch/plan_20260101-hello/fork_minimal/step_001.a1", "base_commit": "ab" * 20,
        "timeout_seconds": 300,
        "max_diff_lines": 500, "policy_digest": "sha256:" + "ab" * 32,
        "confidence": Confidence(score=0.9, level="high").to_document(), "created_at": "2026-01-01T00:00:00.000000Z",
    }
    return Task.model_validate(seal(Task.model_validate(document).to_document()))


def _make_step(tmp_path: Path, sign_with: list[SigningKey] | None = None) -> Step:
    key = generate_signing_key(tmp_path / ".conductor" / "keys")
    workspace = tmp_path / "workspace"
    (workspace / "src").mkdir(parents=True)
    (workspace / "hello.py").write_text('print("Hello, World!")\n', encoding="utf-8")
    (workspace / "src" / "util.py").write_text("def util():\n    return 1\n", encoding="utf-8")
    (workspace / "link").symlink_to("hello.py")
    changes = [
        FileChange(path="hello.py", change="added", sha256=sha256_hex((workspace / "hello.py").read_bytes())),
        FileChange(path="src/util.py", change="modified", sha256=sha256_hex((workspace / "src/util.py").read_bytes())),
        FileChange(path="link", change="added", sha256=sha256_hex(b"hello.py")),  # a symlink: digest of its target
        FileChange(path="gone.py", change="deleted"),
    ]
    completed = tmp_path / "completed"
    completed.mkdir()
    result = completed / "step_001.result.json"
    result.write_bytes(b'{"status":"completed","task_id":"step_001"}\n')
    statement = build_statement(
        task=_task(), result_digest_hex=sha256_hex(result.read_bytes()), result_name=result.name, changed=changes,
        executor=ExecutorInfo(id=EXECUTOR, kind="command", version="conductor-runtime 0.1.0"),
        started_at="2026-01-01T00:00:01.000000Z", finished_at="2026-01-01T00:00:09.000000Z",
        usage=Usage(input_tokens=10, output_tokens=5, cost_usd=1e-7),
    )
    provenance = completed / "step_001.provenance.json"
    envelope = sign_envelope(statement_bytes(statement), PAYLOAD_TYPE_IN_TOTO, [key] if sign_with is None else sign_with)
    provenance.write_bytes(envelope_bytes(envelope))
    return Step(workspace, provenance, result, tmp_path / ".conductor" / "keys" / "signing.pub", key, statement)


def _verify_provenance(step: Step, tmp_path: Path, public_key: Path | None = None) -> subprocess.CompletedProcess[str]:
    return run_snippet("verify-provenance", tmp_path, step.provenance, public_key or step.public_key, step.workspace)


def test_provenance_snippet_accepts_what_conductor_signs(tmp_path: Path) -> None:
    step = _make_step(tmp_path)
    # Conductor's own verifier agrees.
    trust = TrustStore()
    trust.add(load_public_key(step.public_key))
    envelope = parse_envelope(step.provenance.read_bytes(), source=str(step.provenance))
    assert verify_envelope(envelope, trust, executor_id=EXECUTOR).signed_by == [step.key.key_id]
    run = _verify_provenance(step, tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.stdout == f"OK 20260101-hello/minimal/step_001#1 by {EXECUTOR}: 4 subjects match\n"
    # The one resolved dependency the doc shows: the task's base commit.
    assert step.statement["predicate"]["buildDefinition"]["resolvedDependencies"] == [
        {"name": "base", "digest": {"gitCommit": "ab" * 20}}]
    assert '"resolvedDependencies": [{"name": "base", "digest": {"gitCommit":' in DOC.read_text("utf-8")


def test_provenance_snippet_accepts_urlsafe_unpadded_base64_and_other_signers(tmp_path: Path) -> None:
    other = SigningKey.of(Ed25519PrivateKey.generate())
    step = _make_step(tmp_path)
    envelope = sign_envelope(statement_bytes(step.statement), PAYLOAD_TYPE_IN_TOTO, [other, step.key])
    envelope["payload"] = base64.urlsafe_b64encode(base64.b64decode(envelope["payload"])).decode().rstrip("=")
    for signature in envelope["signatures"]:
        signature["sig"] = base64.urlsafe_b64encode(base64.b64decode(signature["sig"])).decode().rstrip("=")
    step.provenance.write_bytes(json.dumps(envelope).encode())
    run = _verify_provenance(step, tmp_path)
    assert run.returncode == 0, run.stderr


def _tamper_workspace_file(step: Step) -> None:
    (step.workspace / "src" / "util.py").write_text("def util():\n    return 2\n", encoding="utf-8")


def _tamper_result(step: Step) -> None:
    step.result.write_bytes(step.result.read_bytes().replace(b"completed", b"failed"))


def _tamper_symlink(step: Step) -> None:
    (step.workspace / "link").unlink()
    (step.workspace / "link").symlink_to("src/util.py")


def _tamper_payload(step: Step) -> None:
    envelope = json.loads(step.provenance.read_bytes())
    statement = dict(step.statement, subject=[])
    envelope["payload"] = base64.b64encode(statement_bytes(statement)).decode()
    step.provenance.write_bytes(json.dumps(envelope).encode())


def _tamper_payload_type(step: Step) -> None:
    envelope = json.loads(step.provenance.read_bytes())
    envelope["payloadType"] = "application/json"
    step.provenance.write_bytes(json.dumps(envelope).encode())


def _strip_signatures(step: Step) -> None:
    envelope = json.loads(step.provenance.read_bytes())
    envelope["signatures"] = []
    step.provenance.write_bytes(json.dumps(envelope).encode())


def _delete_workspace_file(step: Step) -> None:
    (step.workspace / "hello.py").unlink()


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (_tamper_workspace_file, "src/util.py: sha256 is"),
        (_tamper_result, "step_001.result.json: sha256 is"),
        (_tamper_symlink, "link: sha256 is"),
        (_tamper_payload, "bad signature by key"),
        (_tamper_payload_type, "bad signature by key"),
        (_strip_signatures, "no signature by key"),
        (_delete_workspace_file, "FileNotFoundError"),
    ],
)
def test_provenance_snippet_refuses_tampering(tmp_path: Path, tamper, message: str) -> None:
    step = _make_step(tmp_path)
    tamper(step)
    run = _verify_provenance(step, tmp_path)
    assert run.returncode != 0
    assert message in run.stderr, run.stderr
    assert "OK" not in run.stdout


def test_provenance_snippet_refuses_another_key(tmp_path: Path) -> None:
    step = _make_step(tmp_path)
    stranger = tmp_path / "stranger.pub"
    stranger.write_bytes(SigningKey.of(Ed25519PrivateKey.generate()).public_pem())
    run = _verify_provenance(step, tmp_path, public_key=stranger)
    assert run.returncode != 0 and "no signature by key" in run.stderr


def test_provenance_snippet_refuses_subjects_outside_the_workspace(tmp_path: Path) -> None:
    step = _make_step(tmp_path)
    statement = dict(step.statement)
    statement["subject"] = [*statement["subject"], {"name": "../secret", "digest": {"sha256": "00" * 32}}]
    envelope = sign_envelope(statement_bytes(statement), PAYLOAD_TYPE_IN_TOTO, [step.key])
    step.provenance.write_bytes(envelope_bytes(envelope))
    run = _verify_provenance(step, tmp_path)
    assert run.returncode != 0 and "../secret: subject outside the workspace" in run.stderr


def test_provenance_snippet_checks_an_attestation(tmp_path: Path) -> None:
    step = _make_step(tmp_path)
    completed = step.provenance.parent
    (completed / "step_001.explanation.md").write_text("Added hello.py.\n", encoding="utf-8")
    verdict = Verdict(task_id="step_001", plan_id="20260101-hello", fork_id="minimal", attempt=1, accepted=True,
                      files_changed=[FileChange(path="hello.py", change="added",
                                                sha256=sha256_hex((step.workspace / "hello.py").read_bytes()))],
                      diff_lines=1, policy_digest="sha256:" + "ab" * 32, decided_at="2026-01-01T00:00:10.000000Z")
    result = Result(task_id="step_001", plan_id="20260101-hello", fork_id="minimal", attempt=1, fencing_token=1,
                    task_checksum=_task().checksum or "", status="completed",
                    executor=ExecutorInfo(id=EXECUTOR, kind="command"), started_at="2026-01-01T00:00:01.000000Z",
                    finished_at="2026-01-01T00:00:09.000000Z")
    files = [(path.name, sha256_hex(path.read_bytes())) for path in sorted(completed.iterdir())]
    statement = build_attestation(task=_task(), verdict=verdict, result=result, files=files,
                                  workspace_commit="cd" * 20, verifier_id="conductor-verifier@host")
    assert {"name": "workspace", "digest": {"gitCommit": "cd" * 20}} in statement["subject"]  # skipped by the snippet
    attestation = completed / "step_001.attestation.json"
    attestation.write_bytes(envelope_bytes(sign_envelope(statement_bytes(statement), PAYLOAD_TYPE_IN_TOTO,
                                                         [step.key])))
    run = run_snippet("verify-provenance", tmp_path, attestation, step.public_key, step.workspace)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "OK 20260101-hello/minimal/step_001#1 by conductor-verifier@host: 4 subjects match\n"
    step.provenance.write_bytes(step.provenance.read_bytes() + b" ")  # an evidence file changed afterwards
    run = run_snippet("verify-provenance", tmp_path, attestation, step.public_key, step.workspace)
    assert run.returncode != 0 and "step_001.provenance.json: sha256 is" in run.stderr


# --- audit log ----------------------------------------------------------------------------------


def _log(tmp_path: Path, entries: int = 4) -> AuditLog:
    log = AuditLog(tmp_path / "audit.log")
    for index in range(entries):
        # Floats whose JSON text differs between json.dumps and JCS exercise the canonical form.
        log.append("llm.call", {"purpose": "execute", "step_id": f"step_{index}", "provider": "openai",
                                "model": "m", "input_tokens": 1, "output_tokens": 2, "cost_usd": 1e-7,
                                "duration_seconds": 1e21 if index == 1 else 0.5})
    return log


def test_chain_snippet(tmp_path: Path) -> None:
    log = _log(tmp_path)
    run = run_snippet("verify-chain", tmp_path, log.path)
    assert run.returncode == 0, run.stderr
    assert run.stdout == f"OK 4 entries, head {verify_chain(log.path).head}\n"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda lines: [*lines[:1], *lines[2:]], "seq or prev breaks the chain"),
        (lambda lines: [lines[0], lines[1].replace(b'"step_1"', b'"step_9"'), *lines[2:]], "hash does not match"),
        (lambda lines: [*lines[:3], lines[3][:-1]], "torn"),
    ],
)
def test_chain_snippet_refuses_edits(tmp_path: Path, edit, message: str) -> None:
    log = _log(tmp_path)
    lines = log.path.read_bytes().splitlines(keepends=True)
    log.path.write_bytes(b"".join(edit(lines)))
    assert not verify_chain(log.path).ok
    run = run_snippet("verify-chain", tmp_path, log.path)
    assert run.returncode != 0 and message in run.stderr, run.stderr


def _checkpointed(tmp_path: Path) -> tuple[AuditLog, Path, SigningKey]:
    key = generate_signing_key(tmp_path / "keys")
    log = _log(tmp_path, 3)
    origin = audit_origin("p", "fork_a")
    write_checkpoint(log.path, tmp_path / "checkpoints", origin=origin, key=key)
    log.append("task.published", {"step_id": "step_x", "attempt": 1, "checksum": "sha256:" + "0" * 64})
    checkpoint = write_checkpoint(log.path, tmp_path / "checkpoints", origin=origin, key=key)
    assert checkpoint is not None and checkpoint.path is not None and checkpoint.seq == 2
    return log, checkpoint.path, key


def test_checkpoint_snippet(tmp_path: Path) -> None:
    log, note, key = _checkpointed(tmp_path)
    run = run_snippet("verify-checkpoint", tmp_path, note, tmp_path / "keys" / "signing.pub", log.path)
    assert run.returncode == 0, run.stderr
    prev = note_digest((tmp_path / "checkpoints" / "000001.note").read_bytes())
    head = log.events()[-1].hash
    assert run.stdout == f"OK conductor.dev/audit/plan_p/fork_a 4 entries, head {head}, seq 2 prev {prev}\n"
    log.append("task.published", {"step_id": "step_y", "attempt": 1, "checksum": "sha256:" + "0" * 64})
    run = run_snippet("verify-checkpoint", tmp_path, note, tmp_path / "keys" / "signing.pub", log.path)
    assert run.returncode == 0, run.stderr  # entries after the checkpoint are fine


def _flip_signature(note: Path) -> None:
    text = note.read_text("utf-8")
    body, _, line = text.rstrip("\n").rpartition("\n")
    dash, name, blob = line.split(" ")
    raw = bytearray(base64.b64decode(blob))
    raw[-1] ^= 0x80
    note.write_text(f"{body}\n{dash} {name} {base64.b64encode(bytes(raw)).decode()}\n", encoding="utf-8")


def test_checkpoint_snippet_refuses_tampering(tmp_path: Path) -> None:
    log, note, _ = _checkpointed(tmp_path)
    public_key = tmp_path / "keys" / "signing.pub"
    original_log, original_note = log.path.read_bytes(), note.read_bytes()

    log.path.write_bytes(b"".join(original_log.splitlines(keepends=True)[:3]))
    run = run_snippet("verify-checkpoint", tmp_path, note, public_key, log.path)
    assert run.returncode != 0 and "tail truncated" in run.stderr, run.stderr

    other = AuditLog(tmp_path / "forged" / "audit.log")
    for index in range(5):
        other.append("task.published", {"step_id": f"forged_{index}", "attempt": 1})
    log.path.write_bytes(other.path.read_bytes())
    run = run_snippet("verify-checkpoint", tmp_path, note, public_key, log.path)
    assert run.returncode != 0 and "log rewritten" in run.stderr, run.stderr

    log.path.write_bytes(original_log)
    _flip_signature(note)
    run = run_snippet("verify-checkpoint", tmp_path, note, public_key, log.path)
    assert run.returncode != 0 and "InvalidSignature" in run.stderr, run.stderr

    note.write_bytes(original_note)
    stranger = tmp_path / "stranger.pub"
    stranger.write_bytes(SigningKey.of(Ed25519PrivateKey.generate()).public_pem())
    run = run_snippet("verify-checkpoint", tmp_path, note, stranger, log.path)
    assert run.returncode != 0 and "no signature by conductor-" in run.stderr, run.stderr


def test_checkpoint_example_in_the_doc_verifies(tmp_path: Path) -> None:
    note = (block("checkpoint-example") + "\n").encode("utf-8")
    public_pem = (block("checkpoint-example-key") + "\n").encode("ascii")
    trust = TrustStore()
    trust.add(load_public_key(public_pem))
    checkpoint, _ = verify_note(note, trust, source="docs/provenance.md")
    assert (checkpoint.origin, checkpoint.size, checkpoint.seq) == (
        "conductor.dev/audit/plan_20261122-hello/fork_minimal", 42, 3)
    # The example is what checkpoint_body + sign_note produce for the documented example key (Ed25519 is deterministic).
    key = SigningKey.of(Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"conductor docs example key").digest()))
    assert key.public_pem() == public_pem
    body = checkpoint_body(checkpoint.origin, 42, "sha256:" + hashlib.sha256(b"entry 41").hexdigest(), 3,
                           note_digest(b"checkpoint 2"))
    assert sign_note(body, key) == note
    (tmp_path / "example.note").write_bytes(note)
    (tmp_path / "example.pub").write_bytes(public_pem)
    run = run_snippet("verify-checkpoint", tmp_path, tmp_path / "example.note", tmp_path / "example.pub")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("OK conductor.dev/audit/plan_20261122-hello/fork_minimal 42 entries")
