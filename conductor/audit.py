"""The hash-chained audit log: one RFC 8785 (JCS) JSON object per line.

Each line is ``{seq, ts, type, data, prev, hash}`` serialised in canonical form and terminated by
``\\n``. ``hash`` is ``"sha256:<hex>"`` over the JCS bytes of the entry without ``hash``
(:func:`conductor.canonical.digest`); ``prev`` is the previous line's ``hash``, or :data:`GENESIS` on
``seq`` 0. Editing, deleting, inserting or reordering a line breaks the chain and
:func:`verify_chain` names the line. Truncating the tail does not: a signed checkpoint (size + head
hash) kept where executors cannot write closes that gap later.

Event types and their ``data`` keys are listed once, in :data:`EVENT_TYPES` (and for readers in
docs/protocol.md, whose table a test keeps in step with it).

Plan-level events (planning, ranking, apply) go to ``handoff/plan_<id>/audit.log``; everything about
one fork goes to ``handoff/plan_<id>/fork_<id>/audit.log``. :func:`read_events` merges them by time.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from conductor.canonical import canonical_bytes, digest, strict_loads
from conductor.errors import (
    AuditChainError,
    ConductorError,
    InvalidDocument,
    StateConflict,
)
from conductor.faults import crash_point
from conductor.fsutil import flocked, fsync_dir, fsync_fd, publish_exclusive, temp_path, write_once
from conductor.handoff.jcs import fast_jcs_text, jcs_bytes
from conductor.models import Event, parse_time, utc_now

GENESIS = "sha256:" + "0" * 64
LOCK_TIMEOUT_SECONDS = 60.0
_TAIL_CHUNK = 8192

EVENT_TYPES: dict[str, tuple[str, ...]] = {
    "plan.created": ("plan_id", "goal", "planner", "executor?", "forks", "base_commit?", "plan_checksum"),
    "fork.created": (
        "plan_id", "fork_id", "plan_checksum", "strategy", "steps", "commit", "parent?", "reused_steps?",
        "fork_checksum?",
    ),
    "llm.call": (
        "purpose", "step_id?", "attempt?", "provider", "model", "input_tokens", "output_tokens", "cost_usd?",
        "duration_seconds", "recording?", "cached?",
    ),
    "confidence.scored": ("step_id", "score", "level", "reasons"),
    "policy.merged": ("step_id", "effective", "sources", "notes", "digest"),
    "task.published": ("step_id", "attempt", "checksum", "base_commit?", "reason?"),
    "approval.requested": ("step_id", "score"),
    "approval.granted": ("step_id", "by"),
    "task.claimed": ("step_id", "attempt", "holder", "pid", "host"),
    "task.lease_expired": ("step_id", "attempt", "holder", "reason?", "killed?"),
    "task.released": ("step_id", "attempt", "holder", "reason"),
    "task.completed": ("step_id", "attempt", "executor", "duration_seconds"),
    "task.failed": ("step_id", "attempt", "reason", "message"),
    "task.abandoned": ("step_id", "attempt", "reason"),
    "task.retried": ("step_id", "attempt", "next_attempt", "outcome", "reasons", "files"),
    "task.rejected": ("step_id", "attempt", "kind", "message", "by", "task_checksum"),
    "step.verified": (
        "step_id", "attempt", "accepted", "reasons", "diff_lines", "files", "checks", "verification",
        "verdict_checksum",
    ),
    "step.merged": ("step_id", "attempt", "files", "commit"),
    "fork.finished": ("fork_id", "status", "failed_steps?"),
    "fork.verified": ("fork_id", "passed", "commit?", "verification"),
    "plan.ranked": ("ranking",),
    "plan.applied": ("fork_id", "files", "commit?"),
    "plan.apply_failed": ("fork_id", "reason"),
    "plan.resumed": ("pid",),
    "sandbox.unavailable": ("mode", "reason"),
    "plan.forked": ("fork_id", "parent", "instruction", "pid"),
    "plan.models_overridden": ("role", "recorded", "used", "by"),
    "budget.set": ("plan_usd", "plan_tokens", "by"),
    "budget.exceeded": ("step_id?", "attempt?", "purpose", "scope", "unit", "limit", "used", "needed", "message"),
    "plan.finished": ("status", "winner", "applied"),
    "recovery.repaired": ("what", "path", "detail"),
    "recovery.audit_truncated": ("bytes", "sha256", "saved_as"),
    "planning.published": ("plan_id", "attempt", "goal", "strategies", "checksum", "previous_rejections"),
    "planning.claimed": ("attempt", "holder", "pid"),
    "planning.answered": ("attempt", "holder", "answer_sha256"),
    "planning.released": ("attempt", "holder", "reason"),
    "planning.lease_expired": ("attempt", "holder", "why"),
    "planning.rejected": ("attempt", "holder", "reasons", "answer_sha256"),
    "planning.accepted": ("attempt", "holder", "answer_sha256", "verdict_checksum", "forks", "rejected_attempts"),
    "planning.failed": ("attempt", "reason", "message"),
}
"""Event type → the ``data`` keys the runtime writes (``?`` = optional). Documentation, not a gate:
:meth:`AuditLog.append` accepts any type matching the ``Event`` pattern."""


# --- parsing one line ---------------------------------------------------------------------------


def _entry_hash(document: Mapping[str, Any]) -> str:
    return digest({k: v for k, v in document.items() if k != "hash"})


def _parse_line(line: bytes, where: str) -> Event:
    """Parse one complete line (without its ``\\n``) strictly; check canonical form and own hash.

    Raises:
        AuditChainError: naming ``where`` and the first thing wrong with the line.
    """
    problems, event = _line_problems(line)
    if problems:
        raise AuditChainError(f"{where}: {problems[0]}")
    assert event is not None  # a line without problems always has a schema-valid event
    return event


_HASH_MEMBER = b',"hash":"'
_HASH_LENGTH = len("sha256:") + 64


def _line_problems(line: bytes) -> tuple[list[str], Event | None]:
    """Problems of one line on its own (no chain context), and the event if it is schema-valid."""
    event = _clean_line(line)
    if event is not None:
        return [], event
    return _find_problems(line)


def _clean_line(line: bytes) -> Event | None:
    """The event of a line that passes every check of :func:`_find_problems`, else None (then that names
    the problems). Cheaper: the C JSON parser, the C encoder for the canonical form
    (:mod:`conductor.handoff.jcs`), and the hash over the line's own bytes without its ``hash`` member, which
    for a canonical line are exactly the JCS bytes of the entry without ``hash``."""
    try:
        text = line.decode("utf-8")
        document = _decode(text)
    except ValueError:  # not UTF-8, not JSON
        return None
    # Equal to its canonical form means strict too: a duplicate key, NaN, an unpaired surrogate, a BOM or
    # nesting past 64 levels never survives the round trip (fast_jcs_text refuses the last three).
    if type(document) is not dict or fast_jcs_text(document) != text:
        return None
    event = _event_of(document)
    if event is None:
        return None
    # In canonical form "hash" follows "data" and only scalars follow it, so its member is the last
    # ',"hash":"' of the line (a '"' inside a string is always escaped).
    cut = line.rfind(_HASH_MEMBER)
    end = cut + len(_HASH_MEMBER) + _HASH_LENGTH
    if cut < 0 or line[end : end + 1] != b'"' or line[cut + len(_HASH_MEMBER) : end] != event.hash.encode():
        return None
    entry = line[:cut] + line[end + 1 :]
    return event if "sha256:" + hashlib.sha256(entry).hexdigest() == event.hash else None


_decode = json.JSONDecoder().decode
_EVENT_KEYS = frozenset(Event.model_fields)
_CHECKSUM = re.compile(r"sha256:[0-9a-f]{64}")
_TYPE = re.compile(r"[a-z_]+(\.[a-z_]+)+")


def _event_of(document: dict[str, Any]) -> Event | None:
    """The event of a document that has every field of the ``Event`` schema, each valid; else None. The
    schema's own checks, written out (pydantic's strict validation costs as much as the rest of a line)."""
    if document.keys() != _EVENT_KEYS:
        return None
    seq, ts, type_, data, prev, hash_ = (document[k] for k in ("seq", "ts", "type", "data", "prev", "hash"))
    if type(seq) is not int or seq < 0 or type(ts) is not str or type(data) is not dict:
        return None
    if not (type(type_) is str and type(prev) is str and type(hash_) is str):
        return None
    if not (_TYPE.fullmatch(type_) and _CHECKSUM.fullmatch(prev) and _CHECKSUM.fullmatch(hash_)):
        return None
    return _checked_event({"seq": seq, "ts": ts, "type": type_, "data": data, "prev": prev, "hash": hash_})


_new_object, _set = object.__new__, object.__setattr__


def _checked_event(fields: dict[str, Any]) -> Event:
    """An ``Event`` of fields already checked against its schema, built as ``Event.model_construct``
    builds one (a third of its cost: a log of 10,000 tasks holds ~30,000 events)."""
    event = _new_object(Event)
    _set(event, "__dict__", fields)
    _set(event, "__pydantic_fields_set__", _EVENT_KEYS)
    _set(event, "__pydantic_extra__", None)
    _set(event, "__pydantic_private__", None)
    return event


def _find_problems(line: bytes) -> tuple[list[str], Event | None]:
    if not line.strip():
        return ["empty line"], None
    try:
        document = strict_loads(line, source="entry")
    except ConductorError as exc:
        return [f"not strict JSON ({exc})"], None
    problems: list[str] = []
    if not _is_canonical(document, line):
        problems.append("not in RFC 8785 canonical form")
    try:
        event = Event.model_validate(document)
    except ValidationError as exc:
        first = exc.errors()[0]
        location = ".".join(str(part) for part in first["loc"]) or "entry"
        return [*problems, f"schema: {location}: {first['msg']}"], None
    try:
        if _entry_hash(document) != event.hash:
            problems.append("hash mismatch (entry edited?)")
    except ConductorError:  # e.g. an integer beyond 2**53: there is no canonical form to hash
        problems.append("hash cannot be checked (no canonical form)")
    return problems, event


def _new_event(document: dict[str, Any]) -> Event:
    try:
        return Event.model_validate(document)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InvalidDocument(f"audit event {document.get('type')!r}: {first['loc']}: {first['msg']}") from exc


def _is_canonical(document: Any, line: bytes) -> bool:
    try:
        return canonical_bytes(document) == line
    except ConductorError:  # e.g. an integer beyond 2**53 parses but has no canonical form
        return False


# --- the log ------------------------------------------------------------------------------------


class AuditLog:
    """An append-only, hash-chained JSON-lines log at ``path``.

    Appends are serialised across threads and processes (an ``flock`` on ``<path>.lock``); each costs
    O(1) in the log's size: only the last line is read, and not even that while it is still the line this
    process last wrote or checked. The line is fsynced after the lock is released (its bytes are in the
    file by then, and a later line's fsync would flush it too).

    :meth:`events` is incremental: what this process has checked of a log (any instance of the same
    path) is kept, and a later call parses only the lines appended since, as long as the file is the same
    one (device and inode), did not shrink and still ends its checked part with the line seen there.
    Otherwise it is read again from the start. An in-place edit of an earlier line is therefore found by
    the next full read (:func:`verify_chain`, which always reads everything, or a new process), not by a
    process that had already checked that line.
    """

    def __init__(
        self,
        path: Path,
        *,
        clock: Callable[[], str] = utc_now,
        lock_timeout: float = LOCK_TIMEOUT_SECONDS,
        cut_torn_tail: bool = False,
    ):
        """Open (lazily; nothing is touched until the first call) the log at ``path``.

        Args:
            path: the ``audit.log`` file; it and its folder are created by the first append.
            clock: returns the RFC 3339 UTC ``ts`` of each new entry (tests inject a fixed clock).
            lock_timeout: seconds to wait for the cross-process lock before raising StateConflict.
            cut_torn_tail: a torn last line that a dead writer left is cut off (and the cut recorded) by
                :meth:`events` and :meth:`append` instead of raising — for the processes that run plans
                (engine, worker, ``conductor task``); inspection commands leave the log as it is.
        """
        self.path = Path(path)
        self._clock = clock
        self._lock_timeout = lock_timeout
        self._cut_torn_tail = cut_torn_tail

    def __repr__(self) -> str:
        return f"AuditLog({str(self.path)!r})"

    def append(self, type: str, data: Mapping[str, Any] | None = None) -> Event:
        """Append one event, chained to the current last line, and fsync it.

        The line is written with a single ``os.write`` on an ``O_APPEND`` descriptor under the log's
        lock, so other writers never interleave with it.

        Args:
            type: dotted event type, e.g. ``"task.claimed"`` (see :data:`EVENT_TYPES`).
            data: JSON-ready event data; it must survive RFC 8785 canonicalisation (no NaN, no
                integers beyond 2**53).

        Returns:
            The event as written, with its ``seq``, ``ts``, ``prev`` and ``hash``.

        With ``cut_torn_tail``, an unterminated last line still there under the lock (its writer died
        mid-write) is first cut off, its bytes kept beside the log, and the cut recorded
        (``recovery.audit_truncated``).

        Raises:
            AuditChainError: the log ends with an invalid last line (or, without ``cut_torn_tail``, a
                torn one); nothing is written, because appending would bury the damage.
            InvalidDocument: ``data`` cannot be canonicalised, or ``type`` is not a dotted lowercase
                name, or the clock gave no string.
            StateConflict: the lock stayed held by another process beyond the lock timeout.
            OSError: the write or fsync failed.
        """
        # Round-trip the data so the hash covers exactly what a reader will parse back.
        payload = strict_loads(jcs_bytes(dict(data or {})), source="event data")
        try:
            return self._append(type, payload)
        except _TornTail:
            if not self._cut_torn_tail:
                raise
            self._cut_dead_writers_tail()
        return self._append(type, payload)

    def append_many(self, items: Sequence[tuple[str, Mapping[str, Any] | None]]) -> list[Event]:
        """Append several events in order, as :meth:`append` would one after another, but with one write
        and one fsync: for a process that logs a batch (the reaper's re-queues after a crash).

        No other writer's line can come between them; if the write is cut short (a crash), the torn tail
        is cut off as any torn line is, and none of them counts.

        Args:
            items: ``(type, data)`` pairs, as :meth:`append` takes them.

        Returns:
            The events as written, in order (``[]`` for no items; nothing is touched then).

        Raises:
            As :meth:`append`; nothing is written if any item is refused.
        """
        payloads = [(type, strict_loads(jcs_bytes(dict(data or {})), source="event data")) for type, data in items]
        if not payloads:
            return []
        try:
            return self._append_all(payloads)
        except _TornTail:
            if not self._cut_torn_tail:
                raise
            self._cut_dead_writers_tail()
        return self._append_all(payloads)

    def _append(self, type: str, payload: dict[str, Any]) -> Event:
        return self._append_all([(type, payload)])[0]

    def _append_all(self, payloads: list[tuple[str, dict[str, Any]]]) -> list[Event]:
        known = _known(self.path)
        with known.lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._locked():
                fd, created = _open_for_append(self.path)
                stat: os.stat_result | None = None
                try:
                    stat = os.fstat(fd)
                    last = _last_event(known, fd, stat, self.path)
                    written: list[tuple[bytes, Event]] = []
                    for type, payload in payloads:
                        last, line = self._entry(last, payload, type)
                        written.append((line, last))
                    self._write_line(fd, b"".join(line for line, _ in written))
                except BaseException:
                    _cut_back(fd, stat)
                    os.close(fd)
                    raise
            start = stat.st_size
            for line, event in written:
                known.appended(stat, start, line, event)
                start += len(line)
        try:
            fsync_fd(fd, self.path)
        finally:
            os.close(fd)
        if created:
            fsync_dir(self.path.parent)
        return [event for _, event in written]

    def _entry(self, last: Event | None, payload: dict[str, Any], type: str) -> tuple[Event, bytes]:
        """The next event and its line (with ``\\n``): the entry's JCS bytes with the hash member inserted
        before ``"prev"``, where key order puts it."""
        entry = {
            "seq": 0 if last is None else last.seq + 1,
            "ts": self._clock(),
            "type": type,
            "data": payload,
            "prev": GENESIS if last is None else last.hash,
        }
        body = jcs_bytes(entry)
        hash_ = "sha256:" + hashlib.sha256(body).hexdigest()
        event = _new_event({**entry, "hash": hash_})
        cut = body.rindex(b',"prev":"')  # "data" comes first and holds "prev" only inside objects
        return event, body[:cut] + _HASH_MEMBER + hash_.encode() + b'"' + body[cut:] + b"\n"

    def events(self) -> list[Event]:
        """Every event of the log, after checking each line and the whole chain (incrementally, see the
        class docstring).

        Returns:
            The events in file order (a new list); ``[]`` if the file does not exist yet.

        With ``cut_torn_tail``, a torn last line is cut off as :meth:`append` does.

        Raises:
            AuditChainError: naming the line number of the first problem (and how many more there are).
        """
        known = _known(self.path)
        try:
            with known.lock:
                return known.read(self.path, mark=self._cut_torn_tail)
        except _TornTail:
            if not self._cut_torn_tail:
                raise
            self._cut_dead_writers_tail()
        with known.lock:
            return known.read(self.path, mark=True)

    def _cut_dead_writers_tail(self) -> TornTail | None:
        """Cut off an unterminated last line that is still there under the log's lock, keep its bytes
        beside the log and record the cut (``recovery.audit_truncated``, as recovery does).

        Every append writes its line while it holds that lock, so a line still torn under it was left by a
        writer that died mid-write: a SIGKILL can cut a ``write(2)`` at a page boundary. Returns None when
        the line was completed meanwhile (a live writer was still at it).
        """
        torn = repair_torn_tail(self.path, lock_timeout=self._lock_timeout)
        if torn is not None:
            self._append("recovery.audit_truncated", {"bytes": torn.size, "sha256": torn.sha256,
                                                      "saved_as": _project_relative(torn.saved_as)})
        return torn

    def __iter__(self) -> Iterator[Event]:
        return iter(self.events())

    def tail(self, n: int) -> list[Event]:
        """The last ``n`` events (the whole chain is checked, incrementally as :meth:`events`)."""
        return self.events()[-n:] if n > 0 else []

    def _locked(self) -> _TimeoutAsConflict:
        return _TimeoutAsConflict(Path(f"{self.path}.lock"), self.path, self._lock_timeout)

    def _write_line(self, fd: int, line: bytes) -> None:
        written = write_once(fd, line, self.path)
        if written != len(line):
            # A short write leaves a torn line; say so instead of writing the rest separately.
            raise OSError(f"{self.path}: short write ({written} of {len(line)} bytes)")
        crash_point("audit.after_write")


def _project_relative(path: Path) -> str:
    """``path`` relative to the project root (the folder holding ``.conductor``), else its name."""
    for parent in path.parents:
        if parent.name == ".conductor":
            return path.relative_to(parent.parent).as_posix()
    return path.name


def _cut_back(fd: int, before: os.stat_result | None) -> None:
    """Undo what a failed append wrote (a torn line on a full or failing disk), best effort.

    The log's lock is held, so nothing after ``before.st_size`` is anyone else's. If the truncation fails
    too, the torn line stays for recovery to cut (:func:`repair_torn_tail`); the append's own error is
    the one raised either way.
    """
    if before is None:
        return
    try:
        if os.fstat(fd).st_size > before.st_size:
            os.ftruncate(fd, before.st_size)
    except OSError:
        pass


class _TornTail(AuditChainError):
    """The log's only damage is an unterminated last line (see :meth:`AuditLog._cut_dead_writers_tail`)."""


def _open_for_append(path: Path) -> tuple[int, bool]:
    """A read-write ``O_APPEND`` descriptor of the log, and whether this call created the file."""
    try:
        return os.open(path, os.O_RDWR | os.O_APPEND), False
    except FileNotFoundError:
        try:
            return os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:  # a writer without our lock (never Conductor) made it meanwhile
            return os.open(path, os.O_RDWR | os.O_APPEND), False


def _last_event(known: _Known, fd: int, stat: os.stat_result, path: Path) -> Event | None:
    """The last event of the log open at ``fd``: the one this process last wrote or checked if the file
    still ends with its line, else read and checked from the file."""
    if known.tail is not None and known.tail.ends(fd, stat, whole=True):
        return known.tail.event
    line = _read_last_line(fd, path)
    if line is None:
        return None
    event = _parse_line(line, f"{path}: last line")
    known.tail = _Tail(stat.st_dev, stat.st_ino, stat.st_size, line + b"\n", event)
    return event


@dataclass(frozen=True)
class _Tail:
    """A checked line of a log file: the file's identity, the offset just after the line, the line (with
    its newline) and its event."""

    dev: int
    ino: int
    end: int
    line: bytes
    event: Event | None

    def ends(self, fd: int, stat: os.stat_result, *, whole: bool) -> bool:
        """Does the open file still hold this line at ``end`` (and, with ``whole``, end there)?"""
        if (stat.st_dev, stat.st_ino) != (self.dev, self.ino) or stat.st_size < self.end:
            return False
        if whole and stat.st_size != self.end:
            return False
        return self.end == 0 or os.pread(fd, len(self.line), self.end - len(self.line)) == self.line


class _Known:
    """What this process knows of one log file (shared by every ``AuditLog`` of the path).

    ``tail``: the last line written or checked, for :meth:`AuditLog.append`. ``view``: the end of the
    part :meth:`AuditLog.events` has checked, its events and the chain checker to continue from there.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tail: _Tail | None = None
        self.view: _Tail | None = None
        self.chain = _ChainCheck()
        self.prefix = hashlib.sha256()  # over the bytes before view.end
        self.marked = 0  # lines the log's check mark covers (read or written by this process)

    def appended(self, stat: os.stat_result, start: int, line: bytes, event: Event) -> None:
        """Record a line this process appended at offset ``start`` of the file ``stat`` describes (the view
        follows if it was complete)."""
        self.tail = _Tail(stat.st_dev, stat.st_ino, start + len(line), line, event)
        view = self.view
        if view is not None and (view.dev, view.ino, view.end) == (stat.st_dev, stat.st_ino, start):
            self.chain.accept(self.chain.lines + 1, event)
            self.prefix.update(line)
            self.view = self.tail

    def read(self, path: Path, *, mark: bool = False) -> list[Event]:
        """The log's events, checked from where this process left off (or from its check mark); with
        ``mark``, the check mark is moved on when :data:`MARK_EVERY_LINES` more lines have been checked."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            self.view, self.chain, self.prefix, self.marked = None, _ChainCheck(), hashlib.sha256(), 0
            return []
        try:
            stat = os.fstat(fd)
            if self.view is None or not self.view.ends(fd, stat, whole=False):
                self.view, self.chain = _Tail(stat.st_dev, stat.st_ino, 0, b"", None), _ChainCheck()
                self.prefix, self.marked = hashlib.sha256(), 0
            if self.view.end == 0 or stat.st_size - self.view.end >= SKIP_TO_MARK_BYTES:
                self._skip_to_mark(path, fd, stat)
            data = _read_from(fd, self.view.end, stat.st_size)
        finally:
            os.close(fd)
        lines = data.split(b"\n")
        torn = lines.pop()  # b"" when the file ends with a newline
        first = self.chain.lines + 1
        for number, line in enumerate(lines, start=first):
            self.chain.check(number, line)
        if torn:
            self.chain.problems.append(f"line {first + len(lines)}: unterminated last line (torn write)")
        if self.chain.problems:
            problems = self.chain.problems
            self.view, self.chain = None, _ChainCheck()  # read it whole next time
            extra = len(problems) - 1
            more = f" (and {extra} more problem{'s' if extra > 1 else ''})" if extra else ""
            error = _TornTail if torn and not extra else AuditChainError
            raise error(f"{path}: {problems[0]}{more}")
        events = self.chain.events
        if lines:
            end = self.view.end + len(data)
            self.view = _Tail(self.view.dev, self.view.ino, end, lines[-1] + b"\n", events[-1])
            self.tail = self.view
            self.prefix.update(data)
        if mark and self.chain.lines - self.marked >= MARK_EVERY_LINES:
            self._write_mark(path)
        return list(events)

    def _skip_to_mark(self, path: Path, fd: int, stat: os.stat_result) -> None:
        """Take the lines from the end of what this process checked (the start of the file, for a new
        reader) up to the log's check mark as checked, if the mark's SHA-256 covers exactly the bytes this
        process checked and those that follow (another process checked them, e.g. while this one slept);
        otherwise nothing changes (the lines are checked one by one)."""
        assert self.view is not None
        mark = _read_mark(path)
        start = self.view.end
        if mark is None or not start < mark["bytes"] <= stat.st_size:
            return
        middle = os.pread(fd, mark["bytes"] - start, start)
        prefix = self.prefix.copy()
        prefix.update(middle)
        if len(middle) != mark["bytes"] - start or prefix.hexdigest() != mark["sha256"]:
            return
        events = _vouched_events(middle)
        if events is None or self.chain.lines + len(events) != mark["lines"] or events[-1].hash != mark["head"]:
            return
        self.chain.accept_all(events)
        last = middle[middle.rfind(b"\n", 0, len(middle) - 1) + 1 :]
        self.view = _Tail(stat.st_dev, stat.st_ino, mark["bytes"], last, events[-1])
        self.prefix, self.marked = prefix, self.chain.lines

    def _write_mark(self, path: Path) -> None:
        """Write the check mark for every line checked so far. Best effort, and never fsynced: a mark lost
        or damaged in a crash only costs the next reader a full check."""
        assert self.view is not None and self.view.event is not None
        document = {"schema": MARK_SCHEMA, "bytes": self.view.end, "lines": self.chain.lines,
                    "sha256": self.prefix.hexdigest(), "head": self.view.event.hash}
        target = mark_path(path)
        temp = temp_path(target)
        try:
            temp.write_bytes(jcs_bytes(document))
            os.replace(temp, target)
        except OSError:
            temp.unlink(missing_ok=True)
            return
        self.marked = self.chain.lines


def _read_from(fd: int, start: int, end: int) -> bytes:
    """The bytes of the open file from ``start`` up to at least ``end`` (more if it grew meanwhile)."""
    chunks, position = [], start
    while True:
        chunk = os.pread(fd, max(end - position, 1 << 16), position)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        position += len(chunk)


# --- the check mark -----------------------------------------------------------------------------

MARK_SCHEMA = "conductor.audit-mark/v1"
MARK_SUFFIX = ".checked"
MARK_EVERY_LINES = 1024
"""A process that runs plans moves a log's check mark on after checking this many more lines."""

SKIP_TO_MARK_BYTES = 1 << 18
"""Unread bytes of a log (~750 lines) past which a reader looks whether the check mark vouches for them."""


def mark_path(path: Path) -> Path:
    """``<log>.checked``: the check mark of the log at ``path``.

    It names a prefix of the log that a process running plans has checked line by line and link by link:
    ``{"schema", "bytes", "lines", "sha256", "head"}`` (the prefix's length in bytes, its line count, the
    SHA-256 hex of its bytes and the ``hash`` of its last line). A reader that finds the log still starting
    with exactly those bytes parses them without checking them again, and checks only what follows: so
    recovery at start costs a hash over the log plus the lines since the mark, not a check of every line.
    The mark vouches for nothing an attacker could not forge with the log itself (the chain has no key);
    :func:`verify_chain` (``conductor verify``) never uses it.
    """
    return path.with_name(path.name + MARK_SUFFIX)


def _read_mark(path: Path) -> dict[str, Any] | None:
    """The log's check mark if it exists and is well formed, else None."""
    try:
        document = json.loads(mark_path(path).read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(document, dict) or document.get("schema") != MARK_SCHEMA:
        return None
    size, lines = document.get("bytes"), document.get("lines")
    if type(size) is not int or type(lines) is not int or size <= 0 or lines <= 0:
        return None
    if not (isinstance(document.get("sha256"), str) and isinstance(document.get("head"), str)):
        return None
    return document


def _vouched_events(prefix: bytes) -> list[Event] | None:
    """The events of lines checked before (one JSON parse for all), or None if they do not parse as such."""
    if not prefix.endswith(b"\n"):
        return None
    collecting = gc.isenabled()
    gc.disable()  # tens of thousands of new containers, none of them garbage: the collector would only walk them
    try:
        # A canonical line holds no raw newline (JCS escapes it), so the lines join into one JSON array.
        documents = _decode("[" + prefix[:-1].replace(b"\n", b",").decode("utf-8") + "]")
        if not all(type(document) is dict and document.keys() == _EVENT_KEYS for document in documents):
            return None
        return [_checked_event(document) for document in documents] or None
    except ValueError:
        return None
    finally:
        if collecting:
            gc.enable()


_KNOWN: dict[str, _Known] = {}
_KNOWN_LOCK = threading.Lock()
_MAX_KNOWN = 256  # logs remembered per process; the oldest is forgotten beyond that


def forget_checked_logs() -> None:
    """Forget what this process has checked of every log, so that the next read of each starts as a new
    process's would (from its check mark, or line 1). For benchmarks and tests of a fresh start."""
    with _KNOWN_LOCK:
        _KNOWN.clear()


def _known(path: Path) -> _Known:
    key = os.path.abspath(path)
    with _KNOWN_LOCK:
        known = _KNOWN.get(key)
        if known is None:
            if len(_KNOWN) >= _MAX_KNOWN:
                del _KNOWN[next(iter(_KNOWN))]
            known = _KNOWN[key] = _Known()
        return known


class _TimeoutAsConflict:
    """The append lock of a log (``flock`` on ``<log>.lock``); a timeout becomes ``StateConflict``."""

    def __init__(self, lock_path: Path, log_path: Path, timeout: float):
        self._lock = flocked(lock_path, timeout=timeout)
        self._path = log_path

    def __enter__(self) -> None:
        try:
            self._lock.__enter__()
        except TimeoutError as exc:
            raise StateConflict(f"{self._path}: audit log lock held too long by another process") from exc

    def __exit__(self, *exc_info: object) -> None:
        self._lock.__exit__(*exc_info)


def _read_last_line(fd: int, path: Path) -> bytes | None:
    """The last complete line of the file (without ``\\n``), reading backwards in chunks.

    Raises:
        AuditChainError: the file does not end with ``\\n`` (a torn write).
    """
    size = os.fstat(fd).st_size
    if size == 0:
        return None
    if os.pread(fd, 1, size - 1) != b"\n":
        raise _TornTail(f"{path}: unterminated last line (torn write); recover the log before appending")
    end = size - 1  # the final newline
    buffer = b""
    position = end
    while position > 0:
        step = min(_TAIL_CHUNK, position)
        position -= step
        buffer = os.pread(fd, step, position) + buffer
        cut = buffer.rfind(b"\n")
        if cut != -1:
            return buffer[cut + 1 :]
    return buffer


# --- repairing a torn tail ----------------------------------------------------------------------


@dataclass(frozen=True)
class TornTail:
    """What :func:`repair_torn_tail` cut off a log.

    Attributes:
        path: the log.
        saved_as: the file that now holds the cut bytes, beside the log.
        size: how many bytes were cut.
        sha256: lowercase hex SHA-256 of the cut bytes.
    """

    path: Path
    saved_as: Path
    size: int
    sha256: str


def repair_torn_tail(path: Path, *, lock_timeout: float = LOCK_TIMEOUT_SECONDS) -> TornTail | None:
    """Cut an unterminated last line (a torn write) off the audit log ``path``, keeping the bytes.

    Under the log's append lock: the bytes after the last ``\\n`` are saved durably as
    ``<log>.torn-<UTC time>`` beside the log, then the log is truncated to its last complete line and
    fsynced. Complete lines are never touched, valid or not: an edited line stays for
    :func:`verify_chain` to name. The caller records the cut (``recovery.audit_truncated``).

    Returns:
        What was cut, or None when the log is missing, empty or ends with ``\\n``.

    Raises:
        StateConflict: the lock stayed held by another process beyond ``lock_timeout`` seconds.
        StorageError: the copy, the truncation or its fsync failed (the log is then unchanged, or cut
            with the bytes already saved).
    """
    path = Path(path)
    if not path.exists():
        return None
    with _TimeoutAsConflict(Path(f"{path}.lock"), path, lock_timeout):
        fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
                return None
            cut = _after_last_newline(fd, size)
            torn = os.pread(fd, size - cut, cut)
            saved_as = _save_torn(path, torn)
            os.ftruncate(fd, cut)
            fsync_fd(fd, path)
        finally:
            os.close(fd)
    return TornTail(path=path, saved_as=saved_as, size=len(torn), sha256=hashlib.sha256(torn).hexdigest())


def _after_last_newline(fd: int, size: int) -> int:
    """Offset just after the last ``\\n`` of the file (0 if it has none), reading backwards."""
    position = size
    while position > 0:
        step = min(_TAIL_CHUNK, position)
        position -= step
        found = os.pread(fd, step, position).rfind(b"\n")
        if found != -1:
            return position + found + 1
    return 0


def _save_torn(path: Path, torn: bytes) -> Path:
    stamp = utc_now().replace("-", "").replace(":", "").replace(".", "")
    for attempt in range(100):
        target = path.with_name(f"{path.name}.torn-{stamp}" + (f".{attempt}" if attempt else ""))
        try:
            publish_exclusive(target, torn)
        except FileExistsError:
            continue
        return target
    raise StateConflict(f"{path}: 100 torn-tail copies named {path.name}.torn-{stamp}* exist already")


# --- verification -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChainReport:
    """What :func:`verify_chain` found.

    Attributes:
        path: the log checked.
        entries: complete lines in the file (valid or not); a torn last line is not counted.
        ok: True when no problem was found.
        problems: one message per problem, each starting ``"line <n>: "`` (1-based).
        head: the ``hash`` of the last valid entry (for a checkpoint), or None.
    """

    path: Path
    entries: int
    ok: bool
    problems: list[str] = field(default_factory=list)
    head: str | None = None


def verify_chain(path: Path) -> ChainReport:
    """Check every line and link of an audit log and report every problem found.

    Checks, per line: strict JSON, RFC 8785 canonical form (the line's bytes equal the JCS of its
    value), the ``Event`` schema, the recomputed hash, ``seq`` contiguous from 0, ``prev`` equal to the
    previous line's hash (:data:`GENESIS` first), duplicated lines, and a torn last line.

    Args:
        path: the ``audit.log`` file.

    Returns:
        A :class:`ChainReport`; a missing file is reported as a problem, an empty file is ok.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return ChainReport(path=path, entries=0, ok=False, problems=[f"{path}: no such file"])
    events, problems = _scan(data)
    complete = data.count(b"\n")
    head = events[-1].hash if events else None
    return ChainReport(path=path, entries=complete, ok=not problems, problems=problems, head=head)


def _scan(data: bytes) -> tuple[list[Event], list[str]]:
    """Parse and check every line of ``data``; return the schema-valid events and all problems."""
    lines = data.split(b"\n")
    torn = lines.pop()  # b"" when the file ends with a newline
    chain = _ChainCheck()
    for number, line in enumerate(lines, start=1):
        chain.check(number, line)
    if torn:
        chain.problems.append(f"line {len(lines) + 1}: unterminated last line (torn write)")
    return chain.events, chain.problems


class _ChainCheck:
    """Walks lines in order, keeping what the next line must link to."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.problems: list[str] = []
        self.lines = 0  # lines checked so far
        self._seen: dict[str, int] = {}  # hash -> line number where it first appeared
        self._previous: tuple[int, Event] | None = None  # (line number, event) of the last linked line
        self._lost_track = False  # the previous line could not be parsed: do not judge the next link

    def accept(self, number: int, event: Event) -> None:
        """Take a line this process wrote itself, chained to the last one checked (nothing to check)."""
        self.lines = number
        self._seen[event.hash] = number
        self.events.append(event)
        self._previous, self._lost_track = (number, event), False

    def accept_all(self, events: list[Event]) -> None:
        """Take a run of lines checked before (their bytes unchanged since), following the lines checked so
        far (a check mark vouches for all of them together)."""
        assert not self.problems
        first = self.lines + 1
        self.lines += len(events)
        self._seen.update((event.hash, number) for number, event in enumerate(events, start=first))
        self.events.extend(events)
        self._previous, self._lost_track = (self.lines, events[-1]), False

    def check(self, number: int, line: bytes) -> None:
        self.lines = number
        problems, event = _line_problems(line)
        self.problems.extend(f"line {number}: {problem}" for problem in problems)
        if event is None:
            self._lost_track = True
            return
        if event.hash in self._seen:
            self.problems.append(f"line {number}: duplicate of line {self._seen[event.hash]}")
            return
        self._seen[event.hash] = number
        self.events.append(event)
        if not self._lost_track:
            self._check_link(number, event)
        self._previous, self._lost_track = (number, event), False

    def _check_link(self, number: int, event: Event) -> None:
        if self._previous is None:
            if event.seq != 0:
                self.problems.append(f"line {number}: seq {event.seq} where 0 was expected (start of log lost?)")
            if event.prev != GENESIS:
                self.problems.append(f"line {number}: prev is not the genesis value")
            return
        previous_number, previous = self._previous
        self._check_seq(number, event.seq, previous.seq)
        if event.prev != previous.hash:
            self.problems.append(f"line {number}: prev does not match line {previous_number}'s hash{self._hint(event)}")

    def _check_seq(self, number: int, seq: int, previous_seq: int) -> None:
        if seq == previous_seq + 1:
            return
        if seq > previous_seq + 1:
            cause = "entries deleted or reordered"
        elif seq == previous_seq:
            cause = "entry inserted or duplicated"
        else:
            cause = "entries reordered or inserted"
        self.problems.append(f"line {number}: seq {seq} follows {previous_seq} ({cause})")

    def _hint(self, event: Event) -> str:
        earlier = self._seen.get(event.prev)
        if earlier is None:
            return ""
        return f" (it is line {earlier}'s hash: entries inserted or reordered)"


# --- merging logs -------------------------------------------------------------------------------


def read_events(paths: Iterable[Path]) -> list[tuple[str, Event]]:
    """Merge several audit logs (the plan-level log and its fork logs) into one timeline.

    Each event is tagged with its log's source label, the name of the folder holding the log
    (``"plan_<id>"`` or ``"fork_<id>"``). Events are ordered by ``ts``; ties keep the order of
    ``paths`` and then ``seq``. Missing files are skipped.

    Args:
        paths: ``audit.log`` files.

    Returns:
        ``[(label, event), ...]`` in time order.

    Raises:
        AuditChainError: a log's chain is broken (naming the file and line).
    """
    tagged: list[tuple[Any, str, Event]] = []
    for index, path in enumerate(paths):
        label = Path(path).parent.name
        for event in AuditLog(Path(path)).events():
            tagged.append(((parse_time(event.ts), index, event.seq), label, event))
    tagged.sort(key=lambda item: item[0])
    return [(label, event) for _, label, event in tagged]
