"""Workspace snapshots kept after every step, so any past workspace can be restored.

A snapshot is the manifest :func:`conductor.workspace.snapshot_to_document` makes (path → kind, mode,
sha256, size), stored as RFC 8785 canonical bytes in the content-addressed blob store next to the file
contents it names. Unchanged files are shared by every snapshot that holds them, so keeping one per step
costs one manifest plus the bytes that step changed. A snapshot is named by ``"sha256:<hex>"`` of its
manifest: the ``step.merged`` event and the step's attestation record it.
"""

from __future__ import annotations

from pathlib import Path

from conductor.blobs import BlobStore
from conductor.canonical import canonical_bytes, strict_loads
from conductor.errors import InvalidDocument
from conductor.layout import ProjectLayout
from conductor.workspace import (
    Snapshot,
    restore_snapshot,
    snapshot,
    snapshot_from_document,
    snapshot_to_document,
)

PREFIX = "sha256:"


def record_workspace(layout: ProjectLayout, workspace: Path, *, ignore: list[str]) -> str:
    """Store the files of ``workspace`` and their manifest in the project's blob store.

    Returns:
        ``"sha256:<hex>"`` of the manifest's canonical bytes.

    Raises:
        UnsafePath: the workspace holds a fifo, socket or device.
        OSError: a file cannot be read or the store cannot be written.
    """
    store = BlobStore(layout.objects_dir)
    manifest = snapshot(workspace, ignore=ignore, store=store)
    return PREFIX + store.put_bytes(canonical_bytes(snapshot_to_document(manifest)))


def manifest_digest(manifest: Snapshot) -> str:
    """``"sha256:<hex>"`` a manifest would be stored under (without storing anything)."""
    from conductor.canonical import digest

    return digest(snapshot_to_document(manifest))


def load_workspace(layout: ProjectLayout, snapshot_id: str) -> Snapshot:
    """The manifest stored under ``snapshot_id``.

    Raises:
        InvalidDocument: ``snapshot_id`` is not ``"sha256:<hex>"`` or the manifest is malformed.
        NotFound: the manifest is not in the store.
        ChecksumMismatch: the stored manifest was altered.
    """
    if not snapshot_id.startswith(PREFIX):
        raise InvalidDocument(f"not a workspace snapshot id: {snapshot_id!r}")
    store = BlobStore(layout.objects_dir)
    try:
        data = store.get_bytes(snapshot_id[len(PREFIX):])
    except ValueError as exc:
        raise InvalidDocument(f"not a workspace snapshot id: {snapshot_id!r}") from exc
    return snapshot_from_document(strict_loads(data, source=f"workspace snapshot {snapshot_id}"))


def restore_workspace(layout: ProjectLayout, snapshot_id: str, destination: Path) -> Snapshot:
    """Materialise the snapshot ``snapshot_id`` into ``destination`` (absent or an empty folder).

    Returns:
        The manifest restored.

    Raises:
        FileExistsError: ``destination`` exists and is not empty.
        NotFound / ChecksumMismatch / InvalidDocument: see :func:`load_workspace`; a file blob is
            missing or altered.
    """
    manifest = load_workspace(layout, snapshot_id)
    restore_snapshot(manifest, BlobStore(layout.objects_dir), destination)
    return manifest
