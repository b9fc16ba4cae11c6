"""The sandbox of launched commands, played as an attacker: write outside the workspace, read the signing
key, open a TCP connection. Real bubblewrap, real processes. CI installs bubblewrap and sets
CONDUCTOR_TEST_REQUIRE_SANDBOX=1, so there these tests fail instead of skipping."""

from __future__ import annotations

import os
import socket
import sys
import threading
from pathlib import Path

import pytest

from conductor import sandbox
from conductor.errors import SandboxUnavailable
from conductor.proc import run_command
from conductor.sandbox import SandboxSpec, for_step

if sandbox.availability() is not None:
    if os.environ.get("CONDUCTOR_TEST_REQUIRE_SANDBOX") == "1":
        raise RuntimeError(f"CONDUCTOR_TEST_REQUIRE_SANDBOX=1 but {sandbox.availability()}")
    pytest.skip(f"no sandbox here: {sandbox.availability()}", allow_module_level=True)


@pytest.fixture
def place(tmp_path: Path) -> dict[str, Path]:
    project = tmp_path / "project"
    workspace = project / ".conductor" / "scratch" / "plan_p" / "fork_1" / "step_001.a1"
    keys = project / ".conductor" / "keys"
    private = tmp_path / "private-tmp"
    for folder in (workspace, keys, private):
        folder.mkdir(parents=True)
    (keys / "signing.key").write_text("-----BEGIN PRIVATE KEY-----\nsecret\n")
    (project / "policy.yaml").write_text("protected: yes\n")
    return {"project": project, "workspace": workspace, "keys": keys, "tmp": private}


def run(place: dict[str, Path], command: str, *, network: bool = False, mode: str = "required"):  # type: ignore[no-untyped-def]
    spec = for_step(writable=(place["workspace"], place["tmp"]), keys_dir=place["keys"], environ=os.environ,
                    mode=mode, network=network)  # type: ignore[arg-type]
    env = {**os.environ, "TMPDIR": str(place["tmp"]), "ROOT": str(place["project"])}
    return run_command(command, cwd=place["workspace"], env=env, timeout_seconds=60, shell=True, sandbox=spec)


def test_writes_land_only_in_the_workspace_and_the_private_temp(place) -> None:  # type: ignore[no-untyped-def]
    outcome = run(place, 'echo ok > in_workspace.txt && echo ok > "$TMPDIR/t" && echo pwned > "$ROOT/policy.yaml"')
    assert outcome.sandboxed and "sandboxed by bubblewrap" in outcome.sandbox
    assert outcome.exit_code != 0 and b"Read-only file system" in outcome.output
    assert (place["workspace"] / "in_workspace.txt").read_text() == "ok\n"
    assert (place["tmp"] / "t").read_text() == "ok\n"
    assert (place["project"] / "policy.yaml").read_text() == "protected: yes\n"


def test_the_signing_key_cannot_be_read(place) -> None:  # type: ignore[no-untyped-def]
    outcome = run(place, 'cat "$ROOT/.conductor/keys/signing.key" > stolen; echo "entries: $(ls -A "$ROOT/.conductor/keys" '
                         '| wc -l)"; test -s stolen')
    assert outcome.exit_code == 1
    assert (place["workspace"] / "stolen").read_bytes() == b""
    assert b"entries: 0" in outcome.output and b"PRIVATE KEY" not in outcome.output


def test_the_home_folders_credentials_are_hidden(place, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    (Path(os.environ["HOME"]) / ".ssh").mkdir()
    (Path(os.environ["HOME"]) / ".ssh" / "id_ed25519").write_text("private key\n")
    outcome = run(place, 'cat "$HOME/.ssh/id_ed25519"')
    assert outcome.exit_code != 0 and b"private key" not in outcome.output


class _Listener:
    """A TCP server on the host's loopback that counts connections."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.accepted = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.server.settimeout(10)
        try:
            while True:
                conn, _ = self.server.accept()
                self.accepted += 1
                conn.close()
        except OSError:
            return

    def close(self) -> None:
        self.server.close()


CONNECT = (f"{sys.executable} -c \"import socket, sys; s = socket.create_connection(('127.0.0.1', int(sys.argv[1])), "
           "timeout=5); print('connected')\" {port}")


def test_no_network_unless_the_policy_allows_it(place) -> None:  # type: ignore[no-untyped-def]
    listener = _Listener()
    try:
        denied = run(place, CONNECT.format(port=listener.port))
        assert denied.exit_code != 0 and b"connected" not in denied.output
        assert listener.accepted == 0
        allowed = run(place, CONNECT.format(port=listener.port), network=True)
        assert allowed.exit_code == 0 and b"connected" in allowed.output
        assert listener.accepted == 1
    finally:
        listener.close()


def test_nothing_the_command_starts_outlives_it(place) -> None:  # type: ignore[no-untyped-def]
    seconds = f"30.{os.getpid()}"  # a command line no other test's process has (tests may run side by side)
    outcome = run(place, f"(sleep {seconds} &) ; setsid sleep {seconds} & echo started")
    assert outcome.exit_code == 0
    leftovers = [p for p in Path("/proc").iterdir() if p.name.isdigit()
                 and _cmdline(p) == f"sleep\0{seconds}\0".encode()]
    assert leftovers == []


def _cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:
        return b""


def test_mode_off_runs_as_it_is_and_required_refuses_without_a_sandbox(place, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    off = run(place, 'echo x > "$ROOT/written"', mode="off")
    assert not off.sandboxed and off.exit_code == 0 and (place["project"] / "written").exists()

    monkeypatch.setenv("PATH", "/nonexistent")
    sandbox.availability.cache_clear()
    try:
        spec = SandboxSpec(writable=(place["workspace"],), mode="required")
        with pytest.raises(SandboxUnavailable, match="bubblewrap"):
            sandbox.wrap(["true"], spec, cwd=place["workspace"])
        auto = sandbox.wrap(["true"], SandboxSpec(writable=(place["workspace"],), mode="auto"), cwd=place["workspace"])
        assert not auto.sandboxed and "not installed" in auto.reason
    finally:
        sandbox.availability.cache_clear()


def test_no_second_name_for_a_file_can_be_made_but_git_still_commits(place) -> None:  # type: ignore[no-untyped-def]
    # A hard link would let a command rewrite a file unseen by the change feed (conductor/seccomp.py).
    (place["workspace"] / "a.txt").write_text("a\n")
    outcome = run(place, "ln a.txt b.txt; echo ln=$?; "
                         "python3 -c \"import os; os.link('a.txt', 'c.txt')\" 2>&1 | tail -1; "
                         "git init -q repo && cd repo && echo x > f && git add f && "
                         "git -c user.name=t -c user.email=t@t commit -qm x && git clone -q . ../copy && echo committed")
    assert outcome.exit_code == 0, outcome.output
    assert b"ln=1" in outcome.output and b"[Errno 18] Invalid cross-device link" in outcome.output
    assert b"committed" in outcome.output  # git falls back from link() to rename(), and clone to copying
    assert sorted(p.name for p in place["workspace"].iterdir()) == ["a.txt", "copy", "repo"]
    assert os.stat(place["workspace"] / "a.txt").st_nlink == 1
