"""The one way Conductor runs git: a fixed environment that no repository or workspace can steer.

An attempt workspace belongs to an agent, and so does anything it writes there, ``.git`` included. git
runs code named in configuration (``core.fsmonitor`` runs on every ``status``, hooks, ``core.hooksPath``,
``filter.<x>.clean``/``smudge`` selected by ``.gitattributes``, diff and merge drivers) and converts bytes
(``core.autocrlf``, ``text``/``eol``/``ident``/``working-tree-encoding`` attributes). So every call made
here:

- starts from an empty environment (no inherited ``GIT_DIR``, ``GIT_INDEX_FILE``, ``GIT_CONFIG_*``...),
  with ``GIT_CONFIG_NOSYSTEM=1`` and ``GIT_CONFIG_GLOBAL=/dev/null``: only the named repository's own
  config is read, and for Conductor's private repository that is a file Conductor wrote;
- names the repository and the work tree explicitly (``--git-dir``/``--work-tree``), never by discovery,
  so a ``.git`` planted in a work tree is never consulted;
- overrides, with ``-c`` (which beats every config file), each key that runs a program, converts
  content or changes how paths are read: :data:`HARDENED`;
- never runs porcelain that fires hooks (``commit``, ``checkout``, ``merge``): trees and commits are made
  with plumbing (``update-index``, ``write-tree``, ``commit-tree``, ``read-tree``, ``checkout-index``).

Content attributes a work tree's ``.gitattributes`` could still set are overridden by the private
repository's ``info/attributes``, which git consults first (gitattributes(5), "highest precedence").

The user's own repository is only ever read (``rev-parse``, ``ls-files``), with the user's global
config allowed (for their excludes file) but the same ``-c`` overrides.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path

from conductor.errors import GitError

MIN_VERSION = (2, 31)
"""Oldest git Conductor accepts (``checkout-index --stdin -z``, ``--no-optional-locks``, ``ls-files -z -o -i``
and ``rev-parse --show-object-format`` are all older; 2.31 is the oldest release we test against)."""

HARDENED: tuple[str, ...] = (
    "core.hooksPath=/dev/null",
    "core.fsmonitor=false",
    "core.untrackedCache=false",
    "core.autocrlf=false",
    "core.safecrlf=false",
    "core.eol=lf",
    "core.symlinks=true",
    "core.fileMode=true",
    "core.trustctime=true",
    "core.checkStat=default",
    "core.ignoreCase=false",
    "core.precomposeUnicode=false",
    "core.protectNTFS=true",
    "core.protectHFS=true",
    "core.sparseCheckout=false",
    "core.splitIndex=false",
    "core.quotePath=false",
    "core.attributesFile=/dev/null",
    "core.bigFileThreshold=512m",
    "index.sparse=false",
    "index.threads=true",
    "gc.auto=0",
    "maintenance.auto=false",
    "safe.directory=*",
    "commit.gpgSign=false",
    "log.showSignature=false",
    "diff.renames=false",
    "diff.algorithm=myers",
    "merge.renames=false",
    "protocol.allow=never",
    "credential.helper=",
    "advice.detachedHead=false",
    "checkout.workers=0",
    "checkout.thresholdForParallelism=500",
    "feature.manyFiles=false",
)

_IDENTITY = {
    "GIT_AUTHOR_NAME": "Conductor",
    "GIT_AUTHOR_EMAIL": "conductor@localhost",
    "GIT_COMMITTER_NAME": "Conductor",
    "GIT_COMMITTER_EMAIL": "conductor@localhost",
}


def _base_environment(environ: Mapping[str, str]) -> dict[str, str]:
    env = {name: environ[name] for name in ("PATH", "HOME", "TMPDIR", "SYSTEMROOT") if name in environ}
    env.update(_IDENTITY)
    env.update({
        "LC_ALL": "C",
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_OPTIONAL_LOCKS": "0",
        "GIT_NO_REPLACE_OBJECTS": "1",
        "GIT_ATTR_NOSYSTEM": "1",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_ADVICE": "0",
    })
    return env


@cache
def git_executable() -> str:
    """The path of ``git`` on ``PATH``, checked to be at least :data:`MIN_VERSION`.

    Raises:
        GitError: git is not installed, or is older than :data:`MIN_VERSION`.
    """
    path = shutil.which("git")
    if path is None:
        raise GitError("git is not installed (Conductor needs git >= %d.%d on PATH, also for projects that are "
                       "not git repositories)" % MIN_VERSION)
    out = subprocess.run([path, "--version"], capture_output=True, text=True, env=_base_environment(os.environ))
    found = re.search(r"(\d+)\.(\d+)", out.stdout)
    version = (int(found.group(1)), int(found.group(2))) if found else (0, 0)
    if version < MIN_VERSION:
        raise GitError(f"{path} is {out.stdout.strip() or 'unknown'}; Conductor needs git >= {MIN_VERSION[0]}.{MIN_VERSION[1]}")
    return path


class Git:
    """A git runner bound to one repository (``git_dir``) with the environment described above.

    Args:
        git_dir: the repository's git directory (for a user's repository: its common dir).
        user_config: read the user's global config too (only for reading the user's own repository).
        environ: the process environment to take ``PATH``/``HOME``/``TMPDIR`` from.
    """

    def __init__(self, git_dir: Path | None, *, user_config: bool = False, environ: Mapping[str, str] = os.environ) -> None:
        self.git_dir = git_dir
        self.env = _base_environment(environ)
        if not user_config:
            self.env["GIT_CONFIG_GLOBAL"] = os.devnull

    def run(
        self,
        args: Sequence[str],
        *,
        work_tree: Path | None = None,
        index: Path | None = None,
        input: bytes | None = None,
        ok_codes: tuple[int, ...] = (0,),
        extra_env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> bytes:
        """Run ``git <args>`` and return its standard output.

        Args:
            work_tree: the work tree (``--work-tree``); None runs without one.
                (A runner made with ``git_dir=None`` discovers the repository from ``cwd``: only for the
                user's own project folder, never for a workspace.)
            index: the index file (``GIT_INDEX_FILE``); None uses the repository's own.
            input: bytes for standard input.
            ok_codes: exit codes that are not failures.
            cwd: where to run (default: the work tree); paths in the output are relative to it.

        Raises:
            GitError: git exited with another code (the message has the command and git's own words).
        """
        argv = [git_executable(), "--no-optional-locks"]
        for item in HARDENED:
            argv += ["-c", item]
        if self.git_dir is not None:
            argv += [f"--git-dir={self.git_dir}"]
        if work_tree is not None:
            argv += [f"--work-tree={work_tree}"]
        argv += list(args)
        env = dict(self.env)
        if index is not None:
            env["GIT_INDEX_FILE"] = str(index)
        if extra_env:
            env.update(extra_env)
        proc = subprocess.run(argv, input=input, capture_output=True, env=env,
                              cwd=str(cwd or work_tree) if (cwd or work_tree) is not None else None)
        if proc.returncode not in ok_codes:
            words = proc.stderr.decode("utf-8", "replace").strip()[-2000:]
            raise GitError(f"git {' '.join(args[:3])} failed (exit {proc.returncode}): {words}")
        return proc.stdout


def split_z(output: bytes) -> list[str]:
    """NUL-separated git output (``-z``) as a list of paths (UTF-8, undecodable bytes kept as escapes)."""
    return [item.decode("utf-8", "surrogateescape") for item in output.split(b"\0") if item]


def join_z(paths: Sequence[str]) -> bytes:
    """Paths as NUL-terminated bytes for ``--stdin -z``."""
    return b"".join(p.encode("utf-8", "surrogateescape") + b"\0" for p in paths)
