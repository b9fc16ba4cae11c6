"""A fork's state as tests see it: the files of its newest commit (``.conductor/git``), read from the log."""

from __future__ import annotations

from conductor.attempts import state_store
from conductor.audit import AuditLog
from conductor.layout import ProjectLayout


def fork_head(layout: ProjectLayout, plan_id: str, fork_id: str) -> str:
    """The commit of the fork's newest ``step.merged`` (else its ``fork.created``)."""
    for event in reversed(AuditLog(layout.fork(plan_id, fork_id).audit_log).events()):
        if event.type in ("step.merged", "fork.created") and event.data.get("commit"):
            return event.data["commit"]
    raise AssertionError(f"fork {fork_id} has no commit in its log")


def fork_files(layout: ProjectLayout, plan_id: str, fork_id: str) -> dict[str, bytes]:
    """Path → content of every file of the fork's state now."""
    store = state_store(layout)
    entries = store.entries(store.tree_of(fork_head(layout, plan_id, fork_id)))
    blobs = store.read_blobs(e.oid for e in entries.values())
    return {path: blobs[e.oid] for path, e in entries.items()}


def fork_text(layout: ProjectLayout, plan_id: str, fork_id: str, path: str) -> str | None:
    """The text of one file of the fork's state, or None when the fork has no such file."""
    data = fork_files(layout, plan_id, fork_id).get(path)
    return None if data is None else data.decode("utf-8")
