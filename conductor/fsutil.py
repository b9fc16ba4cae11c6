"""Durable file writes: temp file, fsync, atomic rename or link, fsync of the directory.

The pattern follows Maildir delivery: a reader never sees a partial file, and after a crash a file is
either wholly there or wholly absent. Temp files are named ``.tmp.<name>.<pid>.<random>`` in the target
directory, so a recovery pass can find and delete them.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

TEMP_PREFIX = ".tmp."


def fsync_dir(directory: Path) -> None:
    """fsync ``directory`` so that a rename or link inside it survives a power loss."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd`` (``os.write`` may write less than asked)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def file_sha256(path: Path, *, chunk_bytes: int = 1 << 20) -> str:
    """Lowercase hex SHA-256 of a file's content, read in chunks of ``chunk_bytes``."""
    hasher = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(chunk_bytes):
            hasher.update(chunk)
    return hasher.hexdigest()


def _write_temp(target: Path, data: bytes, mode: int = 0o644) -> Path:
    temp = target.parent / f"{TEMP_PREFIX}{target.name}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        write_all(fd, data)
        os.fchmod(fd, mode)  # before the rename, whatever the umask: no reader sees a wrong mode
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        temp.unlink(missing_ok=True)
        raise
    os.close(fd)
    return temp


def atomic_write(target: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``target`` with ``data`` atomically and durably (temp + fsync + rename + dir fsync).

    ``mode`` (permission bits) is set on the file before it becomes visible.

    Raises:
        OSError: on any write, fsync or rename failure (fsync errors are not retried: after a failed
            fsync the page cache state is unknown).
    """
    temp = _write_temp(target, data, mode)
    try:
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def publish_exclusive(target: Path, data: bytes) -> None:
    """Create ``target`` with ``data`` atomically, failing if it already exists.

    Uses ``os.link`` (which fails on an existing name, unlike rename) from a fsynced temp file.

    Raises:
        FileExistsError: ``target`` already exists; nothing was changed.
        OSError: on any other write, fsync or link failure.
    """
    temp = _write_temp(target, data)
    try:
        os.link(temp, target)
    finally:
        temp.unlink(missing_ok=True)
    fsync_dir(target.parent)


def durable_rename(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target`` (atomic on one file system) and fsync both directories."""
    os.rename(source, target)
    fsync_dir(target.parent)
    if source.parent != target.parent:
        fsync_dir(source.parent)
