"""Real git repositories for the workspace tests, and a fingerprint of everything git keeps."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

GIT_ENV = {"GIT_AUTHOR_NAME": "User", "GIT_AUTHOR_EMAIL": "user@example.com",
           "GIT_COMMITTER_NAME": "User", "GIT_COMMITTER_EMAIL": "user@example.com",
           "GIT_CONFIG_NOSYSTEM": "1"}


def git(root: Path, *args: str) -> str:
    env = {**os.environ, **GIT_ENV}
    return subprocess.run(["git", *args], cwd=root, env=env, capture_output=True, text=True, check=True).stdout


def make_repo(root: Path, files: dict[str, str]) -> Path:
    """A git repository at ``root`` with ``files`` committed."""
    root.mkdir(parents=True, exist_ok=True)
    git(root, "init", "-q")
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "initial")
    return root


def repo_fingerprint(root: Path) -> dict[str, str]:
    """SHA-256 of HEAD, the index, the config, every hook and every ref of the repository at ``root``
    (what the user's repository must keep byte for byte)."""
    dotgit = root / ".git"
    wanted = [dotgit / "HEAD", dotgit / "index", dotgit / "config", dotgit / "packed-refs"]
    wanted += sorted((dotgit / "hooks").rglob("*")) + sorted((dotgit / "refs").rglob("*"))
    wanted += sorted((dotgit / "info").rglob("*"))
    return {str(p.relative_to(dotgit)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in wanted if p.is_file()}
