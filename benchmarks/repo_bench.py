"""Benchmark of Conductor on a real repository (issue 8), each figure beside the same work done with git.

Run with the project installed (``pip install -e .``)::

    python benchmarks/repo_bench.py [--source django|generated] [--files N] [--min-mb MB]
                                    [--sizes 1000,10000,50000] [--steps N] [--repeat N] [--apply]
                                    [--only repo,steps] [--settle S] [--timeout S] [--json] [--keep]
                                    [--cache DIR] [--conductor PATH]

Figures (benchmarks/README.md has the method and the latest numbers):

1. repository: a git repository made from the Django 5.1.4 sdist (``pip download --no-deps --no-binary :all:``,
   cached under ``--cache`` so reruns are offline) or, with ``--source generated`` or when the sdist cannot be
   had, a generated tree of the same shape (directories, file-size distribution, mostly ``.py`` text). History
   commits that rewrite a quarter of the text files are added until the repository (working tree plus
   ``.git``, disk usage) holds ``--min-mb`` MB. Objects go straight into packs (``git fast-import``), so
   building deletes nothing (deleting many files slows file creation on some file systems for a while).
2. explore: wall time of ``conductor explore --plan`` with the command executor, 2 forks x 2 chained one-line
   ``sed`` steps, ``--no-apply`` (with ``--apply`` the winner is applied), against the git baseline in the
   same repository: per fork ``git worktree add --detach``, the same two commands through ``sh -c``, ``git add
   -A`` and ``git diff --cached --binary`` into a patch file (with ``--apply``, then ``git apply`` of fork 1's
   patch to the main tree). Goal: Conductor <= 2x the baseline. Beside it the growth of ``.conductor/`` over
   one run (disk usage, hard-linked files once); goal <= 5 MB.
3. per-step overhead: generated repositories of ``--sizes`` small text files (300 to 1,500 bytes, 100 to a
   folder), a plan of 1 fork x N = ``--steps`` (5) chained one-file steps, and the same plan cut to its first step.
   The goal figure is what one more step costs Conductor: from its own audit log, the mean time from one
   ``step.merged`` event to the next, minus git's command time / N (the command each step runs), the median of
   the rounds. Goal: flat, the figure at the largest size <= 1.5x the one at the smallest. Two diagnostics
   beside it, from wall times: overhead = (wall of the N-step plan - wall of the git baseline doing the same:
   one worktree, the N commands, ``git add -A`` + ``git diff``, ``git worktree remove``) / N, in which
   once-per-plan work (a checkout of every file, which git does too) cancels only as far as its noise lets it
   (a 50,000-file checkout varies by seconds with the file system's state, which swamps a per-step cost); and
   marginal = (wall of the N-step plan - wall of the 1-step plan) / (N - 1) - git's command time / N, a
   difference of two noisy walls.

The baseline ends with ``git worktree remove --force`` of its worktrees and runs its forks one after the other;
Conductor runs as it likes (``executor.parallel``, 4). Deleting many files makes creating files several times
slower for about a minute on some file systems (ext4 without a journal here), so before every timed run the
benchmark runs ``sync`` and waits, up to ``--settle`` seconds, until creating 500 small files takes at most
twice as long as the fastest such probe so far (the wait is reported, never timed). There are ``--repeat``
rounds of Conductor's runs then git's, and each figure is a median (the ``.conductor/`` growth: the largest);
each tree is built once, before any timing. MB are 10^6 bytes. Everything happens in one folder under
``TMPDIR``, removed at the end unless ``--keep``. Progress goes to stderr, the table (or one JSON document,
``--json``) to stdout. Exit status: 0; 1 when a run failed (a Conductor exit status other than 0, a plan or fork
that did not succeed, a git command that failed, or Conductor and git changing different numbers of files); 2 on
bad arguments. A missed goal is a figure, not a failure.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import random
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

DJANGO = "django==5.1.4"
DJANGO_SDISTS = ("Django-5.1.4.tar.gz", "django-5.1.4.tar.gz")
DJANGO_TARGETS = ("django/__init__.py", "django/shortcuts.py")
GENERATED_TARGETS = ("pkg/__init__.py", "pkg/shortcuts.py")
FORKS = 2
STEPS_PER_FORK = 2
GOAL_RATIO = 2.0
GOAL_GROWTH_BYTES = 5_000_000
GOAL_FLAT = 1.5
GOAL_FILES = 6_000
GOAL_MB = 50
MB = 1_000_000
SEED = 8  # issue 8
MAX_HISTORY_ROUNDS = 12
IDENTITY = ("Conductor Bench", "bench@conductor.invalid")
COMMIT_TIME = "1767225600 +0000"  # 2026-01-01: objects, hence pack sizes, are the same on every run
SECTIONS = ("repo", "steps")
TEXT_SUFFIXES = (".py", ".txt", ".po", ".html", ".js", ".css", ".json", ".xml", ".rst", ".cfg", ".ini", ".toml")
REPO_ROOT = Path(__file__).resolve().parents[1]


def log(message: str) -> None:
    print(f"[repo-bench] {message}", file=sys.stderr, flush=True)


class RunFailed(Exception):
    """A command of the benchmark failed: the figures it would give are void."""


# --- processes -----------------------------------------------------------------------------------------


def bench_environ(home: Path) -> dict[str, str]:
    """This environment without ``CONDUCTOR_*`` or provider variables, ``HOME`` a fresh folder with a git identity.

    The identity sits in ``$HOME/.gitconfig`` as on a developer's machine, for the repository builds, the git
    baseline and Conductor alike.
    """
    dropped = ("OPENAI_", "GEMINI_", "GOOGLE_API_KEY", "GOOGLE_GEMINI_", "GIT_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONDUCTOR_", *dropped))}
    home.mkdir(parents=True, exist_ok=True)
    (home / ".gitconfig").write_text(f"[user]\n\tname = {IDENTITY[0]}\n\temail = {IDENTITY[1]}\n", encoding="utf-8")
    env["HOME"] = str(home)
    env.pop("XDG_STATE_HOME", None)
    env.pop("XDG_CONFIG_HOME", None)
    return env


def run(argv: Sequence[str | Path], *, cwd: Path, env: Mapping[str, str], stdin: bytes | None = None,
        timeout: float = 600) -> bytes:
    """Run ``argv`` and return its stdout; :class:`RunFailed` (with stderr's tail) if it exits non-zero."""
    try:
        proc = subprocess.run([str(a) for a in argv], cwd=cwd, env=dict(env), input=stdin, capture_output=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise RunFailed(f"{shlex.join(map(str, argv))}: timed out after {timeout:g} s") from exc
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip()[-1500:]
        raise RunFailed(f"{shlex.join(map(str, argv))} (in {cwd}) exited {proc.returncode}: {tail}")
    return proc.stdout


def git(cwd: Path, *args: str | Path, env: Mapping[str, str], stdin: bytes | None = None) -> bytes:
    return run(["git", *args], cwd=cwd, env=env, stdin=stdin)


# --- sizes on disk ---------------------------------------------------------------------------------------


@dataclass
class Usage:
    disk_bytes: int  # st_blocks * 512 of every file, folder and symlink, hard links once
    content_bytes: int  # st_size of regular files
    files: int
    dirs: int


def usage(root: Path, *, skip: Sequence[str] = ()) -> Usage:
    """Disk usage of ``root`` (like ``du -s -B1``), skipping top-level names in ``skip``."""
    seen: set[tuple[int, int]] = set()
    total = Usage(0, 0, 0, 0)
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            continue
        for entry in entries:
            if folder == root and entry.name in skip:
                continue
            st = entry.stat(follow_symlinks=False)
            if st.st_nlink > 1 and not entry.is_dir(follow_symlinks=False):
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            total.disk_bytes += st.st_blocks * 512
            if entry.is_dir(follow_symlinks=False):
                total.dirs += 1
                stack.append(Path(entry.path))
            elif entry.is_file(follow_symlinks=False):
                total.files += 1
                total.content_bytes += st.st_size
    return total


# --- building repositories -------------------------------------------------------------------------------


def _quote_path(path: str) -> bytes:
    raw = path.encode("utf-8", "surrogateescape")
    if raw.startswith(b'"') or any(c in raw for c in b"\n\\"):
        return b'"' + raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"').replace(b"\n", b"\\n") + b'"'
    return raw


class FastImport:
    """One commit written straight into a pack by ``git fast-import`` (no loose objects, nothing to prune)."""

    def __init__(self, repo: Path, message: str, *, parent: bool) -> None:
        self.repo = repo
        msg = message.encode()
        self.chunks: list[bytes] = [
            b"commit refs/heads/main\n",
            f"author {IDENTITY[0]} <{IDENTITY[1]}> {COMMIT_TIME}\n".encode(),
            f"committer {IDENTITY[0]} <{IDENTITY[1]}> {COMMIT_TIME}\n".encode(),
            b"data %d\n%s\n" % (len(msg), msg),
        ]
        if parent:
            self.chunks.append(b"from refs/heads/main^0\n")

    def add(self, path: str, data: bytes, mode: str = "100644") -> None:
        self.chunks.append(b"M %s inline %s\ndata %d\n" % (mode.encode(), _quote_path(path), len(data)))
        self.chunks.append(data)
        self.chunks.append(b"\n")

    def commit(self, env: Mapping[str, str]) -> None:
        git(self.repo, "fast-import", "--quiet", env=env, stdin=b"".join(self.chunks))
        self.chunks = []


def repack(repo: Path, env: Mapping[str, str]) -> None:
    """Delta-compress every object into one pack as a clone has it (fast-import's chains make checkouts slow).

    Deletes only the packs it replaces: a few files.
    """
    git(repo, "repack", "-a", "-d", "-f", "-q", env=env)


def finish_index(repo: Path, env: Mapping[str, str]) -> None:
    """Make the index match ``HEAD`` and the files on disk, as after a clone."""
    git(repo, "read-tree", "HEAD", env=env)
    git(repo, "update-index", "-q", "--refresh", env=env)


def tree_files(root: Path) -> Iterator[tuple[str, Path]]:
    """``(relative POSIX path, path)`` of every file and symlink under ``root`` except ``.git``, sorted."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not (folder == str(root) and d == ".git"))
        for name in sorted(files):
            path = Path(folder, name)
            yield path.relative_to(root).as_posix(), path


def commit_tree(repo: Path, message: str, env: Mapping[str, str]) -> None:
    """Commit every file of ``repo``'s working tree as its first commit."""
    imp = FastImport(repo, message, parent=False)
    for rel, path in tree_files(repo):
        if path.is_symlink():
            imp.add(rel, os.readlink(path).encode(), "120000")
        else:
            imp.add(rel, path.read_bytes(), _mode(path))
    imp.commit(env)


def init_repo(repo: Path, env: Mapping[str, str]) -> None:
    git(repo, "init", "-q", "-b", "main", env=env)


class TextMaker:
    """Deterministic Python-like text, compressible about as much as real source."""

    WORDS = ("self", "value", "request", "model", "field", "queryset", "form", "name", "data", "result", "item",
             "template", "context", "response", "cache", "user", "path", "options", "args", "kwargs", "obj")

    def __init__(self, rng: random.Random, lines: int = 3000) -> None:
        self.rng = rng
        self.lines = [self._line(i) for i in range(lines)]

    def _line(self, i: int) -> str:
        w = self.rng.choice
        forms = (f"def {w(self.WORDS)}_{i}({w(self.WORDS)}, {w(self.WORDS)}=None):",
                 f"    {w(self.WORDS)} = {w(self.WORDS)}.{w(self.WORDS)}_{i % 97}({w(self.WORDS)})",
                 f"    if {w(self.WORDS)} is not None and {w(self.WORDS)} > {i % 13}:",
                 f"        return {w(self.WORDS)}[{i % 7}:]",
                 f"    # {w(self.WORDS)} {w(self.WORDS)} {w(self.WORDS)} {w(self.WORDS)}",
                 f"class {w(self.WORDS).title()}{i}({w(self.WORDS).title()}Base):", "")
        return forms[i % len(forms)]

    def text(self, size: int, fresh: bool = False) -> bytes:
        """About ``size`` bytes of lines (``fresh`` mixes in lines never seen before, as new code)."""
        out: list[str] = []
        length = 0
        while length < size:
            line = self._line(self.rng.randrange(10**6)) if fresh and self.rng.random() < 0.5 else \
                self.rng.choice(self.lines)
            out.append(line)
            length += len(line) + 1
        return ("\n".join(out) + "\n").encode()[:max(size, 1)]


def generated_layout(files: int, rng: random.Random) -> list[str]:
    """Relative paths of ``files`` files in a tree shaped like Django's (about 0.47 folders per file)."""
    names = ("admin", "auth", "contrib", "db", "models", "forms", "templates", "static", "locale", "LC_MESSAGES",
             "tests", "utils", "views", "migrations", "backends", "core", "http", "middleware", "management",
             "fields", "sql", "gis", "sessions", "messages", "docs", "ref", "topics", "js", "css", "img")
    dirs = ["pkg"]
    used: dict[str, set[str]] = {"": {"pkg"}}
    for i in range(max(0, int(files * 0.47) - 1)):
        parent = rng.choice(dirs + [""] * 3)
        name = rng.choice(names)
        if name in used.setdefault(parent, set()):
            name = f"{name}{i}"
        used[parent].add(name)
        dirs.append(f"{parent}/{name}" if parent else name)
    suffixes = (".py", ".po", ".mo", ".txt", ".html", ".js", ".json", ".css")
    weights = (45, 19, 18, 10, 5, 1.5, 1, 0.5)
    paths = list(GENERATED_TARGETS)
    taken = set(paths)
    while len(paths) < files:
        folder = dirs[len(paths)] if len(paths) < len(dirs) else rng.choice(dirs)  # every folder gets a file
        path = f"{folder}/{rng.choice(TextMaker.WORDS)}_{len(paths)}{rng.choices(suffixes, weights)[0]}"
        if path not in taken:
            taken.add(path)
            paths.append(path)
    return paths[:files]


def generated_content(path: str, maker: TextMaker, rng: random.Random) -> bytes:
    """Content of one generated file: sizes log-normal around Django's (median 1.5 kB, p90 17 kB, max 700 kB)."""
    size = int(min(700_000, max(16, rng.lognormvariate(math.log(1525), 1.75))))
    body = maker.text(size)
    if path.endswith(".mo"):
        return b"\xde\x12\x04\x95\x00\x00\x00\x00" + body  # a binary header, as a compiled catalogue
    return body


def build_generated(repo: Path, files: int, env: Mapping[str, str]) -> None:
    """A Django-shaped tree of ``files`` files in a new repository, committed once."""
    rng = random.Random(SEED)
    maker = TextMaker(rng)
    repo.mkdir(parents=True)
    init_repo(repo, env)
    imp = FastImport(repo, f"generated tree of {files} files", parent=False)
    for rel in generated_layout(files, rng):
        data = generated_content(rel, maker, rng)
        path = repo / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        imp.add(rel, data)
    imp.commit(env)


def fetch_django(cache: Path, env: Mapping[str, str]) -> Path:
    """The Django sdist from ``cache``, downloaded there with pip the first time."""
    for name in DJANGO_SDISTS:
        if (cache / name).is_file():
            return cache / name
    cache.mkdir(parents=True, exist_ok=True)
    log(f"downloading the {DJANGO} sdist into {cache} (pip) ...")
    run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
         "--no-binary", ":all:", DJANGO, "-d", cache], cwd=cache, env=env, timeout=900)
    for name in DJANGO_SDISTS:
        if (cache / name).is_file():
            return cache / name
    raise RunFailed(f"pip download left no {DJANGO_SDISTS[0]} in {cache}")


def build_django(repo: Path, sdist: Path, env: Mapping[str, str]) -> None:
    """Unpack ``sdist`` into ``repo`` (its top folder becomes the root) and commit it."""
    unpack = repo.parent / f"{repo.name}.unpack"
    with tarfile.open(sdist) as archive:
        if hasattr(tarfile, "data_filter"):
            archive.extractall(unpack, filter="data")  # also leaves ownership to us, so git trusts the folder
        else:  # Python < 3.11.4
            archive.extractall(unpack)  # noqa: S202 - our own cached sdist
    (top,) = list(unpack.iterdir())
    top.rename(repo)
    unpack.rmdir()
    init_repo(repo, env)
    commit_tree(repo, f"{sdist.name}, unpacked", env)


def add_history(repo: Path, min_bytes: int, env: Mapping[str, str]) -> int:
    """Give ``repo`` history until it uses ``min_bytes`` (at most 12 rounds); returns the commits added.

    Each round commits other versions of a quarter of the text files (new text of the same size, half of it
    lines never seen before, so that git cannot store it as a tiny delta); a last commit brings those files back
    as they are on disk. The working tree is never touched: it stays the sdist (or generated tree) as it was.
    """
    rng = random.Random(SEED + 1)
    maker = TextMaker(rng)
    texts = [rel for rel, path in tree_files(repo) if rel.endswith(TEXT_SUFFIXES) and not path.is_symlink()]
    rewritten: set[str] = set()
    rounds = 0
    repack(repo, env)
    while texts and usage(repo).disk_bytes < min_bytes and rounds < MAX_HISTORY_ROUNDS:
        rounds += 1
        imp = FastImport(repo, f"an earlier version ({rounds})", parent=True)
        for rel in rng.sample(texts, max(1, len(texts) // 4)):
            imp.add(rel, maker.text(max(64, (repo / rel).stat().st_size), fresh=True), _mode(repo / rel))
            rewritten.add(rel)
        imp.commit(env)
        repack(repo, env)
    if not rewritten:
        return 0
    imp = FastImport(repo, "the tree as released", parent=True)
    for rel in sorted(rewritten):
        imp.add(rel, (repo / rel).read_bytes(), _mode(repo / rel))
    imp.commit(env)
    repack(repo, env)
    return rounds + 1


def _mode(path: Path) -> str:
    return "100755" if os.access(path, os.X_OK) else "100644"


def build_size_repo(repo: Path, files: int, env: Mapping[str, str]) -> None:
    """A repository of ``files`` small text files, 100 to a folder, committed once."""
    rng = random.Random(SEED + files)
    maker = TextMaker(rng, lines=500)
    repo.mkdir(parents=True)
    init_repo(repo, env)
    imp = FastImport(repo, f"{files} small files", parent=False)
    for rel in size_paths(files):
        data = maker.text(rng.randrange(300, 1500))
        path = repo / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        imp.add(rel, data)
    imp.commit(env)
    repack(repo, env)
    finish_index(repo, env)


def size_paths(files: int) -> Iterator[str]:
    for i in range(files):
        yield f"p{i // 1000:03d}/d{i // 100 % 10}/f{i:06d}.py"


# --- Conductor and the git baseline -----------------------------------------------------------------------


def step_command(path: str, fork: int, step: int) -> str:
    """A one-line change: a comment line inserted at the top of ``path`` (GNU sed)."""
    return f"sed -i '1s/^/# fork {fork} step {step}\\n/' {shlex.quote(path)}"


def plan_document(targets: Sequence[Sequence[str]]) -> dict[str, Any]:
    """A plan of one strategy per entry of ``targets``: one chained ``sed`` step per file, in order."""
    strategies = []
    for fork, files in enumerate(targets, 1):
        steps = []
        for step, path in enumerate(files, 1):
            steps.append({"id": f"s{step}", "title": f"comment {path}", "instruction": step_command(path, fork, step),
                          "allowed_files": [path], "depends_on": [f"s{step - 1}"] if step > 1 else [],
                          "confidence": 0.95})
        strategies.append({"name": f"fork{fork}", "description": "one-line sed edits", "steps": steps})
    return {"goal": "Benchmark: one-line edits", "strategies": strategies}


CONFIG_EDITS = (
    (r"(?ms)^(executor:\n.*?^  kind: )llm\b", r"\1command"),  # the executor's kind, not the planner's
    (r"(?m)^(  command: )null\b", "\\1'sh -c \"$CONDUCTOR_INSTRUCTION\"'"),
    (r"(?m)^(  commands: )\[\]", r"\1[]"),
)


def init_conductor(conductor: Path, repo: Path, env: Mapping[str, str]) -> None:
    """``conductor init`` in ``repo``, then the command executor and no verification, as examples/demo.sh does."""
    run([conductor, "init", "-C", repo], cwd=repo, env=env)
    config = repo / ".conductor" / "config.yaml"
    text = config.read_text(encoding="utf-8")
    for pattern, replacement in CONFIG_EDITS:
        text, count = re.subn(pattern, replacement, text)
        if count != 1:
            raise RunFailed(f"{config}: expected one line matching {pattern!r} in the template, found {count}")
    config.write_text(text, encoding="utf-8")


def run_conductor(conductor: Path, repo: Path, plan: Path, forks: int, *, apply: bool, env: Mapping[str, str],
                  timeout: float) -> dict[str, Any]:
    """One timed ``conductor explore --plan``; its wall time, report, and ``.conductor/`` growth."""
    argv = [str(conductor), "explore", "--plan", str(plan), "--forks", str(forks), "--auto-approve", "--json",
            "-C", str(repo)] + ([] if apply else ["--no-apply"])
    before = usage(repo / ".conductor").disk_bytes
    began = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=repo, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    problems = []
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        problems.append(f"conductor was killed after {timeout:g} s (--timeout)")
    seconds = time.perf_counter() - began
    growth = usage(repo / ".conductor").disk_bytes - before
    try:
        report = json.loads(out)
    except ValueError:
        report = None
    ranking = (report or {}).get("ranking") or []
    if proc.returncode != 0:
        problems.append(f"conductor exited {proc.returncode}: {err.decode(errors='replace').strip()[-1500:]}")
    if not report or report.get("status") != "succeeded":
        problems.append(f"plan status {(report or {}).get('status')!r}: {(report or {}).get('message', '')}")
    problems += [f"fork {r.get('fork_id')} {r.get('status')}, {r.get('steps_verified')}/{r.get('steps_total')} "
                 "steps verified" for r in ranking
                 if r.get("status") != "succeeded" or r.get("steps_verified") != r.get("steps_total")]
    if report and len(ranking) != forks:
        problems.append(f"{len(ranking)} fork(s) ranked, {forks} expected")
    if apply and report and not report.get("applied_fork"):
        problems.append("no fork was applied")
    changed = git(repo, "--no-optional-locks", "status", "--porcelain", "--untracked-files=no", env=env).decode()
    if not apply and changed:
        problems.append(f"the project's tracked files changed despite --no-apply: {changed.strip()[:300]}")
    return {"seconds": seconds, "exit_code": proc.returncode, "status": (report or {}).get("status"),
            "plan_id": (report or {}).get("plan_id"), "growth_bytes": growth, "ranking": ranking,
            "applied_fork": (report or {}).get("applied_fork"), "problems": problems}


def audit_step_gaps(conductor: Path, repo: Path, plan_id: str | None, env: Mapping[str, str]) -> list[float] | None:
    """Seconds between consecutive ``step.merged`` events of ``plan_id`` (``conductor events``), or None.

    A diagnostic beside the wall times: it leaves out process start and the once-per-plan work, and is read
    from Conductor's own audit log (its clock, its event names), so it is never a goal figure.
    """
    if not plan_id:
        return None
    try:
        out = run([conductor, "events", "--plan-id", plan_id, "--type", "step.merged", "--json", "-C", repo],
                  cwd=repo, env=env)
        stamps = sorted(datetime.fromisoformat(e["ts"].replace("Z", "+00:00")) for e in json.loads(out))
    except (RunFailed, ValueError, KeyError, TypeError):
        return None
    return [(b - a).total_seconds() for a, b in itertools.pairwise(stamps)]


def patch_counts(patch: bytes) -> dict[str, int]:
    lines = patch.decode(errors="replace").splitlines()
    return {"changed_files": sum(line.startswith("diff --git ") for line in lines),
            "changed_lines": sum(line[:1] in "+-" and line[:3] not in ("+++", "---") for line in lines if line)}


def run_git_baseline(repo: Path, work: Path, tag: str, commands: Sequence[Sequence[str]], *, apply: bool,
                     env: Mapping[str, str]) -> dict[str, Any]:
    """The same work with git, timed: per fork a worktree, the commands, ``git add -A`` + ``git diff`` to a patch.

    With ``apply``, fork 1's patch is then applied to the main tree with ``git apply``; last the worktrees are
    removed. Returns the wall time, the seconds of each part and each fork's change counts.
    """
    parts = dict.fromkeys(("worktree add", "commands", "add + diff", "apply", "worktree remove"), 0.0)
    clock = time.perf_counter()

    def lap(part: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        parts[part] += now - clock
        clock = now

    began, worktrees, forks = clock, [], []
    for fork, fork_commands in enumerate(commands, 1):
        tree = work / f"{tag}-fork{fork}"
        git(repo, "worktree", "add", "-q", "--detach", tree, env=env)
        worktrees.append(tree)
        lap("worktree add")
        for command in fork_commands:
            run(["sh", "-c", command], cwd=tree, env=env)
        lap("commands")
        git(tree, "add", "-A", env=env)
        patch = git(tree, "diff", "--cached", "--binary", env=env)
        (work / f"{tag}-fork{fork}.patch").write_bytes(patch)
        forks.append(patch_counts(patch))
        lap("add + diff")
    if apply:
        git(repo, "apply", work / f"{tag}-fork1.patch", env=env)
        lap("apply")
    for tree in worktrees:
        git(repo, "worktree", "remove", "--force", tree, env=env)
    lap("worktree remove")
    return {"seconds": clock - began, "parts_seconds": parts, "forks": forks}


class FsProbe:
    """Creation speed of small files, to wait out the slow spell that follows deleting many files.

    Probes never delete: each writes 500 files of 500 bytes into a new folder under ``root``. The reference is
    the fastest probe so far, so a slow spell already under way at the start does not become the norm.
    """

    FILES = 500

    def __init__(self, root: Path, max_wait: float) -> None:
        self.root, self.max_wait, self.count = root, max_wait, 0
        root.mkdir()
        for _ in range(3):
            self.probe()

    def probe(self) -> float:
        self.count += 1
        folder = self.root / str(self.count)
        folder.mkdir()
        began = time.perf_counter()
        for i in range(self.FILES):
            (folder / f"f{i}").write_bytes(b"x" * 500)
        seconds = time.perf_counter() - began
        self.reference = min(seconds, getattr(self, "reference", seconds))
        return seconds

    def settle(self) -> dict[str, Any]:
        """``sync``, then wait (up to ``max_wait`` s) until a probe takes at most twice the reference; what it took.

        The sync writes back what earlier runs left dirty (their deletions too), which the kernel would otherwise
        write back during the next timed run.
        """
        began = time.perf_counter()
        if hasattr(os, "sync"):
            os.sync()
        synced = time.perf_counter() - began
        seconds = self.probe()
        while seconds > 2 * self.reference and time.perf_counter() - began < self.max_wait:
            time.sleep(min(5.0, max(0.5, self.max_wait / 10)))
            seconds = self.probe()
        return {"waited_seconds": time.perf_counter() - began, "sync_seconds": synced, "probe_seconds": seconds,
                "settled": seconds <= 2 * self.reference}


def restore(repo: Path, paths: Sequence[str], env: Mapping[str, str]) -> None:
    """Put ``paths`` back as in ``HEAD`` (after an applied run, so every run starts from the same tree)."""
    git(repo, "checkout", "-q", "HEAD", "--", *paths, env=env)


def summarize(runs: Sequence[Mapping[str, Any]], targets: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Medians (times), maxima (``.conductor/`` growth) and the runs of :meth:`Bench.compare`."""
    def median(key: str, field: str = "seconds") -> float:
        return statistics.median(r[key][field] for r in runs)

    conductor_s, git_s = median("conductor"), median("git")
    summary = {"forks": len(targets), "steps_per_fork": len(targets[0]), "targets": [list(t) for t in targets],
               "runs": list(runs), "ok": all(r["ok"] for r in runs), "conductor_seconds": conductor_s,
               "git_seconds": git_s, "ratio": conductor_s / git_s if git_s > 0 else None,
               "git_parts_seconds": {part: statistics.median(r["git"]["parts_seconds"][part] for r in runs)
                                     for part in runs[0]["git"]["parts_seconds"]},
               "settle_waited_seconds": sum(w["waited_seconds"] for r in runs for w in r["settle"].values()),
               "growth_bytes": max(r["conductor"]["growth_bytes"] for r in runs),
               "growth_bytes_median": median("conductor", "growth_bytes")}
    if "conductor_one_step" in runs[0]:
        summary["conductor_one_step_seconds"] = median("conductor_one_step")
    return summary


@dataclass
class Bench:
    conductor: Path
    work: Path
    env: dict[str, str]
    repeat: int
    apply: bool
    timeout: float
    probe: FsProbe
    failures: list[str]

    def compare(self, repo: Path, label: str, targets: Sequence[Sequence[str]], *,
                one_step: bool = False) -> dict[str, Any]:
        """``repeat`` rounds of Conductor then git on ``repo`` for the plan of ``targets``; medians and runs.

        With ``one_step``, each round first also runs Conductor on the plan cut to each fork's first step.
        """
        plan, touched = self._plan_file(label, targets), sorted({path for files in targets for path in files})
        short = self._plan_file(f"{label}-1step", [files[:1] for files in targets]) if one_step else None
        commands = [[step_command(path, fork, step) for step, path in enumerate(files, 1)]
                    for fork, files in enumerate(targets, 1)]
        runs = []
        for i in range(1, self.repeat + 1):
            what = f"{label}: run {i}/{self.repeat}"
            run_: dict[str, Any] = {"settle": {}}
            if short is not None:
                run_["conductor_one_step"] = self._conductor(repo, short, len(targets), touched,
                                                             f"{what}, conductor 1 step", run_["settle"])
            run_["conductor"] = self._conductor(repo, plan, len(targets), touched, f"{what}, conductor",
                                                run_["settle"])
            if one_step:
                run_["conductor"]["audit_step_gaps"] = audit_step_gaps(self.conductor, repo,
                                                                       run_["conductor"]["plan_id"], self.env)
            run_["settle"]["git"] = self._settle(f"{what}, git baseline")
            run_["git"] = base = run_git_baseline(repo, self.work / "worktrees", f"{label}-r{i}", commands,
                                                  apply=self.apply, env=self.env)
            if self.apply:
                restore(repo, touched, self.env)
            log(f"{what}, git baseline {base['seconds']:.2f} s")
            problems = run_["conductor"]["problems"] + run_.get("conductor_one_step", {}).get("problems", []) + \
                self._different_work(run_["conductor"]["ranking"], base["forks"])
            self.failures += [f"{label} run {i}: {p}" for p in problems]
            runs.append({**run_, "ok": not problems})
        return summarize(runs, targets)

    def _plan_file(self, label: str, targets: Sequence[Sequence[str]]) -> Path:
        plan = self.work / "plans" / f"{label}.json"
        plan.parent.mkdir(exist_ok=True)
        plan.write_text(json.dumps(plan_document(targets), indent=2), encoding="utf-8")
        return plan

    def _conductor(self, repo: Path, plan: Path, forks: int, touched: Sequence[str], what: str,
                   settles: dict[str, Any]) -> dict[str, Any]:
        settles[what.rsplit(", ", 1)[-1]] = self._settle(what)  # keyed "conductor" or "conductor 1 step"
        result = run_conductor(self.conductor, repo, plan, forks, apply=self.apply, env=self.env, timeout=self.timeout)
        if self.apply:
            restore(repo, touched, self.env)
        log(f"{what} {result['seconds']:.2f} s")
        return result

    def _settle(self, what: str) -> dict[str, Any]:
        settle = self.probe.settle()
        note = "" if settle["settled"] else f" (still slow after {self.probe.max_wait:g} s)"
        wait = f"waited {settle['waited_seconds']:.0f} s for the file system{note}; " if settle["waited_seconds"] > 1 else ""
        log(f"{what} ... ({wait}probe {settle['probe_seconds'] * 1000:.0f} ms, "
            f"reference {self.probe.reference * 1000:.0f} ms)")
        return settle

    @staticmethod
    def _different_work(ranking: Sequence[Mapping[str, Any]], forks: Sequence[Mapping[str, int]]) -> list[str]:
        if not ranking:
            return []
        by_fork = {str(r.get("fork_id")): r for r in ranking}
        return [f"fork {i}: conductor changed {by_fork.get(str(i), {}).get('changed_files')} file(s), git "
                f"{counts['changed_files']}" for i, counts in enumerate(forks, 1)
                if by_fork.get(str(i), {}).get("changed_files") != counts["changed_files"]]


# --- the two sections ---------------------------------------------------------------------------------------


def build_main_repo(args: argparse.Namespace, work: Path, env: Mapping[str, str]) -> tuple[Path, dict[str, Any]]:
    """The repository of figures 1 and 2, built and described (files, MB, commits, source)."""
    began = time.perf_counter()
    info: dict[str, Any] = {"source": args.source, "fallback_reason": None}
    repo = work / "repo"
    if args.source == "django":
        try:
            sdist = fetch_django(args.cache, env)
            build_django(repo, sdist, env)
            info.update(name=f"Django 5.1.4 sdist ({sdist.name})", sdist=str(sdist), targets=list(DJANGO_TARGETS))
        except (RunFailed, OSError, tarfile.TarError) as exc:
            log(f"the Django sdist is not available ({exc}); using a generated tree of the same shape")
            info.update(source="generated", fallback_reason=str(exc)[:500])
            shutil.rmtree(repo, ignore_errors=True)  # a half-made tree: small, and long before any timing
    if info["source"] == "generated":
        build_generated(repo, args.files, env)
        info.update(name=f"generated Django-shaped tree (seed {SEED})", targets=list(GENERATED_TARGETS))
    info["history_commits"] = add_history(repo, args.min_mb * MB, env)
    finish_index(repo, env)
    size = usage(repo)
    tree = usage(repo, skip=[".git"])
    info.update(files=tree.files, dirs=tree.dirs, content_bytes=tree.content_bytes, disk_bytes=size.disk_bytes,
                git_disk_bytes=usage(repo / ".git").disk_bytes,
                commits=int(git(repo, "rev-list", "--count", "HEAD", env=env)), build_seconds=time.perf_counter() - began)
    info["shape_ok"] = info["files"] >= GOAL_FILES and info["disk_bytes"] >= GOAL_MB * MB
    info["min_mb_reached"] = info["disk_bytes"] >= args.min_mb * MB
    return repo, info


def repo_section(bench: Bench, repo: Path, info: Mapping[str, Any]) -> dict[str, Any]:
    first, second = info["targets"]
    result = bench.compare(repo, "repo", [[first, second]] * FORKS)
    result["ratio_ok"] = result["ratio"] is not None and result["ratio"] <= GOAL_RATIO
    result["growth_ok"] = result["growth_bytes"] <= GOAL_GROWTH_BYTES
    return result


def steps_section(bench: Bench, repos: Mapping[int, Path], steps: int) -> dict[str, Any]:
    """Figure 3 at every size (see :func:`per_step_figures`) and how each figure grows from the smallest size."""
    sizes = []
    for files, repo in repos.items():
        result = bench.compare(repo, f"files-{files}", [list(itertools.islice(size_paths(files), steps))],
                               one_step=True)
        result.update(files=files, **per_step_figures(result["runs"], steps))
        sizes.append(result)
    return {"steps": steps, "sizes": sizes, **_flatness(sizes, ""), **_flatness(sizes, "marginal_"),
            **_flatness(sizes, "audit_")}


def per_step_figures(runs: Sequence[Mapping[str, Any]], steps: int) -> dict[str, Any]:
    """The per-step overheads of each round of ``runs`` (N = ``steps``), and their medians over the rounds.

    A round's runs are back to back, so a difference within a round is less exposed to a changing load.

    - audit (the goal figure) = mean time from one ``step.merged`` event to the next - git's command time / N
      (None without the events): Conductor's own clock, steady on a busy machine;
    - overhead = (Conductor wall of the N-step plan - git baseline wall) / N: once-per-plan costs included;
    - marginal = (Conductor wall of the N-step plan - Conductor wall of its first step alone) / (N - 1)
      - git's command time / N: leaves out once-per-plan costs, but is a difference of two noisy walls.
    """
    overhead = [(r["conductor"]["seconds"] - r["git"]["seconds"]) / steps for r in runs]
    marginal = [(r["conductor"]["seconds"] - r["conductor_one_step"]["seconds"]) / (steps - 1)
                - r["git"]["parts_seconds"]["commands"] / steps for r in runs]
    gaps = [r["conductor"].get("audit_step_gaps") for r in runs]
    audit = [statistics.mean(g) - r["git"]["parts_seconds"]["commands"] / steps
             for g, r in zip(gaps, runs, strict=True)] if all(gaps) else None
    return {"overhead_per_step_seconds": statistics.median(overhead), "overhead_per_step_each": overhead,
            "marginal_overhead_per_step_seconds": statistics.median(marginal), "marginal_overhead_per_step_each": marginal,
            "audit_overhead_per_step_seconds": statistics.median(audit) if audit else None,
            "audit_overhead_per_step_each": audit}


def _flatness(sizes: Sequence[Mapping[str, Any]], kind: str) -> dict[str, Any]:
    """``<kind>flatness_ratio``: the overhead at the largest size over the smallest, when both are positive."""
    low, high = (sizes[i][f"{kind}overhead_per_step_seconds"] for i in (0, -1))
    ratio = high / low if len(sizes) > 1 and low is not None and high is not None and low > 0 and high > 0 else None
    return {f"{kind}flatness_ratio": ratio, f"{kind}flatness_ok": None if ratio is None else ratio <= GOAL_FLAT}


# --- machine, table, main -------------------------------------------------------------------------------


def machine(tmp: Path, env: Mapping[str, str]) -> dict[str, Any]:
    fs, device = "unknown", "unknown"
    try:
        target, best = os.path.realpath(tmp), ""
        for line in Path("/proc/self/mounts").read_text().splitlines():
            dev, point, kind = line.split()[:3]
            point = point.replace("\\040", " ")
            if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
                best, fs, device = point, kind, dev
    except OSError:
        pass  # not Linux: the file system stays unknown
    memory = None
    try:
        kib = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))  # type: ignore[union-attr]
        memory = round(kib / 1024 / 1024, 1)
    except (OSError, AttributeError):
        pass
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpus": os.cpu_count(),
        "memory_gib": memory, "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(), "platform": platform.platform(),
        "git": git(tmp, "--version", env=env).decode().strip().removeprefix("git version "),
        "temp_dir": str(tmp.parent), "file_system": fs, "device": device,
    }


def conductor_info(conductor: Path, env: Mapping[str, str]) -> dict[str, Any]:
    """Version of the ``conductor`` run, and the commit of this checkout (with uncommitted changes under conductor/)."""
    info: dict[str, Any] = {"path": str(conductor), "version": None, "commit": None, "uncommitted_changes": None}
    try:
        info["version"] = run([conductor, "--version"], cwd=REPO_ROOT, env=env).decode().strip().split()[-1]
        info["commit"] = git(REPO_ROOT, "rev-parse", "--short", "HEAD", env=env).decode().strip()
        info["uncommitted_changes"] = bool(git(REPO_ROOT, "status", "--porcelain", "--", "conductor", env=env).strip())
    except RunFailed:
        pass  # not a git checkout: the commit stays unknown
    return info


def _s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:,.2f} s"


def _mb(value: float) -> str:
    return f"{value / MB:,.1f} MB"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:,.2f}x"


def _mark(ok: bool | None) -> str:
    return "n/a" if ok is None else ("ok" if ok else "MISSED")


def render(doc: Mapping[str, Any]) -> str:
    """The figures of ``doc`` (this script's JSON document) as a plain-text table."""
    m, c, s = doc["machine"], doc["conductor"], doc["settings"]
    dirty = " + uncommitted changes under conductor/" if c["uncommitted_changes"] else ""
    lines = [f"Conductor repository benchmark, {m['date']}",
             f"machine: {m['cpus']} CPUs, {m['memory_gib']} GiB, load average {m['load_average']} at start, "
             f"{doc.get('load_average_end')} at end; Python {m['python']}, git {m['git']}, {m['platform']}",
             f"temp dir {m['temp_dir']} on {m['file_system']} ({m['device']})",
             f"conductor: {c['version']} ({c['path']}), commit {c['commit']}{dirty}",
             f"runs: median of {s['repeat']} (Conductor then git each round); "
             f"{'winner applied (--apply)' if s['apply'] else '--no-apply'}", ""]
    rows: list[tuple[str, ...]] = [("figure", "conductor", "git baseline", "ratio", "goal", "")]
    info = doc.get("repository")
    if info:
        reason = (info["fallback_reason"] or "").strip().splitlines()[-1:] or [""]
        fallback = f" (the sdist was not available: {reason[0][:100]})" if info["fallback_reason"] else ""
        rows.append((f"repository: {info['name']}{fallback}", "", "", "", "", ""))
        rows.append((f"  {info['files']:,} files, {info['dirs']:,} folders, {_mb(info['disk_bytes'])} with .git "
                     f"({_mb(info['git_disk_bytes'])} .git, {_mb(info['content_bytes'])} of content), "
                     f"{info['commits']} commit(s)" + ("" if info["min_mb_reached"] else
                                                       f" (--min-mb not reached in {MAX_HISTORY_ROUNDS} rounds)"),
                     "", "", "", f">= {GOAL_FILES:,} files, {GOAL_MB} MB",
                     _mark(info["shape_ok"])))
    r = doc.get("repo")
    if r:
        rows.append((f"explore {r['forks']} forks x {r['steps_per_fork']} one-line steps, wall",
                     _s(r["conductor_seconds"]), _s(r["git_seconds"]), _x(r["ratio"]), f"<= {GOAL_RATIO:g}x",
                     _mark(r["ratio_ok"])))
        parts = ", ".join(f"{k} {v:.2f}" for k, v in r["git_parts_seconds"].items() if k != "apply" or s["apply"])
        rows.append((f"    git baseline parts (s, medians): {parts}", "", "", "", "", ""))
        rows.append((f".conductor/ growth per run (max of {len(r['runs'])})", _mb(r["growth_bytes"]), "", "",
                     f"<= {_mb(GOAL_GROWTH_BYTES)}", _mark(r["growth_ok"])))
        rows.extend(_run_rows(r))
    st = doc.get("steps")
    if st:
        n = st["steps"]
        rows.append((f"per-step overhead, 1 fork x {n} chained one-file steps: audit log = mean step.merged to "
                     f"step.merged - git's command time / {n}; beside it", "", "", "", "", ""))
        rows.append((f"  overhead = ({n}-step plan - git) / {n} and marginal = ({n}-step plan - 1-step plan) / {n - 1} - "
                     f"git's command time / {n}; medians of the rounds'", "", "", "", "", ""))
        for size in st["sizes"]:
            rows.append((f"  {size['files']:,} files: audit log {_s(size['audit_overhead_per_step_seconds'])}/step "
                         f"(overhead {_s(size['overhead_per_step_seconds'])}, "
                         f"marginal {_s(size['marginal_overhead_per_step_seconds'])})",
                         _s(size["conductor_seconds"]), _s(size["git_seconds"]), _x(size["ratio"]), "", ""))
            rows.append((f"    1-step plan {_s(size['conductor_one_step_seconds'])}; .conductor/ "
                         f"+{_mb(size['growth_bytes'])} per run", "", "", "", "", ""))
            rows.extend(_run_rows(size))
        first, last = st["sizes"][0]["files"], st["sizes"][-1]["files"]
        rows.append((f"  audit-log overhead per step, {last:,} / {first:,} files", "", "", _x(st["audit_flatness_ratio"]),
                     f"<= {GOAL_FLAT:g}x", _mark(st["audit_flatness_ok"])))
        rows.append((f"    the same of overhead {_x(st['flatness_ratio'])}, of marginal "
                     f"{_x(st['marginal_flatness_ratio'])} (diagnostics; - when not both positive)", "", "", "", "", ""))
    waited = sum(x.get("settle_waited_seconds", 0) for x in [r or {}] + list((st or {}).get("sizes", [])))
    rows.append((f"waited for the file system before timed runs: {waited:.0f} s in all (not timed); creating "
                 f"500 files took {doc['fs_probe_reference_seconds'] * 1000:.0f} ms at best", "", "", "", "", ""))
    lines += _table(rows)
    if doc["failures"]:
        lines += ["", "FAILED:"] + [f"  {f}" for f in doc["failures"]]
    return "\n".join(lines)


def _run_rows(result: Mapping[str, Any]) -> list[tuple[str, ...]]:
    if len(result["runs"]) < 2:
        return []
    def each(key: str) -> str:
        return ", ".join(f"{r[key]['seconds']:.2f}" for r in result["runs"])
    one = f"; conductor 1 step {each('conductor_one_step')}" if "conductor_one_step" in result["runs"][0] else ""
    rows = [(f"    each run (s): conductor {each('conductor')}; git {each('git')}{one}", "", "", "", "", "")]
    if "overhead_per_step_each" in result:
        figures = [f"{name} " + ", ".join("-" if x is None else f"{x:.2f}" for x in result[key] or [])
                   for name, key in (("overhead", "overhead_per_step_each"), ("marginal", "marginal_overhead_per_step_each"),
                                     ("audit log", "audit_overhead_per_step_each"))]
        rows.append((f"    each round (s/step): {'; '.join(figures)}", "", "", "", "", ""))
    return rows


def _table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    full = [row for row in rows if any(row[1:])]
    widths = [max(len(row[i]) for row in full) for i in range(len(rows[0]))]
    out = []
    for row in rows:
        if not any(row[1:]):
            out.append(row[0])
            continue
        out.append("  ".join(cell.ljust(widths[i]) if i in (0, 4, 5) else cell.rjust(widths[i])
                             for i, cell in enumerate(row)).rstrip())
    return out


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
    return value


def _sizes(text: str) -> list[int]:
    sizes = [_positive(part.strip()) for part in text.split(",")]
    if sizes != sorted(set(sizes)):
        raise argparse.ArgumentTypeError(f"{text!r}: give distinct sizes, smallest first, such as 1000,10000,50000")
    return sizes


def _sections(text: str) -> list[str]:
    chosen = [part.strip() for part in text.split(",")]
    unknown = [part for part in chosen if part not in SECTIONS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    return chosen


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--source", choices=("django", "generated"), default="django",
                        help="repository of figures 1-2: the Django 5.1.4 sdist (default) or a generated tree")
    parser.add_argument("--files", type=_positive, default=None,
                        help="files of the generated tree (only with --source generated; default 6809, Django's)")
    parser.add_argument("--min-mb", type=int, default=GOAL_MB,
                        help=f"add history until the repository uses this many MB (default {GOAL_MB}; 0: none)")
    parser.add_argument("--sizes", type=_sizes, default=[1_000, 10_000, 50_000],
                        help="files of the per-step overhead repositories (default 1000,10000,50000)")
    parser.add_argument("--steps", type=_positive, default=5,
                        help="chained steps of the per-step plan (default 5)")
    parser.add_argument("--repeat", type=_positive, default=3, help="runs of each timing; the median (default 3)")
    parser.add_argument("--apply", action="store_true",
                        help="let Conductor apply the winner, and git apply fork 1's patch (default: --no-apply)")
    parser.add_argument("--only", type=_sections, default=list(SECTIONS),
                        help=f"run only these sections, comma-separated (default {','.join(SECTIONS)})")
    parser.add_argument("--cache", type=Path, default=Path("~/.cache/conductor-bench"),
                        help="where the sdist is kept between runs (default ~/.cache/conductor-bench)")
    parser.add_argument("--conductor", type=Path, default=Path(sys.executable).parent / "conductor",
                        help="the conductor command (default: the one beside this Python)")
    parser.add_argument("--timeout", type=_positive, default=3600, help="seconds per conductor run (default 3600)")
    parser.add_argument("--settle", type=float, default=120,
                        help="before each timed run, sync, then wait up to this many seconds until creating files is at most "
                             "twice as slow as at its fastest so far (default 120; 0: never wait)")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (its path is printed on stderr)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    args = parser.parse_args(argv)
    if args.files is not None and args.source != "generated":
        parser.error("--files: only with --source generated (the Django sdist has its own files)")
    args.files = args.files or 6_809
    if args.settle < 0:
        parser.error("--settle: must be 0 or more")
    if args.min_mb < 0:
        parser.error("--min-mb: must be 0 or more")
    if args.steps < 2:
        parser.error("--steps: at least 2 (the marginal overhead compares the plan with its first step)")
    if "steps" in args.only and min(args.sizes) < args.steps:
        parser.error(f"--sizes: every size must hold at least --steps ({args.steps}) files")
    if not (args.conductor.is_file() and os.access(args.conductor, os.X_OK)):
        parser.error(f"--conductor: {args.conductor} is not an executable file")
    args.cache = args.cache.expanduser()
    args.conductor = args.conductor.resolve() if args.conductor.is_absolute() else args.conductor.absolute()
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="conductor-repo-bench-"))
    log(f"temp dir {tmp}")
    try:
        env = bench_environ(tmp / "home")
        doc: dict[str, Any] = {"machine": machine(tmp, env), "conductor": conductor_info(args.conductor, env),
                               "settings": {"source": args.source, "files": args.files, "min_mb": args.min_mb,
                                            "sizes": args.sizes, "steps": args.steps, "repeat": args.repeat,
                                            "apply": args.apply, "only": args.only}, "failures": []}
        m = doc["machine"]
        log(f"{m['cpus']} CPUs, load {m['load_average']}, Python {m['python']}, git {m['git']}, "
            f"{m['file_system']}; conductor {doc['conductor']['version']}")
        bench = Bench(conductor=args.conductor, work=tmp, env=env, repeat=args.repeat, apply=args.apply,
                      timeout=args.timeout, probe=FsProbe(tmp / "probes", args.settle), failures=doc["failures"])
        (tmp / "worktrees").mkdir()
        try:
            run_sections(args, bench, doc)
        except RunFailed as exc:
            doc["failures"].append(str(exc))
        doc["fs_probe_reference_seconds"] = bench.probe.reference
        doc["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        if args.keep:
            log(f"kept {tmp}")
        else:
            log(f"removing {tmp} ...")
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(doc, indent=2, allow_nan=False) if args.json else render(doc))
    return 1 if doc["failures"] else 0


def run_sections(args: argparse.Namespace, bench: Bench, doc: dict[str, Any]) -> None:
    """Build every repository first, then time: figures 1-2 (``repo``), then figure 3 (``steps``)."""
    repo = None
    if "repo" in args.only:
        log("building the repository ...")
        repo, doc["repository"] = build_main_repo(args, bench.work, bench.env)
        info = doc["repository"]
        log(f"repository: {info['files']:,} files, {_mb(info['disk_bytes'])} with .git, {info['commits']} commit(s)")
        init_conductor(bench.conductor, repo, bench.env)
    size_repos: dict[int, Path] = {}
    if "steps" in args.only:
        for files in args.sizes:
            log(f"building a repository of {files:,} files ...")
            size_repos[files] = bench.work / f"files-{files}"
            build_size_repo(size_repos[files], files, bench.env)
            init_conductor(bench.conductor, size_repos[files], bench.env)
    if repo is not None:
        doc["repo"] = repo_section(bench, repo, doc["repository"])
    if size_repos:
        doc["steps"] = steps_section(bench, size_repos, args.steps)


if __name__ == "__main__":
    raise SystemExit(main())
