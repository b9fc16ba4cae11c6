"""Workspace snapshots, diffs and change application: Conductor's ground truth of what changed.

An executor's own list of changed files is never trusted. Conductor hashes a working copy before and
after a step (an ``lstat`` walk that never follows symlinks and sees dot-files, ignored files and
``.git/``), computes the change set itself, and applies an accepted change set to the fork's copy and
finally to the project, refusing when a target changed since the change's base (a merge conflict).
"""

from __future__ import annotations

import difflib
import hashlib
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pathspec

from conductor.blobs import BlobStore
from conductor.errors import (
    ChecksumMismatch,
    InvalidDocument,
    MergeConflict,
    UnsafePath,
)
from conductor.fsutil import TEMP_PREFIX, atomic_write, file_sha256, fsync_dir
from conductor.models import FileChange
from conductor.paths import check_relpath, resolve_inside

ALWAYS_EXCLUDED = (".conductor",)
SNAPSHOT_SCHEMA = "conductor.snapshot/v1"
SYMLINK_MODE = 0o777
BINARY_SNIFF_BYTES = 8192
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class Entry:
    """One file or symlink of a snapshot.

    Attributes:
        kind: ``"file"`` or ``"symlink"``.
        mode: permission bits (``st_mode & 0o7777``); always ``0o777`` for symlinks.
        sha256: lowercase hex SHA-256 of the content, or of the link target text for symlinks.
        size: bytes of the content (or of the link target text).
    """

    kind: Literal["file", "symlink"]
    mode: int
    sha256: str
    size: int


Snapshot = dict[str, Entry]
"""POSIX relative path -> :class:`Entry`. Directories are not entries (as in git, empty ones vanish)."""


# --- walking ------------------------------------------------------------------------------------


def _compile(ignore: Sequence[str]) -> pathspec.PathSpec | None:
    return pathspec.GitIgnoreSpec.from_lines(ignore) if ignore else None


def _walk(
    root: Path, spec: pathspec.PathSpec | None, excluded: Sequence[str] = ALWAYS_EXCLUDED
) -> Iterator[tuple[str, Path, os.stat_result]]:
    """Yield ``(relpath, path, lstat)`` of every directory, file and symlink under ``root``.

    Parents come before their children; ``excluded`` names are skipped at the top level only.
    Special files raise :class:`UnsafePath`.
    """
    stack: list[tuple[str, Path]] = [("", root)]
    while stack:
        prefix, folder = stack.pop()
        with os.scandir(folder) as it:
            found = sorted(it, key=lambda e: e.name, reverse=True)
        for item in found:
            if not prefix and item.name in excluded:
                continue
            rel = prefix + item.name
            _check_name(rel)
            st = item.stat(follow_symlinks=False)
            is_dir = stat.S_ISDIR(st.st_mode)
            # Directory patterns such as "cache/" only match with the trailing slash.
            if spec is not None and spec.match_file(rel + "/" if is_dir else rel):
                continue
            if not (is_dir or stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
                raise UnsafePath(f"{rel}: special file ({_kind_name(st.st_mode)}) in workspace {root}")
            yield rel, Path(item.path), st
            if is_dir:
                stack.append((rel + "/", Path(item.path)))


def _check_name(rel: str) -> None:
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafePath(f"{rel.encode('utf-8', 'surrogateescape')!r}: file name is not UTF-8") from None


def _kind_name(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "unknown type"


# --- snapshots ----------------------------------------------------------------------------------


def snapshot(root: Path, *, ignore: Sequence[str] = (), store: BlobStore | None = None) -> Snapshot:
    """Hash every file and symlink under ``root`` without following symlinks.

    Dot-files, gitignored files and ``.git/`` (hooks, config) are included; ``.conductor/`` at the root
    never is.

    Args:
        root: the working copy.
        ignore: gitignore-style patterns of paths that are neither snapshotted nor copied (tool caches).
        store: if given, every file's bytes and every symlink's target text are put in it, so the
            snapshot can later be diffed against or restored.

    Returns:
        POSIX relative path -> :class:`Entry`.

    Raises:
        UnsafePath: a fifo, socket or device (named in the message), or a file name that is not UTF-8.
        OSError: a file cannot be read.
    """
    result: Snapshot = {}
    for rel, path, st in _walk(root, _compile(ignore)):
        if not stat.S_ISDIR(st.st_mode):
            result[rel] = _entry(path, st, store)
    return result


def _entry(path: Path, st: os.stat_result, store: BlobStore | None) -> Entry:
    if stat.S_ISLNK(st.st_mode):
        target = os.fsencode(os.readlink(path))
        digest = store.put_bytes(target) if store else hashlib.sha256(target).hexdigest()
        return Entry("symlink", SYMLINK_MODE, digest, len(target))
    digest = store.put_file(path) if store else file_sha256(path)
    return Entry("file", stat.S_IMODE(st.st_mode), digest, st.st_size)


def snapshot_to_document(s: Snapshot) -> dict[str, Any]:
    """The JSON-ready form of a snapshot: ``{"schema": ..., "entries": {path: {kind, mode, sha256, size}}}``."""
    entries = {
        path: {"kind": e.kind, "mode": e.mode, "sha256": e.sha256, "size": e.size} for path, e in sorted(s.items())
    }
    return {"schema": SNAPSHOT_SCHEMA, "entries": entries}


def snapshot_from_document(d: dict[str, Any]) -> Snapshot:
    """Parse what :func:`snapshot_to_document` wrote.

    Raises:
        InvalidDocument: wrong schema, a malformed entry, or an unsafe path (absolute, ``..``, empty part).
    """
    if not isinstance(d, dict) or d.get("schema") != SNAPSHOT_SCHEMA or not isinstance(d.get("entries"), dict):
        raise InvalidDocument(f"not a {SNAPSHOT_SCHEMA} document")
    result: Snapshot = {}
    for path, raw in d["entries"].items():
        try:
            _check_relpath(path)
        except UnsafePath as exc:
            raise InvalidDocument(f"snapshot entry: {exc}") from None
        result[path] = _parse_entry(path, raw)
    return result


def _parse_entry(path: str, raw: Any) -> Entry:
    if not isinstance(raw, dict) or set(raw) != {"kind", "mode", "sha256", "size"}:
        raise InvalidDocument(f"snapshot entry {path!r}: expected exactly kind, mode, sha256, size")
    kind, mode, digest, size = raw["kind"], raw["mode"], raw["sha256"], raw["size"]
    valid = (
        kind in ("file", "symlink")
        and _is_int(mode) and 0 <= mode <= 0o7777
        and isinstance(digest, str) and len(digest) == 64 and set(digest) <= _HEX
        and _is_int(size) and size >= 0
    )
    if not valid:
        raise InvalidDocument(f"snapshot entry {path!r}: malformed {raw!r}")
    return Entry(kind, mode, digest, size)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# --- copying and restoring ----------------------------------------------------------------------


def copy_tree(src: Path, dst: Path, *, ignore: Sequence[str] = ()) -> None:
    """Copy the working copy ``src`` to the new folder ``dst``.

    Files keep their permission bits, symlinks are copied as symlinks (never followed), ``.conductor/``
    at the root and paths matching ``ignore`` are skipped. The tree is built in a temp folder next to
    ``dst`` and renamed into place, so after a crash ``dst`` is either complete or absent (file contents
    are not fsynced: compare with :func:`snapshot` if a power loss is a concern).

    Raises:
        FileExistsError: ``dst`` already exists.
        UnsafePath: ``src`` holds a fifo, socket or device.
    """
    if dst.exists() or dst.is_symlink():
        raise FileExistsError(f"copy destination already exists: {dst}")
    spec = _compile(ignore)

    def fill(temp: Path) -> None:
        for rel, path, st in _walk(src, spec):
            target = temp / rel
            if stat.S_ISDIR(st.st_mode):
                target.mkdir()
            elif stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(path), target)
            else:
                shutil.copyfile(path, target, follow_symlinks=False)
                os.chmod(target, stat.S_IMODE(st.st_mode))

    _build_then_publish(dst, fill)


def restore_snapshot(s: Snapshot, store: BlobStore, dst: Path) -> None:
    """Materialise the snapshot ``s`` (whose blobs are in ``store``) into ``dst``.

    ``dst`` must not exist or be an empty folder. Like :func:`copy_tree` the tree is built aside and
    renamed into place.

    Raises:
        FileExistsError: ``dst`` exists and is not empty.
        NotFound: a blob is missing from ``store``.
        ChecksumMismatch: a blob was altered.
        UnsafePath: a path of ``s`` is absolute or has ``..``.
    """
    if dst.is_symlink() or (dst.exists() and (not dst.is_dir() or any(dst.iterdir()))):
        raise FileExistsError(f"restore destination exists and is not empty: {dst}")

    def fill(temp: Path) -> None:
        for rel, entry in sorted(s.items()):
            target = _resolve_inside(temp, rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            data = store.get_bytes(entry.sha256)
            if entry.kind == "symlink":
                os.symlink(os.fsdecode(data), target)
            else:
                target.write_bytes(data)
                os.chmod(target, entry.mode)

    _build_then_publish(dst, fill)


def _build_then_publish(dst: Path, fill: Callable[[Path], None]) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    temp = dst.parent / f"{TEMP_PREFIX}{dst.name}.{os.getpid()}.{secrets.token_hex(4)}"
    temp.mkdir()
    try:
        fill(temp)
        # rename(2) replaces an empty directory and fails on a non-empty one: never a merged tree.
        os.rename(temp, dst)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    fsync_dir(dst.parent)


# --- diff ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Side:
    """One side of a change, as the line counter sees it."""

    present: bool
    lines: list[str] | None = None  # text lines of a file; None for a symlink or a binary file
    binary: bool = False

    def count(self) -> int:
        if not self.present:
            return 0
        return len(self.lines) if self.lines is not None else 1


_ABSENT = _Side(present=False)


def diff(before: Snapshot, after: Snapshot, *, before_store: BlobStore, after_root: Path) -> list[FileChange]:
    """Compute the change set from ``before`` to ``after``, sorted by path.

    Line counts come from :mod:`difflib` over text lines (old content read from ``before_store``, new
    content from ``after_root``). A binary file (a NUL byte in its first 8 KiB, or not UTF-8) is flagged
    ``binary`` and counts 1 line added and/or removed; a symlink counts as 1 line; a mode-only change
    counts 0/0.

    Raises:
        NotFound: a blob of ``before`` is missing from ``before_store``.
        ChecksumMismatch: a blob was altered, or a file of ``after_root`` changed since ``after`` was taken.
    """
    changes = []
    for path in sorted(before.keys() | after.keys()):
        old, new = before.get(path), after.get(path)
        if old != new:
            changes.append(_change(path, old, new, before_store, after_root))
    return changes


def _change(path: str, old: Entry | None, new: Entry | None, store: BlobStore, after_root: Path) -> FileChange:
    kind = "added" if old is None else "deleted" if new is None else "modified"
    sha = new.sha256 if new is not None else None
    if old is not None and new is not None and old.kind == new.kind and old.sha256 == new.sha256:
        return FileChange(path=path, change="modified", sha256=sha)  # mode only
    old_side = _side(old, lambda: store.get_bytes(old.sha256))
    new_side = _side(new, lambda: _read_verified(after_root, path, new))
    if old_side.lines is not None and new_side.lines is not None:
        added, removed = _count_lines(old_side.lines, new_side.lines)
    else:
        added, removed = new_side.count(), old_side.count()
    return FileChange(
        path=path, change=kind, sha256=sha, lines_added=added, lines_removed=removed,
        binary=old_side.binary or new_side.binary,
    )


def _side(entry: Entry | None, read: Callable[[], bytes]) -> _Side:
    if entry is None:
        return _ABSENT
    if entry.kind == "symlink":
        return _Side(present=True)
    lines = _text_lines(read())
    return _Side(present=True, lines=lines, binary=lines is None)


def _text_lines(data: bytes) -> list[str] | None:
    if b"\0" in data[:BINARY_SNIFF_BYTES]:
        return None
    try:
        return data.decode("utf-8").splitlines(keepends=True)
    except UnicodeDecodeError:
        return None


def _count_lines(old: list[str], new: list[str]) -> tuple[int, int]:
    # autojunk off: on long files it treats frequent lines (blank ones) as junk and inflates the counts.
    matcher = difflib.SequenceMatcher(None, old, new, autojunk=False)
    added = removed = 0
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag != "equal":
            removed += i2 - i1
            added += j2 - j1
    return added, removed


def _read_verified(root: Path, rel: str, entry: Entry) -> bytes:
    data = _read_nofollow(_resolve_inside(root, rel))
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        raise ChecksumMismatch(f"{rel}: changed in {root} since its snapshot was taken")
    return data


def diff_lines(changes: Sequence[FileChange]) -> int:
    """Total lines added plus removed over ``changes``."""
    return sum(c.lines_added + c.lines_removed for c in changes)


# --- applying -----------------------------------------------------------------------------------


def apply_changes(
    changes: Sequence[FileChange],
    *,
    src_root: Path,
    dst_root: Path,
    base: Snapshot,
    dst_ignore: Sequence[str] = (),
) -> None:
    """Copy the changed paths from ``src_root`` into ``dst_root``, refusing on any conflict.

    Before anything is written, every target is checked: its current entry in ``dst_root`` must equal
    ``base.get(path)`` (None: it must not exist), and the source content must still hash to the change's
    ``sha256``. Then deletions run (pruning parent folders they leave empty), then writes (files by
    temp + fsync + rename with their mode, symlinks recreated). Changes at paths matching ``dst_ignore``
    are left alone: neither checked nor written.

    Raises:
        UnsafePath: a path fails :func:`conductor.paths.check_relpath` (absolute, ``..``, ``.git`` in any
            disguise, control characters...), is not in normal form, names ``.conductor/``, its folder
            leads through a symlink out of its root or into ``.git``, or it lies below another path the
            same change set writes.
        MergeConflict: targets changed since ``base``; the message lists every conflicting path.
        ChecksumMismatch: a source changed since the change set was computed.
    """
    spec = _compile(dst_ignore)
    todo = [c for c in changes if spec is None or not spec.match_file(c.path)]
    for change in todo:
        _check_apply_path(dst_root, change.path)
        if change.change != "deleted":
            _check_apply_path(src_root, change.path)
    _check_no_nested_writes(todo)
    _check_targets(todo, dst_root, base)
    for change in todo:
        if change.change != "deleted":
            _read_source(src_root, change)
    for change in sorted((c for c in todo if c.change == "deleted"), key=lambda c: c.path, reverse=True):
        _delete(dst_root, change.path)
    for change in sorted((c for c in todo if c.change != "deleted"), key=lambda c: c.path):
        _write(dst_root, change.path, *_read_source(src_root, change))


def _check_no_nested_writes(changes: Sequence[FileChange]) -> None:
    """Refuse a change set that writes both ``x`` and ``x/y``.

    No snapshot diff yields one (a walk never descends below a file or symlink), but a forged one could
    write the symlink ``x -> /elsewhere`` first and then a file through it, after every parent was checked.
    """
    written = {c.path for c in changes if c.change != "deleted"}
    for path in sorted(written):
        parts = path.split("/")
        for end in range(1, len(parts)):
            parent = "/".join(parts[:end])
            if parent in written:
                raise UnsafePath(
                    f"unsafe path {path!r}: lies below {parent!r}, which the same change set writes as a file or symlink"
                )


def _check_targets(changes: Sequence[FileChange], dst_root: Path, base: Snapshot) -> None:
    deleted = {c.path for c in changes if c.change == "deleted"}
    conflicts = [
        c.path for c in changes
        if not _target_matches(dst_root, c.path, base.get(c.path), deleted)
        or not _parents_clear(dst_root, c.path, deleted)
    ]
    if conflicts:
        raise MergeConflict(
            f"{len(conflicts)} path(s) in {dst_root} changed since the base of the change set: "
            + ", ".join(conflicts)
        )


def _target_matches(dst_root: Path, rel: str, expected: Entry | None, deleted: set[str]) -> bool:
    path = dst_root / rel
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return expected is None
    if stat.S_ISDIR(st.st_mode):
        # A folder is "no entry" to a snapshot, but only if the change set empties it.
        return expected is None and _emptied_by(path, rel, deleted)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        return False
    return _entry(path, st, None) == expected


def _emptied_by(folder: Path, rel: str, deleted: set[str]) -> bool:
    for sub, _path, st in _walk(folder, None, excluded=()):
        if not stat.S_ISDIR(st.st_mode) and f"{rel}/{sub}" not in deleted:
            return False
    return True


def _parents_clear(dst_root: Path, rel: str, deleted: set[str]) -> bool:
    """True if every existing parent of ``rel`` is a real folder, or a file this change set deletes."""
    parts = rel.split("/")[:-1]
    for i in range(1, len(parts) + 1):
        prefix = "/".join(parts[:i])
        try:
            st = os.lstat(dst_root / prefix)
        except FileNotFoundError:
            return True
        if not stat.S_ISDIR(st.st_mode) and prefix not in deleted:
            return False
    return True


def _read_source(src_root: Path, change: FileChange) -> tuple[bytes, int | None]:
    """The verified content of a change's source and its mode (None for a symlink's target text)."""
    path = src_root / change.path
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise ChecksumMismatch(f"{change.path}: vanished from {src_root} since the change set was computed") from None
    if stat.S_ISLNK(st.st_mode):
        data, mode = os.fsencode(os.readlink(path)), None
    elif stat.S_ISREG(st.st_mode):
        data, mode = _read_nofollow(path), stat.S_IMODE(st.st_mode)
    else:
        raise ChecksumMismatch(f"{change.path}: is no longer a file or symlink in {src_root}")
    if hashlib.sha256(data).hexdigest() != change.sha256:
        raise ChecksumMismatch(f"{change.path}: changed in {src_root} since the change set was computed")
    return data, mode


def _read_nofollow(path: Path) -> bytes:
    # O_NOFOLLOW: a file swapped for a symlink after the lstat must not be read through.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as source:
        return source.read()


def _delete(dst_root: Path, rel: str) -> None:
    path = dst_root / rel
    path.unlink()
    fsync_dir(path.parent)
    folder = path.parent
    root = Path(os.path.abspath(dst_root))
    while Path(os.path.abspath(folder)) != root:
        try:
            folder.rmdir()
        except OSError:  # not empty: stop pruning
            return
        fsync_dir(folder.parent)
        folder = folder.parent


def _write(dst_root: Path, rel: str, data: bytes, mode: int | None) -> None:
    target = dst_root / rel
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)  # holds only empty folders once this change set's deletions ran (checked)
    target.parent.mkdir(parents=True, exist_ok=True)
    if mode is not None:
        atomic_write(target, data, mode=mode)
        return
    temp = target.parent / f"{TEMP_PREFIX}{target.name}.{os.getpid()}.{secrets.token_hex(4)}"
    os.symlink(os.fsdecode(data), temp)
    try:
        os.replace(temp, target)  # rename(2) replaces a symlink itself, never what it points to
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


# --- path safety --------------------------------------------------------------------------------


def _check_relpath(rel: str) -> None:
    if not rel or "\0" in rel or rel.startswith("/"):
        raise UnsafePath(f"{rel!r}: not a relative path")
    parts = rel.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise UnsafePath(f"{rel!r}: empty, '.' or '..' path component")
    if parts[0] in ALWAYS_EXCLUDED:
        raise UnsafePath(f"{rel!r}: inside {parts[0]}/, which Conductor never copies")


def _check_apply_path(root: Path, rel: str) -> None:
    """The strict check of a path about to be written: :mod:`conductor.paths` rules plus a parent check.

    Only the parent is resolved: the last component may be a symlink that the change replaces.
    """
    if check_relpath(rel) != rel:
        raise UnsafePath(f"unsafe path {rel!r}: not in normal form")
    _check_relpath(rel)
    parent = rel.rpartition("/")[0]
    if parent:
        resolve_inside(root, parent)


def _resolve_inside(root: Path, rel: str) -> Path:
    """``root / rel`` after checking ``rel`` is safe and its parent folder resolves inside ``root``.

    The last component is not resolved: it is the entry itself (possibly a symlink being replaced).
    Unlike :func:`conductor.paths.resolve_inside` this allows ``.git/``: snapshots hold it, diffs read
    it (so that policy can see and reject changes there) and restores must recreate it.

    Raises:
        UnsafePath: ``rel`` is absolute, has ``..`` or ``.conductor/``, or its parent leaves ``root``.
    """
    _check_relpath(rel)
    real_root = os.path.realpath(root)
    real_parent = os.path.realpath(os.path.join(root, os.path.dirname(rel)))
    if real_parent != real_root and not real_parent.startswith(real_root + os.sep):
        raise UnsafePath(f"{rel!r}: its folder resolves to {real_parent}, outside {real_root}")
    return root / rel
