"""The README's offline example (examples/slugify with its plan) gives the result the README describes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.e2e.project import all_chains_verify, conductor

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "slugify"


def test_slugify_example_explores_three_strategies_offline(tmp_path: Path) -> None:
    root = tmp_path / "slugify"
    shutil.copytree(EXAMPLE, root)
    assert conductor(root, "init").returncode == 0
    shutil.copy(root / "policy.yaml", root / ".conductor" / "policy.yaml")
    (root / ".conductor" / "config.yaml").write_text(yaml.safe_dump({
        "executor": {"kind": "command", "command": 'sh -c "$CONDUCTOR_INSTRUCTION"', "poll_seconds": 0.5},
        "verification": {"commands": [f"{sys.executable} -m pytest -q -p no:cacheprovider"]},
    }))

    run = conductor(root, "explore", "--plan", "plan.yaml", "--json")

    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    ranking = {r["fork_id"]: r for r in report["ranking"]}
    assert [r["fork_id"] for r in report["ranking"]] == ["1", "2", "3"]
    assert ranking["1"]["changed_lines"] < ranking["2"]["changed_lines"]
    assert ranking["3"]["status"] == "failed"
    assert report["applied_fork"] == "1" and sorted(report["applied_files"]) == ["settings.json", "slug.py"]
    assert (root / "requirements.lock").read_text() == "regex==2026.11.1\n"
    assert json.loads((root / "settings.json").read_text())["name"] == "slugify"
    assert (root / "settings.json").read_text().startswith('{\n  "name"')
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=root,
                           capture_output=True, text=True)
    assert tests.returncode == 0, tests.stdout
    story = json.loads(conductor(root, "explain", "step_001", "--fork", "3", "--json").stdout)
    assert story[0]["verdict"]["reasons"] == ["requirements.lock: matches protected pattern '*.lock' (project)"]
    all_chains_verify(root)


def test_the_demo_scripts_config_edits_give_the_config_it_means(tmp_path: Path) -> None:
    """examples/demo.sh edits the commented template with regular expressions: they must hit the executor's
    keys (and only those) of the template `conductor init` writes today."""
    from conductor.config import load_config

    script = (EXAMPLE.parent / "demo.sh").read_text()
    edit = script.split("python - <<'PY'\n", 1)[1].split("\nPY\n", 1)[0]
    root = tmp_path / "project"
    root.mkdir()
    assert conductor(root, "init").returncode == 0
    subprocess.run([sys.executable, "-c", edit], cwd=root, check=True)
    config = load_config(root / ".conductor" / "config.yaml")
    assert (config.executor.kind, config.planner.kind) == ("command", "llm")
    assert config.executor.command == 'sh -c "$CONDUCTOR_INSTRUCTION"'
    assert config.verification.commands == ["python -m pytest -q -p no:cacheprovider"]
