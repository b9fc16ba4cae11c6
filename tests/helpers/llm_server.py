"""A scripted fake LLM server speaking the OpenAI and Gemini wire formats, for tests.

It sits on pytest-httpserver's ``HTTPServer`` and answers

- OpenAI chat completions: ``POST /v1/chat/completions`` (base URL :attr:`ScriptedLLM.openai_base_url`);
- Gemini: ``POST /v1/models/{model}:generateContent`` and ``/v1beta/...`` (:attr:`ScriptedLLM.gemini_base_url`).

A test scripts replies by prompt text::

    llm = ScriptedLLM(httpserver)
    llm.reply("Plan the refactor", {"title": "x", "steps": []})
    client = make_client(LLMSettings("openai", "gpt-test", base_url=llm.openai_base_url), environ={})

Rules match in registration order on the concatenated prompt text (system + user); the first rule that
matches and is not used up answers. A request no rule matches gets HTTP 500 with
``no scripted reply for prompt: …`` in the provider's error format.

The pytest-httpserver ``httpserver`` fixture serves one request at a time. For requests that must run
concurrently (several threads, a subprocess, ``delay_seconds`` while other calls go on) use
:func:`scripted_llm_server`, which starts a threaded server.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

Wire = Literal["openai", "gemini"]

_GEMINI_PATH = re.compile(r"^/(?:v1|v1beta)/models/(?P<model>[^/:]+):generateContent$")
_OPENAI_PATH = re.compile(r"^/v1/chat/completions$")
# Generic finish reasons of reply(), as each wire spells them.
_GEMINI_FINISH = {"stop": "STOP", "length": "MAX_TOKENS", "content_filter": "SAFETY"}
_GEMINI_STATUS = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                  429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


@dataclass(frozen=True)
class RecordedRequest:
    """One request the server received.

    Attributes:
        wire: ``"openai"`` or ``"gemini"``.
        path: the URL path, e.g. ``/v1/chat/completions``.
        model: the model named in the body (OpenAI) or the path (Gemini).
        prompt: the system and user texts joined by newlines.
        headers: request headers, names in lower case (``authorization``, ``x-goog-api-key``).
        body: the JSON body (``{}`` when it was not JSON).
    """

    wire: Wire
    path: str
    model: str
    prompt: str
    headers: dict[str, str]
    body: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Rule:
    contains: str
    status: int
    payload: dict[str, Any] | str | None  # None: send ``raw_body`` verbatim
    raw_body: str = ""
    times: int | None = None
    delay_seconds: float = 0.0
    input_tokens: int = 11
    output_tokens: int = 7
    finish_reason: str = "stop"
    fired: int = 0

    def available(self, prompt: str) -> bool:
        return self.contains in prompt and (self.times is None or self.fired < self.times)


class ScriptedLLM:
    """Scripted replies over an ``HTTPServer``; thread-safe.

    Args:
        server: a started pytest-httpserver ``HTTPServer``; a catch-all handler is registered on it.
    """

    def __init__(self, server: HTTPServer) -> None:
        self.server = server
        self._rules: list[_Rule] = []
        self._requests: list[RecordedRequest] = []
        self._lock = threading.Condition()
        self._closing = threading.Event()
        server.expect_request(re.compile(".*")).respond_with_handler(self._handle)

    # --- addresses ------------------------------------------------------------------------------

    @property
    def root_url(self) -> str:
        """``http://127.0.0.1:PORT`` (pytest-httpserver's ``localhost`` binds IPv4 only)."""
        host = "127.0.0.1" if self.server.host == "localhost" else self.server.format_host(self.server.host)
        return f"http://{host}:{self.server.port}"

    @property
    def openai_base_url(self) -> str:
        """Base URL for an OpenAI client: ``http://127.0.0.1:PORT/v1``."""
        return f"{self.root_url}/v1"

    @property
    def gemini_base_url(self) -> str:
        """Base URL for a Gemini client: ``http://127.0.0.1:PORT/``."""
        return f"{self.root_url}/"

    # --- scripting ------------------------------------------------------------------------------

    def reply(
        self,
        contains: str,
        payload: dict[str, Any] | str,
        *,
        times: int | None = None,
        delay_seconds: float = 0.0,
        status: int = 200,
        input_tokens: int = 11,
        output_tokens: int = 7,
        finish_reason: str = "stop",
    ) -> None:
        """Answer requests whose prompt contains ``contains``.

        Args:
            contains: a substring of the system + user text.
            payload: the structured answer; a dict is sent JSON-encoded as the answer text, a str as is
                (e.g. malformed JSON). With ``status != 200`` it is the error message.
            times: how many requests this rule answers; ``None`` for all.
            delay_seconds: sleep before answering, seconds (cut short by :meth:`close`).
            status: HTTP status; not 200 sends an error body in the provider's format.
            input_tokens: prompt tokens reported in the usage.
            output_tokens: answer tokens reported in the usage.
            finish_reason: ``"stop"``, ``"length"`` or ``"content_filter"`` (mapped to Gemini's
                ``STOP``, ``MAX_TOKENS``, ``SAFETY``).
        """
        self._add(_Rule(contains, status, payload, times=times, delay_seconds=delay_seconds,
                        input_tokens=input_tokens, output_tokens=output_tokens, finish_reason=finish_reason))

    def raw(self, contains: str, body: str, status: int = 200, *, times: int | None = None,
            delay_seconds: float = 0.0) -> None:
        """Answer requests whose prompt contains ``contains`` with exactly this HTTP body.

        Args:
            contains: a substring of the system + user text.
            body: the HTTP body, sent as ``application/json`` whatever it holds.
            status: HTTP status.
            times: how many requests this rule answers; ``None`` for all.
            delay_seconds: sleep before answering, seconds.
        """
        self._add(_Rule(contains, status, None, raw_body=body, times=times, delay_seconds=delay_seconds))

    def _add(self, rule: _Rule) -> None:
        with self._lock:
            self._rules.append(rule)

    # --- inspection -----------------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received so far, oldest first (a copy)."""
        with self._lock:
            return list(self._requests)

    def count(self, contains: str) -> int:
        """How many received requests have ``contains`` in their prompt."""
        with self._lock:
            return sum(contains in request.prompt for request in self._requests)

    def wait_for(self, contains: str, count: int = 1, timeout: float = 10.0) -> RecordedRequest:
        """Block until ``count`` requests with ``contains`` in their prompt arrived.

        Returns:
            The last of them.

        Raises:
            TimeoutError: fewer arrived within ``timeout`` seconds.
        """
        def matching() -> list[RecordedRequest]:
            return [request for request in self._requests if contains in request.prompt]

        with self._lock:
            if not self._lock.wait_for(lambda: len(matching()) >= count, timeout=timeout):
                raise TimeoutError(f"{len(matching())} of {count} requests containing {contains!r} arrived")
            return matching()[count - 1]

    def close(self) -> None:
        """Cut every pending ``delay_seconds`` short, so the server can stop."""
        self._closing.set()

    # --- serving --------------------------------------------------------------------------------

    def _handle(self, request: Request) -> Response:
        recorded = _record(request)
        if recorded is None:
            return Response(json.dumps({"error": {"message": f"not an LLM endpoint: {request.path}"}}), 404,
                            content_type="application/json")
        with self._lock:
            self._requests.append(recorded)
            rule = next((rule for rule in self._rules if rule.available(recorded.prompt)), None)
            if rule is not None:
                rule.fired += 1
            self._lock.notify_all()
        if rule is None:
            message = f"no scripted reply for prompt: {recorded.prompt[:200]}"
            return _json_response(_error_body(recorded.wire, 500, message), 500)
        if rule.delay_seconds:
            self._closing.wait(rule.delay_seconds)
        return _respond(rule, recorded)


@contextmanager
def scripted_llm_server(host: str = "127.0.0.1") -> Iterator[ScriptedLLM]:
    """Run a threaded server on a free port with a :class:`ScriptedLLM` on it, for concurrent tests.

    Yields:
        The scripted server; it is closed and stopped on exit.
    """
    server = HTTPServer(host=host, port=0, threaded=True)
    server.start()
    llm = ScriptedLLM(server)
    try:
        yield llm
    finally:
        llm.close()
        server.clear()
        server.stop()


# --- wire formats -------------------------------------------------------------------------------


def _record(request: Request) -> RecordedRequest | None:
    body = _json_body(request)
    headers = {name.lower(): value for name, value in request.headers.items()}
    if _OPENAI_PATH.match(request.path):
        prompt = "\n".join(_openai_texts(body.get("messages") or []))
        return RecordedRequest("openai", request.path, str(body.get("model", "")), prompt, headers, body)
    match = _GEMINI_PATH.match(request.path)
    if match:
        prompt = "\n".join(_gemini_texts(body))
        return RecordedRequest("gemini", request.path, match["model"], prompt, headers, body)
    return None


def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(request.get_data(as_text=True) or "{}")
    except json.JSONDecodeError:
        return {}
    return body if isinstance(body, dict) else {}


def _openai_texts(messages: list[Any]) -> Iterator[str]:
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            yield content
        elif isinstance(content, list):  # content parts: [{"type": "text", "text": "…"}]
            yield from (part["text"] for part in content if isinstance(part, dict) and "text" in part)


def _gemini_texts(body: dict[str, Any]) -> Iterator[str]:
    system = body.get("systemInstruction") or body.get("system_instruction")
    contents = body.get("contents") or []
    for content in ([system] if system else []) + list(contents):
        parts = content.get("parts", []) if isinstance(content, dict) else []
        yield from (part["text"] for part in parts if isinstance(part, dict) and "text" in part)


def _respond(rule: _Rule, request: RecordedRequest) -> Response:
    if rule.payload is None:
        return Response(rule.raw_body, rule.status, content_type="application/json")
    text = rule.payload if isinstance(rule.payload, str) else json.dumps(rule.payload)
    if rule.status != 200:
        return _json_response(_error_body(request.wire, rule.status, text), rule.status)
    if request.wire == "openai":
        return _json_response(_openai_body(rule, request, text), 200)
    return _json_response(_gemini_body(rule, request, text), 200)


def _openai_body(rule: _Rule, request: RecordedRequest, text: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-scripted",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": rule.finish_reason}],
        "usage": {"prompt_tokens": rule.input_tokens, "completion_tokens": rule.output_tokens,
                  "total_tokens": rule.input_tokens + rule.output_tokens},
    }


def _gemini_body(rule: _Rule, request: RecordedRequest, text: str) -> dict[str, Any]:
    return {
        "candidates": [{"content": {"role": "model", "parts": [{"text": text}]}, "index": 0,
                        "finishReason": _GEMINI_FINISH.get(rule.finish_reason, rule.finish_reason)}],
        "usageMetadata": {"promptTokenCount": rule.input_tokens, "candidatesTokenCount": rule.output_tokens,
                          "totalTokenCount": rule.input_tokens + rule.output_tokens},
        "modelVersion": request.model,
    }


def _error_body(wire: Wire, status: int, message: str) -> dict[str, Any]:
    if wire == "openai":
        return {"error": {"message": message, "type": "scripted_error", "param": None, "code": None}}
    return {"error": {"code": status, "message": message, "status": _GEMINI_STATUS.get(status, "UNKNOWN")}}


def _json_response(body: dict[str, Any], status: int) -> Response:
    return Response(json.dumps(body), status, content_type="application/json")
