"""The OpenAI backend (also every OpenAI-compatible server) against the scripted server."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from conductor.errors import BackendError, CredentialsMissing
from conductor.llm import LLMClient, LLMReply, LLMSettings, make_client
from conductor.llm.openai_backend import PLACEHOLDER_KEY, OpenAIClient
from tests.helpers.llm_server import ScriptedLLM, scripted_llm_server
from tests.llm.conftest import ANSWER, MODEL, SYSTEM, Answer, BackendContract, only_request

KEY = "sk-test-0123"


class TestOpenAIContract(BackendContract):
    provider = "openai"
    environ = {"OPENAI_API_KEY": KEY}
    key_header = ("authorization", f"Bearer {KEY}")
    key_variables = ("OPENAI_API_KEY", "OPENAI_BASE_URL")

    def base_url(self, llm: ScriptedLLM) -> str:
        return llm.openai_base_url


def _client(llm: ScriptedLLM, environ: dict[str, str] | None = None, **options: object) -> LLMClient:
    settings = LLMSettings("openai", MODEL, **({"base_url": llm.openai_base_url, "max_retries": 0} | options))
    return make_client(settings, environ=environ if environ is not None else {"OPENAI_API_KEY": KEY})


def _ask(client: LLMClient, prompt: str = "plan it") -> LLMReply[Answer]:
    return client.generate(system=SYSTEM, prompt=prompt, schema=Answer)


# --- configuration ------------------------------------------------------------------------------


def test_base_url_without_key_uses_a_placeholder_key(scripted_llm: ScriptedLLM) -> None:
    scripted_llm.reply("plan it", ANSWER)

    _ask(_client(scripted_llm, environ={}))

    assert only_request(scripted_llm).headers["authorization"] == f"Bearer {PLACEHOLDER_KEY}"


def test_base_url_is_read_from_openai_base_url(scripted_llm: ScriptedLLM) -> None:
    scripted_llm.reply("plan it", ANSWER)
    client = make_client(LLMSettings("openai", MODEL, max_retries=0),
                         environ={"OPENAI_BASE_URL": scripted_llm.openai_base_url})

    assert _ask(client).parsed == Answer(**ANSWER)
    assert isinstance(client, OpenAIClient) and client.base_url == scripted_llm.openai_base_url


def test_settings_base_url_wins_over_the_environment(scripted_llm: ScriptedLLM) -> None:
    client = _client(scripted_llm, environ={"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"})

    assert isinstance(client, OpenAIClient) and client.base_url == scripted_llm.openai_base_url


def test_process_environment_is_not_read(scripted_llm: ScriptedLLM, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-the-process")
    scripted_llm.reply("plan it", ANSWER)

    with pytest.raises(CredentialsMissing):
        make_client(LLMSettings("openai", MODEL), environ={})
    _ask(_client(scripted_llm, environ={}))

    assert only_request(scripted_llm).headers["authorization"] == f"Bearer {PLACEHOLDER_KEY}"


# --- what is sent ---------------------------------------------------------------------------------


def test_schema_is_sent_as_strict_json_schema_response_format(scripted_llm: ScriptedLLM) -> None:
    scripted_llm.reply("plan it", ANSWER)

    _ask(_client(scripted_llm))

    body = only_request(scripted_llm).body
    assert body["messages"] == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "plan it"}]
    response_format = body["response_format"]
    assert response_format["type"] == "json_schema"
    assert response_format["json_schema"]["name"] == "Answer"
    assert response_format["json_schema"]["strict"] is True
    assert set(response_format["json_schema"]["schema"]["required"]) == {"title", "steps"}


@pytest.mark.parametrize("temperature", [None, 0.0, 0.7])
def test_temperature_is_sent_only_when_set(scripted_llm: ScriptedLLM, temperature: float | None) -> None:
    scripted_llm.reply("plan it", ANSWER)

    _ask(_client(scripted_llm, temperature=temperature))

    assert only_request(scripted_llm).body.get("temperature") == temperature


# --- answers --------------------------------------------------------------------------------------


def _completion(message: dict[str, object], finish_reason: str = "stop", **extra: object) -> str:
    return json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", **message},
                                    "finish_reason": finish_reason}], **extra})


def test_model_falls_back_to_settings_and_usage_to_zero(scripted_llm: ScriptedLLM) -> None:
    scripted_llm.raw("plan it", _completion({"content": json.dumps(ANSWER)}))

    reply = _client(scripted_llm).generate(system=SYSTEM, prompt="plan it", schema=Answer)

    assert reply.model == MODEL
    assert (reply.usage.input_tokens, reply.usage.output_tokens) == (0, 0)


def test_reported_model_is_kept(scripted_llm: ScriptedLLM) -> None:
    scripted_llm.raw("plan it", _completion({"content": json.dumps(ANSWER)}, model="gpt-x-2026-11-01"))

    assert _client(scripted_llm).generate(system=SYSTEM, prompt="plan it", schema=Answer).model == "gpt-x-2026-11-01"


def test_refusal_is_a_backend_error(scripted_llm: ScriptedLLM) -> None:
    scripted_llm.raw("plan it", _completion({"content": None, "refusal": "I can't help with that."}))

    with pytest.raises(BackendError, match="the model refused: I can't help with that."):
        _ask(_client(scripted_llm))


def test_empty_answer_is_a_backend_error(scripted_llm: ScriptedLLM) -> None:
    scripted_llm.raw("plan it", _completion({"content": ""}))

    with pytest.raises(BackendError, match=r"the answer is empty \(finish_reason=stop\), expected Answer"):
        _ask(_client(scripted_llm))


def test_content_filter_is_a_backend_error(scripted_llm: ScriptedLLM) -> None:
    scripted_llm.reply("plan it", ANSWER, finish_reason="content_filter")

    with pytest.raises(BackendError, match="content filter"):
        _ask(_client(scripted_llm))


@pytest.mark.parametrize("body", ["{}", '{"choices": "none"}', '{"choices": []}'])
def test_body_that_is_not_a_chat_completion_is_a_backend_error(scripted_llm: ScriptedLLM, body: str) -> None:
    scripted_llm.raw("plan it", body)

    with pytest.raises(BackendError, match="not a chat completion|no choices"):
        _ask(_client(scripted_llm))


def test_http_error_with_a_non_json_body_keeps_its_text(scripted_llm: ScriptedLLM) -> None:
    scripted_llm.raw("plan it", "<html>Bad Gateway</html>", status=502)

    with pytest.raises(BackendError, match=r"HTTP 502: <html>Bad Gateway</html>"):
        _ask(_client(scripted_llm))


# --- concurrency ----------------------------------------------------------------------------------


def test_one_client_serves_concurrent_threads() -> None:
    with scripted_llm_server() as llm:
        llm.reply("job", ANSWER, delay_seconds=0.2)
        client = _client(llm, timeout_seconds=10.0)

        with ThreadPoolExecutor(max_workers=8) as pool:
            replies = list(pool.map(lambda n: _ask(client, f"job {n}"), range(8)))

        assert all(reply.parsed == Answer(**ANSWER) for reply in replies)
        assert sorted(request.prompt for request in llm.requests) == sorted(f"{SYSTEM}\njob {n}" for n in range(8))
        # 8 calls of 0.2 s each overlapped: the threaded server answered them concurrently.
        assert max(reply.duration_seconds for reply in replies) < 1.2


def test_organization_and_project_come_from_environ(scripted_llm: ScriptedLLM) -> None:
    scripted_llm.reply("plan it", ANSWER)

    _ask(_client(scripted_llm, environ={"OPENAI_API_KEY": KEY, "OPENAI_ORG_ID": "org-1", "OPENAI_PROJECT_ID": "p-2"}))

    headers = only_request(scripted_llm).headers
    assert (headers["openai-organization"], headers["openai-project"]) == ("org-1", "p-2")


def test_max_tokens_is_sent_to_a_compatible_server_and_max_completion_tokens_to_openai(scripted_llm: ScriptedLLM) -> None:
    scripted_llm.reply("plan it", ANSWER)

    _ask(_client(scripted_llm, max_output_tokens=321))

    body = only_request(scripted_llm).body
    assert body["max_tokens"] == 321 and "max_completion_tokens" not in body
    official = OpenAIClient(LLMSettings("openai", MODEL), environ={"OPENAI_API_KEY": KEY})
    assert official._max_tokens_parameter() == "max_completion_tokens"  # OpenAI's reasoning models refuse max_tokens


def test_an_answer_cut_at_the_limit_reports_what_it_used(scripted_llm: ScriptedLLM) -> None:
    scripted_llm.reply("plan it", ANSWER, finish_reason="length", input_tokens=40, output_tokens=321)

    with pytest.raises(BackendError, match="token limit") as caught:
        _ask(_client(scripted_llm))

    usage = caught.value.usage
    assert (usage.input_tokens, usage.output_tokens) == (40, 321)  # type: ignore[attr-defined]
