"""OpenAI, and every OpenAI-compatible server (Ollama, vLLM, LM Studio, llama.cpp), via chat completions.

Chat completions with a JSON-schema ``response_format`` is the one endpoint those servers share; the
Responses API is not used. Keys and URLs come from the ``environ`` argument, never from the SDK reading
the process environment itself.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any, NoReturn

import openai
import pydantic
from openai.types.chat import ParsedChatCompletion, ParsedChoice

from conductor.errors import BackendError, CredentialsMissing
from conductor.llm.base import LLMReply, LLMSettings, T, describe_validation_error, one_line, usage_for
from conductor.models import Usage

DEFAULT_BASE_URL = "https://api.openai.com/v1"
# Local servers ignore the key, but the SDK refuses to build a client without one.
PLACEHOLDER_KEY = "conductor-no-key"


def resolve_credentials(settings: LLMSettings, environ: Mapping[str, str]) -> tuple[str, str]:
    """Find the API key and base URL of an OpenAI-compatible server.

    Args:
        settings: ``base_url`` wins over ``OPENAI_BASE_URL``.
        environ: holds ``OPENAI_API_KEY`` and maybe ``OPENAI_BASE_URL``.

    Returns:
        ``(api_key, base_url)``; the key is a placeholder when only a base URL is set, as local
        servers do not check it.

    Raises:
        CredentialsMissing: neither a key nor a base URL is set.
    """
    api_key = environ.get("OPENAI_API_KEY") or None
    base_url = settings.base_url or environ.get("OPENAI_BASE_URL") or None
    if api_key is None and base_url is None:
        raise CredentialsMissing(
            "no OpenAI API key: set OPENAI_API_KEY (or OPENAI_BASE_URL for a local OpenAI-compatible server)"
        )
    return api_key or PLACEHOLDER_KEY, base_url or DEFAULT_BASE_URL


class OpenAIClient:
    """An :class:`~conductor.llm.base.LLMClient` over ``POST {base_url}/chat/completions``.

    Args:
        settings: model, base URL, timeout, retries, temperature and prices.
        environ: where ``OPENAI_API_KEY`` and ``OPENAI_BASE_URL`` are read.

    Raises:
        CredentialsMissing: neither a key nor a base URL is configured.
    """

    def __init__(self, settings: LLMSettings, environ: Mapping[str, str] = os.environ) -> None:
        self.settings = settings
        api_key, self.base_url = resolve_credentials(settings, environ)
        self._client = openai.OpenAI(
            api_key=api_key,
            base_url=self.base_url,
            # None would make the SDK read these from the process environment itself.
            organization=environ.get("OPENAI_ORG_ID"),
            project=environ.get("OPENAI_PROJECT_ID"),
            max_retries=settings.max_retries,
            timeout=settings.timeout_seconds,
        )

    def generate(self, *, system: str, prompt: str, schema: type[T]) -> LLMReply[T]:
        """Ask the model for one answer that validates against ``schema``.

        Args:
            system: the system message.
            prompt: the user message.
            schema: a pydantic model; its strict JSON Schema is sent as ``response_format``.

        Returns:
            The parsed answer with its usage, reported model, raw text and wall time (seconds).

        Raises:
            BackendError: HTTP error (status code in the message), timeout, connection failure,
                a body that is not JSON, an answer cut by the token limit or a content filter,
                a refusal, an empty answer, or an answer that does not match ``schema``.
        """
        started = time.monotonic()
        completion = self._complete(system, prompt, schema)
        parsed, raw_text = self._answer(completion, schema)
        return LLMReply(
            parsed=parsed,
            usage=self._usage(completion),
            model=completion.model or self.settings.model,
            raw_text=raw_text,
            duration_seconds=time.monotonic() - started,
        )

    def _complete(self, system: str, prompt: str, schema: type[T]) -> ParsedChatCompletion[T]:
        extra: dict[str, Any] = {self._max_tokens_parameter(): self.settings.max_output_tokens}
        if self.settings.temperature is not None:
            extra["temperature"] = self.settings.temperature
        try:
            return self._client.chat.completions.parse(
                model=self.settings.model,
                messages=[{"role": "system", "content": system}, {"role": "user", "content": prompt}],
                response_format=schema,
                **extra,
            )
        except pydantic.ValidationError as exc:
            self._fail(describe_validation_error(exc, schema), exc)
        except json.JSONDecodeError as exc:
            # The SDK leaks this raw on a 200 whose body is not JSON.
            self._fail(f"the server's response body is not JSON ({exc.msg} at char {exc.pos})", exc)
        except (openai.LengthFinishReasonError, openai.ContentFilterFinishReasonError) as exc:
            # An answer came and is billed, though unusable.
            completion = getattr(exc, "completion", None)
            self._fail(describe_sdk_error(exc, self.settings), exc,
                       usage=self._usage(completion) if completion is not None else None)
        except openai.OpenAIError as exc:
            self._fail(describe_sdk_error(exc, self.settings), exc)
        except (TypeError, AttributeError, KeyError) as exc:
            # The SDK builds the completion without validation and trips over a 200 whose JSON lacks
            # the chat-completion shape (``{}``, ``"choices": "x"``).
            self._fail(f"the server's response is not a chat completion ({type(exc).__name__}: {exc})", exc)

    def _max_tokens_parameter(self) -> str:
        # OpenAI deprecated max_tokens, and its reasoning models refuse it; Ollama, LM Studio and older
        # llama.cpp and vLLM know only max_tokens.
        return "max_completion_tokens" if self.base_url.rstrip("/") == DEFAULT_BASE_URL else "max_tokens"

    def _answer(self, completion: ParsedChatCompletion[T], schema: type[T]) -> tuple[T, str]:
        usage = self._usage(completion)
        if not completion.choices:
            self._fail("the response holds no choices", usage=usage)
        choice: ParsedChoice[T] = completion.choices[0]
        message = choice.message
        if message.refusal:
            self._fail(f"the model refused: {message.refusal}", usage=usage)
        if message.parsed is None:
            self._fail(f"the answer is empty (finish_reason={choice.finish_reason}), expected {schema.__name__}",
                       usage=usage)
        return message.parsed, message.content or ""

    def _usage(self, completion: Any) -> Usage:
        usage = completion.usage
        return usage_for(self.settings, usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0)

    def _fail(self, reason: str, cause: BaseException | None = None, *, usage: Usage | None = None) -> NoReturn:
        message = one_line(f"openai model {self.settings.model!r} at {self.base_url}: {reason}", limit=500)
        raise BackendError(message, usage=usage) from cause


def describe_sdk_error(exc: openai.OpenAIError, settings: LLMSettings) -> str:
    """Say in one line what an ``openai`` exception means.

    Args:
        exc: the exception the SDK raised (after its own retries).
        settings: the settings of the call, for the timeout and the number of tries.

    Returns:
        E.g. ``"HTTP 429: Rate limit reached"`` or ``"timed out after 120 s (tried 3 times)"``.
    """
    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code}: {_error_detail(exc)}"
    if isinstance(exc, openai.APITimeoutError):
        return f"timed out after {settings.timeout_seconds:g} s (tried {settings.max_retries + 1} times)"
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc
        return f"cannot connect (tried {settings.max_retries + 1} times): {type(cause).__name__}: {cause}"
    if isinstance(exc, openai.LengthFinishReasonError):
        return "the answer was cut at the token limit (finish_reason=length)"
    if isinstance(exc, openai.ContentFilterFinishReasonError):
        return "the provider's content filter stopped the answer (finish_reason=content_filter)"
    return f"{type(exc).__name__}: {exc}"


def _error_detail(exc: openai.APIStatusError) -> str:
    # The SDK stores the inner "error" object of {"error": {"message": ...}} as ``body``.
    body = exc.body
    if isinstance(body, Mapping) and body.get("message"):
        return str(body["message"])
    if isinstance(body, str) and body:
        return body
    return exc.message
