"""Reading and writing the checksummed JSON documents of the handoff folder.

Every read is strict: a size limit, strict JSON (no duplicate keys, no NaN), the known schema version,
the model's fields, and the checksum. Errors name the file and the field.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from conductor.canonical import CHECKSUM_FIELD, check_checksum, pretty_bytes, strict_loads
from conductor.errors import InvalidDocument
from conductor.fsutil import atomic_write, publish_exclusive, publish_exclusive_many
from conductor.handoff.jcs import jcs_checksum

MAX_DOCUMENT_BYTES = 4 * 1024 * 1024  # a task or result larger than this is refused, not parsed

M = TypeVar("M", bound=BaseModel)


def read_document(path: Path, model: type[M], *, checksummed: bool = True, limit: int = MAX_DOCUMENT_BYTES) -> M:
    """Read, check and validate one contract document.

    Args:
        path: the JSON file.
        model: the pydantic model it must match (its ``schema`` literal pins the version).
        checksummed: verify the ``checksum`` field (RFC 8785 + SHA-256).
        limit: the largest file accepted, in bytes (``plan.json`` has its own, larger one).

    Raises:
        FileNotFoundError: the file is gone (e.g. claimed by another executor).
        InvalidDocument: a symlink or not a regular file (a fifo would block the reader), too large, not strict
            JSON (see :func:`conductor.canonical.strict_loads`), not an object, no or another schema version,
            or a field is invalid or has the wrong JSON type (the models are strict: ``"1"`` is not 1).
        ChecksumMismatch: the content does not match its checksum.
    """
    return parse_document(read_limited(path, limit), model, source=path, checksummed=checksummed)


def parse_document(data: bytes, model: type[M], *, source: Path | str, checksummed: bool = True) -> M:
    """Check and validate a contract document already read from ``source`` (see :func:`read_document`).

    Raises:
        InvalidDocument, ChecksumMismatch: as :func:`read_document`, naming ``source``.
    """
    document = strict_loads(data, source=str(source))
    if not isinstance(document, dict):
        raise InvalidDocument(f"{source}: top level is {_json_type(document)}, not an object")
    expected = model.model_fields.get("schema_")
    if expected is not None and "schema" not in document:
        raise InvalidDocument(f"{source}: no schema field (expected {expected.default!r})")
    if expected is not None and document["schema"] != expected.default:
        raise InvalidDocument(
            f"{source}: schema {document['schema']!r} is not supported (expected {expected.default!r})"
        )
    if checksummed and not _checksum_matches(document):
        check_checksum(document, source=str(source))  # the reference check, which names what is wrong
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        raise InvalidDocument(f"{source}: {_summarise(exc)}") from exc


def reread(path: Path, model: type[M], seen: tuple[M, bytes] | None) -> M:
    """The document at ``path`` again: ``seen``'s object if the file still holds exactly ``seen``'s bytes
    (no parse and checksum again), else read strictly as :func:`read_document` does.

    Args:
        seen: an object parsed earlier and the exact bytes it was parsed from (or written as), or None.

    Raises:
        FileNotFoundError, InvalidDocument, ChecksumMismatch: as :func:`read_document`.
    """
    data = read_limited(path)
    if seen is not None and seen[1] == data:
        return seen[0]
    return parse_document(data, model, source=path)


def read_limited(path: Path, limit: int = MAX_DOCUMENT_BYTES) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes, never following a symlink or blocking on a fifo.

    Raises:
        FileNotFoundError: the file is gone.
        InvalidDocument: a symlink, not a regular file, or larger than the limit.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InvalidDocument(f"{path}: is a symbolic link, not a regular file") from exc
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise InvalidDocument(f"{path}: not a regular file ({_file_kind(mode)})")
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise InvalidDocument(f"{path}: larger than {limit} bytes")
    return data


def _checksum_matches(document: dict) -> bool:
    recorded = document.get(CHECKSUM_FIELD)
    try:
        return isinstance(recorded, str) and jcs_checksum(document) == recorded
    except InvalidDocument:
        return False


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a fifo"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "an unknown file type"


def _json_type(value: object) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _summarise(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(p) for p in error["loc"]) or "(document)"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


def sealed_bytes(model: BaseModel) -> tuple[dict, bytes]:
    """Return the sealed (checksummed) document of ``model`` and its file bytes."""
    document = model.to_document()  # type: ignore[attr-defined]
    document.pop(CHECKSUM_FIELD, None)
    sealed = {**document, CHECKSUM_FIELD: jcs_checksum(document)}  # as canonical.seal, with the C encoder
    return sealed, pretty_bytes(sealed)


def publish_documents(items: Sequence[tuple[Path, M]]) -> list[M | FileExistsError]:
    """Seal each model and create its file exclusively, durably, as a batch (see
    :func:`conductor.fsutil.publish_exclusive_many`: the fsyncs of the batch are grouped).

    Returns:
        Per item, in order: the sealed model, or the ``FileExistsError`` if its file already existed.

    Raises:
        StorageError, OSError: as :func:`conductor.fsutil.publish_exclusive_many`.
    """
    sealed = [sealed_bytes(model) for _path, model in items]
    results = publish_exclusive_many([(path, data) for (path, _model), (_seal, data) in zip(items, sealed, strict=True)])
    return [error if error is not None else type(model).model_validate(seal)
            for (_path, model), (seal, _data), error in zip(items, sealed, results, strict=True)]


def write_document(path: Path, model: M, *, exclusive: bool = False, sync_dir: bool = True) -> M:
    """Seal ``model`` with its checksum and write it durably; return the sealed model.

    Args:
        exclusive: fail with ``FileExistsError`` instead of replacing an existing file.
        sync_dir: fsync the folder after the rename (see :func:`conductor.fsutil.atomic_write`); an
            exclusive create always fsyncs it.
    """
    sealed, data = sealed_bytes(model)
    if exclusive:
        publish_exclusive(path, data)
    else:
        atomic_write(path, data, sync_dir=sync_dir)
    return type(model).model_validate(sealed)
