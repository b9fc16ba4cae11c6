"""Signed checkpoints of an audit log: they catch a truncated tail and a log rewritten with a fresh chain.

A hash chain (``conductor.audit``) shows an edited, deleted or reordered line, but not a tail cut off
nor a whole log replaced by another valid chain. A checkpoint records the log's size and head hash,
signed with the project key and kept where executors do not write
(``ProjectLayout.checkpoint_dir(plan_id, label)``), so a verifier can tell.

Format: a C2SP signed note (https://github.com/C2SP/C2SP/blob/main/signed-note.md) whose text follows
tlog-checkpoint (https://github.com/C2SP/C2SP/blob/main/tlog-checkpoint.md)::

    conductor.dev/audit/plan_<id>/fork_<id>        origin
    42                                             entries in the log (decimal)
    <base64 of the 32-byte SHA-256 head hash>      the ``hash`` of the last entry
    seq 3                                          this checkpoint's number (1, 2, …)
    prev <base64 SHA-256 of checkpoint 2's note>   absent on the first
                                                   (blank line)
    — conductor-<16 hex of key id> <base64(4-byte key hash || 64-byte Ed25519 signature)>

The signature covers the text up to and including its final newline. Key hash = first 4 bytes of
SHA-256(key name || 0x0A || 0x01 || 32-byte public key), the signed-note rule for Ed25519. The head is
the SHA-256 of the last entry, not a Merkle root: consistency between two checkpoints is checked by
re-reading the log, which Conductor always has. Checkpoint ``n`` is the file ``<dir>/<n:06d>.note``,
published with ``os.link`` (never overwritten).

A *witness* file (``{origin: {"size", "head", "seq"}}``) lets a verifier remember the newest checkpoint
it has verified, so deleting or replacing the newest checkpoints is noticed too.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import filelock
from cryptography.exceptions import InvalidSignature

from conductor.audit import AuditLog, verify_chain
from conductor.canonical import pretty_bytes, strict_loads
from conductor.errors import AuditChainError, ConductorError, InvalidDocument, SignatureError, StateConflict
from conductor.fsutil import atomic_write, publish_exclusive
from conductor.keys import CONDUCTOR_SIGNER, SigningKey, TrustStore, raw_public_bytes

NOTE_SUFFIX = ".note"
ORIGIN_PREFIX = "conductor.dev/audit"
LOCK_TIMEOUT_SECONDS = 60.0
MAX_SIGNATURES = 64  # signed-note: verifiers MUST accept at least 16
ED25519_TYPE = b"\x01"
EM_DASH = "\u2014"
_NOTE_FILE = re.compile(r"^([0-9]{6,})\.note$")
_DECIMAL = re.compile(r"^(0|[1-9][0-9]*)$")
_HASH_PREFIX = "sha256:"


def audit_origin(plan_id: str, log_label: str) -> str:
    """The checkpoint origin of an audit log: ``conductor.dev/audit/plan_<id>/<plan|fork_<id>>``."""
    return f"{ORIGIN_PREFIX}/plan_{plan_id}/{log_label}"


def note_key_name(key_id: str) -> str:
    """The signed-note key name of a key: ``conductor-<first 16 hex of its key id>``."""
    return f"conductor-{key_id[:16]}"


def note_key_hash(name: str, public_bytes: bytes) -> bytes:
    """Signed-note key hash for Ed25519: SHA-256(name || 0x0A || 0x01 || 32-byte public key)[:4]."""
    return hashlib.sha256(name.encode("utf-8") + b"\n" + ED25519_TYPE + public_bytes).digest()[:4]


def note_digest(note: bytes) -> str:
    """Standard base64 of the SHA-256 of a whole note (what the next checkpoint's ``prev`` holds)."""
    return base64.b64encode(hashlib.sha256(note).digest()).decode("ascii")


@dataclass(frozen=True)
class Checkpoint:
    """One parsed checkpoint.

    Attributes:
        origin: the log's identity (first line).
        size: entries covered.
        head: ``"sha256:<hex>"``, the ``hash`` of entry ``size - 1`` (as audit lines write it).
        seq: the checkpoint's number, 1-based.
        prev: :func:`note_digest` of checkpoint ``seq - 1``, None on the first.
        note: the note's full bytes.
        path: the file it was read from or written to, if any.
    """

    origin: str
    size: int
    head: str
    seq: int
    prev: str | None
    note: bytes
    path: Path | None = None


class NoteSignature(NamedTuple):
    """One signature line of a note: key name, 4-byte key hash, signature bytes."""

    name: str
    key_hash: bytes
    signature: bytes


# --- writing ------------------------------------------------------------------------------------


def checkpoint_body(origin: str, size: int, head: str, seq: int, prev: str | None) -> bytes:
    """The note text of a checkpoint (ends with ``\\n``); ``head`` is ``"sha256:<hex>"``.

    Raises:
        InvalidDocument: an origin that is empty or holds whitespace, control characters or ``+``,
            a size below 1, a seq below 1, or a head that is not ``sha256:`` and 64 hex characters.
    """
    if not origin or any(ch.isspace() or ch == "+" or ord(ch) < 0x20 for ch in origin):
        raise InvalidDocument(f"checkpoint origin {origin!r}: must be non-empty, without spaces or '+'")
    if size < 1 or seq < 1:
        raise InvalidDocument(f"checkpoint of {origin}: size {size} and seq {seq} must be positive")
    lines = [origin, str(size), _head_to_base64(head), f"seq {seq}"]
    if prev is not None:
        lines.append(f"prev {prev}")
    return ("\n".join(lines) + "\n").encode("utf-8")


def sign_note(body: bytes, key: SigningKey) -> bytes:
    """``body`` + blank line + one signature line by ``key`` (C2SP signed-note, Ed25519)."""
    name = note_key_name(key.key_id)
    blob = note_key_hash(name, raw_public_bytes(key.public_key)) + key.sign(body)
    return body + f"\n{EM_DASH} {name} {base64.b64encode(blob).decode('ascii')}\n".encode()


def write_checkpoint(
    log_path: Path,
    checkpoint_dir: Path,
    *,
    origin: str,
    key: SigningKey,
    lock_timeout: float = LOCK_TIMEOUT_SECONDS,
) -> Checkpoint | None:
    """Sign and publish a checkpoint of ``log_path`` if it grew since the newest checkpoint.

    Serialised across processes by a ``filelock`` on ``<checkpoint_dir>/.lock``. Before signing, the
    log must verify as a chain and must extend the newest checkpoint (at least its size, and the same
    hash at that position): a log is never signed in a state inconsistent with an earlier checkpoint.

    Args:
        log_path: the ``audit.log`` (a missing file counts as empty).
        checkpoint_dir: where ``000001.note``, ``000002.note``, … live (created if missing).
        origin: the log's identity, see :func:`audit_origin`.
        key: the signing key.
        lock_timeout: seconds to wait for the lock.

    Returns:
        The new checkpoint, or None when the log is empty or has as many entries as the newest checkpoint.

    Raises:
        AuditChainError: the log's chain is broken, or it is shorter than / diverges from the newest
            checkpoint (truncated or rewritten).
        InvalidDocument: the newest checkpoint file does not parse, or names another seq.
        StateConflict: the newest checkpoint has another origin, the lock stayed held too long, or the
            next file appeared meanwhile (someone wrote without the lock).
        OSError: a write failed.
    """
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    with _locked(checkpoint_dir / ".lock", lock_timeout):
        hashes = [event.hash for event in AuditLog(Path(log_path)).events()]
        newest = _newest_checkpoint(checkpoint_dir)
        if newest is None and not hashes:
            return None
        if newest is not None:
            _check_extends(newest, hashes, origin, log_path)
            if newest.size == len(hashes):
                return None
        seq = 1 if newest is None else newest.seq + 1
        prev = None if newest is None else note_digest(newest.note)
        note = sign_note(checkpoint_body(origin, len(hashes), hashes[-1], seq, prev), key)
        target = checkpoint_dir / f"{seq:06d}{NOTE_SUFFIX}"
        try:
            publish_exclusive(target, note)
        except FileExistsError as exc:
            raise StateConflict(f"{target}: appeared while the checkpoint lock was held") from exc
        return Checkpoint(origin=origin, size=len(hashes), head=hashes[-1], seq=seq, prev=prev, note=note, path=target)


def _newest_checkpoint(checkpoint_dir: Path) -> Checkpoint | None:
    files = note_files(checkpoint_dir)
    if not files:
        return None
    number, path = files[-1]
    checkpoint = parse_checkpoint(path.read_bytes(), source=str(path), path=path)
    if checkpoint.seq != number:
        raise InvalidDocument(f"{path}: says seq {checkpoint.seq}, not {number}")
    return checkpoint


def _check_extends(newest: Checkpoint, hashes: list[str], origin: str, log_path: Path) -> None:
    where = newest.path.name if newest.path else f"checkpoint {newest.seq}"
    if newest.origin != origin:
        raise StateConflict(f"{where}: origin {newest.origin!r}, not {origin!r}")
    if len(hashes) < newest.size:
        raise AuditChainError(f"{log_path}: {len(hashes)} entries, but {where} covers {newest.size} (tail truncated)")
    if hashes[newest.size - 1] != newest.head:
        raise AuditChainError(f"{log_path}: entry {newest.size - 1} differs from the head signed in {where} (rewritten)")


@contextmanager
def _locked(lock_path: Path, timeout: float) -> Iterator[None]:
    lock = filelock.FileLock(str(lock_path), timeout=timeout)
    try:
        lock.acquire()
    except filelock.Timeout as exc:
        raise StateConflict(f"{lock_path}: held too long by another process") from exc
    try:
        yield
    finally:
        lock.release()


# --- reading ------------------------------------------------------------------------------------


def note_files(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    """``(number, path)`` of every ``<n>.note`` file in ``checkpoint_dir``, by number ([] if no folder)."""
    if not Path(checkpoint_dir).is_dir():
        return []
    found = []
    for path in Path(checkpoint_dir).iterdir():
        match = _NOTE_FILE.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def parse_note(data: bytes, *, source: str) -> tuple[bytes, list[NoteSignature]]:
    """Split a signed note into its text and signature lines (C2SP signed-note), without verifying.

    Raises:
        InvalidDocument: not UTF-8, a control character other than newline, no final newline, no blank
            line before the signatures, a malformed signature line, or more than :data:`MAX_SIGNATURES`.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidDocument(f"{source}: not UTF-8") from exc
    if any(ord(ch) < 0x20 and ch != "\n" for ch in text):
        raise InvalidDocument(f"{source}: control character in note")
    cut = text.rfind("\n\n")
    if not text.endswith("\n") or cut < 0:
        raise InvalidDocument(f"{source}: not a signed note (text, blank line, signature lines)")
    lines = text[cut + 2 :].split("\n")[:-1]
    if not lines:
        raise InvalidDocument(f"{source}: no signature lines")
    if len(lines) > MAX_SIGNATURES:
        raise InvalidDocument(f"{source}: {len(lines)} signatures, more than {MAX_SIGNATURES}")
    return text[: cut + 1].encode("utf-8"), [_signature_line(line, source) for line in lines]


def _signature_line(line: str, source: str) -> NoteSignature:
    parts = line.split(" ")
    if len(parts) != 3 or parts[0] != EM_DASH or not parts[1] or "+" in parts[1]:
        raise InvalidDocument(f"{source}: malformed signature line {line[:80]!r}")
    blob = _strict_base64(parts[2], f"{source}: signature of {parts[1]}")
    if len(blob) < 5:
        raise InvalidDocument(f"{source}: signature of {parts[1]} is too short")
    return NoteSignature(name=parts[1], key_hash=blob[:4], signature=blob[4:])


def parse_checkpoint(data: bytes, *, source: str, path: Path | None = None) -> Checkpoint:
    """Parse a checkpoint note (text and signature lines) without verifying its signatures.

    Raises:
        InvalidDocument: the note or its text is malformed: fewer than three lines, an empty line, a
            size that is not a positive decimal without leading zeros, a head that is not base64 of 32
            bytes, a missing or repeated ``seq``, a repeated or malformed ``prev``, an unknown line.
    """
    body, _ = parse_note(data, source=source)
    lines = body.decode("utf-8")[:-1].split("\n")
    if len(lines) < 4 or not all(lines):
        raise InvalidDocument(f"{source}: checkpoint text needs origin, size, head and seq lines, none empty")
    origin, size_text, head_text, *extensions = lines
    if not _DECIMAL.match(size_text) or size_text == "0":
        raise InvalidDocument(f"{source}: size {size_text!r} is not a positive decimal")
    head = _strict_base64(head_text, f"{source}: head")
    if len(head) != 32:
        raise InvalidDocument(f"{source}: head is {len(head)} bytes, not 32")
    seq, prev = _extensions(extensions, source)
    return Checkpoint(origin=origin, size=int(size_text), head=_HASH_PREFIX + head.hex(), seq=seq, prev=prev,
                      note=data, path=path)


def _extensions(lines: list[str], source: str) -> tuple[int, str | None]:
    values: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(" ")
        if name not in ("seq", "prev") or not value:
            raise InvalidDocument(f"{source}: unknown checkpoint line {line[:80]!r}")
        if name in values:
            raise InvalidDocument(f"{source}: repeated {name!r} line")
        values[name] = value
    if "seq" not in values or not _DECIMAL.match(values["seq"]) or values["seq"] == "0":
        raise InvalidDocument(f"{source}: missing or bad 'seq' line")
    prev = values.get("prev")
    if prev is not None and len(_strict_base64(prev, f"{source}: prev")) != 32:
        raise InvalidDocument(f"{source}: prev is not base64 of 32 bytes")
    return int(values["seq"]), prev


def _strict_base64(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise InvalidDocument(f"{where}: not standard base64") from exc


def _head_to_base64(head: str) -> str:
    hex_part = head.removeprefix(_HASH_PREFIX)
    if not head.startswith(_HASH_PREFIX) or not re.fullmatch(r"[0-9a-f]{64}", hex_part):
        raise InvalidDocument(f"head {head!r}: not 'sha256:' and 64 lowercase hex characters")
    return base64.b64encode(bytes.fromhex(hex_part)).decode("ascii")


def verify_note(data: bytes, trust: TrustStore, *, source: str) -> tuple[Checkpoint, str]:
    """Parse a checkpoint and verify its signature (signed-note rules).

    Signatures whose (key name, key hash) match no key of ``trust`` are ignored; one from a known key
    that fails rejects the note; at least one known key must verify, and it must be trusted for every
    executor (``"*"``, as the project's own key is), since a checkpoint speaks for Conductor itself.

    Returns:
        The checkpoint and the key id that signed it.

    Raises:
        InvalidDocument: the note does not parse (see :func:`parse_checkpoint`).
        SignatureError: ``"<source>: bad signature by key <name>"``; ``"<source>: signed by key <name>,
            which is trusted only for some executors, not to sign checkpoints"``; ``"<source>: signed by
            an unknown or untrusted key (<names>)"``.
    """
    checkpoint = parse_checkpoint(data, source=source)
    body, signatures = parse_note(data, source=source)
    known = {}
    for entry in trust.entries():
        name = note_key_name(entry.key_id)
        known[(name, note_key_hash(name, raw_public_bytes(entry.public_key)))] = entry
    signer, scoped = None, []
    for signature in signatures:
        entry = known.get((signature.name, signature.key_hash))
        if entry is None:
            continue
        try:
            entry.public_key.verify(signature.signature, body)
        except InvalidSignature as exc:
            raise SignatureError(f"{source}: bad signature by key {signature.name}") from exc
        if trust.trusted_for(entry.key_id, CONDUCTOR_SIGNER):
            signer = signer or entry.key_id
        else:
            scoped.append(signature.name)
    if signer is not None:
        return checkpoint, signer
    if scoped:
        raise SignatureError(
            f"{source}: signed by key {scoped[0]}, which is trusted only for some executors, not to sign checkpoints"
        )
    names = ", ".join(signature.name for signature in signatures)
    raise SignatureError(f"{source}: signed by an unknown or untrusted key ({names})")


# --- verifying a log against its checkpoints ----------------------------------------------------


@dataclass(frozen=True)
class CheckpointReport:
    """What :func:`verify_checkpoints` found.

    Attributes:
        ok: True when there is no finding.
        findings: one message per problem (each names the checkpoint file or the log).
        covered: entries covered by the newest checkpoint that verifies and matches the log (0 if none).
        uncovered: entries after those (written since; not a finding by themselves).
        checkpoints: checkpoint files found.
        entries: complete lines in the log.
    """

    ok: bool
    findings: list[str] = field(default_factory=list)
    covered: int = 0
    uncovered: int = 0
    checkpoints: int = 0
    entries: int = 0


@dataclass
class _Loaded:
    number: int
    path: Path
    checkpoint: Checkpoint | None = None  # None: did not parse
    signed: bool = False  # the signature verified with a fully trusted key

    @property
    def name(self) -> str:
        return f"checkpoint {self.path.name}"


def verify_checkpoints(
    log_path: Path,
    checkpoint_dir: Path,
    *,
    origin: str,
    trust: TrustStore,
    witness: Path | None = None,
    project: str | None = None,
) -> CheckpointReport:
    """Check an audit log against its signed checkpoints (and, optionally, a witness file).

    Findings, each with its own message: a broken chain (``"audit log: …"``), a malformed checkpoint, a
    bad signature, a signature by an unknown or untrusted key, a wrong origin, a sequence gap, a
    checkpoint whose ``seq`` differs from its file number, a broken ``prev`` link, a checkpoint
    covering fewer entries than an earlier one (rolled back), a truncated tail (a checkpoint covers
    more entries than the log has), a rewritten log (the entry at a checkpoint's size has another
    hash than the signed head), and, with a witness, a rollback against what the witness saw before.

    When there is no finding and a witness is given, the witness is updated (atomically, under a
    file lock) to the newest checkpoint.

    Args:
        log_path: the ``audit.log``.
        checkpoint_dir: its checkpoint folder.
        origin: the expected origin (:func:`audit_origin`).
        trust: keys allowed to sign checkpoints (only those trusted for every executor count).
        witness: a JSON file outside the project, ``{origin: {"size", "head", "seq", "project"?}}``; created
            if missing.
        project: the project's id, recorded with the origin in the witness.

    Returns:
        A :class:`CheckpointReport`.
    """
    findings: list[str] = []
    hashes = _log_hashes(Path(log_path), findings)
    loaded = [_load(number, path, origin, trust, findings) for number, path in note_files(Path(checkpoint_dir))]
    _check_sequence(loaded, findings)
    _check_against_log(loaded, hashes, log_path, findings)
    valid = [item.checkpoint for item in loaded if item.signed and _matches_log(item.checkpoint, hashes)]
    newest_valid = valid[-1] if valid else None
    if witness is not None:
        _check_witness(Path(witness), origin, loaded, newest_valid, findings, project)
    covered = newest_valid.size if newest_valid else 0
    return CheckpointReport(ok=not findings, findings=findings, covered=covered,
                            uncovered=max(len(hashes) - covered, 0), checkpoints=len(loaded), entries=len(hashes))


def _log_hashes(log_path: Path, findings: list[str]) -> list[str | None]:
    """The recorded ``hash`` of every complete line (None where a line does not parse); chain problems."""
    if not log_path.exists():
        return []
    findings.extend(f"audit log: {problem}" for problem in verify_chain(log_path).problems)
    hashes: list[str | None] = []
    for line in log_path.read_bytes().split(b"\n")[:-1]:
        try:
            document = strict_loads(line, source="entry")
        except InvalidDocument:
            document = None
        value = document.get("hash") if isinstance(document, dict) else None
        hashes.append(value if isinstance(value, str) else None)
    return hashes


def _load(number: int, path: Path, origin: str, trust: TrustStore, findings: list[str]) -> _Loaded:
    item = _Loaded(number, path)
    data = path.read_bytes()
    try:
        item.checkpoint, _ = verify_note(data, trust, source=item.name)
        item.signed = True
    except SignatureError as exc:
        findings.append(str(exc))
        item.checkpoint = parse_checkpoint(data, source=item.name, path=path)  # parsed fine already
    except InvalidDocument as exc:
        findings.append(f"{exc} (malformed)")
        return item
    item.checkpoint = dataclasses.replace(item.checkpoint, path=path)
    if item.checkpoint.origin != origin:
        findings.append(f"{item.name}: origin {item.checkpoint.origin!r}, expected {origin!r}")
        item.signed = False
    return item


def _check_sequence(loaded: list[_Loaded], findings: list[str]) -> None:
    present = {item.number: item for item in loaded}
    last = max(present, default=0)
    for missing in sorted(set(range(1, last + 1)) - set(present)):
        findings.append(f"checkpoint sequence gap: {missing:06d}{NOTE_SUFFIX} is missing (deleted?)")
    biggest: tuple[int, str] | None = None  # (size, file name) of the largest earlier checkpoint
    for item in loaded:
        checkpoint = item.checkpoint
        if checkpoint is None:
            continue
        if checkpoint.seq != item.number:
            findings.append(f"{item.name}: says seq {checkpoint.seq} (a copy of another checkpoint?)")
        _check_prev(item, present.get(item.number - 1), findings)
        if biggest is not None and checkpoint.size < biggest[0]:
            findings.append(
                f"{item.name}: rolled back: covers {checkpoint.size} entries, fewer than {biggest[1]} ({biggest[0]})"
            )
        if biggest is None or checkpoint.size >= biggest[0]:
            biggest = (checkpoint.size, item.path.name)


def _check_prev(item: _Loaded, previous: _Loaded | None, findings: list[str]) -> None:
    assert item.checkpoint is not None
    if item.number == 1:
        if item.checkpoint.prev is not None:
            findings.append(f"{item.name}: the first checkpoint has a prev line (earlier checkpoints removed?)")
        return
    if previous is None:
        return  # the gap is the finding
    if item.checkpoint.prev is None:
        findings.append(f"{item.name}: broken prev link: no prev line, but {previous.path.name} precedes it")
    elif item.checkpoint.prev != note_digest(previous.path.read_bytes()):
        findings.append(
            f"{item.name}: broken prev link: prev is not the digest of {previous.path.name} (replaced or reordered?)"
        )


def _matches_log(checkpoint: Checkpoint | None, hashes: list[str | None]) -> bool:
    return checkpoint is not None and checkpoint.size <= len(hashes) and hashes[checkpoint.size - 1] == checkpoint.head


def _check_against_log(loaded: list[_Loaded], hashes: list[str | None], log_path: Path, findings: list[str]) -> None:
    signed = [item for item in loaded if item.signed and item.checkpoint is not None]
    longest = max(signed, key=lambda item: item.checkpoint.size if item.checkpoint else 0, default=None)
    if longest is not None and longest.checkpoint is not None and longest.checkpoint.size > len(hashes):
        findings.append(
            f"audit log truncated: {longest.name} covers {longest.checkpoint.size} entries, "
            f"but {log_path} has {len(hashes)}"
        )
    for item in signed:
        checkpoint = item.checkpoint
        assert checkpoint is not None
        if checkpoint.size <= len(hashes) and hashes[checkpoint.size - 1] != checkpoint.head:
            findings.append(
                f"audit log rewritten: entry {checkpoint.size - 1} has hash {hashes[checkpoint.size - 1]}, "
                f"but {item.name} signed head {checkpoint.head}"
            )
            return  # later checkpoints diverge too; the first divergence is the one to look at


# --- the witness --------------------------------------------------------------------------------


def _check_witness(
    witness: Path, origin: str, loaded: list[_Loaded], newest_valid: Checkpoint | None, findings: list[str],
    project: str | None = None,
) -> None:
    lock = witness.with_name(witness.name + ".lock")
    witness.parent.mkdir(parents=True, exist_ok=True)
    with _locked(lock, LOCK_TIMEOUT_SECONDS):
        try:
            record = _read_witness(witness)
        except ConductorError as exc:
            findings.append(f"witness {witness}: {exc}")
            return
        seen = record.get(origin)
        if seen is not None:
            _compare_witness(seen, loaded, findings)
        if findings or newest_valid is None:
            return
        record[origin] = {"size": newest_valid.size, "head": newest_valid.head, "seq": newest_valid.seq}
        if project is not None:
            record[origin]["project"] = project  # lets verify notice a whole plan of this project gone
        atomic_write(witness, pretty_bytes(record))


def witnessed_origins(witness: Path, project: str) -> dict[str, dict[str, Any]]:
    """Origin → what the witness saw, for every log of ``project`` (a project id) it knows.

    Raises:
        InvalidDocument: the witness file is not what :func:`verify_checkpoints` writes.
    """
    return {origin: seen for origin, seen in _read_witness(witness).items() if seen.get("project") == project}


def _read_witness(witness: Path) -> dict[str, Any]:
    if not witness.exists():
        return {}
    record = strict_loads(witness.read_bytes(), source="witness")
    if not isinstance(record, dict):
        raise InvalidDocument("not a JSON object")
    for origin, seen in record.items():
        if not (isinstance(seen, dict) and isinstance(seen.get("size"), int) and isinstance(seen.get("seq"), int)
                and isinstance(seen.get("head"), str)):
            raise InvalidDocument(f"entry {origin!r} is not {{size, head, seq}}")
    return record


def _compare_witness(seen: dict[str, Any], loaded: list[_Loaded], findings: list[str]) -> None:
    parsed = [item for item in loaded if item.checkpoint is not None]
    newest = parsed[-1] if parsed else None
    now = newest.checkpoint if newest else None
    if now is None or now.seq < seen["seq"] or now.size < seen["size"]:
        current = "no checkpoint" if newest is None else f"{newest.path.name}"
        if now is not None:
            current += f" (seq {now.seq}, {now.size} entries)"
        findings.append(
            f"checkpoints rolled back: the witness saw seq {seen['seq']} covering {seen['size']} entries, "
            f"but the newest now is {current}"
        )
        return
    same = next((item.checkpoint for item in loaded if item.number == seen["seq"]), None)
    if same is not None and (same.size, same.head) != (seen["size"], seen["head"]):
        findings.append(
            f"checkpoint {seen['seq']:06d}{NOTE_SUFFIX} differs from what the witness recorded "
            f"(size {seen['size']}, head {seen['head']}): replaced?"
        )
