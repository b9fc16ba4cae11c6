"""Recording the git commands Conductor runs, for tests that count them."""

from __future__ import annotations

import pytest

from conductor.workspace.git import Git


def record_git_calls(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Every git command run through :meth:`Git.run` from now on (until ``monkeypatch`` undoes it), as its
    argument list, in order; the list is filled as they run and may be cleared between looks."""
    calls: list[list[str]] = []
    real = Git.run

    def recorded(self: Git, args, **kw):  # type: ignore[no-untyped-def]
        calls.append(list(args))
        return real(self, args, **kw)

    monkeypatch.setattr(Git, "run", recorded)
    return calls


def commands(calls: list[list[str]]) -> list[str]:
    """The git subcommand of each recorded call (``["ls-files", "write-tree"]``)."""
    return [args[0] for args in calls]


def stat_passes(calls: list[list[str]]) -> list[list[str]]:
    """The recorded git runs that look at every tracked file of a folder."""
    return [args for args in calls if args[0] == "ls-files" and ("-m" in args or "-d" in args)]
