"""The folders the forks of a plan start in are checked out together, in the background, not one after the
other as each fork comes to publish its first step (each costs what ``git worktree add`` costs)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
import yaml

import conductor.attempts as attempts
from conductor.cli.main import main
from tests.e2e.project import all_chains_verify, make_project


@pytest.mark.timeout(300)
def test_the_first_folders_of_two_forks_are_checked_out_at_the_same_time(tmp_path: Path, monkeypatch, capsys) -> None:
    root = make_project(tmp_path / "proj", config={
        "executor": {"kind": "command", "command": 'sh -c "$CONDUCTOR_INSTRUCTION"'}, "verification": {"commands": []}})
    plan = root / "plan.yaml"
    plan.write_text(yaml.safe_dump({"goal": "Comment calc", "strategies": [
        {"name": name, "steps": [{"id": "note", "instruction": f"echo '# {name}' >> calc.py",
                                  "allowed_files": ["calc.py"], "confidence": 0.9}]} for name in ("one", "two")]}))
    for name in [k for k in os.environ if k.startswith(("CONDUCTOR_", "OPENAI_", "GEMINI_", "GOOGLE_"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    # Each of the first two checkouts waits for the other: made one after the other, the first would wait in vain.
    meeting, alone, calls = threading.Barrier(2), [], []
    real = attempts.materialize

    def checkout(store, commit, folder, **kw):  # type: ignore[no-untyped-def]
        calls.append(folder.name)
        if len(calls) <= 2:
            try:
                meeting.wait(timeout=60)
            except threading.BrokenBarrierError:
                alone.append(folder.name)
        return real(store, commit, folder, **kw)

    monkeypatch.setattr(attempts, "materialize", checkout)

    code = main(["explore", "--plan", str(plan), "--json", "--no-apply", "-C", str(root)])

    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["status"] == "succeeded", report
    assert sorted(calls) == ["step_001.a1", "step_001.a1"] and alone == []
    assert not list((root / ".conductor" / "scratch").rglob(".tmp.ahead.*"))
    all_chains_verify(root)
