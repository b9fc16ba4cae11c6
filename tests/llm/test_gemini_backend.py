"""The Gemini backend against the scripted server."""

from __future__ import annotations

import json
import urllib.request

import pytest

from conductor.errors import BackendError
from conductor.llm import LLMClient, LLMReply, LLMSettings, make_client
from conductor.llm.gemini_backend import GeminiClient
from tests.helpers.llm_server import ScriptedLLM
from tests.llm.conftest import ANSWER, MODEL, SYSTEM, Answer, BackendContract, only_request

KEY = "gm-test-4567"


class TestGeminiContract(BackendContract):
    provider = "gemini"
    environ = {"GEMINI_API_KEY": KEY}
    key_header = ("x-goog-api-key", KEY)
    key_variables = ("GOOGLE_API_KEY", "GEMINI_API_KEY")

    def base_url(self, llm: ScriptedLLM) -> str:
        return llm.gemini_base_url


def _client(llm: ScriptedLLM, environ: dict[str, str] | None = None, **options: object) -> LLMClient:
    settings = LLMSettings("gemini", MODEL, **({"base_url": llm.gemini_base_url, "max_retries": 0} | options))
    return make_client(settings, environ=environ if environ is not None else {"GEMINI_API_KEY": KEY})


def _ask(client: LLMClient, prompt: str = "plan it") -> LLMReply[Answer]:
    return client.generate(system=SYSTEM, prompt=prompt, schema=Answer)


# --- configuration ------------------------------------------------------------------------------


def test_google_api_key_wins_over_gemini_api_key(scripted_llm: ScriptedLLM) -> None:
    scripted_llm.reply("plan it", ANSWER)

    _ask(_client(scripted_llm, environ={"GOOGLE_API_KEY": "google-key", "GEMINI_API_KEY": "gemini-key"}))

    assert only_request(scripted_llm).headers["x-goog-api-key"] == "google-key"


@pytest.mark.parametrize("variable", ["GEMINI_BASE_URL", "GOOGLE_GEMINI_BASE_URL"])
def test_base_url_is_read_from_the_environment(scripted_llm: ScriptedLLM, variable: str) -> None:
    scripted_llm.reply("plan it", ANSWER)
    client = make_client(LLMSettings("gemini", MODEL, max_retries=0),
                         environ={"GEMINI_API_KEY": KEY, variable: scripted_llm.gemini_base_url})

    assert _ask(client).parsed == Answer(**ANSWER)
    assert isinstance(client, GeminiClient) and client.base_url == scripted_llm.gemini_base_url


def test_process_environment_is_not_read(scripted_llm: ScriptedLLM, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOOGLE_API_KEY", "from-the-process")
    scripted_llm.reply("plan it", ANSWER)

    _ask(_client(scripted_llm))

    assert only_request(scripted_llm).headers["x-goog-api-key"] == KEY


def test_timeout_is_passed_in_milliseconds(scripted_llm: ScriptedLLM) -> None:
    scripted_llm.reply("plan it", ANSWER)

    _ask(_client(scripted_llm, timeout_seconds=7.0))

    # The SDK announces the timeout it was given (ms) to the server in whole seconds.
    assert only_request(scripted_llm).headers["x-server-timeout"] == "7"


# --- what is sent ---------------------------------------------------------------------------------


def test_system_instruction_and_json_schema_are_sent(scripted_llm: ScriptedLLM) -> None:
    scripted_llm.reply("plan it", ANSWER)

    _ask(_client(scripted_llm, temperature=0.25))

    request = only_request(scripted_llm)
    assert request.path == f"/v1/models/{MODEL}:generateContent"
    assert request.body["systemInstruction"]["parts"] == [{"text": SYSTEM}]
    assert request.body["contents"] == [{"role": "user", "parts": [{"text": "plan it"}]}]
    config = request.body["generationConfig"]
    assert config["responseMimeType"] == "application/json"
    assert config["responseSchema"]["required"] == ["title", "steps"]
    assert config["temperature"] == 0.25


def test_temperature_is_left_out_when_unset(scripted_llm: ScriptedLLM) -> None:
    scripted_llm.reply("plan it", ANSWER)

    _ask(_client(scripted_llm))

    assert "temperature" not in only_request(scripted_llm).body["generationConfig"]


# --- answers --------------------------------------------------------------------------------------


def _response(text: str | None, finish_reason: str = "STOP", **extra: object) -> str:
    parts = [] if text is None else [{"text": text}]
    return json.dumps({"candidates": [{"content": {"role": "model", "parts": parts},
                                       "finishReason": finish_reason}], **extra})


def test_model_falls_back_to_settings_and_usage_to_zero(scripted_llm: ScriptedLLM) -> None:
    scripted_llm.raw("plan it", _response(json.dumps(ANSWER)))

    reply = _ask(_client(scripted_llm))

    assert reply.model == MODEL
    assert (reply.usage.input_tokens, reply.usage.output_tokens) == (0, 0)


def test_reported_model_version_is_kept(scripted_llm: ScriptedLLM) -> None:
    scripted_llm.raw("plan it", _response(json.dumps(ANSWER), modelVersion="gemini-x-001"))

    assert _ask(_client(scripted_llm)).model == "gemini-x-001"


def test_safety_stop_is_a_backend_error(scripted_llm: ScriptedLLM) -> None:
    scripted_llm.reply("plan it", ANSWER, finish_reason="content_filter")

    with pytest.raises(BackendError, match=r"without a complete answer \(finishReason=SAFETY\)"):
        _ask(_client(scripted_llm))


def test_blocked_prompt_is_a_backend_error(scripted_llm: ScriptedLLM) -> None:
    scripted_llm.raw("plan it", json.dumps({"promptFeedback": {"blockReason": "SAFETY"}}))

    with pytest.raises(BackendError, match=r"the prompt was blocked \(SAFETY\)"):
        _ask(_client(scripted_llm))


def test_empty_answer_is_a_backend_error(scripted_llm: ScriptedLLM) -> None:
    scripted_llm.raw("plan it", _response(None))

    with pytest.raises(BackendError, match="the answer is empty"):
        _ask(_client(scripted_llm))


def test_no_candidates_is_a_backend_error(scripted_llm: ScriptedLLM) -> None:
    scripted_llm.raw("plan it", "{}")

    with pytest.raises(BackendError, match="no candidates"):
        _ask(_client(scripted_llm))


def test_http_error_with_a_non_json_body_keeps_its_text(scripted_llm: ScriptedLLM) -> None:
    scripted_llm.raw("plan it", "<html>Forbidden</html>", status=403)

    with pytest.raises(BackendError, match=r"HTTP 403: <html>Forbidden</html>"):
        _ask(_client(scripted_llm))


# --- the scripted server's Gemini wire ----------------------------------------------------------


def test_scripted_server_also_answers_v1beta(scripted_llm: ScriptedLLM) -> None:
    scripted_llm.reply("hello", ANSWER, input_tokens=3, output_tokens=4)
    body = json.dumps({"contents": [{"role": "user", "parts": [{"text": "hello"}]}]}).encode()
    url = f"{scripted_llm.gemini_base_url}v1beta/models/gemini-beta:generateContent"

    with urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST"), timeout=5) as response:
        answer = json.load(response)

    assert json.loads(answer["candidates"][0]["content"]["parts"][0]["text"]) == ANSWER
    assert answer["usageMetadata"]["promptTokenCount"] == 3
    assert only_request(scripted_llm).model == "gemini-beta"


def test_max_output_tokens_is_sent_and_thinking_tokens_count_as_output(scripted_llm: ScriptedLLM) -> None:
    body = {"candidates": [{"content": {"role": "model", "parts": [{"text": json.dumps(ANSWER)}]},
                            "finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": 12, "candidatesTokenCount": 30, "thoughtsTokenCount": 70}}
    scripted_llm.raw("plan it", json.dumps(body))

    reply = _ask(_client(scripted_llm, max_output_tokens=321))

    assert only_request(scripted_llm).body["generationConfig"]["maxOutputTokens"] == 321
    # Thinking tokens are billed as output and count against maxOutputTokens.
    assert (reply.usage.input_tokens, reply.usage.output_tokens) == (12, 100)


def test_an_answer_cut_at_the_limit_reports_what_it_used(scripted_llm: ScriptedLLM) -> None:
    scripted_llm.reply("plan it", ANSWER, finish_reason="length", input_tokens=40, output_tokens=321)

    with pytest.raises(BackendError, match="MAX_TOKENS") as caught:
        _ask(_client(scripted_llm, max_output_tokens=321))

    usage = caught.value.usage
    assert (usage.input_tokens, usage.output_tokens) == (40, 321)  # type: ignore[attr-defined]
