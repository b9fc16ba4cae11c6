"""Durable file writes: temp file, fsync, atomic rename or link, fsync of the directory.

The pattern follows Maildir delivery: a reader never sees a partial file, and after a crash a file is
either wholly there or wholly absent. Temp files are named ``.tmp.<name>.<pid>.<random>`` in the target
directory, so a recovery pass can find and delete them (``conductor.recovery``).

Every durable write of Conductor goes through this module, which is also where the fault-injection suite
makes writes fail (``CONDUCTOR_FAULT``) and processes die (``CONDUCTOR_CRASH_AT``, see
:mod:`conductor.faults`).

Errors: a storage failure (``ENOSPC``, ``EIO``, ``EDQUOT``, ``EROFS``, ``EFBIG``) is raised as
:class:`StorageError`, which is both an ``OSError`` and a ``ConductorError`` (exit code 74). An ``fsync``
failure is never retried: after a failed ``fsync`` the kernel may already have dropped the dirty pages
(PostgreSQL's "fsyncgate"), so a second ``fsync`` that succeeds proves nothing.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from conductor.errors import ConductorError
from conductor.faults import crash_point, io_fault

TEMP_PREFIX = ".tmp."
TEMP_NAME = re.compile(r"^\.tmp\.(?P<name>.+)\.(?P<pid>[0-9]+)\.(?P<random>[0-9a-f]{8})$")
"""A temp name this module makes: ``.tmp.<name>.<pid>.<8 hex>`` (recovery parses the writer's pid)."""

STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EROFS, errno.EFBIG})


class StorageError(ConductorError, OSError):
    """The disk refused a durable write (full, read-only, I/O error); nothing partial was made visible.

    Exit code 74 (``EX_IOERR`` of sysexits.h). ``errno`` and ``filename`` are those of the failed call.
    """

    exit_code = 74


@contextmanager
def _storage(what: str) -> Iterator[None]:
    """Re-raise a storage failure of the block as :class:`StorageError`; other errors pass unchanged."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in STORAGE_ERRNOS or isinstance(exc, StorageError):
            raise
        raise StorageError(exc.errno, f"{what} failed: {exc.strerror}", exc.filename) from exc


def temp_path(target: Path) -> Path:
    """A fresh temp name for a write of ``target``, in the same folder (see :data:`TEMP_NAME`)."""
    return target.parent / f"{TEMP_PREFIX}{target.name}.{os.getpid()}.{secrets.token_hex(4)}"


def fsync_fd(fd: int, path: object = None) -> None:
    """``fsync(fd)``, once. A failure is raised, never retried (see the module docstring).

    Raises:
        StorageError: the kernel reported a write-back error.
    """
    with _storage(f"fsync of {path}" if path is not None else "fsync"):
        error = io_fault("fsync", path)
        if error is not None:
            raise error
        os.fsync(fd)


def fsync_dir(directory: Path) -> None:
    """fsync ``directory`` so that a rename or link inside it survives a power loss."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fsync_fd(fd, directory)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes, path: object = None) -> None:
    """Write all of ``data`` to ``fd`` (``os.write`` may write less than asked).

    Raises:
        StorageError: the disk is full or failed; part of ``data`` may have been written.
    """
    view = memoryview(data)
    with _storage(f"write of {path}" if path is not None else "write"):
        error = io_fault("write", path)
        if error is not None:
            os.write(fd, view[: len(view) // 2])  # a failing write(2) may still have written a part
            raise error
        while view:
            view = view[os.write(fd, view) :]


def write_once(fd: int, data: bytes, path: object = None) -> int:
    """One ``os.write`` of ``data`` (for ``O_APPEND`` lines, which must not be split); returns bytes written.

    Raises:
        StorageError: the disk is full or failed; part of ``data`` may have been written.
    """
    with _storage(f"write of {path}" if path is not None else "write"):
        error = io_fault("write", path)
        if error is not None:
            os.write(fd, data[: len(data) // 2])
            raise error
        return os.write(fd, data)


def entry_names(folder: Path, *, dirs: bool = False) -> list[str]:
    """The entry names of ``folder`` (one ``scandir``, no stat; only folders with ``dirs``); [] if it is missing."""
    try:
        with os.scandir(folder) as entries:
            return [entry.name for entry in entries if not dirs or entry.is_dir(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []


def file_sha256(path: Path, *, chunk_bytes: int = 1 << 20) -> str:
    """Lowercase hex SHA-256 of a file's content, read in chunks of ``chunk_bytes``."""
    hasher = hashlib.sha256()
    with open(path, "rb") as source:
        while chunk := source.read(chunk_bytes):
            hasher.update(chunk)
    return hasher.hexdigest()


def write_temp(target: Path, data: bytes, mode: int = 0o644, *, sync: bool = True) -> Path:
    """Write ``data`` to a fresh fsynced temp file beside ``target``; returns the temp's path.

    The first half of :func:`atomic_write`, for callers that write a file's bytes before taking a lock
    and only rename it into place under the lock (:func:`commit_temp`). ``mode`` (permission bits) is set
    before the file can become visible. ``sync=False`` skips the fsync, for a file whose loss or damage in
    a power loss its readers already survive (a lease).

    Raises:
        StorageError: the disk is full or failed; no temp file is left.
        OSError: any other failure, with the same guarantee.
    """
    temp = _write_temp(target, data, mode, sync=sync)
    crash_point("write.after_temp")
    return temp


def write_temps(items: Sequence[tuple[Path, bytes]], mode: int = 0o644) -> list[Path]:
    """:func:`write_temp` for several files at once: every file is written first and then each is fsynced,
    so that one journal commit can carry them all (the later fsyncs find little left to flush). Each temp is
    still fsynced before the caller can rename it. Returns the temps in the order of ``items``.

    Raises:
        StorageError: the disk is full or failed; no temp file is left.
        OSError: any other failure, with the same guarantee.
    """
    temps = _write_temps(items, mode)
    for _ in temps:
        crash_point("write.after_temp")
    return temps


def _write_temps(items: Sequence[tuple[Path, bytes]], mode: int = 0o644) -> list[Path]:
    made: list[tuple[Path, int]] = []
    try:
        for target, data in items:
            temp = temp_path(target)
            made.append((temp, os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)))
            write_all(made[-1][1], data, target)
            os.fchmod(made[-1][1], mode)  # before the rename, whatever the umask
        for (_temp, fd), (target, _data) in zip(made, items, strict=False):
            fsync_fd(fd, target)
    except BaseException:
        for temp, fd in made:
            os.close(fd)
            temp.unlink(missing_ok=True)
        raise
    for _temp, fd in made:
        os.close(fd)
    return [temp for temp, _fd in made]


def _write_temp(target: Path, data: bytes, mode: int = 0o644, *, sync: bool = True) -> Path:
    temp = temp_path(target)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        write_all(fd, data, target)
        os.fchmod(fd, mode)  # before the rename, whatever the umask: no reader sees a wrong mode
        if sync:
            fsync_fd(fd, target)
    except BaseException:
        os.close(fd)
        temp.unlink(missing_ok=True)
        raise
    os.close(fd)
    return temp


def commit_temp(temp: Path, target: Path) -> None:
    """Rename a temp made by :func:`write_temp` over ``target`` (atomic; the folder is not fsynced).

    The caller fsyncs the folder (:func:`fsync_dir`) once after its last rename there, or not at all for a
    file that guards nothing across a power loss.

    Raises:
        StorageError: the rename failed; the temp is removed and ``target`` is unchanged.
        OSError: any other rename failure, with the same guarantee.
    """
    try:
        _rename(temp, target, replace=True)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    crash_point("write.after_rename")


def _rename(source: Path, target: Path, *, replace: bool) -> None:
    with _storage(f"rename of {source} to {target}"):
        error = io_fault("rename", target)
        if error is not None:
            raise error
        (os.replace if replace else os.rename)(source, target)


def atomic_write(target: Path, data: bytes, *, mode: int = 0o644, sync_dir: bool = True,
                 sync_file: bool = True) -> None:
    """Replace ``target`` with ``data`` atomically and durably (temp + fsync + rename + dir fsync).

    Args:
        mode: permission bits, set on the file before it becomes visible.
        sync_dir: fsync the folder after the rename. False leaves the new name's durability to a later
            fsync of the folder (several files committed together need one) or to nobody (a file no one
            needs after a power loss, such as a lease: its holder dies with the machine).
        sync_file: fsync the file before the rename. False only for a file whose readers survive finding
            it missing, old or unreadable after a power loss (a lease): the rename stays atomic for every
            reader while the machine runs; only a power loss can leave the name pointing at unwritten data.

    Raises:
        StorageError: the disk is full or failed; ``target`` is unchanged (or, if only the final folder
            fsync failed, replaced but possibly not durable) and no temp file is left.
        OSError: any other write or rename failure, with the same guarantee.
    """
    commit_temp(write_temp(target, data, mode, sync=sync_file), target)
    if sync_dir:
        fsync_dir(target.parent)
    if _scope.name == "apply":
        crash_point("apply.after_file")


def publish_exclusive(target: Path, data: bytes) -> None:
    """Create ``target`` with ``data`` atomically, failing if it already exists.

    Uses ``os.link`` (which fails on an existing name, unlike rename) from a fsynced temp file.

    Raises:
        FileExistsError: ``target`` already exists; nothing was changed.
        StorageError: the disk is full or failed; ``target`` was not created (or, if only the final
            folder fsync failed, created but possibly not durable).
        OSError: on any other write, fsync or link failure.
    """
    temp = _write_temp(target, data)
    crash_point("publish.after_temp")
    try:
        _link(temp, target)
        crash_point("publish.after_link")
    finally:
        temp.unlink(missing_ok=True)
    fsync_dir(target.parent)
    crash_point("publish.after_dir_fsync")


def publish_exclusive_many(items: Sequence[tuple[Path, bytes]]) -> list[FileExistsError | None]:
    """:func:`publish_exclusive` for several files: every temp is written, then each is fsynced (one
    journal commit can carry them all), then each is linked into place, then each folder is fsynced once.

    Returns:
        Per item, in order: None if its target was created, or the ``FileExistsError`` if the target
        already existed (that item changed nothing).

    Raises:
        StorageError: the disk is full or failed. No temp file is left; targets linked before the failure
            stay (their folder possibly not fsynced).
        OSError: on any other write, fsync or link failure, with the same guarantee.
    """
    temps = _write_temps(items)
    for _ in temps:
        crash_point("publish.after_temp")
    results: list[FileExistsError | None] = []
    try:
        for temp, (target, _data) in zip(temps, items, strict=True):
            try:
                _link(temp, target)
            except FileExistsError as exc:
                results.append(exc)
                continue
            results.append(None)
            crash_point("publish.after_link")
    finally:
        for temp in temps:
            temp.unlink(missing_ok=True)
    for folder in dict.fromkeys(target.parent for (target, _data), result in zip(items, results, strict=True)
                                if result is None):
        fsync_dir(folder)
    for result in results:
        if result is None:
            crash_point("publish.after_dir_fsync")
    return results


def _link(temp: Path, target: Path) -> None:
    with _storage(f"link of {target}"):
        error = io_fault("link", target)
        if error is not None:
            raise error
        os.link(temp, target)


def durable_rename(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target`` (atomic on one file system) and fsync both directories.

    Raises:
        FileNotFoundError: ``source`` is gone.
        StorageError: the rename or an fsync failed.
    """
    rename_file(source, target)
    sync_rename(source, target)


def rename_file(source: Path, target: Path) -> None:
    """The rename of :func:`durable_rename` alone, for a caller that fsyncs the folders later
    (:func:`sync_rename`), e.g. after releasing a lock.

    Raises:
        FileNotFoundError: ``source`` is gone.
        StorageError: the rename failed.
    """
    _rename(source, target, replace=False)
    crash_point("rename.after_rename")


def sync_rename(source: Path, target: Path) -> None:
    """fsync the folders of a rename made by :func:`rename_file` (the target's first)."""
    fsync_dir(target.parent)
    if source.parent != target.parent:
        fsync_dir(source.parent)


def remove_durably(path: Path) -> bool:
    """Unlink ``path`` and fsync its folder; returns False if it was already gone."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    fsync_dir(path.parent)
    return True


@contextmanager
def flocked(path: Path, *, timeout: float | None = None) -> Iterator[None]:
    """Hold an exclusive ``flock(2)`` on ``path`` (created if missing, never deleted) inside the block.

    Each call opens its own descriptor, so threads of one process exclude each other as processes do;
    the lock is released when the descriptor is closed, also by a crash. Without ``timeout`` the call
    blocks in the kernel and wakes as soon as the holder lets go (no polling).

    Args:
        timeout: seconds to wait at most; then the lock is tried every 0.1–5 ms (a holder keeps these
            locks for microseconds to milliseconds).

    Raises:
        TimeoutError: the lock stayed held by someone else for ``timeout`` seconds.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if timeout is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:
            _flock_within(fd, timeout, path)
        yield
    finally:
        os.close(fd)  # releases the lock


def _flock_within(fd: int, timeout: float, path: Path) -> None:
    deadline, pause = time.monotonic() + timeout, 0.0001
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{path}: lock held by another process for {timeout} s") from None
            time.sleep(pause)
            pause = min(pause * 2, 0.005)


class _Scope(threading.local):
    name: str | None = None


_scope = _Scope()


@contextmanager
def write_scope(name: str) -> Iterator[None]:
    """Label the atomic writes this thread makes inside the block (``"apply"``: the winner's files), so
    that crash points can name a step of a longer operation (``apply.after_file``)."""
    previous, _scope.name = _scope.name, name
    try:
        yield
    finally:
        _scope.name = previous


@contextmanager
def private_temp_dir(parent: Path | None) -> Iterator[Path]:
    """A fresh folder only this user may enter (mode 0700), removed with its contents at exit: a launched
    command's ``TMPDIR``.

    In ``parent`` it is named as a temp file of this process (:data:`TEMP_NAME`:
    ``.tmp.tmpdir.<random>.<pid>.<8 hex>``), so recovery's temp sweep removes it once this process is gone
    (a ``kill -9`` skips the removal at exit). With ``parent`` None it goes to the system temp folder
    (``conductor-tmp-*``), where nothing sweeps what a killed process leaves.

    What ran there cannot make the removal fail or reach elsewhere: a folder it replaced with a symlink or
    a file loses only that entry (a link is never followed), and what cannot be removed is left (in
    ``parent``, to recovery's sweep) rather than raised.

    Raises:
        OSError: the folder cannot be made.
    """
    import tempfile  # only the launchers need it

    if parent is None:
        context = tempfile.TemporaryDirectory(prefix="conductor-tmp-", ignore_cleanup_errors=True)
    else:
        parent.mkdir(parents=True, exist_ok=True)
        context = tempfile.TemporaryDirectory(prefix=f"{TEMP_PREFIX}tmpdir.", ignore_cleanup_errors=True,
                                              suffix=f".{os.getpid()}.{secrets.token_hex(4)}", dir=parent)
    with context as name:
        folder = Path(name)
        try:
            yield folder
        finally:
            with contextlib.suppress(OSError):  # replaced by a link or a file: remove that entry alone
                if not stat.S_ISDIR(os.lstat(folder).st_mode):
                    folder.unlink()
