"""LLM providers behind one protocol, chosen by name.

``make_client(settings)`` looks the provider up in :data:`BACKENDS` and imports its module only then,
so ``import conductor.llm`` never loads ``openai`` or ``google.genai``.

Environment variables read by the backends (through the ``environ`` argument):

==================  =============================================================================
``OPENAI_API_KEY``  key of the ``openai`` provider (optional when a base URL is set: local servers)
``OPENAI_BASE_URL`` API root of an OpenAI-compatible server, e.g. ``http://127.0.0.1:11434/v1``
``GOOGLE_API_KEY``  key of the ``gemini`` provider (wins over ``GEMINI_API_KEY``)
``GEMINI_API_KEY``  key of the ``gemini`` provider
``GEMINI_BASE_URL`` API root of a Gemini-compatible endpoint, e.g. ``http://127.0.0.1:8080/``
==================  =============================================================================
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping

from conductor.errors import ConfigError
from conductor.llm.base import LLMClient, LLMReply, LLMSettings

__all__ = ["BACKENDS", "LLMClient", "LLMReply", "LLMSettings", "make_client"]

#: provider name -> "module:Class" of its client; the module is imported on first use.
BACKENDS: dict[str, str] = {
    "openai": "conductor.llm.openai_backend:OpenAIClient",
    "gemini": "conductor.llm.gemini_backend:GeminiClient",
}


def make_client(settings: LLMSettings, environ: Mapping[str, str] = os.environ) -> LLMClient:
    """Build the client of ``settings.provider``.

    Args:
        settings: provider, model and call options.
        environ: where keys and base URLs are read (see the module docstring); tests pass their own.

    Returns:
        A client whose ``generate`` calls the provider.

    Raises:
        ConfigError: the provider is not one of :data:`BACKENDS`.
        CredentialsMissing: the provider needs a key that ``environ`` does not hold.
    """
    target = BACKENDS.get(settings.provider)
    if target is None:
        known = ", ".join(sorted(BACKENDS))
        raise ConfigError(f"unknown LLM provider {settings.provider!r}; known providers: {known}")
    module_name, class_name = target.split(":")
    client_class = getattr(importlib.import_module(module_name), class_name)
    return client_class(settings, environ)
