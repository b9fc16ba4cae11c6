"""Google Gemini (the Gemini Developer API), via ``google-genai``'s ``generate_content``.

Keys and URLs come from the ``environ`` argument:

- ``GOOGLE_API_KEY`` or ``GEMINI_API_KEY`` (the first wins, as in the SDK);
- ``GEMINI_BASE_URL`` (or the SDK's own ``GOOGLE_GEMINI_BASE_URL``): the API root, for a proxy or a test
  server, e.g. ``http://127.0.0.1:8080/``; ``LLMSettings.base_url`` wins over both.

The SDK fills ``response.parsed`` with ``None`` when the answer is not JSON or does not match the schema,
so the answer text is validated here, and a failure says why.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from collections.abc import Mapping
from typing import NoReturn

import pydantic
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from conductor.errors import BackendError, CredentialsMissing
from conductor.llm.base import LLMReply, LLMSettings, T, describe_validation_error, one_line, usage_for
from conductor.models import Usage

DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com/"
# Backoff of retries, seconds: 0.5, 1, 2 … (+ up to 0.25 jitter), as the openai SDK does.
RETRY_INITIAL_DELAY = 0.5
RETRY_MAX_DELAY = 8.0
RETRY_JITTER = 0.25
# Finish reasons that still carry a complete answer.
COMPLETE_FINISH_REASONS = {None, "STOP", "FINISH_REASON_UNSPECIFIED"}


def resolve_credentials(settings: LLMSettings, environ: Mapping[str, str]) -> tuple[str, str]:
    """Find the API key and base URL of the Gemini API.

    Args:
        settings: ``base_url`` wins over the environment.
        environ: holds ``GOOGLE_API_KEY`` / ``GEMINI_API_KEY`` and maybe ``GEMINI_BASE_URL``.

    Returns:
        ``(api_key, base_url)``.

    Raises:
        CredentialsMissing: neither key variable is set.
    """
    api_key = environ.get("GOOGLE_API_KEY") or environ.get("GEMINI_API_KEY")
    if not api_key:
        raise CredentialsMissing("no Gemini API key: set GOOGLE_API_KEY or GEMINI_API_KEY")
    base_url = (
        settings.base_url
        or environ.get("GEMINI_BASE_URL")
        or environ.get("GOOGLE_GEMINI_BASE_URL")
        or DEFAULT_BASE_URL
    )
    return api_key, base_url


def _http_library_errors(name: str) -> tuple[type[BaseException], ...]:
    # The SDK runs on httpx2 or httpx (whichever is installed) and lets their errors escape raw.
    found: list[type[BaseException]] = []
    for library in ("httpx2", "httpx"):
        try:
            found.append(getattr(importlib.import_module(library), name))
        except ImportError:
            continue
    return tuple(found)


TRANSPORT_ERRORS = _http_library_errors("HTTPError")
TIMEOUT_ERRORS = _http_library_errors("TimeoutException")


class GeminiClient:
    """An :class:`~conductor.llm.base.LLMClient` over ``POST {base_url}/v1/models/{model}:generateContent``.

    Args:
        settings: model, base URL, timeout, retries, temperature and prices.
        environ: where the key and base URL are read (see the module docstring).

    Raises:
        CredentialsMissing: no key is configured.
    """

    def __init__(self, settings: LLMSettings, environ: Mapping[str, str] = os.environ) -> None:
        self.settings = settings
        api_key, self.base_url = resolve_credentials(settings, environ)
        # Kept on self: a Client that is garbage-collected closes its HTTP client mid-use.
        self._client = genai.Client(
            vertexai=False,  # never let GOOGLE_GENAI_USE_VERTEXAI in the process switch APIs
            api_key=api_key,
            http_options=types.HttpOptions(
                base_url=self.base_url,
                timeout=round(settings.timeout_seconds * 1000),  # the SDK wants milliseconds
                retry_options=types.HttpRetryOptions(
                    attempts=settings.max_retries + 1,
                    initial_delay=RETRY_INITIAL_DELAY,
                    max_delay=RETRY_MAX_DELAY,
                    jitter=RETRY_JITTER,
                ),
            ),
        )

    def generate(self, *, system: str, prompt: str, schema: type[T]) -> LLMReply[T]:
        """Ask the model for one answer that validates against ``schema``.

        Args:
            system: the system instruction.
            prompt: the user content.
            schema: a pydantic model, sent as ``response_schema`` with ``application/json``.

        Returns:
            The parsed answer with its usage, reported model, raw text and wall time (seconds).

        Raises:
            BackendError: HTTP error (status code in the message), timeout, connection failure,
                a body that is not JSON, a blocked or truncated answer, an empty answer, or an
                answer that does not match ``schema``.
        """
        started = time.monotonic()
        response = self._generate(system, prompt, schema)
        usage = self._usage(response)
        text = self._answer_text(response, usage)
        try:
            parsed = schema.model_validate_json(text)
        except pydantic.ValidationError as exc:
            self._fail(describe_validation_error(exc, schema), exc, usage=usage)
        return LLMReply(
            parsed=parsed,
            usage=usage,
            model=response.model_version or self.settings.model,
            raw_text=text,
            duration_seconds=time.monotonic() - started,
        )

    def _generate(self, system: str, prompt: str, schema: type[T]) -> types.GenerateContentResponse:
        config = types.GenerateContentConfig(
            system_instruction=system,
            response_mime_type="application/json",
            response_schema=schema,
            temperature=self.settings.temperature,
            max_output_tokens=self.settings.max_output_tokens,
        )
        try:
            return self._client.models.generate_content(model=self.settings.model, contents=prompt, config=config)
        except genai_errors.APIError as exc:
            self._fail(f"HTTP {exc.code}: {exc.message or exc.status or exc.details}", exc)
        except (genai_errors.UnknownApiResponseError, json.JSONDecodeError) as exc:
            # The SDK raises the raw JSONDecodeError on a 200 whose body is not JSON.
            self._fail("the server's response body is not JSON", exc)
        except pydantic.ValidationError as exc:
            self._fail(f"the server's response does not have the Gemini shape: {one_line(exc)}", exc)
        except TRANSPORT_ERRORS as exc:
            self._fail(self._transport_reason(exc), exc)

    def _transport_reason(self, exc: BaseException) -> str:
        tries = self.settings.max_retries + 1
        if isinstance(exc, TIMEOUT_ERRORS):
            return f"timed out after {self.settings.timeout_seconds:g} s (tried {tries} times)"
        return f"cannot connect (tried {tries} times): {type(exc).__name__}: {exc}"

    def _usage(self, response: types.GenerateContentResponse) -> Usage:
        metadata = response.usage_metadata
        if metadata is None:
            return usage_for(self.settings, 0, 0)
        # Thinking tokens (Gemini 2.5) are billed as output and count against maxOutputTokens.
        output = (metadata.candidates_token_count or 0) + (metadata.thoughts_token_count or 0)
        return usage_for(self.settings, metadata.prompt_token_count, output)

    def _answer_text(self, response: types.GenerateContentResponse, usage: Usage) -> str:
        feedback = response.prompt_feedback
        if feedback is not None and feedback.block_reason is not None:
            self._fail(f"the prompt was blocked ({_name(feedback.block_reason)})", usage=usage)
        if not response.candidates:
            self._fail("the response holds no candidates", usage=usage)
        finish = _name(response.candidates[0].finish_reason)
        if finish == "MAX_TOKENS":
            self._fail("the answer was cut at the token limit (finishReason=MAX_TOKENS)", usage=usage)
        if finish not in COMPLETE_FINISH_REASONS:
            self._fail(f"the model stopped without a complete answer (finishReason={finish})", usage=usage)
        text = response.text
        if not text:
            self._fail(f"the answer is empty (finishReason={finish})", usage=usage)
        return text

    def _fail(self, reason: str, cause: BaseException | None = None, *, usage: Usage | None = None) -> NoReturn:
        message = one_line(f"gemini model {self.settings.model!r} at {self.base_url}: {reason}", limit=500)
        raise BackendError(message, usage=usage) from cause


def _name(value: object) -> str | None:
    # SDK enums are str subclasses; unknown values from newer servers arrive as plain strings.
    if value is None:
        return None
    return str(getattr(value, "value", value))
