"""Content-addressed blob store: ``<root>/sha256/<2 hex>/<62 hex>``, one read-only file per content.

Workspace snapshots put every file's bytes here so a later diff can read the old side and a snapshot can
be restored. A blob is published by temp file + fsync + rename (as :mod:`conductor.fsutil` does), so a
reader never sees a partial blob; it is verified against its name on every read.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path

from conductor.errors import ChecksumMismatch, NotFound
from conductor.fsutil import TEMP_PREFIX, file_sha256, fsync_dir, write_all

ALGORITHM = "sha256"
BLOB_MODE = 0o444
CHUNK_SIZE = 1 << 20
_HEX_DIGEST = re.compile(r"^[0-9a-f]{64}$")


class BlobStore:
    """A content-addressed store of immutable byte strings under ``root``.

    Args:
        root: the store's folder (``.conductor/objects`` in a project); created on first write.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, hexdigest: str) -> Path:
        """Where the blob of ``hexdigest`` lives (whether or not it exists).

        Raises:
            ValueError: ``hexdigest`` is not 64 lowercase hex characters.
        """
        if not _HEX_DIGEST.match(hexdigest):
            raise ValueError(f"not a SHA-256 hex digest: {hexdigest!r}")
        return self.root / ALGORITHM / hexdigest[:2] / hexdigest[2:]

    def has(self, hexdigest: str) -> bool:
        """True if the blob of ``hexdigest`` is stored (its content is not verified)."""
        return self.path(hexdigest).is_file()

    def put_bytes(self, data: bytes) -> str:
        """Store ``data`` (a no-op if already stored) and return its lowercase hex SHA-256."""
        hexdigest = hashlib.sha256(data).hexdigest()
        if not self.has(hexdigest):

            def write(fd: int) -> str:
                write_all(fd, data)
                return hexdigest

            self._publish(write)
        return hexdigest

    def put_file(self, path: Path) -> str:
        """Store the content of the regular file ``path`` and return its lowercase hex SHA-256.

        The file is hashed first and copied only when its blob is missing, so storing an unchanged
        tree again costs one read per file. If the file changes between the hash and the copy, the copy
        is stored under the digest of what was actually copied, and that digest is returned.

        Raises:
            OSError: ``path`` cannot be read, or the store cannot be written.
        """
        hexdigest = file_sha256(path, chunk_bytes=CHUNK_SIZE)
        if self.has(hexdigest):
            return hexdigest
        return self._publish(lambda fd: _copy_hashing(path, fd))

    def get_bytes(self, hexdigest: str) -> bytes:
        """Return the content of the blob ``hexdigest``, verified against its digest.

        Raises:
            NotFound: no blob by that digest.
            ChecksumMismatch: the stored bytes no longer hash to ``hexdigest`` (the blob was altered).
        """
        try:
            data = self.path(hexdigest).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"blob {hexdigest} is not in the store {self.root}") from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != hexdigest:
            raise ChecksumMismatch(f"blob {hexdigest} in {self.root} was altered (its content hashes to {actual})")
        return data

    def _publish(self, write: Callable[[int], str]) -> str:
        """Fill a temp blob with ``write(fd)`` (which returns the digest of what it wrote), fsync it and
        rename it to its content address; return the digest."""
        staging = self.root / ALGORITHM
        _make_dirs(staging)
        temp = staging / f"{TEMP_PREFIX}blob.{os.getpid()}.{secrets.token_hex(4)}"
        # The mode only applies to later opens, so the fd stays writable while the file is read-only.
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, BLOB_MODE)
        try:
            try:
                os.fchmod(fd, BLOB_MODE)  # whatever the umask
                hexdigest = write(fd)
                os.fsync(fd)
            finally:
                os.close(fd)
            target = self.path(hexdigest)
            _make_dirs(target.parent)
            # Two writers of the same content race harmlessly: both renames install identical bytes.
            os.replace(temp, target)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        fsync_dir(target.parent)
        return hexdigest


def _make_dirs(directory: Path) -> None:
    if directory.is_dir():
        return
    _make_dirs(directory.parent)
    try:
        directory.mkdir()
    except FileExistsError:
        return
    fsync_dir(directory.parent)  # the new folder's name must survive a crash too


def _copy_hashing(path: Path, fd: int) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(CHUNK_SIZE):
            hasher.update(chunk)
            write_all(fd, chunk)
    return hasher.hexdigest()
