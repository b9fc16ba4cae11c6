"""Break one trust-critical check at a time and see whether the tests notice (a rerunnable mutation check).

Each mutation replaces one exact snippet of a module with a broken version (a check that always passes,
a comparison dropped) in a copy of the working tree, runs the tests named for it there, and reports
**killed** (a test failed: the guarantee is protected) or **SURVIVED** (every test still passed: nothing
protects it). The working tree itself is never modified.

    python tools/mutation_check.py              # all mutations
    python tools/mutation_check.py --only 1,4   # some of them
    python tools/mutation_check.py --list

Exit status: 0 when every mutation was killed, 1 when one survived, 2 when a snippet no longer exists
(the code moved on: update the table).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS = (
    Mutation("verifier accepts a provenance it rejected", "conductor/verifier.py",
             'if not provenance_check.passed and (settings.require_signatures or not provenance_check.detail.startswith("unsigned:")):',
             "if False:", ("tests/corpus/test_bad_provenance.py",)),
    Mutation("verifier drops the subject-digest comparison", "conductor/verifier.py",
             "if name != result_name and truth.get(name) != hex_digest]", "if False]",
             ("tests/corpus/test_bad_provenance.py",)),
    Mutation("verifier ignores the published task checksum", "conductor/verifier.py",
             "if published_checksum is not None and task.checksum != published_checksum:", "if False:",
             ("tests/corpus/test_bad_task_files.py", "tests/corpus/test_bad_results.py")),
    Mutation("recovery follows an apply intent without its checksum", "conductor/recovery.py",
             "        check_checksum(document, source=str(path))\n", "",
             ("tests/fault/test_recovery.py",)),
    Mutation("a stale holder may complete (holder not compared)", "conductor/handoff/lease.py",
             "(lease.fencing_token, lease.holder) != (claim.lease.fencing_token, claim.lease.holder)",
             "lease.fencing_token != claim.lease.fencing_token", ("tests/handoff/test_lease_holder.py",)),
    Mutation("protected patterns not enforced", "conductor/policy.py",
             "    protected_reasons = _protected(merged, safe)\n", "    protected_reasons = []\n",
             ("tests/test_policy.py", "tests/corpus/test_bad_workspaces.py")),
    Mutation("symlink names of protected paths not enforced", "conductor/policy.py",
             "    protected_reasons += [r for r in _protected_through_links(", "    protected_reasons += [r for r in [] or (",
             ("tests/corpus/test_bad_workspaces.py",)),
    Mutation("a re-sealed plan.json is trusted", "conductor/plan_store.py",
             "            if pinned != plan.checksum:", "            if False:", ("tests/e2e/test_pinning.py",)),
    Mutation("a loosened policy.yaml loosens a running plan", "conductor/plan_store.py",
             "    pinned = plan.project_policy if plan.project_policy is not None else project_now",
             "    pinned = project_now", ("tests/e2e/test_pinning.py",)),
    Mutation("capture loses the racy-git timestamp", "conductor/workspace/checkout.py",
             "    shutil.copy2(index, temp)", "    shutil.copyfile(index, temp)", ("tests/workspace/test_checkout.py",)),
    Mutation("capture honours the workspace's .gitignore", "conductor/workspace/checkout.py",
             'changed += split_z(git.run(["ls-files", "-z", "-o", f"--exclude-from={excludes}"]',
             'changed += split_z(git.run(["ls-files", "-z", "-o", "--exclude-standard", f"--exclude-from={excludes}"]',
             ("tests/workspace/test_checkout.py",)),
    Mutation("Conductor's git honours a planted fsmonitor", "conductor/workspace/git.py",
             '    "core.fsmonitor=false",\n', "", ("tests/workspace/test_checkout.py", "tests/workspace/test_store.py")),
    Mutation("the sandbox allows the network", "conductor/sandbox.py",
             '        args.append("--unshare-net")', "        pass", ("tests/test_sandbox.py",)),
    Mutation("the sandbox does not hide the keys", "conductor/sandbox.py",
             "    found = [p for p in spec.hidden if p.exists()]", "    found = []", ("tests/test_sandbox.py",)),
    Mutation("the project key is trusted for every executor", "conductor/keys.py",
             'OWN_IDENTITIES = ("conductor-engine@*", "llm:*", "conductor-verifier@*")', 'OWN_IDENTITIES = ("*",)',
             ("tests/test_keys.py",)),
    Mutation("a plan may switch the sandbox off", "conductor/policy.py",
             "if position == 0 or stricter(asked_mode, mode) == asked_mode != mode:", "if True:",
             ("tests/test_policy.py",)),
    Mutation("launched commands inherit the whole environment", "conductor/redact.py",
             "    allowed = BASE_NAMES | set(extra_names)\n    return {",
             "    allowed = BASE_NAMES | set(extra_names)\n    return dict(environ) or {", ("tests/test_redact.py",)),
    Mutation("verify ignores a task moved between folders", "conductor/verify.py",
             "        self.folders_agree_with_log(fork, seen)\n", "", ("tests/e2e/test_verify.py",)),
    Mutation("an attempt's late writes become the fork's (no capture before verification)", "conductor/verifier.py",
             "merged = tree if head_commit == task.base_commit else",
             "merged = attempt_changes(layout, workspace, task.base_commit, settings.ignore)[0] "
             "if head_commit == task.base_commit else",
             ("tests/e2e/test_git_workspaces.py",)),
)


def run(mutation: Mutation, python: str) -> tuple[str, float, str]:
    """Apply ``mutation`` to a copy of the tree and run its tests: ``("killed"|"SURVIVED"|"STALE", s, tail)``."""
    source = (REPO / mutation.path).read_text()
    if source.count(mutation.old) != 1:
        return "STALE", 0.0, f"snippet found {source.count(mutation.old)} times in {mutation.path}"
    with tempfile.TemporaryDirectory(prefix="conductor-mutant-") as temp:
        copy = Path(temp) / "repo"
        shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache"))
        (copy / mutation.path).write_text(source.replace(mutation.old, mutation.new))
        env = {**os.environ, "PYTHONPATH": str(copy)}
        started = time.monotonic()
        proc = subprocess.run([python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *mutation.tests],
                              cwd=copy, env=env, capture_output=True, text=True)
        elapsed = time.monotonic() - started
    tail = (proc.stdout.strip().splitlines() or [""])[-1]
    return ("killed" if proc.returncode != 0 else "SURVIVED"), elapsed, tail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated mutation numbers (1-based)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = parser.parse_args(argv)
    chosen = list(enumerate(MUTATIONS, 1))
    if args.only:
        wanted = {int(n) for n in args.only.split(",")}
        chosen = [(n, m) for n, m in chosen if n in wanted]
    if args.list:
        for number, mutation in chosen:
            print(f"{number:2d}. {mutation.name} ({mutation.path}) -> {' '.join(mutation.tests)}")
        return 0
    worst = 0
    for number, mutation in chosen:
        outcome, seconds, tail = run(mutation, sys.executable)
        print(f"{number:2d}. {outcome:8s} {seconds:6.1f} s  {mutation.name}  [{tail}]", flush=True)
        worst = max(worst, {"killed": 0, "SURVIVED": 1, "STALE": 2}[outcome])
    return worst


if __name__ == "__main__":
    raise SystemExit(main())
