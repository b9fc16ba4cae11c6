"""Recorded LLM calls: a replay, resume, fork or rerun never pays twice for the same request.

Every successful call is stored content-addressed under ``.conductor/recordings/`` by its *request key*
(:func:`request_key`); a later identical request reuses the recording instead of calling the provider.

The key is ``"sha256:" + hex(SHA-256(JCS(k)))`` (JCS: RFC 8785, :func:`conductor.canonical.digest`) where
``k`` is exactly::

    {"provider": settings.provider, "model": settings.model, "system": <system prompt>,
     "prompt": <user prompt>, "schema": schema.model_json_schema(), "temperature": settings.temperature}

Nothing else is in it: the base URL, timeout, retries and prices do not change the answer (and a local
test server's port changes between runs). ``temperature`` ``None`` (the provider's default) and ``0`` are
different keys.

A recording is ``<root>/<hex[:2]>/<hex>.json``, a checksummed JSON document (:class:`Recording`, schema
``conductor.recording/v1``). Files are written atomically (temp file, fsync, rename), so concurrent
writers of one key never leave a torn file: the same key means the same request, and the last complete
write wins. A recording that is not strict JSON, fails its checksum or does not match its key raises
:class:`~conductor.errors.IntegrityError` naming the file: it is never silently paid for again.

Cost accounting: a replayed reply (``LLMReply.cached``) carries the recorded usage (tokens and cost are
facts of the recorded call), and the ``llm.call`` audit event says ``"cached": true``; totals of new
spending must skip those events. ``max_output_tokens`` is not in the key either: it only cuts an answer
short, and a cut answer is a failure, never recorded. The cost ledger (``conductor.llm.ledger``) sits in
front of this client: it asks :meth:`RecordingClient.replay` first, so a replay is never charged to a
budget.
"""

from __future__ import annotations

import dataclasses
import re
import threading
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from conductor.canonical import check_checksum, digest, pretty_bytes, seal, strict_loads
from conductor.errors import IntegrityError, InvalidDocument
from conductor.fsutil import atomic_write, fsync_dir
from conductor.llm.base import LLMClient, LLMReply, LLMSettings, T
from conductor.models import Checksum, Contract, Usage, utc_now

RECORDING_SCHEMA = "conductor.recording/v1"
# A step's prompt carries up to 256 KiB of file content and its answer whole files; this bounds what a
# read will parse, far above any real recording.
MAX_RECORDING_BYTES = 64 * 1024 * 1024
NO_CACHE_HINT = "delete it or run with --no-cache to call the provider again"
_KEY = re.compile(r"^sha256:([0-9a-f]{64})$")


class RecordedRequest(Contract):
    """What was asked: the fields of the request key plus the schema's name."""

    provider: str
    model: str
    system: str
    prompt: str
    schema_name: str
    json_schema: dict[str, Any] = Field(description="schema.model_json_schema() of the requested answer")
    temperature: float | None

    def key(self) -> str:
        """The request key of this request (see the module docstring)."""
        return digest({
            "provider": self.provider, "model": self.model, "system": self.system, "prompt": self.prompt,
            "schema": self.json_schema, "temperature": self.temperature,
        })


class RecordedResponse(Contract):
    """What the provider answered."""

    raw_text: str = Field(description="the structured answer as received (JSON text)")
    model: str = Field(description="the model name the provider reported")
    usage: Usage
    duration_seconds: float = Field(ge=0.0, description="wall time of the original call, seconds")


class Recording(Contract):
    """``recordings/<hex[:2]>/<hex>.json``: one request and its answer. Checksummed."""

    schema_: Literal["conductor.recording/v1"] = Field(default=RECORDING_SCHEMA, alias="schema")
    key: Checksum
    request: RecordedRequest
    response: RecordedResponse
    recorded_at: str
    checksum: Checksum | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)

    def to_document(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def recorded_request(settings: LLMSettings, *, system: str, prompt: str, schema: type[BaseModel]) -> RecordedRequest:
    """The :class:`RecordedRequest` of one call of a client with ``settings``."""
    return RecordedRequest(
        provider=settings.provider, model=settings.model, system=system, prompt=prompt,
        schema_name=schema.__name__, json_schema=schema.model_json_schema(), temperature=settings.temperature,
    )


def request_key(settings: LLMSettings, *, system: str, prompt: str, schema: type[BaseModel]) -> str:
    """The key of a request: ``"sha256:<64 hex>"`` over the RFC 8785 form of exactly
    ``{provider, model, system, prompt, schema: schema.model_json_schema(), temperature}``.

    Base URL, timeout, retries and prices are left out: they do not change the answer.

    Raises:
        InvalidDocument: the schema's JSON Schema cannot be canonicalised (e.g. a NaN default).
    """
    return recorded_request(settings, system=system, prompt=prompt, schema=schema).key()


class RecordingStore:
    """Recordings on disk, one file per request key.

    Args:
        root: the recordings folder (``ProjectLayout.recordings_dir``); created on the first write.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, key: str) -> Path:
        """``root/<hex[:2]>/<hex>.json`` of ``key``.

        Raises:
            ValueError: ``key`` is not ``"sha256:<64 lowercase hex>"``.
        """
        match = _KEY.match(key)
        if match is None:
            raise ValueError(f"not a recording key: {key!r}")
        hexdigest = match.group(1)
        return self.root / hexdigest[:2] / f"{hexdigest}.json"

    def get(self, key: str) -> Recording | None:
        """The recording of ``key``, or ``None`` when there is none.

        Raises:
            IntegrityError: (``InvalidDocument`` or ``ChecksumMismatch``) naming the file: too large, not
                strict JSON, another schema version, a missing or invalid field, a wrong checksum, or a
                request whose key is not ``key``.
            OSError: the file exists but cannot be read.
        """
        path = self.path(key)
        try:
            with path.open("rb") as handle:
                data = handle.read(MAX_RECORDING_BYTES + 1)
        except FileNotFoundError:
            return None
        try:
            return _parse(data, path, key)
        except IntegrityError as exc:
            raise type(exc)(f"{exc}; the recording is damaged: {NO_CACHE_HINT}") from exc

    def put(self, recording: Recording) -> Recording:
        """Seal ``recording`` with its checksum and write it durably under its key; return the sealed one.

        Replaces an existing recording of the key atomically (the last complete write wins).

        Raises:
            InvalidDocument: ``recording.key`` is not the key of ``recording.request``.
            OSError: the write failed (nothing partial is left under the final name).
        """
        if recording.key != recording.request.key():
            raise InvalidDocument(f"recording key {recording.key} is not the key of its request")
        document = recording.to_document()
        document.pop("checksum", None)
        sealed = seal(document)
        path = self.path(recording.key)
        self._make_dirs(path.parent)
        atomic_write(path, pretty_bytes(sealed))
        return Recording.model_validate(sealed)

    def _make_dirs(self, shard: Path) -> None:
        if shard.is_dir():
            return
        created = not self.root.is_dir()
        shard.mkdir(parents=True, exist_ok=True)
        # fsync the parents so the new folders (and so the file) survive a power loss.
        fsync_dir(self.root)
        if created:
            fsync_dir(self.root.parent)


def _parse(data: bytes, path: Path, key: str) -> Recording:
    if len(data) > MAX_RECORDING_BYTES:
        raise InvalidDocument(f"{path}: larger than {MAX_RECORDING_BYTES} bytes")
    document = strict_loads(data, source=str(path))
    if not isinstance(document, dict):
        raise InvalidDocument(f"{path}: top level is not an object")
    if document.get("schema") != RECORDING_SCHEMA:
        raise InvalidDocument(f"{path}: schema {document.get('schema')!r} is not {RECORDING_SCHEMA!r}")
    check_checksum(document, source=str(path))
    try:
        recording = Recording.model_validate(document)
    except ValidationError as exc:
        where = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3])
        raise InvalidDocument(f"{path}: {where}") from exc
    # A valid checksum proves the file is whole, not that it sits under the right name.
    if recording.key != key or recording.request.key() != key:
        raise InvalidDocument(f"{path}: holds the request {recording.request.key()}, not {key}")
    return recording


class RecordingClient:
    """An :class:`~conductor.llm.base.LLMClient` that answers from recordings and records every new call.

    Thread-safe: identical requests running at once make one provider call (the others wait for it and
    replay it), unless ``refresh`` is set.

    Args:
        inner: the client that calls the provider.
        store: where recordings are read and written.
        refresh: never replay; every call goes to the provider and replaces its recording (``--no-cache``).
    """

    def __init__(self, inner: LLMClient, store: RecordingStore, *, refresh: bool = False) -> None:
        self.inner = inner
        self.settings = inner.settings
        self.store = store
        self.refresh = refresh
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def generate(self, *, system: str, prompt: str, schema: type[T]) -> LLMReply[T]:
        """Replay the recording of this request, or ask ``inner`` and record the answer.

        Returns:
            The reply with ``recording`` set to the request key; ``cached`` is ``True`` for a replay
            (``duration_seconds`` ``0.0``, usage and model as recorded).

        Raises:
            IntegrityError: the recording of this request is damaged (the message names the file).
            BackendError: from ``inner``; nothing is recorded.
            OSError: the recording cannot be read or written.
        """
        request = recorded_request(self.settings, system=system, prompt=prompt, schema=schema)
        key = request.key()
        if self.refresh:
            return self._call(request, key, system=system, prompt=prompt, schema=schema)
        with self._lock(key):
            replay = self._replay(key, schema)
            if replay is not None:
                return replay
            return self._call(request, key, system=system, prompt=prompt, schema=schema)

    def replay(self, *, system: str, prompt: str, schema: type[T]) -> LLMReply[T] | None:
        """The recorded answer of this request, or ``None`` when a call is needed (none recorded, an
        answer the schema's validators now reject, or ``refresh``). Never calls the provider.

        Raises:
            IntegrityError: the recording of this request is damaged (the message names the file).
            OSError: the recording cannot be read.
        """
        if self.refresh:
            return None
        key = recorded_request(self.settings, system=system, prompt=prompt, schema=schema).key()
        return self._replay(key, schema)

    def _lock(self, key: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(key, threading.Lock())

    def _replay(self, key: str, schema: type[T]) -> LLMReply[T] | None:
        recording = self.store.get(key)
        if recording is None:
            return None
        response = recording.response
        try:
            parsed = schema.model_validate_json(response.raw_text)
        except ValidationError:
            # The key holds the JSON Schema, but validators (field_validator, model_validator) are not in
            # it: a schema whose code changed can reject an old answer. Ask again; the new answer
            # replaces the recording.
            return None
        return LLMReply(parsed=parsed, usage=response.usage, model=response.model, raw_text=response.raw_text,
                        duration_seconds=0.0, recording=key, cached=True)

    def _call(self, request: RecordedRequest, key: str, *, system: str, prompt: str,
              schema: type[T]) -> LLMReply[T]:
        reply = self.inner.generate(system=system, prompt=prompt, schema=schema)
        self.store.put(Recording(
            key=key, request=request, recorded_at=utc_now(),
            response=RecordedResponse(raw_text=reply.raw_text, model=reply.model, usage=reply.usage,
                                      duration_seconds=max(0.0, reply.duration_seconds)),
        ))
        return dataclasses.replace(reply, recording=key, cached=False)
