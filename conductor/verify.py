"""``conductor verify``: check that every record of a project still holds, and name what does not.

For each plan: ``plan.json`` and every ``fork.json`` (checksums); every audit log (the hash chain,
:func:`conductor.audit.verify_chain`) and its signed checkpoints (truncation, a rewritten log, rollback,
bad or untrusted signatures: :func:`conductor.checkpoint.verify_checkpoints`, with a witness file that
remembers the newest checkpoint seen); every task, lease, result and verdict file (strict JSON, schema,
checksum; a task in two state folders); every result's changed files against the attempt's tree as
Conductor captured it (in ``.conductor/git``, content re-hashed, so an altered object is caught); every
``provenance.json`` (a DSSE envelope: signature by a key trusted for its executor, subject digests
against that tree) and every ``attestation.json`` (signed by the project key; subjects against the
files and the fork's commit; that commit present and holding the attested content). Every earlier attempt
a repair archived under ``attempts/`` (``conductor.repair``): its task, result and verdict files
(checksums; the task's against its ``task.published``), its sealed evidence, and a ``task.retried`` event
in the log for it.

A task file in ``failed/`` that does not read back (tampered, malformed) is a finding unless a
``task.rejected`` event since its last publication records its rejection and the content checksum it
still has: then it is a *notice* (the user sees it; the records are consistent, so verify passes).

Nothing is repaired here: recovery is ``conductor resume`` / ``conductor.recovery``.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from conductor.audit import AuditLog, ChainReport, verify_chain
from conductor.checkpoint import ORIGIN_PREFIX, audit_origin, note_files, verify_checkpoints, witnessed_origins
from conductor.config import Config
from conductor.attempts import state_store
from conductor.errors import ConductorError
from conductor.fsutil import file_sha256
from conductor.handoff.documents import read_document
from conductor.keys import CONDUCTOR_SIGNER, TrustStore, project_id, project_key
from conductor.layout import (
    ATTESTATION_SUFFIX,
    PROVENANCE_SUFFIX,
    RESULT_SUFFIX,
    STATES,
    TASK_SUFFIX,
    VERDICT_SUFFIX,
    ForkLayout,
    ProjectLayout,
)
from conductor.handoff.lease import rejected_content_checksums
from conductor.models import Event, FileChange, Lease, Result, Task, Verdict
from conductor.plan_store import FORK_RECORD, check_plan_pinned, fork_records, read_plan_file
from conductor.provenance import read_provenance
from conductor.verifier import ignore_matcher


@dataclass(frozen=True)
class Finding:
    """One problem: ``where`` is a path relative to the project root (or a log label)."""

    where: str
    problem: str

    def __str__(self) -> str:
        return f"{self.where}: {self.problem}"


@dataclass
class VerifyReport:
    """Everything ``verify_project`` checked and found.

    Attributes:
        findings: the problems, in the order found.
        notices: integrity events the audit log records and the records still match, such as a tampered
            task file a claimer rejected unexecuted (``task.rejected``): worth seeing, not a failure.
        checked: how many items of each kind were checked (``tasks``, ``results``, ``provenance``,
            ``attestations``, ``logs``, ``log_entries``, ``checkpoints``, ``plans``).
        uncovered: audit entries written after the newest checkpoint of their log (not a problem).
    """

    findings: list[Finding] = field(default_factory=list)
    notices: list[Finding] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)
    uncovered: int = 0

    @property
    def ok(self) -> bool:
        return not self.findings

    def count(self, kind: str, n: int = 1) -> None:
        self.checked[kind] = self.checked.get(kind, 0) + n


def default_witness(environ: Mapping[str, str] = os.environ) -> Path:
    """Where ``conductor verify`` remembers the newest checkpoint of each log: outside every project,
    ``$XDG_STATE_HOME/conductor/witness.json`` (default ``~/.local/state/conductor/witness.json``)."""
    state = environ.get("XDG_STATE_HOME") or str(Path(environ.get("HOME", "~")).expanduser() / ".local" / "state")
    return Path(state) / "conductor" / "witness.json"


def verify_project(
    layout: ProjectLayout, config: Config, *, plan_ids: list[str] | None = None, witness: Path | None = None,
    environ: Mapping[str, str] = os.environ,
) -> VerifyReport:
    """Check every plan of the project (or ``plan_ids``) and report every problem found.

    Args:
        witness: the witness file for checkpoint rollback detection (None: no witness).
        environ: where ``CONDUCTOR_SIGNING_KEY_FILE`` and the key folder's location are read from.

    Returns:
        The report; ``report.ok`` is True when nothing is wrong.

    Raises:
        KeyFileError: a configured trusted key cannot be loaded.
    """
    own = project_key(layout.keys_dir, layout.conductor_dir, environ, create=False)
    trust = TrustStore.for_project(layout.keys_dir, config.trust, layout.conductor_dir,
                                   own_key=own.public_key if own is not None else None)
    checker = _Checker(layout, trust, config.trust.require_signatures, witness)
    checker.ignore = list(config.workspace.ignore)
    for plan_id in plan_ids if plan_ids is not None else layout.plan_ids():
        checker.plan(plan_id)
    checker.planning(plan_ids)
    if witness is not None and plan_ids is None:
        checker.vanished_plans()
    return checker.report


class _Checker:
    def __init__(self, layout: ProjectLayout, trust: TrustStore, require_signatures: bool, witness: Path | None):
        self.layout, self.trust, self.require, self.witness = layout, trust, require_signatures, witness
        self.project = project_id(layout.conductor_dir)
        self.report = VerifyReport()
        self.ignore: list[str] = []  # config.yaml's workspace.ignore: for tasks that do not carry their own

    def vanished_plans(self) -> None:
        """A plan deleted whole, checkpoints and all, leaves nothing to check, except what the witness
        (outside the project) remembers of this project's logs."""
        assert self.witness is not None
        try:
            seen = witnessed_origins(self.witness, self.project)
        except ConductorError as exc:
            self.add(self.witness, str(exc))
            return
        present = set(self.layout.plan_ids())
        for origin, entry in sorted(seen.items()):
            plan = origin.removeprefix(ORIGIN_PREFIX + "/").split("/")[0].removeprefix("plan_")
            if plan not in present:
                self.add(origin, f"the witness saw {entry['size']} entries of this log (checkpoint {entry['seq']}), "
                                 f"but plan {plan} is gone from the project")

    def add(self, path: Path | str, problem: str) -> None:
        where = self._relative(path) if isinstance(path, Path) else path
        self.report.findings.append(Finding(where, problem))

    def _relative(self, path: Path) -> str:
        try:
            return path.relative_to(self.layout.root).as_posix()
        except ValueError:
            return str(path)

    def _error(self, path: Path, exc: BaseException) -> None:
        # Messages usually start with the absolute path: keep only what follows it.
        text = str(exc)
        for prefix in (f"{path}: ", f"{path} "):
            text = text.removeprefix(prefix)
        self.add(path, text)

    # --- plans and logs ---------------------------------------------------------------------------

    def plan(self, plan_id: str) -> None:
        plan_dir = self.layout.plan_dir(plan_id)
        self.report.count("plans")
        try:
            plan = read_plan_file(plan_dir / "plan.json")
            check_plan_pinned(self.layout, plan_dir / "plan.json", plan)
        except (ConductorError, OSError) as exc:
            self._error(plan_dir / "plan.json", exc)
            return
        if plan.base_commit is not None and not state_store(self.layout).has_object(plan.base_commit):
            self.add(plan_dir / "plan.json", f"base commit {plan.base_commit[:12]}… is missing from .conductor/git")
        try:
            records = fork_records(self.layout, plan_id)
        except ConductorError as exc:
            self.add(plan_dir, f"a {FORK_RECORD} is damaged: {exc}")
            records = {}
        fork_ids = [spec.fork_id for spec in plan.forks]
        fork_ids += [fork_id for fork_id in records if fork_id not in fork_ids]
        self.log(plan_id, "plan", plan_dir / "audit.log")
        for fork_id in fork_ids:
            fork = self.layout.fork(plan_id, fork_id)
            self.log(plan_id, f"fork_{fork_id}", fork.audit_log)
            self.fork(fork)

    def planning(self, plan_ids: list[str] | None) -> None:
        """The audit log of every handoff planning round (``planning_<plan>/``): its chain. Planning logs
        have no checkpoints; their outcome is also in the plan's own log (``planning.accepted``)."""
        from conductor.handoff.planning import PlanningLayout, planning_ids

        for plan_id in planning_ids(self.layout):
            if plan_ids is not None and plan_id not in plan_ids:
                continue
            path = PlanningLayout(self.layout, plan_id).audit_log.path
            if path.exists():
                self.chain(path, "planning_logs")

    def chain(self, path: Path, kind: str) -> ChainReport:
        """Check the hash chain of the log at ``path`` (counted as ``kind``); returns the chain report."""
        self.report.count(kind)
        chain = verify_chain(path)
        self.report.count("log_entries", chain.entries)
        for problem in chain.problems:
            self.add(path, problem)
        return chain

    def log(self, plan_id: str, label: str, path: Path) -> None:
        if not path.exists():
            return
        chain = self.chain(path, "logs")
        checkpoint_dir = self.layout.checkpoint_dir(plan_id, label)
        if not checkpoint_dir.is_dir() or not note_files(checkpoint_dir):
            if chain.entries:
                self.add(path, f"no signed checkpoint covers this log ({chain.entries} entries); if the plan "
                               "was interrupted, `conductor resume` signs one")
            return
        result = verify_checkpoints(path, checkpoint_dir, origin=audit_origin(plan_id, label), trust=self.trust,
                                    witness=self.witness, project=self.project)
        self.report.count("checkpoints", result.checkpoints)
        self.report.uncovered += result.uncovered
        for finding in result.findings:
            if not chain.ok and finding.startswith("audit log:"):
                continue  # the chain's own problems are reported above, line by line
            self.add(path, finding)

    # --- one fork's folders -----------------------------------------------------------------------

    def fork(self, fork: ForkLayout) -> None:
        seen: dict[str, str] = {}
        try:
            events = AuditLog(fork.audit_log).events()
        except ConductorError:
            events = None  # the log's own problems are reported by its chain check
        rejections = _rejections(events or [])
        for state in STATES:
            folder = fork.state_dir(state)
            if not folder.is_dir():
                continue
            for path in sorted(folder.glob(f"*{TASK_SUFFIX}")):
                task_id = path.name[: -len(TASK_SUFFIX)]
                if task_id in seen:
                    self.add(path, f"the task is also in {seen[task_id]}/")
                seen[task_id] = state
                self.task(fork, state, task_id, path, rejections.get(task_id) if state == "failed" else None)
        if events is not None:
            self.folders_agree_with_log(fork, seen, events)
        self.archived_attempts(fork, events)

    def archived_attempts(self, fork: ForkLayout, events: list[Event] | None) -> None:
        """The earlier attempts a repair archived (``attempts/<step>.a<N>.*``): each was retried according
        to the log, and its records still read back."""
        from conductor.repair import ARCHIVE_DIR, EVIDENCE_SUFFIX, archive_path, read_evidence

        folder = fork.dir / ARCHIVE_DIR
        if not folder.is_dir():
            return
        retried = published = rejected = None
        if events is not None:
            retried = {(e.data.get("step_id"), e.data.get("attempt")) for e in events if e.type == "task.retried"}
            published = {(e.data.get("step_id"), e.data.get("attempt")): e.data.get("checksum")
                         for e in events if e.type == "task.published"}
            rejected = {(e.data.get("step_id"), e.data.get("attempt")) for e in events if e.type == "task.rejected"}
        for path in sorted(folder.glob(f"*{TASK_SUFFIX}")):
            match = _ARCHIVED.fullmatch(path.name)
            if match is None:
                self.add(path, "not the name of an archived attempt (<step>.a<attempt>.task.json)")
                continue
            step, attempt = match.group(1), int(match.group(2))
            self.report.count("archived_attempts")
            if retried is not None and (step, attempt) not in retried:
                self.add(path, f"archived, but the audit log records no task.retried of attempt {attempt}")
            if rejected is None or (step, attempt) not in rejected:  # a refused task file was unreadable already
                task = self.document(path, Task)
                expected = published.get((step, attempt)) if published is not None else None
                if task is not None and expected is not None and task.checksum != expected:
                    self.add(path, f"checksum {str(task.checksum)[:19]}… is not the one task.published recorded "
                                   f"({str(expected)[:19]}…)")
            self.document(archive_path(fork, step, attempt, RESULT_SUFFIX), Result)
            self.document(archive_path(fork, step, attempt, VERDICT_SUFFIX), Verdict)
            evidence = archive_path(fork, step, attempt, EVIDENCE_SUFFIX)
            if evidence.exists() and read_evidence(evidence) is None:
                self.add(evidence, "altered or damaged: it no longer matches its checksum or its schema")

    def folders_agree_with_log(self, fork: ForkLayout, seen: dict[str, str], events: list[Event]) -> None:
        """A task the log merged lies in completed/, one the verifier rejected in failed/: a task file
        moved between them (to hide an acceptance, or fake one) is named."""
        final = {}
        for event in events:
            step = event.data.get("step_id")
            if event.type == "step.merged":
                final[step] = ("completed", "merged (step.merged)", event.seq)
            elif event.type == "task.failed" and event.data.get("reason") == "verification_rejected":
                final[step] = ("failed", "rejected (task.failed)", event.seq)
            elif event.type == "task.published":
                final.pop(step, None)  # a new attempt: whatever came before is history
        for step, (folder, what, seq) in sorted(final.items()):
            if seen.get(step) != folder:
                where = f"{seen[step]}/" if step in seen else "no state folder"
                self.add(fork.task_file(seen.get(step, folder), step),
                         f"the audit log {what} at seq {seq}, but the task file is in {where}")

    def task(self, fork: ForkLayout, state: str, task_id: str, path: Path, rejection: Event | None = None) -> None:
        self.report.count("tasks")
        try:
            task = read_document(path, Task)
        except (ConductorError, OSError) as exc:
            self.unreadable_task(path, exc, state, rejection)
            task = None
        if state == "in_progress":
            self.document(fork.lease_file(task_id), Lease)
        if state not in ("completed", "failed"):
            return
        verdict = self.document(fork.sidecar(state, task_id, VERDICT_SUFFIX), Verdict)
        result_path = fork.sidecar(state, task_id, RESULT_SUFFIX)
        result = self.document(result_path, Result)
        if result is None or task is None:
            return
        self.report.count("results")
        tree = verdict.tree if verdict is not None else None
        # Paths matching workspace.ignore are never captured: an executor may truthfully report them.
        ignored = ignore_matcher(task.ignore or self.ignore)
        if tree is not None:
            self.changes(result_path, tree, [c for c in result.files_changed if not ignored(c.path)])
        self.provenance(fork, state, task_id, result, tree, ignored)
        attested = fork.sidecar(state, task_id, ATTESTATION_SUFFIX).exists()
        if state == "completed" and (attested or (verdict is not None and verdict.accepted)):
            self.attestation(fork, task_id, verdict)

    def unreadable_task(self, path: Path, exc: BaseException, state: str, rejection: Event | None) -> None:
        """A task file that does not read back. In ``failed/`` with a ``task.rejected`` event whose
        ``task_checksum`` is still its content's, it is a rejection the log records: a notice. Otherwise
        (no such event, or the file changed since) it is a finding."""
        if state != "failed" or rejection is None:
            hint = "; no task.rejected event records its rejection" if state == "failed" else ""
            self._error(path, _Suffixed(exc, hint))
            return
        data, recorded = rejection.data, rejection.data.get("task_checksum")
        now = rejected_content_checksums(path)
        if recorded not in now:
            self.add(path, f"changed since its rejection (task.rejected at seq {rejection.seq} recorded content "
                           f"{str(recorded)[:19]}…, the file now has {' or '.join(sorted(c[:19] + '…' for c in now))})")
            return
        self.report.notices.append(Finding(
            self._relative(path), f"rejected unexecuted by {data.get('by')} ({data.get('kind')}): "
                                  f"{data.get('message')} (task.rejected at seq {rejection.seq})"))

    def document(self, path: Path, model: type) -> object | None:
        if not path.exists():
            return None
        try:
            return read_document(path, model)
        except (ConductorError, OSError) as exc:
            self._error(path, exc)
            return None

    def digests(self, tree: str, names: list[str]) -> dict[str, str | None]:
        """SHA-256 of the content at each of ``names`` in ``tree`` (re-hashed from the objects), None if absent."""
        try:
            store = state_store(self.layout)
            entries = store.entries(tree, names)
            blobs = store.read_blobs(e.oid for e in entries.values() if e.mode != "160000")
        except ConductorError as exc:
            raise _TreeMissing(f"tree {tree[:12]}… cannot be read from .conductor/git: {exc}") from exc
        return {name: hashlib.sha256(blobs[entries[name].oid]).hexdigest() if name in entries else None
                for name in names}

    def changes(self, where: Path, tree: str, changes: list[FileChange]) -> None:
        try:
            actual = self.digests(tree, [c.path for c in changes])
        except _TreeMissing as exc:
            self.add(where, str(exc))
            return
        for change in changes:
            expected = None if change.change == "deleted" else change.sha256
            if actual[change.path] != expected:
                now = "absent" if actual[change.path] is None else f"sha256 {actual[change.path][:12]}…"
                self.add(where, f"{change.path}: recorded {change.change} with sha256 "
                                f"{(expected or 'none')[:12]}…, the attempt's captured tree has {now}")

    def provenance(self, fork: ForkLayout, state: str, task_id: str, result: Result, tree: str | None,
                   ignored: Callable[[str], bool]) -> None:
        path = fork.sidecar(state, task_id, PROVENANCE_SUFFIX)
        if not path.exists():
            if self.require:
                self.add(path, "missing (trust.require_signatures is on)")
            return
        self.report.count("provenance")
        try:
            read = read_provenance(path, self.trust, executor_id=result.executor.id, require_signature=self.require)
        except (ConductorError, OSError) as exc:
            self._error(path, exc)
            return
        subjects = {name: digest for name, digest in read.subjects.items() if not ignored(name)}
        self.subjects(path, subjects, fork.state_dir(state), tree, beside={f"{task_id}{RESULT_SUFFIX}"})

    def attestation(self, fork: ForkLayout, task_id: str, verdict: Verdict | None) -> None:
        path = fork.sidecar("completed", task_id, ATTESTATION_SUFFIX)
        if not path.exists():
            self.add(path, "missing: an accepted step has no signed attestation")
            return
        self.report.count("attestations")
        try:
            read = read_provenance(path, self.trust, executor_id=CONDUCTOR_SIGNER, require_signature=True)
        except (ConductorError, OSError) as exc:
            self._error(path, exc)
            return
        beside = {name for name in read.subjects if name.startswith(f"{task_id}.")}
        commit = read.commits.get("workspace")
        if commit is None:
            self.add(path, "no workspace subject")
            return
        if verdict is not None and verdict.commit != commit:
            self.add(path, f"workspace subject {commit[:12]}… is not the verdict's commit {str(verdict.commit)[:12]}…")
        try:
            tree = state_store(self.layout).tree_of(commit)
        except ConductorError as exc:
            self.add(path, f"workspace commit {commit[:12]}… is missing from .conductor/git: {exc}")
            return
        # The changed files are attested as the attempt made them (its captured tree, named by the verdict);
        # the merged commit may differ where a parallel step's lines were merged into the same file.
        self.subjects(path, read.subjects, fork.state_dir("completed"),
                      verdict.tree if verdict is not None and verdict.tree else tree, beside=beside)

    def subjects(self, path: Path, subjects: dict[str, str], folder: Path, tree: str | None, *,
                 beside: set[str]) -> None:
        inside = [name for name in subjects if name not in beside]
        try:
            in_tree = self.digests(tree, inside) if tree is not None and inside else {}
        except _TreeMissing as exc:
            self.add(path, str(exc))
            in_tree = {}
        for name, expected in sorted(subjects.items()):
            if name in beside:
                target = folder / name
                actual = file_sha256(target) if target.is_file() else None
            elif name not in in_tree:
                continue
            else:
                actual = in_tree[name]
            if actual != expected:
                self.add(path, f"subject {name}: signed sha256 {expected[:12]}…, the file has "
                               f"{'nothing' if actual is None else actual[:12] + '…'}")


class _TreeMissing(Exception):
    """A recorded tree or one of its objects cannot be read."""


class _Suffixed(Exception):
    """An error's message with a hint appended."""

    def __init__(self, exc: BaseException, hint: str) -> None:
        super().__init__(f"{exc}{hint}")


_ARCHIVED = re.compile(r"(.+)\.a([1-9][0-9]*)" + re.escape(TASK_SUFFIX))


def _rejections(events: list[Event]) -> dict[str, Event]:
    """Each step's ``task.rejected`` event since its newest ``task.published``."""
    found: dict[str, Event] = {}
    for event in events:
        step = event.data.get("step_id")
        if not isinstance(step, str):
            continue
        if event.type == "task.published":
            found.pop(step, None)
        elif event.type == "task.rejected":
            found[step] = event
    return found


def iter_findings(report: VerifyReport) -> Iterator[str]:
    """The findings as lines, for printing."""
    return (str(finding) for finding in report.findings)
