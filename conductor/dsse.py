"""DSSE v1 envelopes signed with Ed25519: sign, parse strictly, verify against a :class:`TrustStore`.

Spec: https://github.com/secure-systems-lab/dsse (protocol.md v1.0.0, envelope.md). A signature is
``Ed25519(PAE(payloadType, payload))`` with::

    PAE(type, body) = "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body

(LEN: ASCII decimal byte length, no leading zeros). The JSON envelope is
``{"payload": b64(body), "payloadType": type, "signatures": [{"keyid": id, "sig": b64(sig)}]}``.
Conductor writes standard base64 with padding and the envelope in RFC 8785 canonical form
(:func:`envelope_bytes`); as the spec requires, it reads standard and URL-safe base64, padded or not.
``keyid`` is :func:`conductor.keys.key_id` of the signer; it only selects a key from the trust store.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from cryptography.exceptions import InvalidSignature

from conductor.canonical import canonical_bytes, strict_loads
from conductor.errors import InvalidDocument, SignatureError
from conductor.keys import SigningKey, TrustStore

PAYLOAD_TYPE_IN_TOTO = "application/vnd.in-toto+json"
_BASE64 = re.compile(r"^[A-Za-z0-9+/_-]*={0,2}$")


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 Pre-Authentication Encoding of ``payload_type`` (UTF-8) and ``payload``: the signed bytes."""
    type_bytes = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(type_bytes), type_bytes, len(payload), payload)


def sign_envelope(payload: bytes, payload_type: str, keys: Sequence[SigningKey]) -> dict[str, Any]:
    """A DSSE JSON envelope over ``payload``, with one Ed25519 signature per key.

    Args:
        payload: the serialized body (for provenance: the canonical in-toto statement bytes).
        payload_type: e.g. :data:`PAYLOAD_TYPE_IN_TOTO`.
        keys: signers; none gives an unsigned envelope (``"signatures": []``).

    Returns:
        ``{"payload": str, "payloadType": str, "signatures": [{"keyid": str, "sig": str}]}`` with
        standard, padded base64.
    """
    message = pae(payload_type, payload)
    return {
        "payload": base64.b64encode(payload).decode("ascii"),
        "payloadType": payload_type,
        "signatures": [
            {"keyid": key.key_id, "sig": base64.b64encode(key.sign(message)).decode("ascii")} for key in keys
        ],
    }


def envelope_bytes(envelope: dict[str, Any]) -> bytes:
    """The file bytes of an envelope: its RFC 8785 canonical JSON (one line, no trailing newline).

    Raises:
        InvalidDocument: the envelope holds a value JSON cannot represent canonically.
    """
    return canonical_bytes(envelope)


class Signature(NamedTuple):
    """One envelope signature: the (unauthenticated) key id hint, "" when absent, and the raw bytes."""

    keyid: str
    sig: bytes


@dataclass(frozen=True)
class Envelope:
    """A parsed, not yet verified, DSSE envelope."""

    payload: bytes
    payload_type: str
    signatures: list[Signature] = field(default_factory=list)
    source: str = "envelope"


@dataclass(frozen=True)
class VerifiedEnvelope:
    """An envelope whose signatures were checked.

    Attributes:
        payload: the body bytes (now authenticated when ``signed_by`` is not empty).
        payload_type: the payload type (covered by PAE, so authenticated along with the payload).
        signed_by: key ids whose signatures verified and are trusted for the executor; empty only
            when the envelope was accepted unsigned (``require_signature=False``).
    """

    payload: bytes
    payload_type: str
    signed_by: list[str]


def decode_base64(text: str) -> bytes:
    """Decode standard or URL-safe base64 (RFC 4648 sections 4 and 5), padded or not.

    Raises:
        ValueError: other characters, misplaced padding, or an impossible length.
    """
    if not _BASE64.match(text):
        raise ValueError("not base64")
    unpadded = text.rstrip("=")
    if len(unpadded) % 4 == 1 or (unpadded != text and len(text) % 4):
        raise ValueError("bad base64 length or padding")
    bare = unpadded.replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(bare + "=" * (-len(bare) % 4), validate=True)
    except binascii.Error as exc:
        raise ValueError(str(exc)) from exc


def parse_envelope(data: bytes, *, source: str) -> Envelope:
    """Parse a DSSE JSON envelope strictly.

    Unknown fields are ignored (they are not signed). A missing ``signatures`` field means none
    (envelope.md: "empty fields may be omitted"); a signature without ``keyid`` gets ``""``.

    Args:
        data: the file's bytes.
        source: names the envelope in errors, e.g. the file path.

    Returns:
        The envelope, with payload and signatures base64-decoded.

    Raises:
        InvalidDocument: not strict JSON (duplicate keys, NaN, not UTF-8), not an object, a required
            field (``payload``, ``payloadType``, ``signatures[i].sig``) missing or of the wrong type, or
            a base64 field that does not decode; the message names ``source`` and the field.
    """
    document = strict_loads(data, source=source)
    if not isinstance(document, dict):
        raise InvalidDocument(f"{source}: a DSSE envelope must be a JSON object")
    payload = _base64_field(_string_field(document, "payload", source), "payload", source)
    payload_type = _string_field(document, "payloadType", source)
    if not payload_type:
        raise InvalidDocument(f"{source}: field 'payloadType' is empty")
    raw_signatures = document.get("signatures", [])
    if not isinstance(raw_signatures, list):
        raise InvalidDocument(f"{source}: field 'signatures' must be a list")
    signatures = [_signature(item, f"signatures[{index}]", source) for index, item in enumerate(raw_signatures)]
    return Envelope(payload=payload, payload_type=payload_type, signatures=signatures, source=source)


def _string_field(document: dict[str, Any], name: str, source: str) -> str:
    if name not in document:
        raise InvalidDocument(f"{source}: field {name!r} is missing")
    value = document[name]
    if not isinstance(value, str):
        raise InvalidDocument(f"{source}: field {name!r} must be a string")
    return value


def _base64_field(text: str, name: str, source: str) -> bytes:
    try:
        return decode_base64(text)
    except ValueError as exc:
        raise InvalidDocument(f"{source}: field {name!r} is not valid base64 ({exc})") from exc


def _signature(item: Any, where: str, source: str) -> Signature:
    if not isinstance(item, dict):
        raise InvalidDocument(f"{source}: field {where!r} must be an object")
    sig = _base64_field(_string_field(item, "sig", f"{source}: {where}"), f"{where}.sig", source)
    keyid = item.get("keyid", "")
    if not isinstance(keyid, str):
        raise InvalidDocument(f"{source}: field '{where}.keyid' must be a string")
    return Signature(keyid=keyid, sig=sig)


def verify_envelope(
    envelope: Envelope,
    trust: TrustStore,
    *,
    executor_id: str | None = None,
    require_signature: bool = True,
) -> VerifiedEnvelope:
    """Verify the Ed25519 signatures of ``envelope`` over PAE against the keys in ``trust``.

    Only keys in ``trust`` are ever used; ``keyid`` merely picks one (a signature without a keyid is
    tried against every trusted key). Rules, in order:

    * a signature whose keyid is not in ``trust`` is skipped;
    * a signature by a known key that does not verify rejects the whole envelope (DSSE: "reject if
      the verification fails"; C2SP signed-note does the same);
    * a valid signature counts if its key is trusted for ``executor_id`` (any key in ``trust`` when
      ``executor_id`` is None);
    * valid signatures only from keys not trusted for ``executor_id`` reject the envelope, even when
      no signature is required: someone signed as an executor they may not speak for.

    Args:
        envelope: from :func:`parse_envelope`.
        trust: the trusted keys.
        executor_id: the executor the payload claims to come from (the result's ``executor.id``).
        require_signature: False accepts an envelope with no signatures, or only unknown ones, and
            returns it with ``signed_by == []``.

    Returns:
        The payload, its type and the key ids that vouch for it.

    Raises:
        SignatureError: ``"<source>: bad signature by key <id>"``; ``"<source>: signed by key <id>
            which is not trusted for executor <executor>"``; ``"<source>: unsigned"`` (no signatures);
            ``"<source>: no signature by a trusted key"`` (only unknown keys) — the last two only when
            ``require_signature``.
    """
    message = pae(envelope.payload_type, envelope.payload)
    signed_by: list[str] = []
    wrong_executor: list[str] = []
    for signature in envelope.signatures:
        signer = _verified_signer(signature, message, trust, envelope.source)
        if signer is None or signer in signed_by or signer in wrong_executor:
            continue
        if executor_id is None or trust.trusted_for(signer, executor_id):
            signed_by.append(signer)
        else:
            wrong_executor.append(signer)
    if wrong_executor and not signed_by:
        raise SignatureError(
            f"{envelope.source}: signed by key {wrong_executor[0]} which is not trusted for executor {executor_id!r}"
        )
    if not signed_by and require_signature:
        if not envelope.signatures:
            raise SignatureError(f"{envelope.source}: unsigned")
        hints = ", ".join(sorted({s.keyid or "(no keyid)" for s in envelope.signatures}))
        raise SignatureError(f"{envelope.source}: no signature by a trusted key (signed by: {hints})")
    return VerifiedEnvelope(payload=envelope.payload, payload_type=envelope.payload_type, signed_by=signed_by)


def _verified_signer(signature: Signature, message: bytes, trust: TrustStore, source: str) -> str | None:
    """The key id that made ``signature``, None if no trusted key is named (or, without keyid, fits)."""
    if signature.keyid:
        public_key = trust.public_key(signature.keyid)
        if public_key is None:
            return None
        try:
            public_key.verify(signature.sig, message)
        except InvalidSignature as exc:
            raise SignatureError(f"{source}: bad signature by key {signature.keyid}") from exc
        return signature.keyid
    for entry in trust.entries():
        try:
            entry.public_key.verify(signature.sig, message)
        except InvalidSignature:
            continue
        return entry.key_id
    return None
