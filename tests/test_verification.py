import hashlib
import os
import sys

from conductor.verification import all_passed, run_verification, verification_environment

VENV_BIN = os.path.dirname(os.path.abspath(sys.executable))
BARE_ENV = {"PATH": "/usr/bin:/bin"}  # as if the venv were not activated


def test_every_command_runs_even_after_a_failure(tmp_path):
    evidence = run_verification(
        ["echo one", "echo two >&2; exit 2", "touch ran-third"], tmp_path, timeout_seconds=30, environ=BARE_ENV
    )
    assert [e.exit_code for e in evidence] == [0, 2, 0]
    assert [e.command for e in evidence] == ["echo one", "echo two >&2; exit 2", "touch ran-third"]
    assert (tmp_path / "ran-third").exists()
    assert evidence[1].output_tail == "two\n"
    assert not all_passed(evidence)
    assert all_passed([evidence[0], evidence[2]])


def test_evidence_of_a_passing_command(tmp_path):
    (evidence,) = run_verification(["printf 'ok\\n'"], tmp_path, timeout_seconds=30, environ=BARE_ENV)
    assert evidence.exit_code == 0
    assert not evidence.timed_out
    assert evidence.duration_seconds > 0
    assert evidence.output_sha256 == hashlib.sha256(b"ok\n").hexdigest()
    assert evidence.output_tail == "ok\n"
    assert all_passed([evidence])


def test_a_timed_out_command_fails(tmp_path):
    (evidence,) = run_verification(["sleep 100"], tmp_path, timeout_seconds=0.5, environ=BARE_ENV)
    assert evidence.timed_out
    assert evidence.exit_code is None
    assert evidence.duration_seconds < 10
    assert not all_passed([evidence])


def test_output_tail_keeps_the_last_4000_characters_and_hashes_everything(tmp_path):
    code = "import sys; sys.stdout.buffer.write(b'x' * 10000 + b'\\xff' + 'é'.encode() * 3999)"
    (evidence,) = run_verification([f'python -c "{code}"'], tmp_path, timeout_seconds=30, environ=BARE_ENV)
    full = b"x" * 10000 + b"\xff" + "é".encode() * 3999
    assert evidence.output_sha256 == hashlib.sha256(full).hexdigest()
    assert evidence.output_tail == "\ufffd" + "é" * 3999


def test_python_and_pytest_resolve_to_conductors_environment(tmp_path):
    evidence = run_verification(
        ["python -c 'import sys; print(sys.executable)'", "command -v pytest", "python -m pytest --version"],
        tmp_path,
        timeout_seconds=60,
        environ=BARE_ENV,
    )
    assert all_passed(evidence), [e.output_tail for e in evidence]
    assert os.path.dirname(evidence[0].output_tail.strip()) == VENV_BIN
    assert evidence[1].output_tail.strip() == os.path.join(VENV_BIN, "pytest")


def test_environment_adds_the_interpreter_folder_and_no_bytecode():
    env = verification_environment({"PATH": "/usr/bin", "KEEP": "1", "OPENAI_API_KEY": "sk-x"}, ["KEEP"])
    assert env["PATH"] == f"{VENV_BIN}{os.pathsep}/usr/bin"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["KEEP"] == "1"  # named in executor.env
    assert "OPENAI_API_KEY" not in env  # everything else is withheld
    assert verification_environment({})["PATH"].startswith(VENV_BIN + os.pathsep)


def test_no_bytecode_is_written(tmp_path):
    (tmp_path / "mod.py").write_text("X = 1\n")
    (evidence,) = run_verification(["python -c 'import mod'"], tmp_path, timeout_seconds=30, environ=BARE_ENV)
    assert evidence.exit_code == 0
    assert not (tmp_path / "__pycache__").exists()


def test_a_missing_working_folder_is_recorded_not_raised(tmp_path):
    (evidence,) = run_verification(["true"], tmp_path / "missing", timeout_seconds=5, environ=BARE_ENV)
    assert evidence.exit_code is None
    assert "does not exist" in evidence.output_tail
    assert not all_passed([evidence])


def test_no_commands_pass_vacuously(tmp_path):
    assert run_verification([], tmp_path, timeout_seconds=5) == []
    assert all_passed([])
