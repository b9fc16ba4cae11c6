"""``make_client``'s provider table, import hygiene, pricing, and the scripted server's rules."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from conductor.errors import ConfigError
from conductor.llm import BACKENDS, LLMSettings, make_client
from conductor.llm.base import usage_for
from conductor.llm.gemini_backend import GeminiClient
from conductor.llm.openai_backend import OpenAIClient
from tests.helpers.llm_server import ScriptedLLM

# --- the provider table ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "environ", "expected"),
    [("openai", {"OPENAI_API_KEY": "sk-x"}, OpenAIClient), ("gemini", {"GEMINI_API_KEY": "g-x"}, GeminiClient)],
)
def test_make_client_builds_the_named_backend(provider: str, environ: dict[str, str], expected: type) -> None:
    settings = LLMSettings(provider, "some-model", base_url="http://127.0.0.1:9/")

    client = make_client(settings, environ=environ)

    assert isinstance(client, expected)
    assert client.settings is settings


def test_unknown_provider_is_a_config_error_naming_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown LLM provider 'anthropic'; known providers: gemini, openai"):
        make_client(LLMSettings("anthropic", "claude"), environ={})


def test_table_lists_exactly_the_shipped_backends() -> None:
    assert set(BACKENDS) == {"openai", "gemini"}


def test_settings_are_frozen_with_documented_defaults() -> None:
    settings = LLMSettings("openai", "m")

    assert (settings.base_url, settings.timeout_seconds, settings.max_retries, settings.temperature) == (
        None, 120.0, 2, None,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.model = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("field", "value"),
    [("model", ""), ("timeout_seconds", 0.0), ("max_retries", -1), ("input_usd_per_million", -0.5),
     ("output_usd_per_million", -1.0)],
)
def test_settings_reject_unusable_values(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"LLM setting {field} has an invalid value"):
        LLMSettings("openai", **({"model": "m"} | {field: value}))  # type: ignore[arg-type]


# --- import hygiene -------------------------------------------------------------------------------

_LOADED = "import sys; print(sorted(m for m in ('openai', 'google.genai') if m in sys.modules))"


def _modules_loaded_after(statement: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-c", f"{statement}\n{_LOADED}"], capture_output=True, text=True, timeout=60, check=True
    )
    return json.loads(result.stdout.strip().replace("'", '"'))


def test_importing_conductor_llm_loads_no_sdk() -> None:
    assert _modules_loaded_after("import conductor.llm") == []


def test_make_client_loads_only_the_sdk_it_needs() -> None:
    statement = (
        "from conductor.llm import LLMSettings, make_client\n"
        "make_client(LLMSettings('openai', 'm'), environ={'OPENAI_API_KEY': 'k'})"
    )
    assert _modules_loaded_after(statement) == ["openai"]


# --- pricing --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("input_price", "output_price", "expected"),
    [(None, None, None), (3.0, None, 0.003), (None, 10.0, 0.005), (3.0, 10.0, 0.008)],
)
def test_cost_needs_at_least_one_price(input_price: float | None, output_price: float | None,
                                       expected: float | None) -> None:
    settings = LLMSettings("openai", "m", input_usd_per_million=input_price, output_usd_per_million=output_price)

    usage = usage_for(settings, 1_000, 500)

    assert usage.cost_usd == (None if expected is None else pytest.approx(expected))
    assert (usage.input_tokens, usage.output_tokens) == (1_000, 500)


def test_missing_token_counts_are_zero() -> None:
    usage = usage_for(LLMSettings("openai", "m"), None, None)

    assert (usage.input_tokens, usage.output_tokens) == (0, 0)


# --- the scripted server the backend tests rely on ------------------------------------------------


def _post_chat(llm: ScriptedLLM, prompt: str) -> tuple[int, dict[str, object]]:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": prompt}]}]})
    request = urllib.request.Request(f"{llm.openai_base_url}/chat/completions", data=body.encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.load(error)


def _answer(body: dict[str, object]) -> object:
    return json.loads(body["choices"][0]["message"]["content"])  # type: ignore[index]


def test_rules_match_in_order_and_times_limits_them(scripted_llm: ScriptedLLM) -> None:
    scripted_llm.reply("ping", {"n": 1}, times=2)
    scripted_llm.reply("ping", {"n": 2})

    answers = [_answer(_post_chat(scripted_llm, "ping")[1]) for _ in range(3)]

    assert answers == [{"n": 1}, {"n": 1}, {"n": 2}]
    assert scripted_llm.count("ping") == 3


def test_unmatched_prompt_gets_500_naming_it(scripted_llm: ScriptedLLM) -> None:
    status, body = _post_chat(scripted_llm, "x" * 300)

    assert status == 500
    assert body["error"]["message"] == "no scripted reply for prompt: " + "x" * 200  # type: ignore[index]
    assert scripted_llm.count("xxx") == 1


def test_wait_for_returns_the_recorded_request(scripted_llm: ScriptedLLM) -> None:
    scripted_llm.reply("ping", {"n": 1})
    _post_chat(scripted_llm, "ping me")

    request = scripted_llm.wait_for("ping", timeout=1.0)

    assert (request.wire, request.prompt) == ("openai", "ping me")
    with pytest.raises(TimeoutError):
        scripted_llm.wait_for("ping", count=2, timeout=0.05)
