"""conductor.handoff.jcs writes exactly what rfc8785 writes, and fails where it fails."""

from __future__ import annotations

import random
import struct

import pytest
import rfc8785

from conductor.canonical import compute_checksum, digest
from conductor.errors import InvalidDocument
from conductor.handoff.jcs import jcs_bytes, jcs_checksum, jcs_digest

EDGE_FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 0.1 + 0.2, 1e-4, 9.999999999999999e-05, 1e-7, 1.5e-7, 5e-324, 2.2250738585072014e-308,
               1e15 + 0.5, 9999999999999998.0, 1e16, 1e21, 1e22, 123456789012345680000.0, 2.0**53, 2.0**53 - 1, -(2.0**53),
               1.7976931348623157e308, 0.0512, 100.0, 1234.5678, 3.0e-5, 12345678.9]
EDGE_INTS = [0, 1, -1, 2**31, 2**53 - 1, -(2**53 - 1)]
EDGE_STRINGS = ["", "a", "\x00\x01\x08\t\n\x0b\x0c\r\x1f\x7f", '"\\/', "é", "\u2028\u2029", "\ud7ff\ue000\uffff",
                "\U0001F600", "caf\u00e9", "step_001", "sha256:" + "0" * 64]
EDGE_KEYS = ["", "a", "b", "A", "é", "\ue000", "\uffff", "\U0001F600", "\U0001F601", "aa", "a\x00"]


def _random_value(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randrange(9 if depth < 4 else 6)
    if kind == 0:
        return rng.choice(EDGE_FLOATS + [rng.uniform(-1e6, 1e6), rng.random() * 10 ** rng.randint(-9, 22),
                                         struct.unpack("d", rng.randbytes(8))[0]])
    if kind == 1:
        return rng.choice(EDGE_INTS + [rng.randint(-(2**53), 2**53)])
    if kind == 2:
        return rng.choice(EDGE_STRINGS + ["".join(chr(rng.choice([rng.randrange(0x20), rng.randrange(0x80),
                                                                    rng.randrange(0xD800), rng.randrange(0xE000, 0x110000)]))
                                                  for _ in range(rng.randrange(8)))])
    if kind == 3:
        return rng.choice([None, True, False])
    if kind in (4, 5):
        return rng.choice(EDGE_STRINGS)
    if kind == 6:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(5))]
    keys = [rng.choice(EDGE_KEYS + [chr(rng.randrange(0x20, 0x110000))]) for _ in range(rng.randrange(6))]
    return {key: _random_value(rng, depth + 1) for key in keys}


def _reference(value: object) -> bytes | type[Exception]:
    try:
        return rfc8785.dumps(value)
    except Exception as exc:  # the kind of failure is what must match
        return type(exc)


@pytest.mark.parametrize("value", [*EDGE_FLOATS, *EDGE_INTS, *EDGE_STRINGS, None, True, False, [], {},
                                   [1.0, {"b": 2.0, "a": [0.5]}], {k: i for i, k in enumerate(EDGE_KEYS)}])
def test_edge_values_match_rfc8785(value: object) -> None:
    assert jcs_bytes(value) == rfc8785.dumps(value)


def test_random_documents_match_rfc8785() -> None:
    rng = random.Random(8785)
    for _ in range(5000):
        value = _random_value(rng)
        expected = _reference(value)
        if isinstance(expected, bytes):
            assert jcs_bytes(value) == expected, value
        else:
            with pytest.raises(InvalidDocument):
                jcs_bytes(value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 2**53, -(2**53), {1: 2}, "\ud800", {"k": "\udfff"},
                                   {"k": object()}, (1, 2.0)])
def test_what_rfc8785_refuses_is_refused_and_the_rest_matches(value: object) -> None:
    expected = _reference(value)
    if isinstance(expected, bytes):
        assert jcs_bytes(value) == expected
    else:
        with pytest.raises(InvalidDocument):
            jcs_bytes(value)


def test_nesting_beyond_the_fast_path_still_canonicalises() -> None:
    value: object = 1.5
    for _ in range(80):
        value = {"a": [value]}
    assert jcs_bytes(value) == rfc8785.dumps(value)


def test_digest_and_checksum_equal_the_reference() -> None:
    document = {"schema": "demo/v1", "task_id": "step_001", "attempt": 1, "score": 1.0, "note": "café",
                "checksum": "sha256:x"}
    assert jcs_checksum(document) == compute_checksum(document)
    assert jcs_checksum(document) == "sha256:5b83eb110fcb1c94d441b8c6a135fe51ecc75a01d5db4a9c2b92b548541e4028"
    assert jcs_digest([0.1, 2]) == digest([0.1, 2])
