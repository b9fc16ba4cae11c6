"""Fixtures of the bad-input corpus (builders live in ``tests/corpus/builders.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.handoff.support import Handoff, make_handoff


@pytest.fixture
def handoff(tmp_path: Path) -> Handoff:
    """A project with one plan, one fork and three independent steps (allowed: README.md); nothing published."""
    return make_handoff(tmp_path / "project", steps=3)
