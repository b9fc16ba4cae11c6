"""The one place that runs a child command under a time limit.

The child gets its own session and process group, so a timeout or a stop request can signal everything
it started (SIGTERM, then SIGKILL after a grace period), and whatever is left of the group when the
child exits is killed too: a backgrounded grandchild never outlives its command. Input and output go
through one ``select`` loop, so neither a large stdin nor a large output can deadlock.

A child that leaves the group (``setsid``, a daemon's double fork) escapes ``killpg``. Given a
``sweep_environ`` entry such as ``CONDUCTOR_WORKSPACE=<path>``, which every descendant inherits, the
processes still carrying it are killed too (Linux, via ``/proc``). A descendant that both leaves the group
and replaces its environment escapes; a cgroup would catch it, but needs delegation we cannot count on.
A sandboxed command (bubblewrap, ``--unshare-pid``) needs no sweep: every descendant is in its pid
namespace, which the kernel empties when the namespace's init exits; that exit is awaited instead (see
:class:`_Namespace`), and only if it cannot be shown is ``/proc`` swept.

:func:`kill_orphans` finds and kills what a dead executor left running (used by the reaper), and
:func:`process_start` gives the start identity that protects it against recycled pids.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import selectors
import shlex
import signal as signals
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from conductor.sandbox import SandboxSpec, reports_status, wrap
from conductor.seccomp import no_links_filter
from conductor.errors import ExecutorError

DEFAULT_MAX_OUTPUT_BYTES = 1 << 20
POLL_SECONDS = 0.1
DRAIN_SECONDS = 1.0  # how long to keep reading after the group is gone (a daemon that escaped may hold the pipe)
NAMESPACE_WAIT_SECONDS = 5.0  # how long a sandbox's pid namespace may take to empty before /proc is swept instead
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
        sandbox: how the child was contained (``conductor.sandbox.Wrapped.describe``); "" when no
            sandbox was asked for.
        sandboxed: whether it ran inside a sandbox.
        contained: whether every process it started is known to be gone: it ran in a sandbox's pid
            namespace, and that namespace's init exited (the kernel empties the namespace first).
    """

    exit_code: int | None
    timed_out: bool
    output: bytes
    output_size: int
    duration_seconds: float
    signal: int | None
    output_sha256: str = ""
    sandbox: str = ""
    sandboxed: bool = False
    contained: bool = False


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
    on_start: Callable[[int, bool], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    kill_now: Callable[[], bool] | None = None,
    sweep_environ: str | None = None,
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
    sandbox: SandboxSpec | None = None,
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
        on_start: called with the child's pid (= its process group id) right after the spawn, and whether
            every process it starts dies with this process (a sandbox's pid namespace with
            ``--die-with-parent``), to record both in a lease; if it raises, the group is killed and the
            exception propagates.
        should_stop: polled about every 0.1 s; when it returns True the group is stopped (SIGTERM, then
            SIGKILL after ``kill_grace_seconds``).
        kill_now: polled about every 0.1 s, also during the grace period; when it returns True the group
            gets SIGKILL at once (a second Ctrl-C).
        sweep_environ: a ``NAME=value`` environment entry the child is started with; when the group is
            gone, every other process whose environment holds exactly this entry is killed too (it left
            the group with ``setsid``). Linux only; elsewhere ignored.
        max_output_bytes: how much of the end of the output to keep in memory.
        sandbox: run the child inside this sandbox (``conductor.sandbox``); None runs it as it is.

    Returns:
        The :class:`ProcOutcome`.

    Raises:
        ExecutorError: the executable or ``cwd`` does not exist, or the executable cannot be run.
        SandboxUnavailable: ``sandbox.mode`` is ``required`` and no sandbox can be made here.
    """
    argv = _argv(command, shell)
    wrapped = None
    namespace: _Namespace | None = None
    no_links: int | None = None
    if sandbox is not None:
        wrapped = wrap(argv, sandbox, cwd=cwd)
        argv = wrapped.argv
        if wrapped.sandboxed and (program := no_links_filter()) is not None:
            # Every sandboxed command runs without hard links: the change feed relies on it (seccomp.py).
            no_links = _memory_file(program)
            argv = [argv[0], "--seccomp", str(no_links), *argv[1:]]
        if wrapped.sandboxed and "--unshare-pid" in argv and reports_status():
            namespace = _Namespace()
            argv = [argv[0], "--json-status-fd", str(namespace.write_fd), *argv[1:]]
    run: _Run | None = None
    fds = tuple(fd for fd in (namespace.write_fd if namespace is not None else None, no_links) if fd is not None)
    try:
        proc = _spawn(argv, cwd=cwd, env=env, feed=stdin is not None, pass_fds=fds)
    except BaseException:
        if namespace is not None:
            namespace.close()
        raise
    finally:
        if no_links is not None:
            os.close(no_links)  # bwrap has its own copy (or the spawn failed)
    started = time.monotonic()
    try:
        if namespace is not None:
            namespace.started()
        if on_start is not None:
            on_start(proc.pid, wrapped is not None and wrapped.dies_with_starter)
        run = _Run(proc, stdin or b"", _Output(max_output_bytes), namespace)
        run.loop(started + timeout_seconds, kill_grace_seconds, should_stop, kill_now)
    finally:
        _reap(proc)  # also on an exception or Ctrl-C: the group must not outlive us
        try:
            # A sandboxed command's descendants all live in its pid namespace, which the kernel empties
            # when the namespace's init exits; once that exit is seen, no sweep of /proc is needed.
            contained = namespace is not None and namespace.emptied(NAMESPACE_WAIT_SECONDS)
        finally:
            if namespace is not None:
                namespace.close()
        if sweep_environ is not None and not contained:
            kill_orphans(None, leader_start=None, marker=sweep_environ, grace_seconds=0.0)
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
        sandbox=wrapped.describe(sandbox) if wrapped is not None and sandbox is not None else "",
        sandboxed=wrapped is not None and wrapped.sandboxed,
        contained=contained,
    )


def _memory_file(data: bytes) -> int:
    """An in-memory file (memfd) holding ``data``, rewound, to pass to a child by its number."""
    fd = os.memfd_create("conductor-seccomp", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _argv(command: str | Sequence[str], shell: bool | None) -> list[str]:
    if isinstance(command, str):
        if shell is False:
            return shlex.split(command)
        return ["/bin/sh", "-c", command]
    if shell:
        return ["/bin/sh", "-c", shlex.join(command)]
    return list(command)


def _spawn(argv: list[str], *, cwd: Path, env: Mapping[str, str] | None, feed: bool,
           pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[bytes]:
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
            pass_fds=pass_fds,
        )
    except FileNotFoundError:
        raise ExecutorError(f"command not found: {argv[0]!r} (is it installed and on PATH?)") from None
    except PermissionError:
        raise ExecutorError(f"command cannot be executed (permission denied): {argv[0]!r}") from None
    except OSError as exc:
        raise ExecutorError(f"cannot run {argv[0]!r}: {exc}") from None


class _Namespace:
    """The pid namespace of a bubblewrap sandbox, watched through ``bwrap --json-status-fd``.

    bwrap writes ``{"child-pid": N, ...}`` (the namespace's init, as this host numbers it) right after it
    made the namespace. When a namespace's init exits, the kernel kills every process in it (a ``setsid``
    daemon, a double fork, a nested namespace alike) and the init's exit completes only once all of them
    are gone (pid_namespaces(7)); a pidfd of the init turns readable only then. So once it is readable,
    nothing the command started is left. The init is pinned by a pidfd as soon as its pid is known.
    """

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe2(os.O_CLOEXEC)
        self.buffer = b""
        self.init_fd: int | None = None
        self.init_gone = False  # the init was reaped before it could be pinned: it exited

    def started(self) -> None:
        """Call once the sandbox was spawned: this process keeps only the reading end."""
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1

    def read(self) -> bool:
        """Read what bwrap wrote; False at end of file."""
        chunk = os.read(self.read_fd, _READ_SIZE)
        if not chunk:
            return False
        if self.init_fd is None and not self.init_gone:
            self.buffer += chunk
            line, newline, _rest = self.buffer.partition(b"\n")
            if newline:
                self._pin(line)
        return True

    def _pin(self, line: bytes) -> None:
        try:
            pid = json.loads(line)["child-pid"]
        except (ValueError, KeyError, TypeError):
            return
        if not isinstance(pid, int) or pid <= 1:
            return
        try:
            self.init_fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self.init_gone = True
        except (AttributeError, OSError):  # no pidfd here (Linux < 5.3): unproven, the caller sweeps
            pass

    def emptied(self, timeout: float) -> bool:
        """True once the namespace's init has exited (and with it everything in the namespace), waiting at
        most ``timeout`` seconds; False when that cannot be shown."""
        if self.init_fd is None and not self.init_gone:
            with contextlib.suppress(OSError):  # the child-pid line may still be in the pipe
                os.set_blocking(self.read_fd, False)
                while self.init_fd is None and not self.init_gone and self.read():
                    pass
        if self.init_gone:
            return True
        if self.init_fd is None:
            return False
        with selectors.DefaultSelector() as selector:
            selector.register(self.init_fd, selectors.EVENT_READ)
            return bool(selector.select(timeout))

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd, self.init_fd):
            if fd is not None and fd >= 0:
                os.close(fd)
        self.read_fd = self.write_fd = -1
        self.init_fd = None


class _Run:
    """The select loop of one child: feeds stdin, reads output, enforces the deadline and stop requests."""

    def __init__(self, proc: subprocess.Popen[bytes], data: bytes, output: _Output,
                 namespace: _Namespace | None = None) -> None:
        self.proc = proc
        self.namespace = namespace
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
        if namespace is not None:  # the sandbox's init is pinned as soon as bwrap names it
            self.selector.register(namespace.read_fd, selectors.EVENT_READ)
        if proc.stdin is not None:
            os.set_blocking(proc.stdin.fileno(), False)
            self.selector.register(proc.stdin, selectors.EVENT_WRITE)
            if not self.pending:
                self._close_stdin()

    def loop(
        self, deadline: float, grace: float, should_stop: Callable[[], bool] | None, kill_now: Callable[[], bool] | None
    ) -> None:
        try:
            while not _has_exited(self.proc.pid):
                self._pump(POLL_SECONDS)
                now = time.monotonic()
                hurry = kill_now is not None and kill_now()
                if not self.stopping and now >= deadline:
                    self.timed_out = True
                    self._stop(now + grace)
                elif not self.stopping and (hurry or (should_stop is not None and should_stop())):
                    self._stop(now + grace)
                if self.stopping and not self.killed and (hurry or now >= self.kill_at):
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
            elif self.namespace is not None and key.fileobj == self.namespace.read_fd:
                if not self.namespace.read():
                    self.selector.unregister(self.namespace.read_fd)
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


# --- processes left behind (Linux /proc) ---------------------------------------------------------
#
# After a kill -9 of an executor, its command runs on, orphaned. The reaper knows from the lease the
# command's process group id and the start identity of its leader. A pid (and so a group id) is recycled
# once the group is gone, so before signalling anything it proves the group is still the recorded one:
# either its leader still has the recorded start identity (boot id + start time in clock ticks: for a pid
# to come back within one tick the whole pid space would have to wrap), or a live member carries the
# attempt's environment marker (a recycled group's members do not). Each candidate is pinned by a pidfd before it is
# examined, so what was examined is what gets signalled. Without /proc (not Linux) nothing is proven and
# nothing is killed: an orphan may survive, an unrelated process never dies.

_PROC = Path("/proc")
_ORPHAN_POLL_SECONDS = 0.05


@cache
def _boot_id() -> str | None:
    try:
        return (_PROC / "sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _read(path: str) -> bytes | None:
    """The content of a ``/proc`` file, or None if it cannot be read (plain ``os.read``: a scan reads
    hundreds of them, and ``Path.read_bytes`` costs five times as much)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:  # gone, or another user's process
        return None
    try:
        chunks = []
        while chunk := os.read(fd, _READ_SIZE):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def _stat(pid: int) -> tuple[str, int, int] | None:
    """``(state, pgrp, starttime)`` of ``pid`` from ``/proc/<pid>/stat`` (proc(5): fields 3, 5 and 22)."""
    raw = _read(f"{_PROC}/{pid}/stat")
    if raw is None:
        return None
    fields = raw[raw.rfind(b")") + 2 :].split()  # the command name (field 2) may contain spaces and parens
    try:
        return fields[0].decode(), int(fields[2]), int(fields[19])
    except (IndexError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host and can still run (``kill(pid, 0)``; one owned by
    another user counts).

    A zombie (state ``Z`` or ``X`` in ``/proc/<pid>/stat``, proc(5)) is dead: it has exited, runs no code
    and holds no file, and only waits for its parent to collect it, which can take seconds (an init that
    reaps orphans periodically). Without ``/proc``, ``kill`` alone decides.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    stat = _stat(pid)
    if stat is None:  # gone since the kill, or no /proc here
        return not (_PROC / "self").is_dir()
    return stat[0] not in ("Z", "X")


def process_start(pid: int) -> str | None:
    """The start identity of process ``pid``: ``"<boot_id>:<starttime>"``, which a recycled pid never shares.

    ``boot_id`` is ``/proc/sys/kernel/random/boot_id``; ``starttime`` is field 22 of ``/proc/<pid>/stat``
    (clock ticks after boot, proc(5)). Returns None without ``/proc`` (not Linux) or once ``pid`` is gone.
    """
    boot, stat = _boot_id(), _stat(pid)
    if boot is None or stat is None:
        return None
    return f"{boot}:{stat[2]}"


def _environ_has(pid: int, entry: bytes) -> bool:
    """Does ``pid``'s environment (as of its last exec) hold exactly ``entry``? (A zombie's reads as empty.)"""
    raw = _read(f"{_PROC}/{pid}/environ")
    return raw is not None and entry in raw.split(b"\0")


_snapshot = threading.local()


@contextlib.contextmanager
def environ_snapshot() -> Iterator[None]:
    """Within the block, this thread's scans for orphans read each process's environment once for their
    first filter: a reaper looking for the leftovers of many dead holders reads ``/proc`` once, not once a
    holder. Only the filter uses it: a process it picks is pinned and read again before it is signalled,
    and a process started since the first read (a new pid) is read then. A process caught between its fork
    and its exec shows its parent's environment until the exec; if the exec adds the marker, this pass misses
    it (only a live launcher adds a marker that way, and the next pass reads it again)."""
    saved = getattr(_snapshot, "environs", None)
    _snapshot.environs = {}
    try:
        yield
    finally:
        _snapshot.environs = saved


def _may_carry(pid: int, entry: bytes) -> bool:
    """:func:`_environ_has`, from this thread's :func:`environ_snapshot` when one is active."""
    environs: dict[int, frozenset[bytes]] | None = getattr(_snapshot, "environs", None)
    if environs is None:
        return _environ_has(pid, entry)
    if pid not in environs:
        raw = _read(f"{_PROC}/{pid}/environ")
        environs[pid] = frozenset(raw.split(b"\0")) if raw is not None else frozenset()
    return entry in environs[pid]


class _Pinned:
    """A process held by a pidfd (Linux >= 5.3): a signal sent through it can never reach a recycled pid."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fd = _open_pidfd(pid)

    def alive(self) -> bool:
        if self.fd is not None:
            with selectors.DefaultSelector() as selector:  # a pidfd polls readable once its process exited
                selector.register(self.fd, selectors.EVENT_READ)
                return not selector.select(0)
        stat = _stat(self.pid)
        return stat is not None and stat[0] not in ("Z", "X")

    def in_group(self, pgid: int) -> bool:
        stat = _stat(self.pid)
        return stat is not None and stat[1] == pgid and self.alive()

    def signal(self, sig: int) -> None:
        try:
            if self.fd is not None:
                signals.pidfd_send_signal(self.fd, sig)
            else:  # no pidfd (Linux < 5.3): a pid recycled in the microseconds since it was examined could be hit
                os.kill(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _pids() -> Iterator[int]:
    try:
        names = os.listdir(_PROC)
    except OSError:  # no /proc: nothing can be proven
        return
    me = os.getpid()
    for name in names:
        if name.isdigit() and int(name) != me:
            yield int(name)


def _find_orphans(pgid: int | None, leader_start: str | None, marker: bytes | None, *, proven: bool) -> list[_Pinned]:
    """Pin every live process carrying ``marker``, and the live members of group ``pgid`` if it is proven.

    The group is proven by ``proven`` (the caller still holds a live member it proved earlier), by its
    leader having start identity ``leader_start``, or by a live member carrying ``marker``. The caller
    closes the returned handles.
    """
    members: list[_Pinned] = []
    marked: list[_Pinned] = []
    for pid in _pids():
        stat = _stat(pid) if pgid is not None else None  # a scan for the marker alone reads no stat file
        in_group = stat is not None and stat[1] == pgid
        if not in_group and (marker is None or not _may_carry(pid, marker)):
            continue
        stat = stat or _stat(pid)
        if stat is None or stat[0] in ("Z", "X"):
            continue
        pinned = _Pinned(pid)  # pinned, then examined, then checked alive: what was examined is what is pinned
        carries = marker is not None and _environ_has(pid, marker)
        leader = in_group and pid == pgid and leader_start is not None and process_start(pid) == leader_start
        if not pinned.alive() or not (in_group or carries):
            pinned.close()
            continue
        proven = proven or (in_group and (carries or leader))
        (members if in_group else marked).append(pinned)
    if not proven:
        for pinned in members:
            pinned.close()
        members = []
    return members + marked


def _signal_all(found: list[_Pinned], sig: int, wait: float) -> None:
    for pinned in found:
        pinned.signal(sig)
    deadline = time.monotonic() + wait
    while any(pinned.alive() for pinned in found) and time.monotonic() < deadline:
        time.sleep(_ORPHAN_POLL_SECONDS)


def kill_orphans(pgid: int | None, *, leader_start: str | None, marker: str | None, grace_seconds: float) -> list[int]:
    """Kill what a dead executor left running: its process group, if proven, and whatever carries ``marker``.

    Args:
        pgid: the recorded process group id (= pid of its leader), or None to only look for ``marker``.
        leader_start: the leader's :func:`process_start` as recorded when it was spawned, or None.
        marker: a ``NAME=value`` environment entry every process of the work inherited, or None.
        grace_seconds: time between SIGTERM and SIGKILL.

    The group ``pgid`` is signalled only if its leader still has start identity ``leader_start`` or one of
    its live members carries ``marker``; processes carrying ``marker`` are signalled wherever they are.
    This process is never signalled. Nothing is signalled where ``/proc`` is missing.

    Returns:
        The pids signalled, sorted (empty when nothing was found or the group was not proven).
    """
    entry = marker.encode() if marker is not None else None
    first: list[_Pinned] = []
    second: list[_Pinned] = []
    try:
        first = _find_orphans(pgid, leader_start, entry, proven=False)
        if not first:
            return []
        _signal_all(first, signals.SIGTERM, grace_seconds)
        # Still proven while a member pinned above lives in the group (its id cannot be recycled), even if
        # the leader the proof rested on is gone now. A second scan also catches forks made meanwhile.
        still = pgid is not None and any(pinned.in_group(pgid) for pinned in first)
        second = _find_orphans(pgid, leader_start, entry, proven=still)
        _signal_all(second, signals.SIGKILL, 0.0)
        return sorted({pinned.pid for pinned in first + second})
    finally:
        for pinned in first + second:
            pinned.close()
