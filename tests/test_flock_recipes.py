"""The Node.js fork-lock recipe of docs/protocol.md (6.5) excludes Conductor's own ``fork_lock``, both ways.

The recipe is extracted from the doc and run by a real ``node`` process; Conductor's side is
``conductor.handoff.lease.fork_lock`` in this process or in a child Python process. Only generous bounds
on waiting: "not yet" is proved by a non-blocking probe of the lock, never by a clock.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conductor.fsutil import flocked
from conductor.handoff.lease import fork_lock
from conductor.layout import ProjectLayout

PROTOCOL = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"

NODE = shutil.which("node")
FLOCK = shutil.which("flock")
pytestmark = [
    pytest.mark.skipif(NODE is None, reason="node is not installed (the recipe under test is JavaScript)"),
    pytest.mark.skipif(FLOCK is None, reason="flock(1) of util-linux is not installed (the Node recipe runs it)"),
]
WAIT = 60.0

# Appended to the documented recipe: hold the lock until a line arrives on stdin, reporting each stage.
HOLD_DRIVER = """
withForkLock(process.argv[2], async () => {
  console.log("in");
  await new Promise((resolve) => process.stdin.once("data", resolve));
  process.stdin.pause();  // let the event loop end
  console.log("leaving");
}).then(() => console.log("released"), (err) => { console.error(String(err)); process.exit(3); });
"""

# Appended to the recipe: say it is about to wait, then take the lock once and leave.
TAKE_DRIVER = """
console.log("trying");
withForkLock(process.argv[2], async () => console.log("in"))
  .then(() => console.log("released"), (err) => { console.error(String(err)); process.exit(3); });
"""


class Lines:
    """A child's stdout lines, read by a thread so the test can wait for one with a bound."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc, self.lines, self.seen = proc, queue.Queue[str](), []
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def expect(self, wanted: str, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while wanted not in self.seen:
            left = deadline - time.monotonic()
            if left <= 0 or (self.proc.poll() is not None and self.lines.empty()):
                err = self.proc.stderr.read() if self.proc.stderr and self.proc.poll() is not None else ""
                raise AssertionError(f"no {wanted!r} from the child (saw {self.seen}; exit {self.proc.poll()}; {err})")
            try:
                self.seen.append(self.lines.get(timeout=min(left, 0.2)))
            except queue.Empty:
                continue

    def drain(self) -> list[str]:
        while True:
            try:
                self.seen.append(self.lines.get_nowait())
            except queue.Empty:
                return self.seen


def finish(proc: subprocess.Popen[str] | None, lines: Lines | None = None) -> None:
    """Kill ``proc`` if it still runs, reap it and close its pipes (filterwarnings=error sees leaks)."""
    if proc is None:
        return
    if proc.poll() is None:
        proc.kill()
    proc.wait(WAIT)
    if lines is not None:
        lines.thread.join(WAIT)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def recipe() -> str:
    """The code block after ``<!-- flock-node -->`` in docs/protocol.md (indented in a list item), dedented."""
    text = PROTOCOL.read_text("utf-8")
    match = re.search(r"^( *)<!-- flock-node -->\n\1```js\n(.*?)\n\1```\n", text, re.S | re.M)
    assert match, "no js block after <!-- flock-node --> in docs/protocol.md"
    indent = match.group(1)
    lines = match.group(2).split("\n")
    assert all(line.startswith(indent) or not line.strip() for line in lines)
    return "\n".join(line[len(indent):] for line in lines)


def fork_dir(tmp_path: Path):  # type: ignore[no-untyped-def]
    fork = ProjectLayout(tmp_path).fork("20261122T100000-3fa2", "1")
    fork.dir.mkdir(parents=True)
    return fork


def start_node(tmp_path: Path, driver: str, fork_path: Path) -> tuple[subprocess.Popen[str], Lines]:
    script = tmp_path / "lock.js"
    script.write_text(recipe() + "\n" + driver, "utf-8")
    proc = subprocess.Popen([NODE, str(script), str(fork_path)], stdin=subprocess.PIPE,  # type: ignore[list-item]
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, Lines(proc)


def held_by_someone(lock: Path) -> bool:
    try:
        with flocked(lock, timeout=0.05):
            return False
    except TimeoutError:
        return True


def test_the_recipe_is_the_one_documented() -> None:
    code = recipe()
    assert 'spawn("flock", ["-x"' in code and "echo locked; exec cat >/dev/null" in code
    assert "holder.stdin.end()" in code


def test_conductor_waits_while_node_holds_the_lock(tmp_path: Path) -> None:
    fork = fork_dir(tmp_path)
    node, node_out = start_node(tmp_path, HOLD_DRIVER, fork.dir)
    waiter = waiter_out = None
    try:
        node_out.expect("in")
        assert held_by_someone(fork.dir / ".lock"), "Node says it holds the lock, but flock(2) is free"
        # Conductor's own fork_lock, in a separate process, blocks in the kernel until Node lets go.
        waiter = subprocess.Popen(
            [sys.executable, "-c",
             "import sys\nfrom pathlib import Path\nfrom conductor.layout import ProjectLayout\n"
             "from conductor.handoff.lease import fork_lock\n"
             "fork = ProjectLayout(Path(sys.argv[1])).fork(sys.argv[2], sys.argv[3])\n"
             "print('trying', flush=True)\nwith fork_lock(fork):\n    print('got', flush=True)\n",
             str(tmp_path), fork.plan_id, fork.fork_id],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        waiter_out = Lines(waiter)
        waiter_out.expect("trying")
        assert held_by_someone(fork.dir / ".lock")
        assert "got" not in waiter_out.drain(), "fork_lock was granted while Node held the lock"
        assert node.stdin is not None
        node.stdin.write("release\n")
        node.stdin.flush()
        waiter_out.expect("got")
        node_out.expect("released")
        assert node_out.seen.index("leaving") < node_out.seen.index("released")
        assert waiter.wait(WAIT) == 0
        assert node.wait(WAIT) == 0, node.stderr.read() if node.stderr else ""
    finally:
        finish(node, node_out)
        finish(waiter, waiter_out)


def test_node_waits_while_conductor_holds_the_lock(tmp_path: Path) -> None:
    fork = fork_dir(tmp_path)
    with fork_lock(fork):
        node, node_out = start_node(tmp_path, TAKE_DRIVER, fork.dir)
        try:
            node_out.expect("trying")
            # flock(1) has started or is about to: whatever it reached, it cannot be inside.
            time.sleep(0.5)
            assert "in" not in node_out.drain(), "Node entered its critical section while Conductor held the lock"
            assert node.poll() is None
        except BaseException:
            finish(node, node_out)
            raise
    try:
        node_out.expect("in")
        node_out.expect("released")
        assert node.wait(WAIT) == 0, node.stderr.read() if node.stderr else ""
        with flocked(fork.dir / ".lock", timeout=WAIT):
            pass  # released for good
    finally:
        finish(node, node_out)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_a_killed_node_executor_releases_the_lock(tmp_path: Path) -> None:
    fork = fork_dir(tmp_path)
    node, node_out = start_node(tmp_path, HOLD_DRIVER, fork.dir)
    try:
        node_out.expect("in")
        assert held_by_someone(fork.dir / ".lock")
        os.kill(node.pid, signal.SIGKILL)  # the pipe to cat closes: cat and flock exit, the lock goes
        node.wait(WAIT)
        with flocked(fork.dir / ".lock", timeout=WAIT):
            pass
    finally:
        finish(node, node_out)
