import hashlib
import os
import stat

import pytest

from conductor.blobs import CHUNK_SIZE, BlobStore
from conductor.errors import ChecksumMismatch, NotFound


def test_put_bytes_stores_under_its_digest(tmp_path):
    store = BlobStore(tmp_path / "objects")
    digest = store.put_bytes(b"hello\n")
    assert digest == hashlib.sha256(b"hello\n").hexdigest()
    assert store.path(digest) == tmp_path / "objects" / "sha256" / digest[:2] / digest[2:]
    assert store.has(digest)
    assert store.get_bytes(digest) == b"hello\n"


def test_blobs_are_read_only(tmp_path):
    store = BlobStore(tmp_path)
    digest = store.put_bytes(b"x")
    assert stat.S_IMODE(store.path(digest).stat().st_mode) == 0o444


def test_put_is_deduplicated(tmp_path):
    store = BlobStore(tmp_path)
    first = store.put_bytes(b"same")
    inode = store.path(first).stat().st_ino
    source = tmp_path / "file"
    source.write_bytes(b"same")
    assert store.put_file(source) == first
    assert store.put_bytes(b"same") == first
    assert store.path(first).stat().st_ino == inode  # not rewritten


def test_put_file_streams_large_files(tmp_path):
    data = os.urandom(CHUNK_SIZE * 2 + 123)
    source = tmp_path / "big.bin"
    source.write_bytes(data)
    store = BlobStore(tmp_path / "objects")
    digest = store.put_file(source)
    assert digest == hashlib.sha256(data).hexdigest()
    assert store.get_bytes(digest) == data


def test_no_temp_files_are_left_behind(tmp_path):
    store = BlobStore(tmp_path)
    store.put_bytes(b"a")
    source = tmp_path / "src"
    source.write_bytes(b"b")
    store.put_file(source)
    leftovers = [p for p in (tmp_path / "sha256").rglob(".tmp.*")]
    assert leftovers == []


def test_missing_blob_is_not_found(tmp_path):
    store = BlobStore(tmp_path)
    digest = hashlib.sha256(b"never stored").hexdigest()
    assert not store.has(digest)
    with pytest.raises(NotFound):
        store.get_bytes(digest)


def test_tampered_blob_is_detected(tmp_path):
    store = BlobStore(tmp_path)
    digest = store.put_bytes(b"original")
    path = store.path(digest)
    path.chmod(0o644)
    path.write_bytes(b"tampered")
    with pytest.raises(ChecksumMismatch, match=digest):
        store.get_bytes(digest)


@pytest.mark.parametrize("bad", ["", "abc", "G" * 64, "A" * 64, "../" + "a" * 61])
def test_malformed_digest_is_rejected(tmp_path, bad):
    with pytest.raises(ValueError):
        BlobStore(tmp_path).path(bad)
