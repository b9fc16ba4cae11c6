"""Private working copies for each attempt of a step.

Every attempt runs in its own copy (``.conductor/scratch/plan_P/fork_F/<step>.a<n>/``) made from the
fork's integrated workspace, with the copy's snapshot (the *base*) stored beside it as
``<step>.a<n>.base.json`` and its file contents in the blob store. So Conductor can compute what an
executor really changed, a retry starts from exactly the same base (restored from the blobs), and a zombie
executor still writing into an old attempt's copy touches nothing anyone reads.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from conductor.blobs import BlobStore
from conductor.canonical import pretty_bytes, strict_loads
from conductor.fsutil import atomic_write
from conductor.layout import ProjectLayout
from conductor.models import Task
from conductor.workspace import (
    Snapshot,
    copy_tree,
    restore_snapshot,
    snapshot,
    snapshot_from_document,
    snapshot_to_document,
)


def base_file(scratch: Path) -> Path:
    """Where the base snapshot of the attempt copy ``scratch`` is stored."""
    return scratch.parent / f"{scratch.name}.base.json"


def write_base(scratch: Path, base: Snapshot) -> None:
    atomic_write(base_file(scratch), pretty_bytes(snapshot_to_document(base)))


def read_base(scratch: Path) -> Snapshot:
    """Load the base snapshot of an attempt copy.

    Raises:
        FileNotFoundError: the attempt has no stored base.
        InvalidDocument: the stored base is not strict JSON.
    """
    path = base_file(scratch)
    return snapshot_from_document(strict_loads(path.read_bytes(), source=str(path)))


def create_attempt_workspace(
    layout: ProjectLayout, source: Path, scratch: Path, *, ignore: list[str]
) -> Snapshot:
    """Copy ``source`` (a fork workspace) to a fresh ``scratch`` and record its base snapshot.

    A leftover copy from a crashed earlier run is removed first: until a task is published nothing has
    run in it.
    """
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.parent.mkdir(parents=True, exist_ok=True)
    copy_tree(source, scratch, ignore=ignore)
    base = snapshot(scratch, ignore=ignore, store=BlobStore(layout.objects_dir))
    write_base(scratch, base)
    return base


def prepare_retry(layout: ProjectLayout, task: Task) -> Task:
    """Give a re-queued task (``attempt`` already incremented) a fresh copy of its step's base.

    Returns:
        The task with ``workspace`` pointing at the new attempt's copy.
    """
    old = layout.root / task.workspace
    base = read_base(old)
    scratch = layout.scratch_dir(task.plan_id, task.fork_id, task.task_id, task.attempt)
    if scratch.exists():
        shutil.rmtree(scratch)
    restore_snapshot(base, BlobStore(layout.objects_dir), scratch)
    write_base(scratch, base)
    return task.model_copy(update={"workspace": layout.relative(scratch)})
