"""Fixtures of the fault-injection suite: one initialised sample project per session, copied per trial."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fault.harness import make_template


@pytest.fixture(scope="session")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_template(tmp_path_factory.mktemp("fault-template") / "project")
