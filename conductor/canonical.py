"""Canonical JSON (RFC 8785, JCS), SHA-256 checksums and strict JSON parsing.

Every checksummed document of the file contract (task, result, verdict, plan, audit entry) uses
``checksum = "sha256:" + hex(SHA-256(JCS(document without its "checksum" field)))``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from typing import Any

import rfc8785

from conductor.errors import ChecksumMismatch, InvalidDocument

CHECKSUM_FIELD = "checksum"
CHECKSUM_PREFIX = "sha256:"
# Contract documents nest a few levels; a deeper one is refused before recursive code (JCS, pydantic) sees it.
MAX_JSON_DEPTH = 64
_DESCEND = {False: (dict, list), True: (dict, list, str)}
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def canonical_bytes(value: Any) -> bytes:
    """Serialise ``value`` to its RFC 8785 canonical UTF-8 bytes.

    Raises:
        InvalidDocument: the value holds NaN, Infinity, an integer beyond IEEE 754 double
            precision, or a type JSON cannot represent.
    """
    try:
        return rfc8785.dumps(value)
    except (rfc8785.CanonicalizationError, TypeError, ValueError) as exc:
        raise InvalidDocument(f"cannot canonicalise: {exc}") from exc
    except RecursionError as exc:
        raise InvalidDocument("cannot canonicalise: nested too deeply") from exc


def sha256_hex(data: bytes) -> str:
    """Return the lowercase hex SHA-256 digest of ``data``."""
    return hashlib.sha256(data).hexdigest()


def digest(value: Any) -> str:
    """Return ``"sha256:<hex>"`` over the canonical form of ``value``."""
    return CHECKSUM_PREFIX + sha256_hex(canonical_bytes(value))


def compute_checksum(document: dict[str, Any]) -> str:
    """Return the checksum of ``document``, ignoring any ``checksum`` field it already has."""
    return digest({k: v for k, v in document.items() if k != CHECKSUM_FIELD})


def seal(document: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of ``document`` with its ``checksum`` field set."""
    return {**document, CHECKSUM_FIELD: compute_checksum(document)}


def check_checksum(document: dict[str, Any], *, source: str = "document") -> None:
    """Verify the ``checksum`` field of ``document``.

    Raises:
        ChecksumMismatch: the field is missing, not a string, or does not match the content.
        InvalidDocument: the document has no canonical form (e.g. an integer beyond 2**53).
    """
    recorded = document.get(CHECKSUM_FIELD)
    if recorded is None:
        raise ChecksumMismatch(f"{source}: no checksum field")
    if not isinstance(recorded, str):
        raise ChecksumMismatch(f"{source}: checksum field is not a string ({type(recorded).__name__})")
    try:
        actual = compute_checksum(document)
    except InvalidDocument as exc:
        raise InvalidDocument(f"{source}: {exc}") from exc
    if recorded != actual:
        raise ChecksumMismatch(f"{source}: checksum {recorded} does not match content ({actual})")


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise InvalidDocument(f"duplicate key {key!r}")
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    raise InvalidDocument(f"non-standard JSON constant {name}")


def strict_loads(data: bytes | str, *, source: str = "document") -> Any:
    """Parse JSON strictly: the I-JSON subset (RFC 7493) that RFC 8785 can canonicalise.

    Refused: bytes that are not UTF-8, a byte order mark (RFC 8259 §8.1 lets parsers refuse it), an empty
    text, duplicate keys, NaN/Infinity, numbers that overflow a double (``1e400``) or have more digits than
    Python converts (4,300), unpaired surrogate escapes (``"\\ud800"``), nesting deeper than
    :data:`MAX_JSON_DEPTH`, and anything after the value.

    Raises:
        InvalidDocument: naming ``source`` and what is wrong.
    """
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        if text.startswith("\ufeff"):
            raise InvalidDocument("starts with a UTF-8 byte order mark (BOM), which is not allowed")
        if not text.strip():
            raise InvalidDocument("empty document (no JSON value)")
        value = json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant,
                           parse_float=_finite_float)
        # A decoded text holds no surrogate: only a \uD800-\uDFFF escape can make one (cheap test first).
        _check_values(value, strings="\\u" in text and _SURROGATE_ESCAPE.search(text) is not None)
        return value
    except InvalidDocument as exc:
        raise InvalidDocument(f"{source}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise InvalidDocument(f"{source}: not UTF-8 ({exc.reason} at byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise InvalidDocument(f"{source}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    except RecursionError as exc:  # the C scanner recurses per level: a deep text must not crash the reader
        raise InvalidDocument(f"{source}: nested deeper than {MAX_JSON_DEPTH} levels") from exc
    except ValueError as exc:  # int() refuses more than sys.get_int_max_str_digits() digits
        raise InvalidDocument(f"{source}: invalid number: {exc}") from exc


def _finite_float(literal: str) -> float:
    number = float(literal)
    if not math.isfinite(number):
        raise InvalidDocument(f"number {literal[:40]} is out of range for a double")
    return number


def _check_values(value: Any, *, strings: bool) -> None:
    """Refuse containers nested deeper than MAX_JSON_DEPTH and, if ``strings``, unpaired surrogates (only a
    ``\\uD800``-``\\uDFFF`` escape in the text can produce one). Level by level: no recursion."""
    level, depth = [value], 0
    while level:
        depth += 1
        if depth > MAX_JSON_DEPTH and any(isinstance(item, (dict, list)) for item in level):
            raise InvalidDocument(f"nested deeper than {MAX_JSON_DEPTH} levels")
        below: list[Any] = []
        for item in level:
            if isinstance(item, dict):
                if strings:
                    below += item
                below += [child for child in item.values() if type(child) in _DESCEND[strings]]
            elif isinstance(item, list):
                below += [child for child in item if type(child) in _DESCEND[strings]]
            elif isinstance(item, str):
                _check_text(item)
        level = below


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidDocument(f"unpaired surrogate \\u{ord(text[exc.start]):04x} in the string {text[:40]!r}") from None


def pretty_bytes(document: Any) -> bytes:
    """Human-readable JSON bytes (indented, UTF-8, trailing newline) for files people open."""
    return (json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
