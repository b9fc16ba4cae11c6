"""Path safety: check_relpath's corpus of unsafe paths and resolve_inside with symlinks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conductor.errors import PolicyViolation, UnsafePath
from conductor.paths import check_relpath, is_dotgit, resolve_inside

UNSAFE = [
    ("", "empty"),
    ("/etc/passwd", "is absolute"),
    ("//server/share/x", "is absolute"),
    ("C:x", "Windows drive letter"),
    ("C:/Windows/x", "Windows drive letter"),
    ("c:\\x", "backslash"),
    ("a\\b", "backslash"),
    ("..\\x", "backslash"),
    ("a\0b", "NUL"),
    ("a\nb", "control character U+000A"),
    ("a\tb", "control character U+0009"),
    ("a\x1b[31mb", "control character U+001B"),
    ("a\x7fb", "control character U+007F"),
    ("a\u202eb.txt", "control character U+202E"),
    ("..", "'..' component"),
    ("../x", "'..' component"),
    ("a/../../x", "'..' component"),
    ("a/..", "'..' component"),
    (".", "workspace root itself"),
    ("./", "workspace root itself"),
    ("././/.", "workspace root itself"),
    (".git", ".git component"),
    (".git/hooks/pre-commit", ".git component"),
    (".GIT/config", ".git component"),
    (".Git/HEAD", ".git component"),
    ("sub/.git/config", ".git component"),
    (".git./config", ".git component"),
    (".git /config", ".git component"),
    (".git. . /config", ".git component"),
    ("\uff0e\uff47\uff49\uff54/config", ".git component"),  # fullwidth ．ｇｉｔ
    (".g\u200cit/config", ".git component"),  # zero-width non-joiner, ignored by HFS+
    (".git::$INDEX_ALLOCATION/config", ".git component"),  # NTFS alternate data stream
    ("GIT~1/config", ".git component"),  # 8.3 short name
    ("cafe\u0301.txt", "NFC"),  # decomposed é
    ("a/" * 3000 + "x", "longer than"),
]


@pytest.mark.parametrize(("path", "reason"), UNSAFE, ids=[repr(p)[:40] for p, _ in UNSAFE])
def test_check_relpath_refuses_with_reason(path: str, reason: str) -> None:
    with pytest.raises(UnsafePath) as info:
        check_relpath(path)
    message = str(info.value)
    assert reason in message
    assert repr(path)[:20] in message  # the message names the path


def test_corpus_is_large_enough() -> None:
    assert len(UNSAFE) >= 20


@pytest.mark.parametrize(
    ("path", "normal"),
    [
        ("hello.py", "hello.py"),
        ("src/app/main.py", "src/app/main.py"),
        ("./src//app/./main.py", "src/app/main.py"),
        ("docs/", "docs"),
        (".github/workflows/ci.yml", ".github/workflows/ci.yml"),
        (".gitignore", ".gitignore"),
        (".gitmodules", ".gitmodules"),
        ("git/x", "git/x"),
        ("a..b/c...", "a..b/c..."),
        ("caf\u00e9.txt", "caf\u00e9.txt"),  # precomposed é is NFC
        ("src/**/*.py", "src/**/*.py"),
    ],
)
def test_check_relpath_accepts_and_normalises(path: str, normal: str) -> None:
    assert check_relpath(path) == normal


def test_unsafe_path_is_a_policy_violation() -> None:
    assert issubclass(UnsafePath, PolicyViolation)
    assert UnsafePath.exit_code == 4


def test_is_dotgit_variants() -> None:
    assert all(is_dotgit(name) for name in [".git", ".GIT", ".gIt.", ".git ", "git~1", "\uff0egit"])
    assert not any(is_dotgit(name) for name in ["git", ".gitignore", ".github", "x.git", "..git"])


def test_resolve_inside_plain_path(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    assert resolve_inside(tmp_path, "src/new.py") == tmp_path.resolve() / "src" / "new.py"


def test_resolve_inside_rejects_symlinked_parent_escaping_root(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    os.symlink(outside, root / "link")
    with pytest.raises(UnsafePath, match="outside"):
        resolve_inside(root, "link/evil.py")


def test_resolve_inside_rejects_final_symlink_escaping_root(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    root.mkdir()
    os.symlink(tmp_path / "secret.txt", root / "innocent.txt")  # dangling, still followed on write
    with pytest.raises(UnsafePath, match="outside"):
        resolve_inside(root, "innocent.txt")


def test_resolve_inside_allows_symlink_within_root(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "alias")
    assert resolve_inside(tmp_path, "alias/x.py") == tmp_path.resolve() / "real" / "x.py"


def test_resolve_inside_rejects_symlink_to_root_and_loops(tmp_path: Path) -> None:
    os.symlink(tmp_path, tmp_path / "self")
    with pytest.raises(UnsafePath, match="root itself"):
        resolve_inside(tmp_path, "self")
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    with pytest.raises(UnsafePath):
        resolve_inside(tmp_path, "loop/x")


def test_resolve_inside_runs_check_relpath_first(tmp_path: Path) -> None:
    with pytest.raises(UnsafePath, match="'..' component"):
        resolve_inside(tmp_path, "../x")
    with pytest.raises(UnsafePath, match=".git component"):
        resolve_inside(tmp_path, ".GIT/hooks/pre-commit")
