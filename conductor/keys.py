"""Ed25519 signing keys of a project, and the store of public keys Conductor trusts.

The project's private key lives **outside the project**, where no command launched for a step can read
it (the sandbox hides the folder too): ``$XDG_CONFIG_HOME/conductor/keys/<project id>/`` (default
``~/.config/conductor/keys/<project id>/``; ``CONDUCTOR_KEYS_HOME`` replaces
``$XDG_CONFIG_HOME/conductor/keys``), the project id being ``.conductor/project-id`` (16 random hex
characters, made once). The project keeps only a copy of the public key, ``.conductor/keys/signing.pub``,
for others to verify with. A key left in ``.conductor/keys/signing.key`` by an older Conductor is moved
out on first use. Files::

    signing.key   PKCS#8 PEM, unencrypted, mode 0600 (refused when group or others may read it)
    signing.pub   SubjectPublicKeyInfo PEM

The project key signs what Conductor itself states (attestations, checkpoints, the provenance of its
in-process executors): it is trusted for :data:`OWN_IDENTITIES` only, never for an external executor,
which signs with a key of its own listed in ``trust.keys``.

A key is named by its **key id**: the lowercase hex SHA-256 of the 32 raw public-key bytes (RFC 8032
encoding). DSSE envelopes carry it as ``keyid``; it is a hint for finding the key, never a reason to
trust one (a verifier only uses keys from its :class:`TrustStore`).

``CONDUCTOR_SIGNING_KEY_FILE`` names a signing key kept elsewhere (a secret mount, say) and wins over
``signing.key``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import secrets
import stat
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from conductor.config import TrustConfig
from conductor.errors import ConductorError, KeyFileError
from conductor.fsutil import TEMP_PREFIX, atomic_write, fsync_dir, write_all

SIGNING_KEY_FILE = "signing.key"
PUBLIC_KEY_FILE = "signing.pub"
SIGNING_KEY_ENV = "CONDUCTOR_SIGNING_KEY_FILE"
KEYS_HOME_ENV = "CONDUCTOR_KEYS_HOME"
PROJECT_ID_FILE = "project-id"
OWN_IDENTITIES = ("conductor-engine@*", "llm:*", "conductor-verifier@*")
"""What the project key is trusted to sign for: the engine's in-process executors (command, llm) and
the verifier (attestations)."""
CONDUCTOR_SIGNER = "conductor-verifier@conductor"
"""The identity attestations and checkpoints are checked for: only the project key (and keys a user
trusted for every executor, ``*``) may sign them."""
ANY_EXECUTOR = "*"


def raw_public_bytes(public_key: Ed25519PublicKey) -> bytes:
    """The 32-byte RFC 8032 encoding of ``public_key``."""
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key: Ed25519PublicKey) -> str:
    """The key id of ``public_key``: lowercase hex SHA-256 of its 32 raw bytes (64 characters)."""
    return hashlib.sha256(raw_public_bytes(public_key)).hexdigest()


@dataclass(frozen=True)
class SigningKey:
    """An Ed25519 private key with its key id.

    Attributes:
        private_key: the key.
        key_id: :func:`key_id` of its public key.
    """

    private_key: Ed25519PrivateKey
    key_id: str

    @classmethod
    def of(cls, private_key: Ed25519PrivateKey) -> SigningKey:
        """Wrap ``private_key``, computing its key id."""
        return cls(private_key=private_key, key_id=key_id(private_key.public_key()))

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 (RFC 8032, pure) signature of ``data``."""
        return self.private_key.sign(data)

    def public_pem(self) -> bytes:
        """The public key as SubjectPublicKeyInfo PEM (the content of ``signing.pub``)."""
        return self.public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def __repr__(self) -> str:  # never print key material
        return f"SigningKey(key_id={self.key_id!r})"


# --- creating and loading -----------------------------------------------------------------------


def generate_signing_key(keys_dir: Path) -> SigningKey:
    """Create a new key pair: ``keys_dir/signing.key`` (0600) and ``keys_dir/signing.pub``.

    The private key goes to a temp file created with ``O_CREAT | O_EXCL`` at mode 0600 (so it is never
    readable by others, whatever the umask), is fsynced, then linked into place with ``os.link``,
    which fails if ``signing.key`` exists: a reader sees the whole key or none, and two concurrent
    callers cannot both win. ``keys_dir`` is created with mode 0700 if missing.

    Args:
        keys_dir: the key folder, normally ``ProjectLayout.keys_dir``.

    Returns:
        The new key.

    Raises:
        KeyFileError: ``signing.key`` already exists (nothing is changed).
        OSError: a write, fsync or link failed.
    """
    keys_dir = Path(keys_dir)
    target = keys_dir / SIGNING_KEY_FILE
    if target.exists():
        raise KeyFileError(_exists_message(target))
    keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = SigningKey.of(Ed25519PrivateKey.generate())
    pem = key.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _publish_private(target, pem)
    atomic_write(keys_dir / PUBLIC_KEY_FILE, key.public_pem(), mode=0o644)
    return key


def _exists_message(target: Path) -> str:
    return f"{target}: a signing key already exists; refusing to replace it (delete it first to rotate)"


def _publish_private(target: Path, data: bytes) -> None:
    temp = target.parent / f"{TEMP_PREFIX}{target.name}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask can only remove bits, but be explicit
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(temp, target)
    except FileExistsError as exc:
        raise KeyFileError(_exists_message(target)) from exc
    finally:
        temp.unlink(missing_ok=True)
    fsync_dir(target.parent)


def load_signing_key(path: Path) -> SigningKey:
    """Load an Ed25519 private key from a PKCS#8 PEM file.

    The mode is read from the opened file (``fstat``), so it is the mode of the bytes actually read.

    Args:
        path: the key file (a symlink to it is fine, e.g. a mounted secret).

    Returns:
        The key.

    Raises:
        KeyFileError: the file is missing or not a regular file, grants any permission to group or
            others (``mode & 0o077``; the message gives the mode and the ``chmod 600`` fix), is
            encrypted, does not parse, or holds a key that is not Ed25519.
    """
    path = Path(path)
    data = _read_private(path)
    try:
        private_key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:  # cryptography: "Password was not given but private key is encrypted"
        raise KeyFileError(f"{path}: the signing key is encrypted; Conductor needs an unencrypted PKCS#8 key") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"{path}: not a PEM private key ({exc})") from exc
    if not isinstance(private_key, Ed25519PrivateKey):
        raise KeyFileError(f"{path}: a {type(private_key).__name__.lstrip('_')} key, not Ed25519")
    return SigningKey.of(private_key)


def _read_private(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError as exc:
        raise KeyFileError(f"{path}: no such signing key file") from exc
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot open the signing key ({exc.strerror})") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"{path}: not a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise KeyFileError(
                f"{path}: mode {mode:04o} lets group or others read the signing key; run `chmod 600 {path}`"
            )
        with os.fdopen(os.dup(fd), "rb") as source:
            return source.read()
    finally:
        os.close(fd)


def resolve_signing_key(keys_dir: Path, environ: Mapping[str, str] = os.environ) -> SigningKey | None:
    """The signing key to use: ``$CONDUCTOR_SIGNING_KEY_FILE`` if set, else ``keys_dir/signing.key``.

    Args:
        keys_dir: the project's key folder.
        environ: the environment (an empty ``CONDUCTOR_SIGNING_KEY_FILE`` counts as unset).

    Returns:
        The key, or None when the variable is unset and ``signing.key`` does not exist.

    Raises:
        KeyFileError: the chosen file cannot be loaded (see :func:`load_signing_key`).
    """
    named = environ.get(SIGNING_KEY_ENV, "")
    if named:
        return load_signing_key(Path(named).expanduser())
    default = Path(keys_dir) / SIGNING_KEY_FILE
    if not default.exists() and not default.is_symlink():
        return None
    return load_signing_key(default)


def project_id(conductor_dir: Path) -> str:
    """The project's id (``.conductor/project-id``), made once: 16 random hex characters.

    Raises:
        KeyFileError: the file exists but does not hold such an id.
    """
    path = Path(conductor_dir) / PROJECT_ID_FILE
    if not path.exists():
        conductor_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        except FileExistsError:
            pass  # another process made it first: read theirs
        else:
            try:
                write_all(fd, (secrets.token_hex(8) + "\n").encode(), path)
                os.fsync(fd)
            finally:
                os.close(fd)
    text = path.read_text(encoding="ascii", errors="replace").strip()
    if len(text) != 16 or any(c not in "0123456789abcdef" for c in text):
        raise KeyFileError(f"{path}: not a project id (16 lowercase hex characters): {text[:40]!r}")
    return text


def private_keys_dir(conductor_dir: Path, environ: Mapping[str, str] = os.environ) -> Path:
    """Where the project's private key lives (see the module docstring)."""
    base = environ.get(KEYS_HOME_ENV) or ""
    if not base:
        config_home = environ.get("XDG_CONFIG_HOME") or os.path.join(environ.get("HOME") or os.path.expanduser("~"),
                                                                      ".config")
        base = os.path.join(config_home, "conductor", "keys")
    return Path(base) / project_id(Path(conductor_dir))


def project_key(keys_dir: Path, conductor_dir: Path, environ: Mapping[str, str] = os.environ, *,
                create: bool = True) -> SigningKey | None:
    """The project's signing key: ``$CONDUCTOR_SIGNING_KEY_FILE`` if set, else the private key folder's
    (a legacy ``keys_dir/signing.key`` is moved there first; with ``create`` a missing key is made). The
    public copy ``keys_dir/signing.pub`` is kept in step with the key.

    Returns:
        The key, or None without ``create`` when there is none.

    Raises:
        KeyFileError: a key file cannot be loaded, or is readable by others.
    """
    named = environ.get(SIGNING_KEY_ENV, "")
    if named:
        return load_signing_key(Path(named).expanduser())
    private = private_keys_dir(conductor_dir, environ)
    legacy = Path(keys_dir) / SIGNING_KEY_FILE
    if legacy.exists() and not (private / SIGNING_KEY_FILE).exists():
        key = load_signing_key(legacy)  # refuses a world-readable one before moving it
        private.mkdir(mode=0o700, parents=True, exist_ok=True)
        _publish_private(private / SIGNING_KEY_FILE, legacy.read_bytes())
        atomic_write(private / PUBLIC_KEY_FILE, key.public_pem(), mode=0o644)
        legacy.unlink()
        fsync_dir(legacy.parent)
    if (private / SIGNING_KEY_FILE).exists():
        key = load_signing_key(private / SIGNING_KEY_FILE)
    elif create:
        key = generate_signing_key(private)
    else:
        return None
    public = Path(keys_dir) / PUBLIC_KEY_FILE
    if not public.exists() or public.read_bytes() != key.public_pem():
        Path(keys_dir).mkdir(parents=True, exist_ok=True)
        atomic_write(public, key.public_pem(), mode=0o644)
    return key


def load_public_key(source: Path | bytes) -> Ed25519PublicKey:
    """Load an Ed25519 public key from SubjectPublicKeyInfo PEM.

    Args:
        source: a PEM file, or the PEM bytes themselves.

    Raises:
        KeyFileError: the file is missing, the PEM does not parse, or the key is not Ed25519.
    """
    where = str(source) if isinstance(source, Path) else "public key"
    if isinstance(source, Path):
        try:
            source = source.read_bytes()
        except OSError as exc:
            raise KeyFileError(f"{where}: cannot read the public key ({exc.strerror})") from exc
    try:
        public_key = serialization.load_pem_public_key(source)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"{where}: not a PEM public key ({exc})") from exc
    if not isinstance(public_key, Ed25519PublicKey):
        raise KeyFileError(f"{where}: a {type(public_key).__name__.lstrip('_')} key, not Ed25519")
    return public_key


# --- trust --------------------------------------------------------------------------------------


def _trust_entry_line(base_dir: Path, index: int) -> str:
    """``<config.yaml>:<line>`` of ``trust.keys[index].public_key`` (the file alone when no line is known)."""
    from conductor.yamlutil import display_path, read_yaml_document

    config = base_dir / "config.yaml"
    try:
        document = read_yaml_document(config)
    except (ConductorError, OSError):
        return display_path(config)
    line = document.lines.get(("trust", "keys", index, "public_key")) or document.lines.get(("trust", "keys", index))
    return f"{document.source}:{line}" if line else document.source


@dataclass(frozen=True)
class TrustedPublicKey:
    """One trusted key: its id, the key, the executor-id patterns it may sign for, where it came from."""

    key_id: str
    public_key: Ed25519PublicKey
    executors: tuple[str, ...]
    source: str


class TrustStore:
    """Key id → trusted Ed25519 public key, with the executors each key may sign for.

    Executor patterns are ``fnmatch`` patterns matched case-sensitively against an executor id
    (``"conductor-worker@*"``, ``"llm:*"``); ``"*"`` trusts a key for every executor.
    """

    def __init__(self, keys: Iterable[TrustedPublicKey] = ()):
        self._keys: dict[str, TrustedPublicKey] = {}
        for entry in keys:
            self.add(entry.public_key, entry.executors, source=entry.source)

    @classmethod
    def for_project(cls, keys_dir: Path, trust_config: TrustConfig, base_dir: Path, *,
                    own_key: Ed25519PublicKey | None = None) -> TrustStore:
        """The project's trust: its own key (for :data:`OWN_IDENTITIES` only) plus each ``trust.keys`` entry.

        Args:
            keys_dir: the project's key folder; its ``signing.pub`` is the own key when ``own_key`` is
                None (a missing one is simply not added).
            trust_config: the ``trust`` section of ``config.yaml``.
            base_dir: the folder relative ``public_key`` paths are resolved against (``.conductor/``).
            own_key: the public half of the signing key in use, which wins over the ``signing.pub`` copy
                kept in the project (a file an executor might have replaced).

        Raises:
            KeyFileError: a configured key file is missing, malformed or not Ed25519, naming the file, the
                entry (``trust.keys[i].public_key``) and its line in ``base_dir/config.yaml``.
        """
        store = cls()
        own = Path(keys_dir) / PUBLIC_KEY_FILE
        if own_key is not None:
            store.add(own_key, OWN_IDENTITIES, source="the project's signing key")
        elif own.exists():
            store.add(load_public_key(own), OWN_IDENTITIES, source=str(own))
        for index, entry in enumerate(trust_config.keys):
            path = Path(entry.public_key).expanduser()
            if not path.is_absolute():
                path = Path(base_dir) / path
            try:
                public_key = load_public_key(path)
            except KeyFileError as exc:
                raise KeyFileError(f"{_trust_entry_line(Path(base_dir), index)}: trust.keys[{index}].public_key "
                                   f"{entry.public_key!r} cannot be used: {exc}") from exc
            store.add(public_key, entry.executors, source=str(path))
        return store

    def add(self, public_key: Ed25519PublicKey, executors: Iterable[str] = (ANY_EXECUTOR,), *, source: str = "") -> str:
        """Trust ``public_key`` for ``executors`` (added to any patterns it already has); return its id."""
        identifier = key_id(public_key)
        known = self._keys.get(identifier)
        patterns = tuple(dict.fromkeys([*(known.executors if known else ()), *executors]))
        self._keys[identifier] = TrustedPublicKey(identifier, public_key, patterns, known.source if known else source)
        return identifier

    def public_key(self, key_id: str) -> Ed25519PublicKey | None:
        """The trusted key with this id, or None."""
        entry = self._keys.get(key_id)
        return entry.public_key if entry else None

    def trusted_for(self, key_id: str, executor_id: str) -> bool:
        """Whether the key may sign for the executor ``executor_id`` (False for an unknown key)."""
        entry = self._keys.get(key_id)
        return entry is not None and any(fnmatch.fnmatchcase(executor_id, p) for p in entry.executors)

    def fully_trusted(self, key_id: str) -> bool:
        """Whether the key is trusted for every executor (pattern ``"*"``), as Conductor's own key is."""
        entry = self._keys.get(key_id)
        return entry is not None and ANY_EXECUTOR in entry.executors

    def entries(self) -> list[TrustedPublicKey]:
        """Every trusted key, in the order added."""
        return list(self._keys.values())

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"TrustStore({', '.join(f'{k[:16]}:{list(v.executors)}' for k, v in self._keys.items())})"
