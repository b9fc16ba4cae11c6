"""The cost ledger: every LLM call, reserved at its worst case before it is made and reconciled after.

``.conductor/ledger.jsonl`` holds one JSON object per ``\\n``-terminated line. Lines are appended under an
exclusive ``flock`` of ``.conductor/ledger.lock`` (threads and processes alike: each call opens its own
descriptor) and fsynced before the lock is let go. Four kinds of line, all with ``v`` (1), ``kind``,
``id`` (32 hex), ``ts`` (UTC, RFC 3339) and the call's scope ``plan_id``, ``fork_id``, ``step_id``,
``attempt``, ``purpose`` (``"plan"``, ``"step"``…; ``null`` where it does not apply), ``provider`` and
``model``:

``reserve``
    ``tokens``, ``usd`` (``null`` without a price), ``pid``, ``host``: the worst case of a call about to
    be made — :func:`worst_case`.
``call``
    ``reservation``, ``input_tokens``, ``output_tokens``, ``usd``, ``cached`` (``false``), ``recording``,
    ``error`` (set when the provider answered something unusable, which it still bills): the real usage
    of a call that was made; it settles its reservation.
``cached``
    ``input_tokens``, ``output_tokens``, ``saved_usd``, ``recording``, ``cached`` (``true``): a recorded
    answer was replayed; it costs nothing, and the usage it repeats is what it saved.
``release``
    ``reservation``, ``reason``: the call was not paid for after all (the provider gave no answer, or
    another thread's identical call was replayed).

Budgets (:class:`BudgetLimits`) are checked under the lock against what the plan (and the fork) has
*spent* (``call`` lines) plus what is *held* (reservations neither settled nor released), so threads and
processes calling at once never overspend together. A reservation whose process died before settling it
stays held forever: the provider may have billed the call, and the ledger cannot know.

A torn last line (a writer killed mid-write) is ended with a newline by the next writer and skipped by
readers, as is any line that does not parse.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from conductor.errors import BudgetExceeded, ConfigError
from conductor.fsutil import flocked, fsync_dir, fsync_fd, write_all
from conductor.llm.base import LLMReply, LLMSettings, usage_for
from conductor.models import Usage, utc_now

LEDGER_VERSION = 1
PROMPT_OVERHEAD_TOKENS = 64
"""Tokens a request adds around its texts (role markers, message framing): OpenAI's chat format adds
about 4 per message and 3 to prime the answer; 64 leaves room for the structured-output wrapper."""
_SCOPE_KEYS = ("plan_id", "fork_id", "step_id", "attempt", "purpose")


# --- the scope of a call ------------------------------------------------------------------------


@dataclass(frozen=True)
class CallScope:
    """What a call is for, as the ledger files it. ``None`` fields do not apply (the planner's call has
    no fork)."""

    plan_id: str | None = None
    fork_id: str | None = None
    step_id: str | None = None
    attempt: int | None = None
    purpose: str | None = None


_SCOPE: ContextVar[CallScope | None] = ContextVar("conductor_llm_call_scope", default=None)
_NO_SCOPE = CallScope()


@contextmanager
def call_scope(**fields: Any) -> Iterator[CallScope]:
    """File every LLM call this thread makes inside the block under ``CallScope(**fields)``.

    The executor and the planner set it around ``client.generate``; the metered client
    (``conductor.llm.metered``) reads it. A context variable, so the ``LLMClient`` protocol and every
    client stay as they are.
    """
    scope = CallScope(**fields)
    token = _SCOPE.set(scope)
    try:
        yield scope
    finally:
        _SCOPE.reset(token)


def current_scope() -> CallScope:
    """The scope :func:`call_scope` set in this thread (all ``None`` outside one)."""
    return _SCOPE.get() or _NO_SCOPE


# --- budgets and the worst case -----------------------------------------------------------------


@dataclass(frozen=True)
class BudgetLimits:
    """Limits of LLM spending; ``None`` is no limit. Tokens count input + output.

    Attributes:
        plan_usd, plan_tokens: for everything a plan's calls cost (planner, steps, repairs, every run).
        fork_usd, fork_tokens: for the calls of any one fork of it.
    """

    plan_usd: float | None = None
    plan_tokens: int | None = None
    fork_usd: float | None = None
    fork_tokens: int | None = None

    @property
    def needs_price(self) -> bool:
        """A USD limit is set: a model without a price cannot be checked against it."""
        return self.plan_usd is not None or self.fork_usd is not None

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


@dataclass(frozen=True)
class Cost:
    """Tokens (input + output) and USD (``None``: no price configured) of one call."""

    tokens: int
    usd: float | None


def prompt_token_bound(*, system: str, prompt: str, schema: type[BaseModel]) -> int:
    """An upper bound of the input tokens of one structured-output request.

    Every tokenizer in use (byte-level BPE at OpenAI; SentencePiece with byte fallback at Gemini) makes
    each token of at least one byte of text, so the UTF-8 length of the system prompt, the user prompt and
    the JSON Schema (sent with the request and counted as input) bounds their tokens;
    :data:`PROMPT_OVERHEAD_TOKENS` covers the framing. Real counts run at 3–4 bytes a token for English
    and code, so the bound reserves about three times what is spent: the price of never overspending.
    """
    schema_text = json.dumps(schema.model_json_schema(), separators=(",", ":"))
    size = sum(len(text.encode("utf-8")) for text in (system, prompt, schema_text))
    return size + PROMPT_OVERHEAD_TOKENS


def worst_case(settings: LLMSettings, *, system: str, prompt: str, schema: type[BaseModel]) -> Cost:
    """The most one call can cost: :func:`prompt_token_bound` input tokens plus ``max_output_tokens``
    output tokens (sent with the request, so the provider never bills more), at the settings' prices."""
    tokens_in = prompt_token_bound(system=system, prompt=prompt, schema=schema)
    usage = usage_for(settings, tokens_in, settings.max_output_tokens)
    return Cost(tokens=tokens_in + settings.max_output_tokens, usd=usage.cost_usd)


# --- the ledger file ------------------------------------------------------------------------------


@dataclass
class Totals:
    """Tokens and USD summed over lines."""

    tokens: int = 0
    usd: float = 0.0

    def add(self, tokens: int, usd: float | None) -> None:
        self.tokens += tokens
        self.usd += usd or 0.0


@dataclass
class _Fold:
    """What the budget check needs from the ledger: spent per plan and per fork, and open reservations."""

    plan_spent: dict[str | None, Totals] = field(default_factory=dict)
    fork_spent: dict[tuple[str | None, str | None], Totals] = field(default_factory=dict)
    open: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add(self, entry: dict[str, Any]) -> None:
        kind = entry.get("kind")
        if kind == "reserve" and isinstance(entry.get("id"), str):
            self.open[entry["id"]] = entry
            return
        if kind in ("call", "release"):
            self.open.pop(str(entry.get("reservation")), None)
        if kind == "call" and not entry.get("cached"):
            tokens = _int(entry.get("input_tokens")) + _int(entry.get("output_tokens"))
            usd = _float(entry.get("usd"))
            self.plan_spent.setdefault(entry.get("plan_id"), Totals()).add(tokens, usd)
            self.fork_spent.setdefault((entry.get("plan_id"), entry.get("fork_id")), Totals()).add(tokens, usd)

    def used(self, plan_id: str | None, fork_id: str | None = None, *, per_fork: bool = False) -> tuple[Totals, Totals]:
        """(spent, held) of the plan, or of one of its forks."""
        spent = self.fork_spent.get((plan_id, fork_id)) if per_fork else self.plan_spent.get(plan_id)
        held = Totals()
        for entry in self.open.values():
            if entry.get("plan_id") == plan_id and (not per_fork or entry.get("fork_id") == fork_id):
                held.add(_int(entry.get("tokens")), _float(entry.get("usd")))
        return spent or Totals(), held


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _float(value: object) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


class Ledger:
    """``.conductor/ledger.jsonl`` (see the module docstring). Thread-safe; one object per process is
    enough, but any number (in any number of processes) stay correct: each check re-reads what others
    appended since, under the lock.

    Args:
        path: the ledger file; its folder must exist. The lock is ``ledger.lock`` beside it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path.with_name("ledger.lock")
        self._mutex = threading.Lock()  # guards the fold below; the flock guards the file
        self._fold = _Fold()
        self._offset = 0
        self._torn = False

    # --- writing ---------------------------------------------------------------------------------

    def reserve(self, scope: CallScope, settings: LLMSettings, cost: Cost, limits: BudgetLimits) -> str:
        """Hold ``cost`` for a call about to be made, if it fits every limit.

        Returns:
            The reservation's id, for :meth:`settle` or :meth:`release`.

        Raises:
            BudgetExceeded: spent + held + ``cost`` exceeds a limit of the scope's plan or fork; nothing
                is written.
            ConfigError: a USD limit is set and ``settings`` carry no price.
            StorageError: the append failed (nothing is held).
        """
        if limits.needs_price and cost.usd is None:
            raise ConfigError(f"a USD budget is set, but model {settings.model!r} has no price: set "
                              f"llm.prices.{settings.model} (or llm.input/output_usd_per_million) in config.yaml")
        entry = self._entry("reserve", scope, settings, tokens=cost.tokens, usd=cost.usd, pid=os.getpid(),
                            host=socket.gethostname())
        with self._locked():
            _check(self._fold, scope, cost, limits)
            self._append(entry)
        return entry["id"]

    def settle(self, reservation: str | None, scope: CallScope, settings: LLMSettings, usage: Usage, *,
               recording: str | None = None, error: str | None = None) -> None:
        """Record the real usage of a call that was made (``reservation`` ``None``: made unreserved)."""
        entry = self._entry("call", scope, settings, reservation=reservation, input_tokens=usage.input_tokens,
                            output_tokens=usage.output_tokens, usd=usage.cost_usd, cached=False,
                            recording=recording, error=error)
        with self._locked():
            self._append(entry)

    def release(self, reservation: str, scope: CallScope, settings: LLMSettings, reason: str) -> None:
        """Give back a reservation whose call was not paid for (no answer came, or a replay served it)."""
        entry = self._entry("release", scope, settings, reservation=reservation, reason=reason)
        with self._locked():
            self._append(entry)

    def record_cached(self, scope: CallScope, settings: LLMSettings, reply: LLMReply[Any]) -> None:
        """Record a replayed recording: free now; its recorded usage is what the replay saved."""
        saved = usage_for(settings, reply.usage.input_tokens, reply.usage.output_tokens).cost_usd
        if saved is None:
            saved = reply.usage.cost_usd
        entry = self._entry("cached", scope, settings, input_tokens=reply.usage.input_tokens,
                            output_tokens=reply.usage.output_tokens, saved_usd=saved, cached=True,
                            recording=reply.recording)
        with self._locked():
            self._append(entry)

    def _entry(self, kind: str, scope: CallScope, settings: LLMSettings, **data: Any) -> dict[str, Any]:
        return {"v": LEDGER_VERSION, "kind": kind, "id": secrets.token_hex(16), "ts": utc_now(),
                **asdict(scope), "provider": settings.provider, "model": settings.model, **data}

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._mutex, flocked(self.lock_path):
            self._catch_up()
            yield

    def _catch_up(self) -> None:
        """Fold what was appended since this object last looked (call under the lock)."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size < self._offset:  # replaced or truncated by hand: start over
            self._fold, self._offset = _Fold(), 0
        if size == self._offset:
            return
        with self.path.open("rb") as handle:
            handle.seek(self._offset)
            data = handle.read(size - self._offset)
        end = data.rfind(b"\n") + 1  # bytes after the last newline: a torn line, or one being written
        for line in data[:end].split(b"\n"):
            entry = _parse(line)
            if entry is not None:
                self._fold.add(entry)
        self._offset += end
        self._torn = end < len(data)

    def _append(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"
        data = (b"\n" + line) if self._torn else line  # end a torn line first: it is skipped, not joined
        created = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            write_all(fd, data, self.path)
            fsync_fd(fd, self.path)
        finally:
            os.close(fd)
        if created:
            fsync_dir(self.path.parent)
        self._offset = self.path.stat().st_size
        self._torn = False
        self._fold.add(entry)

    # --- reading ---------------------------------------------------------------------------------

    def entries(self) -> list[dict[str, Any]]:
        """Every line that parses, oldest first (no lock: a line being written is not yet complete)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        complete = data[: data.rfind(b"\n") + 1]
        return [entry for line in complete.split(b"\n") if (entry := _parse(line)) is not None]


def _parse(line: bytes) -> dict[str, Any] | None:
    if not line.strip():
        return None
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) and entry.get("v") == LEDGER_VERSION else None


def _check(fold: _Fold, scope: CallScope, cost: Cost, limits: BudgetLimits) -> None:
    """Raise :class:`BudgetExceeded` for the first limit ``cost`` does not fit."""
    checks = [("plan", False, limits.plan_tokens, limits.plan_usd)]
    if scope.fork_id is not None:
        checks.append(("fork", True, limits.fork_tokens, limits.fork_usd))
    for where, per_fork, token_limit, usd_limit in checks:
        spent, held = fold.used(scope.plan_id, scope.fork_id, per_fork=per_fork)
        name = f"plan {scope.plan_id}" if not per_fork else f"fork {scope.fork_id} of plan {scope.plan_id}"
        if token_limit is not None and spent.tokens + held.tokens + cost.tokens > token_limit:
            raise _exceeded(name, where, "tokens", token_limit, spent.tokens, held.tokens, cost.tokens, scope.purpose)
        if usd_limit is not None and spent.usd + held.usd + (cost.usd or 0.0) > usd_limit:
            raise _exceeded(name, where, "usd", usd_limit, spent.usd, held.usd, cost.usd or 0.0, scope.purpose)


def _exceeded(name: str, where: str, unit: str, limit: float, spent: float, held: float, needed: float,
              purpose: str | None) -> BudgetExceeded:
    def show(value: float) -> str:
        return f"{value:,.0f} tokens" if unit == "tokens" else f"${value:.6f}".rstrip("0").rstrip(".")

    flag = "--budget-tokens" if unit == "tokens" else "--budget-usd"
    hint = (f"continue with `conductor resume {flag} N` (N at least {show(spent + held + needed)})" if where == "plan"
            else f"raise budget.fork_{unit} in config.yaml, then `conductor resume`")
    if purpose == "plan":  # no plan exists yet to resume
        hint = f"plan again with {flag} of at least {show(spent + held + needed)}"
    waits = "nothing was written" if purpose == "plan" else "the step waits"
    message = (f"LLM budget of {name} exceeded: {show(spent)} spent + {show(held)} held by calls in flight + "
               f"{show(needed)} this call's worst case > {show(limit)}; the call was not made, and {waits}: {hint}")
    return BudgetExceeded(message, scope=where, unit=unit, limit=limit, used=spent + held, needed=needed)


def ledger_path(conductor_dir: Path) -> Path:
    """``<project>/.conductor/ledger.jsonl``."""
    return conductor_dir / "ledger.jsonl"
