"""DSSE v1: PAE against the spec vector, envelope round trips, strict parsing and the verification rules."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from conductor.canonical import canonical_bytes
from conductor.dsse import (
    PAYLOAD_TYPE_IN_TOTO,
    decode_base64,
    envelope_bytes,
    pae,
    parse_envelope,
    sign_envelope,
    verify_envelope,
)
from conductor.errors import InvalidDocument, SignatureError
from conductor.keys import SigningKey, TrustStore

PAYLOAD = b'{"_type":"https://in-toto.io/Statement/v1","subject":[]}'
WORKER = "conductor-worker@host:42"


def new_key() -> SigningKey:
    return SigningKey.of(Ed25519PrivateKey.generate())


def trust_of(*keys: SigningKey, executors: tuple[str, ...] = ("*",)) -> TrustStore:
    store = TrustStore()
    for key in keys:
        store.add(key.public_key, executors)
    return store


def reparse(envelope: dict, source: str = "step_001.provenance.json"):
    return parse_envelope(json.dumps(envelope).encode(), source=source)


def test_pae_spec_vector() -> None:
    assert pae("http://example.com/HelloWorld", b"hello world") == b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"


def test_pae_counts_utf8_bytes_and_empty_fields() -> None:
    assert pae("é", b"") == "DSSEv1 2 é 0 ".encode()
    assert pae("t", b"a b\x00") == b"DSSEv1 1 t 4 a b\x00"


def test_round_trip_through_canonical_bytes() -> None:
    key = new_key()
    envelope = sign_envelope(PAYLOAD, PAYLOAD_TYPE_IN_TOTO, [key])
    data = envelope_bytes(envelope)
    assert data == canonical_bytes(envelope)
    assert set(json.loads(data)) == {"payload", "payloadType", "signatures"}
    assert envelope["signatures"][0]["keyid"] == key.key_id
    assert base64.b64decode(envelope["payload"]) == PAYLOAD
    parsed = parse_envelope(data, source="p.json")
    assert (parsed.payload, parsed.payload_type, parsed.signatures[0].keyid) == (PAYLOAD, PAYLOAD_TYPE_IN_TOTO, key.key_id)
    verified = verify_envelope(parsed, trust_of(key), executor_id=WORKER)
    assert verified.payload == PAYLOAD
    assert verified.payload_type == PAYLOAD_TYPE_IN_TOTO
    assert verified.signed_by == [key.key_id]


def test_signature_is_ed25519_over_pae() -> None:
    key = new_key()
    envelope = sign_envelope(PAYLOAD, PAYLOAD_TYPE_IN_TOTO, [key])
    key.public_key.verify(base64.b64decode(envelope["signatures"][0]["sig"]), pae(PAYLOAD_TYPE_IN_TOTO, PAYLOAD))


def _recode(text: str, *, urlsafe: bool, padded: bool) -> str:
    raw = base64.b64decode(text)
    out = (base64.urlsafe_b64encode(raw) if urlsafe else base64.b64encode(raw)).decode()
    return out if padded else out.rstrip("=")


@pytest.mark.parametrize("urlsafe", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_standard_and_urlsafe_base64_with_or_without_padding(urlsafe: bool, padded: bool) -> None:
    key = new_key()
    # A payload whose base64 has '+', '/' and padding in the standard alphabet.
    payload = bytes([0xFB, 0xFF, 0xBF, 0x3E, 0x00])
    envelope = sign_envelope(payload, "application/x-test", [key])
    envelope["payload"] = _recode(envelope["payload"], urlsafe=urlsafe, padded=padded)
    envelope["signatures"][0]["sig"] = _recode(envelope["signatures"][0]["sig"], urlsafe=urlsafe, padded=padded)
    if urlsafe:
        assert "-" in envelope["payload"] or "_" in envelope["payload"]
    assert ("=" in envelope["payload"]) is padded
    assert verify_envelope(reparse(envelope), trust_of(key)).payload == payload


@pytest.mark.parametrize("text", ["a", "ab=", "abc==", "ab==c", "a b=", "ab*=", "=abc", "abcd==="])
def test_bad_base64_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        decode_base64(text)


def test_tampered_payload_is_a_bad_signature() -> None:
    key = new_key()
    envelope = sign_envelope(PAYLOAD, PAYLOAD_TYPE_IN_TOTO, [key])
    envelope["payload"] = base64.b64encode(PAYLOAD.replace(b"Statement", b"Statemenx")).decode()
    with pytest.raises(SignatureError, match=rf"^step_001\.provenance\.json: bad signature by key {key.key_id}$"):
        verify_envelope(reparse(envelope), trust_of(key))


def test_tampered_payload_type_is_a_bad_signature() -> None:
    key = new_key()
    envelope = sign_envelope(PAYLOAD, PAYLOAD_TYPE_IN_TOTO, [key])
    envelope["payloadType"] = "application/json"
    with pytest.raises(SignatureError, match="bad signature by key"):
        verify_envelope(reparse(envelope), trust_of(key))


def test_signature_by_a_key_not_in_the_store_is_not_trusted() -> None:
    signer, trusted = new_key(), new_key()
    envelope = sign_envelope(PAYLOAD, PAYLOAD_TYPE_IN_TOTO, [signer])
    with pytest.raises(SignatureError, match=rf"no signature by a trusted key \(signed by: {signer.key_id}\)"):
        verify_envelope(reparse(envelope), trust_of(trusted))
    # Not even when the envelope claims the trusted key's id: the trusted key itself must verify.
    envelope["signatures"][0]["keyid"] = trusted.key_id
    with pytest.raises(SignatureError, match=f"bad signature by key {trusted.key_id}"):
        verify_envelope(reparse(envelope), trust_of(trusted))
    # Without require_signature an unknown signer counts as unsigned.
    assert verify_envelope(reparse(sign_envelope(PAYLOAD, "t", [signer])), trust_of(trusted),
                           require_signature=False).signed_by == []


def test_key_not_trusted_for_this_executor() -> None:
    key = new_key()
    store = trust_of(key, executors=("llm:*",))
    envelope = reparse(sign_envelope(PAYLOAD, PAYLOAD_TYPE_IN_TOTO, [key]))
    assert verify_envelope(envelope, store, executor_id="llm:openai/gpt-4.1-mini").signed_by == [key.key_id]
    expected = f"signed by key {key.key_id} which is not trusted for executor '{WORKER}'"
    with pytest.raises(SignatureError, match=expected):
        verify_envelope(envelope, store, executor_id=WORKER)
    with pytest.raises(SignatureError, match=expected):
        verify_envelope(envelope, store, executor_id=WORKER, require_signature=False)


def test_one_trusted_signature_among_others_is_enough() -> None:
    scoped, general, stranger = new_key(), new_key(), new_key()
    store = trust_of(scoped, executors=("llm:*",))
    store.add(general.public_key, ["*"])
    envelope = reparse(sign_envelope(PAYLOAD, PAYLOAD_TYPE_IN_TOTO, [stranger, scoped, general]))
    assert verify_envelope(envelope, store, executor_id=WORKER).signed_by == [general.key_id]
    assert verify_envelope(envelope, store).signed_by == [scoped.key_id, general.key_id]


def test_signature_without_keyid_is_tried_against_trusted_keys() -> None:
    key, other = new_key(), new_key()
    envelope = sign_envelope(PAYLOAD, PAYLOAD_TYPE_IN_TOTO, [key])
    del envelope["signatures"][0]["keyid"]
    parsed = reparse(envelope)
    assert parsed.signatures[0].keyid == ""
    store = trust_of(other)
    store.add(key.public_key)
    assert verify_envelope(parsed, store).signed_by == [key.key_id]
    with pytest.raises(SignatureError, match=r"no signature by a trusted key \(signed by: \(no keyid\)\)"):
        verify_envelope(parsed, trust_of(other))


def test_unsigned() -> None:
    key = new_key()
    envelope = reparse(sign_envelope(PAYLOAD, PAYLOAD_TYPE_IN_TOTO, []))
    assert envelope.signatures == []
    with pytest.raises(SignatureError, match=r"^step_001\.provenance\.json: unsigned$"):
        verify_envelope(envelope, trust_of(key))
    assert verify_envelope(envelope, trust_of(key), require_signature=False).signed_by == []
    missing = reparse({"payload": "", "payloadType": "t"})  # envelope.md: empty fields may be omitted
    with pytest.raises(SignatureError, match="unsigned"):
        verify_envelope(missing, trust_of(key))


def test_malformed_json_is_invalid_document() -> None:
    with pytest.raises(InvalidDocument, match=r"^p\.json: invalid JSON"):
        parse_envelope(b'{"payload": ', source="p.json")
    dup = b'{"payload": "", "payload": "aGk=", "payloadType": "t", "signatures": []}'
    with pytest.raises(InvalidDocument, match=r"^p\.json: duplicate key 'payload'"):
        parse_envelope(dup, source="p.json")
    with pytest.raises(InvalidDocument, match="must be a JSON object"):
        parse_envelope(b"[]", source="p.json")


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"payloadType": "t", "signatures": []}, "field 'payload' is missing"),
        ({"payload": "aGk=", "signatures": []}, "field 'payloadType' is missing"),
        ({"payload": 5, "payloadType": "t"}, "field 'payload' must be a string"),
        ({"payload": "aGk=", "payloadType": ""}, "field 'payloadType' is empty"),
        ({"payload": "a$", "payloadType": "t"}, "field 'payload' is not valid base64"),
        ({"payload": "aGk=", "payloadType": "t", "signatures": {}}, "field 'signatures' must be a list"),
        ({"payload": "aGk=", "payloadType": "t", "signatures": ["x"]}, "field 'signatures[0]' must be an object"),
        ({"payload": "aGk=", "payloadType": "t", "signatures": [{"keyid": "k"}]}, "signatures[0]: field 'sig' is missing"),
        ({"payload": "aGk=", "payloadType": "t", "signatures": [{"sig": "***"}]}, "'signatures[0].sig' is not valid base64"),
        ({"payload": "aGk=", "payloadType": "t", "signatures": [{"sig": "", "keyid": 1}]}, "'signatures[0].keyid' must be"),
    ],
)
def test_missing_or_malformed_fields_name_source_and_field(document: dict, message: str) -> None:
    with pytest.raises(InvalidDocument) as info:
        parse_envelope(json.dumps(document).encode(), source="x.provenance.json")
    assert str(info.value).startswith("x.provenance.json: ")
    assert message in str(info.value)


def test_wrong_length_signature_by_known_key_is_bad() -> None:
    key = new_key()
    envelope = sign_envelope(PAYLOAD, PAYLOAD_TYPE_IN_TOTO, [key])
    envelope["signatures"][0]["sig"] = base64.b64encode(b"\x01" * 10).decode()
    with pytest.raises(SignatureError, match="bad signature by key"):
        verify_envelope(reparse(envelope), trust_of(key))
