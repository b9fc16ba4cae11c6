"""The one place that runs a child command under a time limit.

The child gets its own session and process group, so a timeout or a stop request can signal everything
it started (SIGTERM, then SIGKILL after a grace period), and whatever is left of the group when the
child exits is killed too: a backgrounded grandchild never outlives its command. Input and output go
through one ``select`` loop, so neither a large stdin nor a large output can deadlock.
"""

from __future__ import annotations

import hashlib
import os
import selectors
import shlex
import signal as signals
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from conductor.errors import ExecutorError

DEFAULT_MAX_OUTPUT_BYTES = 1 << 20
POLL_SECONDS = 0.1
DRAIN_SECONDS = 1.0  # how long to keep reading after the group is gone (a daemon that escaped may hold the pipe)
_READ_SIZE = 65536


@dataclass(frozen=True)
class ProcOutcome:
    """What a command did.

    Attributes:
        exit_code: the child's exit status; None when it timed out, was stopped by us, or died by a signal.
        timed_out: True if the time limit ran out.
        output: combined stdout and stderr; only the last ``max_output_bytes`` of it.
        output_size: total bytes of output, including any dropped from the front of ``output``.
        output_sha256: hex SHA-256 of the full output (not only of the kept tail).
        duration_seconds: wall time from spawn to exit.
        signal: the signal that ended the child, if any (SIGTERM/SIGKILL when we stopped it).
    """

    exit_code: int | None
    timed_out: bool
    output: bytes
    output_size: int
    duration_seconds: float
    signal: int | None
    output_sha256: str = ""


class _Output:
    """Keeps the last ``limit`` bytes of a stream, its total size and its hash."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.buffer = bytearray()
        self.size = 0
        self.hasher = hashlib.sha256()

    def add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        self.hasher.update(chunk)
        self.buffer += chunk
        if len(self.buffer) > 2 * self.limit:  # trim rarely, not on every chunk
            del self.buffer[: len(self.buffer) - self.limit]

    def tail(self) -> bytes:
        return bytes(self.buffer[-self.limit :]) if self.limit else b""


def run_command(
    command: str | Sequence[str],
    *,
    cwd: Path,
    env: Mapping[str, str] | None = None,
    stdin: bytes | None = None,
    timeout_seconds: float,
    shell: bool | None = None,
    kill_grace_seconds: float = 2.0,
    on_start: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
) -> ProcOutcome:
    """Run ``command`` in its own process group and wait for it, at most ``timeout_seconds``.

    Args:
        command: a string (run by ``/bin/sh -c`` unless ``shell=False``, then split like a shell) or an
            argument list (executed directly unless ``shell=True``, then quoted and run by the shell).
        cwd: the working folder.
        env: the complete environment of the child (default: this process's environment).
        stdin: bytes fed to the child's standard input, which is then closed (default: ``/dev/null``).
        timeout_seconds: wall-time limit in seconds, counted from the spawn.
        shell: see ``command``; None chooses by the type of ``command``.
        kill_grace_seconds: seconds between SIGTERM and SIGKILL when the group must be stopped.
        on_start: called with the child's pid right after the spawn (to record it in a lease).
        should_stop: polled about every 0.1 s; when it returns True the group is stopped.
        max_output_bytes: how much of the end of the output to keep in memory.

    Returns:
        The :class:`ProcOutcome`.

    Raises:
        ExecutorError: the executable or ``cwd`` does not exist, or the executable cannot be run.
    """
    argv = _argv(command, shell)
    proc = _spawn(argv, cwd=cwd, env=env, feed=stdin is not None)
    started = time.monotonic()
    try:
        if on_start is not None:
            on_start(proc.pid)
        run = _Run(proc, stdin or b"", _Output(max_output_bytes))
        run.loop(started + timeout_seconds, kill_grace_seconds, should_stop)
    finally:
        _reap(proc)  # also on an exception or Ctrl-C: the group must not outlive us
    returncode = proc.returncode
    killed_by = -returncode if returncode < 0 else None
    return ProcOutcome(
        exit_code=None if run.stopping or killed_by else returncode,
        timed_out=run.timed_out,
        output=run.output.tail(),
        output_size=run.output.size,
        duration_seconds=time.monotonic() - started,
        signal=killed_by or run.last_signal,
        output_sha256=run.output.hasher.hexdigest(),
    )


def _argv(command: str | Sequence[str], shell: bool | None) -> list[str]:
    if isinstance(command, str):
        if shell is False:
            return shlex.split(command)
        return ["/bin/sh", "-c", command]
    if shell:
        return ["/bin/sh", "-c", shlex.join(command)]
    return list(command)


def _spawn(argv: list[str], *, cwd: Path, env: Mapping[str, str] | None, feed: bool) -> subprocess.Popen[bytes]:
    if not argv:
        raise ExecutorError("empty command")
    if not Path(cwd).is_dir():
        raise ExecutorError(f"cannot run {argv[0]!r}: working folder {cwd} does not exist")
    try:
        return subprocess.Popen(
            argv,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            stdin=subprocess.PIPE if feed else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except FileNotFoundError:
        raise ExecutorError(f"command not found: {argv[0]!r} (is it installed and on PATH?)") from None
    except PermissionError:
        raise ExecutorError(f"command cannot be executed (permission denied): {argv[0]!r}") from None
    except OSError as exc:
        raise ExecutorError(f"cannot run {argv[0]!r}: {exc}") from None


class _Run:
    """The select loop of one child: feeds stdin, reads output, enforces the deadline and stop requests."""

    def __init__(self, proc: subprocess.Popen[bytes], data: bytes, output: _Output) -> None:
        self.proc = proc
        self.pending = memoryview(data)
        self.output = output
        self.selector = selectors.DefaultSelector()
        self.timed_out = False
        self.stopping = False
        self.killed = False
        self.last_signal: int | None = None
        self.kill_at = 0.0
        assert proc.stdout is not None
        self.selector.register(proc.stdout, selectors.EVENT_READ)
        self.pidfd = _open_pidfd(proc.pid)
        if self.pidfd is not None:  # readable when the child exits: no need to wait for the next poll
            self.selector.register(self.pidfd, selectors.EVENT_READ)
        if proc.stdin is not None:
            os.set_blocking(proc.stdin.fileno(), False)
            self.selector.register(proc.stdin, selectors.EVENT_WRITE)
            if not self.pending:
                self._close_stdin()

    def loop(self, deadline: float, grace: float, should_stop: Callable[[], bool] | None) -> None:
        try:
            while not _has_exited(self.proc.pid):
                self._pump(POLL_SECONDS)
                now = time.monotonic()
                if not self.stopping and now >= deadline:
                    self.timed_out = True
                    self._stop(now + grace)
                elif not self.stopping and should_stop is not None and should_stop():
                    self._stop(now + grace)
                elif self.stopping and not self.killed and now >= self.kill_at:
                    self.killed = True
                    self.last_signal = _signal_group(self.proc.pid, signals.SIGKILL) or self.last_signal
            # The child is a zombie, so its pid (= the group id) cannot be reused yet: kill what is left.
            _signal_group(self.proc.pid, signals.SIGKILL)
            self._drain()
        finally:
            self.selector.close()
            if self.pidfd is not None:
                os.close(self.pidfd)

    def _stop(self, kill_at: float) -> None:
        self.stopping = True
        self.kill_at = kill_at
        self.last_signal = _signal_group(self.proc.pid, signals.SIGTERM)

    def _pump(self, timeout: float) -> bool:
        """Move data for up to ``timeout`` seconds; False once the output reached end of file."""
        for key, _events in self.selector.select(timeout):
            if key.fileobj == self.pidfd:
                self.selector.unregister(self.pidfd)
            elif key.fileobj is self.proc.stdin:
                self._feed()
            elif not self._read():
                return False
        return True

    def _feed(self) -> None:
        try:
            written = os.write(self.proc.stdin.fileno(), self.pending[:_READ_SIZE])
        except BlockingIOError:
            return
        except BrokenPipeError:  # the child stopped reading: the rest of the input is dropped
            written = len(self.pending)
        self.pending = self.pending[written:]
        if not self.pending:
            self._close_stdin()

    def _close_stdin(self) -> None:
        stdin = self.proc.stdin
        if self._registered(stdin):
            self.selector.unregister(stdin)
        try:
            stdin.close()
        except BrokenPipeError:
            pass

    def _registered(self, fileobj: object) -> bool:
        try:
            self.selector.get_key(fileobj)
        except KeyError:
            return False
        return True

    def _read(self) -> bool:
        chunk = os.read(self.proc.stdout.fileno(), _READ_SIZE)
        if not chunk:
            self.selector.unregister(self.proc.stdout)
            return False
        self.output.add(chunk)
        return True

    def _drain(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self._close_stdin()
        end = time.monotonic() + DRAIN_SECONDS
        while self._registered(self.proc.stdout) and time.monotonic() < end:
            if not self._pump(max(0.0, end - time.monotonic())):
                return


def _open_pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # not Linux >= 5.3: the loop polls every POLL_SECONDS instead
        return None


def _has_exited(pid: int) -> bool:
    """True once ``pid`` has exited, without reaping it (WNOWAIT keeps the zombie and its group id)."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None and info.si_pid != 0


def _signal_group(pgid: int, sig: int) -> int | None:
    """Send ``sig`` to the process group ``pgid``; return ``sig``, or None if the group is gone."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        return None
    return sig


def _reap(proc: subprocess.Popen[bytes]) -> None:
    if proc.returncode is None:
        # Normally only leftovers remain (the loop already ran); after an exception, the whole group.
        _signal_group(proc.pid, signals.SIGKILL)
        proc.wait()
    for stream in (proc.stdout, proc.stdin):
        if stream is not None and not stream.closed:
            try:
                stream.close()
            except OSError:  # a broken stdin pipe; nothing is buffered in it
                pass
