"""The hash-chained audit log: round trip, tamper detection, concurrency, O(1) appends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import conductor.audit as audit
from conductor.audit import GENESIS, AuditLog, read_events, verify_chain
from conductor.canonical import canonical_bytes, digest
from conductor.errors import AuditChainError, InvalidDocument


def _clock(start_second: int = 0):
    """A clock returning 2026-01-01T00:00:<n>Z, one second later on each call."""
    state = {"n": start_second}

    def tick() -> str:
        value = f"2026-01-01T00:{state['n'] // 60:02d}:{state['n'] % 60:02d}.000000Z"
        state["n"] += 1
        return value

    return tick


def _entry(seq: int, prev: str, type_: str = "task.published", data: dict | None = None) -> dict:
    body = {
        "seq": seq,
        "ts": f"2026-01-01T00:00:00.{seq:06d}Z",
        "type": type_,
        "data": data if data is not None else {"step_id": f"step_{seq:03d}", "attempt": 1},
        "prev": prev,
    }
    return {**body, "hash": digest(body)}


def _chain(n: int) -> list[bytes]:
    """``n`` valid canonical lines (with newlines), built in memory: fast, no fsync."""
    lines, prev = [], GENESIS
    for seq in range(n):
        entry = _entry(seq, prev)
        lines.append(canonical_bytes(entry) + b"\n")
        prev = entry["hash"]
    return lines


def _write(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"".join(lines))
    return path


def _problems(path: Path) -> list[str]:
    return verify_chain(path).problems


# --- round trip ---------------------------------------------------------------------------------


def test_append_then_events_round_trip(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "fork_a" / "audit.log")
    written = [
        log.append("plan.created", {"plan_id": "p1", "goal": "hello", "forks": ["a"]}),
        log.append("task.claimed", {"step_id": "step_001", "attempt": 1, "pid": 42}),
        log.append("plan.resumed", {}),
    ]
    assert log.events() == written
    assert list(log) == written
    assert [e.seq for e in written] == [0, 1, 2]
    assert written[0].prev == GENESIS
    assert written[1].prev == written[0].hash and written[2].prev == written[1].hash
    assert log.tail(2) == written[1:]


def test_each_line_is_canonical_and_hash_covers_entry_without_hash(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log")
    event = log.append("llm.call", {"purpose": "plan", "cost_usd": 0.25, "input_tokens": 10})
    raw = (tmp_path / "audit.log").read_bytes()
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1
    document = json.loads(raw)
    assert canonical_bytes(document) + b"\n" == raw
    assert document["hash"] == digest({k: v for k, v in document.items() if k != "hash"}) == event.hash


def test_injected_clock_sets_ts(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log", clock=_clock(5))
    assert log.append("plan.resumed").ts == "2026-01-01T00:00:05.000000Z"


def test_data_is_normalised_to_what_a_reader_parses(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log")
    event = log.append("step.merged", {"step_id": "step_001", "files": ("a.py", "b.py")})
    assert event.data["files"] == ["a.py", "b.py"]
    assert log.events()[0] == event


@pytest.mark.parametrize("data", [{"x": float("nan")}, {"x": 2**60}, {"x": object()}])
def test_data_without_a_canonical_form_is_rejected_and_nothing_written(tmp_path: Path, data: dict) -> None:
    log = AuditLog(tmp_path / "audit.log")
    with pytest.raises(InvalidDocument):
        log.append("task.failed", data)
    assert not (tmp_path / "audit.log").exists()


def test_bad_event_type_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(InvalidDocument, match="Task.Claimed"):
        AuditLog(tmp_path / "audit.log").append("Task.Claimed", {})


def test_missing_log_has_no_events(tmp_path: Path) -> None:
    assert AuditLog(tmp_path / "audit.log").events() == []


# --- verification -------------------------------------------------------------------------------


def test_verify_chain_accepts_a_good_log(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log")
    last = [log.append("task.published", {"step_id": f"step_00{i}", "attempt": 1}) for i in range(5)][-1]
    report = verify_chain(tmp_path / "audit.log")
    assert report.ok and report.problems == []
    assert report.entries == 5 and report.head == last.hash


def test_verify_chain_of_empty_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "empty.log").write_bytes(b"")
    assert verify_chain(tmp_path / "empty.log").ok
    missing = verify_chain(tmp_path / "missing.log")
    assert not missing.ok and "no such file" in missing.problems[0]


def test_edited_line_is_a_hash_mismatch(tmp_path: Path) -> None:
    lines = _chain(5)
    entry = json.loads(lines[2])
    entry["data"]["attempt"] = 2  # forged, hash left as it was
    lines[2] = canonical_bytes(entry) + b"\n"
    assert _problems(_write(tmp_path / "audit.log", lines)) == ["line 3: hash mismatch (entry edited?)"]


def test_edited_line_with_recomputed_hash_breaks_the_next_link(tmp_path: Path) -> None:
    lines = _chain(5)
    entry = json.loads(lines[2])
    entry["data"]["attempt"] = 2
    entry["hash"] = digest({k: v for k, v in entry.items() if k != "hash"})
    lines[2] = canonical_bytes(entry) + b"\n"
    assert _problems(_write(tmp_path / "audit.log", lines)) == ["line 4: prev does not match line 3's hash"]


def test_deleted_line_is_a_seq_gap(tmp_path: Path) -> None:
    lines = _chain(5)
    del lines[2]
    problems = _problems(_write(tmp_path / "audit.log", lines))
    assert problems == [
        "line 3: seq 3 follows 1 (entries deleted or reordered)",
        "line 3: prev does not match line 2's hash",
    ]


def test_inserted_line_is_found_even_with_a_valid_hash(tmp_path: Path) -> None:
    lines = _chain(5)
    forged = _entry(3, json.loads(lines[2])["hash"], "approval.granted", {"step_id": "step_003", "by": "mallory"})
    lines.insert(3, canonical_bytes(forged) + b"\n")
    problems = _problems(_write(tmp_path / "audit.log", lines))
    assert problems == [
        "line 5: seq 3 follows 3 (entry inserted or duplicated)",
        "line 5: prev does not match line 4's hash (it is line 3's hash: entries inserted or reordered)",
    ]


def test_reordered_lines(tmp_path: Path) -> None:
    lines = _chain(5)
    lines[2], lines[3] = lines[3], lines[2]
    problems = _problems(_write(tmp_path / "audit.log", lines))
    assert "line 3: seq 3 follows 1 (entries deleted or reordered)" in problems
    assert "line 4: seq 2 follows 3 (entries reordered or inserted)" in problems
    assert "line 4: prev does not match line 3's hash (it is line 2's hash: entries inserted or reordered)" in problems
    assert all(p.startswith(("line 3:", "line 4:", "line 5:")) for p in problems)


def test_duplicated_line(tmp_path: Path) -> None:
    lines = _chain(5)
    lines.insert(3, lines[2])
    assert _problems(_write(tmp_path / "audit.log", lines)) == ["line 4: duplicate of line 3"]


def test_torn_last_line(tmp_path: Path) -> None:
    lines = _chain(5)
    lines.append(_chain(6)[5][:40])  # half of a sixth line, no newline
    report = verify_chain(_write(tmp_path / "audit.log", lines))
    assert report.problems == ["line 6: unterminated last line (torn write)"]
    assert report.entries == 5 and not report.ok


def test_non_canonical_line(tmp_path: Path) -> None:
    lines = _chain(5)
    lines[1] = json.dumps(json.loads(lines[1])).encode() + b"\n"  # spaces after separators
    assert _problems(_write(tmp_path / "audit.log", lines)) == ["line 2: not in RFC 8785 canonical form"]


def test_line_that_is_not_strict_json_does_not_cascade(tmp_path: Path) -> None:
    lines = _chain(5)
    lines[1] = b'{"seq":1,"seq":1}\n'
    problems = _problems(_write(tmp_path / "audit.log", lines))
    assert len(problems) == 1 and problems[0].startswith("line 2: not strict JSON")
    assert "duplicate key" in problems[0]


def test_schema_problem_names_the_field(tmp_path: Path) -> None:
    lines = _chain(3)
    entry = json.loads(lines[1])
    entry["extra"] = 1
    lines[1] = canonical_bytes(entry) + b"\n"
    problems = _problems(_write(tmp_path / "audit.log", lines))
    assert len(problems) == 1 and problems[0].startswith("line 2: schema: extra")


def test_first_line_must_start_the_chain(tmp_path: Path) -> None:
    lines = _chain(4)[1:]
    assert _problems(_write(tmp_path / "audit.log", lines)) == [
        "line 1: seq 1 where 0 was expected (start of log lost?)",
        "line 1: prev is not the genesis value",
    ]


def test_every_problem_is_reported_not_just_the_first(tmp_path: Path) -> None:
    lines = _chain(10)
    edited = json.loads(lines[1])
    edited["type"] = "task.completed"
    lines[1] = canonical_bytes(edited) + b"\n"
    lines[5] = json.dumps(json.loads(lines[5]), indent=1).replace("\n", "").encode() + b"\n"
    del lines[7]
    lines.append(b'{"seq":')
    problems = _problems(_write(tmp_path / "audit.log", lines))
    assert problems == [
        "line 2: hash mismatch (entry edited?)",
        "line 6: not in RFC 8785 canonical form",
        "line 8: seq 8 follows 6 (entries deleted or reordered)",
        "line 8: prev does not match line 7's hash",
        "line 10: unterminated last line (torn write)",
    ]


def test_events_raises_naming_the_line(tmp_path: Path) -> None:
    lines = _chain(5)
    del lines[2]
    with pytest.raises(AuditChainError, match=r"line 3: seq 3 follows 1 .*\(and 1 more problem\)"):
        AuditLog(_write(tmp_path / "audit.log", lines)).events()


def test_append_refuses_to_extend_a_torn_log_unless_told_to_cut_it(tmp_path: Path) -> None:
    path = _write(tmp_path / "audit.log", [*_chain(3), b'{"seq":3,"ts"'])
    before = path.read_bytes()
    with pytest.raises(AuditChainError, match="torn write"):
        AuditLog(path).append("plan.resumed", {})  # inspection: the log stays as it is
    assert path.read_bytes() == before


def test_append_first_cuts_a_torn_tail_its_dead_writer_left_keeping_the_bytes(tmp_path: Path) -> None:
    path = _write(tmp_path / "audit.log", [*_chain(3), b'{"seq":3,"ts"'])
    event = AuditLog(path, cut_torn_tail=True).append("plan.resumed", {})
    events = AuditLog(path).events()
    assert [e.type for e in events][3:] == ["recovery.audit_truncated", "plan.resumed"] and event == events[-1]
    (saved,) = tmp_path.glob("audit.log.torn-*")
    assert saved.read_bytes() == b'{"seq":3,"ts"' and events[3].data["bytes"] == len(b'{"seq":3,"ts"')
    assert events[3].data["saved_as"] == saved.name and verify_chain(path).ok


def test_append_refuses_to_extend_an_edited_last_line(tmp_path: Path) -> None:
    lines = _chain(3)
    entry = json.loads(lines[2])
    entry["data"]["attempt"] = 9
    path = _write(tmp_path / "audit.log", [*lines[:2], canonical_bytes(entry) + b"\n"])
    with pytest.raises(AuditChainError, match="last line: hash mismatch"):
        AuditLog(path).append("plan.resumed", {})


def test_append_continues_a_chain_written_elsewhere(tmp_path: Path) -> None:
    path = _write(tmp_path / "audit.log", _chain(3))
    event = AuditLog(path).append("plan.resumed", {})
    assert event.seq == 3 and event.prev == json.loads(_chain(3)[2])["hash"]
    assert verify_chain(path).ok


# --- merging ------------------------------------------------------------------------------------


def test_read_events_merges_logs_by_time_with_labels(tmp_path: Path) -> None:
    plan_log = AuditLog(tmp_path / "plan_p1" / "audit.log", clock=iter([
        "2026-01-01T00:00:00.000000Z", "2026-01-01T00:00:05.000000Z"]).__next__)
    fork_log = AuditLog(tmp_path / "plan_p1" / "fork_a" / "audit.log", clock=iter([
        "2026-01-01T00:00:01.000000Z", "2026-01-01T00:00:05.000000Z"]).__next__)
    plan_log.append("plan.created", {"plan_id": "p1"})
    fork_log.append("fork.created", {"fork_id": "a"})
    plan_log.append("plan.ranked", {"ranking": ["a"]})
    fork_log.append("fork.finished", {"fork_id": "a", "status": "verified"})
    merged = read_events([plan_log.path, fork_log.path, tmp_path / "plan_p1" / "fork_b" / "audit.log"])
    assert [(label, e.type) for label, e in merged] == [
        ("plan_p1", "plan.created"),
        ("fork_a", "fork.created"),
        ("plan_p1", "plan.ranked"),  # same ts as fork.finished: the order of paths breaks the tie
        ("fork_a", "fork.finished"),
    ]


# --- concurrency and cost -----------------------------------------------------------------------

_WRITER = """
import sys
from pathlib import Path
from conductor.audit import AuditLog
log = AuditLog(Path(sys.argv[1]))
for i in range(int(sys.argv[3])):
    log.append("task.claimed", {"step_id": "step_001", "attempt": 1, "holder": sys.argv[2], "i": i})
"""


def test_four_processes_appending_concurrently_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "fork_a" / "audit.log"
    writers = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(path), f"w{n}", "200"], stderr=subprocess.PIPE)
        for n in range(4)
    ]
    for writer in writers:
        _, stderr = writer.communicate(timeout=240)
        assert writer.returncode == 0, stderr.decode()
    report = verify_chain(path)
    assert report.ok, report.problems[:5]
    events = AuditLog(path).events()
    assert len(events) == 800 and [e.seq for e in events] == list(range(800))
    for holder in ("w0", "w1", "w2", "w3"):
        mine = [e.data["i"] for e in events if e.data["holder"] == holder]
        assert mine == list(range(200))  # each writer's own events stay in its order


def test_threads_sharing_or_not_sharing_an_instance(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    shared = AuditLog(path)
    logs = [shared, shared, AuditLog(path), AuditLog(path)]
    errors: list[BaseException] = []

    def write(log: AuditLog, name: str) -> None:
        try:
            for i in range(25):
                log.append("task.claimed", {"holder": name, "i": i})
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(log, f"t{n}")) for n, log in enumerate(logs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    report = verify_chain(path)
    assert report.ok and report.entries == 100


def test_append_reads_only_the_tail_of_a_large_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path / "audit.log", _chain(10_000))
    size = path.stat().st_size
    bytes_read = []
    real_pread, real_read = os.pread, os.read

    def counting_pread(fd: int, n: int, offset: int) -> bytes:
        data = real_pread(fd, n, offset)
        bytes_read.append(len(data))
        return data

    def counting_read(fd: int, n: int) -> bytes:
        data = real_read(fd, n)
        bytes_read.append(len(data))
        return data

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("append must not scan the whole log")

    monkeypatch.setattr(os, "pread", counting_pread)
    monkeypatch.setattr(os, "read", counting_read)
    monkeypatch.setattr(AuditLog, "events", forbidden)
    monkeypatch.setattr(audit, "_scan", forbidden)
    monkeypatch.setattr(Path, "read_bytes", forbidden)
    event = AuditLog(path).append("plan.resumed", {})
    monkeypatch.undo()
    assert event.seq == 10_000
    assert 0 < sum(bytes_read) <= 2 * audit._TAIL_CHUNK < size // 50
    assert verify_chain(path).ok


def test_last_line_longer_than_one_chunk(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log")
    log.append("task.failed", {"message": "x" * (3 * audit._TAIL_CHUNK)})
    assert log.append("plan.resumed", {}).seq == 1
    assert verify_chain(log.path).ok


# --- incremental reading ------------------------------------------------------------------------


def _counting_checks(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Record every line the log checks (``_line_problems``), to see what a call parsed."""
    checked: list[bytes] = []
    real = audit._line_problems

    def counting(line: bytes):  # type: ignore[no-untyped-def]
        checked.append(line)
        return real(line)

    monkeypatch.setattr(audit, "_line_problems", counting)
    return checked


def test_events_parses_only_the_lines_appended_since_the_last_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path / "audit.log", _chain(50))
    checked = _counting_checks(monkeypatch)
    assert len(AuditLog(path).events()) == 50 and len(checked) == 50
    lines = _chain(53)
    with path.open("ab") as handle:  # another process appends three lines
        handle.write(b"".join(lines[50:]))
    checked.clear()
    events = AuditLog(path).events()  # a new instance: what this process checked is kept per file
    assert [e.seq for e in events] == list(range(53)) and checked == [line[:-1] for line in lines[50:]]


def test_lines_this_process_appends_are_not_parsed_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = AuditLog(tmp_path / "audit.log")
    log.append("plan.resumed", {"pid": 1})
    checked = _counting_checks(monkeypatch)
    for n in range(3):
        log.append("plan.resumed", {"pid": n})
    assert checked == []  # the last line is the one it wrote: compared, not parsed
    assert [e.seq for e in log.events()] == [0, 1, 2, 3]
    assert len(checked) == 4  # the first read checks every line once
    checked.clear()
    log.append("plan.resumed", {"pid": 9})
    assert [e.seq for e in log.events()] == [0, 1, 2, 3, 4] and checked == []


def test_events_returns_a_list_of_its_own(tmp_path: Path) -> None:
    log = AuditLog(_write(tmp_path / "audit.log", _chain(3)))
    log.events().clear()
    assert len(log.events()) == 3


@pytest.mark.parametrize("change", ["replaced", "shrank", "last line edited"])
def test_a_replaced_shrunk_or_edited_log_is_read_again_whole(tmp_path: Path, change: str) -> None:
    path = _write(tmp_path / "audit.log", _chain(5))
    log = AuditLog(path)
    assert len(log.events()) == 5
    lines = _chain(5)
    if change == "replaced":
        other = _write(tmp_path / "other.log", _chain(7))
        os.replace(other, path)  # another file under the same name
        assert len(log.events()) == 7
    elif change == "shrank":
        _write(path, lines[:2])
        assert [e.seq for e in log.events()] == [0, 1]
    else:
        entry = json.loads(lines[4])
        entry["data"]["attempt"] = 2  # same length, same file
        _write(path, [*lines[:4], canonical_bytes(entry) + b"\n"])
        with pytest.raises(AuditChainError, match="line 5: hash mismatch"):
            log.events()


def test_damage_appended_after_a_read_is_reported_and_stays_reported(tmp_path: Path) -> None:
    path = _write(tmp_path / "audit.log", _chain(4))
    log = AuditLog(path)
    assert len(log.events()) == 4
    with path.open("ab") as handle:
        handle.write(_chain(3)[2])  # a copy of line 3: the lines checked before still count
    for _ in range(2):
        with pytest.raises(AuditChainError, match="line 5: duplicate of line 3"):
            log.events()


def test_a_torn_line_appended_after_a_read_is_cut_by_the_next_read(tmp_path: Path) -> None:
    path = _write(tmp_path / "audit.log", _chain(4))
    log = AuditLog(path, cut_torn_tail=True)
    assert len(log.events()) == 4
    with path.open("ab") as handle:
        handle.write(_chain(5)[4][:-10])  # what a writer killed mid-write leaves
    events = log.events()
    assert [e.type for e in events][4:] == ["recovery.audit_truncated"] and verify_chain(path).ok
    assert len(list(tmp_path.glob("audit.log.torn-*"))) == 1


# --- the fast check of a line agrees with the full one ------------------------------------------


def _variants(line: bytes) -> list[bytes]:
    """Lines that differ from a valid canonical ``line`` in one way each (most of them invalid)."""
    entry = json.loads(line)
    body = {k: v for k, v in entry.items() if k != "hash"}
    variants = [
        line.replace(b":", b": ", 1),  # not canonical
        json.dumps(entry, sort_keys=True).encode(),  # spaces
        line.replace(b'"seq"', b'"seq":0,"seq"', 1),  # a duplicate key
        line[:-1] + b',"extra":1}',  # an unknown key
        line.replace(b'"attempt":1', b'"attempt":1.0'),  # a float where JCS writes an integer
        line.replace(b'"attempt":1', b'"attempt":1e-7'),
        line.replace(b'"attempt":1', b'"attempt":NaN'),
        line.replace(b'"attempt":1', b'"attempt":9007199254740993'),
        line.replace(b'"step_', b'"\\ud800step_'),  # an unpaired surrogate escape
        b"\xef\xbb\xbf" + line,  # a BOM
        line.replace(b"step_", b"st\xffep_"),  # not UTF-8
    ]
    for change in ({"seq": -1}, {"seq": True}, {"type": "Task.Claimed"}, {"type": "task"}, {"prev": "sha256:XYZ"},
                   {"prev": "sha256:" + "0" * 64 + "\n"}, {"data": [1]}, {"ts": 5}):
        bad = {**body, **change}
        variants.append(canonical_bytes({**bad, "hash": digest(bad)}))  # canonical and hashed, not schema-valid
    without_data = {k: v for k, v in body.items() if k != "data"}
    variants.append(canonical_bytes({**without_data, "hash": digest(without_data)}))  # "data" may be left out
    for data in ({"x": 0.0512}, {"x": 1e-05}, {"k\U0001F600": 1, "k\ue000": 2}, {"deep": [[[[[[1]]]]]]},
                 {"s": "tab\there \u2028 \"q\" \\ é"}):
        good = {**body, "data": data}
        variants.append(canonical_bytes({**good, "hash": digest(good)}))  # valid: the fast path or the full one
        variants.append(json.dumps({**good, "hash": digest(good)}, sort_keys=True, separators=(",", ":"),
                                   ensure_ascii=False).encode())  # Python's form, canonical only by chance
    return variants


def test_the_fast_check_accepts_only_what_the_full_check_accepts() -> None:
    for line in _chain(3):
        line = line[:-1]
        assert audit._clean_line(line) == audit._find_problems(line)[1] is not None
        for variant in _variants(line):
            full_problems, full_event = audit._find_problems(variant)
            fast = audit._clean_line(variant)
            assert fast is None or (full_problems == [] and fast == full_event), variant
            assert audit._line_problems(variant) == (full_problems, full_event), variant


def test_an_integer_without_a_canonical_form_is_reported_not_raised(tmp_path: Path) -> None:
    lines = _chain(2)
    path = _write(tmp_path / "audit.log", [lines[0], lines[1].replace(b'"attempt":1', b'"attempt":9007199254740993')])
    assert verify_chain(path).problems == ["line 2: not in RFC 8785 canonical form",
                                           "line 2: hash cannot be checked (no canonical form)"]
