"""Fixtures of the handoff-protocol tests (builders live in ``tests/handoff/support.py``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.handoff.support import Handoff, make_handoff


@pytest.fixture(autouse=True)
def isolated_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No ``CONDUCTOR_*`` variable leaks in, and the home folder is a fresh folder in ``tmp_path``."""
    for name in list(os.environ):
        if name.startswith("CONDUCTOR_"):
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


@pytest.fixture
def handoff(tmp_path: Path) -> Handoff:
    """A project with one plan, one fork and three independent steps; nothing published yet."""
    return make_handoff(tmp_path / "project", steps=3)
