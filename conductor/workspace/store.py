"""Conductor's private git repository: project snapshots, attempt trees and each fork's history.

``.conductor/git`` is a bare repository that only Conductor writes. When the project is a git repository
it borrows the project's objects through ``objects/info/alternates`` (as ``git clone --shared`` does), so
a snapshot of a 70 MB repository costs the few objects that differ from what the user already has; the
user's repository itself is only read, never written (no refs, no config, no index, no objects).

- A **project snapshot** is a commit of the project's working tree as the user sees it: tracked files
  plus untracked ones that are not ``.gitignore``d, uncommitted edits included, minus ``workspace.ignore``
  and ``.conductor/``. Its parent is the user's ``HEAD`` (when there is one). A persistent index
  (``.conductor/git/project.index``) is the stat cache: only files whose stat data changed are hashed.
- A **fork's state** after each merged step is a commit whose tree was built only from verified change
  sets; its id is recorded in the signed audit log (``step.merged``). Refs under ``refs/conductor/``
  only keep objects alive for ``gc``: nothing trusts a ref.
- **Change sets** are ``diff-tree`` between two trees, with line counts from git's own diff (linear-ish
  Myers with git's heuristics, in C) and a SHA-256 of every new blob for provenance.

Everything is plain git objects, so ``git --git-dir=.conductor/git log refs/conductor/...`` shows a
fork's history with standard tools.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from filelock import FileLock

from conductor.errors import GitError, IntegrityError, MergeConflict
from conductor.fsutil import atomic_write, temp_path
from conductor.models import FileChange
from conductor.workspace.git import Git, git_executable, join_z, split_z

STORE_DIR = "git"
ATTRIBUTES = b"* -text -eol -filter -ident -working-tree-encoding !diff !merge\n"
"""``info/attributes``: no attribute in a work tree's ``.gitattributes`` converts bytes or picks a driver."""
EXCLUDE_FILE = "conductor-ignore"
MODE_FILE, MODE_EXEC, MODE_LINK, MODE_GITLINK = "100644", "100755", "120000", "160000"
EMPTY_MODE = "000000"


@dataclass(frozen=True)
class TreeEntry:
    """One path of a tree: its git ``mode`` (``100644``, ``100755``, ``120000``, ``160000``) and object id."""

    mode: str
    oid: str


class StateStore:
    """The private repository of one project (see the module docstring).

    Args:
        root: the project folder.
        conductor_dir: its ``.conductor`` folder.
    """

    def __init__(self, root: Path, conductor_dir: Path) -> None:
        self.root = root
        self.conductor_dir = conductor_dir
        self.dir = conductor_dir / STORE_DIR
        self.git = Git(self.dir)
        self._user: tuple[Path, Path, Path] | None | bool = False  # (git dir, common dir, top level), None, unknown
        self._trees: dict[str, str] = {}  # commit id -> its tree id (a commit never changes)
        self._links: dict[str, dict[str, str]] = {}  # tree id -> its symlinks (a tree never changes)

    # --- setup -----------------------------------------------------------------------------------

    def ensure(self) -> StateStore:
        """Create the repository if it does not exist yet (idempotent, safe against concurrent callers).

        Raises:
            GitError: git is missing or too old, or the repository cannot be created.
        """
        git_executable()
        if (self.dir / "HEAD").is_file():
            return self
        self.conductor_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.conductor_dir / ".git-init.lock")):
            if (self.dir / "HEAD").is_file():
                return self
            temp = temp_path(self.dir)  # .tmp.git.<pid>.<random>: a crash leaves it to recovery's sweep
            temp.mkdir()
            fmt = self._user_object_format()
            Git(temp).run(["init", "--quiet", "--bare", "--template=", f"--object-format={fmt}", str(temp)])
            (temp / "info").mkdir(exist_ok=True)
            (temp / "info" / "attributes").write_bytes(ATTRIBUTES)
            user = self.user_repository()
            if user is not None:
                objects = user[1] / "objects"
                (temp / "objects" / "info").mkdir(parents=True, exist_ok=True)
                # Relative to our objects folder, so moving the project keeps it valid.
                link = os.path.relpath(objects, self.dir / "objects")
                (temp / "objects" / "info" / "alternates").write_text(link + "\n")
            os.rename(temp, self.dir)
        return self

    def user_repository(self) -> tuple[Path, Path, Path] | None:
        """``(git dir, common git dir, top level)`` of the git repository holding the project, or None."""
        if self._user is False:
            self._user = self._find_user_repository()
        return self._user  # type: ignore[return-value]

    def _find_user_repository(self) -> tuple[Path, Path, Path] | None:
        try:
            out = Git(None, user_config=True).run(["rev-parse", "--absolute-git-dir", "--git-common-dir", "--show-toplevel"],
                                                  cwd=self.root)
        except GitError:
            return None
        lines = out.decode("utf-8", "surrogateescape").splitlines()
        if len(lines) < 3 or not lines[2]:
            return None  # a bare repository or the inside of a .git folder: not a work tree
        git_dir = Path(lines[0])
        common = Path(lines[1]) if os.path.isabs(lines[1]) else (self.root / lines[1]).resolve()
        return git_dir, common, Path(lines[2])

    def _user_object_format(self) -> str:
        user = self.user_repository()
        if user is None:
            return "sha1"
        out = Git(user[0], user_config=True).run(["rev-parse", "--show-object-format"]).decode().strip()
        return out or "sha1"

    @cached_property
    def object_format(self) -> str:
        """``sha1`` or ``sha256`` (fixed when the repository was made, so asked once)."""
        fmt = self.git.run(["rev-parse", "--show-object-format"]).decode().strip()
        return fmt or "sha1"

    def exclude_file(self, ignore: Sequence[str]) -> Path:
        """The ``workspace.ignore`` patterns as an exclude file for ``ls-files --exclude-from``."""
        path = self.dir / "info" / EXCLUDE_FILE
        data = "".join(f"{p}\n" for p in ignore).encode("utf-8")
        if not path.is_file() or path.read_bytes() != data:
            atomic_write(path, data)
        return path

    # --- project snapshots -----------------------------------------------------------------------

    def snapshot_project(self, *, ignore: Sequence[str], message: str, date: str | None = None) -> str:
        """Commit the project's working tree as the user sees it (see the module docstring).

        Args:
            ignore: ``workspace.ignore`` patterns (gitignore syntax).
            message: the commit message.
            date: ``"@<unix seconds> +0000"`` for a reproducible commit id; None uses the clock.

        Returns:
            The commit id (hex).

        Raises:
            GitError: git failed (e.g. a file vanished mid-read).
        """
        tree = self.project_tree(ignore=ignore)
        user = self.user_repository()
        parents = []
        if user is not None:
            head = Git(user[0], user_config=True).run(["rev-parse", "--verify", "--quiet", "HEAD^{commit}"],
                                                     ok_codes=(0, 1)).decode().strip()
            if head and self.has_object(head):
                parents.append(head)
        return self.commit(tree, parents, message, date=date)

    def project_tree(self, *, ignore: Sequence[str]) -> str:
        """The tree of the project's working tree now (stat-cached; see :meth:`snapshot_project`)."""
        self.ensure()
        excludes = self.exclude_file(ignore)
        paths = self._project_paths(excludes)
        index = self.dir / "project.index"
        with FileLock(str(self.dir / "project.index.lock.flock")):
            current = set(split_z(self.git.run(["ls-files", "-z"], index=index)))
            gone = sorted(current - paths)
            if gone:
                self.git.run(["update-index", "-z", "--force-remove", "--stdin"], index=index, input=join_z(gone))
            self.git.run(["update-index", "-z", "--add", "--remove", "--stdin"], work_tree=self.root, index=index,
                         input=join_z(sorted(paths)))
            return self.git.run(["write-tree"], index=index).decode().strip()

    def _project_paths(self, excludes: Path) -> set[str]:
        user = self.user_repository()
        not_ours = ":(exclude,top).conductor"
        if user is None:
            index = self.dir / "project.index"
            listed = self.git.run(["ls-files", "-z", "-c", "-o", f"--exclude-from={excludes}", "--", ".", not_ours],
                                  work_tree=self.root, index=index)
            dropped = self.git.run(["ls-files", "-z", "-c", "-i", f"--exclude-from={excludes}", "--", ".", not_ours],
                                   work_tree=self.root, index=index)
        else:
            # Run from the project folder so paths come out relative to it (it may be a subfolder of the repo).
            repo = Git(user[0], user_config=True)
            listed = repo.run(["ls-files", "-z", "-c", "-o", "--exclude-standard", f"--exclude-from={excludes}", "--", ".",
                               not_ours], work_tree=user[2], cwd=self.root)
            dropped = repo.run(["ls-files", "-z", "-c", "-i", f"--exclude-from={excludes}", "--", ".", not_ours],
                               work_tree=user[2], cwd=self.root)
        # A folder entry ("sub/") is a nested repository: its files are not the project's.
        return {p for p in split_z(listed) if not p.endswith("/")} - set(split_z(dropped))

    # --- objects ---------------------------------------------------------------------------------

    def has_object(self, oid: str) -> bool:
        """Whether ``oid`` is in the store (or the objects it borrows)."""
        try:
            self.git.run(["cat-file", "-e", oid])
            return True
        except GitError:
            return False

    def tree_of(self, commit: str) -> str:
        """The tree id of ``commit`` (remembered for a full commit id once found: the worker asks for the
        same base commit's tree after every task).

        Raises:
            GitError: no such commit in the store (when first asked).
        """
        tree = self._trees.get(commit)
        if tree is None:  # only full ids are remembered: a short one or a ref name could come to mean another commit
            tree = self.git.run(["rev-parse", "--verify", f"{commit}^{{tree}}"]).decode().strip()
            if len(commit) in (40, 64) and all(c in "0123456789abcdef" for c in commit):
                self._trees[commit] = tree
        return tree

    def commit(self, tree: str, parents: Sequence[str], message: str, *, date: str | None = None) -> str:
        """Write a commit object (no ref moves). Returns its id."""
        args = ["commit-tree", tree]
        for parent in parents:
            args += ["-p", parent]
        extra = {"GIT_AUTHOR_DATE": date, "GIT_COMMITTER_DATE": date} if date else None
        return self.git.run(args, input=message.encode("utf-8"), extra_env=extra).decode().strip()

    def set_ref(self, name: str, commit: str) -> None:
        """Point ``refs/conductor/<name>`` at ``commit`` (keeps it alive for gc; never trusted)."""
        self.git.run(["update-ref", f"refs/conductor/{name}", commit])

    def delete_refs(self, prefix: str) -> int:
        """Delete every ref under ``refs/conductor/<prefix>``. Returns how many."""
        refs = self.git.run(["for-each-ref", "--format=%(refname)", f"refs/conductor/{prefix}"]).decode().split()
        if refs:
            self.git.run(["update-ref", "--stdin"], input="".join(f"delete {r}\n" for r in refs).encode())
        return len(refs)

    def entries(self, tree: str, paths: Iterable[str] | None = None) -> dict[str, TreeEntry]:
        """Path → entry of every file, symlink and gitlink in ``tree`` (optionally only ``paths``)."""
        args = ["ls-tree", "-r", "-z", "--full-tree", tree]
        wanted = sorted(set(paths)) if paths is not None else None
        if wanted is not None:
            if not wanted:
                return {}
            args += ["--", *[f":(literal){p}" for p in wanted]]
        result = {}
        for record in split_z(self.git.run(args)):
            meta, _, path = record.partition("\t")
            mode, _kind, oid = meta.split(" ")
            result[path] = TreeEntry(mode, oid)
        return result

    def verify_tree(self, tree: str) -> int:
        """Re-hash every blob of ``tree`` and compare it with its name: git does not check an object's hash
        when it reads it, so an object overwritten in place would otherwise be checked out as it is.

        Returns:
            How many blobs were checked.

        Raises:
            IntegrityError: naming every path whose content does not hash to its object id (or is missing).
        """
        entries = {p: e for p, e in self.entries(tree).items() if e.mode != MODE_GITLINK}
        fmt = self.object_format
        try:
            blobs = self.read_blobs(e.oid for e in entries.values())
        except GitError as exc:
            raise IntegrityError(f"tree {tree[:12]}…: {exc}") from exc
        digest = hashlib.sha256 if fmt == "sha256" else hashlib.sha1
        bad = sorted(p for p, e in entries.items()
                     if digest(b"blob %d\0" % len(blobs[e.oid]) + blobs[e.oid]).hexdigest() != e.oid)
        if bad:
            raise IntegrityError(f"{len(bad)} object(s) of tree {tree[:12]}… in {self.dir} do not hash to their "
                                 f"names (altered on disk): {', '.join(bad[:20])}")
        return len(entries)

    def symlinks(self, tree: str) -> dict[str, str]:
        """Path → target text of every symlink in ``tree`` (one listing, filtered before decoding; kept
        for the process's next questions about the same tree).

        Raises:
            GitError: ``tree`` or a blob is missing.
        """
        links = self._links.get(tree)
        if links is None:
            links = self._link_targets(self.git.run(["ls-tree", "-r", "-z", "--full-tree", tree]))
            self._remember_links(tree, links)
        return dict(links)

    def symlinks_after(self, old_tree: str, new_tree: str, changes: Sequence[FileChange]) -> dict[str, str]:
        """:meth:`symlinks` of ``new_tree``, given ``changes`` = :meth:`changes` from ``old_tree`` to it: those
        of ``old_tree`` (usually known: the step before listed them) updated by the change set, so a chain of
        steps lists a large tree once, not once a step.

        Raises:
            GitError: a tree or blob is missing.
        """
        links = self._links.get(new_tree)
        if links is not None:
            return dict(links)
        links = self.symlinks(old_tree)
        for change in changes:
            links.pop(change.path, None)
        added = [c.path for c in changes if c.mode == MODE_LINK]
        if added:
            listing = self.git.run(["--literal-pathspecs", "ls-tree", "-z", "--full-tree", new_tree, "--", *added])
            links.update(self._link_targets(listing))
        self._remember_links(new_tree, links)
        return dict(links)

    def _link_targets(self, listing: bytes) -> dict[str, str]:
        """Path → target text of the symlinks among ``ls-tree -z`` records."""
        links = {}
        for record in listing.split(b"\0"):
            if record.startswith(MODE_LINK.encode() + b" "):
                meta, _, path = record.partition(b"\t")
                links[path.decode("utf-8", "surrogateescape")] = meta.split(b" ")[2].decode()
        blobs = self.read_blobs(links.values())
        return {path: os.fsdecode(blobs[oid]) for path, oid in links.items()}

    def _remember_links(self, tree: str, links: dict[str, str]) -> None:
        if len(self._links) >= 64:
            del self._links[next(iter(self._links))]
        self._links[tree] = dict(links)

    def read_blobs(self, oids: Iterable[str]) -> dict[str, bytes]:
        """The contents of the blobs ``oids`` (one ``cat-file --batch`` for all).

        Raises:
            GitError: an object is missing.
        """
        unique = sorted(set(oids))
        if not unique:
            return {}
        out = self.git.run(["cat-file", "--batch"], input="".join(f"{o}\n" for o in unique).encode())
        result, pos = {}, 0
        for oid in unique:
            end = out.index(b"\n", pos)
            header = out[pos:end].decode().split(" ")
            if len(header) < 3 or header[1] == "missing":
                raise GitError(f"object {oid} is missing from {self.dir}")
            size = int(header[2])
            result[oid] = out[end + 1:end + 1 + size]
            pos = end + 1 + size + 1
        return result

    def write_blob(self, data: bytes) -> str:
        return self.git.run(["hash-object", "-w", "--no-filters", "--stdin"], input=data).decode().strip()

    # --- change sets -----------------------------------------------------------------------------

    def changes(self, old_tree: str, new_tree: str) -> list[FileChange]:
        """The change set from ``old_tree`` to ``new_tree``, sorted by path.

        Each change carries the new mode and the SHA-256 of the new content (a symlink's: its target
        text); line counts come from git's diff (a binary file counts 1 line added and/or removed; a
        mode-only change 0/0).

        Raises:
            GitError: a tree or blob is missing.
        """
        if old_tree == new_tree:
            return []
        raw = self.git.run(["diff-tree", "-r", "-z", "--no-renames", "--raw", "--numstat", "--full-index",
                            old_tree, new_tree])
        changes = _parse_raw_numstat(raw)
        blobs = self.read_blobs(c["new_oid"] for c in changes.values() if c["new_mode"] not in (EMPTY_MODE, MODE_GITLINK))
        result = []
        for path in sorted(changes):
            item = changes[path]
            new_mode = item["new_mode"]
            deleted = new_mode == EMPTY_MODE
            kind = "deleted" if deleted else "added" if item["old_mode"] == EMPTY_MODE else "modified"
            digest = None
            if not deleted:
                data = blobs.get(item["new_oid"], item["new_oid"].encode())
                digest = hashlib.sha256(data).hexdigest()
            added, removed, binary = item.get("numstat", (0, 0, False))
            if binary or MODE_LINK in (item["old_mode"], new_mode) or MODE_GITLINK in (item["old_mode"], new_mode):
                added, removed = (0 if deleted else 1), (0 if kind == "added" else 1)
                if item["old_oid"] == item["new_oid"]:
                    added = removed = 0
            size = None if deleted else len(blobs.get(item["new_oid"], b""))
            result.append(FileChange(path=path, change=kind, sha256=digest, lines_added=added, lines_removed=removed,
                                     binary=binary, mode=None if deleted else new_mode, size=size,
                                     old_mode=None if kind == "added" else item["old_mode"]))
        return result

    # --- merging ---------------------------------------------------------------------------------

    def merge(self, base: str, ours: str, theirs: str) -> str:
        """Three-way merge of trees: ``ours`` plus what ``theirs`` changed since ``base``.

        Paths changed on one side only take that side. A regular file changed on both sides to different
        content is merged line by line (``git merge-file``, the same algorithm ``git merge`` uses);
        anything else changed on both sides differently is a conflict.

        Returns:
            The merged tree's id.

        Raises:
            MergeConflict: naming every conflicting path; nothing is written anywhere.
        """
        if theirs == base or theirs == ours:
            return ours
        if ours == base:
            return theirs
        mine = _raw_changes(self.git.run(["diff-tree", "-r", "-z", "--no-renames", "--raw", "--full-index", base, ours]))
        their = _raw_changes(self.git.run(["diff-tree", "-r", "-z", "--no-renames", "--raw", "--full-index", base, theirs]))
        updates: dict[str, TreeEntry | None] = {}
        conflicts = []
        for path, change in their.items():
            old, new = change
            other = mine.get(path)
            if other is None or other[1] == new:
                updates[path] = new
                continue
            merged = self._merge_file(path, old, other[1], new)
            if merged is None:
                conflicts.append(path)
            else:
                updates[path] = merged
        # A file on one side where the other has a folder (a/b vs a) cannot be merged either.
        conflicts += _file_folder_clashes(set(mine), updates)
        if conflicts:
            raise MergeConflict(f"{len(conflicts)} path(s) changed on both sides: {', '.join(sorted(set(conflicts)))}")
        return self._tree_with(ours, updates)

    def _merge_file(self, path: str, old: TreeEntry | None, ours: TreeEntry | None, theirs: TreeEntry | None) -> TreeEntry | None:
        regular = (MODE_FILE, MODE_EXEC)
        if old is None or ours is None or theirs is None or not all(e.mode in regular for e in (old, ours, theirs)):
            return None
        if ours.mode != theirs.mode and old.mode not in (ours.mode, theirs.mode):
            return None
        mode = theirs.mode if ours.mode == old.mode else ours.mode
        blobs = self.read_blobs([old.oid, ours.oid, theirs.oid])
        with tempfile.TemporaryDirectory(prefix="conductor-merge-") as temp:
            names = []
            for label, entry in (("ours", ours), ("base", old), ("theirs", theirs)):
                target = Path(temp) / label
                target.write_bytes(blobs[entry.oid])
                names.append(str(target))
            proc = _merge_file(self.git, names)
        if proc is None:
            return None
        return TreeEntry(mode, self.write_blob(proc))

    def _tree_with(self, tree: str, updates: dict[str, TreeEntry | None]) -> str:
        with tempfile.TemporaryDirectory(prefix="conductor-index-") as temp:
            index = Path(temp) / "index"
            self.git.run(["read-tree", tree], index=index)
            lines = []
            for path, entry in sorted(updates.items()):
                if entry is None:
                    lines.append(f"0 {'0' * len(self._zero_oid())}\t{path}\0")
                else:
                    lines.append(f"{entry.mode} {entry.oid}\t{path}\0")
            data = "".join(lines).encode("utf-8", "surrogateescape")
            self.git.run(["update-index", "-z", "--index-info"], index=index, input=data)
            return self.git.run(["write-tree"], index=index).decode().strip()

    def _zero_oid(self) -> str:
        return "0" * (64 if self.object_format == "sha256" else 40)


def _merge_file(git: Git, names: list[str]) -> bytes | None:
    try:
        return git.run(["merge-file", "-p", "-q", *names])
    except GitError:  # exit > 0: that many conflicts; < 0: an error
        return None


def _raw_changes(raw: bytes) -> dict[str, tuple[TreeEntry | None, TreeEntry | None]]:
    result = {}
    for path, item in _parse_raw_numstat(raw).items():
        old = None if item["old_mode"] == EMPTY_MODE else TreeEntry(item["old_mode"], item["old_oid"])
        new = None if item["new_mode"] == EMPTY_MODE else TreeEntry(item["new_mode"], item["new_oid"])
        result[path] = (old, new)
    return result


def _parse_raw_numstat(raw: bytes) -> dict[str, dict]:
    """Parse ``diff-tree -z --raw [--numstat]`` output into path → {old_mode, new_mode, old_oid, new_oid, numstat}."""
    fields = raw.split(b"\0")
    result: dict[str, dict] = {}
    i = 0
    while i < len(fields):
        field = fields[i]
        if not field:
            i += 1
            continue
        if field.startswith(b":"):
            old_mode, new_mode, old_oid, new_oid, _status = field[1:].decode().split(" ")
            path = fields[i + 1].decode("utf-8", "surrogateescape")
            result[path] = {"old_mode": old_mode, "new_mode": new_mode, "old_oid": old_oid, "new_oid": new_oid}
            i += 2
            continue
        added, removed, path_bytes = field.split(b"\t", 2)
        path = path_bytes.decode("utf-8", "surrogateescape")
        binary = added == b"-"
        if path in result:
            result[path]["numstat"] = (0 if binary else int(added), 0 if binary else int(removed), binary)
        i += 1
    return result


def _file_folder_clashes(mine: set[str], updates: dict[str, TreeEntry | None]) -> list[str]:
    clashes = []
    written = {p for p, e in updates.items() if e is not None}
    for path in written:
        parts = path.split("/")
        for end in range(1, len(parts)):
            if "/".join(parts[:end]) in mine:
                clashes.append(path)
    for path in mine:
        parts = path.split("/")
        for end in range(1, len(parts)):
            if "/".join(parts[:end]) in written:
                clashes.append(path)
    return clashes
