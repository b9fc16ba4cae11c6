"""The provider-neutral surface of the LLM layer: settings, the reply, and the client protocol.

Nothing here imports an SDK: a backend module (``openai_backend``, ``gemini_backend``) does that, and
``conductor.llm.make_client`` imports the backend only when it is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from pydantic import BaseModel, ValidationError

from conductor.errors import ConfigError
from conductor.models import Usage

T = TypeVar("T", bound=BaseModel)

TOKENS_PER_MILLION = 1_000_000
DEFAULT_MAX_OUTPUT_TOKENS = 16_384
"""Answer tokens asked for at most when the config says nothing: within the output limit of the common
models (gpt-4o and gpt-4o-mini: 16,384; gpt-4.1: 32,768; Gemini 2.5: 65,536); a larger value is a 400
from a model whose limit is lower."""


@dataclass(frozen=True)
class LLMSettings:
    """How to reach one model of one provider.

    Attributes:
        provider: ``"openai"`` (also any OpenAI-compatible server) or ``"gemini"``.
        model: the model name sent to the provider, e.g. ``"gpt-4.1-mini"``.
        base_url: the API root, e.g. ``"http://127.0.0.1:11434/v1"``; ``None`` reads the provider's
            environment variable (``OPENAI_BASE_URL``, ``GEMINI_BASE_URL``) or uses the public API.
        timeout_seconds: wall time of one HTTP attempt, seconds.
        max_retries: retries after the first attempt, on timeouts, connection errors, 408, 429, 5xx.
        temperature: sampling temperature; ``None`` leaves the provider's default.
        input_usd_per_million: price of one million input tokens, USD.
        output_usd_per_million: price of one million output tokens, USD.
        max_output_tokens: answer tokens the model may write at most, sent with every request
            (OpenAI ``max_completion_tokens``, or ``max_tokens`` for other OpenAI-compatible servers;
            Gemini ``maxOutputTokens``); it makes a call's worst case, which budgets reserve, real.
    """

    provider: str
    model: str
    base_url: str | None = None
    timeout_seconds: float = 120.0
    max_retries: int = 2
    temperature: float | None = None
    input_usd_per_million: float | None = None
    output_usd_per_million: float | None = None
    max_output_tokens: int = DEFAULT_MAX_OUTPUT_TOKENS

    def __post_init__(self) -> None:
        """Reject values no provider can use.

        Raises:
            ConfigError: naming the setting, for an empty model, a timeout <= 0, negative retries,
                a negative price or ``max_output_tokens`` < 1.
        """
        problems = {
            "model": not self.model,
            "timeout_seconds": self.timeout_seconds <= 0,
            "max_retries": self.max_retries < 0,
            "input_usd_per_million": (self.input_usd_per_million or 0.0) < 0,
            "output_usd_per_million": (self.output_usd_per_million or 0.0) < 0,
            "max_output_tokens": self.max_output_tokens < 1,
        }
        for name, bad in problems.items():
            if bad:
                raise ConfigError(f"LLM setting {name} has an invalid value: {getattr(self, name)!r}")


@dataclass(frozen=True)
class LLMReply(Generic[T]):
    """One structured answer of a model.

    Attributes:
        parsed: the answer, an instance of the requested schema.
        usage: tokens of the call; ``cost_usd`` is set when the settings carry a price.
        model: the model name the server reported (``settings.model`` when it reported none).
        raw_text: the text of the structured answer, as received (JSON).
        duration_seconds: wall time of the call including retries, seconds (``0.0`` for a replay).
        recording: ``"sha256:<hex>"`` key of the recording that holds this call, when the client
            records (see ``conductor.llm.recording``); ``None`` otherwise.
        cached: the answer was replayed from a recording, not paid for now; ``usage`` is then the
            recorded call's usage, a fact of that call, not new spending.
    """

    parsed: T
    usage: Usage
    model: str
    raw_text: str
    duration_seconds: float
    recording: str | None = None
    cached: bool = False


class LLMClient(Protocol):
    """A provider that turns a system prompt and a user prompt into an instance of a schema."""

    settings: LLMSettings

    def generate(self, *, system: str, prompt: str, schema: type[T]) -> LLMReply[T]:
        """Ask the model for one answer that validates against ``schema``.

        Raises:
            BackendError: the provider failed, timed out, or answered something that does not parse.
        """
        ...


def usage_for(settings: LLMSettings, input_tokens: int | None, output_tokens: int | None) -> Usage:
    """Build the :class:`Usage` of one call, priced when the settings carry a price.

    Args:
        settings: the settings of the call; a price left ``None`` counts as zero as long as the
            other one is set, and when neither is set ``cost_usd`` is ``None`` (unknown, not free).
        input_tokens: prompt tokens the provider reported (``None`` counts as 0).
        output_tokens: answer tokens the provider reported (``None`` counts as 0).

    Returns:
        The usage, with ``cost_usd`` in USD or ``None``.
    """
    tokens_in, tokens_out = input_tokens or 0, output_tokens or 0
    price_in, price_out = settings.input_usd_per_million, settings.output_usd_per_million
    cost = None
    if price_in is not None or price_out is not None:
        cost = (tokens_in * (price_in or 0.0) + tokens_out * (price_out or 0.0)) / TOKENS_PER_MILLION
    return Usage(input_tokens=tokens_in, output_tokens=tokens_out, cost_usd=cost)


def one_line(text: object, limit: int = 300) -> str:
    """Squash any text to one line of at most ``limit`` characters, for error messages."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def describe_validation_error(exc: ValidationError, schema: type[BaseModel], limit: int = 3) -> str:
    """Summarise why an answer does not validate, in one line.

    Args:
        exc: the error pydantic raised.
        schema: the schema the answer was checked against (named in the summary).
        limit: how many individual errors to list before "and N more".

    Returns:
        E.g. ``"answer does not match Plan: steps: Field required; title: Input should be a valid string"``.
    """
    errors = exc.errors(include_url=False)
    parts = [f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in errors[:limit]]
    more = f" (and {len(errors) - limit} more)" if len(errors) > limit else ""
    return one_line(f"answer does not match {schema.__name__}: {'; '.join(parts)}{more}")
