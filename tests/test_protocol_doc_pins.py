"""Statements of docs/protocol.md that the code decides, pinned to the code (issue 10's doc mismatches).

Each test reads the doc and the code it describes, so a change to either that makes them disagree fails
here: temp-file names (section 5 and the section 12 executor), the verdict's check names (2.4 and 7),
the reasons of ``task.lease_expired`` (8 and the event table), the attestation file (1), and the
lock recipes naming ``flock`` (6.5).
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

from conductor.fsutil import TEMP_NAME
from conductor.layout import ATTESTATION_SUFFIX

ROOT = Path(__file__).resolve().parent.parent
PROTOCOL = (ROOT / "docs" / "protocol.md").read_text("utf-8")


def section(number: str) -> str:
    """The text under the heading ``## <number>.`` / ``### <number>`` up to the next heading of its level or higher."""
    lines = PROTOCOL.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"^#{{2,3}} {re.escape(number)}[. ]", line))
    level = len(lines[start]) - len(lines[start].lstrip("#"))
    end = next((i for i in range(start + 1, len(lines))
                if (m := re.match(r"^(#+) ", lines[i])) and len(m.group(1)) <= level and not _in_code(lines, i)), len(lines))
    return "\n".join(lines[start + 1:end])


def _in_code(lines: list[str], index: int) -> bool:
    return sum(1 for line in lines[:index] if line.lstrip().startswith("```")) % 2 == 1


def minimal_executor() -> str:
    match = re.search(r"<!-- minimal-executor -->\n```python\n(.*?)\n```\n", PROTOCOL, re.S)
    assert match
    return match.group(1)


def test_the_documented_temp_name_is_the_one_recovery_parses() -> None:
    example = re.search(r"\(`(\.tmp\.[^`]+)`\)", section("5"))
    assert example, "section 5 shows an example temp name"
    match = TEMP_NAME.match(example.group(1))
    assert match and match.group("name") == "step_001.result.json" and match.group("pid") == "4242"


def test_the_minimal_executor_writes_temp_names_recovery_can_ask_about(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    source = minimal_executor()
    tree = ast.parse(source)
    wanted = {"fsync", "write"}
    code = ast.Module(body=[n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in wanted], type_ignores=[])
    namespace: dict[str, object] = {"os": os}
    exec(compile(code, "protocol.md", "exec"), namespace)  # noqa: S102 - the doc's own code, on purpose
    seen: list[str] = []
    real_replace = os.replace

    def spy(source_path, target_path):  # type: ignore[no-untyped-def]
        seen.append(Path(source_path).name)
        real_replace(source_path, target_path)

    monkeypatch.setattr(os, "replace", spy)
    namespace["write"](tmp_path / "step_001.result.json", b"{}\n")  # type: ignore[operator]
    assert (tmp_path / "step_001.result.json").read_bytes() == b"{}\n"
    assert len(seen) == 1
    match = TEMP_NAME.match(seen[0])
    assert match, f"{seen[0]} is not of the form .tmp.<name>.<pid>.<8 hex> (section 5)"
    assert int(match.group("pid")) == os.getpid()


def check_names_in_code() -> set[str]:
    names = set()
    for path in ("conductor/verifier.py", "conductor/policy.py"):
        text = (ROOT / path).read_text("utf-8")
        names |= set(re.findall(r'Check\(name="([a-z_]+)"', text)) | set(re.findall(r'_check\("([a-z_]+)"', text))
    return names


def test_every_check_name_of_a_verdict_is_documented() -> None:
    in_code = check_names_in_code()
    assert {"paths_safe", "reported_changes_match", "provenance", "verification_commands"} <= in_code
    listed = re.search(r"`checks` \(`\[\{name, passed, detail\}\]`, names: (.*?);", section("2.4"), re.S)
    assert listed
    assert set(re.findall(r"`([a-z_]+)`", listed.group(1))) == in_code
    seven = section("7")
    for name in in_code:
        assert f"`{name}`" in seven or name == "verification_commands", f"section 7 does not say when {name} is checked"


def test_lease_expired_reasons_match_the_reaper() -> None:
    reaper = (ROOT / "conductor/handoff/reaper.py").read_text("utf-8")
    body = reaper[reaper.index("def expiry_reason"):reaper.index("def reap_expired")]
    reasons = set(re.findall(r'return "([a-z_]+)"', body))
    assert reasons == {"no_lease", "holder_died", "timeout", "not_renewed"}
    row = next(line for line in PROTOCOL.splitlines() if line.startswith("| `task.lease_expired` |"))
    eight = section("8")
    for reason in reasons:
        assert f"`{reason}`" in row and f"`{reason}`" in eight, reason


def test_the_attestation_file_is_in_the_layout_and_the_documents_table() -> None:
    layout = section("1")
    assert f"<step>{ATTESTATION_SUFFIX}" in layout
    assert f"| `<step>{ATTESTATION_SUFFIX}` | Conductor only" in section("2")


def test_the_lock_is_documented_as_flock_and_nothing_else() -> None:
    complete = section("6.5")
    assert "filelock" not in PROTOCOL
    for language in ("Python", "Go", "Rust", "Node.js", "Java"):
        assert f"**{language}**" in complete, language
    assert "FileChannel.lock()" in complete and "does **not** exclude" in complete


def test_external_release_is_documented_where_pending_is_forbidden() -> None:
    rules = section("11")
    assert "conductor task release" in rules
    assert "conductor task release" in section("8")


def test_every_task_field_is_in_the_task_table() -> None:
    from conductor.models import Task

    rows = set(re.findall(r"^\| `([a-z_]+)`(?:, `([a-z_]+)`)? \|", section("2.1"), re.M))
    documented = {name for pair in rows for name in pair if name}
    fields = {info.alias or name for name, info in Task.model_fields.items()}  # schema_ is written "schema"
    assert fields <= documented, sorted(fields - documented)


def test_ignored_paths_are_described_as_the_verifier_treats_them() -> None:
    seven = section("7")
    assert "`workspace.ignore`" in seven and "`ignore` field" in seven
    verifier = (ROOT / "conductor/verifier.py").read_text("utf-8")
    assert "not counted (workspace.ignore)" in verifier and "not counted (workspace.ignore)" in seven


def test_the_documented_requeue_batch_is_the_reapers() -> None:
    from conductor.handoff.reaper import REQUEUE_BATCH

    text = section("8")
    assert f"in batches of up to {REQUEUE_BATCH} per hold" in text, "section 8 must state the reaper's batch size"
