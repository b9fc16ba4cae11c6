"""A tree with some paths changed, built from the folders those paths are in: O(change), not O(tree).

``git write-tree`` builds a tree from an index, and rewrites that index (4.4 MB and its SHA-1 at 50,000
files: 30–40 ms) to keep what it built. When the changed paths are known (a change feed told them), only
the trees on their way to the root differ: this reads those (``cat-file --batch``), edits them, and writes
the new ones with ``mktree --batch``, which also checks that every object they name exists.

Tree object format (gitformat-index(5) and git's ``tree.c``): entries ``<octal mode> <name>\\0<raw id>``,
sorted by name bytes with a folder's name compared as if it ended in ``/``; the id is the hash of
``tree <size>\\0`` and the entries. ``mktree`` sorts and hashes the same way; its answer must equal ours.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Mapping
from pathlib import Path

from conductor.errors import GitError
from conductor.workspace.store import MODE_EXEC, MODE_FILE, MODE_LINK, StateStore, TreeEntry

MODE_TREE = "40000"


def edit_tree(store: StateStore, base: str, updates: Mapping[str, TreeEntry | None]) -> str:
    """``base`` with each path of ``updates`` set to its entry (a file, symlink or gitlink) or removed
    (None); folders left empty disappear, as git stores none, and a file set over a folder replaces it
    with everything below, as ``update-index --index-info`` does. Returns the new tree's id (stored).

    Raises:
        GitError: a path is set as a file while paths below it are set too (no folder holds that), or git
            failed (an entry names an object the store lacks).
    """
    if not updates:
        return base
    folders = {""}
    for path in updates:
        parts = path.split("/")
        folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
    content = _read_trees(store, base, sorted(folders))
    for path, entry in updates.items():
        folder, _, name = path.rpartition("/")
        if entry is None:
            current = content[folder].get(name)
            if current is not None and current.mode != MODE_TREE:
                del content[folder][name]
        else:
            content[folder][name] = entry  # over a folder too, which goes with all below it
    digest = hashlib.sha256 if store.object_format == "sha256" else hashlib.sha1
    new: list[tuple[str, dict[str, TreeEntry]]] = []  # folder, entries: deepest first, as mktree needs them
    for folder in sorted(folders - {""}, key=lambda f: -f.count("/")) + [""]:
        entries = content[folder]
        oid = _tree_id(entries, digest) if entries else None
        if entries:
            new.append((folder, entries))
        if folder:
            parent, _, name = folder.rpartition("/")
            current = content[parent].get(name)
            if current is not None and current.mode != MODE_TREE:
                if entries:
                    raise GitError(f"{folder}: set as a file while paths below it are set")
                continue
            if oid is None:
                content[parent].pop(name, None)
            else:
                content[parent][name] = TreeEntry(MODE_TREE, oid)
    if not content[""]:
        new.append(("", {}))
    expected = [_tree_id(entries, digest) for _folder, entries in new]
    batch = b"".join(_mktree_input(entries) + b"\0" for _folder, entries in new)
    written = store.git.run(["mktree", "-z", "--batch"], input=batch).decode().split()
    if written != expected:
        raise GitError(f"git mktree wrote {written}, expected {expected}")
    return expected[-1]


def _read_trees(store: StateStore, base: str, folders: list[str]) -> dict[str, dict[str, TreeEntry]]:
    """Each folder's entries in ``base`` ({} for a folder it lacks or has as a file)."""
    size = 32 if store.object_format == "sha256" else 20
    lines = "".join(f"{base}^{{tree}}\n" if not f else f"{base}:{f}\n" for f in folders)
    out = store.git.run(["cat-file", "--batch"], input=lines.encode("utf-8", "surrogateescape"))
    result: dict[str, dict[str, TreeEntry]] = {}
    pos = 0
    for folder in folders:
        end = out.index(b"\n", pos)
        header = out[pos:end].split(b" ")
        if header[-1] == b"missing" or len(header) != 3:
            result[folder], pos = {}, end + 1
            continue
        length = int(header[2])
        body = out[end + 1:end + 1 + length]
        pos = end + 1 + length + 1
        entries: dict[str, TreeEntry] = {}
        if header[1] == b"tree":
            at = 0
            while at < len(body):
                space = body.index(b" ", at)
                nul = body.index(b"\0", space)
                mode, name = body[at:space].decode(), body[space + 1:nul].decode("utf-8", "surrogateescape")
                entries[name] = TreeEntry(mode, body[nul + 1:nul + 1 + size].hex())
                at = nul + 1 + size
        result[folder] = entries
    return result


def _sort_key(item: tuple[str, TreeEntry]) -> bytes:
    name = item[0].encode("utf-8", "surrogateescape")
    return name + b"/" if item[1].mode == MODE_TREE else name


def _tree_id(entries: Mapping[str, TreeEntry], digest) -> str:  # type: ignore[no-untyped-def]
    body = b"".join(entry.mode.encode() + b" " + name.encode("utf-8", "surrogateescape") + b"\0"
                    + bytes.fromhex(entry.oid) for name, entry in sorted(entries.items(), key=_sort_key))
    return digest(b"tree %d\0" % len(body) + body).hexdigest()


def _mktree_input(entries: Mapping[str, TreeEntry]) -> bytes:
    kinds = {MODE_TREE: "tree", "160000": "commit"}
    return b"".join(f"{entry.mode} {kinds.get(entry.mode, 'blob')} {entry.oid}\t".encode()
                    + name.encode("utf-8", "surrogateescape") + b"\0" for name, entry in entries.items())


def blob_id(data: bytes, object_format: str = "sha1") -> str:
    """The git object id of a blob with content ``data`` (git's ``hash-object``, no filters)."""
    digest = hashlib.sha256 if object_format == "sha256" else hashlib.sha1
    return digest(b"blob %d\0" % len(data) + data).hexdigest()


def entry_on_disk(path: Path, object_format: str) -> TreeEntry | None:
    """The tree entry ``path`` would have (its mode from ``lstat``, as git's ``create_ce_mode``: executable
    by its owner or not; its blob id hashed here, with no conversion): None if it does not exist, a
    never-equal folder entry for anything but a file or symlink."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if stat.S_ISLNK(st.st_mode):
        return TreeEntry(MODE_LINK, blob_id(os.fsencode(os.readlink(path)), object_format))
    if not stat.S_ISREG(st.st_mode):
        return TreeEntry("040000", "")  # a folder (or worse) where the tree has a file: never equal
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as handle:
        data = handle.read()
    mode = MODE_EXEC if st.st_mode & stat.S_IXUSR else MODE_FILE
    return TreeEntry(mode, blob_id(data, object_format))
