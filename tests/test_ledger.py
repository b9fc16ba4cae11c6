"""The cost ledger and budgets: reserve, then reconcile; threads and processes never overspend together."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pydantic import BaseModel

from conductor.config import Config
from conductor.errors import BackendError, BudgetExceeded, ConfigError
from conductor.llm.base import LLMReply, LLMSettings, usage_for
from conductor.llm.cost import cost_report
from conductor.llm.ledger import (
    PROMPT_OVERHEAD_TOKENS,
    BudgetLimits,
    CallScope,
    Cost,
    Ledger,
    call_scope,
    current_scope,
    prompt_token_bound,
    worst_case,
)
from conductor.llm.metered import MeteredClient
from conductor.llm.recording import RecordingClient, RecordingStore
from conductor.models import Usage
from conductor.runtime import llm_settings

SETTINGS = LLMSettings("openai", "m-1", max_output_tokens=100, input_usd_per_million=1.0, output_usd_per_million=2.0)
SCOPE = CallScope(plan_id="p1", fork_id="1", step_id="step_001", attempt=1, purpose="step")


class Answer(BaseModel):
    text: str


class SlowClient:
    """The provider side of the metered client in these unit tests: counts calls, answers after a pause.

    The e2e tests (tests/e2e/test_budget.py) run the real SDK clients against an HTTP server instead.
    """

    def __init__(self, settings: LLMSettings = SETTINGS, *, delay: float = 0.0, usage: tuple[int, int] = (10, 20),
                 fail: BackendError | None = None) -> None:
        self.settings = settings
        self.delay, self.usage, self.fail = delay, usage, fail
        self.calls = 0
        self._lock = threading.Lock()

    def generate(self, *, system: str, prompt: str, schema: type) -> LLMReply:
        with self._lock:
            self.calls += 1
        time.sleep(self.delay)
        if self.fail is not None:
            raise self.fail
        text = json.dumps({"text": prompt})
        return LLMReply(parsed=schema.model_validate_json(text), usage=usage_for(self.settings, *self.usage),
                        model=self.settings.model, raw_text=text, duration_seconds=self.delay)


def kinds(ledger: Ledger) -> list[str]:
    return [e["kind"] for e in ledger.entries()]


def test_prompt_bound_is_at_least_the_utf8_bytes_of_everything_sent() -> None:
    system, prompt = "sys", "é" * 10 + "汉" * 5  # 20 + 15 bytes
    schema_bytes = len(json.dumps(Answer.model_json_schema(), separators=(",", ":")).encode())
    bound = prompt_token_bound(system=system, prompt=prompt, schema=Answer)
    assert bound == 3 + 20 + 15 + schema_bytes + PROMPT_OVERHEAD_TOKENS
    cost = worst_case(SETTINGS, system=system, prompt=prompt, schema=Answer)
    assert cost.tokens == bound + 100
    assert cost.usd == pytest.approx((bound * 1.0 + 100 * 2.0) / 1_000_000)


def test_a_call_is_reserved_then_settled_at_its_real_usage(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.jsonl")
    client = MeteredClient(SlowClient(usage=(10, 20)), ledger, BudgetLimits(plan_tokens=10_000))
    with call_scope(**vars(SCOPE)):
        assert current_scope() == SCOPE
        reply = client.generate(system="s", prompt="hello", schema=Answer)
    assert current_scope() == CallScope()
    assert reply.parsed.text == "hello"
    reserve, call = ledger.entries()
    assert (reserve["kind"], call["kind"]) == ("reserve", "call")
    assert call["reservation"] == reserve["id"]
    assert reserve["tokens"] == worst_case(SETTINGS, system="s", prompt="hello", schema=Answer).tokens
    assert {k: call[k] for k in ("plan_id", "fork_id", "step_id", "attempt", "purpose", "provider", "model")} == {
        "plan_id": "p1", "fork_id": "1", "step_id": "step_001", "attempt": 1, "purpose": "step",
        "provider": "openai", "model": "m-1"}
    assert (call["input_tokens"], call["output_tokens"], call["cached"]) == (10, 20, False)
    assert call["usd"] == pytest.approx((10 * 1.0 + 20 * 2.0) / 1_000_000)
    report = cost_report(ledger)
    assert report["total"]["tokens"] == 30 and report["total"]["held_calls"] == 0
    [plan] = report["plans"]
    assert plan["steps"] == [{"fork_id": "1", "step_id": "step_001", **{k: plan[k] for k in plan
                                                                      if k not in ("plan_id", "forks", "steps", "models")}}]


def test_a_call_that_does_not_fit_is_not_made_and_nothing_is_held(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.jsonl")
    inner = SlowClient(usage=(50, 100))
    one_call = worst_case(SETTINGS, system="s", prompt="x", schema=Answer).tokens
    # Room for the first call's worst case; after it settles at 150 tokens, not for a second worst case.
    client = MeteredClient(inner, ledger, BudgetLimits(plan_tokens=one_call + 100))
    with call_scope(**vars(SCOPE)):
        client.generate(system="s", prompt="x", schema=Answer)
        with pytest.raises(BudgetExceeded) as caught:
            client.generate(system="s", prompt="y", schema=Answer)
    assert inner.calls == 1
    assert caught.value.exit_code == 14 and caught.value.unit == "tokens" and caught.value.scope == "plan"
    assert caught.value.used == 150 and caught.value.needed == one_call
    assert "plan p1" in str(caught.value) and "--budget-tokens" in str(caught.value)
    assert kinds(ledger) == ["reserve", "call"]  # the refused call left no line


def test_a_fork_budget_limits_each_fork_apart(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.jsonl")
    one_call = worst_case(SETTINGS, system="s", prompt="x", schema=Answer).tokens
    client = MeteredClient(SlowClient(usage=(one_call, 0)), ledger, BudgetLimits(fork_tokens=one_call))
    for fork_id in ("1", "2"):
        with call_scope(plan_id="p1", fork_id=fork_id, step_id="step_001", attempt=1, purpose="step"):
            client.generate(system="s", prompt="x", schema=Answer)
    with call_scope(plan_id="p1", fork_id="1", step_id="step_002", attempt=1, purpose="step"), \
            pytest.raises(BudgetExceeded, match="fork 1 of plan p1") as caught:
        client.generate(system="s", prompt="x", schema=Answer)
    assert caught.value.scope == "fork"


def test_threads_never_overspend_together(tmp_path: Path) -> None:
    """Eight threads call at once through a slow provider; the budget fits three worst cases."""
    ledger = Ledger(tmp_path / "ledger.jsonl")
    inner = SlowClient(delay=1.0, usage=(1, 1))
    one_call = worst_case(SETTINGS, system="s", prompt="same size", schema=Answer).tokens
    client = MeteredClient(inner, ledger, BudgetLimits(plan_tokens=3 * one_call + one_call // 2))
    outcomes: list[str] = []
    start = threading.Barrier(8)

    def call(number: int) -> None:
        start.wait()
        with call_scope(plan_id="p1", fork_id=str(number), purpose="step"):
            try:
                client.generate(system="s", prompt="same size", schema=Answer)
                outcomes.append("made")
            except BudgetExceeded:
                outcomes.append("refused")

    threads = [threading.Thread(target=call, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(outcomes) == ["made"] * 3 + ["refused"] * 5
    assert inner.calls == 3


RESERVER = """
import sys, time
from conductor.llm.base import LLMSettings
from conductor.llm.ledger import BudgetLimits, CallScope, Cost, Ledger
from conductor.errors import BudgetExceeded
ledger = Ledger(__import__("pathlib").Path(sys.argv[1]))
settings = LLMSettings("openai", "m")
made = 0
for n in range(int(sys.argv[2])):
    try:
        ledger.reserve(CallScope(plan_id="p", fork_id=sys.argv[3]), settings, Cost(tokens=10, usd=None),
                       BudgetLimits(plan_tokens=95))
        made += 1
    except BudgetExceeded:
        pass
print(made)
"""


def test_processes_never_overspend_together(tmp_path: Path) -> None:
    """Four processes reserve 10 tokens 20 times each against 95 tokens, none settling: 9 fit in all."""
    path = tmp_path / "ledger.jsonl"
    procs = [subprocess.Popen([sys.executable, "-c", RESERVER, str(path), "20", str(n)], stdout=subprocess.PIPE,
                              text=True) for n in range(4)]
    made = [int(proc.communicate(timeout=120)[0]) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs)
    assert sum(made) == 9
    assert kinds(Ledger(path)) == ["reserve"] * 9
    report = cost_report(Ledger(path))
    assert report["total"]["held_calls"] == 9 and report["total"]["held_tokens"] == 90


def test_a_replay_costs_nothing_is_never_refused_and_records_what_it_saved(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.jsonl")
    inner = SlowClient(usage=(400, 600))
    store = RecordingStore(tmp_path / "recordings")
    one_call = worst_case(SETTINGS, system="s", prompt="x", schema=Answer).tokens
    client = MeteredClient(RecordingClient(inner, store), ledger, BudgetLimits(plan_tokens=one_call))
    with call_scope(plan_id="p1", purpose="plan"):
        first = client.generate(system="s", prompt="x", schema=Answer)
        # The budget is spent (1000 of one worst case), yet a replay needs none of it.
        again = client.generate(system="s", prompt="x", schema=Answer)
    assert (first.cached, again.cached, inner.calls) == (False, True, 1)
    assert kinds(ledger) == ["reserve", "call", "cached"]
    cached = ledger.entries()[-1]
    assert (cached["input_tokens"], cached["output_tokens"]) == (400, 600)
    assert cached["saved_usd"] == pytest.approx((400 * 1.0 + 600 * 2.0) / 1_000_000)
    [plan] = cost_report(ledger, "p1")["plans"]
    assert (plan["calls"], plan["cached_calls"], plan["tokens"], plan["saved_tokens"]) == (1, 1, 1000, 1000)
    assert plan["forks"] == [] and plan["models"][0]["model"] == "m-1"


def test_a_failed_call_is_released_or_settled_at_what_the_provider_billed(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.jsonl")
    billed = BackendError("answer does not match Answer", usage=Usage(input_tokens=30, output_tokens=40))
    for failure in (BackendError("HTTP 500: boom"), billed):
        client = MeteredClient(SlowClient(fail=failure), ledger)
        with call_scope(plan_id="p1", purpose="plan"), pytest.raises(BackendError):
            client.generate(system="s", prompt="x", schema=Answer)
    entries = ledger.entries()
    assert [e["kind"] for e in entries] == ["reserve", "release", "reserve", "call"]
    assert "HTTP 500" in entries[1]["reason"]
    assert (entries[3]["input_tokens"], entries[3]["output_tokens"]) == (30, 40)
    assert "does not match" in entries[3]["error"]
    assert cost_report(ledger)["total"]["failed_calls"] == 1


def test_a_usd_budget_needs_a_price(tmp_path: Path) -> None:
    unpriced = LLMSettings("gemini", "g-1")
    with pytest.raises(ConfigError, match=r"llm\.prices\.g-1"):
        MeteredClient(SlowClient(unpriced), Ledger(tmp_path / "ledger.jsonl"), BudgetLimits(plan_usd=1.0))
    MeteredClient(SlowClient(unpriced), Ledger(tmp_path / "ledger.jsonl"), BudgetLimits(plan_tokens=1))


def test_a_usd_budget_counts_dollars(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.jsonl")
    worst = worst_case(SETTINGS, system="s", prompt="x", schema=Answer)
    assert worst.usd is not None
    client = MeteredClient(SlowClient(usage=(0, 100)), ledger, BudgetLimits(plan_usd=worst.usd * 1.5))
    with call_scope(plan_id="p1", purpose="plan"):
        client.generate(system="s", prompt="x", schema=Answer)  # spends 100 * $2/M = $0.0002
        with pytest.raises(BudgetExceeded, match="--budget-usd") as caught:
            client.generate(system="s", prompt="x", schema=Answer)
    assert caught.value.unit == "usd" and caught.value.used == pytest.approx(0.0002)


def test_a_torn_last_line_is_skipped_and_never_joined_to_the_next(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path)
    ledger.reserve(SCOPE, SETTINGS, Cost(tokens=10, usd=None), BudgetLimits())
    with path.open("ab") as handle:
        handle.write(b'{"v": 1, "kind": "reserve", "id": "torn", "plan_id": "p1", "tok')  # a writer killed mid-line
    other = Ledger(path)  # another process's view
    other.reserve(SCOPE, SETTINGS, Cost(tokens=5, usd=None), BudgetLimits(plan_tokens=15))
    lines = path.read_bytes().split(b"\n")
    assert lines[1].startswith(b'{"v": 1, "kind": "reserve", "id": "torn"') and lines[-1] == b""
    assert [e["tokens"] for e in Ledger(path).entries()] == [10, 5]
    with pytest.raises(BudgetExceeded):  # both reservations are held: 15 of 15
        ledger.reserve(SCOPE, SETTINGS, Cost(tokens=1, usd=None), BudgetLimits(plan_tokens=15))


def test_prices_per_model_win_over_the_global_price() -> None:
    config = Config.model_validate({"llm": {
        "input_usd_per_million": 1.0, "output_usd_per_million": 2.0, "max_output_tokens": 777,
        "prices": {"big": {"input_usd_per_million": 10.0, "output_usd_per_million": 30.0}}}})
    big = llm_settings(config, provider="openai", model="big")
    small = llm_settings(config, provider="openai", model="small")
    assert (big.input_usd_per_million, big.output_usd_per_million, big.max_output_tokens) == (10.0, 30.0, 777)
    assert (small.input_usd_per_million, small.output_usd_per_million) == (1.0, 2.0)
    with pytest.raises(Exception, match="output_usd_per_million"):
        Config.model_validate({"llm": {"prices": {"x": {"input_usd_per_million": 1.0}}}})
