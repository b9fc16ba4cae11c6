"""The change feed tells git which paths a contained command wrote, and its answer is what a full stat
pass finds, whatever the command does to hide a write: a same-size edit with its mtime put back, a write
through a memory map after the file was closed, a second name for a file, a renamed folder, more events
than the kernel queues, a nested repository. A run it cannot vouch for ends the feed. Real bubblewrap,
real processes, real inotify (CI installs bubblewrap and sets CONDUCTOR_TEST_REQUIRE_SANDBOX=1)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from conductor import sandbox
from conductor.attempts import prepare_retry, prepare_workspace, state_store
from conductor.errors import UnsafePath
from conductor.executors.base import execute_claim
from conductor.executors.command import CommandRunner
from conductor.handoff.lease import Claim, claim_task
from conductor.models import PolicyLayer
from conductor.policy import merge_policies
from conductor.workspace import checkout, feed, sealed
from conductor.proc import run_command
from conductor.workspace.checkout import capture, materialize, reset
from conductor.workspace.store import StateStore, TreeEntry
from tests.handoff.support import Handoff, make_handoff
from tests.corpus.builders import HOLDER, verify
from tests.helpers.git_calls import record_git_calls, stat_passes

if sandbox.availability() is not None or not feed.available():
    if os.environ.get("CONDUCTOR_TEST_REQUIRE_SANDBOX") == "1":
        raise RuntimeError(f"CONDUCTOR_TEST_REQUIRE_SANDBOX=1 but {sandbox.availability() or 'no change feed here'}")
    pytest.skip("no sandbox or no change feed here", allow_module_level=True)

IGNORE = ["__pycache__/"]
FILES = {"README.md": "hello\n", "src/app.py": "print('app')\n", "src/lib/util.py": "X = 1\n", "docs/a.txt": "a\n"}


@pytest.fixture
def handoff(tmp_path: Path) -> Handoff:
    return make_handoff(tmp_path / "project", steps=2, files=FILES,
                        allowed_files=("README.md", "src/**", "docs/**", "new/**", "moved/**", "f*", "g*"))


def run(handoff: Handoff, command: str, *, mode: str = "required", task_id: str = "step_001",
        status: str = "completed", error: str = "", publish: bool = True) -> tuple[Path, Claim]:
    """Publish ``task_id`` (unless it is) and run ``command`` on it in this process, as the engine's own
    executor does: the attempt's folder and the claim."""
    if publish:
        handoff.publish(task_id, sandbox_mode=mode)
    claim = claim_task(handoff.fork, task_id, holder=HOLDER, lease_seconds=60)
    assert claim is not None
    result = execute_claim(handoff.layout, claim, CommandRunner(command, layout=handoff.layout), ignore=IGNORE,
                           lease_seconds=60, heartbeat_seconds=20)
    assert result is not None and result.status == status, result
    assert error in (result.error.message if result.error else ""), result
    return handoff.scratch(task_id), claim


def captures(handoff: Handoff, folder: Path) -> tuple[str | None, str]:
    """What the run's capture found (sealed right after it), and what a full stat pass finds now."""
    store = state_store(handoff.layout)
    excludes = store.exclude_file(IGNORE)
    return sealed.sealed_tree(folder, excludes), capture(store, folder, excludes=excludes)


def recycle(handoff: Handoff, claim: Claim) -> Path:
    """Verify the claimed attempt (its folder is then idle) and publish step_002, which recycles the folder."""
    verdict = verify(handoff, claim, ignore=IGNORE)
    task = handoff.publish("step_002", sandbox_mode="required")
    folder = handoff.root / task.workspace
    # Exactly the new base (which holds step_001's change if it was accepted), as a full pass sees it.
    store = state_store(handoff.layout)
    assert capture(store, folder, excludes=store.exclude_file([])) == store.tree_of(task.base_commit)
    assert task.base_commit == (verdict.commit if verdict.accepted else claim.task.base_commit)
    return folder


def fed_checkout(tmp_path: Path, files: dict[str, str]) -> tuple[StateStore, str, Path]:
    """A project of ``files``, its snapshot commit checked out into a fresh folder with a change feed:
    ``(store, commit, folder)``."""
    root = tmp_path / "project"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    store = StateStore(root, root / ".conductor").ensure()
    commit = store.snapshot_project(ignore=[], message="base\n")
    folder = tmp_path / "ws"
    materialize(store, commit, folder)
    assert feed.start(folder)
    return store, commit, folder


def listings(calls: list[list[str]]) -> list[list[str]]:
    return [args for args in calls if args[0] == "ls-files"]


def test_git_looks_only_at_what_the_command_wrote_and_finds_what_a_full_pass_finds(handoff, monkeypatch) -> None:
    calls = record_git_calls(monkeypatch)
    folder, claim = run(handoff, "echo two >> README.md && mkdir -p new/deep && echo n > new/deep/n.py && rm docs/a.txt"
                          " && mkdir __pycache__ && echo c > __pycache__/x.pyc")

    # The capture's one look, at what may hold untracked files: not the edited file, not the deleted one.
    assert listings(calls)[-1][-3:] == ["--", ":(literal)__pycache__", ":(literal)new"]
    assert sealed.sealed_tree(folder, state_store(handoff.layout).exclude_file(IGNORE)) is not None
    calls.clear()

    second = recycle(handoff, claim)  # the verifier reuses the seal; the reset, too, looks only there

    assert stat_passes(calls)[:1] == [["ls-files", "-z", "-m", "-o", "--exclude-from=" + str(state_store(
        handoff.layout).exclude_file([]))]]  # only recycle()'s own full look: the verifier used the seal
    assert [args[5:] for args in listings(calls) if "-t" in args] == [["--", ":(literal)__pycache__", ":(literal)new"]]
    assert (second / "README.md").read_text() == "hello\ntwo\n" and (second / "new/deep/n.py").is_file()


def test_an_edit_of_tracked_files_asks_git_for_no_listing(handoff, monkeypatch) -> None:
    calls = record_git_calls(monkeypatch)
    folder, claim = run(handoff, "echo two >> README.md && echo x > src/app.py && echo t > tmp && rm tmp")

    assert listings(calls) == []  # tracked files stay files, and what came and went is not there
    told, full = captures(handoff, folder)
    assert told == full and told is not None
    store = state_store(handoff.layout)
    assert [c.path for c in store.changes(store.tree_of(handoff.head), told)] == ["README.md", "src/app.py"]
    calls.clear()

    second = recycle(handoff, claim)
    assert [args for args in listings(calls) if "-t" in args] == []  # the reset, too, lists nothing
    assert (second / "README.md").read_text() == "hello\ntwo\n"


def test_a_same_size_rewrite_with_its_mtime_put_back_is_seen(handoff) -> None:
    folder, claim = run(handoff, "python3 -c \"import os; s = os.stat('src/app.py'); "
                          "open('src/app.py', 'w').write(\\\"print('APP')\\n\\\"); "
                          "os.utime('src/app.py', ns=(s.st_atime_ns, s.st_mtime_ns))\"")

    told, full = captures(handoff, folder)

    assert told == full and told is not None
    store = state_store(handoff.layout)
    assert [c.path for c in store.changes(store.tree_of(handoff.head), told)] == ["src/app.py"]


def test_a_write_through_a_memory_map_after_close_is_seen(handoff) -> None:
    folder, claim = run(handoff, "python3 -c \"import mmap, os; fd = os.open('src/lib/util.py', os.O_RDWR); "
                          "m = mmap.mmap(fd, 6); os.close(fd); m[4:5] = b'9'; m.flush()\"")

    told, full = captures(handoff, folder)

    assert (folder / "src/lib/util.py").read_text() == "X = 9\n"
    assert told == full and told is not None
    store = state_store(handoff.layout)
    assert [c.path for c in store.changes(store.tree_of(handoff.head), told)] == ["src/lib/util.py"]


def test_a_second_name_for_a_file_cannot_be_made(handoff) -> None:
    # The hidden write: a link in a new folder (whose files no watch covers yet), written, then removed.
    folder, claim = run(handoff, "mkdir new; ln README.md new/alias; echo ln=$? > new/log; "
                          "python3 -c \"import os; os.link('src/app.py', 'new/alias2')\" 2> new/py.log; "
                          "echo hidden >> new/alias; rm -f new/alias new/alias2")

    told, full = captures(handoff, folder)

    assert (folder / "new/log").read_text() == "ln=1\n" and "Invalid cross-device link" in (folder / "new/py.log").read_text()
    assert (folder / "README.md").read_text() == "hello\n" and (folder / "src/app.py").read_text() == "print('app')\n"
    assert told == full


def test_a_renamed_folder_makes_the_feed_lost_and_the_pass_full(handoff, monkeypatch) -> None:
    calls = record_git_calls(monkeypatch)
    folder, claim = run(handoff, "mv src moved && echo more >> moved/app.py")

    assert "--" not in listings(calls)[-1]  # no pathspec: a full pass
    told, full = captures(handoff, folder)
    assert told == full

    second = recycle(handoff, claim)  # rearmed: the whole tree is watched afresh

    assert (second / "moved/app.py").read_text() == "print('app')\nmore\n" and not (second / "src").exists()
    assert feed.changes(second) is None  # armed, not yet vouched for by a run
    run(handoff, "echo again >> moved/lib/util.py", task_id="step_002", publish=False)
    assert feed.changes(second) == ["moved/lib/util.py"]


def test_more_events_than_the_kernel_queues_makes_the_pass_full(handoff, monkeypatch) -> None:
    queued = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    rounds = queued // 4 + 100  # each round: two appends, each a modify and a close-write, never merged
    calls = record_git_calls(monkeypatch)
    folder, claim = run(handoff, f"i=0; while [ $i -lt {rounds} ]; do echo $i >> f1; echo $i >> g1; i=$((i+1)); done")

    assert "--" not in listings(calls)[-1]
    told, full = captures(handoff, folder)
    assert told == full and feed.changes(folder) is None


def test_a_nested_repository_is_refused_as_by_a_full_pass(handoff) -> None:
    folder, claim = run(handoff, "mkdir -p src/inner && git init -q src/inner && echo x > src/inner/x", status="failed",
                 error="nested git repository")

    assert feed.changes(folder) == ["src/inner"]  # the capture looked there only, and refused it as a full pass does
    with pytest.raises(UnsafePath, match="nested git repository"):
        capture(state_store(handoff.layout), folder, excludes=state_store(handoff.layout).exclude_file(IGNORE))


def test_an_uncontained_run_ends_the_feed(handoff, monkeypatch) -> None:
    folder, claim = run(handoff, "echo two >> README.md", mode="off")
    assert feed.changes(folder) is None
    calls = record_git_calls(monkeypatch)

    second = recycle(handoff, claim)

    assert ["--" in args for args in listings(calls)][:2] == [False, False]  # the verifier and the reset: full passes
    run(handoff, "echo three >> README.md", task_id="step_002", publish=False)
    assert feed.changes(second) is None  # and the folder never gets a feed again


def test_an_unsandboxed_verification_command_ends_the_feed(handoff, monkeypatch) -> None:
    folder, claim = run(handoff, "echo two >> README.md")
    unsandboxed = merge_policies([("project", PolicyLayer.model_validate({"sandbox": {"mode": "off"}}))])

    verdict = verify(handoff, claim, merged=unsandboxed, ignore=IGNORE, commands=("echo late >> docs/a.txt",))

    assert verdict.accepted and not verdict.verification[0].sandboxed
    assert feed.changes(folder) is None  # what it started might still write, unseen: the feed is over
    calls = record_git_calls(monkeypatch)
    task = handoff.publish("step_002", sandbox_mode="required")
    assert "--" not in listings(calls)[0]  # so the reset looked at every file
    assert (handoff.root / task.workspace / "docs/a.txt").read_text() == "a\n"


def test_every_kind_of_change_is_captured_as_a_full_pass_captures_it(handoff, monkeypatch) -> None:
    calls = record_git_calls(monkeypatch)
    folder, _claim = run(handoff, "rm -r src/lib && echo now-a-file > src/lib; "  # a folder becomes a file
                                  "rm docs/a.txt && mkdir docs/a.txt && echo in > docs/a.txt/inner; "  # and the reverse
                                  "ln -s ../README.md docs/link; chmod +x src/app.py; "  # a symlink, a mode
                                  "mkdir -p new/x/y && echo deep > new/x/y/z.py; rm README.md")

    assert "--" in listings(calls)[-1] and "write-tree" not in [args[0] for args in calls]  # told, tree edited
    told, full = captures(handoff, folder)
    assert told == full
    store = state_store(handoff.layout)
    assert sorted(store.entries(told)) == ["docs/a.txt/inner", "docs/link", "new/x/y/z.py", "src/app.py", "src/lib"]
    assert store.entries(told)["src/app.py"].mode == "100755" and store.entries(told)["docs/link"].mode == "120000"


def test_a_write_under_a_submodule_is_left_to_the_full_pass(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "project"
    (root / "src").mkdir(parents=True)
    (root / "src/app.py").write_text("x\n")
    store = StateStore(root, root / ".conductor").ensure()
    base = store.tree_of(store.snapshot_project(ignore=[], message="base\n"))
    with_submodule = store._tree_with(base, {"vendor/lib": TreeEntry("160000", "1" * 40)})
    commit = store.commit(with_submodule, [], "a submodule\n")
    folder = tmp_path / "ws"
    materialize(store, commit, folder)
    assert feed.start(folder) and (folder / "vendor/lib").is_dir()
    (folder / "vendor/lib/new.txt").write_text("inside\n")
    (folder / "src/app.py").write_text("y\n")
    feed.vouch(folder)
    calls = record_git_calls(monkeypatch)

    excludes = store.exclude_file([])
    told = capture(store, folder, excludes=excludes, only=feed.changes(folder))

    assert feed.changes(folder) == ["src/app.py", "vendor/lib/new.txt"]
    assert "--" not in listings(calls)[0]  # a full pass
    assert told == capture(store, folder, excludes=excludes)
    assert store.entries(told)["vendor/lib"] == TreeEntry("160000", "1" * 40)


def test_a_same_size_rewrite_in_the_second_its_entry_was_cached_is_seen(tmp_path: Path) -> None:
    # git compares whole seconds of stat data: a file captured in second S, rewritten in S with the same size
    # and its mtime put back, looks unchanged to update-index. The feed saw the write: it must be hashed.
    store, commit, folder = fed_checkout(tmp_path, {"f.txt": "base\n"})
    excludes = store.exclude_file([])
    spec = sandbox.SandboxSpec(writable=(folder,), mode="required")
    for _attempt in range(5):
        time.sleep(1.02 - time.time() % 1)  # at the start of a second: both steps fit in it
        # An old mtime: git content-checks an entry as new as its cache file ("racily clean"), not this one.
        assert run_command("echo AAAA > f.txt && touch -d @1000000000 f.txt", cwd=folder, timeout_seconds=30,
                           shell=True, sandbox=spec).contained
        feed.vouch(folder)
        first = capture(store, folder, excludes=excludes, only=feed.changes(folder))
        reset(store, folder, store.commit(first, [commit], "a\n"), holds=first, only=feed.changes(folder))
        assert feed.rearm(folder)
        cached = os.stat(folder / "f.txt")
        assert run_command("python3 -c \"import os; s = os.stat('f.txt'); open('f.txt', 'r+b').write(b'BBBB'); "
                           "os.utime('f.txt', ns=(s.st_atime_ns, s.st_mtime_ns))\"", cwd=folder, timeout_seconds=30,
                           shell=True, sandbox=spec).contained
        now = os.stat(folder / "f.txt")
        feed.vouch(folder)
        second = capture(store, folder, excludes=excludes, only=feed.changes(folder))
        assert store.read_blobs([store.entries(second)["f.txt"].oid]) == {
            store.entries(second)["f.txt"].oid: b"BBBB\n"}
        if (now.st_size, now.st_mtime_ns // 10**9, now.st_ctime_ns // 10**9) == (
                cached.st_size, cached.st_mtime_ns // 10**9, cached.st_ctime_ns // 10**9):
            return  # the case that matters happened, and the change was seen
        reset(store, folder, store.commit(second, [commit], "b\n"), holds=second, only=feed.changes(folder))
        assert feed.rearm(folder)
    pytest.fail("the rewrite never fell in the second of its cached entry (a slow machine?)")


def test_the_stat_cache_is_refreshed_behind_the_capture_and_kept_old_if_a_file_moved_meanwhile(
        tmp_path: Path, monkeypatch) -> None:
    store, commit, folder = fed_checkout(tmp_path, {"a.txt": "a\n", "b.txt": "b\n"})
    excludes = store.exclude_file([])
    go_on = threading.Event()
    update = checkout._update_cache
    monkeypatch.setattr(checkout, "_update_cache", lambda *args: go_on.wait(30) and update(*args))
    (folder / "a.txt").write_text("A\n")
    feed.vouch(folder)
    index = checkout.index_file(folder)
    before = os.stat(index).st_ino

    tree = capture(store, folder, excludes=excludes, only=feed.changes(folder))

    refresh = checkout.refreshing(folder)
    assert refresh is not None and not refresh.done.is_set()  # the capture did not wait for the index
    assert store.read_blobs([store.entries(tree)["a.txt"].oid]) == {store.entries(tree)["a.txt"].oid: b"A\n"}
    # Something writes the folder before the cache is rewritten (a trusted feed rules it out; played here):
    (folder / "a.txt").write_text("AA\n")
    go_on.set()
    checkout.settle(folder)
    assert refresh.done.is_set() and refresh.installed is None and os.stat(index).st_ino == before
    assert checkout.index_tree(index) == store.tree_of(commit)  # the old cache, true to its own tree
    # A full pass against it finds the latest content, and a reset to the base restores it.
    full = capture(store, folder, excludes=excludes)
    assert store.read_blobs([store.entries(full)["a.txt"].oid]) == {store.entries(full)["a.txt"].oid: b"AA\n"}
    reset(store, folder, commit)
    assert (folder / "a.txt").read_text() == "a\n" and not list(tmp_path.glob(".tmp.*"))


def test_a_seal_follows_the_stat_cache_its_capture_refreshes(tmp_path: Path) -> None:
    store, commit, folder = fed_checkout(tmp_path, {"a.txt": "a\n"})
    excludes = store.exclude_file([])
    (folder / "a.txt").write_text("A\n")
    feed.vouch(folder)
    tree = capture(store, folder, excludes=excludes, only=feed.changes(folder))
    sealed.seal(folder, excludes, tree)

    checkout.settle(folder)
    assert checkout.refreshing(folder) is None and sealed.sealed_tree(folder, excludes) == tree
    assert checkout.index_tree(checkout.index_file(folder)) == tree
    os.utime(checkout.index_file(folder))  # anything else that touches the cache ends the seal
    assert sealed.sealed_tree(folder, excludes) is None


def watches() -> int:
    """The inotify watches this process holds (fdinfo(5))."""
    inotify = feed._get()
    assert inotify is not None
    lines = Path(f"/proc/self/fdinfo/{inotify.fd}").read_text().splitlines()
    return sum(line.startswith("inotify wd:") for line in lines)


def test_a_folder_for_an_external_executor_costs_no_watches(handoff) -> None:
    head = handoff.head
    plan, fork = handoff.plan.plan_id, handoff.fork.fork_id
    before = watches()
    external = prepare_workspace(handoff.layout, plan, fork, "step_001", 1, head, watch=False)
    assert watches() == before and feed.changes(external) is None
    here = prepare_workspace(handoff.layout, plan, fork, "step_002", 1, head)
    folders = 1 + sum(1 for p in here.rglob("*") if p.is_dir() and ".git" not in p.relative_to(here).parts)
    assert watches() == before + folders


def test_a_retry_is_watched_only_when_this_process_will_run_it(handoff) -> None:
    """A worker's retry, or one a ``conductor task`` command re-queues, may be claimed by any process (and
    a command's feed ends with it): no watches. The engine's own retries ask for a feed."""
    task = handoff.build_task("step_001")
    before = watches()
    elsewhere = prepare_retry(handoff.layout, task.model_copy(update={"attempt": 2}))
    assert watches() == before and feed.changes(handoff.root / elsewhere.workspace) is None
    here = handoff.root / prepare_retry(handoff.layout, task.model_copy(update={"attempt": 3}), watch=True).workspace
    feed.vouch(here)
    assert watches() > before and feed.changes(here) == []


def test_with_no_thread_to_be_had_the_stat_cache_is_rewritten_before_the_capture_returns(
        tmp_path: Path, monkeypatch) -> None:
    store, commit, folder = fed_checkout(tmp_path, {"a.txt": "a\n"})
    (folder / "a.txt").write_text("A\n")
    feed.vouch(folder)

    def refused(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", refused)
    tree = capture(store, folder, excludes=store.exclude_file([]), only=feed.changes(folder))

    assert checkout.refreshing(folder) is None
    assert checkout.index_tree(checkout.index_file(folder)) == tree != store.tree_of(commit)
