"""Damaged audit logs: a real log is written with ``AuditLog.append``, then edited the way an attacker or a
crash would; ``verify_chain`` must name every problem with its line number, and reading the events must
refuse the log naming the file."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from conductor.audit import AuditLog, verify_chain
from conductor.canonical import canonical_bytes, digest
from conductor.errors import AuditChainError

Lines = list[bytes]  # complete lines, each ending with b"\n"


def _write_log(path: Path, count: int = 5) -> Lines:
    ticks = iter(range(count))
    log = AuditLog(path, clock=lambda: f"2026-01-01T00:00:{next(ticks):02d}.000000Z")
    for number in range(1, count + 1):
        log.append("task.published", {"step_id": f"step_{number:03d}", "attempt": 1, "checksum": "sha256:" + "0" * 64})
    return path.read_bytes().splitlines(keepends=True)


def _line(entry: dict) -> bytes:
    return canonical_bytes(entry) + b"\n"


def _rehash(entry: dict) -> dict:
    return {**entry, "hash": digest({k: v for k, v in entry.items() if k != "hash"})}


def _edit(index: int, change: Callable[[dict], None], *, rehash: bool) -> Callable[[Lines], None]:
    def damage(lines: Lines) -> None:
        entry = json.loads(lines[index])
        change(entry)
        lines[index] = _line(_rehash(entry) if rehash else entry)

    return damage


def _set(key: str, value: object) -> Callable[[dict], None]:
    def change(entry: dict) -> None:
        target = entry
        *parents, last = key.split(".")
        for part in parents:
            target = target[part]
        target[last] = value

    return change


def _delete(index: int) -> Callable[[Lines], None]:
    return lambda lines: lines.pop(index)


def _insert_forged(lines: Lines) -> None:
    """A forged approval whose hash is valid and whose prev links to line 3, inserted after it."""
    previous = json.loads(lines[2])
    forged = _rehash({"seq": previous["seq"] + 1, "ts": "2026-01-01T00:00:02.500000Z", "type": "approval.granted",
                      "data": {"step_id": "step_003", "by": "mallory"}, "prev": previous["hash"], "hash": ""})
    lines.insert(3, _line(forged))


def _swap(lines: Lines) -> None:
    lines[2], lines[3] = lines[3], lines[2]


def _duplicate(lines: Lines) -> None:
    lines.insert(3, lines[2])


def _tear(lines: Lines) -> None:
    lines[-1] = lines[-1][:37]  # a crash in the middle of the last write: no newline


def _non_canonical(lines: Lines) -> None:
    lines[1] = json.dumps(json.loads(lines[1]), indent=None).encode() + b"\n"  # ", " and ": " separators


def _replace(index: int, data: bytes) -> Callable[[Lines], None]:
    def damage(lines: Lines) -> None:
        lines[index] = data

    return damage


# id -> (damage, every problem verify_chain must report, in order)
CASES: dict[str, tuple[Callable[[Lines], None], list[str]]] = {
    "edited_line": (_edit(2, _set("data.attempt", 2), rehash=False), ["line 3: hash mismatch (entry edited?)"]),
    "edited_line_with_recomputed_hash": (_edit(2, _set("data.attempt", 2), rehash=True),
                                         ["line 4: prev does not match line 3's hash"]),
    "deleted_line": (_delete(2), ["line 3: seq 3 follows 1 (entries deleted or reordered)",
                                  "line 3: prev does not match line 2's hash"]),
    "deleted_first_line": (_delete(0), ["line 1: seq 1 where 0 was expected (start of log lost?)",
                                        "line 1: prev is not the genesis value"]),
    "inserted_line": (_insert_forged, [
        "line 5: seq 3 follows 3 (entry inserted or duplicated)",
        "line 5: prev does not match line 4's hash (it is line 3's hash: entries inserted or reordered)"]),
    "reordered_lines": (_swap, [
        "line 3: seq 3 follows 1 (entries deleted or reordered)",
        "line 3: prev does not match line 2's hash",
        "line 4: seq 2 follows 3 (entries reordered or inserted)",
        "line 4: prev does not match line 3's hash (it is line 2's hash: entries inserted or reordered)",
        "line 5: seq 4 follows 2 (entries deleted or reordered)",
        "line 5: prev does not match line 4's hash (it is line 3's hash: entries inserted or reordered)"]),
    "duplicated_line": (_duplicate, ["line 4: duplicate of line 3"]),
    "torn_last_line": (_tear, ["line 5: unterminated last line (torn write)"]),
    "non_canonical_line": (_non_canonical, ["line 2: not in RFC 8785 canonical form"]),
    "malformed_hash": (_edit(1, _set("hash", "md5:d41d8cd98f00b204e9800998ecf8427e"), rehash=False),
                       ["line 2: schema: hash: String should match pattern '^sha256:[0-9a-f]{64}$'"]),
    "wrong_hash": (_edit(1, _set("hash", "sha256:" + "ab" * 32), rehash=False),
                   ["line 2: hash mismatch (entry edited?)", "line 3: prev does not match line 2's hash"]),
    "seq_as_string": (_edit(2, _set("seq", "2"), rehash=True), ["line 3: schema: seq: Input should be a valid integer"]),
    "empty_line": (lambda lines: lines.insert(2, b"\n"), ["line 3: empty line"]),
    "not_json_line": (_replace(2, b"rm -rf /\n"), [
        "line 3: not strict JSON (entry: invalid JSON at line 1 column 1: Expecting value)"]),
    "nan_in_line": (_replace(2, b'{"seq":2,"x":NaN}\n'), [
        "line 3: not strict JSON (entry: non-standard JSON constant NaN)"]),
    "invalid_utf8_line": (_replace(2, b'{"seq":2,"x":"\xff"}\n'), [
        "line 3: not strict JSON (entry: not UTF-8 (invalid start byte at byte 14))"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_verify_chain_names_every_problem_and_line(tmp_path: Path, case: str) -> None:
    damage, problems = CASES[case]
    path = tmp_path / "audit.log"
    lines = _write_log(path)
    damage(lines)
    path.write_bytes(b"".join(lines))

    report = verify_chain(path)

    assert report.problems == problems
    assert not report.ok
    with pytest.raises(AuditChainError) as info:
        AuditLog(path).events()
    message = str(info.value)
    assert message.startswith(f"{path}: {problems[0]}")
    if len(problems) > 1:
        assert message.endswith(f"(and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})")


@pytest.mark.parametrize(("damage", "refusal"), [
    (_tear, "unterminated last line (torn write); recover the log before appending"),
    (_edit(4, _set("data.attempt", 9), rehash=False), "last line: hash mismatch (entry edited?)"),
], ids=["torn_last_line", "edited_last_line"])
def test_append_refuses_to_bury_a_damaged_last_line(tmp_path: Path, damage: Callable[[Lines], None],
                                                    refusal: str) -> None:
    path = tmp_path / "audit.log"
    lines = _write_log(path)
    damage(lines)
    path.write_bytes(b"".join(lines))
    before = path.read_bytes()

    with pytest.raises(AuditChainError) as info:
        AuditLog(path).append("plan.resumed", {"pid": 1})

    assert str(info.value).startswith(str(path)) and refusal in str(info.value)
    assert path.read_bytes() == before


def test_damage_further_up_stays_named_after_an_append(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    lines = _write_log(path)
    _edit(1, _set("type", "approval.granted"), rehash=False)(lines)
    path.write_bytes(b"".join(lines))

    AuditLog(path).append("plan.resumed", {"pid": 1})

    assert verify_chain(path).problems == ["line 2: hash mismatch (entry edited?)"]
