"""Workspaces on git: Conductor's private repository (``store``), the folders checked out from it for
attempts (``checkout``), the git runner no workspace can steer (``git``) and applying a tree's changes to
the project (``apply``)."""

from conductor.models import FileChange


def diff_lines(changes: list[FileChange]) -> int:
    """Total lines added plus removed over ``changes``."""
    return sum(c.lines_added + c.lines_removed for c in changes)
