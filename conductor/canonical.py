"""Canonical JSON (RFC 8785, JCS), SHA-256 checksums and strict JSON parsing.

Every checksummed document of the file contract (task, result, verdict, plan, audit entry) uses
``checksum = "sha256:" + hex(SHA-256(JCS(document without its "checksum" field)))``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import rfc8785

from conductor.errors import ChecksumMismatch, InvalidDocument

CHECKSUM_FIELD = "checksum"
CHECKSUM_PREFIX = "sha256:"


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
        ChecksumMismatch: the field is missing or does not match the content.
    """
    recorded = document.get(CHECKSUM_FIELD)
    if not isinstance(recorded, str):
        raise ChecksumMismatch(f"{source}: no checksum field")
    actual = compute_checksum(document)
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
    """Parse JSON strictly: UTF-8 only, no duplicate keys, no NaN/Infinity.

    Raises:
        InvalidDocument: naming ``source`` and what is wrong.
    """
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        return json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except InvalidDocument as exc:
        raise InvalidDocument(f"{source}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise InvalidDocument(f"{source}: not UTF-8 ({exc.reason} at byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise InvalidDocument(f"{source}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc


def pretty_bytes(document: Any) -> bytes:
    """Human-readable JSON bytes (indented, UTF-8, trailing newline) for files people open."""
    return (json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
