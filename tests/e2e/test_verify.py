"""`conductor verify` on a real plan: clean, then one tamper case at a time, each named specifically.

One plan is run once per module; every test works on its own copy of the project.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from conductor.audit import AuditLog
from conductor.dsse import envelope_bytes, sign_envelope
from conductor.keys import generate_signing_key
from conductor.layout import ProjectLayout
from tests.e2e.project import conductor, make_project
from tests.e2e.test_handoff_and_errors import FIX, write_plan

DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = make_project(tmp_path_factory.mktemp("verify") / "proj")
    plan = write_plan(root, [
        {"id": "fix", "instruction": FIX, "allowed_files": ["calc.py"], "confidence": 0.9},
        {"id": "notes", "instruction": "echo 'add uses +' > NOTES.md", "allowed_files": ["NOTES.md"],
         "depends_on": ["fix"], "confidence": 0.9},
    ])
    run = conductor(root, "build", "--plan", str(plan), "--executor", "command",
                    "--command", 'sh -c "$CONDUCTOR_INSTRUCTION"', "--json")
    assert run.returncode == 0, run.stderr
    return root, json.loads(run.stdout)["plan_id"]


@pytest.fixture
def project(finished: tuple[Path, str], tmp_path: Path) -> tuple[Path, str, ProjectLayout]:
    root, plan_id = finished
    copy = tmp_path / "proj"
    shutil.copytree(root, copy, symlinks=True)
    return copy, plan_id, ProjectLayout(copy)


def verify(root: Path, tmp_path: Path) -> tuple[int, list[str]]:
    run = conductor(root, "verify", "--json", "--witness", str(tmp_path / "witness.json"))
    report = json.loads(run.stdout)
    return run.returncode, [f"{f['where']}: {f['problem']}" for f in report["findings"]]


def _one(findings: list[str], *needles: str) -> str:
    hits = [f for f in findings if all(n in f for n in needles)]
    assert hits, f"no finding with {needles} in {findings}"
    return hits[0]


def test_a_finished_plan_verifies(project, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root, _, _ = project
    run = conductor(root, "verify", "--json", "--witness", str(tmp_path / "w.json"))
    assert run.returncode == 0, run.stdout
    report = json.loads(run.stdout)
    assert report["ok"] and report["findings"] == []
    checked = report["checked"]
    assert checked["tasks"] == 2 and checked["provenance"] == 2 and checked["attestations"] == 2
    assert checked["logs"] == 2 and checked["checkpoints"] >= 2
    human = conductor(root, "verify", "--witness", str(tmp_path / "w.json"))
    assert human.returncode == 0 and human.stdout.startswith("ok — checked")


def test_edited_deleted_and_duplicated_audit_lines(project, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root, plan_id, layout = project
    log = layout.fork(plan_id, "1").audit_log
    lines = log.read_bytes().splitlines(keepends=True)
    n = next(i for i, line in enumerate(lines) if b'"attempt":1' in line)
    log.write_bytes(b"".join(lines[:n] + [lines[n].replace(b'"attempt":1', b'"attempt":2')] + lines[n + 1:]))
    code, findings = verify(root, tmp_path)
    assert code == 5
    _one(findings, "fork_1/audit.log", f"line {n + 1}: hash mismatch")

    log.write_bytes(b"".join(lines[:3] + lines[4:]))
    _one(verify(root, tmp_path)[1], "line 4: seq 4 follows 2 (entries deleted or reordered)")

    log.write_bytes(b"".join(lines[:4] + [lines[3]] + lines[4:]))
    _one(verify(root, tmp_path)[1], "line 5: duplicate of line 4")


def test_truncated_tail_is_named_by_the_checkpoint(project, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root, plan_id, layout = project
    log = layout.fork(plan_id, "1").audit_log
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(b"".join(lines[:-3]))
    code, findings = verify(root, tmp_path)
    assert code == 5
    _one(findings, "fork_1/audit.log", "truncated")


def test_a_log_rewritten_with_a_fresh_chain(project, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root, plan_id, layout = project
    log_path = layout.fork(plan_id, "1").audit_log
    events = AuditLog(log_path).events()
    fresh = tmp_path / "fresh.log"
    for event in events:  # the same story with one verdict flipped, as a valid new chain
        data = dict(event.data)
        if event.type == "step.verified":
            data["reasons"] = ["forged"]
        AuditLog(fresh).append(event.type, data)
    shutil.copyfile(fresh, log_path)
    code, findings = verify(root, tmp_path)
    assert code == 5
    _one(findings, "fork_1/audit.log", "rewritten")


def test_a_rolled_back_checkpoint_is_caught_by_the_witness(project, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root, plan_id, layout = project
    assert verify(root, tmp_path) == (0, [])  # the witness now remembers the newest checkpoints
    notes = sorted(layout.checkpoint_dir(plan_id, "fork_1").glob("*.note"))
    assert len(notes) >= 2
    newest = notes[-1]
    size = int(newest.read_text().splitlines()[1])
    older = int(notes[-2].read_text().splitlines()[1])
    newest.unlink()  # roll back: drop the newest checkpoint and the entries only it covered
    log = layout.fork(plan_id, "1").audit_log
    log.write_bytes(b"".join(log.read_bytes().splitlines(keepends=True)[:older]))
    assert older < size
    code, findings = verify(root, tmp_path)
    assert code == 5
    _one(findings, "fork_1/audit.log", "roll")


def test_bad_signature_on_provenance(project, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root, plan_id, layout = project
    path = layout.fork(plan_id, "1").sidecar("completed", "step_001", ".provenance.json")
    envelope = json.loads(path.read_text())
    signature = bytearray(base64.b64decode(envelope["signatures"][0]["sig"]))
    signature[0] ^= 1
    envelope["signatures"][0]["sig"] = base64.b64encode(bytes(signature)).decode()
    path.write_text(json.dumps(envelope))
    code, findings = verify(root, tmp_path)
    assert code == 5
    _one(findings, "step_001.provenance.json", "bad signature by key")


def _notes_object(root: Path, layout: ProjectLayout, plan_id: str) -> Path:
    """The loose object file in .conductor/git holding step_002's NOTES.md."""
    from conductor.attempts import state_store

    verdict = json.loads(layout.fork(plan_id, "1").sidecar("completed", "step_002", ".verdict.json").read_text())
    oid = state_store(layout).entries(verdict["tree"], ["NOTES.md"])["NOTES.md"].oid
    return root / ".conductor" / "git" / "objects" / oid[:2] / oid[2:]


def test_an_overwritten_object_of_an_attested_step_is_caught(project, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root, plan_id, layout = project
    path = _notes_object(root, layout, plan_id)
    path.chmod(0o644)
    path.write_bytes(zlib.compress(b"blob 18\0edited afterwards\n"))  # well-formed, wrong content for its name
    code, findings = verify(root, tmp_path)
    assert code == 5
    _one(findings, "step_002.provenance.json", "subject NOTES.md: signed sha256")
    _one(findings, "step_002.attestation.json", "subject NOTES.md: signed sha256")
    _one(findings, "step_002.result.json", "NOTES.md: recorded added")


def test_a_deleted_object_of_an_attested_step_is_caught(project, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root, plan_id, layout = project
    _notes_object(root, layout, plan_id).unlink()
    code, findings = verify(root, tmp_path)
    assert code == 5
    _one(findings, "step_002.result.json", "cannot be read from .conductor/git")


def test_result_signed_by_an_untrusted_key(project, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root, plan_id, layout = project
    stranger = generate_signing_key(tmp_path / "stranger")
    config = layout.config_file
    text = config.read_text()
    config.write_text(text + f"trust:\n  keys:\n    - public_key: {tmp_path / 'stranger' / 'signing.pub'}\n"
                             "      executors: ['someone-else@*']\n")
    path = layout.fork(plan_id, "1").sidecar("completed", "step_001", ".provenance.json")
    payload = base64.b64decode(json.loads(path.read_text())["payload"])
    path.write_bytes(envelope_bytes(sign_envelope(payload, "application/vnd.in-toto+json", [stranger])))
    code, findings = verify(root, tmp_path)
    assert code == 5
    _one(findings, "step_001.provenance.json", f"signed by key {stranger.key_id}", "not trusted for executor")


def test_tampered_task_and_attestation(project, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root, plan_id, layout = project
    fork = layout.fork(plan_id, "1")
    task = fork.task_file("completed", "step_001")
    task.write_text(task.read_text().replace('"attempt": 1', '"attempt": 7'))
    verdict = fork.sidecar("completed", "step_002", ".verdict.json")
    verdict.write_text(verdict.read_text().replace('"diff_lines": 1', '"diff_lines": 0'))
    code, findings = verify(root, tmp_path)
    assert code == 5
    _one(findings, "completed/step_001.task.json", "checksum")
    _one(findings, "step_002.verdict.json", "checksum")
    _one(findings, "step_002.attestation.json", "subject step_002.verdict.json: signed sha256")


def test_docs_snippet_verifies_a_real_provenance(project, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """docs/provenance.md's standalone verifier (no Conductor import) accepts a real step's provenance
    and attestation and refuses them once a file changed."""
    root, plan_id, layout = project
    from tests.test_provenance_doc import block  # the doc's code block, as its own tests extract it

    script = tmp_path / "verify_provenance.py"
    script.write_text(block("verify-provenance") + "\n")
    fork = layout.fork(plan_id, "1")
    workspace = tmp_path / "after_step_002"
    assert conductor(root, "checkout", "step_002", "--into", str(workspace)).returncode == 0
    key = layout.keys_dir / "signing.pub"
    for name in ("step_002.provenance.json", "step_002.attestation.json"):
        ok = subprocess.run([sys.executable, str(script), str(fork.state_dir("completed") / name), str(key),
                             str(workspace)], capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0, ok.stderr
    (workspace / "NOTES.md").write_text("changed\n")
    bad = subprocess.run([sys.executable, str(script), str(fork.state_dir("completed") / "step_002.provenance.json"),
                          str(key), str(workspace)], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0


def test_verify_names_an_unknown_plan(project) -> None:  # type: ignore[no-untyped-def]
    root, _, _ = project
    run = conductor(root, "verify", "--plan-id", "nope")
    assert run.returncode == 9 and "no plan 'nope'" in run.stderr


def test_a_task_moved_from_completed_to_failed_is_named(project, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root, plan_id, layout = project
    fork = layout.fork(plan_id, "1")
    fork.task_file("completed", "step_002").rename(fork.task_file("failed", "step_002"))
    code, findings = verify(root, tmp_path)
    assert code == 5
    _one(findings, "failed/step_002.task.json", "merged (step.merged)", "the task file is in failed/")


def test_a_whole_plan_deleted_with_its_checkpoints_is_named_by_the_witness(project, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root, plan_id, layout = project
    code, findings = verify(root, tmp_path)  # the witness (outside the project) learns this project's logs
    assert code == 0, findings
    shutil.rmtree(layout.plan_dir(plan_id))
    shutil.rmtree(layout.conductor_dir / "checkpoints" / f"plan_{plan_id}")
    code, findings = verify(root, tmp_path)
    assert code == 5
    _one(findings, f"plan_{plan_id}/fork_1", "the witness saw", f"plan {plan_id} is gone")


def test_checkout_refuses_a_commit_whose_object_was_altered(project, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root, plan_id, layout = project
    path = _notes_object(root, layout, plan_id)
    path.chmod(0o644)
    path.write_bytes(zlib.compress(b"blob 18\0edited afterwards\n"))
    target = tmp_path / "out"
    run = conductor(root, "checkout", "step_002", "--into", str(target))
    assert run.returncode == 5 and "do not hash to their names" in run.stderr and "NOTES.md" in run.stderr
    assert not target.exists()
    forked = conductor(root, "fork", "--from", "step_002", "--executor", "command", "--command", "true")
    assert forked.returncode == 5 and "do not hash to their names" in forked.stderr
