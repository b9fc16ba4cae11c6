"""RFC 8785 (JCS) bytes of the JSON values Conductor writes, through the C JSON encoder.

``rfc8785.dumps`` is pure Python and was the largest CPU cost of a task's cycle: every checksum, audit
line and fencing check serialises a document. For the values contract documents hold, the standard
library's encoder with ``sort_keys`` and ``ensure_ascii=False`` writes exactly the JCS bytes:

- keys are sorted by code point, which equals JCS's UTF-16 order while no key holds a character beyond
  U+FFFF;
- strings escape ``"``, ``\\``, ``\\b \\f \\n \\r \\t`` and other controls as ``\\u00xx`` (lowercase), as JCS
  does; everything else is written as UTF-8;
- integers within ±(2**53 - 1) and ``true``/``false``/``null`` are written alike;
- a float prints as its shortest round-trip digits in both, as long as Python's ``repr`` does not switch to
  an exponent (it does below 1e-4 and from 1e16); an integral float is written as an integer (``1.0`` →
  ``1``), exactly for magnitudes below 2**53.

Anything else (such a key, a float outside those ranges, a tuple, a non-string key, an unpaired
surrogate, an integer beyond the safe range, nesting deeper than 64) goes to ``rfc8785.dumps`` itself, so
the result is always the JCS form, or the same error :func:`conductor.canonical.canonical_bytes` raises.
``tests/handoff/test_jcs.py`` compares both on random and edge-case values.
"""

from __future__ import annotations

import hashlib
import json
from json.encoder import c_encode_basestring, c_make_encoder  # type: ignore[attr-defined]
from typing import Any

from conductor.canonical import CHECKSUM_FIELD, CHECKSUM_PREFIX, canonical_bytes

_MAX_DEPTH = 64
_SAFE_INT = 2**53 - 1
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), sort_keys=True, allow_nan=False)


def _unencodable(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} is not JSON")


if c_make_encoder is not None:  # one C encoder, reused (JSONEncoder.encode builds a new one per call)
    _c_encode = c_make_encoder(None, _unencodable, c_encode_basestring, None, ":", ",", True, False, False)

    def _encode(value: Any) -> str:
        return "".join(_c_encode(value, 0))
else:  # pragma: no cover - CPython always has the C encoder
    _encode = _ENCODER.encode


class _Unsupported(Exception):
    """The value leaves the subset the C encoder writes as JCS."""


def jcs_bytes(value: Any) -> bytes:
    """The RFC 8785 canonical UTF-8 bytes of ``value`` (same result and errors as ``canonical_bytes``).

    Raises:
        InvalidDocument: the value holds NaN, Infinity, an integer beyond 2**53 - 1, or a type JSON cannot
            represent.
    """
    fast = fast_jcs_bytes(value)
    return canonical_bytes(value) if fast is None else fast


def fast_jcs_bytes(value: Any) -> bytes | None:
    """The JCS bytes of ``value`` if it lies in the subset the C encoder writes exactly (the module
    docstring), else None. A value that strict parsing refuses (a NaN, an unpaired surrogate, nesting deeper
    than 64, an integer beyond 2**53 - 1) is never in it."""
    text = fast_jcs_text(value)
    if text is None:
        return None
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # an unpaired surrogate cannot be UTF-8
        return None


def fast_jcs_text(value: Any) -> str | None:
    """:func:`fast_jcs_bytes` before its UTF-8 encoding (a text with an unpaired surrogate is not JCS)."""
    try:
        return _encode(_plain(value, 0))
    except _Unsupported:
        return None


def jcs_digest(value: Any) -> str:
    """``"sha256:<hex>"`` over :func:`jcs_bytes` (as ``conductor.canonical.digest``)."""
    return CHECKSUM_PREFIX + hashlib.sha256(jcs_bytes(value)).hexdigest()


def jcs_checksum(document: dict[str, Any]) -> str:
    """The checksum of ``document`` without its ``checksum`` field (as ``canonical.compute_checksum``)."""
    return jcs_digest({k: v for k, v in document.items() if k != CHECKSUM_FIELD})


def _plain(value: Any, depth: int) -> Any:
    """``value`` if the C encoder writes it as JCS, a copy with integral floats made ints if only those
    differ; raises _Unsupported otherwise."""
    kind = type(value)
    if kind is dict:
        if depth >= _MAX_DEPTH:
            raise _Unsupported
        copy = None
        for key, item in value.items():
            if type(key) is not str or not (key.isascii() or max(key, default="") <= "\uffff"):
                raise _Unsupported
            kind = type(item)
            if kind is str or kind is bool or item is None or (kind is int and -_SAFE_INT <= item <= _SAFE_INT):
                continue  # the common case, checked inline
            plain = _plain(item, depth + 1)
            if plain is not item:
                copy = copy if copy is not None else dict(value)
                copy[key] = plain
        return value if copy is None else copy
    if kind is list:
        if depth >= _MAX_DEPTH:
            raise _Unsupported
        copy = None
        for index, item in enumerate(value):
            kind = type(item)
            if kind is str or kind is bool or item is None or (kind is int and -_SAFE_INT <= item <= _SAFE_INT):
                continue
            plain = _plain(item, depth + 1)
            if plain is not item:
                copy = copy if copy is not None else list(value)
                copy[index] = plain
        return value if copy is None else copy
    if kind is str or kind is bool or value is None:
        return value
    if kind is int:
        if -_SAFE_INT <= value <= _SAFE_INT:
            return value
        raise _Unsupported
    if kind is float:
        return _float(value)
    raise _Unsupported


def _float(value: float) -> float | int:
    if value != value or value in (float("inf"), float("-inf")):
        raise _Unsupported
    if value.is_integer():
        if abs(value) <= _SAFE_INT:
            return int(value)  # also -0.0 -> 0
        raise _Unsupported
    if not 1e-4 <= abs(value) < 1e16:
        raise _Unsupported  # Python's repr uses an exponent here, JCS may not (1e-05 vs 0.00001)
    return value
