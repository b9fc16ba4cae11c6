"""The audit log's check mark: a fresh reader trusts exactly the bytes a writer checked, nothing else."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import conductor.audit as audit
from conductor.audit import AuditLog, forget_checked_logs, mark_path, verify_chain
from conductor.canonical import canonical_bytes, digest
from conductor.errors import AuditChainError
from tests.test_audit import _chain, _write


@pytest.fixture(autouse=True)
def _small_marks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit, "MARK_EVERY_LINES", 10)
    monkeypatch.setattr(audit, "SKIP_TO_MARK_BYTES", 1)


def _checked_lines(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Records every line the full per-line check looks at."""
    checked: list[bytes] = []
    real = audit._line_problems

    def counting(line: bytes):
        checked.append(line)
        return real(line)

    monkeypatch.setattr(audit, "_line_problems", counting)
    return checked


def _marked_log(tmp_path: Path, lines: int = 25) -> Path:
    """A log of ``lines`` lines that a process running plans has read (so it holds a mark)."""
    path = _write(tmp_path / "audit.log", _chain(lines))
    AuditLog(path, cut_torn_tail=True).events()
    forget_checked_logs()  # as a new process
    return path


def test_a_plan_runner_marks_what_it_checked_and_an_inspector_does_not(tmp_path: Path) -> None:
    path = _write(tmp_path / "audit.log", _chain(25))
    AuditLog(path).events()  # an inspection command (status, explain): reads only
    assert not mark_path(path).exists()
    forget_checked_logs()
    AuditLog(path, cut_torn_tail=True).events()
    mark = json.loads(mark_path(path).read_bytes())
    assert mark["lines"] == 25 and mark["bytes"] == path.stat().st_size
    assert mark["head"] == json.loads(path.read_bytes().splitlines()[-1])["hash"]


def test_the_mark_moves_on_only_after_enough_new_lines(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log", cut_torn_tail=True)
    for n in range(9):
        log.append("plan.resumed", {"pid": n})
    log.events()
    assert not mark_path(log.path).exists()  # 9 lines: below MARK_EVERY_LINES
    log.append("plan.resumed", {"pid": 9})  # lines this process appends count as checked
    log.events()
    assert json.loads(mark_path(log.path).read_bytes())["lines"] == 10


def test_a_fresh_reader_checks_only_the_lines_after_the_mark_and_gets_the_same_events(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _marked_log(tmp_path)
    expected = audit._scan(path.read_bytes())[0]
    with path.open("ab") as handle:  # three more lines written after the mark
        handle.write(b"".join(_chain(28)[25:]))
    expected = audit._scan(path.read_bytes())[0]
    checked = _checked_lines(monkeypatch)
    events = AuditLog(path).events()
    assert events == expected and [e.model_dump() for e in events] == [e.model_dump() for e in expected]
    assert len(checked) == 3  # only the lines the mark does not cover
    AuditLog(path, cut_torn_tail=True).append("plan.resumed", {"pid": 1})  # the chain goes on from the mark
    assert verify_chain(path).ok


@pytest.mark.parametrize("damage", ["edited", "deleted", "truncated", "replaced"])
def test_a_log_changed_under_its_mark_is_checked_whole(tmp_path: Path, damage: str) -> None:
    """The attacker edits the marked part: the mark no longer matches, so every line is checked again."""
    path = _marked_log(tmp_path)
    lines = _chain(25)
    if damage == "edited":
        entry = json.loads(lines[3])
        entry["data"]["attempt"] = 7  # same length: only the content hash can tell
        _write(path, [*lines[:3], canonical_bytes(entry) + b"\n", *lines[4:]])
        with pytest.raises(AuditChainError, match="line 4: hash mismatch"):
            AuditLog(path).events()
    elif damage == "deleted":
        _write(path, [*lines[:3], *lines[4:]])
        with pytest.raises(AuditChainError, match="line 4: seq 4 follows 2"):
            AuditLog(path).events()
    elif damage == "truncated":
        _write(path, lines[:5])
        assert [e.seq for e in AuditLog(path).events()] == [0, 1, 2, 3, 4]
    else:
        _write(path, _chain(30))  # another log: same first 25 lines, so its prefix still matches the mark
        assert [e.seq for e in AuditLog(path).events()] == list(range(30))


def test_a_mark_forged_to_fit_a_tampered_log_never_fools_verify(tmp_path: Path) -> None:
    """An attacker who can write the fork folder rewrites a line and a matching mark. A reader that trusts
    the mark could be fooled as it could by a rewritten chain (the chain has no key); ``verify_chain``,
    what ``conductor verify`` runs, reads every line whatever the mark says."""
    path = _marked_log(tmp_path)
    lines = _chain(25)
    entry = json.loads(lines[3])
    entry["data"]["attempt"] = 7
    _write(path, [*lines[:3], canonical_bytes(entry) + b"\n", *lines[4:]])
    data = path.read_bytes()
    mark = json.loads(mark_path(path).read_bytes())
    mark["sha256"] = audit.hashlib.sha256(data).hexdigest()
    mark_path(path).write_bytes(json.dumps(mark).encode())
    report = verify_chain(path)
    assert not report.ok and any("line 4: hash mismatch" in p for p in report.problems)


@pytest.mark.parametrize("mark", [b"", b"{", b"[]", b'{"schema": "conductor.audit-mark/v1"}',
                                  b'{"schema": "x", "bytes": 10, "lines": 1, "sha256": "00", "head": "x"}'])
def test_a_damaged_mark_is_ignored(tmp_path: Path, mark: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _marked_log(tmp_path)
    mark_path(path).write_bytes(mark)
    checked = _checked_lines(monkeypatch)
    assert len(AuditLog(path).events()) == 25 and len(checked) == 25


def test_a_mark_whose_lines_do_not_parse_as_events_is_ignored(tmp_path: Path) -> None:
    """A mark fitted to bytes no writer checked (its hash matches, its lines are not events): full check."""
    path = tmp_path / "audit.log"
    body = {"seq": 0, "ts": "2026-01-01T00:00:00.000000Z", "type": "plan.resumed", "data": {}, "prev": audit.GENESIS}
    line = canonical_bytes({**body, "hash": digest(body)}) + b"\n"
    path.write_bytes(b'{"not": "an event"}\n' + line)
    data = path.read_bytes()
    mark_path(path).write_bytes(json.dumps({"schema": audit.MARK_SCHEMA, "bytes": len(data), "lines": 2,
                                            "sha256": audit.hashlib.sha256(data).hexdigest(),
                                            "head": json.loads(line)["hash"]}).encode())
    with pytest.raises(AuditChainError, match="line 1"):
        AuditLog(path).events()


def test_a_mark_written_by_another_process_is_used_by_this_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path / "audit.log", _chain(audit.MARK_EVERY_LINES + 5))
    code = ("import sys; import conductor.audit as a; a.MARK_EVERY_LINES = 10; "
            "a.AuditLog(sys.argv[1], cut_torn_tail=True).events()")
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, timeout=60)
    assert json.loads(mark_path(path).read_bytes())["lines"] == 15
    checked = _checked_lines(monkeypatch)
    assert len(AuditLog(path).events()) == 15 and checked == []


def _mark_in_another_process(path: Path) -> None:
    code = ("import sys; import conductor.audit as a; a.MARK_EVERY_LINES = 10; "
            "a.AuditLog(sys.argv[1], cut_torn_tail=True).events()")
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, timeout=60)


def test_a_reader_that_fell_behind_skips_to_a_mark_another_process_wrote(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """This process checked 5 lines; another appended 20 and checked them (mark at 25); 3 more follow."""
    path = _write(tmp_path / "audit.log", _chain(5))
    reader = AuditLog(path)
    assert len(reader.events()) == 5
    _write(path, _chain(25))
    _mark_in_another_process(path)
    with path.open("ab") as handle:
        handle.write(b"".join(_chain(28)[25:]))
    expected = [e.model_dump() for e in audit._scan(path.read_bytes())[0]]
    checked = _checked_lines(monkeypatch)
    assert [e.model_dump() for e in reader.events()] == expected
    assert checked == [line.rstrip(b"\n") for line in _chain(28)[25:]]  # only what the mark does not cover
    AuditLog(path, cut_torn_tail=True).append("plan.resumed", {"pid": 1})  # the chain goes on from there
    assert [e.seq for e in AuditLog(path).events()] == list(range(29)) and verify_chain(path).ok


def test_a_mark_that_does_not_fit_what_a_reader_checked_is_not_skipped_to(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The attacker appends a tampered line and a mark over the new bytes that does not hash the prefix
    this process checked: the reader checks the new lines itself and finds the tampering."""
    path = _write(tmp_path / "audit.log", _chain(5))
    reader = AuditLog(path)
    reader.events()
    lines = _chain(25)
    entry = json.loads(lines[12])
    entry["data"]["attempt"] = 7
    _write(path, [*lines[:12], canonical_bytes(entry) + b"\n", *lines[13:]])
    data = path.read_bytes()
    forged = {"schema": audit.MARK_SCHEMA, "bytes": len(data), "lines": 25,
              "sha256": audit.hashlib.sha256(data[len(b"".join(lines[:5])):]).hexdigest(),
              "head": json.loads(lines[24])["hash"]}
    mark_path(path).write_bytes(json.dumps(forged).encode())
    checked = _checked_lines(monkeypatch)
    with pytest.raises(AuditChainError, match="line 13: hash mismatch"):
        reader.events()
    assert len(checked) == 20


def test_a_mark_behind_what_a_reader_checked_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path / "audit.log", _chain(12))
    _mark_in_another_process(path)  # mark at 12 lines
    forget_checked_logs()
    reader = AuditLog(path)
    _write(path, _chain(14))
    assert len(reader.events()) == 14  # from the mark: 2 lines checked
    _write(path, _chain(20))
    checked = _checked_lines(monkeypatch)
    assert len(reader.events()) == 20 and len(checked) == 6
