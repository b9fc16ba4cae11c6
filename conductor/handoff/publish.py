"""Publishing a task: the only way a task file enters ``pending/``."""

from __future__ import annotations

from conductor.errors import StateConflict
from conductor.handoff.documents import write_document
from conductor.layout import ForkLayout
from conductor.models import Task


def ensure_fork_dirs(fork: ForkLayout) -> None:
    """Create the fork's four state folders if they are missing."""
    for state in ("pending", "in_progress", "completed", "failed"):
        fork.state_dir(state).mkdir(parents=True, exist_ok=True)


def publish_task(fork: ForkLayout, task: Task) -> Task:
    """Seal ``task`` with its checksum and publish it into ``pending/``.

    The write is temp + fsync + ``os.link`` + directory fsync: an executor never sees a partial file, and
    an existing task file is never overwritten.

    Returns:
        The sealed task (with ``checksum``).

    Raises:
        StateConflict: a task file for this step already exists in any state folder.
    """
    found = fork.find_task(task.task_id)
    if found is not None:
        raise StateConflict(f"{task.task_id}: already in {found[0]}/ of fork {fork.fork_id}; not published again")
    try:
        return write_document(fork.task_file("pending", task.task_id), task, exclusive=True)
    except FileExistsError as exc:
        raise StateConflict(f"{task.task_id}: already pending in fork {fork.fork_id}") from exc
