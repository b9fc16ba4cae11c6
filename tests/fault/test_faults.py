"""conductor.faults and conductor.fsutil under injected faults: crash points, failing writes, StorageError."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import conductor
from conductor import faults
from conductor.audit import AuditLog, repair_torn_tail, verify_chain
from conductor.errors import ConductorError, ConfigError
from conductor.fsutil import TEMP_PREFIX, StorageError, atomic_write, durable_rename, publish_exclusive

SOURCE = Path(conductor.__file__).parent
CALL = re.compile(r"""crash_point\(\s*["']([^"']+)["']\s*\)""")


@pytest.fixture
def inject() -> Iterator[object]:
    """``inject(**environ)`` reconfigures conductor.faults for this test; it is reset afterwards."""
    yield lambda **environ: faults.configure(environ)
    faults.configure({})


def crash_calls() -> dict[str, list[str]]:
    """Crash point name → the source files that call ``crash_point`` with it."""
    calls: dict[str, list[str]] = {}
    for path in sorted(SOURCE.rglob("*.py")):
        if path.name == "faults.py":
            continue
        for name in CALL.findall(path.read_text("utf-8")):
            calls.setdefault(name, []).append(str(path.relative_to(SOURCE)))
    return calls


def test_every_registered_crash_point_is_called_and_every_call_is_registered() -> None:
    calls = crash_calls()
    assert sorted(set(calls) - set(faults.CRASH_POINTS)) == []  # a call site with an unregistered name
    assert sorted(set(faults.CRASH_POINTS) - set(calls)) == []  # a registered name nobody reaches
    dynamic = [p for p in SOURCE.rglob("*.py") if p.name != "faults.py"
               and re.search(r"crash_point\((?!\s*[\"'])", p.read_text("utf-8"))]
    assert dynamic == []  # only literal names, so this test sees every call


def test_every_crash_point_has_a_description() -> None:
    assert all(re.fullmatch(r"[a-z_]+\.[a-z_]+", name) for name in faults.CRASH_POINTS)
    assert all(len(text) > 10 for text in faults.CRASH_POINTS.values())


@pytest.mark.parametrize("environ, message", [
    ({"CONDUCTOR_CRASH_AT": "no.such_point"}, "unknown crash point"),
    ({"CONDUCTOR_CRASH_AT": "write.after_temp:0"}, "not a positive integer"),
    ({"CONDUCTOR_CRASH_AT": "write.after_temp:x"}, "not a positive integer"),
    ({"CONDUCTOR_FAULT": "write"}, "expected <op>:<errno>"),
    ({"CONDUCTOR_FAULT": "chmod:EIO"}, "expected <op>:<errno>"),
    ({"CONDUCTOR_FAULT": "write:EPERM"}, "expected <op>:<errno>"),
    ({"CONDUCTOR_FAULT": "write:EIO:-1"}, "not a positive integer"),
])
def test_malformed_variables_are_config_errors_naming_the_variable(environ: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        faults.configure(environ)
    assert next(iter(environ)) in str(caught.value)
    faults.configure({})


def run_python(code: str, **environ: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONDUCTOR_")} | environ
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


def test_a_crash_point_kills_the_process_at_its_nth_hit_with_137_and_no_cleanup(tmp_path: Path) -> None:
    marker = tmp_path / "reached"
    code = ("import pathlib, sys\nfrom conductor.faults import crash_point\nm = pathlib.Path(sys.argv[1])\n"
            "try:\n"
            "    for i in range(3):\n"
            "        m.write_text(str(i)); crash_point('write.after_temp')\n"
            "finally:\n"
            "    m.write_text('cleanup ran')\n"
            "print('survived')\n")
    crashed = subprocess.run([sys.executable, "-c", code, str(marker)], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "CONDUCTOR_CRASH_AT": "write.after_temp:2"})
    assert crashed.returncode == faults.CRASH_EXIT_CODE == 137
    assert marker.read_text() == "1"  # died at the second hit; the finally block never ran
    assert "survived" not in crashed.stdout
    missed = subprocess.run([sys.executable, "-c", code, str(marker)], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "CONDUCTOR_CRASH_AT": "write.after_temp:4"})
    assert missed.returncode == 0 and "survived" in missed.stdout


def test_the_trace_lists_every_point_and_io_operation_reached(tmp_path: Path) -> None:
    trace = tmp_path / "trace"
    code = ("import pathlib, sys\nfrom conductor.fsutil import atomic_write\n"
            "atomic_write(pathlib.Path(sys.argv[1]), b'x')\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "f")], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "CONDUCTOR_CRASH_TRACE": str(trace)})
    assert proc.returncode == 0, proc.stderr
    assert trace.read_text().split() == ["io.write", "io.fsync", "write.after_temp", "io.rename",
                                         "write.after_rename", "io.fsync"]


def test_an_unset_environment_costs_nothing_and_injects_nothing(tmp_path: Path, inject) -> None:  # type: ignore[no-untyped-def]
    inject()
    for _ in range(100):
        faults.crash_point("write.after_temp")
        assert faults.io_fault("write") is None
    atomic_write(tmp_path / "f", b"data")
    assert (tmp_path / "f").read_bytes() == b"data"


# An atomic write does one write, one rename and two fsyncs (the file's, then the folder's): the nth
# below is the second write's own operation.
@pytest.mark.parametrize("op, nth", [("write", 2), ("fsync", 3), ("rename", 2)])
def test_only_the_nth_atomic_write_operation_fails_and_the_target_is_untouched(
    tmp_path: Path, inject, op: str, nth: int  # type: ignore[no-untyped-def]
) -> None:
    target = tmp_path / "doc.json"
    inject(CONDUCTOR_FAULT=f"{op}:ENOSPC:{nth}")
    atomic_write(target, b"first")  # the earlier operations of this kind pass
    with pytest.raises(StorageError) as caught:
        atomic_write(target, b"second")
    assert caught.value.errno == errno.ENOSPC and "injected" in str(caught.value)
    assert target.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(TEMP_PREFIX)] == []
    atomic_write(target, b"third")  # only the nth fails: a caller that retried would have succeeded
    assert target.read_bytes() == b"third"


def test_a_failing_link_creates_nothing(tmp_path: Path, inject) -> None:  # type: ignore[no-untyped-def]
    inject(CONDUCTOR_FAULT="link:EIO")
    with pytest.raises(StorageError) as caught:
        publish_exclusive(tmp_path / "task.json", b"{}")
    assert caught.value.errno == errno.EIO
    assert list(tmp_path.iterdir()) == []


def test_a_failing_rename_leaves_the_source(tmp_path: Path, inject) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "a").write_text("x")
    (tmp_path / "b").mkdir()
    inject(CONDUCTOR_FAULT="rename:EIO")
    with pytest.raises(StorageError):
        durable_rename(tmp_path / "a", tmp_path / "b" / "a")
    assert (tmp_path / "a").read_text() == "x" and not (tmp_path / "b" / "a").exists()


def test_storage_error_is_an_oserror_and_a_conductor_error_with_exit_74() -> None:
    error = StorageError(errno.ENOSPC, "full", "/x")
    assert isinstance(error, OSError) and isinstance(error, ConductorError)
    assert error.exit_code == 74 and error.errno == errno.ENOSPC and error.filename == "/x"


def test_other_os_errors_are_not_wrapped(tmp_path: Path) -> None:
    publish_exclusive(tmp_path / "x", b"1")
    with pytest.raises(FileExistsError):
        publish_exclusive(tmp_path / "x", b"2")
    with pytest.raises(FileNotFoundError):
        durable_rename(tmp_path / "missing", tmp_path / "y")


def test_a_failed_audit_write_cuts_its_half_line_back_off(tmp_path: Path, inject) -> None:  # type: ignore[no-untyped-def]
    log = AuditLog(tmp_path / "audit.log")
    log.append("plan.resumed", {"pid": 1})
    before = log.path.read_bytes()
    inject(CONDUCTOR_FAULT="write:ENOSPC")
    with pytest.raises(StorageError):
        log.append("plan.resumed", {"pid": 2})  # half of the line reached the file, as on a filling disk
    inject()
    assert log.path.read_bytes() == before
    log.append("plan.resumed", {"pid": 3})
    assert verify_chain(log.path).ok and [e.data["pid"] for e in log.events()] == [1, 3]


def test_a_torn_tail_is_repaired_keeping_its_bytes(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.log")
    log.append("plan.resumed", {"pid": 1})
    log.append("plan.resumed", {"pid": 2})
    whole = log.path.read_bytes()
    log.path.write_bytes(whole[: -len(whole.splitlines()[-1]) // 2])  # what power loss mid-write leaves
    assert not verify_chain(log.path).ok
    before = log.path.read_bytes()
    torn = repair_torn_tail(log.path)
    assert torn is not None and 0 < torn.size < len(before)
    assert torn.saved_as.read_bytes() == before[-torn.size:]  # nothing is lost: the cut bytes are kept
    assert torn.saved_as.name.startswith("audit.log.torn-")
    assert log.path.read_bytes() == before[: -torn.size] and before[-torn.size - 1 : -torn.size] == b"\n"
    assert repair_torn_tail(log.path) is None  # idempotent
    log.append("plan.resumed", {"pid": 3})
    report = verify_chain(log.path)
    assert report.ok and report.entries == 2


def test_a_torn_tail_a_killed_writer_left_never_stops_another_process(tmp_path: Path) -> None:
    """A SIGKILL can cut a line at a page boundary; the next reader or writer in another process cuts it
    off (keeping its bytes) once it holds the lock, records the cut, and goes on (no exit 5)."""
    import subprocess
    import sys

    log = AuditLog(tmp_path / "audit.log")
    log.append("plan.resumed", {"pid": 1})
    with log.path.open("ab") as handle:
        handle.write(b'{"data":{"pid":2},"hash":"sha256:0')
    code = ("import sys; from conductor.audit import AuditLog; log = AuditLog(sys.argv[1], cut_torn_tail=True); "
            "print(len(log.events())); log.append('plan.resumed', {'pid': 3})")
    run = subprocess.run([sys.executable, "-c", code, str(log.path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "2"  # plan.resumed + recovery.audit_truncated
    assert [e.type for e in log.events()] == ["plan.resumed", "recovery.audit_truncated", "plan.resumed"]
    assert verify_chain(log.path).ok


def test_repair_keeps_a_complete_but_invalid_last_line(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    log.append("plan.resumed", {"pid": 1})
    with path.open("ab") as handle:
        handle.write(b'{"edited": true}\n')
    assert repair_torn_tail(path) is None  # not a torn write: tampering must stay visible
    assert not verify_chain(path).ok
