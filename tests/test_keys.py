"""Ed25519 key files, key ids, key resolution and the trust store."""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from conductor.config import TrustConfig, TrustedKey
from conductor.errors import ConfigError, KeyFileError
from conductor.keys import (
    CONDUCTOR_SIGNER,
    SIGNING_KEY_ENV,
    SigningKey,
    TrustStore,
    generate_signing_key,
    key_id,
    load_public_key,
    load_signing_key,
    resolve_signing_key,
)
from conductor.layout import ProjectLayout


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _write_pem_private(path: Path, private_key: object, mode: int = 0o600) -> Path:
    pem = private_key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.write_bytes(pem)
    path.chmod(mode)
    return path


def test_key_id_is_sha256_of_raw_public_bytes() -> None:
    private = Ed25519PrivateKey.generate()
    raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert len(raw) == 32
    assert key_id(private.public_key()) == hashlib.sha256(raw).hexdigest()
    assert SigningKey.of(private).key_id == hashlib.sha256(raw).hexdigest()


def test_generate_writes_private_0600_and_public_pem(tmp_path: Path) -> None:
    keys_dir = ProjectLayout(tmp_path).keys_dir
    old_umask = os.umask(0)  # the most permissive umask must still give 0600
    try:
        key = generate_signing_key(keys_dir)
    finally:
        os.umask(old_umask)
    assert _mode(keys_dir / "signing.key") == 0o600
    assert _mode(keys_dir / "signing.pub") == 0o644
    assert _mode(keys_dir) == 0o700
    assert (keys_dir / "signing.key").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert (keys_dir / "signing.pub").read_bytes() == key.public_pem()
    assert key.public_pem().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert [p.name for p in keys_dir.iterdir() if p.name.startswith(".tmp.")] == []
    loaded = load_signing_key(keys_dir / "signing.key")
    assert loaded.key_id == key.key_id
    assert key_id(load_public_key(keys_dir / "signing.pub")) == key.key_id
    signature = loaded.sign(b"data")
    key.public_key.verify(signature, b"data")  # raises if wrong
    assert "PRIVATE" not in repr(key) and key.key_id in repr(key)


def test_generate_refuses_existing_key(tmp_path: Path) -> None:
    first = generate_signing_key(tmp_path)
    before = (tmp_path / "signing.key").read_bytes()
    with pytest.raises(KeyFileError, match=r"signing\.key: a signing key already exists"):
        generate_signing_key(tmp_path)
    assert (tmp_path / "signing.key").read_bytes() == before
    assert key_id(load_public_key(tmp_path / "signing.pub")) == first.key_id


def test_concurrent_generation_has_one_winner(tmp_path: Path) -> None:
    results: list[object] = []

    def attempt() -> None:
        try:
            results.append(generate_signing_key(tmp_path))
        except KeyFileError as exc:
            results.append(exc)

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    winners = [r for r in results if isinstance(r, SigningKey)]
    assert len(results) == 8 and len(winners) == 1
    assert load_signing_key(tmp_path / "signing.key").key_id == winners[0].key_id


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_load_refuses_loose_mode_and_says_how_to_fix(tmp_path: Path, mode: int) -> None:
    path = _write_pem_private(tmp_path / "k.key", Ed25519PrivateKey.generate(), mode)
    with pytest.raises(KeyFileError) as info:
        load_signing_key(path)
    message = str(info.value)
    assert str(path) in message
    assert f"mode {mode:04o}" in message
    assert f"chmod 600 {path}" in message


def test_load_accepts_0400(tmp_path: Path) -> None:
    private = Ed25519PrivateKey.generate()
    path = _write_pem_private(tmp_path / "k.key", private, 0o400)
    assert load_signing_key(path).key_id == key_id(private.public_key())


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match=r"missing\.key: no such signing key file"):
        load_signing_key(tmp_path / "missing.key")
    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(b"not a key")
    garbage.chmod(0o600)
    with pytest.raises(KeyFileError, match=r"garbage\.key: not a PEM private key"):
        load_signing_key(garbage)
    ec_key = _write_pem_private(tmp_path / "ec.key", ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(KeyFileError, match=r"ec\.key: a \w+ key, not Ed25519"):
        load_signing_key(ec_key)
    encrypted = tmp_path / "enc.key"
    encrypted.write_bytes(Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    ))
    encrypted.chmod(0o600)
    with pytest.raises(KeyFileError, match=r"enc\.key: the signing key is encrypted"):
        load_signing_key(encrypted)
    (tmp_path / "folder.key").mkdir(mode=0o700)
    with pytest.raises(KeyFileError, match=r"folder\.key"):
        load_signing_key(tmp_path / "folder.key")


def test_key_file_error_is_a_config_error() -> None:
    assert issubclass(KeyFileError, ConfigError)


def test_resolve_prefers_environment_then_project_key(tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    assert resolve_signing_key(keys_dir, environ={}) is None
    project_key = generate_signing_key(keys_dir)
    assert resolve_signing_key(keys_dir, environ={}).key_id == project_key.key_id  # type: ignore[union-attr]
    other = Ed25519PrivateKey.generate()
    external = _write_pem_private(tmp_path / "ci.key", other)
    chosen = resolve_signing_key(keys_dir, environ={SIGNING_KEY_ENV: str(external)})
    assert chosen is not None and chosen.key_id == key_id(other.public_key())
    assert resolve_signing_key(keys_dir, environ={SIGNING_KEY_ENV: ""}).key_id == project_key.key_id  # type: ignore[union-attr]
    with pytest.raises(KeyFileError, match="nowhere.key: no such signing key file"):
        resolve_signing_key(keys_dir, environ={SIGNING_KEY_ENV: str(tmp_path / "nowhere.key")})


def test_resolve_checks_the_mode_of_the_project_key(tmp_path: Path) -> None:
    generate_signing_key(tmp_path)
    (tmp_path / "signing.key").chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        resolve_signing_key(tmp_path, environ={})


def test_load_public_key_from_bytes_and_errors(tmp_path: Path) -> None:
    key = SigningKey.of(Ed25519PrivateKey.generate())
    assert key_id(load_public_key(key.public_pem())) == key.key_id
    with pytest.raises(KeyFileError, match=r"absent\.pub: cannot read the public key"):
        load_public_key(tmp_path / "absent.pub")
    with pytest.raises(KeyFileError, match="public key: not a PEM public key"):
        load_public_key(b"-----BEGIN PUBLIC KEY-----\nxx\n-----END PUBLIC KEY-----\n")
    ec_pub = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    path = tmp_path / "ec.pub"
    path.write_bytes(ec_pub)
    with pytest.raises(KeyFileError, match=r"ec\.pub: a \w+ key, not Ed25519"):
        load_public_key(path)


def test_trust_store_for_project(tmp_path: Path) -> None:
    conductor_dir = tmp_path / ".conductor"
    own = generate_signing_key(conductor_dir / "keys")
    worker = SigningKey.of(Ed25519PrivateKey.generate())
    ci = SigningKey.of(Ed25519PrivateKey.generate())
    (conductor_dir / "trusted").mkdir()
    (conductor_dir / "trusted" / "worker.pub").write_bytes(worker.public_pem())
    (tmp_path / "ci.pub").write_bytes(ci.public_pem())
    config = TrustConfig(keys=[
        TrustedKey(public_key="trusted/worker.pub", executors=["conductor-worker@*"]),
        TrustedKey(public_key=str(tmp_path / "ci.pub")),
    ])
    store = TrustStore.for_project(conductor_dir / "keys", config, conductor_dir)
    assert len(store) == 3
    assert set(store) == {own.key_id, worker.key_id, ci.key_id}
    assert key_id(store.public_key(worker.key_id)) == worker.key_id  # type: ignore[arg-type]
    assert store.public_key("0" * 64) is None
    assert store.trusted_for(own.key_id, "llm:openai/gpt-4.1-mini")  # Conductor's own in-process executor
    assert store.trusted_for(own.key_id, "conductor-engine@host:1") and store.trusted_for(own.key_id, CONDUCTOR_SIGNER)
    assert not store.trusted_for(own.key_id, "conductor-worker@host:42")  # never an external executor
    assert store.trusted_for(worker.key_id, "conductor-worker@host:42")
    assert not store.trusted_for(worker.key_id, "llm:openai/gpt-4.1-mini")
    assert not store.trusted_for(worker.key_id, "Conductor-Worker@host:42")  # case-sensitive
    assert store.trusted_for(ci.key_id, "anything")
    assert not store.trusted_for("0" * 64, "anything")
    assert not store.fully_trusted(own.key_id) and store.fully_trusted(ci.key_id)
    assert not store.fully_trusted(worker.key_id)


def test_trust_store_without_project_key_and_bad_configured_key(tmp_path: Path) -> None:
    assert len(TrustStore.for_project(tmp_path / "keys", TrustConfig(), tmp_path)) == 0
    config = TrustConfig(keys=[TrustedKey(public_key="keys/missing.pub")])
    with pytest.raises(KeyFileError, match=r"keys/missing\.pub: cannot read the public key"):
        TrustStore.for_project(tmp_path / "keys", config, tmp_path)


def test_trust_store_merges_patterns_of_the_same_key() -> None:
    key = SigningKey.of(Ed25519PrivateKey.generate())
    store = TrustStore()
    assert store.add(key.public_key, ["llm:*"]) == key.key_id
    store.add(key.public_key, ["conductor-worker@*"])
    assert len(store) == 1
    assert store.trusted_for(key.key_id, "llm:gemini/x") and store.trusted_for(key.key_id, "conductor-worker@h:1")
    assert not store.trusted_for(key.key_id, "ide-agent")
