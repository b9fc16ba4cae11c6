"""Fixtures of the LLM tests, and the contract every backend must meet.

``BackendContract`` is a mixin (as huey's ``StorageTests``): ``test_openai_backend.py`` and
``test_gemini_backend.py`` subclass it once per provider, so each contract test runs against both wire
formats of the scripted server. Nothing here reaches a real API: every client points at that server.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel, Field
from pytest_httpserver import HTTPServer

from conductor.errors import BackendError, CredentialsMissing
from conductor.llm import LLMClient, LLMSettings, make_client
from tests.helpers.llm_server import RecordedRequest, ScriptedLLM

MODEL = "scripted-model-1"
SYSTEM = "You are the Conductor planner."
# Variables the SDKs would read from the process environment; none may leak into a test.
SDK_ENV_VARS = (
    "OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_ADMIN_KEY", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID",
    "OPENAI_CUSTOM_HEADERS", "GOOGLE_API_KEY", "GEMINI_API_KEY", "GEMINI_BASE_URL", "GOOGLE_GEMINI_BASE_URL",
    "GOOGLE_GENAI_USE_VERTEXAI", "GOOGLE_GENAI_USE_ENTERPRISE", "GOOGLE_GENAI_API_VERSION",
)


class Answer(BaseModel):
    """The schema the contract tests ask for."""

    title: str
    steps: list[str] = Field(min_length=1)


ANSWER = {"title": "Split the parser", "steps": ["extract lexer", "add tests"]}


@pytest.fixture(autouse=True)
def no_sdk_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys and URLs reach the clients only through ``environ``: clear the process's own."""
    for name in SDK_ENV_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def scripted_llm(httpserver: HTTPServer) -> Iterator[ScriptedLLM]:
    """A :class:`ScriptedLLM` on pytest-httpserver's (single-threaded) ``httpserver``."""
    llm = ScriptedLLM(httpserver)
    yield llm
    llm.close()


@pytest.fixture
def closed_port() -> int:
    """A local TCP port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class BackendContract:
    """What every LLM backend does, checked against the scripted server.

    Subclasses set the class attributes below for their provider.
    """

    provider: ClassVar[str]
    environ: ClassVar[dict[str, str]]
    key_header: ClassVar[tuple[str, str]]  # (lower-case header name, expected value)
    key_variables: ClassVar[tuple[str, ...]]  # what the CredentialsMissing message must name

    def base_url(self, llm: ScriptedLLM) -> str:
        raise NotImplementedError

    @pytest.fixture
    def make(self, scripted_llm: ScriptedLLM) -> Callable[..., LLMClient]:
        def make(**overrides: Any) -> LLMClient:
            options: dict[str, Any] = {"base_url": self.base_url(scripted_llm), "timeout_seconds": 5.0,
                                       "max_retries": 1} | overrides
            return make_client(LLMSettings(self.provider, MODEL, **options), environ=self.environ)

        return make

    def ask(self, client: LLMClient, prompt: str) -> Any:
        return client.generate(system=SYSTEM, prompt=prompt, schema=Answer)

    # --- success ----------------------------------------------------------------------------

    def test_structured_reply_is_parsed(self, make: Callable[..., LLMClient], scripted_llm: ScriptedLLM) -> None:
        scripted_llm.reply("split the parser", ANSWER)

        reply = self.ask(make(), "Please split the parser.")

        assert reply.parsed == Answer(**ANSWER)
        assert Answer.model_validate_json(reply.raw_text) == reply.parsed
        assert reply.model == MODEL
        assert 0.0 <= reply.duration_seconds < 5.0

    def test_usage_is_recorded_without_cost_when_unpriced(
        self, make: Callable[..., LLMClient], scripted_llm: ScriptedLLM
    ) -> None:
        scripted_llm.reply("count", ANSWER, input_tokens=1234, output_tokens=56)

        usage = self.ask(make(), "count tokens").usage

        assert (usage.input_tokens, usage.output_tokens, usage.cost_usd) == (1234, 56, None)

    def test_cost_is_computed_from_prices(self, make: Callable[..., LLMClient], scripted_llm: ScriptedLLM) -> None:
        scripted_llm.reply("price", ANSWER, input_tokens=1_000, output_tokens=500)
        client = make(input_usd_per_million=2.0, output_usd_per_million=8.0)

        usage = self.ask(client, "price it").usage

        assert usage.cost_usd == pytest.approx(1_000 * 2.0 / 1e6 + 500 * 8.0 / 1e6)

    def test_system_prompt_model_and_key_reach_the_server(
        self, make: Callable[..., LLMClient], scripted_llm: ScriptedLLM
    ) -> None:
        scripted_llm.reply("the user part", ANSWER)

        self.ask(make(), "the user part")

        [request] = scripted_llm.requests
        assert request.wire == self.provider
        assert request.model == MODEL
        assert request.prompt == f"{SYSTEM}\nthe user part"
        name, value = self.key_header
        assert request.headers[name] == value

    # --- HTTP errors ------------------------------------------------------------------------

    def test_http_400_fails_without_retry(self, make: Callable[..., LLMClient], scripted_llm: ScriptedLLM) -> None:
        scripted_llm.reply("bad", "unknown field: frobnicate", status=400)

        with pytest.raises(BackendError, match=r"HTTP 400: unknown field: frobnicate") as caught:
            self.ask(make(max_retries=2), "bad request")

        assert not isinstance(caught.value, CredentialsMissing)
        assert scripted_llm.count("bad request") == 1

    def test_http_500_is_retried_then_fails(self, make: Callable[..., LLMClient], scripted_llm: ScriptedLLM) -> None:
        scripted_llm.reply("flaky", "overloaded", status=500)

        with pytest.raises(BackendError, match=r"HTTP 500: overloaded"):
            self.ask(make(max_retries=1), "flaky server")

        assert scripted_llm.count("flaky server") == 2

    def test_http_500_then_success_recovers(self, make: Callable[..., LLMClient], scripted_llm: ScriptedLLM) -> None:
        scripted_llm.reply("once", "blip", status=503, times=1)
        scripted_llm.reply("once", ANSWER)

        reply = self.ask(make(max_retries=1), "fails once")

        assert reply.parsed == Answer(**ANSWER)
        assert scripted_llm.count("fails once") == 2

    def test_missing_scripted_reply_is_a_backend_error(
        self, make: Callable[..., LLMClient], scripted_llm: ScriptedLLM
    ) -> None:
        with pytest.raises(BackendError, match="no scripted reply for prompt"):
            self.ask(make(max_retries=0), "nobody scripted this")

    # --- transport --------------------------------------------------------------------------

    def test_connection_refused_is_a_backend_error(self, make: Callable[..., LLMClient], closed_port: int) -> None:
        client = make(base_url=f"http://127.0.0.1:{closed_port}/v1", max_retries=0)

        with pytest.raises(BackendError, match="cannot connect"):
            self.ask(client, "anyone there?")

    def test_timeout_is_a_backend_error(self, make: Callable[..., LLMClient], scripted_llm: ScriptedLLM) -> None:
        scripted_llm.reply("slow", ANSWER, delay_seconds=3.0)

        with pytest.raises(BackendError, match=r"timed out after 0.3 s"):
            self.ask(make(timeout_seconds=0.3, max_retries=0), "slow answer")

    # --- answers that do not parse ----------------------------------------------------------

    def test_malformed_json_body_is_a_backend_error(
        self, make: Callable[..., LLMClient], scripted_llm: ScriptedLLM
    ) -> None:
        scripted_llm.raw("garbled", '{"choices": [', status=200)

        with pytest.raises(BackendError, match="response body is not JSON"):
            self.ask(make(), "garbled body")

    def test_answer_that_is_not_json_is_a_backend_error(
        self, make: Callable[..., LLMClient], scripted_llm: ScriptedLLM
    ) -> None:
        scripted_llm.reply("prose", "Sure! Here is your plan: step one...")

        with pytest.raises(BackendError, match=r"answer does not match Answer: .*Invalid JSON"):
            self.ask(make(), "prose please")

    def test_answer_not_matching_schema_is_a_backend_error(
        self, make: Callable[..., LLMClient], scripted_llm: ScriptedLLM
    ) -> None:
        scripted_llm.reply("mismatch", {"title": 3, "steps": []})

        with pytest.raises(BackendError, match=r"answer does not match Answer: title: .*; steps: ") as caught:
            self.ask(make(), "schema mismatch")

        assert "\n" not in str(caught.value)

    def test_answer_cut_at_token_limit_is_a_backend_error(
        self, make: Callable[..., LLMClient], scripted_llm: ScriptedLLM
    ) -> None:
        scripted_llm.reply("long", ANSWER, finish_reason="length")

        with pytest.raises(BackendError, match="cut at the token limit"):
            self.ask(make(), "a long answer")

    # --- credentials ------------------------------------------------------------------------

    def test_missing_key_raises_credentials_missing(self) -> None:
        settings = LLMSettings(self.provider, MODEL)

        with pytest.raises(CredentialsMissing) as caught:
            make_client(settings, environ={})

        message = str(caught.value)
        assert "\n" not in message
        assert all(name in message for name in self.key_variables)
        assert caught.value.exit_code == 7


def only_request(llm: ScriptedLLM) -> RecordedRequest:
    """The one request the server received (fails if there were more or none)."""
    [request] = llm.requests
    return request
