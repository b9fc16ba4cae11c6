"""Signed checkpoints of an audit log: format, writing, and every tampering the verifier must name."""

from __future__ import annotations

import base64
import hashlib
import json
import multiprocessing
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from conductor.audit import AuditLog
from conductor.checkpoint import (
    audit_origin,
    checkpoint_body,
    note_digest,
    note_files,
    note_key_hash,
    note_key_name,
    parse_checkpoint,
    parse_note,
    verify_checkpoints,
    verify_note,
    write_checkpoint,
)
from conductor.errors import AuditChainError, InvalidDocument, SignatureError
from conductor.keys import SigningKey, TrustStore, generate_signing_key, load_signing_key, raw_public_bytes
from conductor.layout import ProjectLayout

ORIGIN = audit_origin("20260101-hello", "fork_minimal")


class Setup:
    def __init__(self, tmp_path: Path):
        layout = ProjectLayout(tmp_path)
        self.key = generate_signing_key(layout.keys_dir)
        self.trust = TrustStore()
        self.trust.add(self.key.public_key)
        self.log_path = layout.fork("20260101-hello", "minimal").audit_log
        self.log = AuditLog(self.log_path, clock=lambda: "2026-01-01T00:00:00.000000Z")
        self.dir = layout.checkpoint_dir("20260101-hello", "fork_minimal")
        self.witness = tmp_path / "home" / "witness.json"

    def append(self, n: int, tag: str = "a") -> None:
        for _ in range(n):
            self.log.append("task.published", {"step_id": f"step_{tag}", "attempt": 1})

    def checkpoint(self, key: SigningKey | None = None):
        return write_checkpoint(self.log_path, self.dir, origin=ORIGIN, key=key or self.key)

    def verify(self, *, witness: bool = False, trust: TrustStore | None = None):
        return verify_checkpoints(self.log_path, self.dir, origin=ORIGIN, trust=trust or self.trust,
                                  witness=self.witness if witness else None)

    def note(self, n: int) -> Path:
        return self.dir / f"{n:06d}.note"


@pytest.fixture
def s(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


def _only(findings: list[str], needle: str) -> str:
    matching = [f for f in findings if needle in f]
    assert matching, f"no finding containing {needle!r} in {findings}"
    return matching[0]


# --- format -------------------------------------------------------------------------------------


def test_checkpoint_is_a_signed_note_with_tlog_body(s: Setup) -> None:
    s.append(3)
    first = s.checkpoint()
    assert first is not None and first.path == s.note(1)
    s.append(2)
    second = s.checkpoint()
    assert second is not None
    events = s.log.events()
    text = s.note(2).read_text("utf-8")
    body, _, signature_block = text.rpartition("\n\n")
    head_b64 = base64.b64encode(bytes.fromhex(events[-1].hash.removeprefix("sha256:"))).decode()
    prev = base64.b64encode(hashlib.sha256(s.note(1).read_bytes()).digest()).decode()
    assert body.split("\n") == [ORIGIN, "5", head_b64, "seq 2", f"prev {prev}"]
    assert "prev" not in s.note(1).read_text("utf-8")
    name = f"conductor-{s.key.key_id[:16]}"
    assert name == note_key_name(s.key.key_id)
    dash, line_name, blob_b64 = signature_block.rstrip("\n").split(" ")
    assert (dash, line_name) == ("\u2014", name)
    blob = base64.b64decode(blob_b64)
    raw = raw_public_bytes(s.key.public_key)
    assert blob[:4] == hashlib.sha256(name.encode() + b"\n\x01" + raw).digest()[:4] == note_key_hash(name, raw)
    s.key.public_key.verify(blob[4:], (body + "\n").encode())  # signs the text incl. its final newline
    assert second.size == 5 and second.seq == 2 and second.head == events[-1].hash and second.prev == prev


def test_parse_round_trip_and_malformed_notes(s: Setup) -> None:
    s.append(2)
    checkpoint = s.checkpoint()
    assert checkpoint is not None
    parsed = parse_checkpoint(s.note(1).read_bytes(), source="n")
    assert (parsed.origin, parsed.size, parsed.head, parsed.seq, parsed.prev) == (
        ORIGIN, 2, checkpoint.head, 1, None)
    good = checkpoint_body(ORIGIN, 2, checkpoint.head, 1, None)
    bad_notes = {
        b"no signatures\n": "not a signed note",
        good + b"\n": "no signature lines",
        good + b"\nnot a signature\n": "malformed signature line",
        good + b"\n\xe2\x80\x94 name !!!\n": "not standard base64",
        good.replace(b"\n2\n", b"\n02\n") + b"\n\xe2\x80\x94 k AAAAAAA=\n": "is not a positive decimal",
        good.replace(b"seq 1", b"sequence 1") + b"\n\xe2\x80\x94 k AAAAAAA=\n": "unknown checkpoint line",
        good + b"\t\n\n\xe2\x80\x94 k AAAAAAA=\n": "control character",
        b"\xff\n\n": "not UTF-8",
    }
    for data, message in bad_notes.items():
        with pytest.raises(InvalidDocument, match=message):
            parse_checkpoint(data, source="n")
    body, signatures = parse_note(s.note(1).read_bytes(), source="n")
    assert body == good and len(signatures) == 1 and len(signatures[0].signature) == 64


def test_checkpoint_body_refuses_bad_values() -> None:
    head = "sha256:" + "ab" * 32
    for origin, size, head_value, seq in [("has space", 1, head, 1), ("a+b", 1, head, 1), ("", 1, head, 1),
                                          ("o", 0, head, 1), ("o", 1, head, 0), ("o", 1, "ab" * 32, 1)]:
        with pytest.raises(InvalidDocument):
            checkpoint_body(origin, size, head_value, seq, None)


def test_verify_note_returns_signer(s: Setup) -> None:
    s.append(1)
    s.checkpoint()
    checkpoint, signer = verify_note(s.note(1).read_bytes(), s.trust, source="n")
    assert signer == s.key.key_id and checkpoint.size == 1


# --- writing ------------------------------------------------------------------------------------


def test_nothing_new_means_no_checkpoint(s: Setup) -> None:
    assert s.checkpoint() is None  # no log yet
    assert not note_files(s.dir)
    s.append(2)
    assert s.checkpoint() is not None
    assert s.checkpoint() is None
    s.append(1)
    third = s.checkpoint()
    assert third is not None and third.seq == 2
    assert [n for n, _ in note_files(s.dir)] == [1, 2]


def test_writer_refuses_broken_truncated_or_rewritten_logs(s: Setup, tmp_path: Path) -> None:
    s.append(3)
    s.checkpoint()
    lines = s.log_path.read_bytes().splitlines(keepends=True)
    s.log_path.write_bytes(b"".join(lines[:2]))
    with pytest.raises(AuditChainError, match=r"2 entries, but 000001\.note covers 3 \(tail truncated\)"):
        s.checkpoint()
    _swap_in_fresh_chain(s, tmp_path, 4)
    with pytest.raises(AuditChainError, match=r"entry 2 differs from the head signed in 000001\.note \(rewritten\)"):
        s.checkpoint()
    s.log_path.write_bytes(b"".join(lines) + b'{"torn"')
    with pytest.raises(AuditChainError, match="torn"):
        s.checkpoint()
    assert [n for n, _ in note_files(s.dir)] == [1]


def _write_concurrently(args: tuple[str, str, str]) -> int | None:
    log_path, checkpoint_dir, key_path = args
    checkpoint = write_checkpoint(Path(log_path), Path(checkpoint_dir), origin=ORIGIN,
                                  key=load_signing_key(Path(key_path)))
    return None if checkpoint is None else checkpoint.seq


def test_concurrent_writers_make_one_checkpoint(s: Setup, tmp_path: Path) -> None:
    s.append(4)
    args = (str(s.log_path), str(s.dir), str(tmp_path / ".conductor" / "keys" / "signing.key"))
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        results = pool.map(_write_concurrently, [args] * 4, chunksize=1)
    assert sorted(results, key=lambda r: r or 0) == [None, None, None, 1]
    assert [n for n, _ in note_files(s.dir)] == [1]
    assert s.verify().ok


# --- verifying ----------------------------------------------------------------------------------


def test_good_path(s: Setup) -> None:
    s.append(2)
    s.checkpoint()
    s.append(3)
    s.checkpoint()
    s.append(1)  # written after the newest checkpoint: reported, not a finding
    report = s.verify(witness=True)
    assert report.ok, report.findings
    assert (report.covered, report.uncovered, report.checkpoints, report.entries) == (5, 1, 2, 6)
    recorded = json.loads(s.witness.read_text("utf-8"))
    assert recorded == {ORIGIN: {"size": 5, "head": s.log.events()[4].hash, "seq": 2}}
    assert s.verify(witness=True).ok  # the witness agrees with itself


def test_no_checkpoints_yet_is_ok(s: Setup) -> None:
    s.append(2)
    report = s.verify(witness=True)
    assert report.ok and (report.covered, report.uncovered) == (0, 2)
    assert not s.witness.exists()


def test_bad_signature(s: Setup) -> None:
    s.append(2)
    s.checkpoint()
    data = s.note(1).read_bytes()
    body, _, line = data.rstrip(b"\n").rpartition(b"\n")
    dash, name, blob = line.split(b" ")
    raw = bytearray(base64.b64decode(blob))
    raw[10] ^= 0x01  # inside the Ed25519 signature, past the 4-byte key hash
    s.note(1).write_bytes(body + b"\n" + b" ".join([dash, name, base64.b64encode(bytes(raw))]) + b"\n")
    report = s.verify()
    assert not report.ok
    assert _only(report.findings, "bad signature") == f"checkpoint 000001.note: bad signature by key {name.decode()}"
    assert report.covered == 0


def test_untrusted_key(s: Setup) -> None:
    s.append(2)
    stranger = SigningKey.of(Ed25519PrivateKey.generate())
    s.checkpoint(key=stranger)
    report = s.verify()
    name = note_key_name(stranger.key_id)
    assert _only(report.findings, "unknown") == f"checkpoint 000001.note: signed by an unknown or untrusted key ({name})"
    with pytest.raises(SignatureError, match="unknown or untrusted key"):
        verify_note(s.note(1).read_bytes(), s.trust, source="n")


def test_key_trusted_only_for_some_executors_cannot_sign_checkpoints(s: Setup) -> None:
    s.append(1)
    worker = SigningKey.of(Ed25519PrivateKey.generate())
    s.checkpoint(key=worker)
    trust = TrustStore()
    trust.add(worker.public_key, ["conductor-worker@*"])
    report = s.verify(trust=trust)
    assert _only(report.findings, "trusted only") == (
        f"checkpoint 000001.note: signed by key {note_key_name(worker.key_id)}, which is trusted only for some "
        "executors, not to sign checkpoints"
    )


def test_truncated_tail(s: Setup) -> None:
    s.append(5)
    s.checkpoint()
    lines = s.log_path.read_bytes().splitlines(keepends=True)
    s.log_path.write_bytes(b"".join(lines[:3]))  # still a valid chain
    report = s.verify()
    assert not report.ok
    assert _only(report.findings, "truncated") == (
        f"audit log truncated: checkpoint 000001.note covers 5 entries, but {s.log_path} has 3"
    )
    assert not [f for f in report.findings if f.startswith("audit log:")]  # the chain itself is fine
    s.log_path.unlink()
    assert _only(s.verify().findings, "truncated").endswith(f"but {s.log_path} has 0")


def _swap_in_fresh_chain(s: Setup, tmp_path: Path, entries: int) -> None:
    other = AuditLog(tmp_path / "forged" / "audit.log", clock=lambda: "2026-02-02T00:00:00.000000Z")
    for index in range(entries):
        other.append("task.published", {"step_id": f"forged_{index}", "attempt": 1})
    s.log_path.write_bytes(other.path.read_bytes())


def test_fresh_chain_rewrite(s: Setup, tmp_path: Path) -> None:
    s.append(5)
    checkpoint = s.checkpoint()
    assert checkpoint is not None
    _swap_in_fresh_chain(s, tmp_path, 7)
    report = s.verify()
    assert not report.ok
    forged = s.log.events()[4].hash
    assert _only(report.findings, "rewritten") == (
        f"audit log rewritten: entry 4 has hash {forged}, but checkpoint 000001.note signed head {checkpoint.head}"
    )
    assert not [f for f in report.findings if f.startswith("audit log:")]  # a valid chain, just not ours


def test_deleted_newest_checkpoint_detected_by_witness(s: Setup) -> None:
    for _ in range(3):
        s.append(2)
        s.checkpoint()
    assert s.verify(witness=True).ok
    s.note(3).unlink()
    report = s.verify(witness=True)
    assert not report.ok
    assert _only(report.findings, "rolled back") == (
        "checkpoints rolled back: the witness saw seq 3 covering 6 entries, but the newest now is "
        "000002.note (seq 2, 4 entries)"
    )
    assert json.loads(s.witness.read_text("utf-8"))[ORIGIN]["seq"] == 3  # not lowered by a failed check
    assert s.verify().ok  # without the witness the deletion is invisible: that is what the witness is for


def test_all_checkpoints_deleted_detected_by_witness(s: Setup) -> None:
    s.append(2)
    s.checkpoint()
    assert s.verify(witness=True).ok
    s.note(1).unlink()
    report = s.verify(witness=True)
    assert _only(report.findings, "rolled back").endswith("but the newest now is no checkpoint")


def test_newest_replaced_by_an_older_checkpoint(s: Setup) -> None:
    for _ in range(3):
        s.append(2)
        s.checkpoint()
    s.note(3).write_bytes(s.note(2).read_bytes())  # an attacker republishes an older signed checkpoint
    report = s.verify()
    assert not report.ok
    assert _only(report.findings, "says seq") == "checkpoint 000003.note: says seq 2 (a copy of another checkpoint?)"
    assert _only(report.findings, "prev link") == (
        "checkpoint 000003.note: broken prev link: prev is not the digest of 000002.note (replaced or reordered?)"
    )


def test_newest_replaced_seen_by_witness(s: Setup, tmp_path: Path) -> None:
    s.append(2)
    s.checkpoint()
    assert s.verify(witness=True).ok
    # A different log of the same size, checkpointed afresh: every file is consistent, only the witness knows.
    _swap_in_fresh_chain(s, tmp_path, 2)
    s.note(1).unlink()
    s.checkpoint()
    assert s.verify().ok
    report = s.verify(witness=True)
    assert _only(report.findings, "witness recorded").startswith(
        "checkpoint 000001.note differs from what the witness recorded (size 2, head sha256:"
    )


def test_smaller_checkpoint_after_a_larger_one_is_rolled_back(s: Setup) -> None:
    s.append(4)
    s.checkpoint()
    # A correctly signed and linked second checkpoint covering fewer entries (written by a buggy or
    # hostile writer; write_checkpoint itself refuses).
    events = s.log.events()
    body = checkpoint_body(ORIGIN, 2, events[1].hash, 2, note_digest(s.note(1).read_bytes()))
    from conductor.checkpoint import sign_note

    s.note(2).write_bytes(sign_note(body, s.key))
    report = s.verify()
    assert _only(report.findings, "rolled back") == (
        "checkpoint 000002.note: rolled back: covers 2 entries, fewer than 000001.note (4)"
    )


def test_checkpoint_gap(s: Setup) -> None:
    for _ in range(3):
        s.append(1)
        s.checkpoint()
    s.note(2).unlink()
    report = s.verify()
    assert not report.ok
    assert _only(report.findings, "gap") == "checkpoint sequence gap: 000002.note is missing (deleted?)"
    assert report.covered == 3  # the newest checkpoint still verifies and matches the log


def test_first_checkpoint_with_prev_and_missing_prev(s: Setup) -> None:
    s.append(2)
    s.checkpoint()
    s.append(1)
    s.checkpoint()
    s.note(1).unlink()
    report = s.verify()
    assert _only(report.findings, "gap") == "checkpoint sequence gap: 000001.note is missing (deleted?)"
    s.note(2).rename(s.note(1))  # renumbered to hide the deletion
    report = s.verify()
    assert "checkpoint 000001.note: says seq 2 (a copy of another checkpoint?)" in report.findings
    assert _only(report.findings, "has a prev line")


def test_wrong_origin_and_malformed_checkpoint(s: Setup) -> None:
    s.append(1)
    write_checkpoint(s.log_path, s.dir, origin="conductor.dev/audit/plan_x/plan", key=s.key)
    report = s.verify()
    assert _only(report.findings, "origin") == (
        f"checkpoint 000001.note: origin 'conductor.dev/audit/plan_x/plan', expected '{ORIGIN}'"
    )
    s.note(1).write_bytes(b"garbage\n")
    report = s.verify()
    assert _only(report.findings, "malformed").startswith("checkpoint 000001.note: not a signed note")


def test_broken_chain_is_a_finding(s: Setup) -> None:
    s.append(3)
    s.checkpoint()
    lines = s.log_path.read_bytes().splitlines(keepends=True)
    s.log_path.write_bytes(lines[0] + lines[2])
    report = s.verify()
    assert _only(report.findings, "audit log: line 2")


def test_malformed_witness_is_a_finding_and_left_alone(s: Setup) -> None:
    s.append(1)
    s.checkpoint()
    s.witness.parent.mkdir(parents=True, exist_ok=True)
    s.witness.write_text('{"x": 1}', encoding="utf-8")
    report = s.verify(witness=True)
    assert _only(report.findings, "witness").startswith(f"witness {s.witness}: ")
    assert s.witness.read_text("utf-8") == '{"x": 1}'


def test_witness_keeps_other_origins(s: Setup) -> None:
    s.witness.parent.mkdir(parents=True, exist_ok=True)
    other = {"conductor.dev/audit/plan_other/plan": {"size": 9, "head": "sha256:" + "0" * 64, "seq": 4}}
    s.witness.write_text(json.dumps(other), encoding="utf-8")
    s.append(1)
    s.checkpoint()
    assert s.verify(witness=True).ok
    assert set(json.loads(s.witness.read_text("utf-8"))) == {*other, ORIGIN}
