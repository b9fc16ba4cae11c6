"""Random chains of steps, each a contained command of random file operations, captured with the change
feed: each step's tree must be exactly what is on disk, and the folder's next reset must hold exactly the
step's commit. The operations include the hard ones: folders renamed, removed and turned into files, mode
changes, symlinks, writes through a memory map, same-size rewrites with the mtime put back, more paths than
a feed hands out, files created and removed in one step. Real bubblewrap, real inotify.

``CONDUCTOR_FEED_SEEDS`` (e.g. ``1-40``) and ``CONDUCTOR_FEED_STEPS`` widen the run; a failure names its
seed, which reproduces it."""

from __future__ import annotations

import hashlib
import os
import random
import stat
from pathlib import Path

import pytest

from conductor import sandbox
from conductor.proc import run_command
from conductor.workspace import feed
from conductor.workspace.checkout import capture, reset
from tests.workspace.test_feed import fed_checkout

if sandbox.availability() is not None or not feed.available():
    if os.environ.get("CONDUCTOR_TEST_REQUIRE_SANDBOX") == "1":
        raise RuntimeError(f"CONDUCTOR_TEST_REQUIRE_SANDBOX=1 but {sandbox.availability() or 'no change feed here'}")
    pytest.skip("no sandbox or no change feed here", allow_module_level=True)

_first, _, _last = os.environ.get("CONDUCTOR_FEED_SEEDS", "1-3").partition("-")
SEEDS = range(int(_first), int(_last or _first) + 1)
STEPS = int(os.environ.get("CONDUCTOR_FEED_STEPS", "25"))


def on_disk(folder: Path) -> dict[str, tuple[str, str]]:
    """Path -> (git mode, blob id) of every file and symlink under ``folder`` but its top ``.git``."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        rel = os.path.relpath(dirpath, folder)
        if rel == ".":
            dirnames[:] = [d for d in dirnames if d != ".git"]
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            full, path = os.path.join(dirpath, name), os.path.normpath(os.path.join(rel, name))
            info = os.lstat(full)
            if stat.S_ISLNK(info.st_mode):
                data, mode = os.fsencode(os.readlink(full)), "120000"
            else:
                data, mode = Path(full).read_bytes(), "100755" if info.st_mode & stat.S_IXUSR else "100644"
            found[path] = (mode, hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest())
    return found


def operation(rng: random.Random, folder: Path) -> str:
    """One random shell operation on what ``folder`` holds now."""
    entries = [p for p in folder.rglob("*") if ".git" not in p.relative_to(folder).parts and not p.is_symlink()]
    files = sorted(str(p.relative_to(folder)) for p in entries if p.is_file())
    folders = sorted(str(p.relative_to(folder)) for p in entries if p.is_dir())
    f, d, n = rng.choice(files) if files else "x.txt", rng.choice(folders) if folders else ".", f"n{rng.randint(0, 999)}"
    choices = [
        f"echo {n} >> '{f}'", f"rm -f '{f}'", f"echo {n} > '{d}/{n}.txt'",
        f"mkdir -p '{d}/{n}/deep' && echo x > '{d}/{n}/deep/{n}.py' && echo y > '{d}/{n}/top.py'",
        f"chmod +x '{f}'", f"ln -sf ../x '{d}/{n}.lnk'", f"rm -rf '{d}'" if d != "." else "true",
        f"mv '{f}' '{d}/{n}.moved'", f"mv '{d}' '{d}.renamed'" if d != "." else "true",
        f"python3 -c \"import mmap, os; fd = os.open('{f}', os.O_RDWR); s = os.fstat(fd).st_size; "
        f"m = mmap.mmap(fd, s) if s else None; os.close(fd); m and m.__setitem__(0, 65)\"",
        f"truncate -s 0 '{f}'", f"for i in $(seq 70); do echo $i > '{d}/many$i'; done",
        f"rm -f '{f}' && mkdir -p '{f}' && echo z > '{f}/inner'", f"echo t > '{d}/t{n}' && rm '{d}/t{n}'",
        f"touch -d @1000000000 '{f}'",
        f"python3 -c \"import os; s = os.stat('{f}'); open('{f}', 'r+b').write(b'Q'); "
        f"os.utime('{f}', ns=(s.st_atime_ns, s.st_mtime_ns))\"",
        f"touch '{f}'",
    ]
    return rng.choice(choices)


@pytest.mark.parametrize("seed", SEEDS)
def test_a_random_chain_of_steps_is_captured_exactly(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    store, commit, folder = fed_checkout(tmp_path, {f"d{i % 4}/s{i % 3}/f{i}.txt": f"file {i}\n" for i in range(30)})
    excludes = store.exclude_file([])
    spec = sandbox.SandboxSpec(writable=(folder,), mode="required")
    told = 0
    for step in range(STEPS):
        ops = [operation(rng, folder) for _ in range(rng.randint(1, 4))]
        if any("os.utime" in op for op in ops):
            # Not with what makes this step's capture a full pass (a renamed folder, more than 64 paths): a
            # same-size rewrite in the second its entry was cached, an old mtime put back, is beyond git's
            # whole-second stat data (docs/architecture.md); the feed is what sees it.
            ops = ["true" if op.endswith(".renamed'") or "many$i" in op else op for op in ops]
        command = " ; ".join(ops)
        assert run_command(command, cwd=folder, timeout_seconds=60, shell=True, sandbox=spec).contained
        feed.vouch(folder)
        only = feed.changes(folder)
        told += only is not None
        tree = capture(store, folder, excludes=excludes, only=only)

        captured = {path: (entry.mode, entry.oid) for path, entry in store.entries(tree).items()}
        assert captured == on_disk(folder), f"seed {seed}, step {step}: {command}"
        commit = store.commit(tree, [commit], f"step {step}\n")
        reset(store, folder, commit, holds=tree, only=feed.changes(folder))
        assert feed.rearm(folder)
        assert captured == on_disk(folder), f"seed {seed}, step {step}: the reset changed the folder"
    assert told >= STEPS // 2  # the feed answered most steps (a rename or an overflow makes it lost)
