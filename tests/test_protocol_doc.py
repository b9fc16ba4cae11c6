"""docs/protocol.md and docs/cli.md tell the truth: their examples run, their tables match the code.

The minimal executor of docs/protocol.md (a code block that does not import conductor) is extracted and
run as a separate process against a real project whose tasks ``conductor explore --executor handoff
--no-wait`` published; ``conductor resume --executor handoff`` must then finish the plan.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conductor.audit import EVENT_TYPES, verify_chain
from conductor.canonical import canonical_bytes, compute_checksum, seal
from conductor.cli.main import COMMANDS
from conductor.config import env_variables
from conductor.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_TERMINATED, ConductorError
from conductor.executors.command import task_environment
from conductor.layout import ProjectLayout
from conductor.models import Confidence, Task
from tests.test_schemas import validate

DOCS = Path(__file__).resolve().parent.parent / "docs"
PROTOCOL = DOCS / "protocol.md"
CLI = DOCS / "cli.md"
TIMEOUT = 120

PLAN = """\
goal: Fix the greeting
strategies:
  - name: sed
    steps:
      - id: fix
        instruction: sed -i 's/Helo/Hello/' greet.py
        allowed_files: [greet.py]
        confidence: 0.9
      - id: test
        instruction: printf 'import greet\\n' > test_greet.py
        allowed_files: [test_greet.py]
        depends_on: [fix]
        confidence: 0.85
  - name: python
    steps:
      - id: fix
        instruction: python3 -c "import pathlib; p = pathlib.Path('greet.py'); p.write_text(p.read_text().replace('Helo', 'Hello'))"
        allowed_files: [greet.py]
"""


def block(marker: str, path: Path = PROTOCOL) -> str:
    """The fenced code block that follows ``<!-- marker -->`` in a doc."""
    text = path.read_text("utf-8")
    match = re.search(rf"<!-- {re.escape(marker)} -->\n```[a-z]*\n(.*?)\n```\n", text, re.S)
    assert match, f"no code block after <!-- {marker} --> in {path.name}"
    return match.group(1)


def table_after(marker: str, path: Path = PROTOCOL) -> list[str]:
    """First cells (backticks stripped) of the Markdown table that follows ``<!-- marker -->``."""
    text = path.read_text("utf-8").split(f"<!-- {marker} -->\n", 1)[1]
    cells = []
    for line in text.splitlines():
        if not line.startswith("|"):
            break
        cells.append(line.split("|")[1].strip().strip("`"))
    return cells[2:]  # header and separator


# --- examples and tables ------------------------------------------------------------------------


def test_the_checksum_example_is_right() -> None:
    document = json.loads(block("checksum-example"))
    assert compute_checksum(document) == document["checksum"]
    body = {k: v for k, v in document.items() if k != "checksum"}
    text = PROTOCOL.read_text("utf-8")
    assert "\n" + canonical_bytes(body).decode("utf-8") + "\n" in text
    assert document["checksum"] in text.split("In Python:", 1)[1]


def test_the_audit_example_is_a_valid_chain(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    log.write_text(block("audit-example") + "\n", encoding="utf-8")
    report = verify_chain(log)
    assert report.ok, report.problems
    assert report.entries == 2


def test_the_command_environment_table_is_complete(tmp_path: Path) -> None:
    task = Task(task_id="step_001", plan_id="p", fork_id="1", attempt=1, instruction="x", allowed_files=[],
                workspace="w", timeout_seconds=1, max_diff_lines=1, policy_digest="sha256:" + "0" * 64, base_commit="0" * 40,
                confidence=Confidence(score=1.0, level="high"), created_at="2026-01-01T00:00:00.000000Z")
    names = task_environment(task, layout=ProjectLayout(tmp_path), workspace=tmp_path, explanation_file=tmp_path / "e")
    assert table_after("command-environment") == list(names)


def test_every_event_type_is_documented() -> None:
    documented = set(table_after("event-types"))
    assert set(EVENT_TYPES) <= documented


def test_cli_doc_covers_every_command_exit_code_and_variable() -> None:
    text = CLI.read_text("utf-8")
    for name in COMMANDS:
        assert f"\n### `conductor {name}" in text, name
    codes = {cls.exit_code for cls in _error_classes(ConductorError)} | {0, 1, 2, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_TERMINATED}
    documented = {int(cell) for cell in table_after("exit-codes", CLI)}
    assert documented == codes
    for variable in env_variables():
        assert f"`{variable}`" in text, variable
    for variable in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "GEMINI_API_KEY", "GOOGLE_API_KEY", "GEMINI_BASE_URL"):
        assert f"`{variable}`" in text, variable


def _error_classes(base: type) -> list[type]:
    found = [base]
    for sub in base.__subclasses__():
        found += _error_classes(sub)
    return found


# --- the minimal executor, for real -------------------------------------------------------------


def conductor(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "conductor", *args], cwd=project, capture_output=True, text=True,
                          timeout=TIMEOUT)


def run_executor(project: Path, script: Path) -> str:
    done = subprocess.run([sys.executable, str(script), str(project)], capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    assert conductor(root, "init").returncode == 0
    (root / "greet.py").write_text('print("Helo, world")\n')
    (root / "plan.yaml").write_text(PLAN)
    published = conductor(root, "explore", "--plan", "plan.yaml", "--executor", "handoff", "--no-wait", "--json")
    assert published.returncode == 11, published.stderr
    assert json.loads(published.stdout)["waiting_for_executor"] == [
        {"fork_id": "1", "step_id": "step_001"}, {"fork_id": "2", "step_id": "step_001"}]
    return root


@pytest.fixture
def executor(tmp_path: Path) -> Path:
    code = block("minimal-executor")
    assert "import conductor" not in code and "from conductor" not in code
    script = tmp_path / "executor.py"
    script.write_text(code + "\n", encoding="utf-8")
    return script


def handoff_dir(project: Path) -> Path:
    (plan,) = (project / ".conductor" / "handoff").glob("plan_*")
    return plan


@pytest.mark.slow
def test_the_minimal_executor_finishes_a_real_plan(project: Path, executor: Path) -> None:
    for _ in range(4):  # step_002 of fork 1 is published only after step_001 is verified
        output = run_executor(project, executor)
        assert "lost its lease" not in output
        resumed = conductor(project, "resume", "--executor", "handoff", "--no-wait", "--json")
        if resumed.returncode != 11:
            break
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    report = json.loads(resumed.stdout)
    assert report["status"] == "succeeded"
    assert {row["fork_id"]: row["steps_verified"] for row in report["ranking"]} == {"1": 2, "2": 1}
    assert (project / "greet.py").read_text() == 'print("Hello, world")\n'
    plan = handoff_dir(project)
    for result in plan.glob("fork_*/completed/*.result.json"):
        document = json.loads(result.read_text())
        assert document["executor"]["kind"] == "mini-executor"
        assert validate(document, _schema("result")) == []
        verdict = json.loads(result.with_name(result.name.replace("result", "verdict")).read_text())
        assert verdict["accepted"] is True
        assert validate(verdict, _schema("verdict")) == []
    assert not list(plan.glob("fork_*/in_progress/*"))


@pytest.mark.slow
@pytest.mark.parametrize("tamper, kind", [
    (lambda text: text.replace("sed -i", "rm -f greet.py; sed -i"), "checksum_mismatch"),
    (lambda text: text.replace('"attempt": 1,', '"attempt": 1, "attempt": 1,'), "invalid_task"),
    (lambda text: json.dumps(seal({**json.loads(text), "fork_id": "2"})), "invalid_task"),  # resealed: identity
])
def test_the_minimal_executor_rejects_a_bad_task_unexecuted(project: Path, executor: Path, tamper, kind) -> None:  # type: ignore[no-untyped-def]
    fork = handoff_dir(project) / "fork_1"
    task_file = fork / "pending" / "step_001.task.json"
    task = json.loads(task_file.read_text())
    task_file.write_text(tamper(task_file.read_text()))
    run_executor(project, executor)
    result = json.loads((fork / "failed" / "step_001.result.json").read_text())
    assert (fork / "failed" / "step_001.task.json").is_file()
    assert result["status"] == "failed" and result["error"]["kind"] == kind
    assert validate(result, _schema("result")) == []
    assert (project / task["workspace"] / "greet.py").read_text() == 'print("Helo, world")\n'  # never executed
    resumed = conductor(project, "resume", "--executor", "handoff", "--no-wait", "--json")
    report = json.loads(resumed.stdout)
    # A rejected task file is a failed attempt: the step is re-offered as attempt 2 with the evidence.
    assert report["waiting_for_executor"] == [{"fork_id": "1", "step_id": "step_001"}], resumed.stdout
    retry = json.loads((fork / "pending" / "step_001.task.json").read_text())
    assert retry["attempt"] == 2 and retry["base_commit"] == task["base_commit"]
    (evidence,) = retry["previous_attempts"]
    assert evidence["attempt"] == 1 and evidence["outcome"] == "malformed", evidence
    assert any(kind in reason for reason in evidence["reasons"])
    assert (fork / "attempts" / "step_001.a1.task.json").is_file() and not (fork / "failed" / "step_001.task.json").exists()
    for _ in range(2):  # attempt 2 of step_001, then step_002
        run_executor(project, executor)
        resumed = conductor(project, "resume", "--executor", "handoff", "--no-wait", "--json")
    report = json.loads(resumed.stdout)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert [row["status"] for row in report["ranking"]] == ["succeeded", "succeeded"]


def _schema(name: str) -> dict:
    from conductor.schemas import generate

    return generate()[name]


def test_the_confidence_example_is_right() -> None:
    from conductor.confidence import score_step

    example = json.loads(block("confidence-example", DOCS / "confidence.md"))
    confidence = score_step(estimate=example["estimate"], allowed_files=example["allowed_files"],
                            accepted=example["accepted"], total=example["total"])
    assert (confidence.score, confidence.level) == (example["score"], example["level"])
    assert json.dumps(confidence.reasons, ensure_ascii=False) in (DOCS / "confidence.md").read_text("utf-8")
